// Block maps: the same ranges and checksums as bmap-tools makes, and files
// bmaptool copies from (it checks every range and the file's own checksum).
#include "common/error.hpp"
#include "flasher/write/bmap.hpp"
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <regex>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;

namespace {

// Data at `offset` in a sparse file.
void put(const fs::path& file, uint64_t offset, const std::string& data)
{
    int fd = ::open(file.c_str(), O_WRONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset)) == static_cast<ssize_t>(data.size()));
    ::close(fd);
}

// What a bmap says, whoever wrote it: the numbers and "first-last sha256" lines.
std::string essentials(const std::string& xml)
{
    std::string out;
    static const std::regex field(R"(<(ImageSize|BlockSize|BlocksCount|MappedBlocksCount|ChecksumType)>\s*(\S+)\s*<)");
    for (std::sregex_iterator it(xml.begin(), xml.end(), field), end; it != end; ++it)
        out += (*it)[1].str() + "=" + (*it)[2].str() + "\n";
    static const std::regex range(R"xx(<Range chksum="([0-9a-f]+)">\s*([0-9]+)(-([0-9]+))?\s*</Range>)xx");
    for (std::sregex_iterator it(xml.begin(), xml.end(), range), end; it != end; ++it)
        out += (*it)[2].str() + "-" + ((*it)[4].matched ? (*it)[4].str() : (*it)[2].str()) + " " + (*it)[1].str() + "\n";
    return out;
}

} // namespace

