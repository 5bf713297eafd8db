#include "flasher/write/bmap.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/named_file.hpp"
#include "common/glib.hpp"
#include "common/sha256.hpp"
#include "common/text.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <exception>
#include <fcntl.h>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// The most one checksum of a new bmap covers: see map_open_image.
constexpr uint64_t hash_piece_bytes = 16 << 20;

std::string range_sha256(int fd, uint64_t from, uint64_t to, const std::string& what, GCancellable* cancellable)
{
    Sha256 sum;
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
        sum.update(buffer.data(), static_cast<size_t>(n));
        pos += static_cast<uint64_t>(n);
    }
    return sum.hex();
}

// Runs task(0) .. task(count - 1) on up to four threads; the first Error
// (or Cancelled) one throws stops the rest from starting and is rethrown.
void parallel_for(size_t count, const std::function<void(size_t)>& task)
{
    size_t workers = std::min<size_t>({count, 4, std::max(1u, std::thread::hardware_concurrency())});
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr first_error;
    std::mutex error_lock;
    auto work = [&] {
        for (size_t i; !failed && (i = next++) < count;) {
            try {
                task(i);
            } catch (...) {
                std::lock_guard hold(error_lock);
                if (!first_error)
                    first_error = std::current_exception();
                failed = true;
            }
        }
    };
    std::vector<std::jthread> threads;
    try {
        for (size_t t = 1; t < workers; ++t)
            threads.emplace_back(work);
    } catch (const std::system_error&) {
        // No more threads (a container's limit, say): fewer do it all.
    }
    work();
    for (auto& thread : threads)
        thread.join();
    if (first_error)
        std::rethrow_exception(first_error);
}

} // namespace

std::pair<uint64_t, uint64_t> Bmap::bytes(const BmapRange& range) const
{
    return {range.first * block_size, std::min((range.last + 1) * block_size, image_size)};
}

uint64_t Bmap::mapped_bytes() const
{
    uint64_t total = 0;
    for (const auto& range : ranges) {
        auto [from, to] = bytes(range);
        total += to - from;
    }
    return total;
}

std::string sha256_of_range(int fd, uint64_t from, uint64_t to, const std::string& what, GCancellable* cancellable)
{
    return range_sha256(fd, from, to, what, cancellable);
}

Bmap map_open_image(int fd, uint64_t size, const std::string& what, GCancellable* cancellable)
{
    Bmap map;
    map.image_size = size;
    const uint64_t bs = map.block_size;
    map.blocks_count = (map.image_size + bs - 1) / bs;
    for (const auto& [from, to] : fs::data_extents(fd, map.image_size, what)) {
        uint64_t first = from / bs, last = (std::min(to, map.image_size) - 1) / bs;
        if (!map.ranges.empty() && first <= map.ranges.back().last + 1)
            map.ranges.back().last = std::max(map.ranges.back().last, last);
        else
            map.ranges.push_back({first, last, ""});
    }
    // A checksum is one sequential pass: ranges are cut into pieces of at
    // most piece_blocks so that their checksums spread over the cores (a
    // bmap may hold adjacent ranges; bmaptool copies them the same).
    const uint64_t piece_blocks = hash_piece_bytes / bs;
    std::vector<BmapRange> pieces;
    for (const auto& range : map.ranges) {
        for (uint64_t first = range.first; first <= range.last; first += piece_blocks)
            pieces.push_back({first, std::min(range.last, first + piece_blocks - 1), ""});
        map.mapped_blocks += range.last - range.first + 1;
    }
    map.ranges = std::move(pieces);
    parallel_for(map.ranges.size(), [&](size_t i) {
        auto [from, to] = map.bytes(map.ranges[i]);
        map.ranges[i].sha256 = range_sha256(fd, from, to, what, cancellable);
    });
    return map;
}

Bmap map_image(const std::filesystem::path& image, GCancellable* cancellable)
{
    named::OpenFile file = named::open_input(image, "the image");
    return map_open_image(file.fd.get(), static_cast<uint64_t>(file.st.st_size), image.string(), cancellable);
}

