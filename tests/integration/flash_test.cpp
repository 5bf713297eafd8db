// treeflash flash and inspect on real image files, loop devices, mounts
// and an nginx server on 127.0.0.1, checked with independent tools:
// sfdisk, blkid, dumpe2fs, ostree admin status, mkimage, raw bytes.
// Needs root; every test skips cleanly otherwise.
#include "tests/support/system.hpp"

#include "common/glib.hpp"

#include <chrono>
#include <csignal>
#include <cstring>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <map>
#include <nlohmann/json.hpp>
#include <ostree.h>
#include <random>
#include <spawn.h>
#include <sstream>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using nlohmann::json;

extern char** environ;

namespace {

const bool not_root = !is_root();
constexpr uint64_t MiB = 1 << 20;

// The whole disk holding /, or "" when / is not on a block device here
// (an overlay or a container's root): the case that needs it is skipped.
const std::string& root_disk()
{
    static const std::string disk = [] {
        auto source = run_process({"findmnt", "-n", "-o", "SOURCE", "/"});
        std::string root_dev = source.out.substr(0, source.out.find('\n'));
        auto parent = run_process({"lsblk", "-n", "-d", "-o", "PKNAME", root_dev});
        std::string whole = parent.out.substr(0, parent.out.find('\n'));
        std::string target = whole.empty() ? root_dev : "/dev/" + whole;
        return target.rfind("/dev/", 0) == 0 && fs::exists(target) ? target : std::string();
    }();
    return disk;
}

// Commits 60 MiB of random files in `tmp` and starts an ls104x flash of
// them into `image`, logging to `log`; returns once it pulls (the rootfs
// partition is mounted then).
pid_t flash_until_pulling(const Scratch& tmp, const fs::path& image, const std::string& log)
{
    make_rootfs(tmp / "rootfs");
    for (int i = 0; i < 60; ++i)
        write_file(tmp / ("rootfs/usr/share/blob/" + std::to_string(i)), random_bytes(1 << 20, static_cast<unsigned>(i)));
    build_commit(tmp.path(), tmp / "repo");
    pid_t pid = spawn_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", image.string(), "--repo",
                                 (tmp / "repo").string()},
                                log);
    for (int i = 0; i < 500 && read_text(log).find("pulling") == std::string::npos; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return pid;
}

struct Partition {
    uint64_t start, size;
};

// Partition N of an image as sfdisk -d lists it.
Partition sfdisk_partition(const std::string& dump, const fs::path& image, int number)
{
    std::string key = image.string() + std::to_string(number) + " : start=";
    auto pos = dump.find(key);
    REQUIRE_MESSAGE(pos != std::string::npos, dump);
    uint64_t start = std::stoull(dump.substr(pos + key.size()));
    auto size_pos = dump.find("size=", pos);
    uint64_t size = std::stoull(dump.substr(size_pos + 5));
    return {start * 512, size * 512};
}

int one_line_count(const std::string& text)
{
    return static_cast<int>(std::count(text.begin(), text.end(), '\n'));
}

} // namespace

