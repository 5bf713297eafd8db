// Blank ext4 file systems for new images: made by mkfs.ext4 once per size,
// label and options, then copied with a UUID of its own. Checked on image
// files (the partition nodes of a flash are files to this code too) with
// e2fsck and dumpe2fs, against what mkfs.ext4 makes itself.
#include "common/process.hpp"
#include "flasher/disk/blank_ext4.hpp"
#include "flasher/disk/format.hpp"
#include "tests/support/fixtures.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <regex>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::flasher;
using namespace treeflash::test;

namespace {

const std::vector<std::string> ls104x_options{"-b", "4096", "-O", "^64bit,^metadata_csum"};

fs::path new_file(const Scratch& tmp, const std::string& name, uint64_t size)
{
    fs::path file = tmp / name;
    write_file(file, ""); // every byte reads zero, as in a new image
    fs::resize_file(file, size);
    return file;
}

void check_clean(const fs::path& file)
{
    // e2fsck -n exits 0 after some problems it would fix ("Fix? no",
    // "IGNORED"): its answers count too.
    auto check = run_process({"e2fsck", "-fn", file.string()});
    std::string report = file.string() + ": " + check.out + check.err;
    CHECK_MESSAGE(check.exit_code == 0, report);
    CHECK_MESSAGE(report.find("? no") == std::string::npos, report);
    CHECK_MESSAGE(report.find("IGNORED") == std::string::npos, report);
}

// dumpe2fs -h, without what differs between any two file systems mkfs.ext4
// makes from the same arguments (identity, times, journal sequence).
std::string layout_of(const fs::path& file)
{
    auto dump = run_process({"dumpe2fs", "-h", file.string()});
    REQUIRE_MESSAGE(dump.ok(), dump.err);
    std::string kept;
    std::regex varying(R"(^(Filesystem UUID|Directory Hash Seed|Filesystem created|Last |Lifetime writes|Journal sequence|Mount count|Check interval|Next check))");
    std::istringstream lines(dump.out);
    for (std::string line; std::getline(lines, line);)
        if (!std::regex_search(line, varying))
            kept += line + "\n";
    return kept;
}

std::string field(const fs::path& file, const std::string& name)
{
    auto dump = run_process({"dumpe2fs", "-h", file.string()});
    std::smatch match;
    REQUIRE(std::regex_search(dump.out, match, std::regex(name + R"(:\s+(\S+))")));
    return match[1];
}

std::vector<std::string> entries(const fs::path& dir)
{
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir))
        names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
}

} // namespace

