// Programs added to a commit from a userland tree, with exactly the loader
// and libraries their ELF headers ask for (`build --userland --program`).
#include "builder/elf.hpp"
#include "builder/stages.hpp"
#include "common/error.hpp"

namespace treeflash::builder {

namespace {

// "usr/bin/ostree" from "/usr/bin/ostree" or "usr/bin/ostree"; refuses
// anything that is not a plain path of named components.
std::string program_path(const std::string& given)
{
    std::string path = given;
    while (!path.empty() && path.front() == '/')
        path.erase(0, 1);
    if (path.empty())
        throw Error("--program '" + given + "': name a file inside --userland, such as usr/bin/ostree");
    for (size_t pos = 0; pos <= path.size();) {
        size_t end = std::min(path.find('/', pos), path.size());
        std::string part = path.substr(pos, end - pos);
        if (part.empty() || part == "." || part == "..")
            throw Error("--program '" + given + "': a path inside --userland without empty, '.' or '..' components");
        pos = end + 1;
    }
    return path;
}

// Where `path` lands in the tree: its parent's links followed inside the
// tree (bin -> usr/bin), so a usr-merged rootfs gets the file in usr/.
std::string place(const Tree& tree, const std::string& path)
{
    auto slash = path.rfind('/');
    if (slash == std::string::npos)
        return path;
    std::string parent = path.substr(0, slash);
    std::string resolved;
    const Node* node = tree.resolve(parent, &resolved);
    if (node && node->is_dir())
        return (resolved.empty() ? "" : resolved + "/") + path.substr(slash + 1);
    return path;
}

bool resolves_to_file(const Tree& tree, const std::string& path)
{
    const Node* node = tree.resolve(path);
    return node && node->is_regular();
}

} // namespace

ProgramsResult add_programs(Tree& tree, const ProgramsOptions& options)
{
    ProgramsResult result;
    if (options.programs.empty())
        return result;
    if (options.userland.empty())
        throw Error("--program needs --userland, the tree the programs and their libraries are read from");
    RuntimeResolver resolver(options.userland);

    // The directories the loader searches by default, as the rootfs has them.
    std::vector<std::string> library_dirs;
    for (const char* base : {"lib", "usr/lib"}) {
        std::string resolved;
        const Node* dir = tree.resolve(base, &resolved);
        if (!dir || !dir->is_dir())
            continue;
        for (const auto& [name, child] : dir->children)
            if (name.find("-linux-") != std::string::npos)
                library_dirs.push_back(std::string(base) + "/" + name);
    }
    for (const char* dir : {"lib", "usr/lib", "lib64", "usr/lib64"})
        library_dirs.emplace_back(dir);
    auto provided = [&](const RuntimeFile& file) {
        if (file.role == RuntimeFile::Role::Loader && resolves_to_file(tree, file.name.substr(1))) {
            result.kept.push_back(file.name);
            return true;
        }
        if (file.role == RuntimeFile::Role::Library)
            for (const auto& dir : library_dirs)
                if (resolves_to_file(tree, dir + "/" + file.name)) {
                    result.kept.push_back(file.name);
                    return true;
                }
        return false;
    };

    for (const auto& given : options.programs) {
        std::string program = program_path(given);
        for (RuntimeFile& file : resolver.resolve(program, provided)) {
            std::string target;
            mode_t mode = 0644;
            switch (file.role) {
            case RuntimeFile::Role::Program:
                target = place(tree, program);
                mode = 0755;
                if (tree.find(target))
                    result.warnings.push_back("--program " + given + " replaces the rootfs's own /" + target);
                break;
            case RuntimeFile::Role::Loader:
                target = place(tree, file.name.substr(1));
                mode = 0755;
                break;
            case RuntimeFile::Role::Library:
                target = place(tree, "usr/lib/" + file.name);
                break;
            }
            result.bytes += file.bytes.size();
            tree.put(target, Node::memory_file(std::move(file.bytes), mode));
            result.added.push_back(target);
        }
    }
    return result;
}

} // namespace treeflash::builder