TEST_SUITE("flash") {

TEST_CASE("ls104x image from a local repository, checked with independent tools" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    std::string commit = build_commit(tmp.path(), tmp / "repo", {"--version", "7"});
    std::string rcw = random_bytes(4096, 1), fip = random_bytes(100000, 2), phy = random_bytes(70000, 3);
    write_file(tmp / "rcw.pbl", rcw);
    write_file(tmp / "fip.bin", fip);
    write_file(tmp / "phy.bin", phy);
    fs::path image = tmp / "card.img";
    auto result = run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", image.string(), "--repo", (tmp / "repo").string(),
                                 "--remote-url", "http://10.0.0.2:8000/", "--karg", "quiet", "--firmware",
                                 "rcw=" + (tmp / "rcw.pbl").string(), "--firmware", "fip=" + (tmp / "fip.bin").string(),
                                 "--firmware", "phy=" + (tmp / "phy.bin").string(), "--json"});
    REQUIRE_MESSAGE(result.ok(), result.err);

    // The block map beside it: bmaptool copies the image with it (checking
    // every range), and the copy is the image byte for byte.
    fs::path bmap = image.string() + ".bmap";
    CHECK(json::parse(result.out)["bmap"] == bmap.string());
    auto copied = run_process({"bmaptool", "copy", "--bmap", bmap.string(), image.string(), (tmp / "copy.img").string()});
    CHECK_MESSAGE(copied.ok(), copied.err);
    CHECK(run_process({"cmp", image.string(), (tmp / "copy.img").string()}).ok());
    json out = json::parse(result.out);
    CHECK(out["commit"] == commit);
    CHECK(out["board"] == "ls104x");
    CHECK(out["version"] == "7");

    // Partition table: MBR, explicit starts, p1 bootable.
    auto dump = run_process({"sfdisk", "-d", image.string()});
    REQUIRE(dump.ok());
    CHECK(dump.out.find("label: dos") != std::string::npos);
    Partition p1 = sfdisk_partition(dump.out, image, 1), p2 = sfdisk_partition(dump.out, image, 2),
              p3 = sfdisk_partition(dump.out, image, 3);
    CHECK(p1.start == 64 * MiB);
    CHECK(p2.start == 96 * MiB);
    CHECK(p3.start == 160 * MiB);
    CHECK(dump.out.find("start=      131072, size=       65536, type=83, bootable") != std::string::npos);

    // Labels and file systems, then the ext4 features U-Boot needs.
    const std::pair<Partition, const char*> labels[] = {{p1, "boot"}, {p2, "data"}, {p3, "rootfs"}};
    for (const auto& [part, label] : labels) {
        auto probe = run_process({"blkid", "-p", "-O", std::to_string(part.start), "-S", std::to_string(part.size),
                                  "-o", "export", image.string()});
        CHECK(probe.out.find("TYPE=ext4") != std::string::npos);
        CHECK(probe.out.find(std::string("LABEL=") + label + "\n") != std::string::npos);
    }
    {
        MountedPartition rootfs(image, p3.start, p3.size);
        auto loopdev = run_process({"findmnt", "-n", "-o", "SOURCE", rootfs.dir.path().string()});
        std::string dev = loopdev.out.substr(0, loopdev.out.find('\n'));
        auto header = run_process({"dumpe2fs", "-h", dev});
        CHECK(header.out.find("Block size:               4096") != std::string::npos);
        CHECK(header.out.find(" 64bit") == std::string::npos);
        CHECK(header.out.find("metadata_csum") == std::string::npos);

        // The sysroot, as the how-to lays it out.
        CHECK(fs::is_directory(rootfs / "newroot"));
        CHECK(fs::is_directory(rootfs / "mnt"));
        CHECK(fs::is_regular_file(rootfs / "update"));
        CHECK(fs::read_symlink(rootfs / "boot/loader").string().rfind("loader.", 0) == 0);
        auto status = run_process({"ostree", "admin", "status", "--sysroot=" + rootfs.dir.path().string()});
        REQUIRE_MESSAGE(status.ok(), status.err);
        CHECK(status.out.find("tcu " + commit + ".0") != std::string::npos);
        CHECK(status.out.find("Version: 7") != std::string::npos);
        CHECK(status.out.find("origin refspec: origin:master") != std::string::npos);
        std::string config = read_text(rootfs / "ostree/repo/config");
        CHECK(config.find("url=http://10.0.0.2:8000/") != std::string::npos);
        CHECK(config.find("gpg-verify=false") != std::string::npos);
        std::string uenv = read_text(rootfs / "boot/loader/uEnv.txt");
        CHECK(uenv.find("ostree_root=/dev/mmcblk0p3") != std::string::npos);
        CHECK(uenv.find("console=ttyS0,115200") != std::string::npos);
        CHECK(uenv.find(" quiet") != std::string::npos);
        CHECK(uenv.find("ostree=" + out["ostree"].get<std::string>()) != std::string::npos);
        CHECK(out["bootargs"].get<std::string>().find("setenv bootargs \"console=ttyS0,115200") == 0);
    }
    {
        MountedPartition boot(image, p1.start, p1.size);
        auto listing = run_process({"mkimage", "-l", (boot / "boot.scr").string()});
        CHECK(listing.out.find("Script") != std::string::npos);
        std::string script = read_text(boot / "boot.cmd");
        CHECK(script.find("/boot/loader/uEnv.txt") != std::string::npos);
        CHECK(script.find("setenv ostree_part ${devnum}:3") != std::string::npos);
        CHECK(script.find("setenv devtype mmc") != std::string::npos);
    }
    // Firmware bytes at their offsets.
    CHECK(read_bytes(image, 0x1000, rcw.size()) == rcw);
    CHECK(read_bytes(image, 0x100000, fip.size()) == fip);
    CHECK(read_bytes(image, 0x980000, phy.size()) == phy);

    // inspect reads the same back.
    auto inspected = run_treeflash({"inspect", image.string(), "--json"});
    REQUIRE_MESSAGE(inspected.ok(), inspected.err);
    json info = json::parse(inspected.out);
    CHECK(info["deployments"][0]["commit"] == commit);
    CHECK(info["deployments"][0]["role"] == "default");
    CHECK(info["origin_url"] == "http://10.0.0.2:8000/");
    CHECK(info["update_marker"] == true);
    CHECK(info["newroot"] == true);
    CHECK(info["mnt"] == true);
    CHECK(info["boot_script"] == true);
    CHECK(info["partitions"][2]["label"] == "rootfs");
    CHECK(info["uenv"]["bootargs"].get<std::string>().find(out["ostree"].get<std::string>()) != std::string::npos);
}

