// The station's parts that need no card reader: the manifest, the journal
// that hands each unit out once, and writing into an ext4 in place (on an
// image file made by mkfs.ext4 -d, checked by e2fsck and read back).
#include "common/error.hpp"
#include "flasher/inspect/ext4_reader.hpp"
#include "flasher/station/ext4_writer.hpp"
#include "flasher/station/line.hpp"
#include "flasher/station/units.hpp"
#include "tests/support/system.hpp"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using namespace treeflash::flasher;

namespace {

const std::string unit_line = R"({"serial": "TCU-0001", "hostname": "tcu-0001", "mac": ["02:00:00:00:00:01", "02:00:00:00:01:01"], )"
                              R"("files": [{"path": "/etc/ssl/private/device.key", "source": "keys/0001.key", "mode": "0600"}]})";

fs::path manifest_of(const Scratch& tmp, const std::string& text)
{
    write_file(tmp / "units.jsonl", text);
    return tmp / "units.jsonl";
}

std::string manifest_error(const Scratch& tmp, const std::string& text)
{
    return error_of([&] { read_manifest(manifest_of(tmp, text)); });
}

// An ext4 image of `mib` MiB filled from `tree` (mkfs.ext4 -d: no root needed).
fs::path ext4_image(const Scratch& tmp, const fs::path& tree)
{
    fs::path image = tmp / "fs.img";
    auto r = run_process({"mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^64bit,^metadata_csum", "-d", tree.string(),
                          image.string(), "64M"});
    REQUIRE_MESSAGE(r.ok(), r.err);
    return image;
}

bool fsck_clean_ext4(const fs::path& image)
{
    auto r = run_process({"e2fsck", "-f", "-n", image.string()});
    if (r.exit_code != 0)
        MESSAGE(r.out << r.err);
    return r.exit_code == 0;
}

} // namespace

