#include "flasher/inspect.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "flasher/loop.hpp"
#include "flasher/mount.hpp"

#include <fcntl.h>
#include <fstream>
#include <glib.h>
#include <linux/fs.h>
#include <memory>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

std::map<std::string, std::string> read_env_file(const std::filesystem::path& path)
{
    std::map<std::string, std::string> values;
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) {
        auto eq = line.find('=');
        if (eq != std::string::npos && line[0] != '#')
            values[line.substr(0, eq)] = line.substr(eq + 1);
    }
    return values;
}

void read_origin(const std::filesystem::path& repo_config, InspectResult& result)
{
    GKeyFile* config = g_key_file_new();
    if (g_key_file_load_from_file(config, repo_config.c_str(), G_KEY_FILE_NONE, nullptr)) {
        if (char* url = g_key_file_get_string(config, "remote \"origin\"", "url", nullptr)) {
            result.origin_url = url;
            g_free(url);
        }
        if (char* verify = g_key_file_get_string(config, "remote \"origin\"", "gpg-verify", nullptr)) {
            result.origin_gpg_verify = verify;
            g_free(verify);
        }
    }
    g_key_file_unref(config);
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
        Mount mount(loop.path(), "ext4", "ro,noload", parent);
        std::error_code ec;
        if (std::filesystem::exists(mount.path() / "boot.scr", ec) || std::filesystem::exists(mount.path() / "boot/boot.scr", ec))
            result.has_boot_script = true;
        if (!std::filesystem::is_directory(mount.path() / "ostree/repo", ec) || result.sysroot_partition)
            continue;
        result.sysroot_partition = static_cast<int>(part.entry.number);
        result.has_update_marker = std::filesystem::exists(mount.path() / "update", ec);
        result.has_newroot = std::filesystem::is_directory(mount.path() / "newroot", ec);
        result.has_mnt = std::filesystem::is_directory(mount.path() / "mnt", ec);
        result.uenv = read_env_file(mount.path() / "boot/loader/uEnv.txt");
        read_origin(mount.path() / "ostree/repo/config", result);
        result.deployments = in_step("sysroot on " + node, [&] { return list_deployments(mount.path(), cancellable); });
    }
    return result;
}

} // namespace treeflash::flasher
