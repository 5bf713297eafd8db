// What CI publishes beside an image it built: the image compressed, and a
// SHA256SUMS for the compressed file and the bmap, which `treeflash write`
// checks before it touches a card.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

// The compressed forms `compress_image` makes, by file name suffix.
inline constexpr const char* compressions[] = {"zst", "xz", "gz"};

// One of `compressions`; throws for anything else.
void check_compression_name(const std::string& name);

// Compresses `image` into IMAGE.zst (or .xz, .gz) beside it with libarchive
// (zstd and xz on every core), through a temporary file; an existing file is
// replaced only with `overwrite`. Returns the compressed file.
std::filesystem::path compress_image(const std::filesystem::path& image, const std::string& compression, bool overwrite,
                                     GCancellable* cancellable);

// Adds (or updates) the lines for `files` in the SHA256SUMS of their
// directory, in sha256sum's format, keeping the lines of other files.
// Returns the SHA256SUMS path.
std::filesystem::path update_sha256sums(const std::vector<std::filesystem::path>& files, GCancellable* cancellable);

} // namespace treeflash::flasher