TEST_SUITE("station") {

TEST_CASE("a manifest line becomes a unit: hostname, MACs in order, files inside /etc with their modes")
{
    Scratch tmp;
    write_file(tmp / "keys/0001.key", "KEY-0001\n");
    auto units = read_manifest(manifest_of(tmp, unit_line + "\n\n" + R"({"serial": "TCU-0002"})" + "\n"));
    REQUIRE(units.size() == 2);
    CHECK(units[0].serial == "TCU-0001");
    CHECK(units[0].line == 1);
    CHECK(units[0].unit_file() == "serial=TCU-0001\nhostname=tcu-0001\nethaddr=02:00:00:00:00:01\n"
                                  "eth1addr=02:00:00:00:01:01\n");
    REQUIRE(units[0].files.size() == 1);
    CHECK(units[0].files[0].path == "ssl/private/device.key");
    CHECK(units[0].files[0].mode == 0600);
    CHECK(units[0].files[0].data == "KEY-0001\n");
    CHECK(units[1].line == 3);
    CHECK(units[1].unit_file() == "serial=TCU-0002\n");
}

TEST_CASE("a bad manifest is refused, naming the line and what is wrong")
{
    Scratch tmp;
    write_file(tmp / "keys/0001.key", "KEY\n");
    fs::create_symlink("/etc/shadow", tmp / "keys/shadow");
    CHECK(manifest_error(tmp, "").find("lists no unit") != std::string::npos);
    CHECK(manifest_error(tmp, "not json\n").find("line 1: not a JSON object") != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "../x"})").find("must be 1 to 64 of") != std::string::npos);
    CHECK(manifest_error(tmp, R"({"hostname": "a"})").find("serial '' must be") != std::string::npos);
    CHECK(manifest_error(tmp, "{\"serial\": \"A\"}\n{\"serial\": \"A\"}\n").find("line 2: serial A is listed twice")
          != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "A", "hostname": "-bad-"})").find("is not a DNS name") != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "A", "mac": "01:00:5e:00:00:01"})").find("is not a unicast")
          != std::string::npos);
    CHECK(manifest_error(tmp, "{\"serial\": \"A\", \"mac\": \"02:00:00:00:00:01\"}\n"
                              "{\"serial\": \"B\", \"mac\": \"02:00:00:00:00:01\"}\n")
              .find("line 2: MAC 02:00:00:00:00:01 is listed twice")
          != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "A", "serail": "B"})").find("unknown key \"serail\"") != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "A", "mac": "00:00:00:00:00:00"})").find("is not a unicast")
          != std::string::npos);
    CHECK(manifest_error(tmp, "{\"serial\": \"A\", \"hostname\": \"tcu\"}\n{\"serial\": \"B\", \"hostname\": \"TCU\"}\n")
              .find("hostname TCU is listed twice")
          != std::string::npos);
    // A key misspelt in a file would silently leave a private key 0644.
    CHECK(manifest_error(tmp, R"({"serial": "A", "files": [{"path": "k", "source": "keys/0001.key", "Mode": "0600"}]})")
              .find("unknown key \"Mode\" in a file")
          != std::string::npos);
    // A NUL would cut the name short where libext2fs takes C strings.
    CHECK(manifest_error(tmp, R"({"serial": "A", "files": [{"path": "hostname\u0000x", "source": "keys/0001.key"}]})")
              .find("holds a NUL byte")
          != std::string::npos);
    // Files stay inside /etc, come from below the manifest's folder, and are regular files.
    CHECK(manifest_error(tmp, R"({"serial": "A", "files": [{"path": "../shadow", "source": "keys/0001.key"}]})")
              .find("must name a file inside /etc")
          != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "A", "files": [{"path": "/usr/bin/x", "source": "keys/0001.key"}]})")
              .find("must name a file inside /etc")
          != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "A", "files": [{"path": "x", "source": "../outside"}]})")
              .find("source ../outside")
          != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "A", "files": [{"path": "x", "source": "keys/shadow"}]})")
              .find("symlink")
          != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "A", "files": [{"path": "x", "source": "keys/0001.key", "mode": "4755x"}]})")
              .find("must be octal permissions")
          != std::string::npos);
    CHECK(manifest_error(tmp, R"({"serial": "A", "files": [{"path": "hostname", "source": "keys/0001.key"}]})")
              .find("written from the unit's own fields")
          != std::string::npos);
}