namespace {

// The text between <tag> and </tag>, trimmed; nullopt when absent.
std::optional<std::string> element(const std::string& xml, const std::string& tag)
{
    auto open = xml.find("<" + tag + ">");
    if (open == std::string::npos)
        return std::nullopt;
    open += tag.size() + 2;
    auto close = xml.find("</" + tag + ">", open);
    if (close == std::string::npos)
        return std::nullopt;
    std::string value = xml.substr(open, close - open);
    auto first = value.find_first_not_of(" \t\r\n");
    auto last = value.find_last_not_of(" \t\r\n");
    return first == std::string::npos ? std::string() : value.substr(first, last - first + 1);
}

uint64_t number(const std::string& text, const std::string& what)
{
    if (text.empty() || text.size() > 19 || text.find_first_not_of("0123456789") != std::string::npos)
        throw Error(what + ": '" + text + "' is not a block count");
    return std::stoull(text);
}

bool is_sha256(const std::string& text)
{
    return text.size() == 64 && text.find_first_not_of("0123456789abcdef") == std::string::npos;
}

} // namespace

Bmap parse_bmap(const std::string& xml, const std::string& what)
{
    // The fields come from the text without its comments: bmaptool's name them in prose.
    std::string stripped;
    for (size_t at = 0;;) {
        auto open = xml.find("<!--", at);
        stripped += xml.substr(at, open == std::string::npos ? std::string::npos : open - at);
        if (open == std::string::npos)
            break;
        auto close = xml.find("-->", open + 4);
        if (close == std::string::npos)
            throw Error(what + ": a comment is not closed");
        at = close + 3;
    }
    auto version_at = stripped.find("<bmap version=\"");
    if (version_at == std::string::npos)
        throw Error(what + " is not a bmap file (no <bmap version=...>)");
    std::string version = stripped.substr(version_at + 15, stripped.find('"', version_at + 15) - (version_at + 15));
    if (version.rfind("2.", 0) != 0)
        throw Error(what + ": bmap version " + version
                    + " is not supported (its checksums are not sha256); make a new one with treeflash bmap or bmaptool create");
    auto field = [&](const std::string& tag) {
        auto value = element(stripped, tag);
        if (!value)
            throw Error(what + ": no <" + tag + ">");
        return *value;
    };
    if (field("ChecksumType") != "sha256")
        throw Error(what + ": checksum type '" + field("ChecksumType") + "' is not supported (only sha256)");

    // The file's own checksum: taken with its value replaced by zeros.
    std::string checksum = field("BmapFileChecksum");
    if (!is_sha256(checksum))
        throw Error(what + ": BmapFileChecksum is not a sha256");
    std::string zeroed = xml;
    text::replace_all(zeroed, checksum, std::string(64, '0'));
    if (sha256_hex(zeroed) != checksum)
        throw Error(what + " is damaged: its BmapFileChecksum does not match its content");

    Bmap map;
    map.image_size = number(field("ImageSize"), what + " ImageSize");
    uint64_t block_size = number(field("BlockSize"), what + " BlockSize");
    if (block_size < 512 || block_size > (1 << 20) || (block_size & (block_size - 1)))
        throw Error(what + ": block size " + std::to_string(block_size) + " is not a power of two from 512 to 1 MiB");
    map.block_size = static_cast<uint32_t>(block_size);
    map.blocks_count = number(field("BlocksCount"), what + " BlocksCount");
    if (map.blocks_count != (map.image_size + block_size - 1) / block_size)
        throw Error(what + ": BlocksCount does not match ImageSize");
    uint64_t declared_mapped = number(field("MappedBlocksCount"), what + " MappedBlocksCount");

    std::string block_map = field("BlockMap");
    size_t pos = 0;
    for (;;) {
        auto open = block_map.find("<Range", pos);
        if (open == std::string::npos)
            break;
        auto tag_end = block_map.find('>', open);
        auto close = block_map.find("</Range>", open);
        if (tag_end == std::string::npos || close == std::string::npos || close < tag_end)
            throw Error(what + ": a <Range> is not closed");
        std::string attributes = block_map.substr(open + 6, tag_end - open - 6);
        auto chksum = attributes.find("chksum=\"");
        if (chksum == std::string::npos)
            throw Error(what + ": a <Range> has no chksum");
        std::string sum = attributes.substr(chksum + 8, attributes.find('"', chksum + 8) - (chksum + 8));
        if (!is_sha256(sum))
            throw Error(what + ": a <Range> chksum is not a sha256");
        std::string span = block_map.substr(tag_end + 1, close - tag_end - 1);
        auto first_char = span.find_first_not_of(" \t\r\n");
        auto last_char = span.find_last_not_of(" \t\r\n");
        span = first_char == std::string::npos ? "" : span.substr(first_char, last_char - first_char + 1);
        auto dash = span.find('-');
        BmapRange range;
        range.first = number(span.substr(0, dash), what + " range");
        range.last = dash == std::string::npos ? range.first : number(span.substr(dash + 1), what + " range");
        range.sha256 = sum;
        if (range.last < range.first || range.last >= map.blocks_count)
            throw Error(what + ": range " + span + " lies outside the image's " + std::to_string(map.blocks_count) + " blocks");
        if (!map.ranges.empty() && range.first <= map.ranges.back().last)
            throw Error(what + ": range " + span + " overlaps or precedes the one before it");
        map.mapped_blocks += range.last - range.first + 1;
        map.ranges.push_back(range);
        pos = close + 8;
    }
    if (map.mapped_blocks != declared_mapped)
        throw Error(what + ": MappedBlocksCount says " + std::to_string(declared_mapped) + " but the ranges hold "
                    + std::to_string(map.mapped_blocks));
    return map;
}

