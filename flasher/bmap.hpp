// Block maps (bmap 2.0, the format of bmap-tools): which 4 KiB blocks of an
// image hold data, with a sha256 per range, so a writer copies only those
// and can check what it wrote. Made from the image's holes (SEEK_DATA /
// SEEK_HOLE), before any compression.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
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
};

// Maps the data of `image`: ranges of blocks that hold data, merged, hashed.
Bmap map_image(const std::filesystem::path& image, GCancellable* cancellable = nullptr);

// The bmap 2.0 XML for `map`, with its BmapFileChecksum (the sha256 of the
// text with that field all zeros), as bmaptool writes and checks it.
std::string bmap_xml(const Bmap& map);

// Writes the bmap of `image` to `output` (through a temporary file).
Bmap write_bmap(const std::filesystem::path& image, const std::filesystem::path& output, GCancellable* cancellable = nullptr);

} // namespace treeflash::flasher
