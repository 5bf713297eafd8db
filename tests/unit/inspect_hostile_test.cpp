// inspect against images a hostile tester made: an empty file, files whose
// inodes claim 8 GiB, a GPT header claiming 2^32-1 entries, a GPT entry
// whose byte offsets do not fit in 64 bits. Each gets a clear message or
// warning, never a silent omission or a misreported table. Image files
// only, without root.
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <fstream>
#include <functional>
#include <vector>
#include <zlib.h>

using namespace treeflash;
using namespace treeflash::test;

namespace {

constexpr uint64_t sector = 512;

// A sparse `mib` MiB image holding the table of `script` (sfdisk's format).
fs::path image_with_table(const Scratch& tmp, const std::string& name, uint64_t mib, const std::string& script)
{
    fs::path image = tmp / name;
    std::ofstream(image).close();
    fs::resize_file(image, mib << 20);
    write_file(tmp / (name + ".sfdisk"), script);
    auto r = run_process({"sh", "-c", "sfdisk -q \"$0\" < \"$1\"", image.string(), (tmp / (name + ".sfdisk")).string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    return image;
}

std::vector<unsigned char> read_bytes(std::fstream& f, uint64_t offset, size_t length)
{
    std::vector<unsigned char> bytes(length);
    f.seekg(static_cast<std::streamoff>(offset));
    f.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(length));
    REQUIRE(f.good());
    return bytes;
}

void write_bytes(std::fstream& f, uint64_t offset, const std::vector<unsigned char>& bytes)
{
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(f.good());
}

uint64_t get_le(const std::vector<unsigned char>& b, size_t at, int bytes)
{
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i)
        v = v << 8 | b[at + static_cast<size_t>(i)];
    return v;
}

void put_le(std::vector<unsigned char>& b, size_t at, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; ++i, v >>= 8)
        b[at + static_cast<size_t>(i)] = static_cast<unsigned char>(v & 0xff);
}

uint32_t crc(const std::vector<unsigned char>& b, size_t length)
{
    return static_cast<uint32_t>(::crc32(::crc32(0L, Z_NULL, 0), b.data(), static_cast<uInt>(length)));
}

// Edits both GPT headers of `image` (primary at LBA 1, backup at the last
// LBA) and their entry arrays, then recomputes every checksum, so that
// libfdisk sees exactly the hostile values and nothing else wrong.
void edit_gpt(const fs::path& image, const std::function<void(std::vector<unsigned char>& header,
                                                              std::vector<unsigned char>& entries)>& edit)
{
    uint64_t last = fs::file_size(image) / sector - 1;
    std::fstream f(image, std::ios::in | std::ios::out | std::ios::binary);
    for (uint64_t lba : {uint64_t {1}, last}) {
        auto header = read_bytes(f, lba * sector, 92);
        REQUIRE(std::string(header.begin(), header.begin() + 8) == "EFI PART");
        uint64_t entries_lba = get_le(header, 72, 8);
        auto entries = read_bytes(f, entries_lba * sector, get_le(header, 80, 4) * get_le(header, 84, 4));
        edit(header, entries);
        write_bytes(f, entries_lba * sector, entries);
        put_le(header, 88, crc(entries, entries.size()), 4);
        put_le(header, 16, 0, 4);
        put_le(header, 16, crc(header, header.size()), 4);
        write_bytes(f, lba * sector, header);
    }
}

} // namespace

