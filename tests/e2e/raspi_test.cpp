// End to end on the SD-card path: QEMU's raspi3b machine with Debian's
// U-Boot for the Raspberry Pi 3, whose mmc driver reads and writes the card
// as an LS104x's U-Boot does (load mmc 0:N, mmc read, mmc write). The
// qemu-raspi3b board boots through it; the ls104x boot script, as flashed,
// runs on it up to booti. With a USB network card, the board updates itself.
#include "tests/e2e/e2e.hpp"

#include <doctest/doctest.h>
#include <functional>
#include <nlohmann/json.hpp>

using namespace treeflash;
using namespace treeflash::test;
using namespace treeflash::test::e2e;
using nlohmann::json;

namespace {

// Functions, not constants: `example` lives in another file, set up in an
// order a constant here cannot rely on.
fs::path rpi_uboot() { return example / "u-boot/rpi_3/u-boot.bin"; }
fs::path rpi_devicetree() { return example / "kernel/bcm2837-rpi-3-b.dtb"; }

// Boots a card of the qemu-raspi3b board, through its reboots, until the
// system shows E2E-DONE (or `extra` says otherwise).
Boot boot_raspi(const fs::path& image, const std::vector<std::string>& extra = {}, const fs::path& log = {})
{
    std::vector<std::string> args{"--board", "qemu-raspi3b", "--uboot", rpi_uboot().string(), "--reboots", "--timeout",
                                  "240"};
    args.insert(args.end(), extra.begin(), extra.end());
    Boot b = boot(image, args, log);
    REQUIRE_MESSAGE(b.status == 0, b.console);
    return b;
}

void upgrade(const fs::path& image)
{
    auto r = run_treeflash({"upgrade", image.string(), "--json"});
    REQUIRE_MESSAGE(r.ok(), r.err);
}

// The counted tries U-Boot wrote into the block ("treeflash_tries=N").
std::string tries_written(const fs::path& image)
{
    std::string block = tries_block(image);
    auto pos = block.find("treeflash_tries=");
    return pos == std::string::npos ? "" : block.substr(pos + 16, block.find('\0', pos) - pos - 16);
}

} // namespace

