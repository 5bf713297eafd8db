// Images without privileges: `flash --image --image-method unprivileged`
// lays the sysroot out in directories and has mkfs.ext4 -d write each file
// system into the image. Run by the user running the tests; as root, the
// flash itself runs as an unprivileged uid (setpriv). Checked without loop
// devices or mounts: sfdisk, e2fsck and debugfs read the file through offsets.
#include "common/error.hpp"
#include "common/process.hpp"
#include "flasher/flash/flash.hpp"
#include "flasher/unprivileged/userns.hpp"
#include "tests/support/fixtures.hpp"
#include "tests/support/system.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <regex>
#include <sys/stat.h>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using nlohmann::json;

namespace {

// A uid and gid with no account and no privileges.
constexpr int plain_id = 4242;

const bool no_userns = !user_namespaces_work();

// treeflash `args`, as this user, or as plain_id when this is root (a copy
// of treeflash that plain_id can reach).
ProcessResult run_unprivileged(const ToolsForOtherUsers& tools, const std::vector<std::string>& args,
                               const std::vector<std::string>& env = {})
{
    if (!is_root())
        return run_treeflash(args, env);
    std::vector<std::string> argv{"setpriv", "--reuid", std::to_string(plain_id), "--regid", std::to_string(plain_id),
                                  "--clear-groups", "env", "HOME=/nonexistent"};
    argv.insert(argv.end(), env.begin(), env.end());
    argv.push_back(tools.treeflash.string());
    argv.insert(argv.end(), args.begin(), args.end());
    return run_process(argv);
}

// Makes `dir` (below `tmp`) for the flash to write into: as root, owned by
// plain_id, with `tmp` traversable by it.
void writable_by_plain_user(const Scratch& tmp, const fs::path& dir)
{
    fs::create_directories(dir);
    if (!is_root())
        return;
    REQUIRE(::chown(dir.c_str(), plain_id, plain_id) == 0);
    fs::permissions(tmp.path(), fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec
                                    | fs::perms::others_read | fs::perms::others_exec);
}

std::string in_image(const fs::path& image, uint64_t offset)
{
    return image.string() + "?offset=" + std::to_string(offset);
}

} // namespace

