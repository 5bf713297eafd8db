// End to end: images flashed by treeflash boot under qemu-system-aarch64
// with U-Boot, and the console proves which deployment runs. Upgrades over
// HTTP (ostree admin upgrade and treeflash upgrade), rollback through U-Boot's
// environment, GPG-signed updates, and broken boot chains that must fail fast.
// Needs root and the example packages (scripts/fetch-example).
#include "tests/e2e/e2e.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <algorithm>
#include <regex>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using namespace treeflash::test::e2e;
using nlohmann::json;

TEST_SUITE("e2e") {

TEST_CASE("boot: the flashed deployment runs, with /usr read-only" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    std::string v1 = commit(tmp / "rootfs", tmp / "repo", initramfs_for(tmp.path(), "qemu-arm64"), "1");
    RepoServer server(tmp / "repo");
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", (tmp / "disk.img").string(), "--repo",
                                  server.url(), "--json"});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);
    json out = json::parse(flashed.out);
    CHECK(out["commit"] == v1);

    Boot b = boot(tmp / "disk.img");
    REQUIRE_MESSAGE(b.status == 0, b.console);
    std::string ostree_arg = "ostree=" + out["ostree"].get<std::string>();
    CHECK(ostree_arg == "ostree=/ostree/boot.1/tcu/" + out["bootcsum"].get<std::string>() + "/0");
    CHECK(b.line("E2E-CMDLINE").find(ostree_arg) != std::string::npos);
    CHECK(b.line("E2E-USR") == "read-only");
    CHECK(b.line("E2E-OSTREE-BOOTED") == "yes");
    CHECK(b.line("E2E-VERSION") == "v1");
    // No devicetree in the commit: the kernel runs on QEMU's own.
    CHECK(b.console.find("treeflash: no devicetree in the deployment") != std::string::npos);
    CHECK(b.line("E2E-MODEL") == "linux,dummy-virt");
}

TEST_CASE("devicetrees from the commit boot on U-Boot's bare default environment: legacy, modules, several" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path initramfs = initramfs_for(tmp.path(), "qemu-arm64");
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    fs::path board_dt = marked_devicetree(tmp.path(), "qemu-virt.dtb", "treeflash-e2e board devicetree");
    fs::path other_dt = marked_devicetree(tmp.path(), "other.dtb", "treeflash-e2e other devicetree");
    std::vector<std::string> modules_layout{"--kernel-layout", "modules", "--kver", kver()};

    struct Variant {
        std::string name;
        std::vector<std::string> build_args;
        std::string loaded; // the console line naming the devicetree U-Boot loaded
    };
    std::vector<Variant> variants{
        {"legacy, one devicetree", {"--devicetree", board_dt.string()}, "/devicetree\n"},
        {"modules, one devicetree", {"--devicetree", board_dt.string()}, "/devicetree-" + kver()},
        {"modules, two devicetrees", {"--devicetree", board_dt.string(), "--devicetree", other_dt.string()}, "/dtb/qemu-virt.dtb"},
    };
    variants[1].build_args.insert(variants[1].build_args.end(), modules_layout.begin(), modules_layout.end());
    variants[2].build_args.insert(variants[2].build_args.end(), modules_layout.begin(), modules_layout.end());

    for (size_t i = 0; i < variants.size(); ++i) {
        const Variant& v = variants[i];
        CAPTURE(v.name);
        fs::path repo = tmp / ("repo-" + std::to_string(i));
        fs::path image = tmp / ("disk-" + std::to_string(i) + ".img");
        commit(tmp / "rootfs", repo, initramfs, "1", v.build_args);
        auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(), "--repo", repo.string()});
        REQUIRE_MESSAGE(flashed.ok(), flashed.err);

        Boot b = boot(image); // no --uboot-env: U-Boot's bare default environment
        REQUIRE_MESSAGE(b.status == 0, b.console);
        auto loaded = b.console.find("treeflash: devicetree ");
        REQUIRE_MESSAGE(loaded != std::string::npos, b.console);
        std::string loaded_line = b.console.substr(loaded, b.console.find('\n', loaded) - loaded + 1);
        loaded_line.erase(std::remove(loaded_line.begin(), loaded_line.end(), '\r'), loaded_line.end());
        CHECK_MESSAGE(loaded_line.find(v.loaded) != std::string::npos, loaded_line);
        CHECK(b.line("E2E-MODEL") == "treeflash-e2e board devicetree");
        CHECK(b.line("E2E-VERSION") == "v1");

        if (i == 2) {
            // The environment's fdtfile picks another devicetree of the folder.
            Boot other = boot(image, {"--uboot-env", "fdtfile=other.dtb"});
            REQUIRE_MESSAGE(other.status == 0, other.console);
            CHECK(other.console.find("/dtb/other.dtb") != std::string::npos);
            CHECK(other.line("E2E-MODEL") == "treeflash-e2e other devicetree");
        }
    }
}

