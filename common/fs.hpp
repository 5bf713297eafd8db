// File system helpers that never leave the tree they are given.
#pragma once

#include "common/fd.hpp"

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace treeflash::fs {

// Splits "a/b//c/" into {"a","b","c"}; throws Error for an absolute path or a
// ".." component, naming `what`.
std::vector<std::string> split_relative_path(std::string_view path, std::string_view what);

// Opens `relpath` below the directory `root_fd` without following any
// symlink on the way, the last component included. A symlink anywhere in the
// path is an error ("... is a symlink"), so a tree holding `etc -> /etc`
// can never lead outside itself.
UniqueFd open_beneath(int root_fd, std::string_view relpath, int flags);

// Opens a directory the user named (symlinks followed: the user chose it).
UniqueFd open_directory(const std::filesystem::path& path);

std::string read_file(const std::filesystem::path& path);

// Everything left to read from `fd` (EINTR retried); Error naming `what`.
std::string read_all(int fd, const std::string& what);

// pread/pwrite of exactly `size` bytes at `offset` (EINTR and short transfers
// retried); Error naming `what` and the offset otherwise.
void read_at(int fd, char* data, size_t size, uint64_t offset, const std::string& what);
void write_at(int fd, const char* data, size_t size, uint64_t offset, const std::string& what);

// The byte ranges [from, to) of the first `size` bytes of `fd` that hold
// data (SEEK_DATA / SEEK_HOLE); the rest reads zero. Error naming `what`.
std::vector<std::pair<uint64_t, uint64_t>> data_extents(int fd, uint64_t size, const std::string& what);

// Writes all of `text` to a pipe or socket, retrying short writes; stops
// quietly when the reader is gone (a child reporting to its parent).
void write_to_pipe(int fd, std::string_view text) noexcept;

// Writes `content` to `path` through a temporary file (NAME.tmp-PID, never
// through a symlink) and rename.
void write_file_atomic(const std::filesystem::path& path, std::string_view content);
// The same in the open folder `folder`; `what` names the file in errors.
void write_file_atomic_at(int folder, const std::string& name, std::string_view content, const std::string& what);

// A directory created under `parent` (mkdtemp) and removed, with everything
// in it, when the object goes away unless keep() was called.
class TempDir {
public:
    TempDir(const std::filesystem::path& parent, std::string_view prefix);
    TempDir(TempDir&& other) noexcept;
    TempDir& operator=(TempDir&&) = delete;
    TempDir(const TempDir&) = delete;
    ~TempDir();

    const std::filesystem::path& path() const { return m_path; }
    void keep() { m_path.clear(); }
    void remove();

private:
    std::filesystem::path m_path;
};

// Whether `path` (not followed if a symlink) still names the file open as
// `fd`: false once it was removed or replaced.
bool still_at(int fd, const std::filesystem::path& path) noexcept;

// Removes a tree without following symlinks; errors are ignored (cleanup path).
void remove_tree_quietly(const std::filesystem::path& path) noexcept;

} // namespace treeflash::fs
