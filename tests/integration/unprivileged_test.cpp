// The unprivileged image path against the loop-device path, as root: the
// same commit flashed with loop devices, with loop devices hidden (a mount
// namespace whose /dev holds only null, zero and urandom: flash picks the
// unprivileged path by itself), and as a plain uid, gives the same table,
// labels, and files with the same owners, modes, targets and bytes.
#include "common/process.hpp"
#include "tests/support/fixtures.hpp"
#include "tests/support/system.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <algorithm>
#include <chrono>
#include <csignal>
#include <regex>
#include <thread>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using nlohmann::json;

namespace {

const bool not_root = !is_root();
const bool no_userns = !user_namespaces_work();

// Every file of the image's partition at `offset`: path, owner, mode, type,
// link target and, for files, sha256. Read through a read-only mount.
std::string listing(const fs::path& image, uint64_t offset, uint64_t size)
{
    MountedPartition mount(image, offset, size);
    auto r = run_process({"sh", "-c", "cd \"$0\" && find . -printf '%p %U:%G %m %y %l\\n' | LC_ALL=C sort && "
                                      "find . -type f -exec sha256sum {} + | LC_ALL=C sort -k2",
                          mount.dir.path().string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    return r.out;
}

std::string table_of(const fs::path& image)
{
    auto r = run_process({"sfdisk", "-d", image.string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    // The device names differ with the file names; the disk id is random.
    std::string text = std::regex_replace(r.out, std::regex(image.string()), "IMAGE");
    return std::regex_replace(text, std::regex("label-id: .*\n"), "");
}

// Processes whose command line names something below `dir`.
std::vector<std::string> processes_using(const fs::path& dir)
{
    std::vector<std::string> found;
    for (const auto& entry : fs::directory_iterator("/proc")) {
        std::string pid = entry.path().filename().string();
        if (pid.find_first_not_of("0123456789") != std::string::npos || pid == std::to_string(::getpid()))
            continue;
        std::string cmdline = read_text(entry.path() / "cmdline");
        std::replace(cmdline.begin(), cmdline.end(), '\0', ' ');
        if (cmdline.find(dir.string()) != std::string::npos && read_text(entry.path() / "stat").find(") Z ") == std::string::npos)
            found.push_back(pid + ": " + cmdline);
    }
    return found;
}

} // namespace

TEST_SUITE("unprivileged") {

TEST_CASE("SIGTERM or SIGHUP to the flash alone during mkfs leaves no process, image or tree behind" * doctest::skip(not_root || no_userns))
{
    NoLeftovers guard;
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    // Enough data that mkfs.ext4 -d of the rootfs takes a while.
    std::string blob(4 << 20, '\0');
    for (int i = 0; i < 60; ++i) {
        for (size_t j = 0; j < blob.size(); ++j)
            blob[j] = static_cast<char>(((j + 1) * 2654435761u * static_cast<unsigned>(i + 7)) >> 13);
        write_file(tmp / ("rootfs/usr/share/blob/" + std::to_string(i)), blob);
    }
    build_commit(tmp.path(), tmp / "repo");
    // SIGTERM as systemd or a CI runner stops a job; SIGHUP as a closed
    // terminal or a lost runner connection does. Sent to the pid, not the group.
    for (int sig : {SIGTERM, SIGHUP}) {
        CAPTURE(sig);
        fs::path out = tmp / ("out-" + std::to_string(sig));
        fs::create_directories(out);
        fs::path image = out / "card.img";
        std::string log = (tmp / "flash.log").string();
        pid_t pid = spawn_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", image.string(), "--repo",
                                     (tmp / "repo").string(), "--image-method", "unprivileged", "--compress", "zst"},
                                    log);
        auto mkfs_running = [&] {
            for (const auto& p : processes_using(out))
                if (p.find("mkfs.ext4") != std::string::npos && p.find("rootfs") != std::string::npos)
                    return true;
            return false;
        };
        for (int i = 0; i < 3000 && !mkfs_running(); ++i)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        REQUIRE_MESSAGE(mkfs_running(), read_text(log));
        ::kill(pid, sig);
        CHECK(wait_exit(pid) == 130);
        CHECK(read_text(log).find("interrupted; no image was written") != std::string::npos);
        std::vector<std::string> left = processes_using(out);
        for (int i = 0; i < 10 && !left.empty(); ++i) {
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            left = processes_using(out);
        }
        std::string named;
        for (const auto& p : left)
            named += p + "\n";
        CHECK_MESSAGE(left.empty(), named);
        CHECK(fs::is_empty(out));
        for (const auto& entry : fs::directory_iterator("/dev/shm"))
            CHECK_MESSAGE(entry.path().filename().string().rfind(".treeflash-tree-", 0) != 0, entry.path());
    }
}

// What a killed flash left beside an image (a partial image, a partial
// compressed form) goes at the next flash of that image; what another user
// left in a shared folder stays.
TEST_CASE("leftovers of killed flashes are removed, but never another user's" * doctest::skip(not_root || no_userns))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path out = tmp / "shared";
    fs::create_directories(out);
    fs::permissions(out, fs::perms::all | fs::perms::sticky_bit);
    write_file(out / ".card.img.zst.partial-AAAAAA", "half a zst");
    write_file(out / ".card.img.partial-BBBBBB", "another user's");
    REQUIRE(::chown((out / ".card.img.partial-BBBBBB").c_str(), 4344, 4344) == 0);
    auto r = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", (out / "card.img").string(),
                            "--repo", (tmp / "repo").string(), "--image-method", "unprivileged", "--compress", "zst"});
    REQUIRE_MESSAGE(r.ok(), r.err);
    CHECK_FALSE(fs::exists(out / ".card.img.zst.partial-AAAAAA"));
    CHECK(r.err.find("removed " + (out / ".card.img.zst.partial-AAAAAA").string()) != std::string::npos);
    CHECK(read_text(out / ".card.img.partial-BBBBBB") == "another user's");
}

