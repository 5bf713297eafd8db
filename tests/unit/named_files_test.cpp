// Paths a user names are opened one way (common/named_file.hpp): no
// symlink followed out of a folder others can write, no FIFO or device,
// bounded reads, no output over an input. And what write and flash make of
// what they read: SHA256SUMS as sha256sum reads it, zstd with a checksum,
// archives refused, kernel command lines that fit. Without root.
#include "common/error.hpp"
#include "common/named_file.hpp"
#include "common/validate.hpp"
#include "flasher/write/bmap.hpp"
#include "flasher/write/image.hpp"
#include "flasher/write/publish.hpp"
#include "tests/support/fixtures.hpp"

#include <archive.h>
#include <archive_entry.h>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;

namespace {

constexpr uint64_t MiB = 1 << 20;

// A small sparse "card image": a dos table and 2 MiB of data at 1 MiB.
fs::path small_image(const fs::path& dir, const std::string& name = "card.img")
{
    fs::path image = dir / name;
    write_file(image, "");
    fs::resize_file(image, 8 * MiB);
    auto table = run_process({"sh", "-c", "printf 'label: dos\\nstart=2048, type=83\\n' | sfdisk -q \"$0\"", image.string()});
    REQUIRE_MESSAGE(table.ok(), table.err);
    std::string data(2 * MiB, '\0');
    for (size_t i = 0; i < data.size(); ++i)
        data[i] = static_cast<char>((i * 2654435761u) >> 13);
    int fd = ::open(image.c_str(), O_WRONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(::pwrite(fd, data.data(), data.size(), MiB) == static_cast<ssize_t>(data.size()));
    ::close(fd);
    return image;
}

flasher::ImageOptions no_notices()
{
    return {};
}

// `data` compressed with bzip2, by libarchive (no bzip2 program needed).
std::string bzip2_of(const std::string& data)
{
    struct archive* writer = archive_write_new();
    REQUIRE(archive_write_add_filter_bzip2(writer) == ARCHIVE_OK);
    archive_write_set_format_raw(writer);
    archive_write_set_bytes_in_last_block(writer, 1);
    std::string out(data.size() + (1 << 20), '\0');
    size_t used = 0;
    REQUIRE(archive_write_open_memory(writer, out.data(), out.size(), &used) == ARCHIVE_OK);
    struct archive_entry* entry = archive_entry_new();
    archive_entry_set_pathname(entry, "image");
    archive_entry_set_filetype(entry, AE_IFREG);
    archive_entry_set_size(entry, static_cast<la_int64_t>(data.size()));
    REQUIRE(archive_write_header(writer, entry) == ARCHIVE_OK);
    REQUIRE(archive_write_data(writer, data.data(), data.size()) == static_cast<la_ssize_t>(data.size()));
    REQUIRE(archive_write_close(writer) == ARCHIVE_OK);
    archive_entry_free(entry);
    archive_write_free(writer);
    out.resize(used);
    return out;
}

// A folder anyone may write in (as /tmp is): a symlink there may have been
// put by anyone.
fs::path shared_folder(const Scratch& tmp)
{
    fs::path dir = tmp / "shared";
    fs::create_directories(dir);
    fs::permissions(dir, fs::perms::all);
    return dir;
}

// The result of `timeout 30 treeflash ...`: exit code 124 means it hung.
ProcessResult run_treeflash_bounded(const std::vector<std::string>& args)
{
    std::vector<std::string> argv{"timeout", "-s", "KILL", "30", TREEFLASH_BINARY};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_process(argv);
}

} // namespace

TEST_SUITE("trust") {

TEST_CASE("named files: symlinks only out of folders no one else can write, regular files only, bounded")
{
    Scratch tmp;
    write_file(tmp / "secret", "only root reads this\n", 0600);
    fs::path shared = shared_folder(tmp);
    fs::create_symlink(tmp / "secret", shared / "link");
    CHECK(error_of([&] { named::open_input(shared / "link", "SHA256SUMS"); }).find("a folder other users can write")
          != std::string::npos);
    CHECK(error_of([&] { named::open_log(shared / "link", "the log"); }).find("is a symlink") != std::string::npos);
    CHECK(read_text(tmp / "secret") == "only root reads this\n");
    // In the caller's own folder, a link is the caller's choice.
    fs::create_symlink(tmp / "secret", tmp / "own-link");
    CHECK(named::read_input(tmp / "own-link", "the file", 1024) == "only root reads this\n");

    // A FIFO is refused at once, for reading and for appending; so are a device and a folder.
    REQUIRE(::mkfifo((tmp / "fifo").c_str(), 0600) == 0);
    CHECK(error_of([&] { named::open_input(tmp / "fifo", "the bmap"); }).find("is a FIFO") != std::string::npos);
    CHECK(error_of([&] { named::open_log(tmp / "fifo", "the log"); }).find("is a FIFO") != std::string::npos);
    CHECK(error_of([&] { named::open_input("/dev/zero", "SHA256SUMS"); }).find("is a character device") != std::string::npos);
    CHECK(error_of([&] { named::open_input(tmp.path(), "SHA256SUMS"); }).find("is a folder") != std::string::npos);
    CHECK(error_of([&] { named::open_log("", "the log"); }).find("empty path") != std::string::npos);

    // Bounded: a large (sparse) file is refused before a byte is read.
    write_file(tmp / "huge", "");
    fs::resize_file(tmp / "huge", 3ull << 30);
    CHECK(error_of([&] { named::read_input(tmp / "huge", "SHA256SUMS", 16 * MiB); }).find("more than") != std::string::npos);

    // A symlinked folder on the way counts as much as a symlinked file.
    fs::create_directories(tmp / "private");
    fs::create_symlink(tmp / "private", shared / "d");
    CHECK(error_of([&] { named::open_log(shared / "d/cards.jsonl", "the log"); }).find("a folder other users can write")
          != std::string::npos);
    CHECK(error_of([&] { named::check_output(shared / "d/out.bmap", "the bmap"); }).find("a folder other users can write")
          != std::string::npos);
    CHECK(fs::is_empty(tmp / "private"));

    // A link in the caller's folder whose target runs through a link in a
    // shared one is held to the same rule, hop by hop.
    fs::create_directories(tmp / "own");
    fs::create_symlink(shared / "d/via-shared", tmp / "own/log-link");
    CHECK(error_of([&] { named::open_log(tmp / "own/log-link", "the log"); }).find("other users can write")
          != std::string::npos);
    CHECK(fs::is_empty(tmp / "private"));
    // A dangling link, even in the caller's own folder, creates nothing.
    fs::create_symlink(tmp / "not-yet", tmp / "own/dangling");
    CHECK(!error_of([&] { named::open_log(tmp / "own/dangling", "the log"); }).empty());
    CHECK(!fs::exists(tmp / "not-yet"));

    // An output replaces regular files only.
    CHECK_NOTHROW(named::check_output(tmp / "new-file", "the bmap"));
    CHECK_NOTHROW(named::check_output(tmp / "secret", "the bmap"));
    CHECK(error_of([&] { named::check_output(tmp / "fifo", "the bmap"); }).find("is a FIFO") != std::string::npos);
    CHECK(error_of([&] { named::check_output(tmp / "own-link", "the bmap"); }).find("is a symlink") != std::string::npos);
}

TEST_CASE("SHA256SUMS beside an image is neither read nor replaced through a symlink in a shared folder")
{
    Scratch tmp;
    fs::path dir = shared_folder(tmp);
    fs::path image = small_image(dir);
    fs::path bmap = dir / "card.img.bmap";
    flasher::write_bmap(image, bmap);
    // Lines that look like sums, in a file only its owner may read.
    std::string secret = std::string(64, 'a') + "  root-only-line\n";
    write_file(tmp / "root-only", secret, 0600);
    fs::create_symlink(tmp / "root-only", dir / "SHA256SUMS");

    std::string message = error_of([&] { flasher::update_sha256sums({image, bmap}, nullptr); });
    CHECK_MESSAGE(message.find("is a symlink") != std::string::npos, message);
    CHECK(fs::is_symlink(dir / "SHA256SUMS"));
    CHECK(read_text(tmp / "root-only") == secret);

    message = error_of([&] { flasher::prepare_image(image, no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("a folder other users can write") != std::string::npos, message);
}

TEST_CASE("bmap: never over its own image, a FIFO or a symlink; a FIFO image is refused, not waited on")
{
    Scratch tmp;
    fs::path image = small_image(tmp.path());
    uintmax_t size = fs::file_size(image);
    auto r = run_treeflash({"bmap", image.string(), "-o", image.string()});
    CHECK(r.exit_code == 1);
    CHECK_MESSAGE(r.err.find("would replace the image it maps") != std::string::npos, r.err);
    CHECK(fs::file_size(image) == size);

    REQUIRE(::mkfifo((tmp / "fifo").c_str(), 0600) == 0);
    r = run_treeflash_bounded({"bmap", image.string(), "-o", (tmp / "fifo").string()});
    CHECK_MESSAGE(r.err.find("is a FIFO") != std::string::npos, r.err);
    CHECK(fs::is_fifo(tmp / "fifo"));
    r = run_treeflash_bounded({"bmap", (tmp / "fifo").string()});
    CHECK(r.exit_code == 1); // 124/137 when it hung
    CHECK_MESSAGE(r.err.find("is a FIFO") != std::string::npos, r.err);

    fs::create_symlink(tmp / "elsewhere.bmap", tmp / "link.bmap");
    r = run_treeflash({"bmap", image.string(), "-o", (tmp / "link.bmap").string()});
    CHECK_MESSAGE(r.err.find("is a symlink") != std::string::npos, r.err);
    CHECK(!fs::exists(tmp / "elsewhere.bmap"));
}

TEST_CASE("an image's SHA256SUMS and bmap: FIFOs, devices and huge files are refused at once")
{
    Scratch tmp;
    fs::path image = small_image(tmp.path());
    REQUIRE(::mkfifo((tmp / "fifo").c_str(), 0600) == 0);
    flasher::ImageOptions options;
    options.sums = tmp / "fifo";
    CHECK(error_of([&] { flasher::prepare_image(image, options, nullptr); }).find("is a FIFO") != std::string::npos);
    options.sums = "/dev/zero";
    CHECK(error_of([&] { flasher::prepare_image(image, options, nullptr); }).find("character device") != std::string::npos);
    options.sums.reset();
    options.bmap = tmp / "fifo";
    CHECK(error_of([&] { flasher::prepare_image(image, options, nullptr); }).find("is a FIFO") != std::string::npos);

    // 3 GiB of SHA256SUMS beside the image: refused, not read into memory.
    write_file(tmp / "SHA256SUMS", "");
    fs::resize_file(tmp / "SHA256SUMS", 3ull << 30);
    std::string message = error_of([&] { flasher::prepare_image(image, no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("more than") != std::string::npos, message);
}

TEST_CASE("SHA256SUMS is read as sha256sum -c reads it")
{
    Scratch tmp;
    fs::path image = small_image(tmp.path());
    std::string sum = sha256sum_files({image});
    flasher::ImageOptions options;
    options.sums = tmp / "SUMS";

    // "./card.img" names the image: a wrong sum there is a mismatch, not "not listed".
    write_file(tmp / "SUMS", std::string(64, '0') + "  ./card.img\n");
    std::string message = error_of([&] { flasher::prepare_image(image, options, nullptr); });
    CHECK_MESSAGE(message.find("does not match") != std::string::npos, message);
    // The same beside the image, unasked.
    write_file(tmp / "SHA256SUMS", std::string(64, '0') + "  ./card.img\n");
    message = error_of([&] { flasher::prepare_image(image, no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("does not match") != std::string::npos, message);
    fs::remove(tmp / "SHA256SUMS");

    // Upper-case hex and the binary marker are accepted.
    std::string upper = sum;
    for (char& c : upper)
        c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    write_file(tmp / "SUMS", upper + " *card.img\n");
    flasher::PreparedImage prepared = flasher::prepare_image(image, options, nullptr);
    CHECK(prepared.sums_path == (tmp / "SUMS").string());
    CHECK(prepared.image_sha256 == sum);

    // A line for the image that is no sha256 is an error, not a line skipped.
    write_file(tmp / "SUMS", "d41d8cd98f00b204e9800998ecf8427e  card.img\n");
    message = error_of([&] { flasher::prepare_image(image, options, nullptr); });
    CHECK_MESSAGE(message.find("not a sha256") != std::string::npos, message);

    // The tagged form ("sha256sum --tag") is read too.
    write_file(tmp / "SHA256SUMS", "SHA256 (card.img) = " + std::string(64, '0') + "\n");
    message = error_of([&] { flasher::prepare_image(image, no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("does not match") != std::string::npos, message);
    fs::remove(tmp / "SHA256SUMS");

    // A folder is named as such.
    options.sums = tmp.path();
    message = error_of([&] { flasher::prepare_image(image, options, nullptr); });
    CHECK_MESSAGE(message.find("is a folder") != std::string::npos, message);
}

TEST_CASE("SHA256SUMS updated beside an image lists each file once, in the form sha256sum -c reads")
{
    Scratch tmp;
    fs::path image = small_image(tmp.path());
    fs::path bmap = tmp / "card.img.bmap";
    flasher::write_bmap(image, bmap);
    std::string other = std::string(64, 'b');
    write_file(tmp / "SHA256SUMS", std::string(64, 'a') + "  card.img\r\n" + std::string(64, 'a') + "  ./card.img.bmap\n"
                                       + "SHA256 (card.img) = " + std::string(64, 'c') + "\n" + other + "  other.img\n");
    flasher::update_sha256sums({image, bmap}, nullptr);
    std::string text = read_text(tmp / "SHA256SUMS");
    CHECK(text == sha256sum_files({image}) + "  card.img\n" + sha256sum_files({bmap}) + "  card.img.bmap\n" + other
                       + "  other.img\n");
    auto checked = run_process({"sh", "-c", "cd \"$0\" && sha256sum -c --ignore-missing SHA256SUMS", tmp.path().string()});
    CHECK_MESSAGE(checked.ok(), checked.out << checked.err);
}

TEST_CASE("flash --image checks every file it will leave beside the image before it starts")
{
    Scratch tmp;
    write_file(tmp / "card.img", "the old image");
    fs::create_symlink(tmp / "elsewhere", tmp / "card.img.zst");
    auto r = run_treeflash({"flash", "--board", "qemu-arm64", "--image", (tmp / "card.img").string(), "--repo",
                            (tmp / "none").string(), "--no-gpg-verify", "--compress", "zst", "--overwrite"});
    CHECK(r.exit_code == 1);
    CHECK_MESSAGE(r.err.find("card.img.zst is a symlink") != std::string::npos, r.err);
    CHECK(read_text(tmp / "card.img") == "the old image");
    CHECK(!fs::exists(tmp / "elsewhere"));
}

TEST_CASE("flash --image works only in a folder no other user can swap under it")
{
    Scratch tmp;
    fs::path shared = shared_folder(tmp);
    fs::create_directories(shared / "sub");
    const std::string refused = "can be renamed, replaced or emptied by another user";
    // Anyone may rename shared/sub and put a link to another folder in its
    // place, or swap the partial image in shared itself for a link.
    for (const fs::path& folder : {shared / "sub", shared}) {
        std::string message = error_of([&] { named::check_folder_is_stable(folder, "the image's folder"); });
        CHECK_MESSAGE(message.find(refused) != std::string::npos, message);
        auto r = run_treeflash({"flash", "--board", "qemu-arm64", "--image", (folder / "card.img").string(), "--repo",
                                (tmp / "none").string(), "--no-gpg-verify"});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find(refused) != std::string::npos, r.err);
    }
    // Reached through a link in the caller's own folder: the same.
    fs::create_directories(tmp / "own");
    fs::create_symlink(shared / "sub", tmp / "own/images");
    std::string message = error_of([&] { named::check_folder_is_stable(tmp / "own/images", "the image's folder"); });
    CHECK_MESSAGE(message.find(refused) != std::string::npos, message);
    // A sticky folder (as /tmp) is fine, and so is the caller's own folder in one.
    fs::create_directories(tmp / "sticky/mine");
    fs::permissions(tmp / "sticky", fs::perms::all | fs::perms::sticky_bit);
    CHECK_NOTHROW(named::check_folder_is_stable(tmp / "sticky", "the image's folder"));
    CHECK_NOTHROW(named::check_folder_is_stable(tmp / "sticky/mine", "the image's folder"));
}

TEST_CASE("zstd images carry a content checksum; a corrupted one is never written as good")
{
    Scratch tmp;
    fs::path image = small_image(tmp.path());
    fs::path zst = flasher::compress_image(image, "zst", false, nullptr);
    auto listing = run_process({"zstd", "-lv", zst.string()});
    REQUIRE_MESSAGE(listing.ok(), listing.err);
    CHECK_MESSAGE(listing.out.find("Check: XXH64") != std::string::npos, listing.out);
    CHECK(run_process({"zstd", "-t", "-q", zst.string()}).ok());
    CHECK(flasher::prepare_image(zst, no_notices(), nullptr).image_sha256 == sha256sum_files({zst}));

    // One byte changed in the last 4 KiB of compressed data: found, by the checksum if by nothing else.
    std::string bytes = read_text(zst);
    REQUIRE(bytes.size() > 4096);
    bytes[bytes.size() - 2000] ^= 0x01;
    write_file(tmp / "corrupt.img.zst", bytes);
    CHECK(!error_of([&] { flasher::prepare_image(tmp / "corrupt.img.zst", no_notices(), nullptr); }).empty());

    // A foreign zstd without a checksum, with nothing vouching for it, is refused.
    REQUIRE(run_process({"zstd", "-q", "--no-check", image.string(), "-o", (tmp / "unchecked.img.zst").string()}).ok());
    std::string message = error_of([&] { flasher::prepare_image(tmp / "unchecked.img.zst", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("the frame at byte 0 has no checksum") != std::string::npos, message);
    // Every frame counts: a second frame without a checksum is refused too.
    REQUIRE(run_process({"sh", "-c", "head -c 1M \"$0\" | zstd -q -C > \"$1\" && tail -c +1048577 \"$0\" | zstd -q --no-check >> \"$1\"",
                         image.string(), (tmp / "two.img.zst").string()}).ok());
    message = error_of([&] { flasher::prepare_image(tmp / "two.img.zst", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("has no checksum") != std::string::npos, message);
    CHECK_MESSAGE(message.find("at byte 0 ") == std::string::npos, message);
    // So is an xz stream made with --check=none after a checked one.
    REQUIRE(run_process({"sh", "-c", "head -c 1M \"$0\" | xz -q > \"$1\" && tail -c +1048577 \"$0\" | xz -q --check=none >> \"$1\"",
                         image.string(), (tmp / "two.img.xz").string()}).ok());
    message = error_of([&] { flasher::prepare_image(tmp / "two.img.xz", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("has no check") != std::string::npos, message);
    REQUIRE(run_process({"sh", "-c", "xz -q < \"$0\" > \"$1\"", image.string(), (tmp / "one.img.xz").string()}).ok());
    CHECK_NOTHROW(flasher::prepare_image(tmp / "one.img.xz", no_notices(), nullptr));

    // gzip: libarchive does not check its CRC32; treeflash does.
    REQUIRE(run_process({"sh", "-c", "gzip -c \"$0\" > \"$1\"", image.string(), (tmp / "card.img.gz").string()}).ok());
    CHECK_NOTHROW(flasher::prepare_image(tmp / "card.img.gz", no_notices(), nullptr));
    std::string gz = read_text(tmp / "card.img.gz");
    gz[gz.size() - 6] ^= 0x01; // in the trailer's CRC32
    write_file(tmp / "bad.img.gz", gz);
    message = error_of([&] { flasher::prepare_image(tmp / "bad.img.gz", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("CRC32") != std::string::npos, message);

    // bzip2 checks its blocks; a file cut after a later stream's header is found by its missing end mark.
    std::string bz2 = bzip2_of(read_text(image));
    write_file(tmp / "card.img.bz2", bz2);
    CHECK_NOTHROW(flasher::prepare_image(tmp / "card.img.bz2", no_notices(), nullptr));
    write_file(tmp / "cut.img.bz2", bz2 + "BZh91AY&SY");
    message = error_of([&] { flasher::prepare_image(tmp / "cut.img.bz2", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("end-of-stream mark") != std::string::npos, message);

    // Hostile frame metadata is refused at once, not walked for minutes: a
    // zstd header then 64 MiB of zeros (empty blocks), an xz footer that
    // claims a 300 MB index.
    write_file(tmp / "zeros.img.zst", std::string("\x28\xb5\x2f\xfd\x04\x00", 6));
    fs::resize_file(tmp / "zeros.img.zst", 64 * MiB);
    message = error_of([&] { flasher::prepare_image(tmp / "zeros.img.zst", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("a corrupt block") != std::string::npos, message);
    std::string xz_head("\xfd" "7zXZ\0\0\x01", 8);
    std::string footer = std::string(4, '\0') + std::string("\xff\xff\xff\x04", 4) + std::string("\0\x01YZ", 4);
    write_file(tmp / "index.img.xz", xz_head);
    fs::resize_file(tmp / "index.img.xz", 300 * MiB);
    {
        int fd = ::open((tmp / "index.img.xz").c_str(), O_WRONLY | O_CLOEXEC);
        REQUIRE(::pwrite(fd, footer.data(), footer.size(), 300 * MiB - 12) == 12);
        ::close(fd);
    }
    message = error_of([&] { flasher::prepare_image(tmp / "index.img.xz", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("corrupt stream footer") != std::string::npos, message);

    // A stream that starts with a skippable frame is not taken for raw bytes.
    write_file(tmp / "skippable.img.zst", std::string("\x50\x2a\x4d\x18\0\0\0\0", 8) + read_text(zst));
    message = error_of([&] { flasher::prepare_image(tmp / "skippable.img.zst", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("skippable frame") != std::string::npos, message);

    // With a bmap it is checked range by range, and accepted.
    flasher::write_bmap(image, tmp / "unchecked.img.bmap");
    CHECK_NOTHROW(flasher::prepare_image(tmp / "unchecked.img.zst", no_notices(), nullptr));
}

TEST_CASE("archives and compressions treeflash does not read are refused, not written raw")
{
    Scratch tmp;
    fs::path image = small_image(tmp.path());
    REQUIRE(run_process({"xz", "-k", "-q", "--format=lzma", image.string()}).ok());
    std::string message = error_of([&] { flasher::prepare_image(tmp / "card.img.lzma", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("lzma") != std::string::npos, message);
    CHECK_MESSAGE(message.find("nothing was written") != std::string::npos, message);
    // A zip archive (a local file header, then the image stored).
    write_file(tmp / "card.zip", std::string("PK\x03\x04", 4) + read_text(image));
    message = error_of([&] { flasher::prepare_image(tmp / "card.zip", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("a zip archive") != std::string::npos, message);
    // A tarball, named so or not, and a compression inside a compression.
    REQUIRE(run_process({"tar", "-C", tmp.path().string(), "-czf", (tmp / "card.tgz").string(), "card.img"}).ok());
    fs::copy_file(tmp / "card.tgz", tmp / "card-tar.img.gz");
    for (const char* name : {"card.tgz", "card-tar.img.gz"}) {
        message = error_of([&] { flasher::prepare_image(tmp / name, no_notices(), nullptr); });
        CHECK_MESSAGE((message.find(".tgz") != std::string::npos || message.find("a tar archive") != std::string::npos), message);
    }
    REQUIRE(run_process({"tar", "--format=v7", "-C", tmp.path().string(), "-cf", (tmp / "v7.img").string(), "card.img"}).ok());
    message = error_of([&] { flasher::prepare_image(tmp / "v7.img", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("a tar archive") != std::string::npos, message);
    REQUIRE(run_process({"sh", "-c", "xz -c \"$0\" | gzip -c > \"$1\"", image.string(), (tmp / "twice.img.gz").string()}).ok());
    message = error_of([&] { flasher::prepare_image(tmp / "twice.img.gz", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("compressed twice (xz inside gzip)") != std::string::npos, message);
    write_file(tmp / "legacy.img.lz4", std::string("\x02\x21\x4c\x18", 4) + std::string(100, 'x'));
    message = error_of([&] { flasher::prepare_image(tmp / "legacy.img.lz4", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("legacy lz4") != std::string::npos, message);
    write_file(tmp / "empty.img", "");
    message = error_of([&] { flasher::prepare_image(tmp / "empty.img", no_notices(), nullptr); });
    CHECK_MESSAGE(message.find("is empty") != std::string::npos, message);
}

TEST_CASE("--log must name a file; a kernel command line arm64 cannot take is refused")
{
    auto r = run_treeflash({"write", "card.img", "/dev/null", "--log", "", "--yes"});
    CHECK(r.exit_code == 2);
    CHECK_MESSAGE(r.err.find("--log: name a file") != std::string::npos, r.err);

    Scratch tmp;
    std::string long_arg = "x=" + std::string(10000, 'y');
    r = run_treeflash({"flash", "--board", "qemu-arm64", "--image", (tmp / "card.img").string(), "--repo",
                       (tmp / "none").string(), "--no-gpg-verify", "--karg", long_arg});
    CHECK(r.exit_code != 0);
    CHECK_MESSAGE(r.err.find("would not boot") != std::string::npos, r.err);
    CHECK(!fs::exists(tmp / "card.img"));
    // What fits passes; the limit counts every argument.
    CHECK_NOTHROW(validate::kernel_command_line({"console=ttyAMA0", std::string(1500, 'a')}, "--karg"));
    // ostree= and init= with a 64-character OS name, and boot counting, still fit beside the most allowed.
    CHECK(error_of([&] { validate::kernel_command_line({std::string(1700, 'a')}, "--karg"); }).find("would not boot")
          != std::string::npos);
    CHECK(error_of([&] { validate::kernel_command_line(std::vector<std::string>(100, std::string(20, 'a')), "--karg"); })
              .find("would not boot")
          != std::string::npos);
}

}