TEST_SUITE("raspi") {

TEST_CASE("qemu-raspi3b: a card boots over U-Boot's mmc driver, upgrades, counts its trials with mmc write, rolls back"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path initramfs = initramfs_for(tmp.path(), "qemu-raspi3b");
    fs::path repo = tmp / "repo";
    auto release = [&](const std::string& version, const std::function<void(const fs::path&)>& change = {}) {
        fs::path rootfs = tmp / ("rootfs-" + version);
        make_e2e_rootfs(rootfs, "v" + version, "motd v" + version);
        if (change)
            change(rootfs);
        return commit(rootfs, repo, initramfs, version, {"--devicetree", rpi_devicetree().string()});
    };
    std::string v1 = release("1");

    // A commit without a devicetree is refused: this board has no fallback.
    fs::path bare_repo = tmp / "bare-repo";
    make_e2e_rootfs(tmp / "rootfs-bare", "bare", "bare");
    commit(tmp / "rootfs-bare", bare_repo, initramfs, "0");
    auto refused = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-raspi3b", "--image",
                                  (tmp / "bare.img").string(), "--repo", bare_repo.string()});
    CHECK(!refused.ok());
    CHECK_MESSAGE(refused.err.find("carries no devicetree, and the board boots only with one from the commit")
                      != std::string::npos,
                  refused.err);
    CHECK(!fs::exists(tmp / "bare.img"));
    // The SD card model takes only a power-of-two size.
    refused = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-raspi3b", "--image",
                             (tmp / "odd.img").string(), "--size", "600M", "--repo", repo.string()});
    CHECK(!refused.ok());
    CHECK_MESSAGE(refused.err.find("takes only images whose size is a power of two") != std::string::npos, refused.err);

    fs::path image = tmp / "sd.img";
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-raspi3b", "--image", image.string(),
                                  "--repo", repo.string()});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);
    CHECK(fs::file_size(image) == (512ull << 20)); // rounded up from what the commit needs

    // 1. v1 boots from the card through U-Boot's mmc commands.
    Boot b = boot_raspi(image);
    CHECK(b.console.find("treeflash: loading /boot/loader/uEnv.txt from mmc 0:3") != std::string::npos);
    CHECK(b.console.find("treeflash: devicetree /boot/ostree/") != std::string::npos);
    CHECK(b.console.find("mmcblk0: p1 p2 p3") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v1");
    CHECK(b.last_line("E2E-MODEL").find("Raspberry Pi 3 Model B") != std::string::npos);
    CHECK(b.last_line("E2E-BOOT-STATE") == "known-good");

    // A commit without its devicetree is refused by upgrade too (the card's
    // board record says so), and the card keeps what it had.
    commit(tmp / "rootfs-bare", repo, initramfs, "1b");
    auto bare_upgrade = run_treeflash({"upgrade", image.string()});
    CHECK(!bare_upgrade.ok());
    CHECK_MESSAGE(bare_upgrade.err.find("carries no devicetree") != std::string::npos, bare_upgrade.err);
    CHECK(inspect(image)["deployments"].size() == 1);

    // 2. v2, upgraded on the host: a trial, counted by U-Boot with mmc write
    // (the host reads the count in the image), then known good.
    std::string v2 = release("2");
    upgrade(image);
    b = boot_raspi(image);
    CHECK(b.console.find("treeflash: trial boot 1 of 3 of the current deployment") != std::string::npos);
    CHECK(tries_written(image) == "1");
    CHECK(b.last_line("E2E-VERSION") == "v2");
    CHECK(b.last_line("E2E-BOOT-STATE") == "known-good");
    CHECK(inspect(image)["deployments"][0]["boot_state"] == "known good");

    // 3. rollback=1, typed at U-Boot's prompt: the previous deployment boots.
    b = boot_raspi(image, {"--type-after", "Hit any key to stop autoboot", " setenv rollback 1; run bootcmd"});
    CHECK(b.console.find("treeflash: booting the previous deployment") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v1");
    CHECK(b.last_line("E2E-BOOT-STATE") == "manual-rollback");

    // 4. v3 fails its health check: three trials over mmc, then v2 again.
    std::string v3 = release("3", [](const fs::path& rootfs) {
        write_file(rootfs / "etc/treeflash/health.d/10-fails", "#!/bin/sh\necho E2E-HEALTH-FAILS\nexit 1\n", 0755);
    });
    upgrade(image);
    b = boot_raspi(image);
    CHECK(count(b.console, "E2E-HEALTH-FAILS") == 3);
    CHECK(b.console.find("treeflash: trial boot 3 of 3 of the current deployment") != std::string::npos);
    CHECK(b.console.find("treeflash: the current deployment failed 3 tries; rolling back") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v2");
    CHECK(b.last_line("E2E-BOOT-STATE") == "rolled-back");
    json state = inspect(image);
    CHECK(state["deployments"][0]["commit"] == v3);
    CHECK(state["deployments"][0]["boot_state"] == "rolled back");
    CHECK(state["deployments"][1]["commit"] == v2);
}

TEST_CASE("qemu-raspi3b: the board updates itself over a USB network card; the update's trial is counted over mmc"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path initramfs = initramfs_for(tmp.path(), "qemu-raspi3b");
    fs::path repo = tmp / "repo";
    // Each release carries Debian's ostree (the updater runs it) and makes
    // one check of the server before the test's finish line powers off.
    auto release = [&](const std::string& version) {
        fs::path rootfs = tmp / ("rootfs-" + version);
        make_e2e_rootfs(rootfs, "v" + version, "motd v" + version);
        write_file(rootfs / "etc/treeflash/auto-update.conf", quick_updates);
        write_file(rootfs / "etc/e2e-update-checks", "1\n");
        return commit(rootfs, repo, initramfs, version,
                      {"--devicetree", rpi_devicetree().string(), "--userland", (example / "userland").string(),
                       "--program", "usr/bin/ostree"});
    };
    std::string v1 = release("1");
    RepoServer server(repo);
    fs::path image = tmp / "sd.img";
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-raspi3b", "--image", image.string(),
                                  "--repo", repo.string(), "--remote-url", board_url(server.url())});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);
    std::string v2 = release("2");

    // v1 boots, finds v2, pulls and deploys it, and reboots into it; U-Boot
    // counts v2's first trial with mmc write; v2 passes its health checks.
    Boot b = boot_raspi(image, {"--net", "--timeout", "360"});
    CHECK(b.line("E2E-VERSION") == "v1");
    CHECK(b.console.find("cdc_ether") != std::string::npos);
    CHECK(b.console.find("network: usb0 is 10.0.2.15 (DHCP)") != std::string::npos);
    CHECK(b.console.find("treeflash-update: pulling " + v2.substr(0, 12) + " from origin:") != std::string::npos);
    CHECK(b.console.find("treeflash-update: deployed: " + v2.substr(0, 12)) != std::string::npos);
    CHECK(b.console.find("treeflash: trial boot 1 of 3 of the current deployment") != std::string::npos);
    CHECK(tries_written(image) == "1");
    CHECK(b.last_line("E2E-VERSION") == "v2");
    CHECK(b.last_line("E2E-BOOT-STATE") == "known-good");
    CHECK(b.last_line("E2E-UPDATE") == "up-to-date");

    json state = inspect(image);
    CHECK(state["deployments"][0]["commit"] == v2);
    CHECK(state["deployments"][0]["boot_state"] == "known good");
    CHECK(state["deployments"][1]["commit"] == v1);
    CHECK(state["auto_update"]["outcome"] == "up-to-date");
    CHECK(state["auto_update"]["booted"] == v2);
    // The pull went through the test's server: the board asked for v2's commit.
    CHECK(server.access_log().find("/objects/" + v2.substr(0, 2) + "/" + v2.substr(2) + ".commit")
          != std::string::npos);
}

