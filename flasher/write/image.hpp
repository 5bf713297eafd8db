// The image `treeflash write` copies to cards: a raw file read in place, or
// a compressed one (gz, xz, zst, bz2, lz4) decompressed once into a sparse
// temporary file, whatever the number of cards. Every check on the image
// (its bmap, its SHA256SUMS) is done here, before any card is touched.
#pragma once

#include "common/fd.hpp"
#include "flasher/write/bmap.hpp"

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <sys/stat.h>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

struct ImageOptions {
    // The bmap to write by; default: IMAGE.bmap, or for card.img.zst also
    // card.img.bmap, beside the image. Without one the image's holes
    // (SEEK_DATA) are skipped; a compressed image is then written whole.
    std::optional<std::filesystem::path> bmap;
    // SHA256SUMS to check the image and its bmap against; default: the
    // SHA256SUMS beside the image when it lists the image.
    std::optional<std::filesystem::path> sums;
    bool hash_image = false; // compute the image file's sha256 even when no SHA256SUMS asks for it
    uint64_t max_size = 0;   // refuse a decompressed image larger than this (the largest card); 0: no limit
    std::function<void(const std::string&)> notice;
};

struct PreparedImage {
    std::filesystem::path path;     // as the user named it
    bool compressed = false;
    std::string compression;        // "zstd", "xz", ... or ""
    UniqueFd fd;                    // the raw bytes, read with pread
    Bmap map;                       // what to write, range by range, with checksums checked
    std::string bmap_path;          // "" when the map came from the image's holes or it is written whole
    std::string sums_path;          // the SHA256SUMS the image was checked against, or ""
    std::string image_sha256;       // of the file as given, when computed
    struct stat file_state {};      // a raw image as checked: size, modification and change times
    std::vector<struct stat> inputs; // the image, bmap and SHA256SUMS files read: no output may be one of them
};

// The files prepare_image may read for `image`, present or not: the image,
// the bmaps and SHA256SUMS it looks for beside it, and those `options` name.
// A file the same run writes (a log) must be none of them.
std::vector<std::filesystem::path> files_read_with(const std::filesystem::path& image, const ImageOptions& options);

// Whether a raw image was modified since prepare_image checked it.
bool image_changed(const PreparedImage& image);

// Opens, checks and (when compressed) decompresses `image`. Throws an Error
// saying what does not match: a bmap whose checksums or size differ from
// the image, a SHA256SUMS entry that differs, an unreadable stream.
PreparedImage prepare_image(const std::filesystem::path& image, const ImageOptions& options, GCancellable* cancellable);

// "zstd", "gzip", ... for a compressed file by its first bytes, "" for raw.
std::string compression_of(const unsigned char* magic, size_t size);

} // namespace treeflash::flasher