TEST_CASE("without loop devices, and as a plain user, flash makes the loop-device image's content" * doctest::skip(not_root || no_userns))
{
    NoLeftovers guard;
    Scratch tmp;
    ToolsForOtherUsers tools = tools_for_other_users(tmp.path());
    std::string commit = build_commit(tmp.path(), tmp / "repo");
    auto flash_args = [&](const fs::path& image, const std::string& method) {
        return std::vector<std::string>{"flash", "--no-gpg-verify", "--board", (tools.boards / "qemu-arm64").string(),
                                        "--image", image.string(), "--repo", (tmp / "repo").string(), "--image-method",
                                        method, "--json"};
    };

    // The trees a killed unprivileged flash of this user left in /dev/shm
    // (no one holds their lock) go at its next one.
    fs::path stale = "/dev/shm/.treeflash-tree-stale-test";
    write_file(stale / "rootfs/leftover", "x");
    for (const fs::path& p : {stale, stale / "rootfs", stale / "rootfs/leftover"})
        REQUIRE(::chown(p.c_str(), 4343, 4343) == 0);

    fs::path loop_image = tmp / "loop.img";
    auto loop = run_treeflash(flash_args(loop_image, "loop"));
    REQUIRE_MESSAGE(loop.ok(), loop.err);
    CHECK(json::parse(loop.out)["image_method"] == "loop");

    // Root, but no loop devices to be had: auto picks the unprivileged path.
    fs::path hidden_image = tmp / "hidden.img";
    std::vector<std::string> hidden{"unshare", "--mount", "--propagation", "private", "sh", "-c",
                                    "mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && mknod -m 666 /dev/zero c 1 5 "
                                    "&& mknod -m 666 /dev/urandom c 1 9 && exec \"$0\" \"$@\"",
                                    TREEFLASH_BINARY};
    auto args = flash_args(hidden_image, "auto");
    hidden.insert(hidden.end(), args.begin(), args.end());
    auto without_loops = run_process(hidden);
    REQUIRE_MESSAGE(without_loops.ok(), without_loops.err);
    CHECK(json::parse(without_loops.out)["image_method"] == "unprivileged");
    CHECK(fs::exists(stale)); // its /dev held no shm, and the tree is not root's anyway

    // A plain uid, writing into a folder of its own.
    fs::create_directories(tmp / "user");
    REQUIRE(::chown((tmp / "user").c_str(), 4343, 4343) == 0);
    fs::path user_image = tmp / "user/user.img";
    std::vector<std::string> as_user{"setpriv", "--reuid", "4343", "--regid", "4343", "--clear-groups", "env",
                                     "HOME=/nonexistent", tools.treeflash.string()};
    args = flash_args(user_image, "auto");
    as_user.insert(as_user.end(), args.begin(), args.end());
    auto user = run_process(as_user);
    REQUIRE_MESSAGE(user.ok(), user.err);
    CHECK(json::parse(user.out)["image_method"] == "unprivileged");
    CHECK(json::parse(user.out)["commit"] == commit);
    CHECK_FALSE(fs::exists(stale));
    CHECK(user.err.find("removed " + stale.string() + ", left by an interrupted flash") != std::string::npos);
    fs::remove_all(stale);

    std::string expected_table = table_of(loop_image);
    json partitions = json::parse(loop.out)["partitions"];
    REQUIRE(partitions.size() == 3);
    for (const fs::path& image : {hidden_image, user_image}) {
        CAPTURE(image);
        CHECK(table_of(image) == expected_table);
        for (const auto& part : partitions) {
            uint64_t start = part["start"].get<uint64_t>(), size = part["size"].get<uint64_t>();
            CAPTURE(part["label"]);
            CHECK(listing(image, start, size) == listing(loop_image, start, size));
            auto blkid = run_process({"blkid", "-p", "-O", std::to_string(start), "-s", "LABEL", "-o", "value", image.string()});
            CHECK(blkid.out == part["label"].get<std::string>() + "\n");
        }
    }
}

