#include "builder/repo.hpp"

#include "builder/archive_objects.hpp"

#include "common/error.hpp"

#include <cerrno>
#include <chrono>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/file.h>
#include <thread>
#include <vector>

namespace treeflash::builder {

namespace {

// The compression level of the repositories treeflash creates (their
// archive.zlib-level; libostree's default is 6).
constexpr int archive_zlib_level = 4;

void lock_exclusively(int fd, const std::filesystem::path& path, GCancellable* cancellable,
                      const BuildRepo::WaitNotice& on_wait)
{
    bool noticed = false;
    while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK && errno != EINTR)
            throw_errno("lock " + path.string());
        if (!noticed && on_wait)
            on_wait("waiting for another build of " + path.string() + " to finish");
        noticed = true;
        if (cancellable && g_cancellable_is_cancelled(cancellable))
            throw Cancelled();
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
}

// Removes what builds killed before they could clean up left: a new
// repository never published, and import scratch space. Only called while
// holding the lock every build of this path holds.
void remove_leftovers(const std::filesystem::path& path, const BuildRepo::WaitNotice& notice)
{
    std::error_code ec;
    std::filesystem::path parent = path.parent_path().empty() ? "." : path.parent_path();
    std::string partial_prefix = "." + path.filename().string() + ".partial-";
    std::vector<std::filesystem::path> stale;
    for (const auto& entry : std::filesystem::directory_iterator(parent, ec))
        if (entry.path().filename().string().rfind(partial_prefix, 0) == 0)
            stale.push_back(entry.path());
    for (const auto& entry : std::filesystem::directory_iterator(path / "tmp", ec))
        if (entry.path().filename().string().rfind("treeflash-import-", 0) == 0
            || entry.path().filename().string().rfind(archive_staging_prefix, 0) == 0)
            stale.push_back(entry.path());
    for (const auto& dir : stale) {
        if (!std::filesystem::is_directory(std::filesystem::symlink_status(dir, ec)))
            continue;
        if (notice)
            notice("removing " + dir.string() + ", left by an interrupted build");
        fs::remove_tree_quietly(dir);
    }
}

bool is_empty_directory(const std::filesystem::path& path)
{
    std::error_code ec;
    return std::filesystem::is_directory(path, ec) && std::filesystem::is_empty(path, ec) && !ec;
}

} // namespace

BuildRepo::BuildRepo(const std::filesystem::path& path, GCancellable* cancellable, const WaitNotice& on_wait)
    : m_path(path)
{
    std::error_code ec;
    std::filesystem::path parent = path.parent_path().empty() ? "." : path.parent_path();
    if (!std::filesystem::is_directory(parent, ec))
        throw Error(path.string() + ": parent directory " + parent.string() + " does not exist");
    std::filesystem::path lock_file = parent / ("." + path.filename().string() + ".lock");
    m_path_lock.reset(::open(lock_file.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644));
    bool exists = std::filesystem::exists(std::filesystem::symlink_status(path, ec));
    if (!m_path_lock && !(errno == EACCES && exists)) // a read-only parent: the repository's own lock must do
        throw_errno("create the lock " + lock_file.string());
    if (m_path_lock)
        lock_exclusively(m_path_lock.get(), path, cancellable, on_wait);
    // Another build may have created it while we waited.
    exists = std::filesystem::exists(std::filesystem::symlink_status(path, ec));
    if (m_path_lock)
        remove_leftovers(path, on_wait);
    GError* error = nullptr;
    if (!exists || is_empty_directory(path)) {
        m_replace_empty_dir = exists;
        m_new_repo.emplace(parent, "." + path.filename().string() + ".partial-");
        m_repo.reset(ostree_repo_create_at(AT_FDCWD, m_new_repo->path().c_str(), OSTREE_REPO_MODE_ARCHIVE, nullptr,
                                           cancellable, &error));
        if (!m_repo)
            throw_gerror(error, "create archive repository");
        // Level 4 instead of libostree's 6. treeflash compresses objects
        // with libdeflate at this level (builder/archive_objects.cpp): under
        // 1% more bytes than zlib at 6, in about a quarter of its time;
        // libostree, which compresses with zlib, writes at this level too.
        glib::KeyFile config(ostree_repo_copy_config(m_repo.get()));
        g_key_file_set_integer(config.get(), "archive", "zlib-level", archive_zlib_level);
        if (!ostree_repo_write_config(m_repo.get(), config.get(), &error))
            throw_gerror(error, "configure the archive repository");
        m_lock = fs::open_directory(m_new_repo->path());
        lock_exclusively(m_lock.get(), path, cancellable, on_wait);
        return;
    }
    if (!std::filesystem::exists(path / "config", ec) || !std::filesystem::is_directory(path / "objects", ec))
        throw Error(path.string() + " exists and is not an OSTree repository (no config, no objects/)");
    m_lock = fs::open_directory(path);
    lock_exclusively(m_lock.get(), path, cancellable, on_wait);
    m_repo.reset(ostree_repo_open_at(AT_FDCWD, path.c_str(), cancellable, &error));
    if (!m_repo)
        throw_gerror(error, "open repository " + path.string());
}

BuildRepo::~BuildRepo() = default; // m_new_repo's TempDir removes an unpublished repository

std::filesystem::path BuildRepo::scratch_parent() const
{
    return (m_new_repo ? m_new_repo->path() : m_path) / "tmp";
}

void BuildRepo::publish()
{
    if (!m_new_repo)
        return;
    // mkdtemp made it private; a repository is served to others.
    mode_t mask = ::umask(022);
    ::umask(mask);
    if (::chmod(m_new_repo->path().c_str(), 0777 & ~mask) != 0)
        throw_errno("chmod " + m_new_repo->path().string());
    // rename(2) replaces an empty directory atomically; otherwise refuse to
    // replace anything that appeared meanwhile.
    int rc = m_replace_empty_dir
                 ? ::rename(m_new_repo->path().c_str(), m_path.c_str())
                 : ::renameat2(AT_FDCWD, m_new_repo->path().c_str(), AT_FDCWD, m_path.c_str(), RENAME_NOREPLACE);
    if (rc != 0)
        throw_errno("move the new repository into place at " + m_path.string());
    m_new_repo->keep();
    m_new_repo.reset();
}

} // namespace treeflash::builder
