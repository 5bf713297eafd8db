// What treeflash must never do as root: replace a file it did not make,
// write to a card that is in use or changed under it, delete a card's files
// on a failed unmount, or read host files through a card's symlinks.
#include "common/error.hpp"
#include "flasher/disk/mount.hpp"
#include "flasher/disk/target.hpp"
#include "tests/support/system.hpp"

#include <atomic>
#include <chrono>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/file.h>
#include <sys/mount.h>
#include <thread>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using nlohmann::json;

namespace {

const bool not_root = !is_root();
constexpr uint64_t MiB = 1 << 20;

} // namespace

TEST_SUITE("safety") {

TEST_CASE("an image that appears while flashing is left alone" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    pid_t pid = spawn_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(), "--repo",
                                 (tmp / "repo").string()},
                                (tmp / "flash.log").string());
    // Once the partial image exists, someone else puts a file at the path.
    for (int i = 0; i < 500 && !has_partial(tmp.path()); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    REQUIRE(has_partial(tmp.path()));
    write_file(image, "precious");
    CHECK(wait_exit(pid) == 1);
    CHECK(read_text(image) == "precious");
    CHECK_MESSAGE(read_text(tmp / "flash.log").find("appeared while the image was written; it was left alone")
                      != std::string::npos,
                  read_text(tmp / "flash.log"));
    CHECK_FALSE(has_partial(tmp.path()));
    // With --overwrite the user asked for it.
    auto replaced = flash_image(tmp / "repo", image, {"--overwrite"});
    CHECK_MESSAGE(replaced.ok(), replaced.err);
    CHECK(fs::file_size(image) > MiB);
}

TEST_CASE("--os that climbs out of the card is refused before anything is written" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    auto r = flash_image(tmp / "repo", tmp / "x.img", {"--os", "../../../../../../../../srv/treeflash-escape"});
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("--os '../../../../../../../../srv/treeflash-escape'") != std::string::npos);
    CHECK_FALSE(fs::exists("/srv/treeflash-escape"));
    CHECK_FALSE(fs::exists(tmp / "x.img"));
}

TEST_CASE("upgrade refuses an image that is attached, mounted or being upgraded" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    REQUIRE(flash_image(tmp / "repo", image).ok());
    auto [offset, size] = rootfs_extent(image);
    {
        // Mounted elsewhere, through its own loop device.
        MountedPartition mounted(image, offset, size, true);
        auto r = run_treeflash({"upgrade", image.string()});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find(" is attached to /dev/loop") != std::string::npos, r.err);
    }
    {
        // Another treeflash holds it.
        UniqueFd held(::open(image.c_str(), O_RDONLY | O_CLOEXEC));
        REQUIRE(::flock(held.get(), LOCK_EX) == 0);
        auto r = run_treeflash({"upgrade", image.string()});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("is in use by another treeflash") != std::string::npos, r.err);
    }
    CHECK(run_process({"e2fsck", "-fn", image.string() + "?offset=" + std::to_string(offset)}).exit_code <= 1);
}

TEST_CASE("a mount that cannot be undone loses no file" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    write_file(tmp / "fs.img", "");
    fs::resize_file(tmp / "fs.img", 16 * MiB);
    REQUIRE(run_process({"mkfs.ext4", "-q", (tmp / "fs.img").string()}).ok());
    LoopGuard loop(tmp / "fs.img");
    fs::path mountpoint;
    {
        flasher::Mount card(loop.device, "ext4", "", tmp.path());
        mountpoint = card.path();
        write_file(card.path() / "customer-data", "keep me");
        // Something else mounted on top: the Mount's own unmount removes
        // that one, and the card stays mounted below it.
        REQUIRE(::mount("tmpfs", card.path().c_str(), "tmpfs", 0, nullptr) == 0);
    }
    // The card is still mounted at the old mount point, with its file.
    CHECK(read_text(mountpoint / "customer-data") == "keep me");
    REQUIRE(::umount2(mountpoint.c_str(), 0) == 0);
    ::rmdir(mountpoint.c_str());
}

TEST_CASE("a device named through a link whose name ends in a digit" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    write_file(tmp / "disk.img", "");
    fs::resize_file(tmp / "disk.img", 600 * MiB);
    LoopGuard loop(tmp / "disk.img");
    fs::create_symlink(loop.device, tmp / "usb-Card_Reader-0:0");
    auto r = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--device",
                            (tmp / "usb-Card_Reader-0:0").string(), "--repo", (tmp / "repo").string(), "--force", "--yes"});
    CHECK_MESSAGE(r.ok(), r.err);
    auto info = run_treeflash({"inspect", loop.device, "--json"});
    REQUIRE_MESSAGE(info.ok(), info.err);
    CHECK(json::parse(info.out)["deployments"].size() == 1);
    // upgrade holds the device exclusively and works on it through the same name.
    auto upgraded = run_treeflash({"upgrade", (tmp / "usb-Card_Reader-0:0").string(), "--json"});
    REQUIRE_MESSAGE(upgraded.ok(), upgraded.err);
    CHECK(json::parse(upgraded.out)["changed"] == false);
    // And refuses it while one of its partitions is mounted.
    {
        Scratch mnt;
        REQUIRE(run_process({"mount", "-o", "ro", loop.device + "p2", mnt.path().string()}).ok());
        auto busy = run_treeflash({"upgrade", loop.device});
        run_process({"umount", mnt.path().string()});
        CHECK(busy.exit_code == 1);
        CHECK_MESSAGE(busy.err.find("is in use: " + loop.device + "p2 on") != std::string::npos, busy.err);
    }
}

