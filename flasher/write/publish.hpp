// What CI publishes beside an image it built: the image compressed, and a
// SHA256SUMS for the compressed file and the bmap, which `treeflash write`
// checks before it touches a card.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
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

// One line of a SHA256SUMS as `sha256sum -c` reads it: "HASH  NAME",
// "HASH *NAME" or the tagged "SHA256 (NAME) = HASH"; the hash in lower
// case, the name without "./" or a trailing CR. nullopt for other lines.
struct SumsLine {
    std::string sha256;
    std::string name;
};
std::optional<SumsLine> parse_sums_line(std::string_view line);

// Adds (or updates) the lines for `files` in the SHA256SUMS of their
// directory, in sha256sum's format, keeping the lines of other files.
// Returns the SHA256SUMS path.
std::filesystem::path update_sha256sums(const std::vector<std::filesystem::path>& files, GCancellable* cancellable);

} // namespace treeflash::flasher
