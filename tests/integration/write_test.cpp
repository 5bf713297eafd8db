// treeflash write on real loop devices: images raw and compressed, our
// bmaps and bmaptool's, cards that are too small, fail mid-write, change
// under the read-back or are interrupted; checked with cmp, sfdisk,
// e2fsck and the cards' own bytes. Needs root; every test skips otherwise.
#include "common/error.hpp"
#include "flasher/write/write.hpp"
#include "tests/support/system.hpp"

#include <condition_variable>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <gio/gio.h>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sys/mount.h>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using nlohmann::json;

namespace {

const bool not_root = !is_root();
constexpr uint64_t MiB = 1 << 20;

void put(const fs::path& file, uint64_t offset, const std::string& data)
{
    int fd = ::open(file.c_str(), O_WRONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset)) == static_cast<ssize_t>(data.size()));
    ::fsync(fd);
    ::close(fd);
}

std::string pattern(size_t size, unsigned seed)
{
    std::string data(size, '\0');
    uint32_t x = seed * 2654435761u + 1;
    for (auto& c : data) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        c = static_cast<char>(x);
    }
    return data;
}

// A 192 MiB sparse image as a board's would be: a dos table, p1 (1-64 MiB)
// holding 30 MiB of raw data (firmware, say), p2 an empty ext4; with its
// bmap beside it (IMAGE.bmap).
fs::path make_image(const fs::path& dir, unsigned seed = 1)
{
    fs::path image = dir / "card.img";
    write_file(image, "");
    fs::resize_file(image, 192 * MiB);
    auto table = run_process({"sh", "-c", "printf 'label: dos\\nstart=2048, size=129024, type=83\\nstart=131072, type=83\\n' | sfdisk -q " + image.string()});
    REQUIRE_MESSAGE(table.ok(), table.err);
    auto mkfs = run_process({"mkfs.ext4", "-q", "-F", "-L", "rootfs", "-E", "offset=" + std::to_string(64 * MiB),
                             image.string(), "128M"});
    REQUIRE_MESSAGE(mkfs.ok(), mkfs.err);
    put(image, 2 * MiB, pattern(30 * MiB, seed));
    auto bmap = run_treeflash({"bmap", image.string()});
    REQUIRE_MESSAGE(bmap.ok(), bmap.err);
    return image;
}

uint64_t mapped_bytes(const fs::path& image)
{
    auto r = run_treeflash({"bmap", image.string(), "-o", (image.parent_path() / "probe.bmap").string(), "--json"});
    REQUIRE_MESSAGE(r.ok(), r.err);
    return json::parse(r.out)["mapped_bytes"].get<uint64_t>();
}