TEST_CASE("a CSV manifest gives the units its JSON-lines twin gives: quoted fields, MAC lists, files with modes")
{
    Scratch tmp;
    write_file(tmp / "keys/a.key", "key a\n");
    write_file(tmp / "keys/b,c.key", "key b\n");
    write_file(tmp / "units.csv",
               "serial,mac,hostname,file:ssl/private/device.key:0600,file:/etc/motd\r\n"
               "TCU-1,\"02:00:00:00:00:01; 02:00:00:00:00:02\",tcu-1,keys/a.key,keys/a.key\r\n"
               "TCU-2,02:00:00:00:00:03,,\"keys/b,c.key\",\r\n");
    auto units = flasher::read_manifest(tmp / "units.csv");
    REQUIRE(units.size() == 2);
    CHECK(units[0].serial == "TCU-1");
    CHECK(units[0].hostname == "tcu-1");
    CHECK(units[0].macs == std::vector<std::string>{"02:00:00:00:00:01", "02:00:00:00:00:02"});
    REQUIRE(units[0].files.size() == 2);
    CHECK(units[0].files[0].path == "ssl/private/device.key");
    CHECK(units[0].files[0].mode == 0600);
    CHECK(units[0].files[0].data == "key a\n");
    CHECK(units[0].files[1].path == "motd");
    CHECK(units[0].files[1].mode == 0644);
    CHECK(units[1].line == 3);
    CHECK(units[1].hostname.empty());
    REQUIRE(units[1].files.size() == 1);
    CHECK(units[1].files[0].data == "key b\n");

    auto refused = [&](const std::string& text, const std::string& expected) {
        write_file(tmp / "bad.csv", text);
        try {
            flasher::read_manifest(tmp / "bad.csv");
            FAIL("accepted: " << text);
        } catch (const std::exception& e) {
            CHECK_MESSAGE(std::string(e.what()).find(expected) != std::string::npos, e.what());
        }
    };
    refused("hostname,mac\ntcu-1,02:00:00:00:00:01\n", "line 1: no \"serial\" column");
    refused("serial,colour\nTCU-1,red\n", "line 1: unknown column \"colour\"");
    refused("serial,mac\nTCU-1\n", "line 2: 1 fields, the header names 2");
    refused("serial,mac\nTCU-1,02:00:00:00:00:01\nTCU-1,02:00:00:00:00:02\n", "line 3: serial TCU-1 is listed twice");
    refused("serial,mac\nTCU-1,01:00:00:00:00:01\n", "line 2: MAC");
    refused("serial,file:../../shadow\nTCU-1,keys/a.key\n", "must name a file inside /etc");
    refused("serial,file:x\nTCU-1,../outside\n", "line 2: source");
    refused("serial\n\"TCU-1\n", "a quoted field does not end");
    refused("serial,file:motd,file:/etc/motd\nTCU-1,keys/a.key,keys/a.key\n", "line 2: /etc/motd is listed twice");
    refused("\n\nserial,colour\nTCU-1,red\n", "line 3: unknown column \"colour\"");

    // A spreadsheet's byte order mark, and lines ended by a lone CR.
    write_file(tmp / "excel.csv", "\xEF\xBB\xBFserial,hostname\rTCU-7,tcu-7\rTCU-8,tcu-8\r");
    auto excel = flasher::read_manifest(tmp / "excel.csv");
    REQUIRE(excel.size() == 2);
    CHECK(excel[0].serial == "TCU-7");
    CHECK(excel[1].hostname == "tcu-8");
    CHECK(excel[1].line == 3);
    // A quoted field over two lines counts both, whatever ends them.
    write_file(tmp / "multi.csv", "serial,hostname\r\"TCU-7\",tcu-7\rTCU-8,\"bad\rname\"\r");
    try {
        flasher::read_manifest(tmp / "multi.csv");
        FAIL("a hostname with a line break");
    } catch (const std::exception& e) {
        CHECK_MESSAGE(std::string(e.what()).find("line 3: hostname") != std::string::npos, e.what());
    }
    write_file(tmp / "bom.jsonl", "\xEF\xBB\xBF{\"serial\": \"TCU-9\"}\n");
    CHECK(flasher::read_manifest(tmp / "bom.jsonl").at(0).serial == "TCU-9");
}

TEST_CASE("the journal gives each unit out once, across restarts, a torn last line and a second station")
{
    Scratch tmp;
    fs::path manifest = manifest_of(tmp, "{\"serial\": \"U1\"}\n{\"serial\": \"U2\"}\n{\"serial\": \"U3\"}\n");
    {
        UnitPool pool(manifest);
        CHECK(pool.left() == 3);
        auto first = pool.take("1", "file:/cards/a");
        REQUIRE(first);
        CHECK(first->serial == "U1");
        pool.finish(*first, false, "verification failed");
        // A second station on the same manifest is refused while this one runs.
        CHECK(error_of([&] { UnitPool other(manifest); }).find("is in use by another station") != std::string::npos);
        auto second = pool.take("2", "file:/cards/b");
        REQUIRE(second);
        CHECK(second->serial == "U2"); // U1's card failed: U1 is not given again
    }
    // The station died while writing a line: the torn line is cut, its unit is free.
    {
        int fd = ::open((manifest.string() + ".journal").c_str(), O_WRONLY | O_APPEND);
        REQUIRE(fd >= 0);
        std::string torn = R"({"time": "x", "event": "given", "serial": "U3", "sl)";
        REQUIRE(::write(fd, torn.data(), torn.size()) == static_cast<ssize_t>(torn.size()));
        ::close(fd);
    }
    {
        UnitPool pool(manifest);
        CHECK(pool.left() == 1);
        CHECK(pool.unfinished() == std::vector<std::string>{"U2"}); // given, never finished
        auto third = pool.take("1", "file:/cards/c");
        REQUIRE(third);
        CHECK(third->serial == "U3");
        pool.finish(*third, true, "");
        CHECK(!pool.take("1", "file:/cards/d"));
        CHECK(pool.left() == 0);
    }
    std::string journal = read_text(manifest.string() + ".journal");
    CHECK(journal.find("\"sl\n") == std::string::npos);
    CHECK(journal.find(R"("event":"failed")") != std::string::npos);
    CHECK(journal.find(R"("detail":"verification failed")") != std::string::npos);
    // A journal line that is not ours stops the station rather than guess.
    write_file(manifest.string() + ".journal", "garbage\n");
    CHECK(error_of([&] { UnitPool pool(manifest); }).find("is not a journal entry") != std::string::npos);
}