TEST_SUITE("bmap") {

TEST_CASE("treeflash bmap maps what bmaptool create maps, and bmaptool copy accepts it")
{
    Scratch tmp;
    fs::path image = tmp / "card.img";
    write_file(image, "");
    fs::resize_file(image, (64 << 20) + 1000); // not a whole number of blocks
    put(image, 0, std::string(512, 'm'));                       // a partition table
    put(image, 4096 * 3 + 100, std::string(10000, 'a'));        // across block boundaries
    put(image, 20 << 20, std::string(3 << 20, 'b'));            // a large extent
    put(image, (64 << 20) + 10, std::string(900, 'z'));         // the partial last block

    auto ours = run_treeflash({"bmap", image.string(), "-o", (tmp / "ours.bmap").string(), "--json"});
    REQUIRE_MESSAGE(ours.ok(), ours.err);
    auto theirs = run_process({"bmaptool", "create", "-o", (tmp / "theirs.bmap").string(), image.string()});
    REQUIRE_MESSAGE(theirs.ok(), theirs.err);
    std::string mine = essentials(read_text(tmp / "ours.bmap"));
    CHECK(mine.find("ImageSize=67109864") != std::string::npos);
    CHECK(mine == essentials(read_text(tmp / "theirs.bmap")));

    // bmaptool writes from it, checking each range and the bmap's own checksum.
    fs::path copy = tmp / "copy.img";
    auto copied = run_process({"bmaptool", "copy", "--bmap", (tmp / "ours.bmap").string(), image.string(), copy.string()});
    REQUIRE_MESSAGE(copied.ok(), copied.err);
    CHECK(run_process({"cmp", image.string(), copy.string()}).ok());

    // A bmap edited after it was made fails bmaptool's own check.
    std::string edited = read_text(tmp / "ours.bmap");
    edited.replace(edited.find("<BlockMap>"), 10, "<BlockMap> ");
    write_file(tmp / "edited.bmap", edited);
    auto refused = run_process({"bmaptool", "copy", "--bmap", (tmp / "edited.bmap").string(), image.string(),
                                (tmp / "copy2.img").string()});
    CHECK_FALSE(refused.ok());
}

TEST_CASE("a long extent is mapped in adjacent pieces of at most 16 MiB, which bmaptool copies the same")
{
    Scratch tmp;
    fs::path image = tmp / "card.img";
    write_file(image, "");
    fs::resize_file(image, 64 << 20);
    put(image, 1 << 20, std::string(40 << 20, 'c')); // blocks 256 to 10495

    auto ours = run_treeflash({"bmap", image.string(), "-o", (tmp / "ours.bmap").string()});
    REQUIRE_MESSAGE(ours.ok(), ours.err);
    auto theirs = run_process({"bmaptool", "create", "-o", (tmp / "theirs.bmap").string(), image.string()});
    REQUIRE_MESSAGE(theirs.ok(), theirs.err);
    // bmaptool: one range; treeflash: the same blocks cut after 16 MiB and 32 MiB.
    std::string mine = essentials(read_text(tmp / "ours.bmap"));
    std::string reference = essentials(read_text(tmp / "theirs.bmap"));
    CHECK(reference.find("\n256-10495 ") != std::string::npos);
    CHECK(mine.find("MappedBlocksCount=10240\n") != std::string::npos);
    CHECK(reference.find("MappedBlocksCount=10240\n") != std::string::npos);
    CHECK(mine.find("\n256-4351 ") != std::string::npos);
    CHECK(mine.find("\n4352-8447 ") != std::string::npos);
    CHECK(mine.find("\n8448-10495 ") != std::string::npos);
    CHECK(mine.find("256-10495") == std::string::npos);
    // The first two pieces hold the same bytes, so the same checksum.
    std::regex piece(R"(\n256-4351 ([0-9a-f]{64})\n4352-8447 ([0-9a-f]{64})\n)");
    std::smatch sums;
    REQUIRE(std::regex_search(mine, sums, piece));
    CHECK(sums[1].str() == sums[2].str());

    fs::path copy = tmp / "copy.img";
    auto copied = run_process({"bmaptool", "copy", "--bmap", (tmp / "ours.bmap").string(), image.string(), copy.string()});
    REQUIRE_MESSAGE(copied.ok(), copied.err);
    CHECK(run_process({"cmp", image.string(), copy.string()}).ok());
    // And treeflash's own reader takes it, and checks every piece.
    flasher::Bmap read = flasher::read_bmap(tmp / "ours.bmap");
    CHECK(read.ranges.size() == 3);
    CHECK(read.mapped_blocks == 10240);
    int fd = ::open(image.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    CHECK_NOTHROW(flasher::check_image_against_bmap(fd, read, image.string()));
    put(image, 40 << 20, "changed"); // inside the last piece
    CHECK_THROWS_WITH_AS(flasher::check_image_against_bmap(fd, read, image.string()), doctest::Contains("8448-10495"),
                         Error);
    ::close(fd);
}

TEST_CASE("an image without data maps to nothing; a missing one is named")
{
    Scratch tmp;
    write_file(tmp / "empty.img", "");
    fs::resize_file(tmp / "empty.img", 8 << 20);
    flasher::Bmap map = flasher::map_image(tmp / "empty.img");
    CHECK(map.mapped_blocks == 0);
    CHECK(map.blocks_count == 2048);
    auto missing = run_treeflash({"bmap", (tmp / "nope.img").string()});
    CHECK(missing.exit_code == 1);
    CHECK(missing.err.find("nope.img") != std::string::npos);
}

TEST_CASE("bmaps bmaptool made are read as bmaptool reads them; damaged or foreign ones are refused")
{
    Scratch tmp;
    fs::path image = tmp / "card.img";
    write_file(image, "");
    fs::resize_file(image, 32 << 20);
    put(image, 0, std::string(512, 'm'));
    put(image, 5 << 20, std::string(300000, 'd'));
    put(image, (31 << 20) + 7, "tail");
    auto made = run_process({"bmaptool", "create", "-o", (tmp / "theirs.bmap").string(), image.string()});
    REQUIRE_MESSAGE(made.ok(), made.err);

    // Theirs names every field in its comments too; the values come from the elements.
    flasher::Bmap map = flasher::read_bmap(tmp / "theirs.bmap");
    CHECK(map.image_size == (32u << 20));
    CHECK(map.blocks_count == 8192);
    std::string listed;
    for (const auto& r : map.ranges)
        listed += std::to_string(r.first) + "-" + std::to_string(r.last) + " " + r.sha256 + "\n";
    std::string theirs = essentials(read_text(tmp / "theirs.bmap"));
    CHECK(theirs.substr(theirs.find("ChecksumType=sha256\n") + 20) == listed);
    {
        int fd = ::open(image.c_str(), O_RDONLY | O_CLOEXEC);
        CHECK_NOTHROW(flasher::check_image_against_bmap(fd, map, "card.img"));
        ::close(fd);
    }

    // The image changed after its bmap was made: the range is named.
    put(image, (5 << 20) + 10, "X");
    {
        int fd = ::open(image.c_str(), O_RDONLY | O_CLOEXEC);
        CHECK_THROWS_WITH_AS(flasher::check_image_against_bmap(fd, map, "card.img"),
                             doctest::Contains("bytes 5242880-"), Error);
        ::close(fd);
    }

    std::string text = read_text(tmp / "theirs.bmap");
    auto refused = [&](std::string edited, const std::string& why) {
        write_file(tmp / "edited.bmap", edited);
        CHECK_THROWS_WITH_AS(flasher::read_bmap(tmp / "edited.bmap"), doctest::Contains(why.c_str()), Error);
    };
    // One block number changed by hand: the file's own checksum no longer holds.
    std::string edited = text;
    edited.replace(edited.find("<ImageSize> "), 13, "<ImageSize> 9");
    refused(edited, "damaged");
    refused(std::string("<?xml version=\"1.0\" ?>\n<bmap version=\"1.4\">\n</bmap>\n"), "version 1.4");
    refused("not xml at all", "not a bmap file");
}

}
