// A mount made with libmount and undone when the object goes away.
#pragma once

#include "common/fs.hpp"

#include <filesystem>
#include <optional>
#include <string>

namespace treeflash::flasher {

class Mount {
public:
    // Mounts `source` on a new private directory under `parent`.
    Mount(const std::string& source, const std::string& fstype, const std::string& options,
          const std::filesystem::path& parent);
    Mount(const Mount&) = delete;
    Mount& operator=(const Mount&) = delete;
    ~Mount();

    const std::filesystem::path& path() const { return m_dir->path(); }
    // Syncs and unmounts; throws when the file system stays busy.
    void unmount();

private:
    std::string m_source;
    std::optional<fs::TempDir> m_dir;
    bool m_mounted = false;
};

} // namespace treeflash::flasher