TEST_CASE("files are written into an ext4 in place: new folders, modes, a replaced hard link; e2fsck finds it clean")
{
    Scratch tmp;
    fs::path tree = tmp / "tree";
    write_file(tree / "deploy/etc/hostname", "old-name\n");
    fs::create_hard_link(tree / "deploy/etc/hostname", tree / "deploy/usr-etc-hostname");
    fs::create_directories(tree / "deploy/usr");
    fs::create_symlink("/etc", tree / "deploy/etc-link");
    fs::create_symlink("/etc/passwd", tree / "deploy/etc/passwd-link");
    fs::path image = ext4_image(tmp, tree);

    Ext4Writer writer(image.string(), 0);
    writer.make_directories("deploy/etc/ssl/private");
    writer.write_file("deploy/etc/ssl/private/device.key", "KEY\n", 0600);
    writer.write_file("deploy/etc/hostname", "tcu-0001\n", 0644);
    std::string big(300000, 'x'); // more than a block, more than the inline space
    writer.write_file("deploy/etc/big", big, 0640, 1000, 1000);
    // Symlinks are never followed, neither as a folder nor as the file.
    CHECK(error_of([&] { writer.write_file("deploy/etc-link/shadow", "x", 0644); }).find("a symlink, not followed")
          != std::string::npos);
    CHECK(error_of([&] { writer.make_directories("deploy/etc-link/x"); }).find("a symlink, not followed")
          != std::string::npos);
    CHECK(error_of([&] { writer.write_file("deploy/etc/passwd-link", "x", 0644); }).find("not a regular file")
          != std::string::npos);
    CHECK(error_of([&] { writer.write_file("deploy/etc/../../x", "x", 0644); }) != "");
    CHECK(error_of([&] { writer.write_file(std::string("deploy/etc/hostname\0x", 21), "x", 0644); })
              .find("NUL")
          != std::string::npos);
    CHECK(error_of([&] { writer.write_file("deploy/etc/" + std::string(256, 'n'), "x", 0644); })
              .find("longer than 255 bytes")
          != std::string::npos);
    // Many names in one folder: the folder grows past its first block.
    for (int i = 0; i < 200; ++i)
        writer.write_file("deploy/etc/ssl/file-with-a-long-name-" + std::to_string(i), std::to_string(i), 0644);
    writer.close();

    CHECK(fsck_clean_ext4(image));
    Ext4Card card(image.string(), 0);
    CHECK(card.read("deploy/etc/ssl/private/device.key") == "KEY\n");
    CHECK(card.read("deploy/etc/hostname") == "tcu-0001\n");
    CHECK(card.read("deploy/usr-etc-hostname") == "old-name\n"); // the other link keeps the old bytes
    CHECK(card.read("deploy/etc/big") == big);
    CHECK(card.read("deploy/etc/ssl/file-with-a-long-name-199") == "199");
    CHECK(card.list("deploy/etc/ssl").size() == 201);

    // Modes and owners as asked, read with debugfs.
    auto stat_of = [&](const std::string& path) {
        auto r = run_process({"debugfs", "-R", "stat " + path, image.string()});
        return r.out;
    };
    CHECK(stat_of("/deploy/etc/ssl/private/device.key").find("Mode:  0600") != std::string::npos);
    CHECK(stat_of("/deploy/etc/ssl/private").find("Mode:  0755") != std::string::npos);
    std::string big_stat = stat_of("/deploy/etc/big");
    CHECK(big_stat.find("Mode:  0640") != std::string::npos);
    CHECK(big_stat.find("User:  1000") != std::string::npos);
}

