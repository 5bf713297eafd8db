#include "builder/stages.hpp"

#include "common/error.hpp"
#include "common/sha256.hpp"
#include "common/glib.hpp"

#include <algorithm>
#include <cerrno>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::builder {

namespace {

constexpr const char* legacy_dirs[] = {"usr/lib/ostree-boot", "boot"};
constexpr const char* legacy_prefixes[] = {"vmlinuz-", "initramfs-", "devicetree-"};
constexpr const char* modules_dir = "usr/lib/modules";
constexpr const char* modules_boot_files[] = {"vmlinuz", "initramfs.img", "devicetree", "dtb"};

bool is_sha256_hex(std::string_view text)
{
    if (text.size() != 64)
        return false;
    for (char c : text)
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return false;
    return true;
}

// OSTree's bootcsum: sha256 over the kernel, the initramfs and the
// devicetree(s) (dtb/ files in name order), concatenated.
std::string boot_checksum(const Tree& tree, const std::vector<const Node*>& files)
{
    Sha256 sum;
    for (const Node* file : files)
        tree.read_chunks(*file, [&](const char* bytes, size_t size) { sum.update(bytes, size); });
    return sum.hex();
}

std::unique_ptr<Node> host_file_node(const std::filesystem::path& given, const char* what)
{
    std::error_code ec;
    std::filesystem::path resolved = std::filesystem::canonical(given, ec);
    if (ec)
        throw Error(std::string(what) + " " + given.string() + ": " + ec.message());
    struct stat st {};
    if (::stat(resolved.c_str(), &st) != 0)
        throw_errno(std::string(what) + " " + given.string());
    if (!S_ISREG(st.st_mode))
        throw Error(std::string(what) + " " + given.string() + ": not a regular file");
    if (::access(resolved.c_str(), R_OK) != 0)
        throw_errno(std::string(what) + " " + given.string());
    if (st.st_size == 0)
        throw Error(std::string(what) + " " + given.string() + " is empty");
    auto node = std::make_unique<Node>();
    node->kind = Node::Kind::Regular;
    node->mode = 0644;
    node->size = static_cast<uint64_t>(st.st_size);
    node->source.origin = FileSource::Origin::HostFile;
    node->source.path = resolved.string();
    return node;
}

bool starts_with_any(const std::string& name, std::initializer_list<const char*> prefixes)
{
    for (const char* prefix : prefixes)
        if (name.rfind(prefix, 0) == 0)
            return true;
    return false;
}

// Removes kernels a rootfs brought along, in both layouts, so that OSTree
// finds only the one we place.
std::vector<std::string> remove_existing_kernels(Tree& tree)
{
    std::vector<std::string> removed;
    for (const char* dir : legacy_dirs) {
        Node* node = tree.find(dir);
        if (!node || !node->is_dir())
            continue;
        for (auto it = node->children.begin(); it != node->children.end();) {
            if (starts_with_any(it->first, {"vmlinuz-", "initramfs-", "devicetree-", "initrd.img-"})) {
                removed.push_back(std::string(dir) + "/" + it->first);
                it = node->children.erase(it);
            } else {
                ++it;
            }
        }
    }
    if (Node* modules = tree.find(modules_dir); modules && modules->is_dir()) {
        for (auto& [kver, dir] : modules->children) {
            if (!dir->is_dir() || !dir->children.count("vmlinuz"))
                continue;
            for (const char* name : modules_boot_files)
                if (dir->children.erase(name))
                    removed.push_back(std::string(modules_dir) + "/" + kver + "/" + name);
        }
    }
    return removed;
}

std::string derive_kver(const Tree& tree, const KernelOptions& options)
{
    if (!options.kver.empty())
        return options.kver;
    std::string name = options.kernel->filename().string();
    if (name.rfind("vmlinuz-", 0) == 0 && name.size() > 8)
        return name.substr(8);
    const Node* modules = tree.find(modules_dir);
    if (modules && modules->is_dir() && modules->children.size() == 1)
        return modules->children.begin()->first;
    throw Error("--kernel-layout modules needs the kernel version: pass --kver, name the kernel vmlinuz-KVER, or "
                "ship exactly one usr/lib/modules/KVER directory");
}

KernelResult place_given_kernel(Tree& tree, const KernelOptions& options)
{
    KernelResult result;
    result.layout = options.layout;
    if (options.layout == KernelLayout::Legacy && options.devicetrees.size() > 1)
        throw Error("the legacy layout holds one devicetree; use --kernel-layout modules for several");

    auto kernel = host_file_node(*options.kernel, "kernel");
    std::unique_ptr<Node> initramfs;
    if (options.initramfs)
        initramfs = host_file_node(*options.initramfs, "initramfs");
    std::vector<std::pair<std::string, std::unique_ptr<Node>>> devicetrees;
    for (const auto& dtb : options.devicetrees) {
        std::string name = dtb.filename().string();
        for (const auto& [other, unused] : devicetrees)
            if (other == name)
                throw Error("two devicetrees are named " + name);
        devicetrees.emplace_back(name, host_file_node(dtb, "devicetree"));
    }
    std::sort(devicetrees.begin(), devicetrees.end(), [](const auto& a, const auto& b) { return a.first < b.first; });

    std::vector<const Node*> hashed{kernel.get()};
    if (initramfs)
        hashed.push_back(initramfs.get());
    for (const auto& [name, node] : devicetrees)
        hashed.push_back(node.get());
    result.bootcsum = boot_checksum(tree, hashed);

    auto removed = remove_existing_kernels(tree);
    if (!removed.empty()) {
        std::string list;
        for (const auto& path : removed)
            list += (list.empty() ? "" : ", ") + path;
        result.warnings.push_back("replaced the kernel files the rootfs carried: " + list);
    }

    auto place = [&](const std::string& path, std::unique_ptr<Node> node) {
        tree.put(path, std::move(node));
        result.placed.push_back(path);
    };
    if (options.layout == KernelLayout::Legacy) {
        std::string dir = std::string(legacy_dirs[0]) + "/";
        place(dir + "vmlinuz-" + result.bootcsum, std::move(kernel));
        if (initramfs)
            place(dir + "initramfs-" + result.bootcsum, std::move(initramfs));
        if (!devicetrees.empty())
            place(dir + "devicetree-" + result.bootcsum, std::move(devicetrees.front().second));
    } else {
        result.kver = derive_kver(tree, options);
        std::string dir = std::string(modules_dir) + "/" + result.kver + "/";
        place(dir + "vmlinuz", std::move(kernel));
        if (initramfs)
            place(dir + "initramfs.img", std::move(initramfs));
        if (devicetrees.size() == 1)
            place(dir + "devicetree", std::move(devicetrees.front().second));
        else
            for (auto& [name, node] : devicetrees)
                place(dir + "dtb/" + name, std::move(node));
    }
    return result;
}

// A kernel the rootfs already carries, in the order OSTree's deploy looks.
std::optional<KernelResult> find_modules_kernel(Tree& tree)
{
    const Node* modules = tree.find(modules_dir);
    if (!modules || !modules->is_dir())
        return std::nullopt;
    for (const auto& [kver, dir] : modules->children) {
        if (!dir->is_dir())
            continue;
        auto vmlinuz = dir->children.find("vmlinuz");
        if (vmlinuz == dir->children.end() || !vmlinuz->second->is_regular())
            continue;
        KernelResult result;
        result.layout = KernelLayout::Modules;
        result.kver = kver;
        result.from_rootfs = true;
        std::string base = std::string(modules_dir) + "/" + kver + "/";
        std::vector<const Node*> hashed{vmlinuz->second.get()};
        result.placed.push_back(base + "vmlinuz");
        if (auto it = dir->children.find("initramfs.img"); it != dir->children.end() && it->second->is_regular()) {
            hashed.push_back(it->second.get());
            result.placed.push_back(base + "initramfs.img");
        }
        if (auto it = dir->children.find("devicetree"); it != dir->children.end() && it->second->is_regular()) {
            hashed.push_back(it->second.get());
            result.placed.push_back(base + "devicetree");
        } else if (auto dtb = dir->children.find("dtb"); dtb != dir->children.end() && dtb->second->is_dir()) {
            Tree::walk(base + "dtb", *dtb->second, [&](const std::string& path, const Node& node) {
                if (node.is_regular()) {
                    hashed.push_back(&node);
                    result.placed.push_back(path);
                }
            });
        }
        result.bootcsum = boot_checksum(tree, hashed);
        return result;
    }
    return std::nullopt;
}

std::optional<KernelResult> find_legacy_kernel(const Tree& tree)
{
    for (const char* dir_path : legacy_dirs) {
        const Node* dir = tree.find(dir_path);
        if (!dir || !dir->is_dir())
            continue;
        KernelResult result;
        result.layout = KernelLayout::Legacy;
        result.from_rootfs = true;
        for (const auto& [name, node] : dir->children) {
            for (const char* prefix : legacy_prefixes) {
                if (name.rfind(prefix, 0) != 0)
                    continue;
                std::string suffix = name.substr(std::string_view(prefix).size());
                bool is_kernel = std::string_view(prefix) == "vmlinuz-";
                if (!is_sha256_hex(suffix)) {
                    if (is_kernel)
                        throw Error(std::string(dir_path) + "/" + name
                                    + ": a legacy kernel must be named vmlinuz-<sha256 of kernel, initramfs and "
                                      "devicetree>; pass --kernel to have it placed");
                    continue;
                }
                if (!result.bootcsum.empty() && result.bootcsum != suffix)
                    throw Error(std::string(dir_path) + ": kernel files carry different checksum suffixes ("
                                + result.bootcsum + ", " + suffix + ")");
                result.bootcsum = suffix;
                result.placed.push_back(std::string(dir_path) + "/" + name);
            }
        }
        if (!result.bootcsum.empty())
            return result;
    }
    return std::nullopt;
}

} // namespace

std::string to_string(KernelLayout layout)
{
    return layout == KernelLayout::Legacy ? "legacy" : "modules";
}

KernelLayout parse_kernel_layout(std::string_view text)
{
    if (text == "legacy")
        return KernelLayout::Legacy;
    if (text == "modules")
        return KernelLayout::Modules;
    throw Error("unknown kernel layout '" + std::string(text) + "' (legacy or modules)");
}

KernelResult place_kernel(Tree& tree, const KernelOptions& options)
{
    if (options.kernel)
        return place_given_kernel(tree, options);
    if (options.initramfs || !options.devicetrees.empty())
        throw Error("--initramfs and --devicetree need --kernel");
    if (auto found = find_modules_kernel(tree))
        return *found;
    if (auto found = find_legacy_kernel(tree))
        return *found;
    throw Error("no kernel: pass --kernel FILE, or ship one in the rootfs as usr/lib/modules/KVER/vmlinuz "
                "(modules layout) or usr/lib/ostree-boot/vmlinuz-SHA256 (legacy layout)");
}

} // namespace treeflash::builder
