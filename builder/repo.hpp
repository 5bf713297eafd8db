// The repository a build writes into: opened or created, and held
// exclusively for the whole build.
#pragma once

#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/glib.hpp"

#include <filesystem>
#include <functional>
#include <optional>
#include <ostree.h>

namespace treeflash::builder {

class BuildRepo {
public:
    using WaitNotice = std::function<void(const std::string&)>;

    // Opens the archive repository at `path` and takes its build lock,
    // waiting (and calling `on_wait` once) while another build holds it. A
    // missing path, or an empty directory, gets a new archive repository that
    // is built beside it and appears at `path` only through publish().
    //
    // The lock is a file beside the repository (.NAME.lock), so builds into
    // a repository that does not exist yet take turns too; the second one
    // then finds the repository the first one made. Holding it, the build
    // removes what killed builds left (.NAME.partial-*, NAME/tmp/treeflash-import-*).
    BuildRepo(const std::filesystem::path& path, GCancellable* cancellable, const WaitNotice& on_wait = {});
    BuildRepo(const BuildRepo&) = delete;
    BuildRepo& operator=(const BuildRepo&) = delete;
    ~BuildRepo(); // an unpublished new repository is removed

    OstreeRepo* get() const { return m_repo.get(); }
    bool is_new() const { return m_new_repo.has_value(); }
    // Where scratch data of this build goes (on the repository's file system).
    std::filesystem::path scratch_parent() const;
    // Makes a new repository appear at its path (no-op for an existing one).
    void publish();

private:
    std::filesystem::path m_path;
    std::optional<fs::TempDir> m_new_repo;
    bool m_replace_empty_dir = false;
    UniqueFd m_path_lock; // .NAME.lock beside the repository
    UniqueFd m_lock;      // the repository directory (what older builds locked)
    glib::Object<OstreeRepo> m_repo;
};

} // namespace treeflash::builder