TEST_CASE("images of one size: each file system a copy of one kept blank, with a UUID of its own" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo", {});
    // Each flash as the user runs it: the cache in its own folder here.
    std::vector<std::string> env{"XDG_CACHE_HOME=" + (tmp / "cache").string()};
    fs::path kept = tmp / "cache/treeflash/blank-ext4";
    auto flash = [&](const fs::path& image, const std::vector<std::string>& extra_env) {
        std::vector<std::string> flash_env = env;
        flash_env.insert(flash_env.end(), extra_env.begin(), extra_env.end());
        auto result = run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", image.string(), "--size", "512M",
                                     "--repo", (tmp / "repo").string()}, flash_env);
        REQUIRE_MESSAGE(result.ok(), result.err);
    };
    const fs::path images[] = {tmp / "first.img", tmp / "second.img", tmp / "by-mkfs.img"};
    flash(images[0], {});
    flash(images[1], {});
    flash(images[2], {"TREEFLASH_BLANK_CACHE=off"});
    size_t kept_count = 0;
    for (const auto& entry : fs::directory_iterator(kept))
        kept_count += entry.path().extension() == ".ext4";
    CHECK(kept_count == 3); // boot, data, rootfs: made by the first flash, copied by the second

    std::map<std::string, int> uuids;
    for (int number = 1; number <= 3; ++number) {
        std::string layout[3];
        for (int i = 0; i < 3; ++i) {
            auto dump = run_process({"sfdisk", "-d", images[i].string()});
            REQUIRE(dump.ok());
            Partition part = sfdisk_partition(dump.out, images[i], number);
            std::string at = images[i].string() + "?offset=" + std::to_string(part.start);
            auto check = run_process({"e2fsck", "-fn", at});
            std::string report = at + ": " + check.out + check.err;
            CHECK_MESSAGE((check.ok() && report.find("? no") == std::string::npos && report.find("IGNORED") == std::string::npos), report);
            auto header = run_process({"dumpe2fs", "-h", at});
            REQUIRE(header.ok());
            std::istringstream lines(header.out);
            for (std::string line; std::getline(lines, line);) {
                if (line.rfind("Filesystem UUID:", 0) == 0)
                    ++uuids[line];
                else if (line.find("time") == std::string::npos && line.rfind("Filesystem created", 0) != 0
                         && line.rfind("Directory Hash Seed", 0) != 0 && line.rfind("Lifetime writes", 0) != 0
                         && line.rfind("Free ", 0) != 0 && line.rfind("Journal sequence", 0) != 0
                         && line.rfind("Mount count", 0) != 0 && line.rfind("Last ", 0) != 0)
                    layout[i] += line + "\n";
            }
        }
        // What a kept blank becomes is what mkfs.ext4 makes on the loop device.
        CHECK(layout[0] == layout[2]);
        CHECK(layout[1] == layout[2]);
    }
    CHECK(uuids.size() == 9); // no two file systems share a UUID
}

TEST_CASE("qemu-arm64 image pulled over HTTP from nginx, with a GPG-verified origin" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path home = tmp / "gnupg";
    fs::create_directories(home);
    fs::permissions(home, fs::perms::owner_all);
    REQUIRE(run_process({"gpg", "--homedir", home.string(), "--batch", "--passphrase", "", "--quick-gen-key",
                         "release <release@example.invalid>", "ed25519", "sign", "never"}).ok());
    auto fpr = run_process({"sh", "-c", "gpg --homedir " + home.string() + " --with-colons --list-secret-keys | awk -F: '/^fpr/{print $10; exit}'"});
    std::string key = fpr.out.substr(0, 40);
    write_file(tmp / "release.gpg", run_process({"gpg", "--homedir", home.string(), "--export", key}).out);
    std::string commit = build_commit(tmp.path(), tmp / "repo", {"--gpg-sign", key, "--gpg-homedir", home.string()});
    run_process({"gpgconf", "--homedir", home.string(), "--kill", "all"});

    RepoServer server(tmp / "repo");
    fs::path image = tmp / "qemu.img";
    auto result = run_treeflash({"flash", "--board", "qemu-arm64", "--image", image.string(), "--repo", server.url(),
                                 "--gpg-import", (tmp / "release.gpg").string(), "--json"});
    REQUIRE_MESSAGE(result.ok(), result.err);
    json out = json::parse(result.out);
    CHECK(out["commit"] == commit);
    CHECK(out["remote_url"] == server.url());
    CHECK(out["gpg_verify"] == true);
    // A signed commit is pulled, and its signature checked, by libostree.
    std::istringstream log(server.access_log());
    int commit_by_libostree = 0;
    for (std::string line; std::getline(log, line);)
        if (line.find(commit.substr(2) + ".commit ") != std::string::npos && line.find("\"treeflash\"") == std::string::npos)
            commit_by_libostree++;
    CHECK(commit_by_libostree > 0);
    auto dump = run_process({"sfdisk", "-d", image.string()});
    Partition p3 = sfdisk_partition(dump.out, image, 3);
    MountedPartition rootfs(image, p3.start, p3.size);
    std::string config = read_text(rootfs / "ostree/repo/config");
    CHECK(config.find("url=" + server.url()) != std::string::npos);
    CHECK(config.find("gpg-verify=true") != std::string::npos);
    std::string uenv = read_text(rootfs / "boot/loader/uEnv.txt");
    CHECK(uenv.find("console=ttyAMA0") != std::string::npos);
    CHECK(uenv.find("ostree_root=LABEL=rootfs") != std::string::npos);

    // An unsigned commit on the server: the card refuses it.
    fs::remove_all(tmp / "repo");
    build_commit(tmp.path(), tmp / "repo");
    auto unsigned_pull = run_treeflash({"flash", "--board", "qemu-arm64", "--image", (tmp / "unsigned.img").string(),
                                        "--repo", server.url(), "--gpg-import", (tmp / "release.gpg").string()});
    CHECK(unsigned_pull.exit_code == 1);
    CHECK(unsigned_pull.err.find("GPG") != std::string::npos);
    CHECK(unsigned_pull.err.find("(no image was written)") != std::string::npos);
    CHECK_FALSE(fs::exists(tmp / "unsigned.img"));
}

