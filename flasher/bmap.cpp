#include "flasher/bmap.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/glib.hpp"
#include "common/text.hpp"

#include <cerrno>
#include <fcntl.h>
#include <memory>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// The byte ranges of `fd` that hold data, from SEEK_DATA / SEEK_HOLE.
std::vector<std::pair<uint64_t, uint64_t>> data_extents(int fd, uint64_t size, const std::string& what)
{
    std::vector<std::pair<uint64_t, uint64_t>> extents;
    off_t pos = 0;
    while (static_cast<uint64_t>(pos) < size) {
        off_t data = ::lseek(fd, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break; // only a hole is left
            throw_errno("find data in " + what);
        }
        off_t hole = ::lseek(fd, data, SEEK_HOLE);
        if (hole < 0)
            throw_errno("find holes in " + what);
        extents.emplace_back(static_cast<uint64_t>(data), static_cast<uint64_t>(hole));
        pos = hole;
    }
    return extents;
}

struct DigestFree {
    void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};

// OpenSSL's sha256 (SHA extensions where the CPU has them): a flash hashes
// every byte it wrote, and GLib's portable sha256 is several times slower.
std::string range_sha256(int fd, uint64_t from, uint64_t to, const std::string& what, GCancellable* cancellable)
{
    std::unique_ptr<EVP_MD_CTX, DigestFree> sum(EVP_MD_CTX_new());
    if (!sum || EVP_DigestInit_ex(sum.get(), EVP_sha256(), nullptr) != 1)
        throw Error("sha256: cannot start a digest");
    std::string buffer(1 << 20, '\0');
    for (uint64_t pos = from; pos < to;) {
        if (cancellable && g_cancellable_is_cancelled(cancellable))
            throw Cancelled();
        size_t want = static_cast<size_t>(std::min<uint64_t>(buffer.size(), to - pos));
        ssize_t n = ::pread(fd, buffer.data(), want, static_cast<off_t>(pos));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            throw_errno("read " + what);
        EVP_DigestUpdate(sum.get(), buffer.data(), static_cast<size_t>(n));
        pos += static_cast<uint64_t>(n);
    }
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned length = 0;
    EVP_DigestFinal_ex(sum.get(), digest, &length);
    static const char hex[] = "0123456789abcdef";
    std::string text;
    for (unsigned i = 0; i < length; ++i) {
        text += hex[digest[i] >> 4];
        text += hex[digest[i] & 15];
    }
    return text;
}

std::string sha256_of(const std::string& text)
{
    return glib::take_string(g_compute_checksum_for_string(G_CHECKSUM_SHA256, text.data(), static_cast<gssize>(text.size())));
}

} // namespace

Bmap map_image(const std::filesystem::path& image, GCancellable* cancellable)
{
    UniqueFd fd(::open(image.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd)
        throw_errno("open " + image.string());
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0)
        throw_errno("stat " + image.string());
    if (!S_ISREG(st.st_mode))
        throw Error(image.string() + " is not an image file");
    Bmap map;
    map.image_size = static_cast<uint64_t>(st.st_size);
    const uint64_t bs = map.block_size;
    map.blocks_count = (map.image_size + bs - 1) / bs;
    for (const auto& [from, to] : data_extents(fd.get(), map.image_size, image.string())) {
        uint64_t first = from / bs, last = (std::min(to, map.image_size) - 1) / bs;
        if (!map.ranges.empty() && first <= map.ranges.back().last + 1)
            map.ranges.back().last = std::max(map.ranges.back().last, last);
        else
            map.ranges.push_back({first, last, ""});
    }
    for (auto& range : map.ranges) {
        uint64_t to = std::min((range.last + 1) * bs, map.image_size);
        range.sha256 = range_sha256(fd.get(), range.first * bs, to, image.string(), cancellable);
        map.mapped_blocks += range.last - range.first + 1;
    }
    return map;
}

std::string bmap_xml(const Bmap& map)
{
    auto line = [](const std::string& tag, uint64_t value) {
        return "    <" + tag + "> " + std::to_string(value) + " </" + tag + ">\n";
    };
    std::string xml = "<?xml version=\"1.0\" ?>\n"
                      "<!-- Block map of an image (bmap 2.0, as bmap-tools reads it), made by treeflash:\n"
                      "     only the listed 4 KiB blocks hold data and need to be written. -->\n"
                      "<bmap version=\"2.0\">\n";
    xml += line("ImageSize", map.image_size);
    xml += line("BlockSize", map.block_size);
    xml += line("BlocksCount", map.blocks_count);
    xml += line("MappedBlocksCount", map.mapped_blocks);
    xml += "    <ChecksumType> sha256 </ChecksumType>\n";
    xml += "    <BmapFileChecksum> @CHECKSUM@ </BmapFileChecksum>\n";
    xml += "    <BlockMap>\n";
    for (const auto& r : map.ranges)
        xml += "        <Range chksum=\"" + r.sha256 + "\"> "
               + (r.first == r.last ? std::to_string(r.first) : std::to_string(r.first) + "-" + std::to_string(r.last))
               + " </Range>\n";
    xml += "    </BlockMap>\n</bmap>\n";
    // The file's own checksum is taken with the field all zeros.
    std::string zeroed = xml;
    text::replace_all(zeroed, "@CHECKSUM@", std::string(64, '0'));
    text::replace_all(xml, "@CHECKSUM@", sha256_of(zeroed));
    return xml;
}

Bmap write_bmap(const std::filesystem::path& image, const std::filesystem::path& output, GCancellable* cancellable)
{
    Bmap map = map_image(image, cancellable);
    fs::write_file_atomic(output, bmap_xml(map));
    return map;
}

} // namespace treeflash::flasher
