#include "common/named_file.hpp"

#include "common/error.hpp"

#include <cerrno>
#include <fcntl.h>
#include <unistd.h>

namespace treeflash::named {

namespace {

std::filesystem::path folder_of(const std::filesystem::path& path)
{
    return path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
}

std::string named(const std::filesystem::path& path, std::string_view what)
{
    return std::string(what) + " " + path.string();
}

// Throws when a folder on the way to `path` is a symlink that sits in a
// folder others can write (shared/d -> /root/private makes shared/d/x a
// file in root's folder). The last component is open_regular's to check.
void check_folders_on_the_way(const std::filesystem::path& path, std::string_view what)
{
    std::filesystem::path prefix;
    std::filesystem::path folder = path.parent_path();
    for (auto it = folder.begin(); it != folder.end(); ++it) {
        std::filesystem::path parent = prefix.empty() ? std::filesystem::path(".") : prefix;
        prefix /= *it;
        if (*it == "/" || *it == "." || *it == "..")
            continue;
        struct stat st {};
        if (::lstat(prefix.c_str(), &st) == 0 && S_ISLNK(st.st_mode) && folder_shared(parent))
            throw Error(named(path, what) + ": " + prefix.string() + " is a symlink in " + parent.string()
                        + ", a folder other users can write; name the folder it points to");
    }
}

// Opens `path` with `flags` (plus O_NOFOLLOW, O_NONBLOCK) and, when its last
// component is a symlink, follows it only out of a folder nobody else can
// write. Then the open file must be a regular one.
OpenFile open_regular(const std::filesystem::path& path, std::string_view what, int flags)
{
    if (path.empty())
        throw Error(std::string(what) + ": an empty path names no file");
    check_folders_on_the_way(path, what);
    const int common = O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
    OpenFile file;
    file.fd.reset(::open(path.c_str(), flags | common | O_NOFOLLOW, 0644));
    if (!file.fd && errno == ELOOP) {
        struct stat link {};
        if (::lstat(path.c_str(), &link) == 0 && S_ISLNK(link.st_mode)) {
            std::filesystem::path folder = folder_of(path);
            if (folder_shared(folder))
                throw Error(named(path, what) + " is a symlink in " + folder.string()
                            + ", a folder other users can write; name the file it points to");
            file.fd.reset(::open(path.c_str(), flags | common, 0644));
        } else {
            errno = ELOOP;
        }
    }
    if (!file.fd) {
        int err = errno;
        struct stat st {};
        // A FIFO without a reader (ENXIO), a folder (EISDIR): say what it is.
        if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
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

bool folder_shared(const std::filesystem::path& folder)
{
    struct stat st {};
    if (::stat(folder.c_str(), &st) != 0)
        return true; // unknown: assume the worst
    if (st.st_mode & (S_IWGRP | S_IWOTH))
        return true;
    return st.st_uid != 0 && st.st_uid != ::geteuid();
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

void check_output(const std::filesystem::path& path, std::string_view what)
{
    if (path.empty())
        throw Error(std::string(what) + ": an empty path names no file");
    check_folders_on_the_way(path, what);
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) {
        if (errno == ENOENT)
            return;
        throw_errno("stat " + named(path, what));
    }
    if (S_ISLNK(st.st_mode))
        throw Error(named(path, what) + " is a symlink; it would be replaced by a file, not written through: "
                    "name the file it points to");
    if (!S_ISREG(st.st_mode))
        throw Error(named(path, what) + " is " + kind_of(st.st_mode) + "; only a regular file can be replaced");
}

bool same_file(const struct stat& a, const struct stat& b)
{
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

} // namespace treeflash::named