// The checksum of the content object of `path` in the commit `ref` of `repo`.
std::string object_of(const fs::path& repo, const std::string& path)
{
    auto listed = run_process({"ostree", "--repo=" + repo.string(), "ls", "-C", "master", path});
    REQUIRE_MESSAGE(listed.ok(), listed.err);
    std::istringstream fields(listed.out);
    std::string mode, uid, gid, size, checksum;
    fields >> mode >> uid >> gid >> size >> checksum;
    REQUIRE(checksum.size() == 64);
    return checksum;
}

TEST_CASE("over HTTP treeflash fetches the commit's objects itself, and the card holds each file as committed"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path rootfs = tmp / "rootfs";
    make_rootfs(rootfs);
    write_file(rootfs / "usr/bin/set-id-tool", "#!/bin/sh\n");
    fs::permissions(rootfs / "usr/bin/set-id-tool", static_cast<fs::perms>(04755));
    write_file(rootfs / "usr/share/owned", "someone else's\n");
    REQUIRE(::chown((rootfs / "usr/share/owned").c_str(), 1234, 2345) == 0);
    std::string big;
    std::mt19937 rng(7);
    while (big.size() < 3 * MiB)
        big += "record " + std::to_string(rng() % 1000) + " ";
    write_file(rootfs / "usr/share/big", big);
    write_file(rootfs / "usr/share/empty", "");
    fs::create_symlink("big", rootfs / "usr/share/big-link");
    REQUIRE(::setxattr((rootfs / "usr/share/big").c_str(), "user.treeflash-test", "kept", 4, 0) == 0);
    std::string commit = build_commit(tmp.path(), tmp / "repo");

    RepoServer server(tmp / "repo");
    fs::path image = tmp / "card.img";
    auto result = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(),
                                 "--repo", server.url()});
    REQUIRE_MESSAGE(result.ok(), result.err);
    CHECK_MESSAGE(result.err.find(" objects (") != std::string::npos, result.err);
    CHECK_MESSAGE(result.err.find("written without libostree's pull") != std::string::npos, result.err);
    // Unsigned and fetched whole by treeflash: libostree's pull was not
    // needed, and made no request at all (the ref, the commit, the objects).
    std::istringstream log(server.access_log());
    int by_treeflash = 0;
    std::vector<std::string> by_libostree;
    for (std::string line; std::getline(log, line);) {
        if (line.find("\"treeflash\"") == std::string::npos)
            by_libostree.push_back(line);
        else if (line.find(".filez") != std::string::npos)
            by_treeflash++;
    }
    CHECK(by_treeflash > 10);
    CHECK_MESSAGE(by_libostree.empty(), by_libostree.front());

    auto dump = run_process({"sfdisk", "-d", image.string()});
    Partition p3 = sfdisk_partition(dump.out, image, 3);
    MountedPartition card(image, p3.start, p3.size);
    auto fsck = run_process({"ostree", "fsck", "--repo=" + (card / "ostree/repo").string()});
    CHECK_MESSAGE(fsck.ok(), fsck.err);
    CHECK(run_process({"ostree", "rev-parse", "--repo=" + (card / "ostree/repo").string(), "origin:master"}).out == commit + "\n");
    fs::path deployed = card / ("ostree/deploy/tcu/deploy/" + commit + ".0");
    REQUIRE(fs::is_directory(deployed));
    struct stat st {};
    REQUIRE(::lstat((deployed / "usr/bin/set-id-tool").c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 04755);
    REQUIRE(::lstat((deployed / "usr/share/owned").c_str(), &st) == 0);
    CHECK(st.st_uid == 1234);
    CHECK(st.st_gid == 2345);
    CHECK(read_text(deployed / "usr/share/big") == big);
    CHECK(read_text(deployed / "usr/share/empty").empty());
    CHECK(fs::read_symlink(deployed / "usr/share/big-link") == "big");
    char value[16] = {};
    CHECK(::getxattr((deployed / "usr/share/big").c_str(), "user.treeflash-test", value, sizeof value) == 4);
    CHECK(std::string(value) == "kept");
}

