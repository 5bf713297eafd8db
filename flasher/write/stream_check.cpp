#include "flasher/write/stream_check.hpp"

#include "common/error.hpp"

#include <gio/gio.h>
#include <algorithm>
#include <unistd.h>
#include <vector>

namespace treeflash::flasher {

namespace {

// Reads `n` bytes at `at`; false past the end or on an error.
bool read_bytes(int fd, uint64_t size, uint64_t at, unsigned char* out, size_t n)
{
    if (at > size || n > size - at)
        return false;
    return ::pread(fd, out, n, static_cast<off_t>(at)) == static_cast<ssize_t>(n);
}

uint32_t le32(const unsigned char* p)
{
    return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16
           | static_cast<uint32_t>(p[3]) << 24;
}

std::string at_byte(uint64_t at)
{
    return " at byte " + std::to_string(at);
}

// Steps over a zstd or lz4 skippable frame at `pos` (its size follows the
// magic). False when there is none; `error` set when it is cut short.
bool skip_skippable(int fd, uint64_t size, uint64_t& pos, std::string& error)
{
    unsigned char head[8];
    if (!read_bytes(fd, size, pos, head, 4) || (le32(head) & 0xFFFFFFF0u) != 0x184D2A50u)
        return false;
    if (!read_bytes(fd, size, pos, head, 8))
        error = "a truncated skippable frame" + at_byte(pos);
    pos += 8 + uint64_t {le32(head + 4)};
    return true;
}

// zstd (RFC 8878): frames of a header and blocks, each block with its
// compressed size in a 3-byte header; skippable frames carry their size.
std::string zstd_unchecked(int fd, uint64_t size, GCancellable* cancellable)
{
    uint64_t pos = 0, steps = 0;
    while (pos < size) {
        std::string error;
        if (skip_skippable(fd, size, pos, error)) {
            if (!error.empty())
                return error;
            continue;
        }
        unsigned char head[8];
        if (!read_bytes(fd, size, pos, head, 5))
            return "a truncated frame" + at_byte(pos);
        uint32_t magic = le32(head);
        if (magic != 0xFD2FB528u)
            return "data that is no zstd frame" + at_byte(pos);
        unsigned descriptor = head[4];
        if (!(descriptor & 0x04))
            return "the frame" + at_byte(pos) + " has no checksum";
        bool single_segment = descriptor & 0x20;
        static const unsigned dict_sizes[] = {0, 1, 2, 4};
        static const unsigned content_sizes[] = {0, 2, 4, 8};
        unsigned content = content_sizes[descriptor >> 6];
        if (content == 0 && single_segment)
            content = 1;
        uint64_t block = pos + 5 + (single_segment ? 0 : 1) + dict_sizes[descriptor & 3] + content;
        for (;;) {
            unsigned char b[3];
            if (!read_bytes(fd, size, block, b, 3))
                return "a truncated frame" + at_byte(pos);
            uint32_t header = b[0] | b[1] << 8 | b[2] << 16;
            unsigned type = (header >> 1) & 3, block_size = header >> 3;
            // At most 128 KiB (Block_Maximum_Size), and no empty block but
            // the last: so a hostile file is walked in few steps.
            if (type == 3 || block_size > (128u << 10) || (block_size == 0 && !(header & 1)))
                return "a corrupt block" + at_byte(block);
            block += 3 + (type == 1 ? 1 : block_size); // an RLE block holds one byte
            if (++steps % 4096 == 0 && g_cancellable_is_cancelled(cancellable))
                throw Cancelled();
            if (header & 1)
                break;
        }
        pos = block + 4; // the checksum
    }
    return "";
}

// LZ4 frame format: a descriptor (FLG, BD, optional content size and
// dictionary id, header checksum), blocks each with a 4-byte size, an end
// mark, then the content checksum when FLG says so.
std::string lz4_unchecked(int fd, uint64_t size, GCancellable* cancellable)
{
    uint64_t pos = 0, steps = 0;
    while (pos < size) {
        std::string error;
        if (skip_skippable(fd, size, pos, error)) {
            if (!error.empty())
                return error;
            continue;
        }
        unsigned char head[8];
        if (!read_bytes(fd, size, pos, head, 6))
            return "a truncated frame" + at_byte(pos);
        uint32_t magic = le32(head);
        if (magic != 0x184D2204u)
            return "data that is no lz4 frame" + at_byte(pos);
        unsigned flags = head[4];
        if (!(flags & 0x04))
            return "the frame" + at_byte(pos) + " has no content checksum";
        bool block_checksums = flags & 0x10;
        uint64_t block = pos + 4 + 2 + ((flags & 0x08) ? 8 : 0) + ((flags & 0x01) ? 4 : 0) + 1;
        for (;;) {
            unsigned char b[4];
            if (!read_bytes(fd, size, block, b, 4))
                return "a truncated frame" + at_byte(pos);
            uint32_t length = le32(b) & 0x7FFFFFFFu;
            block += 4;
            if (le32(b) == 0)
                break; // the end mark
            if (length == 0 || length > (4u << 20)) // blocks hold 4 MiB at most
                return "a corrupt block" + at_byte(block - 4);
            if (++steps % 4096 == 0 && g_cancellable_is_cancelled(cancellable))
                throw Cancelled();
            block += length + (block_checksums ? 4 : 0);
        }
        pos = block + 4; // the content checksum
    }
    return "";
}

// xz (.xz file format 1.1): streams of a header, blocks, an index and a
// footer, maybe padded with zeros; walked from the end, where each footer
// gives its index's size and the index its blocks' sizes.
std::string xz_unchecked(int fd, uint64_t size, GCancellable* cancellable)
{
    uint64_t end = size, steps = 0, padding = 0;
    while (end > 0) {
        unsigned char word[4];
        if (end >= 4 && read_bytes(fd, size, end - 4, word, 4) && le32(word) == 0) {
            end -= 4; // stream padding: a few bytes in practice
            if ((padding += 4) > (1u << 20))
                return "more than 1 MiB of zeros before byte " + std::to_string(end + padding);
            continue;
        }
        padding = 0;
        unsigned char footer[12];
        if (end < 24 || !read_bytes(fd, size, end - 12, footer, 12) || footer[10] != 'Y' || footer[11] != 'Z')
            return "data that is no xz stream before byte " + std::to_string(end);
        if ((footer[9] & 0x0F) == 0)
            return "the stream ending at byte " + std::to_string(end) + " has no check (made with --check=none)";
        uint64_t index_size = (uint64_t {le32(footer + 4)} + 1) * 4;
        if (index_size > end - 24 || index_size > (64u << 20)) // 64 MiB: millions of blocks
            return "a corrupt stream footer before byte " + std::to_string(end);
        if (++steps % 64 == 0 && g_cancellable_is_cancelled(cancellable))
            throw Cancelled();
        uint64_t index_start = end - 12 - index_size;
        std::vector<unsigned char> index(index_size);
        if (!read_bytes(fd, size, index_start, index.data(), index.size()) || index[0] != 0)
            return "a corrupt stream index" + at_byte(index_start);
        size_t at = 1;
        auto vli = [&](uint64_t& value) {
            value = 0;
            for (unsigned shift = 0; shift < 63 && at < index.size(); shift += 7) {
                unsigned char byte = index[at++];
                value |= uint64_t {byte & 0x7Fu} << shift;
                if (!(byte & 0x80))
                    return true;
            }
            return false;
        };
        uint64_t records = 0, blocks = 0;
        if (!vli(records))
            return "a corrupt stream index" + at_byte(index_start);
        for (uint64_t i = 0; i < records; ++i) {
            uint64_t unpadded = 0, uncompressed = 0;
            if (!vli(unpadded) || !vli(uncompressed) || unpadded > size)
                return "a corrupt stream index" + at_byte(index_start);
            blocks += (unpadded + 3) / 4 * 4;
        }
        if (blocks + 12 > index_start)
            return "a corrupt stream index" + at_byte(index_start);
        uint64_t start = index_start - blocks - 12;
        unsigned char header[12];
        static const unsigned char magic[6] = {0xFD, '7', 'z', 'X', 'Z', 0};
        if (!read_bytes(fd, size, start, header, 12) || std::equal(magic, magic + 6, header) == false)
            return "a stream whose start is not where its index says" + at_byte(start);
        if ((header[7] & 0x0F) == 0)
            return "the stream" + at_byte(start) + " has no check (made with --check=none)";
        end = start;
    }
    return "";
}

// bzip2: every block has its CRC and libbz2 checks them, but a file cut
// after a stream's header ends "cleanly" for libarchive. A complete file
// ends with the end-of-stream mark (48 bits, 0x177245385090), the combined
// CRC (32 bits) and 0 to 7 bits of padding.
std::string bzip2_unchecked(int fd, uint64_t size)
{
    unsigned char tail[11];
    if (size < sizeof tail || !read_bytes(fd, size, size - sizeof tail, tail, sizeof tail))
        return "a truncated stream";
    auto bit = [&](unsigned index) { return (tail[index / 8] >> (7 - index % 8)) & 1u; };
    for (unsigned pad = 0; pad < 8; ++pad) {
        unsigned start = 88 - pad - 32 - 48;
        uint64_t mark = 0;
        for (unsigned i = 0; i < 48; ++i)
            mark = mark << 1 | bit(start + i);
        if (mark == 0x177245385090ull)
            return "";
    }
    return "a last stream without its end-of-stream mark (the file is cut short)";
}

} // namespace

std::string unchecked_part(int fd, uint64_t size, const std::string& compression, GCancellable* cancellable)
{
    if (compression == "zstd")
        return zstd_unchecked(fd, size, cancellable);
    if (compression == "lz4")
        return lz4_unchecked(fd, size, cancellable);
    if (compression == "xz")
        return xz_unchecked(fd, size, cancellable);
    if (compression == "bzip2")
        return bzip2_unchecked(fd, size);
    return "";
}

} // namespace treeflash::flasher