TEST_CASE("an ext4 whose journal needs recovery is not written")
{
    Scratch tmp;
    fs::create_directories(tmp / "tree/etc");
    fs::path image = ext4_image(tmp, tmp / "tree");
    auto r = run_process({"debugfs", "-w", "-R", "feature needs_recovery", image.string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    CHECK(error_of([&] { Ext4Writer writer(image.string(), 0); }).find("journal needs recovery") != std::string::npos);
}

TEST_CASE("the line's terminal view: counts, then each slot with progress, speed and time left")
{
    flasher::LineState line({"/dev/sdb", "/dev/sdc", "/dev/sdd"});
    flasher::LineInfo info;
    info.image = "card.img.zst";
    info.commit = "0123456789abcdef0123";
    info.ok_today = 4;
    info.units = true;
    info.units_left = 10;
    info.units_total = 12;
    line.set_info(info);
    uint64_t before = line.version();

    // Slot 1 verifies: 60 MiB of 100 read back in the 3 s since its write
    // ended at 7 s; the writing phase's time does not slow it down.
    flasher::SlotStatus verifying{0, "/dev/sdb", flasher::SlotState::Verifying, 60 << 20, 100 << 20, 10.0, 7.0,
                                  "cid:0123"};
    line.update(verifying);
    CHECK(line.version() != before);
    CHECK(flasher::slot_rate(verifying) == doctest::Approx(20.0 * (1 << 20)));
    CHECK(flasher::slot_seconds_left(verifying) == doctest::Approx(2.0));
    flasher::SlotStatus done{1, "/dev/sdc", flasher::SlotState::Done};
    done.unit = "TCU-0003";
    done.message = "done — remove the card";
    done.result = "ok";
    done.units_left = 9;
    line.update(done);
    line.update(done); // a result counts once
    flasher::SlotStatus failed{2, "/dev/sdd", flasher::SlotState::Failed};
    failed.message = "the card is too small\x1b[2J";
    failed.result = "failed";
    line.update(failed);

    auto lines = flasher::render_line(line.snapshot(), 200);
    REQUIRE(lines.size() == 5);
    CHECK(lines[0] == "image card.img.zst  commit 0123456789ab");
    CHECK(lines[1] == "today: 5 ok, 1 failed, 1 in the last hour; 9 of 12 units left");
    CHECK(lines[2] == "slot 1  /dev/sdb  VERIFYING  60%  20.0 MiB/s  2 s left  cid:0123");
    CHECK(lines[3] == "slot 2  /dev/sdc  DONE — remove the card  unit TCU-0003");
    // Text from a card or an error cannot drive the terminal.
    CHECK(lines[4].find('\x1b') == std::string::npos);
    CHECK(lines[4].rfind("slot 3  /dev/sdd  FAILED  the card is too small", 0) == 0);
    // Each line fits the terminal.
    for (const auto& text : flasher::render_line(line.snapshot(), 30))
        CHECK(text.size() <= 30 + 2); // "—" is one column of three bytes
    CHECK(line.snapshot().errors.size() == 1);
}

} // TEST_SUITE
