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

// Options for mounting a file system from a card that may be hostile: no
// set-uid, device nodes or programs from it. (Readers that only inspect add
// nosymfollow; OSTree itself needs the card's symlinks.)
extern const char* const untrusted_mount_options;

} // namespace treeflash::flasher
