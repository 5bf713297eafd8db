// treeflash station as a line uses it, on loop devices as card readers: a
// slot is a loop device; a card is put in by attaching its file, and taken
// out by attaching an empty file again (a reader without media has size 0).
// Cards go in and out of four slots at random times; one is too small, one
// fails mid-write (its file lives on a full tmpfs), one comes back after it
// was done. Checked: the log, the journal, and every good card (inspect, the
// card's own bytes, e2fsck). Needs root; runs alone (CTest RUN_SERIAL).
#include "flasher/inspect/ext4_reader.hpp"
#include "tests/support/postgres.hpp"
#include "tests/support/system.hpp"

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <doctest/doctest.h>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using nlohmann::json;

namespace {

const bool not_root = !is_root();
constexpr uint64_t MiB = 1 << 20;

// A card reader's slot: a loop device over an empty file while it holds no
// card (size 0, as a reader without media reads). A card is put in by
// attaching its file instead, and taken out by attaching the empty file
// again: the device is never left unbound, where another process's
// `losetup -f` could take it.
struct Slot {
    fs::path empty;
    std::string device;
    explicit Slot(const fs::path& empty_file) : empty(empty_file)
    {
        auto r = run_process({"losetup", "-f", "--show", empty.string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
        device = r.out.substr(0, r.out.find('\n'));
    }
    ~Slot() { run_process({"losetup", "-d", device}); }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

    bool insert(const fs::path& card) const { return swap(card); }
    bool remove() const { return swap(empty); }

private:
    // The station's brief looks at the slot defer a detach until it closes
    // the device: retried until the new file is attached.
    bool swap(const fs::path& file) const
    {
        for (int i = 0; i < 200; ++i) {
            run_process({"losetup", "-d", device});
            if (run_process({"losetup", "-P", device, file.string()}).ok())
                return true;
            std::this_thread::sleep_for(std::chrono::milliseconds(25));
        }
        return false;
    }
};

fs::path blank_card(const fs::path& path, uint64_t size)
{
    write_file(path, "");
    fs::resize_file(path, size);
    return path;
}

// A raw image of `size` bytes (a multiple of 16 MiB) of noise: one 16 MiB
// chunk of xorshift output over and over.
fs::path noise_image(const fs::path& path, uint64_t size)
{
    std::string chunk(16 * MiB, '\0');
    uint32_t x = 12345;
    for (auto& c : chunk) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        c = static_cast<char>(x);
    }
    std::ofstream out(path, std::ios::binary);
    for (uint64_t written = 0; written < size; written += chunk.size())
        out.write(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    return path;
}

std::vector<json> log_lines(const fs::path& log)
{
    std::vector<json> out;
    std::istringstream lines(read_text(log));
    std::string line;
    while (std::getline(lines, line))
        out.push_back(json::parse(line));
    return out;
}

size_t lines_for(const fs::path& log, const std::string& card)
{
    size_t n = 0;
    for (const auto& line : log_lines(log))
        n += line.value("card", "") == card;
    return n;
}

// The URL of the line's page, once the station whose stderr is `err` says it.
std::string page_url(const fs::path& err)
{
    std::string url;
    REQUIRE_MESSAGE(wait_until([&] {
        std::string text = read_text(err);
        auto at = text.find("the line's page: ");
        if (at == std::string::npos)
            return false;
        url = text.substr(at + 17, text.find('\n', at) - at - 17);
        return true;
    }, 30), read_text(err));
    return url;
}

// The golden image (a flashed ls104x commit: a board that keeps U-Boot's
// environment on the card) and a manifest of units with a key file each.
struct Line {
    Scratch tmp;
    fs::path golden = tmp / "golden.img";
    fs::path manifest = tmp / "units.jsonl";
    fs::path log = tmp / "cards.jsonl";

    explicit Line(int units)
    {
        build_commit(tmp.path(), tmp / "repo");
        auto flashed = flash_image(tmp / "repo", golden, {"--board", "ls104x"});
        REQUIRE_MESSAGE(flashed.ok(), flashed.err);
        std::string text;
        for (int i = 1; i <= units; ++i) {
            char serial[16], mac[32];
            std::snprintf(serial, sizeof serial, "TCU-%04d", i);
            std::snprintf(mac, sizeof mac, "02:00:00:00:00:%02x", i);
            write_file(tmp / "keys" / (std::string(serial) + ".key"), std::string("key of ") + serial + "\n");
            text += std::string(R"({"serial": ")") + serial + R"(", "hostname": "tcu-)" + std::to_string(i)
                    + R"(", "mac": [")" + mac + R"("], "files": [{"path": "ssl/private/device.key", "source": "keys/)"
                    + serial + R"(.key", "mode": "0600"}]})" + "\n";
        }
        write_file(manifest, text);
    }

