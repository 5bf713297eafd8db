#include "common/fs.hpp"

#include "common/error.hpp"
#include "common/pending_file.hpp"

#include <algorithm>
#include <cerrno>
#include <fcntl.h>
#include <fstream>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::fs {

std::vector<std::string> split_relative_path(std::string_view path, std::string_view what)
{
    if (!path.empty() && path.front() == '/')
        throw Error(std::string(what) + ": absolute path '" + std::string(path) + "' refused");
    std::vector<std::string> parts;
    size_t pos = 0;
    while (pos <= path.size()) {
        size_t end = path.find('/', pos);
        if (end == std::string_view::npos)
            end = path.size();
        std::string_view part = path.substr(pos, end - pos);
        if (part == "..")
            throw Error(std::string(what) + ": path '" + std::string(path) + "' contains '..'");
        if (!part.empty() && part != ".")
            parts.emplace_back(part);
        pos = end + 1;
    }
    return parts;
}

UniqueFd open_beneath(int root_fd, std::string_view relpath, int flags)
{
    auto parts = split_relative_path(relpath, "open");
    if (parts.empty()) {
        UniqueFd fd(::openat(root_fd, ".", flags | O_CLOEXEC));
        if (!fd)
            throw_errno("open .");
        return fd;
    }
    UniqueFd dir;
    int current = root_fd;
    std::string walked;
    for (size_t i = 0; i < parts.size(); ++i) {
        bool last = i + 1 == parts.size();
        walked += (walked.empty() ? "" : "/") + parts[i];
        int f = last ? (flags | O_NOFOLLOW) : (O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
        UniqueFd next(::openat(current, parts[i].c_str(), f | O_CLOEXEC));
        if (!next) {
            int err = errno;
            struct stat st {};
            if ((err == ELOOP || err == ENOTDIR)
                && ::fstatat(current, parts[i].c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0
                && S_ISLNK(st.st_mode))
                throw Error("open " + std::string(relpath) + ": " + walked + " is a symlink");
            throw_errno("open " + std::string(relpath), err);
        }
        dir = std::move(next);
        current = dir.get();
    }
    return dir;
}

UniqueFd open_directory(const std::filesystem::path& path)
{
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd)
        throw_errno("open directory " + path.string());
    return fd;
}

std::vector<std::pair<uint64_t, uint64_t>> data_extents(int fd, uint64_t size, const std::string& what)
{
    std::vector<std::pair<uint64_t, uint64_t>> extents;
    off_t pos = 0;
    while (static_cast<uint64_t>(pos) < size) {
        off_t data = ::lseek(fd, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break; // only a hole is left
            throw_errno("find data in " + what);
        }
        if (static_cast<uint64_t>(data) >= size)
            break;
        off_t hole = ::lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            throw_errno("find holes in " + what);
        extents.emplace_back(static_cast<uint64_t>(data), std::min(static_cast<uint64_t>(hole), size));
        pos = hole;
    }
    return extents;
}

std::string read_file(const std::filesystem::path& path)
{
    std::ifstream in(path, std::ios::binary);
    if (!in)
        throw_errno("read " + path.string());
    std::ostringstream buffer;
    buffer << in.rdbuf();
    return buffer.str();
}

std::string read_all(int fd, const std::string& what)
{
    std::string data;
    char buffer[1 << 16];
    for (;;) {
        ssize_t n = ::read(fd, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            throw_errno("read " + what);
        if (n == 0)
            return data;
        data.append(buffer, static_cast<size_t>(n));
    }
}

void write_to_pipe(int fd, std::string_view text) noexcept
{
    for (size_t done = 0; done < text.size();) {
        ssize_t n = ::write(fd, text.data() + done, text.size() - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        done += static_cast<size_t>(n);
    }
}

void write_file_atomic_at(int folder, const std::string& name, std::string_view content, const std::string& what)
{
    PendingFile(folder, name, content, what).publish();
}

void write_file_atomic(const std::filesystem::path& path, std::string_view content)
{
    UniqueFd folder(::open(path.has_parent_path() ? path.parent_path().c_str() : ".",
                           O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!folder)
        throw_errno("write " + path.string());
    write_file_atomic_at(folder.get(), path.filename().string(), content, path.string());
}

bool still_at(int fd, const std::filesystem::path& path) noexcept
{
    struct stat open_st {}, path_st {};
    return ::fstat(fd, &open_st) == 0 && ::lstat(path.c_str(), &path_st) == 0 && open_st.st_dev == path_st.st_dev
           && open_st.st_ino == path_st.st_ino;
}

TempDir::TempDir(const std::filesystem::path& parent, std::string_view prefix)
{
    std::string templ = (parent / (std::string(prefix) + "XXXXXX")).string();
    if (!::mkdtemp(templ.data()))
        throw_errno("create temporary directory in " + parent.string());
    m_path = templ;
}

TempDir::TempDir(TempDir&& other) noexcept : m_path(std::move(other.m_path))
{
    other.m_path.clear();
}

TempDir::~TempDir()
{
    remove();
}

void TempDir::remove()
{
    if (!m_path.empty())
        remove_tree_quietly(m_path);
    m_path.clear();
}

void remove_tree_quietly(const std::filesystem::path& path) noexcept
{
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
}

void read_at(int fd, char* data, size_t size, uint64_t offset, const std::string& what)
{
    while (size) {
        ssize_t n = ::pread(fd, data, size, static_cast<off_t>(offset));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            throw_errno("read " + what + " at byte " + std::to_string(offset));
        if (n == 0)
            throw Error("read " + what + ": it ends at byte " + std::to_string(offset));
        data += n;
        size -= static_cast<size_t>(n);
        offset += static_cast<uint64_t>(n);
    }
}

void write_at(int fd, const char* data, size_t size, uint64_t offset, const std::string& what)
{
    while (size) {
        ssize_t n = ::pwrite(fd, data, size, static_cast<off_t>(offset));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            throw_errno("write " + what + " at byte " + std::to_string(offset));
        if (n == 0)
            throw Error("write " + what + ": no room at byte " + std::to_string(offset));
        data += n;
        size -= static_cast<size_t>(n);
        offset += static_cast<uint64_t>(n);
    }
}

} // namespace treeflash::fs