TEST_SUITE("unprivileged") {

TEST_CASE("qemu-arm64 and ls104x images made without root, loop devices or mounts" * doctest::skip(no_userns))
{
    Scratch tmp;
    std::string commit = build_commit(tmp.path(), tmp / "repo");
    ToolsForOtherUsers tools = tools_for_other_users(tmp.path());
    fs::path out = tmp / "out";
    writable_by_plain_user(tmp, out);
    for (const std::string board : {"qemu-arm64", "ls104x"}) {
        CAPTURE(board);
        fs::path image = out / (board + ".img");
        auto r = run_unprivileged(tools, {"flash", "--no-gpg-verify", "--board", (tools.boards / board).string(), "--image",
                                          image.string(), "--repo", (tmp / "repo").string(), "--image-method",
                                          "unprivileged", "--json"});
        REQUIRE_MESSAGE(r.ok(), r.err);
        json result = json::parse(r.out);
        CHECK(result["image_method"] == "unprivileged");
        CHECK(result["commit"] == commit);

        // The board's table, as sfdisk reads it from the file.
        auto table = run_process({"sfdisk", "-d", image.string()});
        REQUIRE_MESSAGE(table.ok(), table.err);
        for (const char* start : {"start=      131072", "start=      196608", "start=      327680"})
            CHECK_MESSAGE(table.out.find(start) != std::string::npos, table.out);
        std::vector<uint64_t> starts;
        static const std::regex start_field(R"(start=\s*(\d+))");
        for (auto it = std::sregex_iterator(table.out.begin(), table.out.end(), start_field); it != std::sregex_iterator(); ++it)
            starts.push_back(std::stoull((*it)[1]) * 512);
        REQUIRE(starts.size() == 3);

        // Every file system is clean; the sysroot's files are root's and the
        // deployment is there; the boot partition holds the script.
        for (uint64_t start : starts) {
            auto check = run_process({"e2fsck", "-fn", in_image(image, start)});
            CHECK_MESSAGE(check.exit_code == 0, (check.out + check.err));
        }
        auto deployments = run_process({"debugfs", "-R", "ls /ostree/deploy/tcu/deploy", in_image(image, starts[2])});
        CHECK_MESSAGE(deployments.out.find(commit + ".0") != std::string::npos, deployments.out);
        auto config = run_process({"debugfs", "-R", "stat /ostree/repo/config", in_image(image, starts[2])});
        CHECK_MESSAGE(std::regex_search(config.out, std::regex(R"(User:\s+0\s+Group:\s+0)")), config.out);
        auto board_env = run_process({"debugfs", "-R", "cat /boot/treeflash/board.env", in_image(image, starts[2])});
        CHECK(board_env.out.find("board=" + board) != std::string::npos);
        auto script = run_process({"debugfs", "-R", "stat /boot.scr", in_image(image, starts[0])});
        CHECK_MESSAGE(std::regex_search(script.out, std::regex(R"(User:\s+0\s+Group:\s+0)")), script.out);
        if (board == "ls104x") {
            write_file(tmp / "fw_env.config", image.string() + " 0x500000 0x2000\n");
            auto env = run_process({"fw_printenv", "-c", (tmp / "fw_env.config").string(), "bootcmd"});
            CHECK(env.out.find("source ${scriptaddr}") != std::string::npos);
            // Where the factory station finds the environment.
            CHECK_MESSAGE(board_env.out.find("uboot_env=0x500000 0x2000\n") != std::string::npos, board_env.out);
        }
        // inspect reads it as the same user, without mounting it.
        auto inspected = run_unprivileged(tools, {"inspect", image.string(), "--json"});
        REQUIRE_MESSAGE(inspected.ok(), inspected.err);
        json info = json::parse(inspected.out);
        CHECK(info["sysroot_partition"] == 3);
        CHECK(info["deployments"][0]["commit"] == commit);
        CHECK(info["deployments"][0]["boot_state"] == "new");
        CHECK(info["boot_script"] == true);
        CHECK(info["update_marker"] == true);
        CHECK(info["uenv"]["bootargs"].get<std::string>().find("ostree=" + result["ostree"].get<std::string>()) != std::string::npos);

        // The image is the user's, and nothing else is left beside it.
        struct stat st {};
        REQUIRE(::stat(image.c_str(), &st) == 0);
        CHECK(st.st_uid == (is_root() ? static_cast<uid_t>(plain_id) : ::geteuid()));
        for (const auto& entry : fs::directory_iterator(out)) {
            std::string name = entry.path().filename().string();
            bool an_image = name.rfind("ls104x.img", 0) == 0 || name.rfind("qemu-arm64.img", 0) == 0;
            CHECK_MESSAGE(an_image, name);
        }
    }
}

TEST_CASE("the same commit, board, size and SOURCE_DATE_EPOCH give the same image, whoever makes it where"
          * doctest::skip(no_userns))
{
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    ToolsForOtherUsers tools = tools_for_other_users(tmp.path());
    auto make = [&](const std::string& dir, bool as_root, const std::string& epoch, const std::string& umask = "022") {
        fs::path out = tmp / dir;
        fs::create_directories(out);
        if (is_root() && !as_root)
            REQUIRE(::chown(out.c_str(), plain_id, plain_id) == 0);
        std::vector<std::string> args{"flash", "--no-gpg-verify", "--board", (tools.boards / "ls104x").string(), "--image",
                                      (out / "card.img").string(), "--repo", (tmp / "repo").string(), "--image-method",
                                      "unprivileged"};
        std::vector<std::string> env{"SOURCE_DATE_EPOCH=" + epoch};
        // The caller's umask, set in a shell that then runs treeflash.
        args.insert(args.begin(), {"sh", "-c", "umask " + umask + " && exec \"$@\"", "sh", tools.treeflash.string()});
        std::vector<std::string> argv = args;
        if (is_root() && !as_root)
            argv.insert(argv.begin(), {"setpriv", "--reuid", std::to_string(plain_id), "--regid", std::to_string(plain_id),
                                       "--clear-groups"});
        argv.insert(argv.begin(), "env");
        argv.insert(argv.begin() + 1, env.begin(), env.end());
        ProcessResult r = run_process(argv);
        REQUIRE_MESSAGE(r.ok(), r.err);
        return sha256sum_files({out / "card.img"});
    };
    std::string first = make("first", false, "1700000000");
    CHECK(make("second/deeper", false, "1700000000") == first);
    // A CI runner's umask changes nothing (077 would make the board's /var 0700).
    CHECK(make("strict-umask", false, "1700000000", "077") == first);
    CHECK(make("open-umask", false, "1700000000", "000") == first);
    if (is_root())
        CHECK(make("as-root", true, "1700000000") == first);
    CHECK(make("other-time", false, "1700000001") != first);
    // 0 gives one image too (taken as 1: mke2fs and mkimage read 0 as "now").
    CHECK(make("zero-a", false, "0") == make("zero-b", false, "0"));
    // Times the file systems cannot hold are refused, not wrapped.
    auto late = run_treeflash({"flash", "--no-gpg-verify", "--board", "ls104x", "--image", (tmp / "late.img").string(),
                               "--repo", (tmp / "repo").string()},
                              {"SOURCE_DATE_EPOCH=2147483648"});
    CHECK(late.exit_code == 2);
    CHECK(late.err.find("past what the image's file systems can hold") != std::string::npos);
    CHECK_FALSE(fs::exists(tmp / "late.img"));
}

// Two flashes into one folder at once, each with --overwrite and
// --compress, from two commits: they take turns, so the image, its .zst,
// its bmap and SHA256SUMS all come from one of them.
TEST_CASE("flashes into one folder take turns: image, .zst, bmap and sums stay one set" * doctest::skip(no_userns))
{
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo-a");
    write_file(tmp / "rootfs/usr/share/extra", std::string(3 << 20, 'x'));
    build_commit(tmp.path(), tmp / "repo-b");
    fs::create_directories(tmp / "out");
    fs::path image = tmp / "out/card.img";
    auto start = [&](const std::string& repo, const std::string& log) {
        return spawn_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(), "--repo",
                                (tmp / repo).string(), "--image-method", "unprivileged", "--overwrite", "--compress", "zst"},
                               (tmp / log).string());
    };
    pid_t a = start("repo-a", "a.log");
    pid_t b = start("repo-b", "b.log");
    CHECK_MESSAGE(wait_exit(a) == 0, read_text(tmp / "a.log"));
    CHECK_MESSAGE(wait_exit(b) == 0, read_text(tmp / "b.log"));
    CHECK((read_text(tmp / "a.log") + read_text(tmp / "b.log")).find("waiting for another flash into") != std::string::npos);
    auto sums = run_process({"sh", "-c", "cd \"$0\" && sha256sum -c SHA256SUMS", (tmp / "out").string()});
    CHECK_MESSAGE(sums.ok(), (sums.out + sums.err));
    auto same = run_process({"sh", "-c", "zstd -dc \"$0.zst\" | cmp - \"$0\"", image.string()});
    CHECK_MESSAGE(same.ok(), (same.out + same.err));
    // bmaptool checks every range of the bmap against the image.
    auto bmap = run_process({"bmaptool", "copy", "--bmap", image.string() + ".bmap", image.string(), (tmp / "copy.img").string()});
    CHECK_MESSAGE(bmap.ok(), bmap.err);

    // Flashes into different folders run at once, each with its own
    // scratch tree: none takes another's fresh tree for a stale one.
    std::vector<pid_t> flashes;
    for (int i = 0; i < 4; ++i) {
        fs::create_directories(tmp / ("many-" + std::to_string(i)));
        flashes.push_back(spawn_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image",
                                           (tmp / ("many-" + std::to_string(i)) / "card.img").string(), "--repo",
                                           (tmp / "repo-a").string(), "--image-method", "unprivileged"},
                                          (tmp / ("many-" + std::to_string(i) + ".log")).string()));
    }
    for (int i = 0; i < 4; ++i) {
        int status = wait_exit(flashes[static_cast<size_t>(i)]);
        std::string log = read_text(tmp / ("many-" + std::to_string(i) + ".log"));
        CHECK_MESSAGE(status == 0, log);
        CHECK_MESSAGE(log.find("left by an interrupted flash") == std::string::npos, log);
    }
}