TEST_CASE("a device that is not the one checked is not written" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    for (const char* name : {"a.img", "b.img"}) {
        write_file(tmp / name, "");
        fs::resize_file(tmp / name, 64 * MiB);
    }
    LoopGuard a(tmp / "a.img"), b(tmp / "b.img");
    flasher::DiskInfo checked = flasher::describe_disk(a.device);
    flasher::DiskInfo other = flasher::describe_disk(b.device);
    // The node now leads to another device than the one checked.
    checked.kernel_path = other.kernel_path;
    CHECK_THROWS_WITH_AS(flasher::Target::open_device(checked),
                         doctest::Contains("changed since it was checked (another device number); nothing was written"),
                         Error);
    checked = flasher::describe_disk(a.device);
    checked.size += MiB;
    CHECK_THROWS_WITH_AS(flasher::Target::open_device(checked), doctest::Contains("(another size: a different card?)"), Error);
    CHECK(read_text(tmp / "a.img") == std::string(64 * MiB, '\0'));
}

TEST_CASE("inspect never reads host files through the card's symlinks" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    REQUIRE(flash_image(tmp / "repo", image).ok());
    // Host files a hostile card points at.
    write_file(tmp / "host/uEnv.txt", "host_secret=HOST-SECRET-1\n");
    write_file(tmp / "host-config", "[remote \"origin\"]\nurl=HOST-SECRET-2\n");
    auto [offset, size] = rootfs_extent(image);
    {
        MountedPartition card(image, offset, size, true);
        fs::remove(card / "boot/loader");
        fs::create_symlink(tmp / "host", card / "boot/loader");
        fs::remove(card / "ostree/repo/config");
        fs::create_symlink(tmp / "host-config", card / "ostree/repo/config");
    }
    auto r = run_treeflash({"inspect", image.string(), "--json"});
    CHECK_MESSAGE(r.out.find("HOST-SECRET") == std::string::npos, r.out);
    CHECK(r.err.find("HOST-SECRET") == std::string::npos);
}

TEST_CASE("a file system that fills up under an image is named as such" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    std::string blob(150 << 20, '\0');
    for (size_t i = 0; i < blob.size(); ++i)
        blob[i] = static_cast<char>((i * 2654435761u) >> 13);
    write_file(tmp / "rootfs/usr/share/blob", blob);
    build_commit(tmp.path(), tmp / "repo");
    fs::create_directories(tmp / "small");
    REQUIRE(run_process({"mount", "-t", "tmpfs", "-o", "size=600M", "tmpfs", (tmp / "small").string()}).ok());
    struct Unmount {
        fs::path dir;
        ~Unmount() { run_process({"umount", dir.string()}); }
    } unmount{tmp / "small"};
    fs::path image = tmp / "small/card.img";
    std::string log = (tmp / "flash.log").string();
    // While the flash runs, something else takes every MiB that is free.
    UniqueFd filler(::open((tmp / "small/filler").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    REQUIRE(filler);
    pid_t pid = spawn_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(), "--size",
                                 "590M", "--repo", (tmp / "repo").string()},
                                log);
    std::atomic<bool> done{false};
    std::thread grab([&] {
        off_t offset = 0;
        while (!done) {
            // Start once the image exists, so the flash passes its own free-space check.
            if (has_partial(tmp / "small") && ::fallocate(filler.get(), 0, offset, 1 << 20) == 0)
                offset += 1 << 20;
        }
    });
    int code = wait_exit(pid);
    done = true;
    grab.join();
    CHECK(code == 1);
    std::string err = read_text(log);
    CHECK_MESSAGE(err.find("no space left on device") != std::string::npos, err);
    CHECK_FALSE(fs::exists(image));
}

TEST_CASE("a commit of many small files fits the default image size" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    for (int d = 0; d < 300; ++d)
        for (int f = 0; f < 100; ++f)
            write_file(tmp / ("rootfs/usr/share/many/" + std::to_string(d) + "/" + std::to_string(f)),
                       std::to_string(d) + "/" + std::to_string(f) + "\n");
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    auto r = flash_image(tmp / "repo", image, {"--json"});
    REQUIRE_MESSAGE(r.ok(), r.err);
    auto info = run_treeflash({"inspect", image.string(), "--json"});
    REQUIRE_MESSAGE(info.ok(), info.err);
    CHECK(json::parse(info.out)["deployments"].size() == 1);
    // Room for an upgrade: a second deployment of as many entries needs inodes and blocks too.
    auto [offset, size] = rootfs_extent(image);
    auto dump = run_process({"dumpe2fs", "-h", image.string() + "?offset=" + std::to_string(offset)});
    auto count = [&](const std::string& key) {
        auto pos = dump.out.find(key + ":");
        REQUIRE(pos != std::string::npos);
        return std::stoull(dump.out.substr(dump.out.find_first_not_of(' ', pos + key.size() + 1)));
    };
    CHECK(count("Free inodes") > 30000);
    CHECK(count("Free blocks") * 4096 > 30000ull * 4096);
}

}
