// A file written whole and synced under a temporary name (NAME.tmp-PID,
// never through a symlink) in an open folder, moved to NAME later: for
// content that is ready before it may replace what NAME is now (the sync
// of something it describes can run meanwhile). fs::write_file_atomic_at
// is one made and published at once.
#pragma once

#include "common/fd.hpp"

#include <string>
#include <string_view>

namespace treeflash {

// Written and synced when made; moved to `name` by publish(); removed
// unless published. `what` names the file in errors.
class PendingFile {
public:
    PendingFile(int folder, std::string name, std::string_view content, std::string what);
    PendingFile(PendingFile&& other) noexcept;
    PendingFile& operator=(PendingFile&&) = delete;
    PendingFile(const PendingFile&) = delete;
    ~PendingFile();

    int folder() const { return m_folder.get(); }
    const std::string& name() const { return m_name; }
    void publish();

private:
    UniqueFd m_folder;
    std::string m_name;
    std::string m_temp;
    std::string m_what;
};

} // namespace treeflash