TEST_CASE("upgrade over HTTP with ostree admin and with treeflash, then rollback=1 boots the previous one" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path initramfs = initramfs_for(tmp.path(), "qemu-arm64");
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    std::string v1 = commit(tmp / "rootfs", tmp / "repo", initramfs, "1");
    RepoServer server(tmp / "repo");
    fs::path image = tmp / "disk.img";
    REQUIRE(run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(), "--repo", server.url()}).ok());

    // A local change on the card, then v2 changes the default /etc/motd and the program.
    {
        MountedRootfs card(image);
        write_file(default_deployment(card.dir.path(), v1) / "etc/hostname", "locally-named\n");
    }
    write_file(tmp / "rootfs/usr/bin/e2e-version", "#!/bin/sh\necho v2\n", 0755);
    write_file(tmp / "rootfs/etc/motd", "motd v2\n");
    std::string v2 = commit(tmp / "rootfs", tmp / "repo", initramfs, "2");

    // As the how-to does: ostree admin upgrade on the mounted card.
    {
        MountedRootfs card(image);
        auto r = run_process({"ostree", "admin", "upgrade", "--sysroot=" + card.dir.path().string(), "--os=tcu"});
        REQUIRE_MESSAGE(r.ok(), r.err);
    }
    Boot b2 = boot(image);
    REQUIRE_MESSAGE(b2.status == 0, b2.console);
    CHECK(b2.line("E2E-VERSION") == "v2");
    CHECK(b2.line("E2E-HOSTNAME") == "locally-named");
    CHECK(b2.line("E2E-MOTD") == "motd v2");

    // And with treeflash upgrade.
    write_file(tmp / "rootfs/usr/bin/e2e-version", "#!/bin/sh\necho v3\n", 0755);
    write_file(tmp / "rootfs/etc/motd", "motd v3\n");
    std::string v3 = commit(tmp / "rootfs", tmp / "repo", initramfs, "3");
    auto up = run_treeflash({"upgrade", image.string(), "--json"});
    REQUIRE_MESSAGE(up.ok(), up.err);
    json result = json::parse(up.out);
    CHECK(result["current"]["commit"] == v3);
    CHECK(result["previous"]["commit"] == v2);
    Boot b3 = boot(image);
    REQUIRE_MESSAGE(b3.status == 0, b3.console);
    CHECK(b3.line("E2E-VERSION") == "v3");
    CHECK(b3.line("E2E-HOSTNAME") == "locally-named");
    CHECK(b3.line("E2E-MOTD") == "motd v3");
    CHECK(b3.line("E2E-CMDLINE").find("ostree=" + result["current"]["ostree"].get<std::string>()) != std::string::npos);

    // Rollback through U-Boot's environment (second flash bank).
    Boot rolled = boot(image, {"--uboot-env", "rollback=1"});
    REQUIRE_MESSAGE(rolled.status == 0, rolled.console);
    CHECK(rolled.console.find("treeflash: booting the previous deployment") != std::string::npos);
    CHECK(rolled.line("E2E-VERSION") == "v2");
    CHECK(result["deployments"][1]["commit"] == v2);
    CHECK(rolled.line("E2E-CMDLINE").find("ostree=" + result["deployments"][1]["ostree"].get<std::string>()) != std::string::npos);
}