Bmap read_bmap(const std::filesystem::path& file)
{
    return parse_bmap(named::read_input(file, "the bmap", bmap_size_limit), file.string());
}

void check_image_against_bmap(int fd, const Bmap& map, const std::string& what, GCancellable* cancellable)
{
    for (const auto& range : map.ranges) {
        auto [from, to] = map.bytes(range);
        if (range_sha256(fd, from, to, what, cancellable) != range.sha256)
            throw Error(what + " does not match its bmap: blocks " + std::to_string(range.first) + "-"
                        + std::to_string(range.last) + " (bytes " + std::to_string(from) + "-" + std::to_string(to - 1)
                        + ") have another checksum; nothing was written");
    }
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
    text::replace_all(xml, "@CHECKSUM@", sha256_hex(zeroed));
    return xml;
}

namespace {

void check_bmap_output(const std::filesystem::path& output, const struct stat& image)
{
    named::check_output(output, "the bmap");
    struct stat out {};
    if (::stat(output.c_str(), &out) == 0 && named::same_file(out, image))
        throw Error("the bmap " + output.string() + " would replace the image it maps; name another file");
}

} // namespace

Bmap write_bmap(const std::filesystem::path& image, const std::filesystem::path& output, GCancellable* cancellable)
{
    named::OpenFile file = named::open_input(image, "the image");
    check_bmap_output(output, file.st);
    Bmap map = map_open_image(file.fd.get(), static_cast<uint64_t>(file.st.st_size), image.string(), cancellable);
    named::write_output(output, "the bmap", bmap_xml(map), &file.st);
    return map;
}

PendingFile prepare_bmap(int image_fd, uint64_t size, const std::filesystem::path& output, const std::string& what,
                         GCancellable* cancellable)
{
    struct stat image {};
    if (::fstat(image_fd, &image) != 0)
        throw_errno("stat " + what);
    check_bmap_output(output, image);
    Bmap map = map_open_image(image_fd, size, what, cancellable);
    return named::prepare_output(output, "the bmap", bmap_xml(map), &image);
}

void publish_bmap(PendingFile& bmap, int image_fd, const std::filesystem::path& output)
{
    struct stat image {};
    if (::fstat(image_fd, &image) != 0)
        throw_errno("stat the image");
    named::publish_output(bmap, output, "the bmap", &image);
}

} // namespace treeflash::flasher