TEST_CASE("files of other owners: root keeps them, a plain user is told which" * doctest::skip(not_root || no_userns))
{
    NoLeftovers guard;
    Scratch tmp;
    ToolsForOtherUsers tools = tools_for_other_users(tmp.path());
    make_rootfs(tmp / "rootfs");
    write_file(tmp / "rootfs/home/user/notes", "mine\n");
    REQUIRE(::chown((tmp / "rootfs/home/user/notes").c_str(), 1000, 1000) == 0);
    std::string commit = build_commit(tmp.path(), tmp / "repo");

    fs::path image = tmp / "root.img";
    auto r = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(), "--repo",
                            (tmp / "repo").string(), "--image-method", "unprivileged", "--json"});
    REQUIRE_MESSAGE(r.ok(), r.err);
    uint64_t rootfs_start = 0;
    json flashed = json::parse(r.out);
    for (const auto& part : flashed["partitions"])
        if (part["label"] == "rootfs")
            rootfs_start = part["start"].get<uint64_t>();
    auto stat = run_process({"debugfs", "-R", "stat /ostree/deploy/tcu/deploy/" + commit + ".0/home/user/notes",
                             image.string() + "?offset=" + std::to_string(rootfs_start)});
    CHECK_MESSAGE(std::regex_search(stat.out, std::regex(R"(User:\s+1000\s+Group:\s+1000)")), (stat.out + stat.err));

    fs::create_directories(tmp / "user");
    REQUIRE(::chown((tmp / "user").c_str(), 4545, 4545) == 0);
    auto user = run_process({"setpriv", "--reuid", "4545", "--regid", "4545", "--clear-groups", "env", "HOME=/nonexistent",
                             tools.treeflash.string(), "flash", "--no-gpg-verify", "--board", (tools.boards / "qemu-arm64").string(), "--image",
                             (tmp / "user/user.img").string(), "--repo", (tmp / "repo").string()});
    CHECK(user.exit_code == 1);
    CHECK_MESSAGE(user.err.find("owned by users other than root") != std::string::npos, user.err);
    CHECK(user.err.find("/home/user/notes (1000:1000)") != std::string::npos);
    CHECK(fs::is_empty(tmp / "user"));
}

} // TEST_SUITE