TEST_SUITE("format") {

TEST_CASE("a blank file system is mkfs.ext4's own, copied with a UUID and hash seed of its own")
{
    Scratch tmp;
    fs::path cache = tmp / "cache" / "blank-ext4";
    const uint64_t size = 96u << 20;
    fs::path first = new_file(tmp, "first.img", size);
    fs::path second = new_file(tmp, "second.img", size);
    fs::path by_mkfs = new_file(tmp, "mkfs.img", size);

    make_blank_ext4(first.string(), "rootfs", ls104x_options, cache);
    REQUIRE(entries(cache).size() == 1);
    fs::path kept = cache / entries(cache).front();
    CHECK(kept.extension() == ".ext4");
    CHECK((fs::status(cache).permissions() & fs::perms::all) == fs::perms::owner_all);
    struct stat made {};
    REQUIRE(::stat(kept.c_str(), &made) == 0);
    make_blank_ext4(second.string(), "rootfs", ls104x_options, cache);
    CHECK(entries(cache).size() == 1);
    struct stat copied {};
    REQUIRE(::stat(kept.c_str(), &copied) == 0);
    CHECK(copied.st_ino == made.st_ino); // copied, not made again
    // Only what mkfs.ext4 wrote takes room: not the inode tables it zeroed.
    CHECK(copied.st_blocks * 512 < 8u << 20);
    make_ext4(by_mkfs.string(), "rootfs", ls104x_options, true);

    for (const auto& file : {first, second, kept})
        check_clean(file);
    for (const auto& file : {first, second}) {
        FilesystemInfo found = probe_filesystem(file.string());
        CHECK(found.type == "ext4");
        CHECK(found.label == "rootfs");
        CHECK(layout_of(file) == layout_of(by_mkfs));
    }
    CHECK(field(first, "Filesystem UUID") != field(second, "Filesystem UUID"));
    CHECK(field(first, "Filesystem UUID") != field(kept, "Filesystem UUID"));
    CHECK(field(first, "Directory Hash Seed") != field(second, "Directory Hash Seed"));
    CHECK(std::regex_match(field(second, "Filesystem UUID"), std::regex("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")));

    SUBCASE("another size, label or options is another file system")
    {
        fs::path smaller = new_file(tmp, "smaller.img", 64u << 20);
        make_blank_ext4(smaller.string(), "rootfs", ls104x_options, cache);
        fs::path boot = new_file(tmp, "boot.img", size);
        make_blank_ext4(boot.string(), "boot", ls104x_options, cache);
        CHECK(entries(cache).size() == 3);
        CHECK(probe_filesystem(boot.string()).label == "boot");
        CHECK(field(smaller, "Block count") == std::to_string((64u << 20) / 4096));
        check_clean(smaller);
    }
    SUBCASE("a kept file that is not what was kept is made again, and a link is not followed")
    {
        fs::resize_file(kept, 4096);
        fs::path third = new_file(tmp, "third.img", size);
        make_blank_ext4(third.string(), "rootfs", ls104x_options, cache);
        check_clean(third);
        CHECK(fs::file_size(kept) == size);

        fs::path elsewhere = tmp / "elsewhere";
        write_file(elsewhere, "not a file system");
        fs::remove(kept);
        fs::create_symlink(elsewhere, kept);
        fs::path fourth = new_file(tmp, "fourth.img", size);
        make_blank_ext4(fourth.string(), "rootfs", ls104x_options, cache);
        check_clean(fourth);
        CHECK(read_text(elsewhere) == "not a file system");

        // A FIFO does not block it, and a folder in the way (the new one
        // cannot be moved there) leaves the work to mkfs.ext4.
        fs::remove(kept);
        REQUIRE(::mkfifo(kept.c_str(), 0600) == 0);
        fs::path fifth = new_file(tmp, "fifth.img", size);
        make_blank_ext4(fifth.string(), "rootfs", ls104x_options, cache);
        check_clean(fifth);
        fs::remove(kept);
        fs::create_directory(kept);
        fs::path sixth = new_file(tmp, "sixth.img", size);
        make_blank_ext4(sixth.string(), "rootfs", ls104x_options, cache);
        check_clean(sixth);
        CHECK(probe_filesystem(sixth.string()).label == "rootfs");
    }
    SUBCASE("a kept file system that was mounted or changed is not copied on, and is made again")
    {
        auto changed = run_process({"debugfs", "-w", "-R", "ssv mnt_count 3", kept.string()});
        REQUIRE_MESSAGE(changed.ok(), changed.err);
        fs::path third = new_file(tmp, "third.img", size);
        make_blank_ext4(third.string(), "rootfs", ls104x_options, cache);
        check_clean(third);
        CHECK(field(third, "Mount count") == "0");
        CHECK_FALSE(fs::exists(kept)); // removed: the next flash makes it again
    }
}

TEST_CASE("uninit_bg: the group descriptors' checksums follow the new UUID")
{
    Scratch tmp;
    fs::path cache = tmp / "cache";
    const std::vector<std::string> options{"-b", "4096", "-O", "^64bit,^metadata_csum,uninit_bg"};
    fs::path first = new_file(tmp, "first.img", 256u << 20);
    fs::path second = new_file(tmp, "second.img", 256u << 20);
    make_blank_ext4(first.string(), "rootfs", options, cache);
    make_blank_ext4(second.string(), "rootfs", options, cache);
    REQUIRE(entries(cache).size() == 1);
    CHECK(std::regex_search(layout_of(second), std::regex("Filesystem features:[^\n]* uninit_bg")));
    check_clean(second);
    CHECK(field(first, "Filesystem UUID") != field(second, "Filesystem UUID"));
}

TEST_CASE("metadata_csum ties every block to the UUID: mkfs.ext4 formats each image, once told")
{
    Scratch tmp;
    fs::path cache = tmp / "cache";
    const std::vector<std::string> options{"-b", "4096", "-O", "metadata_csum,^metadata_csum_seed"};
    fs::path first = new_file(tmp, "first.img", 64u << 20);
    fs::path second = new_file(tmp, "second.img", 64u << 20);
    make_blank_ext4(first.string(), "rootfs", options, cache);
    auto names = entries(cache);
    REQUIRE(names.size() == 1);
    CHECK(fs::path(names.front()).extension() == ".mkfs");
    make_blank_ext4(second.string(), "rootfs", options, cache);
    CHECK(entries(cache) == names);
    for (const auto& file : {first, second}) {
        check_clean(file);
        CHECK(std::regex_search(layout_of(file), std::regex("Filesystem features:[^\n]* metadata_csum")));
    }
    CHECK(field(first, "Filesystem UUID") != field(second, "Filesystem UUID"));
    CHECK_FALSE(give_new_identity(second.string()));
}

TEST_CASE("a cache folder others can write to is not used, nor one given by a relative path")
{
    Scratch tmp;
    fs::path cache = tmp / "shared";
    fs::create_directories(cache);
    fs::permissions(cache, fs::perms::all);
    fs::path image = new_file(tmp, "image.img", 64u << 20);
    make_blank_ext4(image.string(), "rootfs", ls104x_options, cache);
    check_clean(image);
    CHECK(entries(cache).empty());

    fs::path relative = fs::relative(tmp / "relative", fs::current_path());
    make_blank_ext4(image.string(), "rootfs", ls104x_options, relative);
    CHECK_FALSE(fs::exists(tmp / "relative"));
    check_clean(image);
}

TEST_CASE("a cache folder below someone else's folder is not used: root with a user's HOME" * doctest::skip(!is_root()))
{
    Scratch tmp;
    fs::path home = tmp / "home";
    fs::create_directories(home);
    REQUIRE(::chown(home.c_str(), 4242, 4242) == 0);
    fs::path image = new_file(tmp, "image.img", 64u << 20);
    make_blank_ext4(image.string(), "rootfs", ls104x_options, home / ".cache/treeflash/blank-ext4");
    check_clean(image);
    CHECK_FALSE(fs::exists(home / ".cache")); // nothing made in the user's home
}

TEST_CASE("the cache keeps the 16 most recently used file systems")
{
    Scratch tmp;
    fs::path cache = tmp / "cache";
    for (unsigned i = 0; i < 18; ++i) {
        fs::path image = new_file(tmp, "image.img", (32u + i) << 20);
        make_blank_ext4(image.string(), "rootfs", ls104x_options, cache);
    }
    CHECK(entries(cache).size() == 16);
    // A killed run's leftover is removed once it is an hour old.
    write_file(cache / ".new-0x1", "");
    struct timespec old[2] = {{::time(nullptr) - 7200, 0}, {::time(nullptr) - 7200, 0}};
    REQUIRE(::utimensat(AT_FDCWD, (cache / ".new-0x1").c_str(), old, 0) == 0);
    fs::path image = new_file(tmp, "image.img", 100u << 20);
    make_blank_ext4(image.string(), "rootfs", ls104x_options, cache);
    CHECK_FALSE(fs::exists(cache / ".new-0x1"));
    CHECK(entries(cache).size() == 16);
}

} // TEST_SUITE
