#include "flasher/write/image.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/named_file.hpp"
#include "common/sha256.hpp"
#include "flasher/write/publish.hpp"
#include "flasher/write/stream_check.hpp"

#include <archive.h>
#include <archive_entry.h>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <gio/gio.h>
#include <sstream>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <zlib.h>

namespace treeflash::flasher {

namespace {

struct ArchiveFree {
    void operator()(struct archive* a) const { archive_read_free(a); }
};
using ArchiveReader = std::unique_ptr<struct archive, ArchiveFree>;

// Feeds libarchive the compressed file, hashing every byte on the way.
struct CompressedInput {
    int fd = -1;
    Sha256 sum;
    std::string buffer = std::string(1 << 20, '\0');
    std::string error;
};

la_ssize_t read_compressed(struct archive*, void* data, const void** block)
{
    auto* in = static_cast<CompressedInput*>(data);
    for (;;) {
        ssize_t n = ::read(in->fd, in->buffer.data(), in->buffer.size());
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            in->error = std::strerror(errno);
            return -1;
        }
        in->sum.update(in->buffer.data(), static_cast<size_t>(n));
        *block = in->buffer.data();
        return n;
    }
}

std::filesystem::path staging_dir()
{
    const char* tmpdir = ::getenv("TMPDIR");
    return tmpdir && *tmpdir ? tmpdir : "/var/tmp";
}

std::string archive_error(struct archive* a)
{
    const char* text = archive_error_string(a);
    return text ? text : "unknown libarchive error";
}

bool all_zero(const char* data, size_t size)
{
    static const char zeros[4096] = {};
    for (size_t at = 0; at < size; at += sizeof zeros)
        if (std::memcmp(data + at, zeros, std::min(sizeof zeros, size - at)) != 0)
            return false;
    return true;
}

std::string unsupported_format(const unsigned char* magic, size_t n, const std::filesystem::path& file);

// Whether the `n` bytes at `data` start with `bytes`.
bool begins_with(const unsigned char* data, size_t n, std::initializer_list<unsigned> bytes)
{
    if (n < bytes.size())
        return false;
    size_t i = 0;
    for (unsigned b : bytes)
        if (data[i++] != b)
            return false;
    return true;
}

// Whether the first 512 bytes are a tar header of any age (v7 has no
// "ustar" mark): a name, and a checksum field that matches the header's
// bytes summed with that field as spaces. A disk's first sector is not one.
bool is_tar_header(const unsigned char* header, size_t n)
{
    if (n < 512 || header[0] == 0)
        return false;
    unsigned long recorded = 0;
    int digits = 0;
    size_t start = 148;
    while (start < 156 && header[start] == ' ')
        ++start;
    for (size_t i = start; i < 156 && header[i] != 0 && header[i] != ' '; ++i, ++digits) {
        if (header[i] < '0' || header[i] > '7')
            return false;
        recorded = recorded * 8 + (header[i] - '0');
    }
    if (digits == 0)
        return false;
    unsigned long sum = 0;
    for (size_t i = 0; i < 512; ++i)
        sum += (i >= 148 && i < 156) ? ' ' : header[i];
    return sum == recorded;
}

// What a decompressed image must not start with: another compression, an
// archive. "" when it may be a disk image.
std::string not_an_image_inside(const char* data, size_t size, const std::filesystem::path& image)
{
    auto bytes = reinterpret_cast<const unsigned char*>(data);
    size_t n = std::min<size_t>(size, 512);
    std::string inner = compression_of(bytes, n);
    if (!inner.empty())
        return "more " + inner + "-compressed data";
    return unsupported_format(bytes, n, image.stem());
}

// Decompresses `image` once into an unnamed sparse file in $TMPDIR (gone
// with the process, whatever happens). With a bmap only its ranges are kept,
// each hashed on the way and compared; without one every block is written,
// in 16 MiB ranges hashed here.
void decompress(PreparedImage& prepared, int input, const std::optional<Bmap>& bmap, uint64_t max_size,
                bool check_gzip_trailer, GCancellable* cancellable)
{
    const std::string what = prepared.path.string();
    if (::lseek(input, 0, SEEK_SET) != 0)
        throw_errno("read " + what);
    std::filesystem::path dir = staging_dir();
    if (bmap) {
        struct statvfs vfs {};
        uint64_t needed = bmap->mapped_bytes();
        if (::statvfs(dir.c_str(), &vfs) == 0 && static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize < needed + (64 << 20))
            throw Error("not enough space in " + dir.string() + " to decompress " + what + " (" + std::to_string(needed >> 20)
                        + " MiB of data); set TMPDIR to a roomier directory");
    }
    // A full TMPDIR shows as ENOSPC in a write: the folder is named there.
    const std::string staged = "the decompressed image in " + dir.string() + " (TMPDIR)";
    UniqueFd stage(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
    if (!stage)
        throw_errno("create a temporary file in " + dir.string() + " (set TMPDIR elsewhere?)");

    CompressedInput in;
    in.fd = input;
    ArchiveReader reader(archive_read_new());
    archive_read_support_filter_all(reader.get());
    archive_read_support_format_raw(reader.get());
    if (archive_read_open(reader.get(), &in, nullptr, read_compressed, nullptr) != ARCHIVE_OK)
        throw Error("read " + what + ": " + (in.error.empty() ? archive_error(reader.get()) : in.error));
    struct archive_entry* entry = nullptr;
    if (archive_read_next_header(reader.get(), &entry) != ARCHIVE_OK)
        throw Error("read " + what + ": " + archive_error(reader.get()));
    prepared.compression = archive_filter_name(reader.get(), 0);
    if (archive_filter_count(reader.get()) > 2) // the compression, then "none"
        throw Error(what + " is compressed twice (" + prepared.compression + " inside "
                    + archive_filter_name(reader.get(), 1) + "), not a compressed disk image; nothing was written");
    check_gzip_trailer = check_gzip_trailer && prepared.compression == "gzip";
    uLong gzip_crc = ::crc32(0L, Z_NULL, 0);

    Bmap whole;              // without a bmap: every block, in 16 MiB ranges
    const uint64_t whole_range = 16 << 20;
    Sha256 range_sum;
    size_t next = 0;         // the bmap range being filled
    uint64_t position = 0;   // bytes of the image seen so far
    auto range_done = [&](const BmapRange& range, uint64_t from, uint64_t to) {
        if (range_sum.hex() != range.sha256)
            throw Error(what + " does not match its bmap " + prepared.bmap_path + ": blocks " + std::to_string(range.first)
                        + "-" + std::to_string(range.last) + " (bytes " + std::to_string(from) + "-" + std::to_string(to - 1)
                        + ") have another checksum; nothing was written");
    };
    for (;;) {
        if (g_cancellable_is_cancelled(cancellable))
            throw Cancelled();
        const void* block = nullptr;
        size_t size = 0;
        la_int64_t offset = 0;
        int rc = archive_read_data_block(reader.get(), &block, &size, &offset);
        if (rc == ARCHIVE_EOF)
            break;
        if (rc != ARCHIVE_OK)
            throw Error("decompress " + what + ": "
                        + (in.error.empty() ? archive_error(reader.get()) : in.error));
        const char* data = static_cast<const char*>(block);
        uint64_t at = static_cast<uint64_t>(offset), end = at + size;
        if (at != position)
            throw Error("decompress " + what + ": the stream skipped from byte " + std::to_string(position));
        if (at == 0 && size > 0) {
            std::string inner = not_an_image_inside(data, size, prepared.path);
            if (!inner.empty())
                throw Error(what + " decompresses to " + inner + ", not a disk image; nothing was written");
        }
        position = end;
        if (check_gzip_trailer)
            gzip_crc = ::crc32(gzip_crc, reinterpret_cast<const Bytef*>(data), static_cast<uInt>(size));
        uint64_t limit = bmap ? bmap->image_size : max_size;
        if (limit && end > limit)
            throw Error(what + " decompresses to more than " + std::to_string(limit) + " bytes ("
                        + (bmap ? "its bmap's image size" : "the largest card") + "); nothing was written");
        if (bmap) {
            while (next < bmap->ranges.size()) {
                auto [from, to] = bmap->bytes(bmap->ranges[next]);
                if (from >= end)
                    break;
                uint64_t a = std::max(from, at), b = std::min(to, end);
                if (a < b) {
                    fs::write_at(stage.get(), data + (a - at), b - a, a, staged);
                    range_sum.update(data + (a - at), b - a);
                }
                if (to > end)
                    break;
                range_done(bmap->ranges[next], from, to);
                ++next;
            }
            continue;
        }
        // Whole: hash everything, keep only non-zero blocks in the sparse copy.
        for (uint64_t a = at; a < end;) {
            uint64_t range_end = (a / whole_range + 1) * whole_range;
            uint64_t b = std::min(end, range_end);
            range_sum.update(data + (a - at), b - a);
            for (uint64_t blk = a; blk < b;) {
                uint64_t blk_end = std::min(b, (blk / 4096 + 1) * 4096);
                if (!all_zero(data + (blk - at), blk_end - blk))
                    fs::write_at(stage.get(), data + (blk - at), blk_end - blk, blk, staged);
                blk = blk_end;
            }
            if (b == range_end)
                whole.ranges.push_back({(range_end - whole_range) / 4096, range_end / 4096 - 1, range_sum.hex()});
            a = b;
        }
    }
    if (in.fd >= 0 && !in.error.empty())
        throw Error("read " + what + ": " + in.error);
    if (check_gzip_trailer) {
        // libarchive does not check gzip's CRC32: the trailer (CRC32 and
        // size mod 2^32, of the last member) is compared here.
        struct stat st {};
        unsigned char trailer[8];
        if (::fstat(input, &st) != 0 || st.st_size < 18
            || ::pread(input, trailer, 8, st.st_size - 8) != 8)
            throw Error("read " + what + ": no gzip trailer");
        uint32_t crc = trailer[0] | trailer[1] << 8 | trailer[2] << 16 | static_cast<uint32_t>(trailer[3]) << 24;
        uint32_t length = trailer[4] | trailer[5] << 8 | trailer[6] << 16 | static_cast<uint32_t>(trailer[7]) << 24;
        if (crc != static_cast<uint32_t>(gzip_crc) || length != static_cast<uint32_t>(position))
            throw Error(what + " does not match the CRC32 in its gzip trailer: it is corrupted (or holds several gzip "
                        "members, which only a bmap or SHA256SUMS can vouch for); nothing was written");
    }
    prepared.image_sha256 = in.sum.hex();
    if (bmap) {
        if (position != bmap->image_size)
            throw Error(what + " holds " + std::to_string(position) + " bytes but its bmap " + prepared.bmap_path + " says "
                        + std::to_string(bmap->image_size) + "; nothing was written");
        prepared.map = *bmap;
    } else {
        if (position % whole_range) {
            uint64_t first = position / whole_range * (whole_range / 4096);
            whole.ranges.push_back({first, (position + 4095) / 4096 - 1, range_sum.hex()});
        }
        whole.image_size = position;
        whole.blocks_count = (position + 4095) / 4096;
        for (const auto& range : whole.ranges)
            whole.mapped_blocks += range.last - range.first + 1;
        prepared.map = whole;
    }
    if (position == 0)
        throw Error(what + " is empty");
    if (::ftruncate(stage.get(), static_cast<off_t>(position)) != 0)
        throw_errno("size " + staged);
    prepared.fd = std::move(stage);
}

std::string file_sha256(int fd, const std::string& what, GCancellable* cancellable)
{
    struct stat st {};
    if (::fstat(fd, &st) != 0)
        throw_errno("stat " + what);
    return sha256_of_range(fd, 0, static_cast<uint64_t>(st.st_size), what, cancellable);
}

// The sha256 SHA256SUMS lists for `name` ("" when it lists none), read as
// `sha256sum -c` reads it (parse_sums_line). A line for the name that is
// not a sha256 is an error, not a line to skip.
std::string listed_sum(const std::string& sums, const std::string& name, const std::string& sums_path)
{
    std::istringstream lines(sums);
    std::string line;
    std::string found;
    while (std::getline(lines, line)) {
        auto entry = parse_sums_line(line);
        if (!entry || entry->name != name)
            continue;
        const std::string& hash = entry->sha256;
        if (hash.size() != 64 || hash.find_first_not_of("0123456789abcdef") != std::string::npos)
            throw Error(sums_path + " lists " + name + " with '" + hash + "', which is not a sha256");
        if (!found.empty() && found != hash)
            throw Error(sums_path + " lists " + name + " twice, with different sums");
        found = hash;
    }
    return found;
}

// A SHA256SUMS or bmap is small: a larger file is not one (or a trap).
constexpr uint64_t sums_limit = 16 << 20;

// Where a bmap for `image` is looked for: IMAGE.bmap, and for card.img.zst
// also card.img.bmap.
std::vector<std::filesystem::path> bmap_candidates(const std::filesystem::path& image, bool compressed)
{
    std::vector<std::filesystem::path> candidates{image.string() + ".bmap"};
    if (compressed && image.has_extension())
        candidates.push_back(image.parent_path() / (image.stem().string() + ".bmap"));
    return candidates;
}

std::optional<std::filesystem::path> bmap_beside(const std::filesystem::path& image, bool compressed)
{
    for (const auto& candidate : bmap_candidates(image, compressed)) {
        struct stat st {};
        if (::lstat(candidate.c_str(), &st) == 0)
            return candidate; // whatever it is: read_bmap says what is wrong with it
    }
    return std::nullopt;
}

// Formats that are not a disk image treeflash can write: an archive, or a
// compression it does not read. Written raw they would be "verified" garbage.
std::string unsupported_format(const unsigned char* magic, size_t n, const std::filesystem::path& file)
{
    auto starts = [&](std::initializer_list<unsigned> bytes) { return begins_with(magic, n, bytes); };
    if (starts({'P', 'K', 3, 4}) || starts({'P', 'K', 5, 6}))
        return "a zip archive";
    if (starts({'7', 'z', 0xbc, 0xaf, 0x27, 0x1c}))
        return "a 7-Zip archive";
    if (starts({'R', 'a', 'r', '!'}))
        return "a RAR archive";
    if (starts({'L', 'Z', 'I', 'P'}))
        return "lzip-compressed";
    if (starts({0x89, 'L', 'Z', 'O'}))
        return "lzop-compressed";
    if (starts({0x1f, 0x9d}))
        return "compress(1)-compressed (.Z)";
    if (starts({0x02, 0x21, 0x4c, 0x18}))
        return "in the legacy lz4 format (lz4 -l), which carries no checksum";
    if (n >= 4 && (magic[0] & 0xf0) == 0x50 && magic[1] == 0x2a && magic[2] == 0x4d && magic[3] == 0x18)
        return "a zstd or lz4 stream that starts with a skippable frame (recompress it plainly)";
    if ((n > 262 && std::memcmp(magic + 257, "ustar", 5) == 0) || is_tar_header(magic, n))
        return "a tar archive";
    // The old .lzma format has no magic: a properties byte below 225, a
    // dictionary size, then the size or all ones. The name says it too.
    std::string ext = file.extension().string();
    for (char& c : ext)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (ext == ".lzma" || (n >= 13 && magic[0] == 0x5d && magic[1] == 0 && magic[2] == 0 && magic[5] == 0xff
                           && magic[12] == 0xff && magic[6] == 0xff))
        return "lzma-compressed (the old .lzma format)";
    std::string name = file.filename().string();
    for (char& c : name)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    for (const char* archive : {".zip", ".7z", ".rar", ".lz", ".lzo", ".z", ".tar", ".tgz", ".tbz2", ".txz", ".cpio",
                                ".tar.gz", ".tar.xz", ".tar.zst", ".tar.bz2", ".tar.lz4"})
        if (name.size() > std::strlen(archive) && name.ends_with(archive))
            return std::string("named as a ") + archive + " file";
    return "";
}

} // namespace

std::vector<std::filesystem::path> files_read_with(const std::filesystem::path& image, const ImageOptions& options)
{
    std::vector<std::filesystem::path> files = bmap_candidates(image, true); // compressed or not: both names
    files.push_back(image);
    files.push_back(image.parent_path() / "SHA256SUMS");
    if (options.bmap)
        files.push_back(*options.bmap);
    if (options.sums)
        files.push_back(*options.sums);
    return files;
}

bool image_changed(const PreparedImage& image)
{
    if (image.compressed)
        return false; // a private copy nobody else can write
    struct stat now {};
    if (::fstat(image.fd.get(), &now) != 0)
        return true;
    const struct stat& then = image.file_state;
    return now.st_size != then.st_size || now.st_mtim.tv_sec != then.st_mtim.tv_sec
           || now.st_mtim.tv_nsec != then.st_mtim.tv_nsec || now.st_ctim.tv_sec != then.st_ctim.tv_sec
           || now.st_ctim.tv_nsec != then.st_ctim.tv_nsec;
}

std::string compression_of(const unsigned char* magic, size_t n)
{
    auto starts = [&](std::initializer_list<unsigned> bytes) { return begins_with(magic, n, bytes); };
    if (starts({0x1f, 0x8b}))
        return "gzip";
    if (starts({0xfd, '7', 'z', 'X', 'Z', 0}))
        return "xz";
    if (starts({0x28, 0xb5, 0x2f, 0xfd}))
        return "zstd";
    if (starts({'B', 'Z', 'h'}))
        return "bzip2";
    if (starts({0x04, 0x22, 0x4d, 0x18}))
        return "lz4";
    return "";
}

PreparedImage prepare_image(const std::filesystem::path& image, const ImageOptions& options, GCancellable* cancellable)
{
    auto notice = [&](const std::string& text) {
        if (options.notice)
            options.notice(text);
    };
    PreparedImage prepared;
    prepared.path = image;
    const std::string what = image.string();
    // Opened once: every later read is of this file, whatever the name comes to mean.
    named::OpenFile input = named::open_input(image, "the image");
    if (input.st.st_size == 0)
        throw Error(what + " is empty (0 bytes): not an image");
    unsigned char magic[512] = {};
    ssize_t magic_size = ::pread(input.fd.get(), magic, sizeof magic, 0);
    if (magic_size < 0)
        throw_errno("read " + what);
    size_t n = static_cast<size_t>(magic_size);
    prepared.compression = compression_of(magic, n);
    prepared.compressed = !prepared.compression.empty();
    if (!prepared.compressed) {
        std::string other = unsupported_format(magic, n, image);
        if (!other.empty())
            throw Error(what + " is " + other + ", not a disk image or a compression treeflash reads (gz, xz, zst, bz2, "
                        "lz4); nothing was written");
    }

    std::optional<Bmap> bmap;
    std::optional<std::filesystem::path> bmap_file = options.bmap ? options.bmap : bmap_beside(image, prepared.compressed);
    std::string bmap_text;
    std::vector<std::filesystem::path> read_files; // besides the image
    if (bmap_file) {
        read_files.push_back(*bmap_file);
        bmap_text = named::read_input(*bmap_file, "the bmap", bmap_size_limit);
        bmap = parse_bmap(bmap_text, bmap_file->string());
        prepared.bmap_path = bmap_file->string();
        if (!options.bmap)
            notice("using the bmap beside the image: " + prepared.bmap_path);
    }

    // SHA256SUMS: the explicit one must list the image; the one beside it is used when it does.
    std::string sums_text, image_listed;
    if (options.sums) {
        sums_text = named::read_input(*options.sums, "SHA256SUMS", sums_limit);
        read_files.push_back(*options.sums);
        image_listed = listed_sum(sums_text, image.filename().string(), options.sums->string());
        if (image_listed.empty())
            throw Error(options.sums->string() + " does not list " + image.filename().string());
        prepared.sums_path = options.sums->string();
    } else {
        std::filesystem::path beside = image.parent_path() / "SHA256SUMS";
        struct stat st {};
        if (::lstat(beside.c_str(), &st) == 0) {
            sums_text = named::read_input(beside, "SHA256SUMS beside the image", sums_limit);
            read_files.push_back(beside);
            image_listed = listed_sum(sums_text, image.filename().string(), beside.string());
            if (!image_listed.empty())
                prepared.sums_path = beside.string();
        }
    }
    auto dir_of = [](const std::filesystem::path& file) {
        return std::filesystem::weakly_canonical(file.parent_path().empty() ? "." : file.parent_path());
    };
    if (!prepared.sums_path.empty() && bmap_file && dir_of(*bmap_file) == dir_of(image)) {
        std::string bmap_listed = listed_sum(sums_text, bmap_file->filename().string(), prepared.sums_path);
        if (!bmap_listed.empty() && bmap_listed != sha256_hex(bmap_text))
            throw Error(prepared.bmap_path + " does not match " + prepared.sums_path + "; nothing was written");
    }

    if (prepared.compressed) {
        // "Verified" must mean the card holds the image that was published:
        // a stream without a checksum of its own, with nothing else vouching
        // for it, could decompress to anything.
        bool vouched = bmap || !prepared.sums_path.empty();
        std::string unchecked = vouched ? "" : unchecked_part(input.fd.get(), static_cast<uint64_t>(input.st.st_size),
                                                              prepared.compression, cancellable);
        if (!unchecked.empty())
            throw Error(what + " cannot check itself (" + unchecked + "), and no bmap or SHA256SUMS vouches for "
                        "it: a corrupted file would be written and reported good. Recompress it with a checksum (zstd "
                        "and xz have one by default), or give --bmap or --sums; nothing was written");
        if (!bmap)
            notice("no bmap for " + what + ": every block is written (make one with treeflash bmap before compressing)");
        decompress(prepared, input.fd.get(), bmap, options.max_size, !vouched, cancellable);
    } else {
        prepared.fd = std::move(input.fd);
        prepared.file_state = input.st;
        uint64_t size = static_cast<uint64_t>(input.st.st_size);
        if (bmap) {
            if (bmap->image_size != size)
                throw Error(what + " holds " + std::to_string(size) + " bytes but its bmap " + prepared.bmap_path + " says "
                            + std::to_string(bmap->image_size) + "; nothing was written");
            check_image_against_bmap(prepared.fd.get(), *bmap, what, cancellable);
            prepared.map = *bmap;
        } else {
            prepared.map = map_open_image(prepared.fd.get(), size, what, cancellable);
        }
        if (!prepared.sums_path.empty() || options.hash_image)
            prepared.image_sha256 = file_sha256(prepared.fd.get(), what, cancellable);
    }
    if (!prepared.sums_path.empty()) {
        if (prepared.image_sha256 != image_listed)
            throw Error(what + " does not match " + prepared.sums_path + " (sha256 " + prepared.image_sha256 + ", listed "
                        + image_listed + "); nothing was written");
        notice("checked " + what + " against " + prepared.sums_path);
    }
    prepared.inputs.push_back(input.st);
    for (const auto& file : read_files) {
        struct stat st {};
        if (::stat(file.c_str(), &st) == 0)
            prepared.inputs.push_back(st);
    }
    return prepared;
}

} // namespace treeflash::flasher