TEST_CASE("over HTTP the ref is read as libostree's pull reads it, and a commit bound to another ref is refused"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path repo = tmp / "repo";
    std::string listed = build_commit(tmp.path(), repo); // the summary names it
    REQUIRE(fs::exists(repo / "summary"));
    auto commit_of_tree = [&](std::vector<std::string> extra) {
        std::vector<std::string> args{"ostree", "commit", "--repo=" + repo.string(), "--orphan", "--tree=ref=" + listed,
                                      "--subject", "another commit of the same tree"};
        args.insert(args.end(), extra.begin(), extra.end());
        auto made = run_process(args);
        REQUIRE_MESSAGE(made.ok(), made.err);
        return made.out.substr(0, 64);
    };
    // refs/heads/master moves on, the summary is not updated.
    std::string unlisted = commit_of_tree({"--no-bindings", "--add-detached-metadata-string=treeflash.test=kept"});
    write_file(repo / "refs/heads/master", unlisted + "\n");
    RepoServer server(repo);

    // What libostree's own pull takes master to be, from the same server
    // ("refused: WHY" when it refuses).
    auto libostree_takes = [&] {
        Scratch scratch;
        REQUIRE(run_process({"ostree", "init", "--repo=" + scratch.path().string(), "--mode=bare-user"}).ok());
        REQUIRE(run_process({"ostree", "remote", "add", "--repo=" + scratch.path().string(), "--no-gpg-verify", "origin",
                             server.url()}).ok());
        auto pulled = run_process({"ostree", "pull", "--repo=" + scratch.path().string(), "--commit-metadata-only",
                                   "origin", "master"});
        if (!pulled.ok())
            return std::string("refused: ") + pulled.err;
        return run_process({"ostree", "rev-parse", "--repo=" + scratch.path().string(), "origin:master"}).out.substr(0, 64);
    };
    auto flashed = [&](const fs::path& image) {
        // Commits made by the ostree CLI do not record their size.
        auto result = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(),
                                     "--size", "512M", "--repo", server.url(), "--json"});
        REQUIRE_MESSAGE(result.ok(), result.err);
        CHECK_MESSAGE(result.err.find("written without libostree's pull") != std::string::npos, result.err);
        return json::parse(result.out)["commit"].get<std::string>();
    };

    // With a summary, its commit, as libostree's pull. The server answers
    // 403 for the commit's detached metadata (as S3-style hosts answer for
    // what they lack: its workers cannot read the file): that is "none", to
    // libostree as to treeflash.
    fs::path forbidden = repo / "objects" / listed.substr(0, 2) / (listed.substr(2) + ".commitmeta");
    write_file(forbidden, "not for the server's workers");
    fs::permissions(forbidden, fs::perms::owner_read | fs::perms::owner_write);
    REQUIRE(libostree_takes() == listed);
    CHECK(flashed(tmp / "summary.img") == listed);
    CHECK(server.access_log().find(listed.substr(2) + ".commitmeta HTTP/1.1\" 403 ") != std::string::npos);
    fs::remove(forbidden);

    // Without one, refs/heads/master's; its detached metadata reaches the
    // card as libostree's pull would bring it.
    fs::remove(repo / "summary");
    REQUIRE(libostree_takes() == unlisted);
    fs::path image = tmp / "heads.img";
    CHECK(flashed(image) == unlisted);
    {
        auto dump = run_process({"sfdisk", "-d", image.string()});
        Partition p3 = sfdisk_partition(dump.out, image, 3);
        MountedPartition card(image, p3.start, p3.size);
        std::string card_repo = "--repo=" + (card / "ostree/repo").string();
        CHECK(run_process({"ostree", "rev-parse", card_repo, "origin:master"}).out == unlisted + "\n");
        auto detached = run_process({"ostree", "show", card_repo, "--print-detached-metadata-key=treeflash.test", unlisted});
        CHECK_MESSAGE(detached.out == "'kept'\n", std::string(detached.out + detached.err));
        auto fsck = run_process({"ostree", "fsck", card_repo});
        CHECK_MESSAGE(fsck.ok(), fsck.err);
    }

    // A commit bound to another branch, served as master: refused, as
    // libostree's pull refuses it.
    std::string bound = commit_of_tree({"--bind-ref=release"});
    write_file(repo / "refs/heads/master", bound + "\n");
    CHECK_MESSAGE(libostree_takes().find("refused: ") == 0, "libostree's pull took the bound commit");
    auto refused = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image",
                                  (tmp / "bound.img").string(), "--size", "512M", "--repo", server.url()});
    CHECK(refused.exit_code == 1);
    // By the plan, before the card is touched.
    CHECK_MESSAGE(refused.err.find("source: commit " + bound + " is bound to the refs release, not to master") != std::string::npos,
                  refused.err);
    CHECK_FALSE(fs::exists(tmp / "bound.img"));

    // A commit whose parent checksum has 5 bytes (its own checksum right):
    // libostree's pull refuses its structure, and so does the plan.
    std::string listed_bytes = read_text(repo / "objects" / listed.substr(0, 2) / (listed.substr(2) + ".commit"));
    glib::Variant original = glib::adopt_variant(g_variant_new_from_data(
        OSTREE_COMMIT_GVARIANT_FORMAT, listed_bytes.data(), listed_bytes.size(), FALSE, nullptr, nullptr));
    std::vector<GVariant*> fields;
    for (gsize i = 0; i < g_variant_n_children(original.get()); ++i)
        fields.push_back(i == 1 ? g_variant_new_fixed_array(G_VARIANT_TYPE_BYTE, "\1\2\3\4\5", 5, 1)
                                : g_variant_get_child_value(original.get(), i));
    glib::Variant malformed = glib::adopt_variant(g_variant_new_tuple(fields.data(), fields.size()));
    std::string malformed_bytes(static_cast<const char*>(g_variant_get_data(malformed.get())), g_variant_get_size(malformed.get()));
    std::string short_parent = sha256_hex(malformed_bytes);
    write_file(repo / "objects" / short_parent.substr(0, 2) / (short_parent.substr(2) + ".commit"), malformed_bytes);
    write_file(repo / "refs/heads/master", short_parent + "\n");
    CHECK_MESSAGE(libostree_takes().find("refused: ") == 0, "libostree's pull took the malformed commit");
    auto malformed_flash = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image",
                                          (tmp / "malformed.img").string(), "--size", "512M", "--repo", server.url()});
    CHECK_MESSAGE(malformed_flash.exit_code == 1, malformed_flash.err);
    // By the plan, before the card is touched.
    CHECK_MESSAGE(malformed_flash.err.find("source: ") != std::string::npos, malformed_flash.err);
    CHECK_MESSAGE(malformed_flash.err.find("partitioning") == std::string::npos, malformed_flash.err);
    CHECK_FALSE(fs::exists(tmp / "malformed.img"));
}

