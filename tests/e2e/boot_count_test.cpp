// End to end: boot counting on the qemu-arm64 board, one card taken through
// an update history with real reboots (QEMU runs without -no-reboot, so a
// panic, a failed initramfs step or a failed health check comes back to
// U-Boot, which counts it). The console, the card's tries block and
// `treeflash inspect` must all tell the same story.
#include "tests/e2e/e2e.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <fstream>
#include <functional>

using namespace treeflash;
using namespace treeflash::test;
using namespace treeflash::test::e2e;
using nlohmann::json;

namespace {

json upgrade(const fs::path& image, const std::vector<std::string>& extra = {})
{
    std::vector<std::string> args{"upgrade", image.string(), "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = run_treeflash(args);
    REQUIRE_MESSAGE(r.ok(), r.err);
    return json::parse(r.out);
}

// A boot that may reboot on its own until the system shows E2E-DONE.
Boot boot_until_done(const fs::path& image, const std::vector<std::string>& extra = {})
{
    std::vector<std::string> args{"--reboots", "--timeout", "180"};
    args.insert(args.end(), extra.begin(), extra.end());
    Boot b = boot(image, args);
    REQUIRE_MESSAGE(b.status == 0, b.console);
    return b;
}

std::string short_name(const std::string& version, const std::string& commit)
{
    return version + " (" + commit.substr(0, 12) + ")";
}

} // namespace

TEST_SUITE("boot-count") {

TEST_CASE("boot counting: trials, health checks and rollbacks across real reboots" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path initramfs = initramfs_for(tmp.path(), "qemu-arm64");
    fs::path repo = tmp / "repo";
    auto release = [&](const std::string& version, const std::function<void(const fs::path&)>& change = {}) {
        fs::path rootfs = tmp / ("rootfs-" + version);
        make_e2e_rootfs(rootfs, "v" + version, "motd v" + version);
        if (change)
            change(rootfs);
        return commit(rootfs, repo, initramfs, version);
    };
    std::string v1 = release("1");
    RepoServer server(repo);
    fs::path image = tmp / "disk.img";
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(), "--repo", server.url()});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);

    // 1. v1 boots and is marked good; a second boot is not counted.
    Boot b = boot_until_done(image);
    CHECK(b.console.find("treeflash: the only deployment, nothing to fall back to: not counting") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v1");
    CHECK(b.last_line("E2E-BOOT-STATE") == "known-good");
    std::string block = tries_block(image);
    b = boot_until_done(image);
    CHECK(b.console.find("treeflash: the current deployment is known good") != std::string::npos);
    CHECK(count(b.console, "treeflash: loading /boot/loader/uEnv.txt") == 1);
    CHECK(tries_block(image) == block); // nothing written on a healthy boot
    CHECK(inspect(image)["deployments"][0]["boot_state"] == "known good");

    // 2. A healthy v2: its first boot is a trial, its health checks pass, and
    // from then on it boots as known good without counting.
    std::string v2 = release("2");
    CHECK(upgrade(image)["current"]["commit"] == v2);
    json state = inspect(image);
    CHECK(state["deployments"][0]["boot_state"] == "trial");
    CHECK(state["deployments"][0]["boot_tries"] == 0);
    CHECK(state["deployments"][1]["boot_state"] == "known good");
    b = boot_until_done(image);
    CHECK(b.console.find("treeflash: trial boot 1 of 3 of the current deployment") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v2");
    CHECK(b.console.find("treeflash-boot: " + short_name("2", v2) + " passed its health checks on trial boot 1 of 3")
          != std::string::npos);
    block = tries_block(image);
    b = boot_until_done(image);
    CHECK(b.console.find("treeflash: the current deployment is known good") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v2");
    CHECK(tries_block(image) == block);
    state = inspect(image);
    CHECK(state["deployments"][0]["boot_state"] == "known good");
    CHECK(state["deployments"][1]["boot_state"] == "previous");

    // 3. v3's init exits: the kernel panics and reboots (panic=), U-Boot tries
    // it bootlimit times, then boots v2 by itself, and keeps to v2.
    std::string v3 = release("3", [](const fs::path& rootfs) {
        fs::remove(rootfs / "usr/sbin/init");
        write_file(rootfs / "usr/sbin/init", "#!/bin/sh\necho E2E-INIT-EXITS\nexit 1\n", 0755);
    });
    upgrade(image);
    b = boot_until_done(image);
    CHECK(count(b.console, "E2E-INIT-EXITS") == 3);
    CHECK(count(b.console, "Kernel panic") == 3);
    CHECK(b.console.find("treeflash: trial boot 3 of 3 of the current deployment") != std::string::npos);
    CHECK(b.console.find("treeflash: the current deployment failed 3 tries; rolling back") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v2");
    CHECK(b.last_line("E2E-BOOT-STATE") == "rolled-back");
    CHECK(b.console.find("treeflash-boot: " + short_name("3", v3) + " was rolled back after failing 3 tries; running "
                         + short_name("2", v2) + ", known good")
          != std::string::npos);
    CHECK(b.console.find("E2E-STATE-FILE: rolled_back_deployment=" + v3 + ".0") != std::string::npos);
    state = inspect(image);
    CHECK(state["deployments"][0]["commit"] == v3);
    CHECK(state["deployments"][0]["boot_state"] == "rolled back");
    CHECK(state["deployments"][1]["commit"] == v2);
    CHECK(state["deployments"][1]["boot_state"] == "known good");
    CHECK(state["boot_counting"]["rolled_back"]["commit"] == v3);
    CHECK(state["boot_counting"]["rolled_back"]["version"] == "3");
    auto text = run_treeflash({"inspect", image.string()});
    CHECK(text.out.find("rolled back from " + short_name("3", v3)) != std::string::npos);
    block = tries_block(image);
    b = boot_until_done(image);
    CHECK(b.console.find("treeflash: the current deployment was rolled back; the previous one is known good")
          != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v2");
    CHECK(b.console.find("Kernel panic") == std::string::npos);
    CHECK(tries_block(image) == block);

    // 7. After that rollback an upgrade keeps v2, the known-good one, as its
    // fallback and drops v3; the new trial's tries start from zero.
    std::string v6 = release("6");
    json up = upgrade(image);
    CHECK(up["current"]["commit"] == v6);
    CHECK(up["fallback"]["commit"] == v2);
    REQUIRE(up["deployments"].size() == 2);
    CHECK(up["deployments"][1]["commit"] == v2);
    b = boot_until_done(image);
    CHECK(b.console.find("treeflash: trial boot 1 of 3 of the current deployment") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v6");
    CHECK(b.last_line("E2E-BOOT-STATE") == "known-good");

    // 4. v4 boots but a health check fails: each trial boot reboots, and the
    // outcome is the same as 3, with v6 the known-good one.
    std::string v4 = release("4", [](const fs::path& rootfs) {
        write_file(rootfs / "etc/treeflash/health.d/50-service", "#!/bin/sh\necho E2E-HEALTH-FAILS\nexit 1\n", 0755);
    });
    upgrade(image);
    b = boot_until_done(image);
    CHECK(count(b.console, "E2E-HEALTH-FAILS") == 3);
    CHECK(count(b.console, "failed its health checks (50-service) on trial boot") == 3);
    CHECK(b.last_line("E2E-VERSION") == "v6");
    CHECK(b.last_line("E2E-BOOT-STATE") == "rolled-back");
    state = inspect(image);
    CHECK(state["deployments"][0]["boot_state"] == "rolled back");
    CHECK(state["boot_counting"]["rolled_back"]["commit"] == v4);

    // 5. v5 fails in the initramfs (its kernel arguments name a missing root):
    // the initramfs reboots, and again the known-good v6 comes back.
    std::string v5 = release("5");
    up = upgrade(image, {"--karg", "ostree_root=LABEL=nosuchroot"});
    CHECK(up["fallback"]["commit"] == v6);
    b = boot_until_done(image);
    CHECK(count(b.console, "FAILED at step 'wait for root': LABEL=nosuchroot did not appear") == 3);
    CHECK(count(b.console, "treeflash-initramfs: rebooting") == 3);
    CHECK(b.last_line("E2E-VERSION") == "v6");
    CHECK(b.last_line("E2E-BOOT-STATE") == "rolled-back");
    CHECK(inspect(image)["boot_counting"]["rolled_back"]["commit"] == v5);

    // 6. A power cut during a boot of the known-good deployment, before the
    // system is up: nothing is counted, and the next boot is normal.
    block = tries_block(image);
    Boot cut = boot(image, {"--reboots", "--kill-at", "treeflash-initramfs: switching to the deployment"});
    REQUIRE_MESSAGE(cut.status == 0, cut.console);
    CHECK(cut.console.find("E2E-VERSION") == std::string::npos);
    CHECK(tries_block(image) == block);
    b = boot_until_done(image);
    CHECK(b.last_line("E2E-VERSION") == "v6");
    CHECK(count(b.console, "treeflash: loading /boot/loader/uEnv.txt") == 1);
    CHECK(tries_block(image) == block);

    // A trial cut short by a power cut shows its tries; an upgrade on the
    // card then keeps v6 and starts the new trial from zero.
    release("8", [](const fs::path& rootfs) {
        fs::remove(rootfs / "usr/sbin/init");
        write_file(rootfs / "usr/sbin/init", "#!/bin/sh\nexit 1\n", 0755);
    });
    upgrade(image);
    cut = boot(image, {"--reboots", "--kill-at", "treeflash: trial boot 1 of 3"});
    REQUIRE_MESSAGE(cut.status == 0, cut.console);
    state = inspect(image);
    CHECK(state["deployments"][0]["boot_state"] == "trial");
    CHECK(state["deployments"][0]["boot_tries"] == 1);
    text = run_treeflash({"inspect", image.string()});
    CHECK(text.out.find("boot: trial (1 of 3 tries used)") != std::string::npos);

    // 8. The manual rollback=1 still boots the previous deployment, counts
    // nothing and moves no mark: without it the card is back on v7.
    std::string v7 = release("7");
    up = upgrade(image);
    CHECK(up["fallback"]["commit"] == v6);
    CHECK(inspect(image)["deployments"][0]["boot_tries"] == 0);
    b = boot_until_done(image);
    CHECK(b.console.find("treeflash: trial boot 1 of 3 of the current deployment") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v7");
    CHECK(b.last_line("E2E-BOOT-STATE") == "known-good");
    block = tries_block(image);
    b = boot_until_done(image, {"--uboot-env", "rollback=1"});
    CHECK(b.console.find("treeflash: rollback=1: not counting this boot") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v6");
    CHECK(b.last_line("E2E-BOOT-STATE") == "manual-rollback");
    CHECK(tries_block(image) == block);
    b = boot_until_done(image);
    CHECK(b.last_line("E2E-VERSION") == "v7");
    CHECK(b.console.find("treeflash: the current deployment is known good") != std::string::npos);
}

} // TEST_SUITE
