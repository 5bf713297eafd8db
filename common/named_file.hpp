// The one way to open a file the user named on the command line, or one
// treeflash finds beside it (an image, its bmap, a SHA256SUMS, a log, an
// output): every rule below holds whoever runs treeflash, root included.
//
// - A symlink, the file's or a folder's on the way, is followed only when
//   it sits in a folder no other user can write: in someone else's folder
//   (or a group- or world-writable one) the link could be aimed at a file
//   or folder only root may read or write.
// - Only regular files: a FIFO would block the open forever, a device would
//   be read without end or written over, a folder is a mistake. Files are
//   opened without blocking and checked after the open, on what was opened.
// - Reads are bounded: a small file (bmap, SHA256SUMS) larger than its limit
//   is refused instead of read into memory.
// - An output that replaces a file (through a temporary file and rename) may
//   only replace a regular file, never a symlink, device or folder.
#pragma once

#include "common/fd.hpp"
#include "common/pending_file.hpp"

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <sys/stat.h>

namespace treeflash::named {

struct OpenFile {
    UniqueFd fd;
    struct stat st {};
};

// Whether users other than the caller and root may change the file or
// folder `st` describes: another owner, or group/other write permission.
bool others_may_change(const struct stat& st);

// others_may_change for `folder` (followed), true when it cannot be read.
bool folder_shared(const std::filesystem::path& folder);

// Opens an input for reading: a regular file (see above). `what` names it in
// errors ("the image", "the bmap", "SHA256SUMS").
OpenFile open_input(const std::filesystem::path& path, std::string_view what);

// The content of an input of at most `limit` bytes; a larger one is refused.
std::string read_input(const std::filesystem::path& path, std::string_view what, uint64_t limit);

// Opens a log for appending, created (0644) when missing: a regular file.
OpenFile open_log(const std::filesystem::path& path, std::string_view what);

// Throws unless `path` is free to be replaced by a new regular file: absent,
// or a regular file that is not a symlink. Returns its folder, open.
UniqueFd check_output(const std::filesystem::path& path, std::string_view what);

// Writes `content` to `path` (checked as above) through a temporary file in
// the same open folder and a rename, never over the file `never_over`.
void write_output(const std::filesystem::path& path, std::string_view what, std::string_view content,
                  const struct stat* never_over = nullptr);

// write_output in two halves: checked, written and synced now, moved over
// `path` by publish_output, checked again.
PendingFile prepare_output(const std::filesystem::path& path, std::string_view what, std::string_view content,
                           const struct stat* never_over = nullptr);
void publish_output(PendingFile& output, const std::filesystem::path& path, std::string_view what,
                    const struct stat* never_over = nullptr);

// Throws unless no folder on the way to `folder`, as it really is (links
// followed by the rules above), can be renamed or replaced by another user,
// and no one else can rename entries in `folder` itself, so work done by
// path in it over time (flash --image) stays in it. Sticky folders (/tmp)
// are fine for entries the caller or root owns; `folder` itself may be
// writable by others only when sticky.
void check_folder_is_stable(const std::filesystem::path& folder, std::string_view what);

// Whether two stats describe the same file (device and inode).
bool same_file(const struct stat& a, const struct stat& b);

// Whether two paths name the same entry: the same name in the same folder,
// however the folder is reached (a symlink, a bind mount). For files that
// may not exist yet.
bool same_name(const std::filesystem::path& a, const std::filesystem::path& b);

// "a FIFO", "a block device", "a folder", ... for an error message.
std::string kind_of(mode_t mode);

} // namespace treeflash::named