TEST_CASE("a file too big for the prefetch's memory reaches the card through libostree's pull"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path rootfs = tmp / "rootfs";
    make_rootfs(rootfs);
    std::string big(65 * MiB, '\0'); // does not compress: over the 64 MiB a fetch may hold
    std::mt19937_64 rng(11);
    for (size_t i = 0; i + 8 <= big.size(); i += 8) {
        uint64_t word = rng();
        std::memcpy(big.data() + i, &word, 8);
    }
    write_file(rootfs / "usr/share/firmware.bin", big);
    std::string commit = build_commit(tmp.path(), tmp / "repo");
    std::string object = object_of(tmp / "repo", "/usr/share/firmware.bin");

    RepoServer server(tmp / "repo");
    fs::path image = tmp / "card.img";
    auto result = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(),
                                 "--repo", server.url()});
    REQUIRE_MESSAGE(result.ok(), result.err);
    CHECK_MESSAGE(result.err.find("ahead of the pull stopped") == std::string::npos, result.err);
    // libostree fetched that one object (treeflash gave it up, having asked), and nothing else.
    std::istringstream log(server.access_log());
    std::vector<std::string> by_libostree;
    for (std::string line; std::getline(log, line);)
        if (line.find(".filez") != std::string::npos && line.find("\"treeflash\"") == std::string::npos)
            by_libostree.push_back(line);
    REQUIRE(by_libostree.size() == 1);
    CHECK(by_libostree[0].find(object.substr(2)) != std::string::npos);

    auto dump = run_process({"sfdisk", "-d", image.string()});
    Partition p3 = sfdisk_partition(dump.out, image, 3);
    MountedPartition card(image, p3.start, p3.size);
    fs::path deployed = card / ("ostree/deploy/tcu/deploy/" + commit + ".0");
    CHECK(read_text(deployed / "usr/share/firmware.bin") == big);
}

TEST_CASE("a corrupt object on the server: the flash fails naming it, and no image is left"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    std::string object = object_of(tmp / "repo", "/usr/bin/busybox");
    fs::path file = tmp / "repo/objects" / object.substr(0, 2) / (object.substr(2) + ".filez");
    std::string bytes = read_text(file);
    bytes[bytes.size() - 5] ^= 0x5a; // inside the compressed bytes
    write_file(file, bytes);

    RepoServer server(tmp / "repo");
    fs::path image = tmp / "card.img";
    auto result = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(),
                                 "--repo", server.url()});
    CHECK(result.exit_code == 1);
    // treeflash's fetch stops at the object, naming it; libostree's pull
    // then fails on it.
    CHECK_MESSAGE(result.err.find("ahead of the pull stopped (object " + object) != std::string::npos, result.err);
    CHECK_MESSAGE(result.err.find("sysroot: pull: origin:master:") != std::string::npos, result.err);
    CHECK_MESSAGE(result.err.find("(no image was written)") != std::string::npos, result.err);
    CHECK_FALSE(fs::exists(image));
}

