// Boot counting without booting: the U-Boot environments treeflash writes
// (checked with u-boot-tools' mkenvimage and fw_printenv), the boards'
// settings, the boot script, what the card's files say about each
// deployment, and templates/boot-health run by the host's shell on a
// sysroot laid out as OSTree lays it out.
#include "common/error.hpp"
#include "common/process.hpp"
#include "common/templates.hpp"
#include "flasher/board.hpp"
#include "flasher/boot/boot_state.hpp"
#include "flasher/boot/bootscript.hpp"
#include "flasher/inspect/card_files.hpp"
#include "flasher/boot/uboot_env.hpp"
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>
#include <fstream>
#include <regex>
#include <sstream>
#include <sys/stat.h>

using namespace treeflash;
using namespace treeflash::flasher;
using namespace treeflash::test;

namespace {

const fs::path boards = fs::path(TREEFLASH_SOURCE_DIR) / "board";

void write_bytes(const fs::path& path, const std::vector<uint8_t>& bytes)
{
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}


// A copy of a bundled board with `from` replaced by `to` in its board.conf.
fs::path board_with(const Scratch& tmp, const std::string& board, const std::string& from, const std::string& to)
{
    static int copies = 0;
    return edited_board(tmp, board, "board-" + std::to_string(++copies), [&](std::string conf) {
        REQUIRE_MESSAGE(std::regex_search(conf, std::regex(from)), from);
        return std::regex_replace(conf, std::regex(from), to);
    });
}

Deployment deployment(const std::string& commit)
{
    Deployment d;
    d.commit = commit;
    return d;
}

} // namespace

