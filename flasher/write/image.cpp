#include "flasher/write/image.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/sha256.hpp"

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

// Decompresses `image` once into an unnamed sparse file in $TMPDIR (gone
// with the process, whatever happens). With a bmap only its ranges are kept,
// each hashed on the way and compared; without one every block is written,
// in 16 MiB ranges hashed here.
void decompress(PreparedImage& prepared, const std::optional<Bmap>& bmap, uint64_t max_size, GCancellable* cancellable)
{
    const std::string what = prepared.path.string();
    UniqueFd input(::open(prepared.path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!input)
        throw_errno("open " + what);
    std::filesystem::path dir = staging_dir();
    if (bmap) {
        struct statvfs vfs {};
        uint64_t needed = bmap->mapped_bytes();
        if (::statvfs(dir.c_str(), &vfs) == 0 && static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize < needed + (64 << 20))
            throw Error("not enough space in " + dir.string() + " to decompress " + what + " (" + std::to_string(needed >> 20)
                        + " MiB of data); set TMPDIR to a roomier directory");
    }
    UniqueFd stage(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
    if (!stage)
        throw_errno("create a temporary file in " + dir.string() + " (set TMPDIR elsewhere?)");

    CompressedInput in;
    in.fd = input.get();
    ArchiveReader reader(archive_read_new());
    archive_read_support_filter_all(reader.get());
    archive_read_support_format_raw(reader.get());
    if (archive_read_open(reader.get(), &in, nullptr, read_compressed, nullptr) != ARCHIVE_OK)
        throw Error("read " + what + ": " + (in.error.empty() ? archive_error(reader.get()) : in.error));
    struct archive_entry* entry = nullptr;
    if (archive_read_next_header(reader.get(), &entry) != ARCHIVE_OK)
        throw Error("read " + what + ": " + archive_error(reader.get()));
    prepared.compression = archive_filter_name(reader.get(), 0);

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
        position = end;
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
                    fs::write_at(stage.get(), data + (a - at), b - a, a, "the decompressed image");
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
                    fs::write_at(stage.get(), data + (blk - at), blk_end - blk, blk, "the decompressed image");
                blk = blk_end;
            }
            if (b == range_end)
                whole.ranges.push_back({(range_end - whole_range) / 4096, range_end / 4096 - 1, range_sum.hex()});
            a = b;
        }
    }
    if (in.fd >= 0 && !in.error.empty())
        throw Error("read " + what + ": " + in.error);
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
        throw_errno("size the decompressed image");
    prepared.fd = std::move(stage);
}

std::string file_sha256(int fd, const std::string& what, GCancellable* cancellable)
{
    struct stat st {};
    if (::fstat(fd, &st) != 0)
        throw_errno("stat " + what);
    return sha256_of_range(fd, 0, static_cast<uint64_t>(st.st_size), what, cancellable);
}

// The sha256 SHA256SUMS lists for `name` ("" when it lists none), in
// sha256sum's format: "HASH  NAME" or "HASH *NAME".
std::string listed_sum(const std::string& sums, const std::string& name)
{
    std::istringstream lines(sums);
    std::string line;
    while (std::getline(lines, line)) {
        if (line.size() < 67 || line[64] != ' ')
            continue;
        std::string listed = line.substr(66);
        if (!listed.empty() && listed.back() == '\r')
            listed.pop_back();
        if (listed == name)
            return line.substr(0, 64);
    }
    return "";
}

std::optional<std::filesystem::path> bmap_beside(const std::filesystem::path& image, bool compressed)
{
    std::vector<std::filesystem::path> candidates{image.string() + ".bmap"};
    if (compressed && image.has_extension())
        candidates.push_back(image.parent_path() / (image.stem().string() + ".bmap"));
    for (const auto& candidate : candidates) {
        std::error_code ec;
        if (std::filesystem::is_regular_file(candidate, ec))
            return candidate;
    }
    return std::nullopt;
}

} // namespace

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

std::string compression_of(const std::filesystem::path& file)
{
    UniqueFd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd)
        throw_errno("open " + file.string());
    unsigned char magic[6] = {};
    ssize_t n = ::pread(fd.get(), magic, sizeof magic, 0);
    if (n < 0)
        throw_errno("read " + file.string());
    auto starts = [&](std::initializer_list<unsigned> bytes) {
        if (static_cast<size_t>(n) < bytes.size())
            return false;
        size_t i = 0;
        for (unsigned b : bytes)
            if (magic[i++] != b)
                return false;
        return true;
    };
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
    struct stat st {};
    if (::stat(image.c_str(), &st) != 0)
        throw_errno("image " + what);
    if (!S_ISREG(st.st_mode))
        throw Error(what + " is not an image file");
    prepared.compression = compression_of(image);
    prepared.compressed = !prepared.compression.empty();

    std::optional<Bmap> bmap;
    std::optional<std::filesystem::path> bmap_file = options.bmap ? options.bmap : bmap_beside(image, prepared.compressed);
    if (bmap_file) {
        bmap = read_bmap(*bmap_file);
        prepared.bmap_path = bmap_file->string();
        if (!options.bmap)
            notice("using the bmap beside the image: " + prepared.bmap_path);
    }

    // SHA256SUMS: the explicit one must list the image; the one beside it is used when it does.
    std::string sums_text, image_listed;
    if (options.sums) {
        sums_text = fs::read_file(*options.sums);
        image_listed = listed_sum(sums_text, image.filename().string());
        if (image_listed.empty())
            throw Error(options.sums->string() + " does not list " + image.filename().string());
        prepared.sums_path = options.sums->string();
    } else {
        std::filesystem::path beside = image.parent_path() / "SHA256SUMS";
        std::error_code ec;
        if (std::filesystem::is_regular_file(beside, ec)) {
            sums_text = fs::read_file(beside);
            image_listed = listed_sum(sums_text, image.filename().string());
            if (!image_listed.empty())
                prepared.sums_path = beside.string();
        }
    }
    auto dir_of = [](const std::filesystem::path& file) {
        return std::filesystem::weakly_canonical(file.parent_path().empty() ? "." : file.parent_path());
    };
    if (!prepared.sums_path.empty() && bmap_file && dir_of(*bmap_file) == dir_of(image)) {
        std::string bmap_listed = listed_sum(sums_text, bmap_file->filename().string());
        if (!bmap_listed.empty() && bmap_listed != sha256_hex(fs::read_file(*bmap_file)))
            throw Error(prepared.bmap_path + " does not match " + prepared.sums_path + "; nothing was written");
    }

    if (prepared.compressed) {
        if (!bmap)
            notice("no bmap for " + what + ": every block is written (make one with treeflash bmap before compressing)");
        decompress(prepared, bmap, options.max_size, cancellable);
    } else {
        prepared.fd.reset(::open(image.c_str(), O_RDONLY | O_CLOEXEC));
        if (!prepared.fd)
            throw_errno("open " + what);
        if (::fstat(prepared.fd.get(), &prepared.file_state) != 0)
            throw_errno("stat " + what);
        uint64_t size = static_cast<uint64_t>(st.st_size);
        if (size == 0)
            throw Error(what + " is empty");
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
    return prepared;
}

} // namespace treeflash::flasher