TEST_CASE("refusals: one clear line, nothing written, nothing left behind" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    std::string repo = (tmp / "repo").string();
    auto refuse = [&](const std::vector<std::string>& args, const std::string& expected, int max_lines = 2) {
        std::vector<std::string> full{"flash", "--no-gpg-verify"};
        full.insert(full.end(), args.begin(), args.end());
        auto r = run_treeflash(full);
        CHECK_MESSAGE(r.exit_code != 0, expected);
        CHECK_MESSAGE(r.err.find(expected) != std::string::npos, r.err);
        CHECK_MESSAGE(one_line_count(r.err) <= max_lines, r.err); // the error (and at most one warning)
        return r;
    };

    SUBCASE("a loop device with a mounted partition")
    {
        // A card that is in use: flash an image, attach it, mount p2.
        fs::path image = tmp / "busy.img";
        REQUIRE(run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", image.string(), "--repo", repo}).ok());
        // p2 gets mounted (and so written by the kernel); everything else must stay as it was.
        auto outside_p2 = [&] { return sha256_hex(read_bytes(image, 0, 96 * MiB)) + sha256_hex(read_bytes(image, 160 * MiB, 1 << 30)); };
        std::string before = outside_p2();
        {
            LoopGuard loop(image);
            Scratch mnt;
            REQUIRE(run_process({"mount", loop.device + "p2", mnt.path().string()}).ok());
            refuse({"--board", "ls104x", "--device", loop.device, "--repo", repo, "--force", "--yes"}, "is in use: " + loop.device + "p2 on");
            refuse({"--board", "ls104x", "--device", loop.device + "p1", "--repo", repo, "--force", "--yes"},
                   "is a partition; name the whole disk (" + loop.device + ")");
            run_process({"umount", mnt.path().string()});
        }
        CHECK(outside_p2() == before);
    }
    SUBCASE("a device smaller than the layout")
    {
        write_file(tmp / "small.img", "");
        fs::resize_file(tmp / "small.img", 100 * MiB);
        LoopGuard loop(tmp / "small.img");
        refuse({"--board", "ls104x", "--device", loop.device, "--repo", repo, "--force", "--yes"}, "is too small");
        CHECK(read_bytes(tmp / "small.img", 0, 4096) == std::string(4096, '\0'));
    }
    SUBCASE("a non-removable disk without --force, and a device without --yes and no terminal")
    {
        write_file(tmp / "disk.img", "");
        fs::resize_file(tmp / "disk.img", 600 * MiB);
        LoopGuard loop(tmp / "disk.img");
        refuse({"--board", "ls104x", "--device", loop.device, "--repo", repo, "--yes"}, "is not a removable disk; pass --force");
        refuse({"--board", "ls104x", "--device", loop.device, "--repo", repo, "--force"}, "without confirmation: pass --yes", 8);
        CHECK(read_bytes(tmp / "disk.img", 0, 1 << 20) == std::string(1 << 20, '\0'));
    }
    SUBCASE("boards: unknown, and one with a mistake")
    {
        refuse({"--board", "nosuchboard", "--image", (tmp / "x.img").string(), "--repo", repo}, "unknown board 'nosuchboard'");
        fs::copy(fs::path(TREEFLASH_SOURCE_DIR) / "board/ls104x", tmp / "myboard");
        std::string conf = read_text(tmp / "myboard/board.conf");
        write_file(tmp / "myboard/board.conf", conf + "firmware.bad = 0x1000\n");
        int line = one_line_count(conf) + 1;
        refuse({"--board", (tmp / "myboard").string(), "--image", (tmp / "x.img").string(), "--repo", repo},
               "board.conf:" + std::to_string(line) + ": expected 'firmware.NAME = OFFSET MAX_SIZE'");
        write_file(tmp / "myboard/board.conf", conf);
        write_file(tmp / "myboard/partitions.sfdisk", "label: dos\nunit: sectors\n\nstart=131072, size=65536, type=83\nsize=1000, type=83\nstart=327680, type=83\n");
        refuse({"--board", (tmp / "myboard").string(), "--image", (tmp / "x.img").string(), "--repo", repo},
               "partitions.sfdisk:5: every partition needs an explicit start=");
        CHECK_FALSE(fs::exists(tmp / "x.img"));
    }
    SUBCASE("a ref the repository lacks, an unreachable URL, an existing image, a firmware blob too big")
    {
        refuse({"--board", "ls104x", "--image", (tmp / "x.img").string(), "--repo", repo, "--ref", "nope"},
               "ref 'nope' is not in " + repo + " (refs: master)");
        refuse({"--board", "ls104x", "--image", (tmp / "x.img").string(), "--repo", "http://127.0.0.1:9/"},
               "source: fetch master from http://127.0.0.1:9/");
        write_file(tmp / "exists.img", "precious");
        refuse({"--board", "ls104x", "--image", (tmp / "exists.img").string(), "--repo", repo}, "exists; pass --overwrite");
        CHECK(read_text(tmp / "exists.img") == "precious");
        // What the flash would publish beside a new image is checked as early.
        write_file(tmp / "new.img.bmap", "another image's map");
        refuse({"--board", "ls104x", "--image", (tmp / "new.img").string(), "--repo", repo}, "new.img.bmap exists; pass --overwrite");
        CHECK(read_text(tmp / "new.img.bmap") == "another image's map");
        write_file(tmp / "new2.img.zst", "another image");
        refuse({"--board", "ls104x", "--image", (tmp / "new2.img").string(), "--repo", repo, "--compress", "zst"},
               "new2.img.zst exists; pass --overwrite");
        CHECK(read_text(tmp / "new2.img.zst") == "another image");
        CHECK_FALSE(fs::exists(tmp / "new.img"));
        CHECK_FALSE(fs::exists(tmp / "new2.img"));
        CHECK_FALSE(fs::exists(tmp / "new2.img.bmap"));
        write_file(tmp / "huge.pbl", std::string(0x100000, 'x'));
        refuse({"--board", "ls104x", "--image", (tmp / "x.img").string(), "--repo", repo, "--firmware",
                "rcw=" + (tmp / "huge.pbl").string()}, "slot rcw holds 1044480");
        CHECK_FALSE(fs::exists(tmp / "x.img"));
    }
    SUBCASE("not root: no device, and no loop devices for an image")
    {
        ToolsForOtherUsers tools = tools_for_other_users(tmp.path());
        std::vector<std::string> as_nobody{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", tools.treeflash.string(),
                                           "flash", "--board", (tools.boards / "ls104x").string(), "--repo", repo,
                                           "--no-gpg-verify"};
        auto args = as_nobody;
        args.insert(args.end(), {"--device", "/dev/loop0", "--yes"});
        auto r = run_process(args);
        CHECK(r.exit_code == 1);
        CHECK(r.err.find("flash to a device needs root") != std::string::npos);
        args = as_nobody;
        args.insert(args.end(), {"--image", "/tmp/never.img", "--image-method", "loop"});
        r = run_process(args);
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("--image-method loop needs root and /dev/loop-control") != std::string::npos, r.err);
        CHECK_FALSE(fs::exists("/tmp/never.img"));
    }
}