TEST_SUITE("safety") {

TEST_CASE("inspect of an empty image says it is empty")
{
    Scratch tmp;
    fs::path image = tmp / "card.img";
    std::ofstream(image).close();
    auto r = run_treeflash({"inspect", image.string()});
    CHECK_FALSE(r.ok());
    CHECK_MESSAGE(r.err.find("card.img is empty (0 bytes): not an image") != std::string::npos, r.err);
    CHECK_MESSAGE(r.err.find("Invalid argument") == std::string::npos, r.err);

    // Less than a sector: named too, not "Invalid argument".
    write_file(image, std::string(100, '\0'));
    r = run_treeflash({"inspect", image.string(), "--json"});
    CHECK_FALSE(r.ok());
    CHECK_MESSAGE(r.err.find("card.img is 100 bytes, less than one 512-byte sector") != std::string::npos, r.err);
}

TEST_CASE("inspect warns about a loader entry or uEnv.txt whose inode claims 8 GiB")
{
    Scratch tmp;
    const std::string commit(64, 'c'), bootcsum(64, 'b');
    fs::path rootfs = tmp / "rootfs";
    fs::create_directories(rootfs / "ostree/repo");
    fs::create_directories(rootfs / "boot/loader.0/entries");
    fs::create_symlink("loader.0", rootfs / "boot/loader");
    fs::create_directories(rootfs / "ostree/boot.0.0/tcu" / bootcsum);
    fs::create_symlink("boot.0.0", rootfs / "ostree/boot.0");
    fs::create_symlink("../../../deploy/tcu/deploy/" + commit + ".0", rootfs / "ostree/boot.0.0/tcu" / bootcsum / "0");
    fs::create_directories(rootfs / "ostree/deploy/tcu/deploy" / (commit + ".0"));
    write_file(rootfs / "boot/loader.0/entries/ostree-1.conf", "version 1\noptions ostree=/ostree/boot.0/tcu/" + bootcsum + "/0\n");
    write_file(rootfs / "boot/loader.0/uEnv.txt", "bootargs=console=ttyS0\n");
    fs::path image = image_with_table(tmp, "card.img", 24, "label: dos\nstart=1MiB, size=16MiB\n");
    auto made = run_process({"mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", rootfs.string(), "-E", "offset=1048576",
                             image.string(), "16M"});
    REQUIRE_MESSAGE(made.ok(), made.err);

    // As made: one deployment, the bootargs, no warning.
    auto before = run_treeflash({"inspect", image.string(), "--json"});
    REQUIRE_MESSAGE(before.ok(), before.err);
    auto report = nlohmann::json::parse(before.out);
    REQUIRE(report["deployments"].size() == 1);
    REQUIRE(report["uenv"]["bootargs"] == "console=ttyS0");
    REQUIRE(report["warnings"].empty());

    for (const char* file : {"boot/loader.0/entries/ostree-1.conf", "boot/loader.0/uEnv.txt"}) {
        auto inflated = run_process({"debugfs", "-w", "-R", std::string("sif ") + file + " size 8589934592",
                                     image.string() + "?offset=1048576"});
        REQUIRE_MESSAGE(inflated.ok(), inflated.err);
    }
    auto json_run = run_treeflash({"inspect", image.string(), "--json"});
    REQUIRE_MESSAGE(json_run.ok(), json_run.err);
    report = nlohmann::json::parse(json_run.out);
    CHECK(report["deployments"].empty());
    CHECK(report["uenv"].empty());
    const std::string entry_warning =
        "boot/loader.0/entries/ostree-1.conf claims 8192 MiB, more than a loader entry can be; ignored";
    const std::string uenv_warning = "boot/loader.0/uEnv.txt claims 8192 MiB, more than a uEnv.txt can be; ignored";
    CHECK(report["warnings"] == nlohmann::json::array({entry_warning, uenv_warning}));

    auto text_run = run_treeflash({"inspect", image.string()});
    REQUIRE_MESSAGE(text_run.ok(), text_run.err);
    CHECK_MESSAGE(text_run.out.find("warning: " + entry_warning + "\n") != std::string::npos, text_run.out);
    CHECK_MESSAGE(text_run.out.find("warning: " + uenv_warning + "\n") != std::string::npos, text_run.out);
}

TEST_CASE("inspect refuses a GPT whose header claims 0xFFFFFFFF entries instead of calling it dos")
{
    Scratch tmp;
    fs::path image = image_with_table(tmp, "card.img", 16, "label: gpt\nstart=2048, size=4096\n");
    edit_gpt(image, [](std::vector<unsigned char>& header, std::vector<unsigned char>&) {
        put_le(header, 80, 0xFFFFFFFF, 4);
    });
    for (const char* format : {"--json", ""}) {
        std::vector<std::string> args = {"inspect", image.string()};
        if (*format)
            args.push_back(format);
        auto r = run_treeflash(args);
        CHECK_FALSE(r.ok());
        CHECK(r.out.find("dos") == std::string::npos);
        CHECK_MESSAGE(r.err.find("its protective MBR announces a GPT, but the GPT is invalid: primary header (LBA 1): "
                                 "entry count 4294967295 out of range")
                          != std::string::npos,
                      r.err);
        CHECK_MESSAGE(r.err.find("backup header (LBA 32767): entry count 4294967295 out of range") != std::string::npos, r.err);
    }
}

TEST_CASE("inspect refuses a GPT entry ending at LBA 2^63-1 with figures that do not wrap")
{
    Scratch tmp;
    fs::path image = image_with_table(tmp, "card.img", 16, "label: gpt\nstart=2048, size=4096\n");
    edit_gpt(image, [](std::vector<unsigned char>&, std::vector<unsigned char>& entries) {
        put_le(entries, 40, (uint64_t {1} << 63) - 1, 8); // the first entry's last LBA
    });
    auto r = run_treeflash({"inspect", image.string(), "--json"});
    CHECK_FALSE(r.ok());
    CHECK_MESSAGE(r.err.find("partition 1 starts at sector 2048 and holds 9223372036854773760 sectors of 512 bytes: "
                             "it ends past 2^64 bytes, far outside the disk (32768 sectors)")
                      != std::string::npos,
                  r.err);
    // The wrapped figure (9223372036854773760 * 512 mod 2^64) appears nowhere.
    CHECK(r.out.find("18446744073708503040") == std::string::npos);
}

} // TEST_SUITE