// A card: a file of `size` bytes (zeros, or an old table when `old_table`).
fs::path make_card(const fs::path& file, uint64_t size, bool old_table = false)
{
    write_file(file, "");
    fs::resize_file(file, size);
    if (old_table) {
        put(file, 0, pattern(MiB, 99)); // old firmware, then an old table over it
        auto r = run_process({"sh", "-c", "printf 'label: dos\\nstart=4096, size=8192, type=c\\n' | sfdisk -q --wipe never " + file.string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
    }
    return file;
}

bool same_bytes(const fs::path& image, const fs::path& card)
{
    return run_process({"cmp", "-n", std::to_string(fs::file_size(image)), image.string(), card.string()}).ok();
}

ProcessResult write(const std::vector<std::string>& args)
{
    std::vector<std::string> all{"write", "--yes", "--force", "--json"};
    all.insert(all.end(), args.begin(), args.end());
    return run_treeflash(all);
}

flasher::WriteOptions library_options(const fs::path& image, const std::vector<std::string>& devices)
{
    flasher::WriteOptions options;
    options.image = image;
    options.devices = devices;
    options.force = true; // loop devices are not removable
    return options;
}

} // namespace

TEST_SUITE("write") {

TEST_CASE("a raw and a zstd image, each written to two loop devices at once, byte for byte" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    uint64_t mapped = mapped_bytes(image);
    auto zst = run_process({"zstd", "-q", image.string(), "-o", (tmp / "card.img.zst").string()});
    REQUIRE_MESSAGE(zst.ok(), zst.err);

    for (const std::string& source : {"card.img", "card.img.zst"}) {
        CAPTURE(source);
        fs::path a = make_card(tmp / ("a-" + source), 256 * MiB), b = make_card(tmp / ("b-" + source), 300 * MiB);
        LoopGuard la(a), lb(b);
        auto r = write({(tmp / source).string(), la.device, lb.device});
        REQUIRE_MESSAGE(r.ok(), r.err);
        auto cards = json::parse(r.out);
        REQUIRE(cards.size() == 2);
        for (const auto& card : cards) {
            CHECK(card["ok"] == true);
            CHECK(card["verified"] == true);
            CHECK(card["error"].is_null());
            CHECK(card["bytes_written"] == mapped); // only the mapped blocks
        }
        CHECK(cards[0]["device"] == la.device);
        CHECK(cards[1]["size"] == 300 * MiB);
        CHECK(same_bytes(image, a));
        CHECK(same_bytes(image, b));
        // The kernel shows the image's partitions, not the card's old ones.
        CHECK(fs::exists(la.device + "p2"));
        CHECK(run_process({"blkid", "-s", "LABEL", "-o", "value", lb.device + "p2"}).out == "rootfs\n");
    }
}

TEST_CASE("without a bmap the image's holes are skipped; plain progress has no escape codes" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    uint64_t mapped = mapped_bytes(image);
    fs::remove(tmp / "card.img.bmap");
    fs::remove(tmp / "probe.bmap");
    fs::path a = make_card(tmp / "a", 256 * MiB);
    LoopGuard la(a);
    auto r = run_treeflash({"write", "--yes", "--force", image.string(), la.device});
    REQUIRE_MESSAGE(r.ok(), r.err);
    CHECK(same_bytes(image, a));
    CHECK(r.out.find('\x1b') == std::string::npos);
    CHECK(r.out.find(la.device + "  writing") != std::string::npos);
    CHECK(r.out.find(la.device + "  ok  " + std::to_string(mapped >> 20) + " MiB written") != std::string::npos);
    CHECK(r.out.find("verified") != std::string::npos);
}

TEST_CASE("bmaptool's bmap is read, and bmaptool copies with ours" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    auto created = run_process({"bmaptool", "create", "-o", (tmp / "theirs.bmap").string(), image.string()});
    REQUIRE_MESSAGE(created.ok(), created.err);
    fs::path a = make_card(tmp / "a", 256 * MiB);
    LoopGuard la(a);
    auto r = write({image.string(), la.device, "--bmap", (tmp / "theirs.bmap").string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    CHECK(same_bytes(image, a));

    // Ours, beside card.img, as bmaptool finds it for card.img.xz.
    auto xz = run_process({"xz", "-T2", "-1", "-k", image.string()});
    REQUIRE_MESSAGE(xz.ok(), xz.err);
    fs::path b = make_card(tmp / "b", 256 * MiB);
    LoopGuard lb(b);
    auto copied = run_process({"bmaptool", "copy", (tmp / "card.img.xz").string(), lb.device});
    REQUIRE_MESSAGE(copied.ok(), copied.err);
    CHECK(copied.err.find("card.img.bmap") != std::string::npos);
    CHECK(same_bytes(image, b));
}

TEST_CASE("a card smaller than the image is refused untouched; the other is written" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    fs::path small = make_card(tmp / "small", 128 * MiB, true), big = make_card(tmp / "big", 256 * MiB);
    std::string before = sha256sum_files({small});
    LoopGuard ls(small), lb(big);
    auto r = write({image.string(), ls.device, lb.device});
    CHECK(r.exit_code == 1);
    auto cards = json::parse(r.out);
    CHECK(cards[0]["ok"] == false);
    CHECK(cards[0]["bytes_written"] == 0);
    CHECK(cards[0]["error"].get<std::string>().find("too small") != std::string::npos);
    CHECK(cards[1]["ok"] == true);
    CHECK(same_bytes(image, big));
    CHECK(sha256sum_files({small}) == before);
}

TEST_CASE("a card that fails mid-write is reported and the other finishes verified" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    SmallTmpfs tiny(12 * MiB); // the card's file can hold 12 MiB: writes past that fail
    fs::path failing = make_card(tiny.dir / "failing", 256 * MiB), good = make_card(tmp / "good", 256 * MiB);
    {
        LoopGuard lf(failing), lg(good);
        auto r = write({image.string(), lf.device, lg.device});
        CHECK(r.exit_code == 1);
        auto cards = json::parse(r.out);
        REQUIRE(cards.size() == 2);
        CHECK(cards[0]["device"] == lf.device);
        CHECK(cards[0]["ok"] == false);
        CHECK(cards[0]["verified"] == false);
        CHECK(cards[0]["error"].get<std::string>().find("write " + lf.device) != std::string::npos);
        CHECK(cards[1]["ok"] == true);
        CHECK(cards[1]["verified"] == true);
        CHECK(r.out.find(lf.device) != std::string::npos);
    }
    CHECK(same_bytes(image, good));
    // It failed before its first MiB: the card shows no table.
    CHECK(read_bytes(failing, 510, 2) != std::string("\x55\xaa", 2));
}

TEST_CASE("a byte changed on one card between write and read-back is found and named" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    fs::path a = make_card(tmp / "a", 256 * MiB), b = make_card(tmp / "b", 256 * MiB);
    LoopGuard la(a), lb(b);
    const uint64_t at = 7 * MiB + 1234;
    std::string original = read_bytes(image, at, 1);
    auto options = library_options(image, {la.device, lb.device});
    // A second writer, straight into the card's backing file, once card 0 is written.
    options.progress = [&](const flasher::CardProgress& p) {
        if (p.card == 0 && p.phase == flasher::CardPhase::Verifying && p.done == 0)
            put(a, at, std::string(1, static_cast<char>(~original[0])));
    };
    GCancellable* cancellable = g_cancellable_new();
    flasher::WriteReport report = flasher::write_cards(options, cancellable);
    g_object_unref(cancellable);
    REQUIRE(report.cards.size() == 2);
    CHECK_FALSE(report.all_ok());
    CHECK_FALSE(report.cards[0].verified);
    CHECK(report.cards[0].error.find("bytes " + std::to_string(at) + "-" + std::to_string(at)) != std::string::npos);
    CHECK(report.cards[1].ok());
    CHECK(report.cards[1].verified);
}

TEST_CASE("interrupted mid-write, every card keeps its old first MiB and table" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    fs::path a = make_card(tmp / "a", 256 * MiB, true), b = make_card(tmp / "b", 256 * MiB, true);
    std::string head_a = read_bytes(a, 0, MiB), head_b = read_bytes(b, 0, MiB);
    LoopGuard la(a), lb(b);
    auto options = library_options(image, {la.device, lb.device});
    GCancellable* cancellable = g_cancellable_new();
    // What Ctrl-C does (the signal thread cancels), once 8 MiB are on each
    // card. A card that gets there first waits for the other (progress comes
    // from the card's own thread), so neither can finish on a busy machine
    // where one card's thread runs far ahead.
    std::mutex lock;
    std::condition_variable both_there;
    std::set<size_t> there;
    options.progress = [&](const flasher::CardProgress& p) {
        if (p.phase != flasher::CardPhase::Writing || p.done < 8 * MiB)
            return;
        std::unique_lock held(lock);
        if (!there.insert(p.card).second)
            return;
        if (there.size() == 2) {
            g_cancellable_cancel(cancellable);
            both_there.notify_all();
        } else {
            both_there.wait_for(held, std::chrono::seconds(60), [&] { return there.size() == 2; });
        }
    };
    flasher::WriteReport report = flasher::write_cards(options, cancellable);
    g_object_unref(cancellable);
    CHECK(report.cancelled);
    for (const auto& card : report.cards) {
        CHECK_FALSE(card.ok());
        CHECK(card.error.find("first MiB was not written") != std::string::npos);
        CHECK(card.bytes_written < mapped_bytes(image));
    }
    CHECK(read_bytes(a, 0, MiB) == head_a);
    CHECK(read_bytes(b, 0, MiB) == head_b);
    CHECK(run_process({"sfdisk", "-d", a.string()}).out.find("start=        4096, size=        8192, type=c") != std::string::npos);
}

TEST_CASE("a bmap that does not match the image is refused before any card is touched" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    Scratch other_dir;
    fs::path other = make_image(other_dir.path(), 2); // same layout, other data
    fs::path a = make_card(tmp / "a", 256 * MiB, true);
    std::string before = sha256sum_files({a});
    LoopGuard la(a);
    // Raw: the image changed after its bmap was made.
    put(image, 3 * MiB, "changed");
    auto raw = write({image.string(), la.device});
    CHECK(raw.exit_code == 1);
    CHECK(raw.err.find("does not match its bmap") != std::string::npos);
    CHECK(raw.err.find("nothing was written") != std::string::npos);
    // Compressed: another image's bmap.
    auto zst = run_process({"zstd", "-q", image.string(), "-o", (tmp / "card.img.zst").string()});
    REQUIRE(zst.ok());
    auto compressed = write({(tmp / "card.img.zst").string(), la.device, "--bmap", (other_dir / "card.img.bmap").string()});
    CHECK(compressed.exit_code == 1);
    CHECK(compressed.err.find("does not match its bmap") != std::string::npos);
    CHECK(sha256sum_files({a}) == before);
}

TEST_CASE("--log appends a line per card; SHA256SUMS beside the image is checked" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    auto zst = run_process({"zstd", "-q", image.string(), "-o", (tmp / "card.img.zst").string()});
    REQUIRE(zst.ok());
    auto sums = run_process({"sh", "-c", "cd " + tmp.path().string() + " && sha256sum card.img.zst card.img.bmap > SHA256SUMS"});
    REQUIRE(sums.ok());
    std::string zst_sum = read_text(tmp / "SHA256SUMS").substr(0, 64);
    fs::path a = make_card(tmp / "a", 256 * MiB), b = make_card(tmp / "b", 256 * MiB);
    LoopGuard la(a), lb(b);
    fs::path log = tmp / "cards.jsonl";
    write_file(log, "{\"earlier\":true}\n");
    auto r = write({(tmp / "card.img.zst").string(), la.device, lb.device, "--log", log.string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    CHECK(r.err.find("against " + (tmp / "SHA256SUMS").string()) != std::string::npos);
    std::vector<json> lines;
    std::istringstream in(read_text(log));
    for (std::string line; std::getline(in, line);)
        lines.push_back(json::parse(line));
    REQUIRE(lines.size() == 3);
    CHECK(lines[0]["earlier"] == true);
    for (size_t i = 1; i < 3; ++i) {
        CHECK(lines[i]["image_sha256"] == zst_sum);
        CHECK(lines[i]["result"] == "ok");
        CHECK(lines[i]["time"].get<std::string>().size() == 20);
        CHECK(lines[i].contains("serial"));
        CHECK(lines[i]["commit"].is_null()); // no OSTree sysroot in this image
    }
    CHECK(lines[2]["device"] == lb.device);

    // The same image compressed again, harder: other bytes than the sums list. Refused, nothing written.
    auto again = run_process({"zstd", "-q", "-f", "-1", image.string(), "-o", (tmp / "card.img.zst").string()});
    REQUIRE(again.ok());
    fs::path c = make_card(tmp / "c", 256 * MiB, true);
    std::string before = sha256sum_files({c});
    LoopGuard lc(c);
    auto refused = write({(tmp / "card.img.zst").string(), lc.device});
    CHECK(refused.exit_code == 1);
    CHECK(refused.err.find("does not match " + (tmp / "SHA256SUMS").string()) != std::string::npos);
    CHECK(sha256sum_files({c}) == before);
}

TEST_CASE("refusals: a device twice, a partition, no answer without --yes" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = make_image(tmp.path());
    fs::path a = make_card(tmp / "a", 256 * MiB, true);
    std::string before = sha256sum_files({a});
    LoopGuard la(a);
    auto twice = write({image.string(), la.device, la.device});
    CHECK(twice.exit_code == 1);
    CHECK(twice.err.find("named twice") != std::string::npos);
    auto partition = write({image.string(), la.device + "p1"});
    CHECK(partition.exit_code == 1);
    CHECK(partition.err.find("is a partition") != std::string::npos);
    auto unasked = run_treeflash({"write", "--force", image.string(), la.device});
    CHECK(unasked.exit_code == 2);
    CHECK(unasked.err.find("--yes") != std::string::npos);
    CHECK(unasked.err.find(la.device) != std::string::npos); // the list of targets came first
    CHECK(sha256sum_files({a}) == before);
}

TEST_CASE("flash --compress publishes; write --grow fills the card: e2fsck clean, inspect shows it" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    std::string commit = build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "golden.img";
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(), "--repo",
                                  (tmp / "repo").string(), "--size", "256M", "--compress", "zst", "--json"});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);
    auto published = json::parse(flashed.out);
    CHECK(published["compressed"] == (tmp / "golden.img.zst").string());
    CHECK(published["sha256sums"] == (tmp / "SHA256SUMS").string());
    // What CI publishes checks out with the standard tools.
    auto sums = run_process({"sh", "-c", "cd " + tmp.path().string() + " && sha256sum -c SHA256SUMS"});
    CHECK_MESSAGE(sums.ok(), sums.out << sums.err);
    CHECK(sums.out == "golden.img.bmap: OK\ngolden.img.zst: OK\n");
    auto decompressed = run_process({"sh", "-c", "zstd -dc " + (tmp / "golden.img.zst").string() + " | cmp - " + image.string()});
    CHECK_MESSAGE(decompressed.ok(), decompressed.out << decompressed.err);

    fs::path card = make_card(tmp / "card", 512 * MiB);
    LoopGuard lc(card);
    auto r = write({(tmp / "golden.img.zst").string(), lc.device, "--grow", "--log", (tmp / "cards.jsonl").string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    // The log names the commit the image holds (read from its ext4, not mounted).
    json logged = json::parse(read_text(tmp / "cards.jsonl"));
    CHECK(logged["commit"] == commit);
    CHECK(r.err.find("checked " + (tmp / "golden.img.zst").string() + " against") != std::string::npos);
    uint64_t grown = json::parse(r.out)[0]["grown_partition_size"].get<uint64_t>();
    CHECK(grown == 512 * MiB - 160 * MiB); // p3 starts at 160 MiB
    auto fsck = run_process({"e2fsck", "-fn", lc.device + "p3"});
    CHECK_MESSAGE(fsck.exit_code == 0, fsck.out);
    auto blocks = run_process({"dumpe2fs", "-h", lc.device + "p3"});
    CHECK(blocks.out.find("Block count:              " + std::to_string(grown / 4096)) != std::string::npos);
    auto inspected = run_treeflash({"inspect", lc.device, "--json"});
    REQUIRE_MESSAGE(inspected.ok(), inspected.err);
    auto info = json::parse(inspected.out);
    CHECK(info["partitions"][2]["size"] == grown);
    CHECK(info["deployments"].size() == 1);
}

}
