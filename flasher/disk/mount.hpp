// A mount made with libmount and undone when the object goes away.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

namespace treeflash::flasher {

// The mount point is a new empty directory; only ever rmdir'd, never
// removed recursively, so a mount that could not be undone loses nothing.
class Mount {
public:
    // Mounts `source` on a new private directory under `parent`.
    Mount(const std::string& source, const std::string& fstype, const std::string& options,
          const std::filesystem::path& parent);
    Mount(const Mount&) = delete;
    Mount& operator=(const Mount&) = delete;
    ~Mount();

    const std::filesystem::path& path() const { return m_dir; }
    // Syncs and unmounts; throws when the file system stays busy.
    void unmount();

private:
    void mount(const std::string& source, const std::string& fstype, const std::string& options);
    void remove_mount_point() noexcept;

    std::string m_source;
    std::filesystem::path m_dir;
    bool m_mounted = false;
};

// Moves this process into a mount namespace of its own, so that the mounts
// it makes vanish with it, even when it is killed with SIGKILL (and the
// loop devices under them, set to clear themselves, detach). Mounts made
// elsewhere still reach it (the namespace is a slave of the host's), and
// mount points are made on a tmpfs there, so a killed run leaves no empty
// directory either. Must run before the process starts a thread; returns
// false where the kernel refuses (then mounts are made as before).
bool enter_own_mount_namespace();

// Where mount points are made: the private tmpfs once
// enter_own_mount_namespace succeeded, else the temporary directory.
std::filesystem::path mount_point_parent();

// Options for mounting a file system from a card that may be hostile: no
// set-uid, device nodes or programs from it. (Readers that only inspect add
// nosymfollow; OSTree itself needs the card's symlinks.)
extern const char* const untrusted_mount_options;

} // namespace treeflash::flasher