TEST_CASE("an image a plain user made without loop devices boots, and upgrades"
          * doctest::skip(not_root || !user_namespaces_work()))
{
    NoLeftovers guard;
    Scratch tmp;
    ToolsForOtherUsers tools = tools_for_other_users(tmp.path());
    fs::path initramfs = initramfs_for(tmp.path(), "qemu-arm64");
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    std::string v1 = commit(tmp / "rootfs", tmp / "repo", initramfs, "1");
    RepoServer server(tmp / "repo");
    fs::create_directories(tmp / "user");
    REQUIRE(::chown((tmp / "user").c_str(), 4444, 4444) == 0);
    fs::path image = tmp / "user/disk.img";
    auto made = run_process({"setpriv", "--reuid", "4444", "--regid", "4444", "--clear-groups", "env", "HOME=/nonexistent",
                             tools.treeflash.string(), "flash", "--no-gpg-verify", "--board",
                             (tools.boards / "qemu-arm64").string(), "--image", image.string(),
                             "--repo", server.url(), "--json"});
    REQUIRE_MESSAGE(made.ok(), made.err);
    CHECK(json::parse(made.out)["image_method"] == "unprivileged");

    Boot b1 = boot(image);
    REQUIRE_MESSAGE(b1.status == 0, b1.console);
    CHECK(b1.line("E2E-VERSION") == "v1");
    CHECK(b1.line("E2E-OSTREE-BOOTED") == "yes");
    CHECK(b1.line("E2E-USR") == "read-only");
    CHECK(b1.line("E2E-BOOT-STATE") == "known-good");

    write_file(tmp / "rootfs/usr/bin/e2e-version", "#!/bin/sh\necho v2\n", 0755);
    std::string v2 = commit(tmp / "rootfs", tmp / "repo", initramfs, "2");
    auto up = run_treeflash({"upgrade", image.string(), "--json"});
    REQUIRE_MESSAGE(up.ok(), up.err);
    CHECK(json::parse(up.out)["current"]["commit"] == v2);
    Boot b2 = boot(image);
    REQUIRE_MESSAGE(b2.status == 0, b2.console);
    CHECK(b2.line("E2E-VERSION") == "v2");
    CHECK(b2.console.find("treeflash: trial boot 1 of 3 of the current deployment") != std::string::npos);
    CHECK(b2.line("E2E-BOOT-STATE") == "known-good");
}

TEST_CASE("the golden image, written to a card with treeflash write, boots from it and upgrades" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path initramfs = initramfs_for(tmp.path(), "qemu-arm64");
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    std::string v1 = commit(tmp / "rootfs", tmp / "repo", initramfs, "1");
    RepoServer server(tmp / "repo");
    // CI: build the golden image once, compressed, with its bmap and sums.
    fs::path golden = tmp / "golden.img";
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", golden.string(), "--repo",
                                  server.url(), "--compress", "zst"});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);

    // The factory: the published .zst onto a card bigger than the image.
    write_file(tmp / "card", "");
    fs::resize_file(tmp / "card", fs::file_size(golden) + (64 << 20));
    LoopGuard card(tmp / "card");
    auto written = run_treeflash({"write", (tmp / "golden.img.zst").string(), card.device, "--yes", "--force", "--json"});
    REQUIRE_MESSAGE(written.ok(), written.err);
    CHECK(json::parse(written.out)[0]["verified"] == true);

    Boot b1 = boot(card.device, {}, tmp / "card-1.console");
    REQUIRE_MESSAGE(b1.status == 0, b1.console);
    CHECK(b1.line("E2E-VERSION") == "v1");
    CHECK(b1.line("E2E-OSTREE-BOOTED") == "yes");

    // The card upgrades from the origin the golden image named.
    write_file(tmp / "rootfs/usr/bin/e2e-version", "#!/bin/sh\necho v2\n", 0755);
    std::string v2 = commit(tmp / "rootfs", tmp / "repo", initramfs, "2");
    auto up = run_treeflash({"upgrade", card.device, "--json"});
    REQUIRE_MESSAGE(up.ok(), up.err);
    json result = json::parse(up.out);
    CHECK(result["current"]["commit"] == v2);
    CHECK(result["previous"]["commit"] == v1);
    Boot b2 = boot(card.device, {}, tmp / "card-2.console");
    REQUIRE_MESSAGE(b2.status == 0, b2.console);
    CHECK(b2.line("E2E-VERSION") == "v2");
}