TEST_CASE("refusal: the disk holding /" * doctest::skip(not_root || root_disk().empty()))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    auto r = run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--device", root_disk(), "--repo", (tmp / "repo").string(),
                            "--force", "--yes"});
    CHECK(r.exit_code == 1);
    CHECK_MESSAGE(r.err.find("holds the running system's root file system") != std::string::npos, r.err);
}

TEST_CASE("a failure after partitioning says what state the card is in and cleans up" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    std::string commit = build_commit(tmp.path(), tmp / "repo");
    // The ref is on the server, the tree's objects are not.
    for (const auto& entry : fs::recursive_directory_iterator(tmp / "repo/objects"))
        if (entry.path().extension() == ".filez")
            fs::remove(entry.path());
    RepoServer server(tmp / "repo");
    write_file(tmp / "card.img", "");
    fs::resize_file(tmp / "card.img", 600 * MiB);
    LoopGuard loop(tmp / "card.img");
    auto r = run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--device", loop.device, "--repo", server.url(), "--force", "--yes"});
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("sysroot: pull:") != std::string::npos);
    CHECK(r.err.find("(the device is partitioned and formatted but holds no deployment; it will not boot)") != std::string::npos);
    auto dump = run_process({"sfdisk", "-d", loop.device});
    CHECK(dump.out.find("label: dos") != std::string::npos);
}

TEST_CASE("SIGINT during a flash unmounts, detaches and removes the partial image" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = tmp / "card.img";
    std::string log = (tmp / "flash.log").string();
    pid_t pid = flash_until_pulling(tmp, image, log);
    // Twice, as an impatient user does: the second must not cut the cleanup short.
    ::kill(pid, SIGINT);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ::kill(pid, SIGINT);
    CHECK(wait_exit(pid) == 130);
    CHECK(read_text(log).find("interrupted; no image was written") != std::string::npos);
    CHECK_FALSE(fs::exists(image));
    CHECK_FALSE(has_partial(tmp.path()));
}

TEST_CASE("a flash killed with SIGKILL: the next flash to the same image removes what it left" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = tmp / "card.img";
    pid_t pid = flash_until_pulling(tmp, image, (tmp / "flash.log").string());
    ::kill(pid, SIGKILL);
    wait_exit(pid);
    // It left a partial image; its mounts went with its mount namespace,
    // and then its loop devices, which clear themselves.
    CHECK(has_partial(tmp.path()));
    for (int i = 0; i < 100 && system_leftovers() != guard.before; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    CHECK(system_leftovers() == guard.before);

    auto again = run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", image.string(), "--repo",
                                (tmp / "repo").string()});
    REQUIRE_MESSAGE(again.ok(), again.err);
    CHECK_MESSAGE(again.err.find("left by an interrupted flash") != std::string::npos, again.err);
    CHECK_MESSAGE(again.err.find("unmounted ") == std::string::npos, again.err);
    CHECK_FALSE(has_partial(tmp.path()));
}

}