TEST_SUITE("boot-count") {

TEST_CASE("U-Boot environments: byte for byte what mkenvimage writes, read back by fw_printenv")
{
    Scratch tmp;
    UbootVariables variables{{"bootcmd", "load mmc 0:1 ${scriptaddr} /boot.scr && source ${scriptaddr}"},
                             {"bootlimit", "3"},
                             {"empty", ""}};
    write_file(tmp / "env.txt", "bootcmd=" + variables[0].second + "\nbootlimit=3\nempty=\n");
    auto made = run_process({"mkenvimage", "-p", "0", "-s", "8192", "-o", (tmp / "mkenvimage.bin").string(), (tmp / "env.txt").string()});
    REQUIRE_MESSAGE(made.ok(), made.err);
    std::vector<uint8_t> ours = make_uboot_env(variables, 8192);
    std::string theirs = read_text(tmp / "mkenvimage.bin");
    CHECK(std::string(ours.begin(), ours.end()) == theirs);

    write_bytes(tmp / "ours.bin", ours);
    auto read = fw_printenv(tmp / "ours.bin", 0, 8192, tmp / "fw_env.config");
    CHECK(read["bootcmd"] == variables[0].second);
    CHECK(read["bootlimit"] == "3");
    auto back = read_uboot_env(reinterpret_cast<const uint8_t*>(theirs.data()), theirs.size());
    CHECK(back["bootcmd"] == variables[0].second);
    CHECK(back.count("empty") == 1);

    // An erased or damaged environment is refused, as U-Boot refuses it.
    std::vector<uint8_t> zeros(512, 0);
    CHECK(error_of([&] { read_uboot_env(zeros.data(), zeros.size()); }).find("CRC") != std::string::npos);
    ours[100] ^= 1;
    CHECK(error_of([&] { read_uboot_env(ours.data(), ours.size()); }).find("CRC") != std::string::npos);
    CHECK(error_of([&] { make_uboot_env({{"a", std::string(600, 'x')}}, 512); }).find("do not fit") != std::string::npos);
    CHECK(error_of([&] { make_uboot_env({{"a=b", "c"}}, 512); }).find("not a U-Boot variable name") != std::string::npos);
    CHECK(error_of([&] { make_uboot_env({{"a", "two\nlines"}}, 512); }).find("newline") != std::string::npos);
}

TEST_CASE("a unit's identity set in a U-Boot environment: the others kept in order, the CRC made anew")
{
    Scratch tmp;
    std::vector<uint8_t> image = make_uboot_env({{"bootcmd", "run x"}, {"ethaddr", "02:00:00:00:00:99"}, {"bootdelay", "3"}}, 8192);
    std::vector<uint8_t> set = set_uboot_env(image.data(), image.size(),
                                             {{"serial#", "TCU-0001"}, {"ethaddr", "02:00:00:00:00:01"}});
    CHECK(set.size() == 8192);
    UbootVariables entries = read_uboot_env_entries(set.data(), set.size());
    CHECK(entries == UbootVariables{{"bootcmd", "run x"}, {"bootdelay", "3"}, {"serial#", "TCU-0001"},
                                    {"ethaddr", "02:00:00:00:00:01"}});
    write_bytes(tmp / "set.bin", set);
    auto read = fw_printenv(tmp / "set.bin", 0, 8192, tmp / "fw_env.config");
    CHECK(read == std::map<std::string, std::string>{{"bootcmd", "run x"}, {"bootdelay", "3"},
                                                     {"serial#", "TCU-0001"}, {"ethaddr", "02:00:00:00:00:01"}});
    // Only a valid environment is changed, and only within its size.
    image[50] ^= 1;
    CHECK(error_of([&] { set_uboot_env(image.data(), image.size(), {{"serial#", "x"}}); }).find("CRC") != std::string::npos);
    std::vector<uint8_t> small = make_uboot_env({{"a", "b"}}, 512);
    CHECK(error_of([&] { set_uboot_env(small.data(), small.size(), {{"serial#", std::string(600, 'x')}}); })
              .find("do not fit") != std::string::npos);
}

TEST_CASE("where board.env says U-Boot's environment is: whole sectors past the first, or an error")
{
    CHECK(!uboot_env_place({{"bootlimit", "3"}}));
    auto place = uboot_env_place({{"uboot_env", "0x500000 0x2000"}});
    REQUIRE(place);
    CHECK(place->offset == 0x500000);
    CHECK(place->size == 0x2000);
    for (const char* bad : {"0x500000", "0x500000 0x2000 9", "x y", "0 0x2000", "0x4000 0x2000", "0x500001 0x2000", "0x500000 0x200000",
                            "0x500000 100", "-1 0x2000"})
        CHECK_MESSAGE(error_of([&] { uboot_env_place({{"uboot_env", bad}}); }).find("uboot_env") != std::string::npos, bad);
}

TEST_CASE("the tries block flash writes is what the boot script imports: tries 0, serial 0")
{
    Scratch tmp;
    write_bytes(tmp / "block.bin", initial_boot_state());
    auto values = fw_printenv(tmp / "block.bin", 0, boot_state_bytes, tmp / "fw_env.config");
    CHECK(values == std::map<std::string, std::string>{{"treeflash_serial", "0"}, {"treeflash_tries", "0"}});
}

TEST_CASE("ls104x: its U-Boot environment and boot script agree with the board profile")
{
    Scratch tmp;
    BoardProfile board = load_board("ls104x");
    REQUIRE(board.boot_count.enabled());
    CHECK(board.boot_count.limit == 3);
    CHECK(board.boot_count.state_offset == 0x5ff000);
    CHECK(board.initramfs_on_failure == "reboot");
    REQUIRE(board.uboot_env);
    const FirmwareSlot* slot = board.slot(board.uboot_env->slot);
    REQUIRE(slot);
    CHECK(slot->offset == 0x500000);
    CHECK(slot->max_size == 0x2000);

    // The environment, placed where U-Boot reads it in a card-sized file.
    fs::path card = tmp / "card.bin";
    {
        std::ofstream out(card, std::ios::binary);
        out.seekp(static_cast<std::streamoff>(board.boot_count.state_offset + boot_state_bytes));
        out.put('\0');
    }
    std::vector<uint8_t> env = render_uboot_environment(board, slot->max_size);
    std::vector<uint8_t> block = initial_boot_state();
    {
        std::fstream io(card, std::ios::binary | std::ios::in | std::ios::out);
        io.seekp(static_cast<std::streamoff>(slot->offset));
        io.write(reinterpret_cast<const char*>(env.data()), static_cast<std::streamsize>(env.size()));
        io.seekp(static_cast<std::streamoff>(board.boot_count.state_offset));
        io.write(reinterpret_cast<const char*>(block.data()), static_cast<std::streamsize>(block.size()));
    }
    auto values = fw_printenv(card, slot->offset, slot->max_size, tmp / "fw_env.config");
    CHECK(values["bootcmd"] == "mmc dev 0; load mmc 0:1 ${scriptaddr} /boot.scr && source ${scriptaddr}");
    CHECK(values["treeflash_bootlimit"] == "3");
    CHECK(values.count("bootlimit") == 0); // U-Boot's own, which its bootcount support would act on
    CHECK(values["scriptaddr"] == board.uboot_defaults.at("scriptaddr"));
    for (const auto& [name, value] : values)
        CHECK_MESSAGE(value.find('@') == std::string::npos, name);
    CHECK(fw_printenv(card, board.boot_count.state_offset, boot_state_bytes, tmp / "fw_env.config")["treeflash_tries"] == "0");

    // The boot script counts in the same block, with the same limit, and is
    // a valid U-Boot script image.
    std::string script = render_boot_script(board);
    CHECK(script.find("if test -z \"${treeflash_bootlimit}\"; then setenv treeflash_bootlimit 3; fi") != std::string::npos);
    CHECK(script.find("if ${devtype} read ${scriptaddr} 0x2ff8 1; then") != std::string::npos);
    CHECK(script.find("if ${devtype} write ${scriptaddr} 0x2ff8 1; then") != std::string::npos);
    CHECK(script.find("env export -c -s 0x200 ${scriptaddr} treeflash_serial treeflash_tries") != std::string::npos);
    CHECK(script.find("treeflash.state=${treeflash_state}") != std::string::npos);
    write_boot_script(board, script, tmp.path());
    auto listed = run_process({"mkimage", "-l", (tmp / "boot.scr").string()});
    REQUIRE_MESSAGE(listed.ok(), listed.err);
    CHECK(listed.out.find("AArch64 Linux Script") != std::string::npos);
    CHECK(listed.out.find("treeflash ls104x OSTree boot") != std::string::npos);
}

TEST_CASE("a board without counting gets the plain script; broken counting settings are refused")
{
    Scratch tmp;
    BoardProfile plain = load_board(board_with(tmp, "qemu-arm64", "boot_count.limit = 3", "boot_count.limit = 0").string());
    std::string script = render_boot_script(plain);
    CHECK(script.find("treeflash_tries") == std::string::npos);
    CHECK(script.find("treeflash.state") == std::string::npos);
    CHECK(script.find("if test \"${rollback}\" = \"1\"; then") != std::string::npos);

    struct Case {
        std::string from, to, message;
    };
    for (const Case& c : {
             Case{"boot_count.limit = 3", "boot_count.limit = 9", "0 (no counting) to 8 tries"},
             Case{"boot_count.state = 0x5ff000", "boot_count.state = 0x5ff001", "a multiple of 512"},
             Case{"boot_count.state = 0x5ff000", "boot_count.state = 0x500000", "overlaps firmware slot uboot-env"},
             Case{"initramfs.on_failure = reboot", "initramfs.on_failure = shell", "needs initramfs.on_failure = reboot"},
             Case{" panic=10", "", "needs panic=SECONDS"},
             Case{"boot_count.mark = rootfs-file", "boot_count.mark = uboot-env", "only rootfs-file"},
             Case{"uboot.env = uboot-env uboot-env.txt", "uboot.env = nosuchslot uboot-env.txt", "no firmware.NAME line"},
             Case{"uboot.env = uboot-env uboot-env.txt", "uboot.env = uboot-env ../qemu-arm64/board.conf", "inside the board folder"},
         }) {
        CAPTURE(c.to);
        fs::path dir = board_with(tmp, "ls104x", c.from, c.to);
        std::string message = error_of([&] { load_board(dir.string()); });
        CHECK_MESSAGE(message.find(c.message) != std::string::npos, message);
    }
}

TEST_CASE("each deployment's state from the card's files, as the boot script reads them")
{
    std::vector<Deployment> two{deployment("bbbb"), deployment("aaaa")};
    BootFiles files;
    files.board = {{"bootlimit", "3"}, {"boot_state_offset", "0x5ff000"}};
    files.uenv = {{"bootargs", "console=x ostree=/ostree/boot.1/tcu/c/0"}, {"bootargs2", "console=x ostree=/ostree/boot.1/tcu/c/1"}};
    files.ack = {{"treeflash_acked", "4"}, {"treeflash_known_good", "aaaa.0"}};
    files.tries_block = std::map<std::string, std::string>{{"treeflash_serial", "6"}, {"treeflash_tries", "2"}};

    // No mark: the default is a trial with the block's tries.
    BootStatus s = boot_status(files, two);
    CHECK(s.counting);
    CHECK(s.bootlimit == 3);
    CHECK(s.entries[0].state == "trial");
    CHECK(s.entries[0].tries == 2u);
    CHECK(s.entries[1].state == "known good"); // ack.env names it
    CHECK(fallback_deployment(s, two.size()) == 1);

    // The last counted boot was acknowledged: those tries were an earlier trial's.
    files.ack["treeflash_acked"] = "6";
    CHECK(boot_status(files, two).entries[0].tries == 0u);
    files.ack["treeflash_acked"] = "4";

    // Past the limit: rolled back, waiting for the previous one to mark itself.
    (*files.tries_block)["treeflash_tries"] = "4";
    CHECK(boot_status(files, two).entries[0].state == "rolled back");

    // The mark names the default: known good, and an upgrade keeps it.
    files.mark = {{"treeflash_good", files.uenv["bootargs"]}};
    s = boot_status(files, two);
    CHECK(s.good_entry == 1);
    CHECK(s.entries[0].state == "known good");
    CHECK(s.entries[1].state == "previous");
    CHECK(fallback_deployment(s, two.size()) == 0);

    // The mark names the previous entry: the default was rolled back.
    files.mark = {{"treeflash_good", files.uenv["bootargs2"]}, {"treeflash_rolled_back_deployment", "bbbb.0"},
                  {"treeflash_rolled_back_version", "3"}};
    s = boot_status(files, two);
    CHECK(s.good_entry == 2);
    CHECK(s.entries[0].state == "rolled back");
    CHECK(s.entries[1].state == "known good");
    CHECK(s.rolled_back_deployment == "bbbb.0");
    CHECK(s.rolled_back_version == "3");
    CHECK(fallback_deployment(s, two.size()) == 1);

    // A mark that names bootargs uEnv.txt no longer has counts for nothing.
    files.mark = {{"treeflash_good", "console=x ostree=/ostree/boot.0/tcu/c/0"}};
    CHECK(boot_status(files, two).good_entry == 0);

    // One deployment: nothing to fall back to, nothing counted.
    s = boot_status(files, {deployment("aaaa")});
    CHECK(s.entries[0].state == "new");
    CHECK(fallback_deployment(s, 1) == 0);

    // A card whose board does not count boots.
    files.board.clear();
    s = boot_status(files, two);
    CHECK_FALSE(s.counting);
    CHECK(s.entries[0].state.empty());
    CHECK(fallback_deployment(s, two.size()) == 0);
}

TEST_CASE("a card's boot files are read and written without leaving it or hanging on it")
{
    Scratch tmp;
    fs::path card = tmp / "card";
    fs::create_directories(card / "boot");
    REQUIRE(::mkfifo((card / "boot/fifo.env").c_str(), 0644) == 0);
    CHECK(read_on_card(card, "boot/fifo.env").empty()); // returns at once
    fs::create_directories(tmp / "outside");
    fs::create_symlink(tmp / "outside", card / "boot/treeflash");
    CHECK(error_of([&] { write_on_card(card, "boot/treeflash", "ack.env", "x\n"); }).find("symlink") != std::string::npos);
    CHECK(fs::is_empty(tmp / "outside"));
    fs::remove(card / "boot/treeflash");
    write_on_card(card, "boot/treeflash", "ack.env", "treeflash_acked=5\n");
    CHECK(parse_env_lines(read_on_card(card, "boot/treeflash/ack.env"))["treeflash_acked"] == "5");
    CHECK_FALSE(fs::exists(card / "boot/treeflash/ack.env.new"));
}

TEST_CASE("boot-health marks the running deployment on a sysroot laid out as OSTree does")
{
    Scratch tmp;
    fs::path script = tmp / "boot-health";
    write_file(script, std::string(templates::get("boot-health")), 0755);
    fs::path sysroot = tmp / "sysroot";
    const std::string good = "aaaa000000000000", bad = "bbbb000000000000";
    for (const auto& [commit, version] : {std::pair{good, "2"}, std::pair{bad, "3"}})
        write_file(sysroot / "ostree/deploy/tcu/deploy" / (commit + ".0") / "usr/lib/os-release", "VERSION_ID=" + std::string(version) + "\n");
    fs::create_directories(sysroot / "ostree/boot.1.0/tcu/csum");
    fs::create_symlink("../../../deploy/tcu/deploy/" + bad + ".0", sysroot / "ostree/boot.1.0/tcu/csum/0");
    fs::create_symlink("../../../deploy/tcu/deploy/" + good + ".0", sysroot / "ostree/boot.1.0/tcu/csum/1");
    fs::create_symlink("boot.1.0", sysroot / "ostree/boot.1");
    const std::string args1 = "console=x ostree=/ostree/boot.1/tcu/csum/0", args2 = "console=x ostree=/ostree/boot.1/tcu/csum/1";
    write_file(sysroot / "boot/loader.1/uEnv.txt", "kernel_image=/k\nbootargs=" + args1 + "\nkernel_image2=/k\nbootargs2=" + args2 + "\n");
    fs::create_symlink("loader.1", sysroot / "boot/loader");

    auto run = [&](const std::string& running, const std::string& cmdline) {
        write_file(tmp / "cmdline", cmdline + "\n");
        ProcessOptions options;
        options.extra_environment = {"TREEFLASH_ROOT=" + (sysroot / "ostree/deploy/tcu/deploy" / (running + ".0")).string(),
                                     "TREEFLASH_SYSROOT=" + sysroot.string(), "TREEFLASH_CMDLINE=" + (tmp / "cmdline").string(),
                                     "TREEFLASH_RUN=" + (tmp / "run").string(), "TREEFLASH_REBOOT=touch " + (tmp / "rebooted").string()};
        return run_process({"sh", script.string()}, options);
    };
    fs::path mark = sysroot / "ostree/boot.1.0/treeflash-good.env";
    fs::path ack = sysroot / "boot/treeflash/ack.env";

    SUBCASE("a trial whose health check fails reboots and marks nothing")
    {
        write_file(sysroot / "ostree/deploy/tcu/deploy" / (bad + ".0") / "etc/treeflash/health.d/10-ok", "#!/bin/sh\nexit 0\n", 0755);
        write_file(sysroot / "ostree/deploy/tcu/deploy" / (bad + ".0") / "etc/treeflash/health.d/20-broken", "#!/bin/sh\nexit 1\n", 0755);
        auto r = run(bad, args1 + " treeflash.state=trial treeflash.boot=3 treeflash.tries=2 treeflash.bootlimit=3");
        CHECK(r.exit_code == 1);
        CHECK(r.out.find("treeflash-boot: 3 (bbbb00000000) failed its health checks (20-broken) on trial boot 2 of 3: rebooting")
              != std::string::npos);
        CHECK(fs::exists(tmp / "rebooted"));
        CHECK_FALSE(fs::exists(mark));
        CHECK_FALSE(fs::exists(ack));
        CHECK(read_text(tmp / "run/treeflash/boot-state").find("health=failed:20-broken") != std::string::npos);
    }
    SUBCASE("after a rollback the previous entry is marked, naming the failed deployment")
    {
        auto r = run(good, args2 + " treeflash.state=rollback treeflash.boot=5 treeflash.tries=4 treeflash.bootlimit=3");
        REQUIRE_MESSAGE(r.ok(), (r.out + r.err));
        CHECK(r.out == "treeflash-boot: 3 (bbbb00000000) was rolled back after failing 3 tries; running 2 (aaaa00000000), known good\n");
        std::string text = read_text(mark);
        CHECK(text.find("\ntreeflash_good=" + args2 + "\n") != std::string::npos);
        CHECK(text.find("treeflash_rolled_back_deployment=" + bad + ".0\n") != std::string::npos);
        CHECK(text.find("treeflash_rolled_back_version=3") != std::string::npos);
        CHECK(read_text(ack) == "treeflash_acked=5\ntreeflash_known_good=" + good + ".0\ntreeflash_known_good_version=2\n");
        std::string state = read_text(tmp / "run/treeflash/boot-state");
        CHECK(state.find("state=rolled-back\n") != std::string::npos);
        CHECK(state.find("rolled_back_deployment=" + bad + ".0\n") != std::string::npos);

        // The next boot finds it all in place and writes nothing.
        struct stat before {};
        REQUIRE(::stat(mark.c_str(), &before) == 0);
        r = run(good, args2 + " treeflash.state=rolled-back treeflash.boot=5 treeflash.tries=4 treeflash.bootlimit=3");
        REQUIRE(r.ok());
        struct stat after {};
        REQUIRE(::stat(mark.c_str(), &after) == 0);
        CHECK(before.st_ino == after.st_ino);
    }
    SUBCASE("rollback=1 moves no mark but ends an interrupted trial's tries; a board that does not count marks nothing")
    {
        auto r = run(good, args2 + " treeflash.state=manual treeflash.boot=5 treeflash.tries=0 treeflash.bootlimit=3");
        CHECK(r.ok());
        CHECK(r.out.find("because rollback=1 is set") != std::string::npos);
        CHECK_FALSE(fs::exists(mark));
        CHECK(parse_env_lines(read_text(ack))["treeflash_acked"] == "5");
        fs::remove(ack);
        r = run(good, args2);
        CHECK(r.ok());
        CHECK(r.out.find("does not count boots; not marking") != std::string::npos);
        CHECK_FALSE(fs::exists(mark));
        CHECK_FALSE(fs::exists(ack));
    }
    SUBCASE("a deploy since boot: ostree= no longer names the running root, nothing is marked")
    {
        auto r = run(good, args1 + " treeflash.state=trial treeflash.boot=5 treeflash.tries=1 treeflash.bootlimit=3");
        CHECK(r.ok());
        CHECK(r.out.find("the deployments changed since this boot") != std::string::npos);
        CHECK_FALSE(fs::exists(mark));
    }
}

TEST_CASE("auto-update: settings are read as written, and the reboot window is kept, across midnight too")
{
    Scratch tmp;
    write_file(tmp / "auto-update", std::string(templates::get("auto-update")), 0755);
    write_file(tmp / "auto-update.conf", "interval = 60 \n#retry=5\nreboot=never\nreboot=window\ntimeout=soon\n"
                                         "health_wait=010\nzero=0\nhuge=12345678901\n");
    // Runs the script's functions by the host's POSIX shell; the first line of what they print.
    auto call = [&](const std::string& code) {
        auto r = run_process({"sh", "-c",
                              "cd \"$1\" && TREEFLASH_AUTO_UPDATE_FUNCTIONS_ONLY=1 "
                              "TREEFLASH_AUTO_UPDATE_CONF=\"$1/auto-update.conf\" . ./auto-update && "
                                  + code,
                              "sh", tmp.path().string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
        return r.out;
    };
    CHECK(call("setting interval 14400") == "60\n");
    CHECK(call("setting retry 600") == "600\n"); // commented out: the default
    CHECK(call("setting reboot now") == "window\n"); // the last line wins
    CHECK(call("seconds interval 14400 1") == "60\n");
    // A bad value is named on stderr, never mixed into the value.
    CHECK(call("seconds timeout 300 1 2>/dev/null") == "300\n");
    CHECK(call("seconds timeout 300 1 2>&1 >/dev/null").find("timeout=soon is not a number of seconds") != std::string::npos);
    CHECK(call("seconds health_wait 300 0") == "10\n"); // decimal, not octal
    CHECK(call("seconds zero 600 1 2>/dev/null") == "1\n"); // never a loop without a pause
    CHECK(call("seconds huge 600 1") == "999999999\n");

    CHECK(call("minutes_of 02:00") == "120\n");
    CHECK(call("minutes_of 9:05") == "545\n");
    CHECK(call("minutes_of 23:59") == "1439\n");
    CHECK(call("minutes_of 08:09") == "489\n"); // not octal
    CHECK(call("minutes_of 0:30") == "30\n");
    CHECK(call("minutes_of 00:00") == "0\n");
    for (const char* bad : {"24:00", "2:5", "12:60", "noon", ""})
        CHECK_MESSAGE(call(std::string("minutes_of '") + bad + "'") == "", bad);

    auto until = [&](int now, int start, int end) {
        return std::stoi(call("minutes_until_window " + std::to_string(now) + " " + std::to_string(start) + " "
                              + std::to_string(end)));
    };
    CHECK(until(100, 120, 240) == 20);  // before the window
    CHECK(until(120, 120, 240) == 0);   // it opens
    CHECK(until(239, 120, 240) == 0);
    CHECK(until(240, 120, 240) == 1320); // closed: tomorrow's
    CHECK(until(1430, 1380, 60) == 0);   // 23:00-01:00, at 23:50
    CHECK(until(30, 1380, 60) == 0);     // at 00:30
    CHECK(until(60, 1380, 60) == 1320);  // at 01:00: tonight's
}

TEST_CASE("auto-update: the first check waits for a route through a network interface, up to network_wait")
{
    Scratch tmp;
    write_file(tmp / "auto-update", std::string(templates::get("auto-update")), 0755);
    write_file(tmp / "auto-update.conf", "network_wait=1\n");
    auto wait_for_network = [&](const std::string& routes) {
        write_file(tmp / "route", routes);
        auto r = run_process({"sh", "-c",
                              "cd \"$1\" && TREEFLASH_AUTO_UPDATE_FUNCTIONS_ONLY=1 TREEFLASH_ROUTES=\"$1/route\" "
                              "TREEFLASH_AUTO_UPDATE_CONF=\"$1/auto-update.conf\" . ./auto-update && "
                              "if wait_for_network; then echo up; else echo down; fi",
                              "sh", tmp.path().string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
        return r.out;
    };
    const std::string header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
    CHECK(wait_for_network(header + "usb0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n") == "up\n");
    CHECK(wait_for_network(header + "lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n")
          == "treeflash-update: no network after 1s; checking anyway\ndown\n");
    CHECK(wait_for_network(header).find("down") != std::string::npos);
}

TEST_CASE("auto-update: without boot-health's verdict only an uncounted or known-good boot may update")
{
    Scratch tmp;
    write_file(tmp / "auto-update", std::string(templates::get("auto-update")), 0755);
    write_file(tmp / "auto-update.conf", "health_wait=0\n");
    fs::create_directories(tmp / "run/treeflash");
    auto verdict = [&](const std::string& cmdline) {
        write_file(tmp / "cmdline", cmdline + "\n");
        auto r = run_process({"sh", "-c",
                              "cd \"$1\" && TREEFLASH_AUTO_UPDATE_FUNCTIONS_ONLY=1 TREEFLASH_RUN=\"$1/run\" "
                              "TREEFLASH_CMDLINE=\"$1/cmdline\" TREEFLASH_AUTO_UPDATE_CONF=\"$1/auto-update.conf\" "
                              ". ./auto-update && verdict",
                              "sh", tmp.path().string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
        return r.out;
    };
    CHECK(verdict("console=ttyS0 ostree=/x") == "known-good\n"); // not counted
    CHECK(verdict("ostree=/x treeflash.state=good") == "known-good\n");
    CHECK(verdict("ostree=/x treeflash.state=only") == "known-good\n");
    CHECK(verdict("ostree=/x treeflash.state=trial") == "trial-without-verdict\n");
    CHECK(verdict("ostree=/x treeflash.state=rollback") == "rollback-without-verdict\n");
    CHECK(verdict("ostree=/x treeflash.state=manual") == "manual-without-verdict\n");
    // An empty boot-state (being written) is no verdict; a whole one is.
    write_file(tmp / "run/treeflash/boot-state", "");
    CHECK(verdict("ostree=/x treeflash.state=rollback") == "rollback-without-verdict\n");
    write_file(tmp / "run/treeflash/boot-state", "deployment=abc.0\nstate=rolled-back\n");
    CHECK(verdict("ostree=/x treeflash.state=rollback") == "rolled-back\n");
}

} // TEST_SUITE