TEST_CASE("signed updates: the card takes its key's commits and refuses others" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    std::string key_a = gpg_key(tmp / "gpg-a", "release");
    std::string key_b = gpg_key(tmp / "gpg-b", "intruder");
    write_file(tmp / "release.gpg", run_process({"gpg", "--homedir", (tmp / "gpg-a").string(), "--export", key_a}).out);
    auto sign_a = std::vector<std::string>{"--gpg-sign", key_a, "--gpg-homedir", (tmp / "gpg-a").string()};
    auto sign_b = std::vector<std::string>{"--gpg-sign", key_b, "--gpg-homedir", (tmp / "gpg-b").string()};

    fs::path initramfs = initramfs_for(tmp.path(), "qemu-arm64");
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    commit(tmp / "rootfs", tmp / "repo", initramfs, "1", sign_a);
    RepoServer server(tmp / "repo");
    fs::path image = tmp / "disk.img";
    auto flashed = run_treeflash({"flash", "--board", "qemu-arm64", "--image", image.string(), "--repo", server.url(),
                                  "--gpg-import", (tmp / "release.gpg").string()});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);

    write_file(tmp / "rootfs/usr/bin/e2e-version", "#!/bin/sh\necho v2\n", 0755);
    std::string v2 = commit(tmp / "rootfs", tmp / "repo", initramfs, "2", sign_a);
    auto good = run_treeflash({"upgrade", image.string()});
    REQUIRE_MESSAGE(good.ok(), good.err);
    CHECK_MESSAGE(good.out.find("upgraded") != std::string::npos, good.out << good.err);

    write_file(tmp / "rootfs/usr/bin/e2e-version", "#!/bin/sh\necho v3\n", 0755);
    commit(tmp / "rootfs", tmp / "repo", initramfs, "3", sign_b);
    auto other_key = run_treeflash({"upgrade", image.string()});
    CHECK(other_key.exit_code == 1);
    CHECK_MESSAGE(other_key.err.find("public key not found") != std::string::npos, other_key.err);
    CHECK(one_line(other_key.err));

    // An unsigned commit: its publisher has to drop the summary signature on purpose.
    fs::remove(tmp / "repo/summary.sig");
    write_file(tmp / "rootfs/usr/bin/e2e-version", "#!/bin/sh\necho v4\n", 0755);
    commit(tmp / "rootfs", tmp / "repo", initramfs, "4");
    auto unsigned_commit = run_treeflash({"upgrade", image.string()});
    CHECK(unsigned_commit.exit_code == 1);
    CHECK_MESSAGE(unsigned_commit.err.find("signatures found") != std::string::npos, unsigned_commit.err);

    auto state = json::parse(run_treeflash({"inspect", image.string(), "--json"}).out);
    CHECK(state["deployments"][0]["commit"] == v2);
    Boot b = boot(image);
    REQUIRE_MESSAGE(b.status == 0, b.console);
    CHECK(b.line("E2E-VERSION") == "v2");
    for (const char* home : {"gpg-a", "gpg-b"})
        run_process({"gpgconf", "--homedir", (tmp / home).string(), "--kill", "all"});
}

TEST_CASE("a broken boot chain fails fast and the console says why" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    // A board whose initramfs lacks the disk driver, and one with a wrong root label.
    fs::copy(source_dir / "board/qemu-arm64", tmp / "no-virtio", fs::copy_options::recursive);
    std::string conf = read_text(tmp / "no-virtio/board.conf");
    conf = std::regex_replace(conf, std::regex("initramfs.modules = .*"), "initramfs.modules = crc32c_generic ext4");
    conf = std::regex_replace(conf, std::regex("initramfs.root_wait = .*"), "initramfs.root_wait = 3");
    write_file(tmp / "no-virtio/board.conf", conf);
    fs::copy(source_dir / "board/qemu-arm64", tmp / "bad-label", fs::copy_options::recursive);
    conf = read_text(tmp / "bad-label/board.conf");
    conf = std::regex_replace(conf, std::regex("ostree_root=LABEL=rootfs"), "ostree_root=LABEL=nosuchlabel");
    conf = std::regex_replace(conf, std::regex("initramfs.root_wait = .*"), "initramfs.root_wait = 3");
    write_file(tmp / "bad-label/board.conf", conf);

    struct Case {
        const char* board;
        const char* expected;
    };
    for (const Case& c : {Case{"no-virtio", "FAILED at step 'wait for root': LABEL=rootfs did not appear within 3s"},
                          Case{"bad-label", "FAILED at step 'wait for root': LABEL=nosuchlabel did not appear within 3s"}}) {
        CAPTURE(c.board);
        fs::path board = tmp / c.board;
        fs::path repo = tmp / (std::string(c.board) + "-repo");
        commit(tmp / "rootfs", repo, initramfs_for(tmp.path(), board.string()), "1");
        fs::path image = tmp / (std::string(c.board) + ".img");
        auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", board.string(), "--image", image.string(), "--repo", repo.string()});
        REQUIRE_MESSAGE(flashed.ok(), flashed.err);
        Boot b = boot(image);
        CHECK(b.status == 1);
        CHECK_MESSAGE(b.console.find(c.expected) != std::string::npos, b.console);
        // The board counts boots: the failed step reboots (QEMU runs with -no-reboot here).
        CHECK(b.console.find("treeflash-initramfs: rebooting") != std::string::npos);
    }
}

