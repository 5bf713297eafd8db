#include "builder/stages.hpp"

#include "common/error.hpp"
#include "common/text.hpp"
#include "common/validate.hpp"
#include "common/templates.hpp"

#include <sstream>

namespace treeflash::builder {

namespace {

// The directories OSTree expects at the top of every deployment, empty,
// with their modes. Their contents are provided at boot.
struct ApiDir {
    const char* name;
    mode_t mode;
    bool keep_content; // var and boot may carry content on purpose
};
constexpr ApiDir api_dirs[] = {
    {"dev", 0755, false}, {"proc", 0555, false}, {"sys", 0555, false}, {"run", 0755, false},
    {"tmp", 01777, false}, {"var", 0755, true},  {"boot", 0755, true},  {"sysroot", 0755, false},
};

std::string summarize(const std::vector<std::string>& paths, size_t max_listed = 10)
{
    std::string text;
    for (size_t i = 0; i < paths.size() && i < max_listed; ++i)
        text += (i ? ", " : "") + paths[i];
    if (paths.size() > max_listed)
        text += ", and " + std::to_string(paths.size() - max_listed) + " more";
    return text;
}

void require_not_symlink(const Node* node, const std::string& path)
{
    if (node && node->is_symlink())
        throw Error("/" + path + " is a symlink (-> " + node->symlink_target + "); the rootfs must carry /" + path
                    + " as a directory");
    if (node && !node->is_dir())
        throw Error("/" + path + " is not a directory");
}

void move_etc(Tree& tree, NormalizeResult& result)
{
    require_not_symlink(tree.find("usr"), "usr");
    Node* etc = tree.find("etc");
    Node* usr_etc = tree.find("usr/etc");
    require_not_symlink(etc, "etc");
    require_not_symlink(usr_etc, "usr/etc");
    if (etc && usr_etc) {
        if (!etc->children.empty() && !usr_etc->children.empty())
            throw Error("the rootfs has both /etc and /usr/etc with content; OSTree takes its default configuration "
                        "from /usr/etc alone: merge /etc into /usr/etc first");
        if (etc->children.empty()) {
            tree.take("etc");
            return;
        }
        tree.take("usr/etc");
    }
    if (etc) {
        tree.ensure_dir("usr");
        tree.put("usr/etc", tree.take("etc"));
        result.moved_etc = true;
    } else if (!usr_etc) {
        tree.ensure_dir("usr/etc");
    }
}

std::string quote_value(const std::string& value)
{
    bool plain = !value.empty();
    for (char c : value)
        if (!(isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'))
            plain = false;
    if (plain)
        return value;
    std::string quoted = "\"";
    for (char c : value) {
        if (c == '"' || c == '\\' || c == '$' || c == '`')
            quoted += '\\';
        quoted += c;
    }
    return quoted + "\"";
}

// The os-release file at `path`, its symlinks followed inside the tree:
// "" when absent; an error when a symlink leads out of the tree (OSTree
// would read the build host's file at deploy time).
std::string read_os_release(const Tree& tree, const std::string& path)
{
    const Node* node = tree.find(path);
    if (!node)
        return "";
    if (node->is_symlink()) {
        // A link in usr/etc is resolved from where the booted system sees it: /etc.
        std::string booted = path.rfind("usr/etc/", 0) == 0 ? path.substr(4) : path;
        const Node* target = tree.resolve(booted);
        if (!target || !target->is_regular())
            throw Error(path + " is a symlink to " + node->symlink_target
                        + ", which is not a file in the rootfs; OSTree would read the deploying host's instead");
        return tree.read_all(*target);
    }
    if (!node->is_regular())
        throw Error(path + " is not a file");
    return tree.read_all(*node);
}

void write_os_release(Tree& tree, const NormalizeOptions& options, NormalizeResult& result)
{
    for (const auto& [key, value] : options.os_release) {
        validate::single_line(key, "--os-release");
        validate::single_line(value, "--os-release " + key);
        if (key.empty() || key.find_first_of("= #") != std::string::npos)
            throw Error("--os-release '" + key + "': not a KEY");
    }
    validate::single_line(options.version, "--version");
    std::string lib = read_os_release(tree, "usr/lib/os-release");
    std::string etc = read_os_release(tree, "usr/etc/os-release");
    // OSTree opens these inside the deployment, where an absolute link leads
    // to the deploying host: such a link becomes a file. Relative links
    // (Debian's /etc/os-release -> ../usr/lib/os-release) stay as they are.
    auto absolute_link = [&](const char* path) {
        const Node* node = tree.find(path);
        return node && node->is_symlink() && !node->symlink_target.empty() && node->symlink_target[0] == '/';
    };
    bool lib_absolute = absolute_link("usr/lib/os-release");
    bool etc_absolute = absolute_link("usr/etc/os-release");
    bool have = !lib.empty() || !etc.empty();
    bool rewrite = !have || !options.os_release.empty() || !options.version.empty();
    if (!rewrite && !lib_absolute && !etc_absolute)
        return; // the rootfs's own os-release, untouched
    NormalizeOptions effective = options;
    if (have && !options.version.empty())
        effective.os_release.emplace("VERSION_ID", options.version); // an explicit --os-release VERSION_ID= wins
    std::string text = rewrite ? render_os_release(effective, !lib.empty() ? lib : etc) : (!lib.empty() ? lib : etc);
    // usr/lib/os-release is what OSTree reads first.
    if (rewrite || lib_absolute)
        tree.put("usr/lib/os-release", Node::memory_file(text));
    const Node* etc_node = tree.find("usr/etc/os-release");
    if (etc_absolute || (rewrite && etc_node && etc_node->is_regular()))
        tree.put("usr/etc/os-release", Node::memory_file(text));
    result.wrote_os_release = true;
}

constexpr const char* boot_health_path = "usr/lib/treeflash/boot-health";
constexpr const char* auto_update_path = "usr/lib/treeflash/auto-update";
constexpr const char* auto_update_conf_path = "usr/etc/treeflash/auto-update.conf";

// Adds "::once:/PROGRAM" to a busybox /etc/inittab (once), so init starts
// `program` at every boot. Returns false, with a warning ending in `hint`,
// when the rootfs has no such inittab.
bool start_from_inittab(Tree& tree, const std::string& program, const std::string& comment, const std::string& hint,
                        NormalizeResult& result)
{
    Node* inittab = tree.find("usr/etc/inittab");
    if (!inittab) {
        result.warnings.push_back("no /etc/inittab" + hint);
        return false;
    }
    if (!inittab->is_regular()) {
        result.warnings.push_back("/etc/inittab is not a plain file" + hint);
        return false;
    }
    std::string text = tree.read_all(*inittab);
    if (text.find("/" + program) != std::string::npos)
        return true;
    if (text.find("::") == std::string::npos) {
        result.warnings.push_back("/etc/inittab is not busybox's (no ID:RUNLEVEL:ACTION:PROCESS line)" + hint);
        return false;
    }
    if (!text.empty() && text.back() != '\n')
        text += '\n';
    text += "# Added by treeflash build: " + comment + "\n::once:/" + program + "\n";
    auto node = Node::memory_file(text, inittab->mode);
    node->uid = inittab->uid;
    node->gid = inittab->gid;
    tree.put("usr/etc/inittab", std::move(node));
    return true;
}

// The script that marks a deployment good on boards that count boots
// (templates/boot-health), started once per boot by a busybox inittab line.
void install_boot_health(Tree& tree, NormalizeResult& result)
{
    tree.put(boot_health_path, Node::memory_file(std::string(templates::get("boot-health")), 0755));
    std::string hint = std::string("; start /") + boot_health_path
                       + " once per boot from the image's init, or boards that count boots roll every upgrade back";
    if (start_from_inittab(tree, boot_health_path, "marks this deployment good once its health checks pass.", hint,
                           result))
        result.boot_health_hook = "inittab";
}

// The board's own updater (templates/auto-update) and its settings, kept
// when the rootfs brings its own; started once per boot like boot-health.
void install_auto_update(Tree& tree, NormalizeResult& result)
{
    tree.put(auto_update_path, Node::memory_file(std::string(templates::get("auto-update")), 0755));
    if (!tree.find(auto_update_conf_path)) {
        if (Node* dir = tree.find("usr/etc/treeflash"); dir && !dir->is_dir())
            throw Error("/etc/treeflash is not a directory");
        tree.put(auto_update_conf_path, Node::memory_file(std::string(templates::get("auto-update.conf")), 0644));
    }
    std::string hint = std::string("; start /") + auto_update_path
                       + " once per boot from the image's init, or the board never updates itself";
    if (start_from_inittab(tree, auto_update_path, "follows the origin: pulls, deploys and reboots into new commits.",
                           hint, result))
        result.auto_update_hook = "inittab";
}

void ensure_api_dirs(Tree& tree, NormalizeResult& result)
{
    for (const ApiDir& dir : api_dirs) {
        Node* node = tree.find(dir.name);
        if (node && !node->is_dir()) {
            result.warnings.push_back(std::string("replaced /") + dir.name + " (not a directory) with an empty directory");
            tree.take(dir.name);
            node = nullptr;
        }
        if (!node) {
            tree.put(dir.name, Node::directory(dir.mode));
            continue;
        }
        if (std::string_view(dir.name) == "tmp")
            node->mode = dir.mode; // world-writable and sticky, whatever the input had
        if (!dir.keep_content && !node->children.empty()) {
            auto dropped = list_below(tree, dir.name);
            result.warnings.push_back("dropped " + std::to_string(dropped.size()) + " entries under /" + dir.name
                                      + " (provided at boot, not by the commit): " + summarize(dropped));
            node->children.clear();
        }
    }
    Node* ostree_link = tree.find("ostree");
    if (ostree_link && !(ostree_link->is_symlink() && ostree_link->symlink_target == "sysroot/ostree"))
        result.warnings.push_back("replaced /ostree with the symlink ostree -> sysroot/ostree");
    tree.put("ostree", Node::symlink("sysroot/ostree"));
}

void report_layout(const Tree& tree, NormalizeResult& result)
{
    result.var_entries = list_below(tree, "var");
    if (!result.var_entries.empty())
        result.warnings.push_back(std::to_string(result.var_entries.size())
                                  + " entries under /var are only seeded by the first deployment; upgrades do not "
                                    "carry them into existing deployments: "
                                  + summarize(result.var_entries));
    std::vector<std::string> outside_usr;
    for (const char* name : {"bin", "sbin", "lib", "lib64", "lib32"}) {
        const Node* node = tree.find(name);
        if (node && node->is_dir() && !node->children.empty())
            outside_usr.push_back(std::string("/") + name);
    }
    if (!outside_usr.empty())
        result.warnings.push_back("the rootfs is not usr-merged (" + summarize(outside_usr)
                                  + " are directories): only /usr is read-only at boot, so programs there can be "
                                    "modified on the device; make them symlinks into /usr");
}

} // namespace

std::string render_os_release(const NormalizeOptions& options, const std::string& existing)
{
    std::string base = existing;
    if (base.empty()) {
        base = std::string(templates::get("os-release"));
        text::replace_all(base, "@OS@", options.os_name);
        text::replace_all(base, "@VERSION@", options.version);
    }
    // Parse KEY=VALUE lines, keep their order, apply the overrides.
    std::vector<std::pair<std::string, std::string>> entries;
    std::istringstream in(base);
    std::string line;
    while (std::getline(in, line)) {
        auto eq = line.find('=');
        if (line.empty() || line[0] == '#' || eq == std::string::npos)
            continue;
        std::string key = line.substr(0, eq);
        std::string value = line.substr(eq + 1);
        if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') && value.back() == value.front())
            value = value.substr(1, value.size() - 2);
        while (!value.empty() && value.back() == ' ')
            value.pop_back();
        if (!value.empty())
            entries.emplace_back(key, value);
    }
    for (const auto& [key, value] : options.os_release) {
        bool found = false;
        for (auto& entry : entries)
            if (entry.first == key) {
                entry.second = value;
                found = true;
            }
        if (!found)
            entries.emplace_back(key, value);
    }
    std::string out;
    for (const auto& [key, value] : entries)
        out += key + "=" + quote_value(value) + "\n";
    return out;
}

NormalizeResult normalize(Tree& tree, const NormalizeOptions& options)
{
    NormalizeResult result;
    in_step("/etc", [&] { move_etc(tree, result); });
    in_step("os-release", [&] { write_os_release(tree, options, result); });
    if (options.boot_health)
        in_step("boot health", [&] { install_boot_health(tree, result); });
    if (options.auto_update)
        in_step("auto-update", [&] { install_auto_update(tree, result); });
    in_step("layout", [&] {
        ensure_api_dirs(tree, result);
        report_layout(tree, result);
    });
    return result;
}

} // namespace treeflash::builder
