#include "common/named_file.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"

#include <cerrno>
#include <fcntl.h>
#include <unistd.h>

namespace treeflash::named {

namespace {

std::string named(const std::filesystem::path& path, std::string_view what)
{
    return std::string(what) + " " + path.string();
}

bool shared(int folder_fd)
{
    struct stat st {};
    return ::fstat(folder_fd, &st) != 0 || others_may_change(st);
}

// A symlink may be followed no more often than the kernel would.
constexpr int max_links = 40;

UniqueFd open_folder_at(int start, const std::filesystem::path& folder, const std::filesystem::path& path,
                        std::string_view what, int& links);

// The target of the symlink `name` in the open folder `at`, when `at` is
// no folder others can write (`kind`: "file" or "folder", for the message).
std::filesystem::path link_target(int at, const std::string& name, const std::filesystem::path& path,
                                  std::string_view what, const char* kind, int& links)
{
    if (shared(at))
        throw Error(named(path, what) + ": " + name + " is a symlink in a folder other users can write; name the "
                    + kind + " it points to");
    if (++links > max_links)
        throw Error(named(path, what) + ": too many levels of symlinks");
    char target[4096];
    ssize_t n = ::readlinkat(at, name.c_str(), target, sizeof target - 1);
    if (n < 0)
        throw_errno("read the symlink " + name + " on the way to " + path.string());
    return std::string(target, static_cast<size_t>(n));
}

// Follows the symlink `name` in the open folder `at` to the folder it names.
UniqueFd follow_folder_link(int at, const std::string& name, const std::filesystem::path& path, std::string_view what,
                            int& links)
{
    std::filesystem::path to = link_target(at, name, path, what, "folder", links);
    UniqueFd root(::open("/", O_PATH | O_DIRECTORY | O_CLOEXEC));
    return open_folder_at(to.is_absolute() ? root.get() : at, to.relative_path(), path, what, links);
}

// Opens `folder` below the open folder `start`, one component at a time,
// never following a symlink without the rule above: the checks are made on
// open folders, so nothing can be swapped between a check and the use.
UniqueFd open_folder_at(int start, const std::filesystem::path& folder, const std::filesystem::path& path,
                        std::string_view what, int& links)
{
    UniqueFd current(::fcntl(start, F_DUPFD_CLOEXEC, 3));
    for (const auto& part : folder) {
        std::string name = part.string();
        if (name.empty() || name == "." || name == "/")
            continue;
        struct stat st {};
        if (name != ".." && ::fstatat(current.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode)) {
            current = follow_folder_link(current.get(), name, path, what, links);
            continue;
        }
        UniqueFd next(::openat(current.get(), name.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!next)
            throw_errno("open the folder " + name + " on the way to " + path.string());
        current = std::move(next);
    }
    return current;
}

// Whether the entry `name` of the open folder `at` can be renamed or
// replaced by another user: `at` is writable by others, and not sticky with
// `name` owned by the caller or root.
bool others_can_replace(int at, const std::string& name)
{
    if (!shared(at))
        return false;
    struct stat folder {}, entry {};
    if (::fstat(at, &folder) != 0 || !(folder.st_mode & S_ISVTX))
        return true;
    if (::fstatat(at, name.c_str(), &entry, AT_SYMLINK_NOFOLLOW) != 0)
        return true;
    return entry.st_uid != 0 && entry.st_uid != ::geteuid();
}

// `path`'s last component, which must name a file.
std::string file_name(const std::filesystem::path& path, std::string_view what)
{
    std::string name = path.filename().string();
    if (name.empty() || name == "." || name == "..")
        throw Error(named(path, what) + " names a folder, not a file");
    return name;
}

// The open folder that holds `path`'s last component.
UniqueFd open_folder_of(const std::filesystem::path& path, std::string_view what, int& links)
{
    UniqueFd start(::open(path.is_absolute() ? "/" : ".", O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!start)
        throw_errno("open the folder of " + path.string());
    return open_folder_at(start.get(), path.relative_path().parent_path(), path, what, links);
}

// Opens the last component `name` in the open folder `folder` with `flags`
// (plus O_NOFOLLOW, O_NONBLOCK): a symlink there is followed, by the same
// rules, only out of a folder nobody else can write, and only to a file
// that exists (a dangling link would create whatever it names).
UniqueFd open_in_folder(int folder, const std::string& name, const std::filesystem::path& path, std::string_view what,
                        int flags, int& links)
{
    const int common = O_CLOEXEC | O_NOCTTY | O_NONBLOCK | O_NOFOLLOW;
    UniqueFd fd(::openat(folder, name.c_str(), flags | common, 0644));
    if (fd || errno != ELOOP)
        return fd;
    struct stat link {};
    if (::fstatat(folder, name.c_str(), &link, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISLNK(link.st_mode)) {
        errno = ELOOP;
        return fd;
    }
    std::filesystem::path to = link_target(folder, name, path, what, "file", links);
    UniqueFd root(::open("/", O_PATH | O_DIRECTORY | O_CLOEXEC));
    UniqueFd to_folder = open_folder_at(to.is_absolute() ? root.get() : folder, to.relative_path().parent_path(), path,
                                        what, links);
    if (to.filename().empty())
        throw Error(named(path, what) + " is a symlink to a folder, not a file");
    return open_in_folder(to_folder.get(), to.filename().string(), path, what, flags & ~O_CREAT, links);
}

// Opens `path` with `flags` by the rules above; then the open file must be a
// regular one.
OpenFile open_regular(const std::filesystem::path& path, std::string_view what, int flags)
{
    if (path.empty())
        throw Error(std::string(what) + ": an empty path names no file");
    int links = 0;
    UniqueFd folder = open_folder_of(path, what, links);
    std::string name = file_name(path, what);
    OpenFile file;
    file.fd = open_in_folder(folder.get(), name, path, what, flags, links);
    if (!file.fd) {
        int err = errno;
        struct stat st {};
        // A FIFO without a reader (ENXIO), a folder (EISDIR): say what it is.
        if (::fstatat(folder.get(), name.c_str(), &st, 0) == 0 && !S_ISREG(st.st_mode))
            throw Error(named(path, what) + " is " + kind_of(st.st_mode) + ", not a regular file");
        throw_errno("open " + named(path, what), err);
    }
    if (::fstat(file.fd.get(), &file.st) != 0)
        throw_errno("stat " + named(path, what));
    if (!S_ISREG(file.st.st_mode))
        throw Error(named(path, what) + " is " + kind_of(file.st.st_mode) + ", not a regular file");
    // Regular files ignore O_NONBLOCK; cleared anyway so nothing downstream sees it.
    int fl = ::fcntl(file.fd.get(), F_GETFL);
    if (fl >= 0)
        ::fcntl(file.fd.get(), F_SETFL, fl & ~O_NONBLOCK);
    return file;
}

} // namespace

std::string kind_of(mode_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFREG: return "a regular file";
    case S_IFDIR: return "a folder";
    case S_IFIFO: return "a FIFO";
    case S_IFBLK: return "a block device";
    case S_IFCHR: return "a character device";
    case S_IFSOCK: return "a socket";
    case S_IFLNK: return "a symlink";
    default: return "not a file";
    }
}

bool others_may_change(const struct stat& st)
{
    return (st.st_mode & (S_IWGRP | S_IWOTH)) || (st.st_uid != 0 && st.st_uid != ::geteuid());
}

bool folder_shared(const std::filesystem::path& folder)
{
    struct stat st {};
    return ::stat(folder.c_str(), &st) != 0 || others_may_change(st); // unknown: assume the worst
}

OpenFile open_input(const std::filesystem::path& path, std::string_view what)
{
    return open_regular(path, what, O_RDONLY);
}

std::string read_input(const std::filesystem::path& path, std::string_view what, uint64_t limit)
{
    OpenFile file = open_input(path, what);
    if (static_cast<uint64_t>(file.st.st_size) > limit)
        throw Error(named(path, what) + " holds " + std::to_string(file.st.st_size) + " bytes, more than "
                    + std::to_string(limit) + " such a file can; refusing to read it");
    std::string content;
    char buffer[65536];
    for (;;) {
        ssize_t n = ::read(file.fd.get(), buffer, sizeof buffer);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            throw_errno("read " + named(path, what));
        if (n == 0)
            break;
        content.append(buffer, static_cast<size_t>(n));
        if (content.size() > limit) // it grew while being read
            throw Error(named(path, what) + " grew past " + std::to_string(limit) + " bytes while it was read");
    }
    return content;
}

OpenFile open_log(const std::filesystem::path& path, std::string_view what)
{
    return open_regular(path, what, O_WRONLY | O_APPEND | O_CREAT);
}

UniqueFd check_output(const std::filesystem::path& path, std::string_view what)
{
    if (path.empty())
        throw Error(std::string(what) + ": an empty path names no file");
    int links = 0;
    UniqueFd folder = open_folder_of(path, what, links);
    std::string name = file_name(path, what);
    struct stat st {};
    if (::fstatat(folder.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno == ENOENT)
            return folder;
        throw_errno("stat " + named(path, what));
    }
    if (S_ISLNK(st.st_mode))
        throw Error(named(path, what) + " is a symlink; it would be replaced by a file, not written through: "
                    "name the file it points to");
    if (!S_ISREG(st.st_mode))
        throw Error(named(path, what) + " is " + kind_of(st.st_mode) + "; only a regular file can be replaced");
    return folder;
}

namespace {

void check_not_over(int folder, const std::string& name, const std::filesystem::path& path, std::string_view what,
                    const struct stat* never_over)
{
    struct stat existing {};
    if (never_over && ::fstatat(folder, name.c_str(), &existing, AT_SYMLINK_NOFOLLOW) == 0
        && same_file(existing, *never_over))
        throw Error(named(path, what) + " would replace a file this run reads; name another file");
}

} // namespace

PendingFile prepare_output(const std::filesystem::path& path, std::string_view what, std::string_view content,
                           const struct stat* never_over)
{
    UniqueFd folder = check_output(path, what);
    std::string name = path.filename().string();
    check_not_over(folder.get(), name, path, what, never_over);
    return PendingFile(folder.get(), name, content, named(path, what));
}

void publish_output(PendingFile& output, const std::filesystem::path& path, std::string_view what,
                    const struct stat* never_over)
{
    check_not_over(output.folder(), output.name(), path, what, never_over);
    output.publish();
}

void write_output(const std::filesystem::path& path, std::string_view what, std::string_view content,
                  const struct stat* never_over)
{
    PendingFile output = prepare_output(path, what, content, never_over);
    publish_output(output, path, what, never_over);
}

void check_folder_is_stable(const std::filesystem::path& folder, std::string_view what)
{
    // Where the folder really is, its links followed by the rules above;
    // then every folder on that real path is checked, the folder itself too.
    int links = 0;
    UniqueFd start(::open(folder.is_absolute() ? "/" : ".", O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!start)
        throw_errno("open " + named(folder, what));
    UniqueFd opened = open_folder_at(start.get(), folder.relative_path(), folder, what, links);
    char real[4096];
    ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(opened.get())).c_str(), real, sizeof real - 1);
    if (n <= 0 || real[0] != '/')
        throw Error(named(folder, what) + ": cannot tell where it is");
    std::filesystem::path real_path(std::string(real, static_cast<size_t>(n)));
    UniqueFd current(::open("/", O_PATH | O_DIRECTORY | O_CLOEXEC));
    std::filesystem::path walked = "/";
    auto refuse = [&](const std::filesystem::path& at) {
        throw Error(named(folder, what) + ": " + at.string() + " can be renamed, replaced or emptied by another user "
                    "while treeflash works in it; choose a folder only you or root can change (or run as the user "
                    "who owns it)");
    };
    for (const auto& part : real_path.relative_path()) {
        std::string name = part.string();
        if (others_can_replace(current.get(), name))
            refuse(walked / name);
        walked /= name;
        UniqueFd next(::openat(current.get(), name.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!next)
            throw_errno("open " + walked.string());
        current = std::move(next);
    }
    // In the folder itself others may not rename what treeflash makes:
    // writable by others only when sticky, and never another user's.
    struct stat st {};
    if (::fstat(current.get(), &st) != 0)
        refuse(walked);
    bool foreign_owner = st.st_uid != 0 && st.st_uid != ::geteuid();
    if (foreign_owner || (others_may_change(st) && !(st.st_mode & S_ISVTX)))
        refuse(walked);
}

bool same_file(const struct stat& a, const struct stat& b)
{
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

bool same_name(const std::filesystem::path& a, const std::filesystem::path& b)
{
    auto folder = [](const std::filesystem::path& p) { return p.has_parent_path() ? p.parent_path() : "."; };
    struct stat fa {}, fb {};
    if (::stat(folder(a).c_str(), &fa) != 0 || ::stat(folder(b).c_str(), &fb) != 0)
        return false;
    return same_file(fa, fb) && a.filename() == b.filename();
}

} // namespace treeflash::named