TEST_CASE("a module the kernel refuses: the failed step is named, the shell gets the console, nothing panics" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    fs::path modules = modules_with_refused_module(tmp.path());
    for (const char* on_failure : {"shell", "poweroff"}) {
        CAPTURE(on_failure);
        fs::path board = tmp / (std::string("refused-") + on_failure);
        fs::copy(source_dir / "board/qemu-arm64", board, fs::copy_options::recursive);
        std::string conf = read_text(board / "board.conf");
        conf = std::regex_replace(conf, std::regex("initramfs.modules = "), "initramfs.modules = refused ");
        conf = std::regex_replace(conf, std::regex("initramfs.on_failure = .*"), std::string("initramfs.on_failure = ") + on_failure);
        // A shell or a power-off would hold a failed trial: such a board cannot count boots.
        conf = std::regex_replace(conf, std::regex("boot_count.limit = .*"), "boot_count.limit = 0");
        write_file(board / "board.conf", conf);
        fs::path repo = tmp / (std::string("repo-") + on_failure);
        commit(tmp / "rootfs", repo, initramfs_for(tmp.path(), board.string(), {}, modules), "1");
        fs::path image = tmp / (std::string(on_failure) + ".img");
        auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", board.string(), "--image", image.string(), "--repo", repo.string()});
        REQUIRE_MESSAGE(flashed.ok(), flashed.err);

        Boot b = std::string(on_failure) == "shell"
                     // A line typed at the emergency shell runs: it has the console.
                     ? boot(image, {"--marker", "E2E-SHELL-42", "--type-after", "starting an emergency shell",
                                    "echo E2E-SHELL-$((6*7))"})
                     : boot(image);
        CHECK_MESSAGE(b.console.find("FAILED at step 'load modules': insmod refused.ko failed") != std::string::npos, b.console);
        CHECK(b.console.find("Kernel panic") == std::string::npos);
        CHECK(b.console.find("Attempted to kill init") == std::string::npos);
        if (std::string(on_failure) == "shell") {
            CHECK_MESSAGE(b.status == 0, b.console);
        } else {
            CHECK(b.status == 1);
            CHECK(b.console.find("treeflash-initramfs: powering off") != std::string::npos);
            CHECK(b.console.find("reboot: Power down") != std::string::npos);
            CHECK(b.console.find("emergency shell") == std::string::npos);
        }
    }
}