TEST_CASE("the ls104x boot script, as flashed, runs on this U-Boot over mmc up to booti: loads, tries, rollback"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path initramfs = initramfs_for(tmp.path(), "ls104x");
    fs::path repo = tmp / "repo";
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    std::vector<std::string> ls1043a{"--devicetree", (example / "kernel/fsl-ls1043a-rdb.dtb").string()};
    std::string v1 = commit(tmp / "rootfs", repo, initramfs, "1", ls1043a);
    // An LS104x card, sized as this machine's SD card model needs.
    fs::path image = tmp / "ls104x.img";
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", image.string(), "--size",
                                  "512M", "--repo", repo.string()});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);

    // U-Boot runs the script up to booti; the LS1043A kernel then does
    // nothing on a Pi, so the power is cut there.
    auto to_booti = [&](const std::string& name) {
        return boot_raspi(image, {"--marker", "Starting kernel ...", "--timeout", "90"}, tmp / (name + ".console"));
    };
    Boot b = to_booti("v1");
    CHECK(b.console.find("treeflash: loading /boot/loader/uEnv.txt from mmc 0:3") != std::string::npos);
    CHECK(b.console.find("treeflash: the only deployment, nothing to fall back to: not counting") != std::string::npos);
    CHECK(b.console.find("treeflash: kernel /boot/ostree/tcu-") != std::string::npos);
    CHECK(b.console.find("treeflash: initramfs /boot/ostree/tcu-") != std::string::npos);
    CHECK(b.console.find("treeflash: devicetree /boot/ostree/tcu-") != std::string::npos);
    CHECK(b.console.find("## Flattened Device Tree blob at") != std::string::npos);

    // v2: each boot that reaches booti without a health verdict is a try,
    // counted in the block with mmc write; after three, the script boots v1.
    write_file(tmp / "rootfs/usr/bin/e2e-version", "#!/bin/sh\necho v2\n", 0755);
    std::string v2 = commit(tmp / "rootfs", repo, initramfs, "2", ls1043a);
    upgrade(image);
    for (int trial = 1; trial <= 3; ++trial) {
        b = to_booti("trial-" + std::to_string(trial));
        CHECK(b.console.find("treeflash: trial boot " + std::to_string(trial) + " of 3 of the current deployment")
              != std::string::npos);
        CHECK(tries_written(image) == std::to_string(trial));
    }
    b = to_booti("rollback");
    CHECK(b.console.find("treeflash: the current deployment failed 3 tries; rolling back") != std::string::npos);
    CHECK(b.console.find("treeflash: kernel /boot/ostree/tcu-") != std::string::npos);
    json state = inspect(image);
    CHECK(state["deployments"][0]["commit"] == v2);
    CHECK(state["deployments"][0]["boot_state"] == "rolled back");
    CHECK(state["deployments"][1]["commit"] == v1);
}

TEST_CASE("qemu-raspi3b: a golden image made without privileges, written to a card with treeflash write, boots"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path initramfs = initramfs_for(tmp.path(), "qemu-raspi3b");
    make_e2e_rootfs(tmp / "rootfs", "v1", "motd v1");
    commit(tmp / "rootfs", tmp / "repo", initramfs, "1", {"--devicetree", rpi_devicetree().string()});
    fs::path golden = tmp / "golden.img";
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-raspi3b", "--image", golden.string(),
                                  "--image-method", "unprivileged", "--repo", (tmp / "repo").string(), "--compress",
                                  "zst", "--json"});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);
    CHECK(fs::file_size(golden) == (512ull << 20));

    // The card: as large as the image (QEMU's SD model needs a power of two).
    write_file(tmp / "card", "");
    fs::resize_file(tmp / "card", 512ull << 20);
    LoopGuard card(tmp / "card");
    auto written = run_treeflash({"write", (tmp / "golden.img.zst").string(), card.device, "--yes", "--force", "--json"});
    REQUIRE_MESSAGE(written.ok(), written.err);
    CHECK(json::parse(written.out)[0]["verified"] == true);

    Boot b = boot_raspi(card.device, {}, tmp / "card.console");
    CHECK(b.console.find("treeflash: loading /boot/loader/uEnv.txt from mmc 0:3") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v1");
    CHECK(b.last_line("E2E-OSTREE-BOOTED") == "yes");
    CHECK(b.last_line("E2E-BOOT-STATE") == "known-good");
}

} // TEST_SUITE