// The README's CI job, as a plain user with no loop devices: a commit built
// from a rootfs tarball, the image with its compressed form, block map and
// sums, an origin pointing at the update server.
TEST_CASE("the README's CI job runs as a plain user: commit, image, .zst, bmap and sums" * doctest::skip(no_userns))
{
    Scratch tmp;
    ToolsForOtherUsers tools = tools_for_other_users(tmp.path());
    FakeKernel kernel = make_kernel_files(tmp / "kernel");
    write_tarball(tmp / "rootfs.tar.zst",
                  {{"usr", 'd', "", 0755}, {"usr/bin", 'd', "", 0755}, {"usr/bin/busybox", 'f', "#!busybox\n", 04755},
                   {"bin", 'l', "usr/bin"}, {"sbin", 'l', "usr/bin"}, {"etc", 'd', "", 0755},
                   {"etc/inittab", 'f', "::sysinit:/bin/true\n"}, {"usr/sbin", 'd', "", 0755},
                   {"usr/sbin/init", 'l', "../bin/busybox"}});
    fs::path job = tmp / "job";
    writable_by_plain_user(tmp, job);
    std::vector<std::string> epoch{"SOURCE_DATE_EPOCH=1700000000"};
    auto built = run_unprivileged(tools, {"build", "--rootfs", (tmp / "rootfs.tar.zst").string(), "--repo",
                                          (job / "repo").string(), "--kernel", kernel.kernel.string(), "--version", "7"},
                                  epoch);
    REQUIRE_MESSAGE(built.ok(), built.err);
    std::string commit = built.out.substr(0, 64);
    auto flashed = run_unprivileged(tools, {"flash", "--board", (tools.boards / "ls104x").string(), "--image",
                                            (job / "card.img").string(), "--repo", (job / "repo").string(), "--remote-url",
                                            "https://updates.example.com/repo", "--no-gpg-verify", "--compress", "zst"},
                                    epoch);
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);
    for (const char* name : {"card.img", "card.img.zst", "card.img.bmap", "SHA256SUMS"})
        CHECK_MESSAGE(fs::is_regular_file(job / name), name);
    auto sums = run_process({"sh", "-c", "cd \"$0\" && sha256sum -c SHA256SUMS", job.string()});
    CHECK_MESSAGE(sums.ok(), (sums.out + sums.err));
    CHECK(sums.out.find("card.img.zst: OK") != std::string::npos);
    auto same = run_process({"sh", "-c", "zstd -dc \"$0.zst\" | cmp - \"$0\"", (job / "card.img").string()});
    CHECK_MESSAGE(same.ok(), (same.out + same.err));
    auto inspected = run_unprivileged(tools, {"inspect", (job / "card.img").string(), "--json"});
    REQUIRE_MESSAGE(inspected.ok(), inspected.err);
    json info = json::parse(inspected.out);
    CHECK(info["origin_url"] == "https://updates.example.com/repo");
    CHECK(info["deployments"][0]["commit"] == commit);
    CHECK(info["deployments"][0]["version"] == "7");
}

TEST_CASE("work in a user namespace: a helper that is root there, reporting here" * doctest::skip(no_userns))
{
    // The check helper says which uid it has there.
    auto said = flasher::run_as_namespace_root(flasher::namespace_check_command, {}, {}, nullptr);
    CHECK(said == std::vector<std::string>{"uid 0"});
    CHECK(flasher::user_namespaces_available());

    // An error there is thrown here, with its message: a job without a
    // place for its trees.
    CHECK_THROWS_WITH_AS(flasher::run_as_namespace_root(flasher::image_trees_command, {"{}"}, {}, nullptr),
                         doctest::Contains("'scratch' not found"), Error);
}

} // TEST_SUITE
