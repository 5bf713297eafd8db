#include "flasher/inspect.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/glib.hpp"
#include "flasher/card_files.hpp"
#include "flasher/loop.hpp"
#include "flasher/mount.hpp"

#include <fcntl.h>
#include <sstream>
#include <glib.h>
#include <linux/fs.h>
#include <memory>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

void read_origin(const std::string& repo_config, InspectResult& result)
{
    glib::KeyFile config(g_key_file_new());
    if (g_key_file_load_from_data(config.get(), repo_config.data(), repo_config.size(), G_KEY_FILE_NONE, nullptr)) {
        result.origin_url = glib::take_string(g_key_file_get_string(config.get(), "remote \"origin\"", "url", nullptr));
        result.origin_gpg_verify =
            glib::take_string(g_key_file_get_string(config.get(), "remote \"origin\"", "gpg-verify", nullptr));
    }
}

} // namespace

InspectResult inspect(const std::string& path, GCancellable* cancellable)
{
    InspectResult result;
    result.target = path;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
        throw_errno(path);
    if (!S_ISBLK(st.st_mode) && !S_ISREG(st.st_mode))
        throw Error(path + " is neither a block device nor an image file");
    if (S_ISREG(st.st_mode)) {
        result.size = static_cast<uint64_t>(st.st_size);
    } else {
        UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
        if (!fd || ::ioctl(fd.get(), BLKGETSIZE64, &result.size) != 0)
            throw_errno("size of " + path);
    }
    result.table = in_step("partition table", [&] { return read_partition_table(path); });
    for (const auto& entry : result.table.partitions)
        result.partitions.push_back({entry, probe_filesystem(path, entry.start, entry.size)});

    // The sysroot partition: ext4 labelled rootfs first, then any ext4.
    const InspectedPartition* candidate = nullptr;
    for (const auto& part : result.partitions)
        if (part.filesystem.type == "ext4" && part.filesystem.label == "rootfs")
            candidate = &part;
    for (const auto& part : result.partitions)
        if (!candidate && part.filesystem.type == "ext4")
            candidate = &part;
    if (!candidate && result.partitions.empty())
        return result;

    if (::geteuid() != 0)
        throw Error("reading the file systems needs root (loop devices and mounts); the partition table above was read");
    std::filesystem::path parent = std::filesystem::temp_directory_path();
    for (const auto& part : result.partitions) {
        if (part.filesystem.type != "ext4")
            continue;
        // A read-only loop device over just this partition: works the same
        // for images and cards, and never depends on partition nodes.
        std::string node = "p" + std::to_string(part.entry.number);
        LoopDevice loop(path, true, part.entry.start, part.entry.size);
        // Read only, journal not replayed, nothing on the card executable or
        // set-uid. Files are read without following the card's symlinks,
        // and libostree lists deployments only when the sysroot's own links
        // stay on the card.
        Mount mount(loop.path(), "ext4", std::string("ro,noload,") + untrusted_mount_options, parent);
        const auto& root = mount.path();
        if (type_on_card(root, "boot.scr") == S_IFREG || type_on_card(root, "boot/boot.scr") == S_IFREG)
            result.has_boot_script = true;
        if (type_on_card(root, "ostree/repo") != S_IFDIR || result.sysroot_partition)
            continue;
        result.sysroot_partition = static_cast<int>(part.entry.number);
        result.has_update_marker = type_on_card(root, "update") == S_IFREG;
        result.has_newroot = type_on_card(root, "newroot") == S_IFDIR;
        result.has_mnt = type_on_card(root, "mnt") == S_IFDIR;
        result.deployments = in_step("sysroot on " + node, [&] {
            check_sysroot_links(root);
            return list_deployments(root, cancellable);
        });
        // boot/loader is a symlink OSTree flips between loader.0 and loader.1:
        // resolved by hand, to a name inside boot/ only.
        std::string loader = read_link_on_card(root, "boot/loader");
        if (loader == "loader.0" || loader == "loader.1")
            result.uenv = parse_env_lines(read_on_card(root, "boot/" + loader + "/uEnv.txt"));
        read_origin(read_on_card(root, "ostree/repo/config"), result);
        result.boot = boot_status(read_boot_files(root, path), result.deployments);
    }
    return result;
}

} // namespace treeflash::flasher
