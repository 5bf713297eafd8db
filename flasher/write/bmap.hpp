// Block maps (bmap 2.0, the format of bmap-tools): which 4 KiB blocks of an
// image hold data, with a sha256 per range, so a writer copies only those
// and can check what it wrote. Made from the image's holes (SEEK_DATA /
// SEEK_HOLE), before any compression.
#pragma once

#include "common/pending_file.hpp"

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

struct BmapRange {
    uint64_t first = 0; // block numbers, inclusive
    uint64_t last = 0;
    std::string sha256; // of the range's bytes (up to the end of the image)
};

struct Bmap {
    uint64_t image_size = 0;
    uint32_t block_size = 4096;
    uint64_t blocks_count = 0;
    uint64_t mapped_blocks = 0;
    std::vector<BmapRange> ranges;

    // The bytes of `range`: [first, second), cut at the end of the image.
    std::pair<uint64_t, uint64_t> bytes(const BmapRange& range) const;
    uint64_t mapped_bytes() const;
};

// Maps the data of `image`: ranges of blocks that hold data, merged, hashed.
Bmap map_image(const std::filesystem::path& image, GCancellable* cancellable = nullptr);

// Maps the data of the open image `fd` of `size` bytes (see map_image).
Bmap map_open_image(int fd, uint64_t size, const std::string& what, GCancellable* cancellable = nullptr);

// The sha256 of bytes [from, to) of `fd`, read with pread.
std::string sha256_of_range(int fd, uint64_t from, uint64_t to, const std::string& what,
                            GCancellable* cancellable = nullptr);

// Reads a bmap file, ours or one bmaptool made (version 2.x, sha256), and
// checks it: its own checksum, block numbers in order and inside the
// image, counts that add up. Throws an Error naming the file otherwise.
Bmap read_bmap(const std::filesystem::path& file);
inline constexpr uint64_t bmap_size_limit = 64 << 20; // larger is not a bmap
Bmap parse_bmap(const std::string& xml, const std::string& what);

// Throws unless every range of `map` has its checksum in the image `fd`
// (read from byte 0), naming the first range that differs.
void check_image_against_bmap(int fd, const Bmap& map, const std::string& what, GCancellable* cancellable = nullptr);

// The bmap 2.0 XML for `map`, with its BmapFileChecksum (the sha256 of the
// text with that field all zeros), as bmaptool writes and checks it.
std::string bmap_xml(const Bmap& map);

// Writes the bmap of `image` to `output` (through a temporary file); the
// output may only replace a regular file, never the image itself.
Bmap write_bmap(const std::filesystem::path& image, const std::filesystem::path& output, GCancellable* cancellable = nullptr);

// The bmap of the image open as `image_fd`, written and synced beside
// `output` under a temporary name, with the rules of write_bmap; moved into
// place by publish_bmap (once the image itself is in place).
PendingFile prepare_bmap(int image_fd, uint64_t size, const std::filesystem::path& output, const std::string& what,
                         GCancellable* cancellable = nullptr);
void publish_bmap(PendingFile& bmap, int image_fd, const std::filesystem::path& output);

} // namespace treeflash::flasher
