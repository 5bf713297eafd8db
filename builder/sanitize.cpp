#include "builder/stages.hpp"

#include <sys/stat.h>

#include <functional>

namespace treeflash::builder {

bool is_committable(mode_t st_mode)
{
    return S_ISDIR(st_mode) || S_ISREG(st_mode) || S_ISLNK(st_mode);
}

std::string special_kind_name(mode_t st_mode)
{
    if (S_ISCHR(st_mode))
        return "character device";
    if (S_ISBLK(st_mode))
        return "block device";
    if (S_ISFIFO(st_mode))
        return "FIFO";
    if (S_ISSOCK(st_mode))
        return "socket";
    return "unknown file type";
}

std::vector<std::string> sanitize_warnings(const ImportResult& imported)
{
    std::vector<std::string> warnings;
    if (!imported.dropped_special.empty()) {
        std::string list;
        for (const auto& entry : imported.dropped_special)
            list += (list.empty() ? "" : ", ") + entry;
        warnings.push_back("dropped " + std::to_string(imported.dropped_special.size())
                           + " special file(s) OSTree cannot store (devtmpfs creates device nodes at boot): " + list);
    }
    for (const auto& dir : imported.skipped_mounts)
        warnings.push_back("skipped the contents of " + dir + ": it is another file system mounted into the rootfs");
    if (!imported.unknown_types.empty()) {
        std::string list;
        for (const auto& entry : imported.unknown_types)
            list += (list.empty() ? "" : ", ") + entry;
        warnings.push_back("read " + std::to_string(imported.unknown_types.size())
                           + " tarball entries of unknown type as regular files (as GNU tar does): " + list);
    }
    if (!imported.dropped_xattrs.empty())
        warnings.push_back("dropped the build host's SELinux labels of " + std::to_string(imported.dropped_xattrs.size())
                           + " entries (the device's policy labels its own files), e.g. " + imported.dropped_xattrs.front());
    return warnings;
}

size_t apply_owners(Tree& tree, const OwnerOptions& options)
{
    size_t changed = 0;
    std::function<void(Node&)> visit = [&](Node& node) {
        bool differs = (options.uid && node.uid != *options.uid) || (options.gid && node.gid != *options.gid);
        if (options.uid)
            node.uid = *options.uid;
        if (options.gid)
            node.gid = *options.gid;
        changed += differs;
        for (auto& [name, child] : node.children)
            visit(*child);
    };
    visit(tree.root());
    return changed;
}

} // namespace treeflash::builder