TEST_CASE("the example ls104x image matches its board profile" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path initramfs = initramfs_for(tmp.path(), "ls104x");
    auto built = run_treeflash({"build", "--rootfs", (example / "rootfs").string(), "--repo", (tmp / "repo").string(),
                                "--kernel", (example / "kernel/vmlinuz").string(), "--initramfs", initramfs.string(),
                                "--devicetree", (example / "kernel/fsl-ls1043a-rdb.dtb").string()});
    REQUIRE_MESSAGE(built.ok(), built.err);
    fs::path image = tmp / "ls104x.img";
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", image.string(), "--repo", (tmp / "repo").string(), "--json"});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);
    json out = json::parse(flashed.out);
    auto inspected = run_treeflash({"inspect", image.string(), "--json"});
    REQUIRE_MESSAGE(inspected.ok(), inspected.err);
    json info = json::parse(inspected.out);
    CHECK(info["boot_script"] == true);
    CHECK(info["update_marker"] == true);
    std::string bootargs = info["uenv"]["bootargs"];
    for (const char* arg : {"console=ttyS0,115200", "earlycon=uart8250,mmio,0x21c0500", "rootwait", "rootdelay=2",
                            "ostree_root=/dev/mmcblk0p3"})
        CHECK_MESSAGE(bootargs.find(arg) != std::string::npos, arg);
    CHECK(bootargs.find("ostree=" + out["ostree"].get<std::string>()) != std::string::npos);
    CHECK(bootargs.find("init=") == std::string::npos); // the initramfs runs ostree-prepare-root
    CHECK(info["uenv"]["ramdisk_image"].get<std::string>().find("/initramfs") != std::string::npos);
    CHECK(info["uenv"]["fdt_file"].get<std::string>().find("/devicetree") != std::string::npos);
    CHECK(out["bootargs"] == "setenv bootargs \"" + bootargs + "\"");
    // The boot script on p1 reads uEnv.txt from p3 of mmc 0.
    auto mounted = run_process({"sh", "-c", "d=$(mktemp -d) && mount -o ro,loop,offset=67108864 " + image.string() +
                                                " $d && cat $d/boot.cmd; umount $d; rmdir $d"});
    CHECK(mounted.out.find("setenv devtype mmc") != std::string::npos);
    CHECK(mounted.out.find("setenv ostree_part ${devnum}:3") != std::string::npos);
    CHECK(mounted.out.find("if test -z \"${kernel_addr_r}\"; then setenv kernel_addr_r 0x81000000; fi") != std::string::npos);
    // Boot counting: the script counts in block 0x2ff8 (0x5ff000), where the
    // flash left an empty count, and U-Boot's environment at 0x500000
    // sources that script and sets the same bootlimit.
    CHECK(mounted.out.find("if ${devtype} write ${scriptaddr} 0x2ff8 1; then") != std::string::npos);
    CHECK(mounted.out.find("setenv treeflash_bootlimit 3") != std::string::npos);
    auto printenv = [&](const std::string& offset, const std::string& size) {
        write_file(tmp / "fw_env.config", image.string() + " " + offset + " " + size + "\n");
        auto r = run_process({"fw_printenv", "-c", (tmp / "fw_env.config").string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
        return r.out;
    };
    std::string env = printenv("0x500000", "0x2000");
    CHECK(env.find("bootcmd=mmc dev 0; load mmc 0:1 ${scriptaddr} /boot.scr && source ${scriptaddr}\n") != std::string::npos);
    CHECK(env.find("treeflash_bootlimit=3\n") != std::string::npos);
    CHECK(env.find("scriptaddr=0x80000000\n") != std::string::npos);
    CHECK(printenv("0x5ff000", "0x200") == "treeflash_serial=0\ntreeflash_tries=0\n");
    auto listed = run_process({"sh", "-c", "d=$(mktemp -d) && mount -o ro,loop,offset=67108864 " + image.string() +
                                               " $d && mkimage -l $d/boot.scr; umount $d; rmdir $d"});
    CHECK(listed.out.find("AArch64 Linux Script") != std::string::npos);
    CHECK(info["boot_counting"]["counting"] == true);
    CHECK(info["boot_counting"]["bootlimit"] == 3);
    CHECK(info["deployments"][0]["boot_state"] == "new");
    std::string firmware = out["firmware"].dump();
    CHECK(firmware.find("uboot-env at 0x500000 (8192 bytes)") != std::string::npos);
    CHECK(firmware.find("boot-count at 0x5ff000 (512 bytes)") != std::string::npos);

    // An environment the user gives for that slot is written as it is.
    write_file(tmp / "own-env.txt", "bootcmd=echo own\n");
    REQUIRE(run_process({"mkenvimage", "-s", "0x2000", "-o", (tmp / "own-env.bin").string(), (tmp / "own-env.txt").string()}).ok());
    fs::path own = tmp / "own.img";
    auto own_flash = run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", own.string(), "--repo",
                                    (tmp / "repo").string(), "--firmware", "uboot-env=" + (tmp / "own-env.bin").string()});
    REQUIRE_MESSAGE(own_flash.ok(), own_flash.err);
    image = own;
    CHECK(printenv("0x500000", "0x2000") == "bootcmd=echo own\n");
}

}