    pid_t start(const std::vector<const Slot*>& slots, const fs::path& err,
                const std::vector<std::string>& extra = {}) const
    {
        std::vector<std::string> args{"station", golden.string(), "--manifest", manifest.string(), "--log",
                                      log.string(), "--force", "--json"};
        args.insert(args.end(), extra.begin(), extra.end());
        for (const Slot* slot : slots) {
            args.push_back("--slot");
            args.push_back(slot->device);
        }
        return spawn_treeflash(args, err.string());
    }
};

// ls104x's U-Boot environment (CONFIG_ENV_OFFSET, CONFIG_ENV_SIZE).
constexpr uint64_t env_offset = 0x500000, env_size = 0x2000;

// Checks a card the log says is good: the image's bytes before the rootfs
// partition but for U-Boot's environment, which holds the unit's serial# and
// MAC beside the image's variables; a clean rootfs, and the unit's identity
// in the deployment's /etc.
void check_good_card(const fs::path& golden, const fs::path& card, const std::string& serial, int number)
{
    auto [offset, size] = rootfs_extent(golden);
    CHECK(read_bytes(card, 0, env_offset) == read_bytes(golden, 0, env_offset));
    CHECK(read_bytes(card, env_offset + env_size, offset - env_offset - env_size)
          == read_bytes(golden, env_offset + env_size, offset - env_offset - env_size));
    char mac[32];
    std::snprintf(mac, sizeof mac, "02:00:00:00:00:%02x", number);
    auto image_env = fw_printenv(golden, env_offset, env_size, card.string() + ".fw_env.config");
    auto card_env = fw_printenv(card, env_offset, env_size, card.string() + ".fw_env.config");
    fs::remove(card.string() + ".fw_env.config");
    CHECK(card_env["serial#"] == serial);
    CHECK(card_env["ethaddr"] == mac);
    REQUIRE(image_env.count("bootcmd"));
    image_env["serial#"] = serial;
    image_env["ethaddr"] = mac;
    CHECK(card_env == image_env);

    auto r = run_treeflash({"inspect", card.string(), "--json"});
    REQUIRE_MESSAGE(r.ok(), r.err);
    json state = json::parse(r.out);
    CHECK(state["unit"]["serial"] == serial);
    CHECK(state["unit"]["hostname"] == "tcu-" + std::to_string(number));
    CHECK(state["unit"]["ethaddr"] == mac);
    CHECK(state["uboot_env"]["serial#"] == serial);
    CHECK(state["uboot_env"]["ethaddr"] == mac);
    std::string deployment = "ostree/deploy/" + state["deployments"][0]["os"].get<std::string>() + "/deploy/"
                             + state["deployments"][0]["commit"].get<std::string>() + ".0/etc/";
    flasher::Ext4Card files(card.string(), offset);
    CHECK(files.read(deployment + "hostname") == "tcu-" + std::to_string(number) + "\n");
    CHECK(files.read(deployment + "ssl/private/device.key") == "key of " + serial + "\n");
    // The rootfs as provisioned is a clean file system.
    fs::path part = card.string() + ".p3";
    auto copy = run_process({"dd", "if=" + card.string(), "of=" + part.string(), "bs=1M",
                             "skip=" + std::to_string(offset / MiB), "count=" + std::to_string(size / MiB),
                             "conv=sparse", "status=none"});
    REQUIRE_MESSAGE(copy.ok(), copy.err);
    auto clean = run_process({"e2fsck", "-f", "-n", part.string()});
    CHECK_MESSAGE(clean.exit_code == 0, clean.out << clean.err);
    fs::remove(part);
}

} // namespace

TEST_SUITE("station") {

TEST_CASE("four slots, cards in and out at random times: good ones provisioned once each, the others fail alone"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Line line(8);
    const uint64_t size = fs::file_size(line.golden);
    fs::path cards = line.tmp / "cards";
    fs::create_directories(cards);
    SmallTmpfs full(2 * MiB); // a card that fails mid-write: its bytes have nowhere to go
    write_file(line.tmp / "empty", "");
    Slot s1(line.tmp / "empty"), s2(line.tmp / "empty"), s3(line.tmp / "empty"), s4(line.tmp / "empty");

    fs::path a = blank_card(cards / "a", size), b = blank_card(cards / "b", size), c = blank_card(cards / "c", size),
             d = blank_card(cards / "d", size), e = blank_card(cards / "e", size + 64 * MiB);
    fs::path small = blank_card(cards / "small", 64 * MiB);
    fs::path failing = blank_card(full.dir / "failing", size);

    fs::path err = line.tmp / "station.err";
    pid_t station = line.start({&s1, &s2, &s3, &s4}, err);

    std::mt19937 random(20261207);
    std::uniform_int_distribution<int> pause(0, 1500);
    std::vector<std::pair<const Slot*, std::vector<fs::path>>> plan{
        {&s1, {a, e}}, {&s2, {b, small}}, {&s3, {failing, c}}, {&s4, {d, a}}};
    std::map<const Slot*, std::vector<int>> pauses;
    for (auto& [slot, sequence] : plan)
        for (size_t i = 0; i < sequence.size() * 2; ++i)
            pauses[slot].push_back(pause(random));
    // A card is in one slot at a time: its hand holds it from in to out.
    std::map<fs::path, std::mutex> in_hand;
    for (auto& [slot, sequence] : plan)
        for (const auto& card : sequence)
            in_hand[card];
    std::vector<std::thread> hands;
    std::mutex failures_mutex;
    std::vector<std::string> failures;
    for (auto& [slot, sequence] : plan) {
        hands.emplace_back([&, slot = slot, sequence = sequence] {
            size_t step = 0;
            for (const auto& card : sequence) {
                std::this_thread::sleep_for(std::chrono::milliseconds(pauses[slot][step++]));
                std::lock_guard held(in_hand[card]);
                std::string identity = "file:" + card.string();
                size_t before = lines_for(line.log, identity);
                std::string failure;
                if (!slot->insert(card))
                    failure = "cannot put " + card.string() + " into " + slot->device;
                else if (!wait_until([&] { return lines_for(line.log, identity) > before; }, 120))
                    failure = "no log line for " + card.string() + " in " + slot->device;
                std::this_thread::sleep_for(std::chrono::milliseconds(pauses[slot][step++]));
                if (!slot->remove() && failure.empty())
                    failure = "cannot take " + card.string() + " out of " + slot->device;
                if (!failure.empty()) {
                    std::lock_guard lock(failures_mutex);
                    failures.push_back(failure);
                }
            }
        });
    }
    for (auto& hand : hands)
        hand.join();
    ::kill(station, SIGINT);
    int status = wait_exit(station);
    std::string station_err = read_text(err);
    CHECK_MESSAGE(failures.empty(), (failures.empty() ? "" : failures.front()) << "\n" << station_err);
    CHECK_MESSAGE(status == 130, station_err); // Ctrl-C: interrupted

    // One line per card put in; the good ones each got their own unit.
    auto lines = log_lines(line.log);
    CHECK(lines.size() == 8);
    std::map<std::string, json> last;
    for (const auto& l : lines)
        last[l["card"].get<std::string>()] = l;
    std::set<std::string> units;
    for (const fs::path& good : {b, c, d, e}) {
        const json& l = last["file:" + good.string()];
        CHECK_MESSAGE(l["result"] == "ok", l.dump());
        CHECK(l["verified"] == true);
        units.insert(l.value("unit", ""));
    }
    // a was done in slot 1; put into slot 4 later it is not written again.
    size_t a_ok = 0, a_again = 0;
    for (const auto& l : lines)
        if (l["card"] == "file:" + a.string()) {
            a_ok += l["result"] == "ok";
            a_again += l["result"] == "already-done";
        }
    CHECK(a_ok == 1);
    CHECK(a_again == 1);
    units.insert(last["file:" + a.string()].value("unit", ""));
    CHECK(units.size() == 5);
    CHECK(!units.count(""));
    CHECK(last["file:" + small.string()]["result"] == "failed");
    CHECK(last["file:" + small.string()]["error"].get<std::string>().find("too small") != std::string::npos);
    CHECK(!last["file:" + small.string()].contains("unit"));
    CHECK(last["file:" + failing.string()]["result"] == "failed");
    CHECK(!last["file:" + failing.string()].contains("unit"));
    MESSAGE("the failing card: " << last["file:" + failing.string()].dump());

    // The journal: five units given, each once, each ok; three still free.
    std::map<std::string, int> given;
    std::istringstream journal(read_text(line.manifest.string() + ".journal"));
    std::string entry;
    size_t oks = 0;
    while (std::getline(journal, entry)) {
        json j = json::parse(entry);
        if (j["event"] == "given")
            ++given[j["serial"].get<std::string>()];
        oks += j["event"] == "ok";
    }
    CHECK(given.size() == 5);
    for (const auto& [serial, times] : given)
        CHECK_MESSAGE(times == 1, serial);
    CHECK(oks == 5);

    // Every good card: the image, plus its unit.
    for (const fs::path& good : {a, b, c, d, e}) {
        std::string serial = last["file:" + good.string()]["unit"];
        int number = std::stoi(serial.substr(4));
        check_good_card(line.golden, good, serial, number);
    }
}

TEST_CASE("a station killed with SIGKILL is restarted: no unit is given twice, the log goes on"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Line line(3);
    const uint64_t size = fs::file_size(line.golden);
    write_file(line.tmp / "empty", "");
    Slot slot(line.tmp / "empty");
    fs::path a = blank_card(line.tmp / "a", size), b = blank_card(line.tmp / "b", size);

    pid_t station = line.start({&slot}, line.tmp / "first.err");
    REQUIRE(slot.insert(a));
    REQUIRE_MESSAGE(wait_until([&] { return lines_for(line.log, "file:" + a.string()) == 1; }, 120),
                    read_text(line.tmp / "first.err"));
    ::kill(station, SIGKILL);
    wait_exit(station);
    REQUIRE(slot.remove());

    // The journal's lock died with the killed station: a new one starts.
    station = line.start({&slot}, line.tmp / "second.err");
    REQUIRE(slot.insert(b));
    REQUIRE_MESSAGE(wait_until([&] { return lines_for(line.log, "file:" + b.string()) == 1; }, 120),
                    read_text(line.tmp / "second.err"));
    ::kill(station, SIGINT);
    CHECK(wait_exit(station) == 130);
    CHECK(slot.remove());

    auto lines = log_lines(line.log);
    REQUIRE(lines.size() == 2);
    CHECK(lines[0]["unit"] == "TCU-0001");
    CHECK(lines[1]["unit"] == "TCU-0002");
    check_good_card(line.golden, b, "TCU-0002", 2);
}

TEST_CASE("a card taken out mid-write fails its slot with a clear line, and the slot takes the next card"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    // A raw image of 256 MiB of noise: long enough to write that the card
    // can be taken out while it is.
    fs::path image = noise_image(tmp / "noise.img", 256 * MiB);
    write_file(tmp / "empty", "");
    Slot slot(tmp / "empty");
    fs::path pulled = blank_card(tmp / "pulled", 256 * MiB), next = blank_card(tmp / "next", 256 * MiB);
    fs::path log = tmp / "cards.jsonl", err = tmp / "station.err";
    pid_t station = spawn_treeflash({"station", image.string(), "--slot", slot.device, "--log", log.string(), "--force",
                                     "--json"},
                                    err.string());
    REQUIRE(slot.insert(pulled));
    // The moment the slot shows "writing", the station is frozen and the
    // card taken out: its size drops to 0, as a reader's does.
    bool frozen = wait_until([&] { return read_text(err).find(" writing  file:" + pulled.string()) != std::string::npos; }, 60);
    ::kill(station, SIGSTOP);
    REQUIRE_MESSAGE(frozen, read_text(err));
    bool stopped = wait_until([&] {
        std::string stat = read_text("/proc/" + std::to_string(station) + "/stat");
        auto end = stat.rfind(')');
        return end != std::string::npos && stat.compare(end + 2, 1, "T") == 0;
    }, 10);
    bool mid_write = lines_for(log, "file:" + pulled.string()) == 0;
    // Writes already queued in the loop device may still grow the file
    // after it is cut: cut until the device reads as empty.
    bool emptied = wait_until([&] {
        fs::resize_file(pulled, 0);
        run_process({"losetup", "-c", slot.device});
        return run_process({"blockdev", "--getsize64", slot.device}).out == "0\n";
    }, 10);
    ::kill(station, SIGCONT);
    REQUIRE(stopped);
    REQUIRE(emptied);
    REQUIRE_MESSAGE(mid_write, "the write ended before the card was taken out");
    REQUIRE(wait_until([&] { return lines_for(log, "file:" + pulled.string()) == 1; }, 60));
    json failed = log_lines(log).back();
    CHECK(failed["result"] == "failed");
    CHECK_MESSAGE(failed["error"].get<std::string>().find("the card was taken out before it was done") == 0,
                  failed.dump());

    // The slot is empty again; the next card is written and verified.
    REQUIRE(slot.insert(next));
    REQUIRE_MESSAGE(wait_until([&] { return lines_for(log, "file:" + next.string()) == 1; }, 120), read_text(err));
    ::kill(station, SIGINT);
    CHECK(wait_exit(station) == 130);
    CHECK(slot.remove());
    json good = log_lines(log).back();
    CHECK(good["result"] == "ok");
    CHECK(good["verified"] == true);
    CHECK(read_bytes(next, 0, 256 * MiB) == read_bytes(image, 0, 256 * MiB));
    CHECK(read_text(err).find("slot 1 " + slot.device + "  failed  file:" + pulled.string()
                              + "  the card was taken out before it was done")
          != std::string::npos);
}

TEST_CASE("a card that cannot take a unit costs none: the image holds no sysroot" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = tmp / "zeros.img";
    blank_card(image, 16 * MiB);
    write_file(tmp / "units.jsonl", R"({"serial": "TCU-0001", "mac": ["02:00:00:00:00:01"]})" "\n");
    write_file(tmp / "empty", "");
    Slot slot(tmp / "empty");
    fs::path card = blank_card(tmp / "card", 16 * MiB);
    fs::path log = tmp / "cards.jsonl", err = tmp / "station.err";
    pid_t station = spawn_treeflash({"station", image.string(), "--slot", slot.device, "--manifest",
                                     (tmp / "units.jsonl").string(), "--log", log.string(), "--force", "--json"},
                                    err.string());
    REQUIRE(slot.insert(card));
    REQUIRE_MESSAGE(wait_until([&] { return lines_for(log, "file:" + card.string()) == 1; }, 60), read_text(err));
    ::kill(station, SIGINT);
    CHECK(wait_exit(station) == 130);
    CHECK(slot.remove());
    json line = log_lines(log).back();
    CHECK(line["result"] == "failed");
    CHECK(line["verified"] == true);
    CHECK_MESSAGE(line["error"].get<std::string>() == slot.device + " holds no OSTree sysroot to provision", line.dump());
    CHECK(!line.contains("unit"));
    // The unit is still free: nothing about it in the journal.
    CHECK(read_text(tmp / "units.jsonl.journal").find("TCU-0001") == std::string::npos);
}

TEST_CASE("a card whose U-Boot environment is damaged costs no unit, and nothing of it is written"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Line line(1);
    // The golden image's environment with one byte changed: its CRC fails.
    {
        std::fstream image(line.golden, std::ios::in | std::ios::out | std::ios::binary);
        image.seekp(static_cast<std::streamoff>(env_offset + 100));
        image.put('#');
    }
    auto mapped = run_treeflash({"bmap", line.golden.string(), "-o", line.golden.string() + ".bmap"});
    REQUIRE_MESSAGE(mapped.ok(), mapped.err);
    const uint64_t size = fs::file_size(line.golden);
    write_file(line.tmp / "empty", "");
    Slot slot(line.tmp / "empty");
    fs::path card = blank_card(line.tmp / "card", size);
    pid_t station = line.start({&slot}, line.tmp / "station.err");
    REQUIRE(slot.insert(card));
    REQUIRE_MESSAGE(wait_until([&] { return lines_for(line.log, "file:" + card.string()) == 1; }, 120),
                    read_text(line.tmp / "station.err"));
    ::kill(station, SIGINT);
    CHECK(wait_exit(station) == 130);
    CHECK(slot.remove());
    json logged = log_lines(line.log).back();
    CHECK(logged["result"] == "failed");
    CHECK_MESSAGE(logged["error"].get<std::string>().find("the U-Boot environment at 0x500000 of " + slot.device
                                                          + ": the U-Boot environment's CRC does not match")
                      == 0,
                  logged.dump());
    CHECK(!logged.contains("unit"));
    CHECK(read_text(line.manifest.string() + ".journal").find("TCU-0001") == std::string::npos);
    // The card is the image, byte for byte: nothing was provisioned.
    CHECK(read_bytes(card, 0, size) == read_bytes(line.golden, 0, size));
}

TEST_CASE("a provisioned card whose record cannot be written is shown failed, to be set aside, and the station stops"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Line line(2);
    write_file(line.tmp / "empty", "");
    Slot slot(line.tmp / "empty");
    fs::path card = blank_card(line.tmp / "card", fs::file_size(line.golden));
    REQUIRE(slot.insert(card));
    // The log on a file system with no space left: the card is written and
    // provisioned, then its record fails.
    SmallTmpfs full(1 * MiB);
    write_file(full.dir / "log.jsonl", "");
    {
        std::ofstream filler(full.dir / "filler", std::ios::binary);
        std::string block(64 << 10, 'x');
        for (int i = 0; i < 32 && filler.write(block.data(), static_cast<std::streamsize>(block.size())); ++i) {
        }
    }
    auto r = run_treeflash({"station", line.golden.string(), "--slot", slot.device, "--manifest",
                            line.manifest.string(), "--log", (full.dir / "log.jsonl").string(), "--force", "--json"});
    CHECK_MESSAGE(r.exit_code == 130, r.err);
    CHECK_MESSAGE(r.err.find("write the card log") != std::string::npos, r.err);
    json summary = json::parse(r.out);
    CHECK(summary["ok"] == 0);
    CHECK(summary["failed"] == 1);
    CHECK(summary["slots"][0]["state"] == "failed");
    CHECK(summary["slots"][0]["unit"] == "TCU-0001");
    CHECK_MESSAGE(summary["slots"][0]["message"].get<std::string>().find("written with unit TCU-0001, but it could "
                                                                         "not be recorded")
                      == 0,
                  summary.dump());
    CHECK(summary["slots"][0]["message"].get<std::string>().find("set this card aside") != std::string::npos);
    CHECK(slot.remove());
}

TEST_CASE("--cards N writes N cards, however many slots hold one" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = tmp / "image.img";
    write_file(image, std::string(8 * MiB, 'x'));
    write_file(tmp / "empty", "");
    Slot s1(tmp / "empty"), s2(tmp / "empty"), s3(tmp / "empty"), s4(tmp / "empty");
    std::vector<fs::path> cards;
    for (const Slot* slot : {&s1, &s2, &s3, &s4}) {
        cards.push_back(blank_card(tmp / ("card" + std::to_string(cards.size() + 1)), 8 * MiB));
        REQUIRE(slot->insert(cards.back()));
    }
    // Four cards in before the station starts: each slot finds one.
    fs::path log = tmp / "cards.jsonl";
    auto r = run_treeflash({"station", image.string(), "--slot", s1.device, "--slot", s2.device, "--slot",
                            s3.device, "--slot", s4.device, "--cards", "2", "--log", log.string(), "--force"});
    CHECK_MESSAGE(r.exit_code == 0, r.out << r.err);
    CHECK_MESSAGE(r.out.find("station: 2 card(s) done, 0 failed") != std::string::npos, r.out);
    auto lines = log_lines(log);
    CHECK(lines.size() == 2);
    size_t written = 0;
    for (const auto& card : cards)
        written += read_bytes(card, 0, 8 * MiB) == read_bytes(image, 0, 8 * MiB);
    CHECK(written == 2);
    // The slots whose card waited said so when the station stopped.
    CHECK_MESSAGE(r.out.find("waiting: 2 card(s) are done or being written (--cards)") != std::string::npos, r.out);
    for (const Slot* slot : {&s1, &s2, &s3, &s4})
        CHECK(slot->remove());
}

// Debian's chromium, headless, on `url`: the page's DOM once it loaded and
// its script drew the state it was served with, or with `screenshot` a PNG.
std::string browse(const Scratch& tmp, const std::string& url, const fs::path& screenshot = {})
{
    // Its profile, crash reports and temporary files stay in the test's folder.
    fs::create_directories(tmp / "chromium-tmp");
    std::vector<std::string> args{"env", "HOME=" + (tmp / "home").string(), "TMPDIR=" + (tmp / "chromium-tmp").string(),
                                  "chromium", "--headless", "--no-sandbox",
                                  "--disable-gpu", "--user-data-dir=" + (tmp / "chromium").string(), "--timeout=3000"};
    if (!screenshot.empty()) {
        args.push_back("--window-size=1600,900");
        args.push_back("--screenshot=" + screenshot.string());
    } else {
        args.push_back("--dump-dom");
    }
    args.push_back(url);
    auto r = run_process(args);
    REQUIRE_MESSAGE(r.ok(), r.err);
    return r.out;
}

TEST_CASE("the line's page, read in a real browser while the station runs, shows each slot's state"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Line line(2);
    const uint64_t size = fs::file_size(line.golden);
    write_file(line.tmp / "empty", "");
    Slot s1(line.tmp / "empty"), s2(line.tmp / "empty");
    fs::path a = blank_card(line.tmp / "a", size), small = blank_card(line.tmp / "small", 16 * MiB);
    fs::path err = line.tmp / "station.err";
    pid_t station = line.start({&s1, &s2}, err, {"--http", "127.0.0.1:0"});
    std::string url = page_url(err);

    std::string dom = browse(line.tmp, url);
    CHECK(dom.find(R"(data-slot="1" data-state="empty")") != std::string::npos);
    CHECK(dom.find(R"(data-slot="2" data-state="empty")") != std::string::npos);

    REQUIRE(s1.insert(a));
    REQUIRE(s2.insert(small));
    REQUIRE_MESSAGE(wait_until([&] { return log_lines(line.log).size() == 2; }, 120), read_text(err));
    dom = browse(line.tmp, url);
    CHECK_MESSAGE(dom.find(R"(data-slot="1" data-state="done")") != std::string::npos, dom);
    CHECK(dom.find("unit TCU-0001") != std::string::npos);
    CHECK(dom.find("DONE") != std::string::npos);
    CHECK(dom.find(R"(data-slot="2" data-state="failed")") != std::string::npos);
    CHECK(dom.find("too small") != std::string::npos);
    CHECK(dom.find(R"(<b class="ok" id="ok">1</b>)") != std::string::npos);
    CHECK(dom.find(R"(<b class="failed-count" id="failed">1</b>)") != std::string::npos);
    CHECK(dom.find("1 of 2 units left") != std::string::npos);
    // The live stream: a snapshot at once, then one per change.
    auto events = run_process({"curl", "-s", "-N", "--max-time", "2", url + "events"});
    CHECK(events.out.rfind("retry: 1000\ndata: {", 0) == 0);
    CHECK(events.out.find(R"("state":"done")") != std::string::npos);
    fs::path png = line.tmp / "page.png";
    browse(line.tmp, url, png);
    CHECK(read_text(png).rfind("\x89PNG", 0) == 0);
    if (const char* keep = std::getenv("TREEFLASH_STATION_SCREENSHOT"))
        fs::copy_file(png, keep, fs::copy_options::overwrite_existing);

    // Taken out, the slots read as empty again.
    REQUIRE(s1.remove());
    REQUIRE(s2.remove());
    REQUIRE(wait_until([&] { return read_text(err).find("slot 2 " + s2.device + "  empty") != std::string::npos; }, 30));
    dom = browse(line.tmp, url);
    CHECK(dom.find(R"(data-slot="1" data-state="empty")") != std::string::npos);
    CHECK(dom.find(R"(data-slot="2" data-state="empty")") != std::string::npos);
    ::kill(station, SIGINT);
    CHECK(wait_exit(station) == 130);
}

// A terminal for the station: a tmux server of the test's own, whose pane
// is a real terminal the station draws on, read back as the screen shows it.
struct Terminal {
    fs::path socket;
    Terminal(const fs::path& socket_path, const std::string& command) : socket(socket_path)
    {
        auto r = run_process({"tmux", "-S", socket.string(), "new-session", "-d", "-x", "160", "-y", "24", command});
        REQUIRE_MESSAGE(r.ok(), r.err);
    }
    ~Terminal() { run_process({"tmux", "-S", socket.string(), "kill-server"}); }
    Terminal(const Terminal&) = delete;
    Terminal& operator=(const Terminal&) = delete;

    std::string screen() const { return run_process({"tmux", "-S", socket.string(), "capture-pane", "-p"}).out; }
    void keys(const std::string& keys) const { run_process({"tmux", "-S", socket.string(), "send-keys", keys}); }
};

TEST_CASE("while a card is written, the terminal and the page show its progress, speed and time left"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    // 2 GiB of noise: seconds of writing and reading back, long enough to watch.
    fs::path image = noise_image(tmp / "noise.img", 2048 * MiB);
    write_file(tmp / "empty", "");
    Slot slot(tmp / "empty");
    fs::path card = blank_card(tmp / "card", 2048 * MiB);
    fs::path log = tmp / "cards.jsonl", err = tmp / "station.err";
    std::string command = std::string(TREEFLASH_BINARY) + " station " + image.string() + " --slot " + slot.device
                          + " --force --http 127.0.0.1:0 --log " + log.string() + " 2>" + err.string()
                          + "; echo exit status $?; sleep 600";
    Terminal terminal(tmp / "tmux", command);
    std::string url = page_url(err);
    REQUIRE(wait_until([&] { return terminal.screen().find("slot 1  " + slot.device + "  EMPTY") != std::string::npos; }, 30));

    REQUIRE(slot.insert(card));
    // The screen as the station redraws it, and the page's state, until
    // both showed the card being written with a speed and a time left.
    const std::regex progress("slot 1  " + slot.device + "  (WRITING|VERIFYING)  [0-9]+%  [0-9.]+ MiB/s  [0-9]+ s left");
    bool screen_seen = false, page_seen = false;
    std::string screen, state;
    wait_until([&] {
        if (!screen_seen) {
            screen = terminal.screen();
            screen_seen = std::regex_search(screen, progress);
        }
        if (!page_seen) {
            state = run_process({"curl", "-s", "--max-time", "2", url + "state"}).out;
            if (!state.empty()) {
                json slot1 = json::parse(state)["slots"][0];
                page_seen = (slot1["state"] == "writing" || slot1["state"] == "verifying")
                            && slot1["rate"].get<double>() > 0 && slot1["eta"].get<double>() > 0
                            && slot1["done"].get<uint64_t>() < slot1["total"].get<uint64_t>();
            }
        }
        return (screen_seen && page_seen) || lines_for(log, "file:" + card.string()) > 0;
    }, 120);
    CHECK_MESSAGE(screen_seen, screen);
    CHECK_MESSAGE(page_seen, state);
    if (page_seen) {
        // The page as served with that state in it, drawn by the browser:
        // the bar's words give the speed and the time left.
        std::string page = read_text(fs::path(TREEFLASH_SOURCE_DIR) / "templates/station.html");
        auto at = page.find("/*STATE*/null");
        REQUIRE(at != std::string::npos);
        page.replace(at, 13, state);
        write_file(tmp / "page.html", page);
        std::string dom = browse(tmp, "file://" + (tmp / "page.html").string());
        CHECK(std::regex_search(dom, std::regex(R"re(data-slot="1" data-state="(writing|verifying)")re")));
        CHECK_MESSAGE(std::regex_search(dom, std::regex(R"re([0-9]+ MiB of [0-9]+ MiB · [0-9.]+ MiB/s · [0-9]+ s left)re")),
                      dom);
    }

    REQUIRE_MESSAGE(wait_until([&] { return lines_for(log, "file:" + card.string()) == 1; }, 120), read_text(err));
    // The card's result stays above the redrawn block; Ctrl-C on the
    // terminal ends the station with its summary.
    CHECK_MESSAGE(wait_until([&] {
        screen = terminal.screen();
        return screen.find("today: 1 ok, 0 failed, 1 in the last hour") != std::string::npos
               && screen.find("slot 1  " + slot.device + "  DONE — remove the card") != std::string::npos;
    }, 30), screen);
    CHECK_MESSAGE(screen.find("slot 1 " + slot.device + "  done  file:" + card.string()) != std::string::npos, screen);
    terminal.keys("C-c");
    REQUIRE(wait_until([&] { return terminal.screen().find("exit status 130") != std::string::npos; }, 30));
    screen = terminal.screen();
    CHECK_MESSAGE(screen.find("station: 1 card(s) done, 0 failed (interrupted)") != std::string::npos, screen);
    CHECK(slot.remove());
}


TEST_CASE("three stations on one PostgreSQL database, one killed mid-write and restarted: each unit once, on one card"
          * doctest::skip(not_root || !postgres_available()))
{
    NoLeftovers guard;
    Line line(12);
    PostgresServer db;
    auto imported = run_treeflash({"line", "import", line.manifest.string(), "--db", db.url()});
    REQUIRE_MESSAGE(imported.ok(), imported.err);
    const uint64_t size = fs::file_size(line.golden);
    fs::path cards = line.tmp / "cards";
    fs::create_directories(cards);
    write_file(line.tmp / "empty", "");
    Slot s1(line.tmp / "empty"), s2(line.tmp / "empty"), s3(line.tmp / "empty");
    std::map<std::string, fs::path> card;
    for (const char* name : {"a", "b", "c", "d", "e", "f", "g", "h"})
        card[name] = blank_card(cards / name, size);

    auto start = [&](const std::string& name, const Slot& slot, const fs::path& err) {
        return spawn_treeflash({"station", line.golden.string(), "--db", db.url(), "--station", name, "--slot",
                                slot.device, "--force", "--json"},
                               err.string());
    };
    auto records_of = [&](const fs::path& file) {
        return std::stoul(db.sql("SELECT count(*) FROM treeflash_cards WHERE card = 'file:" + file.string() + "'"));
    };
    // A hand puts a card in, waits for its record, takes it out.
    auto feed = [&](const Slot& slot, const fs::path& file, const fs::path& err) -> std::string {
        size_t before = records_of(file);
        if (!slot.insert(file))
            return "cannot put " + file.string() + " into " + slot.device;
        bool recorded = wait_until([&] { return records_of(file) > before; }, 180);
        if (!slot.remove())
            return "cannot take " + file.string() + " out of " + slot.device;
        return recorded ? "" : "no record of " + file.string() + ": " + read_text(err);
    };

    fs::path err1 = line.tmp / "s1.err", err2 = line.tmp / "s2.err", err2b = line.tmp / "s2-restarted.err",
             err3 = line.tmp / "s3.err";
    // On an early failure, the stations are killed once the hands are done.
    struct Stations {
        std::vector<pid_t> pids;
        ~Stations()
        {
            for (pid_t pid : pids)
                if (pid > 0 && ::kill(pid, SIGKILL) == 0)
                    wait_exit(pid);
        }
    } alive;
    pid_t station1 = start("s1", s1, err1), station2 = start("s2", s2, err2), station3 = start("s3", s3, err3);
    alive.pids = {station1, station2, station3};
    std::vector<std::string> failures;
    std::mutex failures_mutex;
    auto report = [&](const std::string& failure) {
        if (failure.empty())
            return;
        std::lock_guard lock(failures_mutex);
        failures.push_back(failure);
    };
    struct Hands {
        std::vector<std::thread> threads;
        ~Hands()
        {
            for (auto& thread : threads)
                if (thread.joinable())
                    thread.join();
        }
    } hands;
    hands.threads.emplace_back([&] {
        for (const char* name : {"a", "b", "c"})
            report(feed(s1, card[name], err1));
    });
    hands.threads.emplace_back([&] {
        for (const char* name : {"f", "g", "h"})
            report(feed(s3, card[name], err3));
    });

    // Station 2 is killed while it writes d: frozen the moment its slot
    // shows "writing", checked to hold no record and no unit, then SIGKILL.
    REQUIRE(s2.insert(card["d"]));
    bool writing = wait_until(
        [&] { return read_text(err2).find(" writing  file:" + card["d"].string()) != std::string::npos; }, 120);
    ::kill(station2, SIGSTOP);
    CHECK_MESSAGE(writing, read_text(err2));
    CHECK(records_of(card["d"]) == 0);
    CHECK(db.sql("SELECT count(*) FROM treeflash_units WHERE station = 's2'") == "0\n");
    ::kill(station2, SIGKILL);
    int signal = 0;
    wait_exit(station2, &signal);
    alive.pids[1] = -1;
    CHECK(signal == SIGKILL);
    REQUIRE(s2.remove());
    // Restarted at once under the same name (the server may not have seen
    // the killed one's connection close yet); d goes back in, then e.
    station2 = start("s2", s2, err2b);
    alive.pids[1] = station2;
    report(feed(s2, card["d"], err2b));
    report(feed(s2, card["e"], err2b));
    for (auto& hand : hands.threads)
        hand.join();

    auto status = run_treeflash({"line", "status", "--db", db.url(), "--json"});
    REQUIRE_MESSAGE(status.ok(), status.err);
    MESSAGE("line status: " << status.out);
    json line_status = json::parse(status.out);
    CHECK(line_status["stations"].size() == 3);
    for (const auto& station : line_status["stations"])
        CHECK_MESSAGE(station["running"] == true, station.dump());

    for (pid_t station : {station1, station2, station3})
        ::kill(station, SIGINT);
    for (pid_t station : {station1, station2, station3})
        CHECK(wait_exit(station) == 130);
    alive.pids.clear();
    CHECK_MESSAGE(failures.empty(), (failures.empty() ? "" : failures.front()));

    // Every unit once, as used, failed or free; the eight cards used eight.
    CHECK(db.sql("SELECT count(*), count(DISTINCT serial) FROM treeflash_units") == "12|12\n");
    CHECK(db.sql("SELECT state, count(*) FROM treeflash_units GROUP BY state ORDER BY state") == "free|4\nused|8\n");
    // No unit on two cards, no card with two units.
    CHECK(db.sql("SELECT count(*) FROM (SELECT unit FROM treeflash_cards WHERE result = 'ok' GROUP BY unit"
                 " HAVING count(DISTINCT card) > 1) twice") == "0\n");
    CHECK(db.sql("SELECT count(DISTINCT card), count(*) FROM treeflash_cards WHERE result = 'ok'") == "8|8\n");
    CHECK(db.sql("SELECT count(*) FROM treeflash_cards WHERE result <> 'ok'") == "0\n");
    // Each station did its own cards.
    CHECK(db.sql("SELECT station, string_agg(substring(card from '[^/]*$'), ',' ORDER BY id) FROM treeflash_cards"
                 " GROUP BY station ORDER BY station") == "s1|a,b,c\ns2|d,e\ns3|f,g,h\n");
    // Every card holds the unit its row names: the image, plus that unit.
    for (const auto& [name, file] : card) {
        std::string serial = db.sql("SELECT serial FROM treeflash_units WHERE state = 'used' AND card = 'file:"
                                    + file.string() + "'");
        REQUIRE_MESSAGE(serial.size() == 9, name << ": " << serial);
        serial.pop_back();
        CHECK(db.sql("SELECT unit FROM treeflash_cards WHERE card = 'file:" + file.string() + "'") == serial + "\n");
        check_good_card(line.golden, file, serial, std::stoi(serial.substr(4)));
    }
}

} // TEST_SUITE
