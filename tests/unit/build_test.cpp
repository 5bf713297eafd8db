// treeflash build end to end through the executable, checked with the
// ostree CLI: what a release engineer would look at.
#include "tests/support/fixtures.hpp"
#include "tests/support/system.hpp"

#include <chrono>
#include <fcntl.h>
#include <sys/stat.h>
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <random>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <thread>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using nlohmann::json;

extern char** environ;

namespace {

std::string first_line(const std::string& text)
{
    return text.substr(0, text.find('\n'));
}

struct Example {
    Scratch tmp;
    FakeKernel kernel;
    fs::path rootfs, repo;
    Example()
    {
        rootfs = tmp / "rootfs";
        repo = tmp / "repo";
        make_rootfs(rootfs);
        kernel = make_kernel_files(tmp.path());
    }
    std::vector<std::string> args(const std::vector<std::string>& more = {}) const
    {
        std::vector<std::string> a{"build", "--rootfs", rootfs.string(), "--repo", repo.string(), "--kernel",
                                   kernel.kernel.string(), "--devicetree", kernel.devicetree.string()};
        a.insert(a.end(), more.begin(), more.end());
        return a;
    }
};

void fill_random(const fs::path& dir, int files, size_t size, unsigned seed)
{
    std::mt19937 rng(seed);
    for (int i = 0; i < files; ++i) {
        std::string data(size, '\0');
        for (auto& c : data)
            c = static_cast<char>(rng());
        write_file(dir / ("usr/share/blob/" + std::to_string(i)), data);
    }
}

// Whether the repository's tmp/ holds a build's scratch space: an
// imported tarball's files, or content objects staged before they are
// moved into objects/.
bool has_import_scratch(const fs::path& repo)
{
    if (!fs::exists(repo / "tmp"))
        return false;
    for (const auto& entry : fs::directory_iterator(repo / "tmp")) {
        std::string name = entry.path().filename().string();
        if (name.rfind("treeflash-import-", 0) == 0 || name.rfind("treeflash-objects-", 0) == 0)
            return true;
    }
    return false;
}

} // namespace

TEST_SUITE("build") {

TEST_CASE("a build commits the normalized tree and the repository shows what the how-to shows")
{
    Example ex;
    auto before = snapshot(ex.rootfs);
    auto result = run_treeflash(ex.args({"--subject", "image v1 (ls104x) rootfs", "--version", "1.0"}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    std::string commit = first_line(result.out);
    CHECK(commit.size() == 64);
    CHECK(result.out == commit + "\n");
    CHECK(rev_parse(ex.repo) == commit);
    CHECK(fsck_clean(ex.repo));
    CHECK(snapshot(ex.rootfs) == before);
    CHECK(read_text(ex.repo / "config").find("mode=archive") != std::string::npos);

    auto log = ostree(ex.repo, {"log", "master"});
    CHECK(log.out.find("image v1 (ls104x) rootfs") != std::string::npos);
    CHECK(log.out.find("Version: 1.0") != std::string::npos);
    auto summary = ostree(ex.repo, {"summary", "--view"});
    CHECK(summary.out.find("* master") != std::string::npos);
    CHECK(summary.out.find(commit) != std::string::npos);

    auto files = list_commit(ex.repo);
    CHECK(files.count("/usr/etc/inittab"));
    CHECK_FALSE(files.count("/etc"));
    CHECK(files.count("/usr/lib/os-release"));
    CHECK(files["/ostree"].find("-> sysroot/ostree") != std::string::npos);
    CHECK(files["/etc"].empty());
    std::string csum = sha256sum_files({ex.kernel.kernel, ex.kernel.devicetree});
    CHECK(files.count("/usr/lib/ostree-boot/vmlinuz-" + csum));
    CHECK(files["/usr/lib/ostree-boot/vmlinuz-" + csum].rfind("-00644", 0) == 0);
    // setuid busybox survives, owned by root whoever builds (a directory read
    // without root is committed as root's), and the hardlink shares its content object.
    CHECK(files["/usr/bin/busybox"].rfind("-04755 0 0 ", 0) == 0);
    auto object_of = [&](const std::string& path) {
        std::istringstream in(files[path]);
        std::string mode, uid, gid, size, object;
        in >> mode >> uid >> gid >> size >> object;
        return object;
    };
    CHECK(object_of("/usr/bin/busybox") == object_of("/usr/bin/busybox-hardlink"));
    CHECK(files["/etc"].empty());
    CHECK(ostree(ex.repo, {"cat", "master", "/usr/etc/hostname"}).out == "tcu\n");
}

TEST_CASE("--json reports the commit, kernel and counts")
{
    Example ex;
    write_file(ex.rootfs / "var/lib/app/state", "seed");
    auto result = run_treeflash(ex.args({"--json"}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    json out = json::parse(result.out);
    CHECK(out["commit"] == rev_parse(ex.repo));
    CHECK(out["ref"] == "master");
    CHECK(out["parent"].is_null());
    CHECK(out["kernel_layout"] == "legacy");
    CHECK(out["bootcsum"] == sha256sum_files({ex.kernel.kernel, ex.kernel.devicetree}));
    CHECK(out["files"].get<int>() > 10);
    CHECK(out["bytes"].get<int>() > 4096);
    CHECK(out["created_repo"] == true);
    bool var_warning = false;
    for (const auto& w : out["warnings"])
        var_warning |= w.get<std::string>().find("var/lib/app/state") != std::string::npos;
    CHECK(var_warning);
    CHECK(result.err.find("warning: ") != std::string::npos);
    CHECK(fsck_clean(ex.repo));
}

TEST_CASE("a build warns when the commit has no ostree program to update a board with")
{
    Example ex;
    const std::string warning = "cannot update itself";
    auto result = run_treeflash(ex.args({"--json"}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    CHECK(json::parse(result.out)["warnings"].dump().find(warning) != std::string::npos);
    CHECK(result.err.find(warning) != std::string::npos);
    // Once the rootfs carries it, executable, the warning goes.
    write_file(ex.rootfs / "usr/bin/ostree", "#!fake ostree\n", 0755);
    result = run_treeflash(ex.args({"--json"}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    CHECK(json::parse(result.out)["warnings"].dump().find(warning) == std::string::npos);
    // Not executable: it cannot run.
    fs::permissions(ex.rootfs / "usr/bin/ostree", fs::perms::owner_read | fs::perms::group_read);
    result = run_treeflash(ex.args({"--json"}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    CHECK(json::parse(result.out)["warnings"].dump().find(warning) != std::string::npos);
}

TEST_CASE("--program adds a program with exactly the libraries it needs: it runs inside the commit")
{
    // This machine's own root is a userland: its ostree program and libraries.
    Example ex;
    auto result = run_treeflash(ex.args({"--userland", "/", "--program", "/usr/bin/ostree", "--json"}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    json out = json::parse(result.out);
    std::string added = out["programs"]["added"].dump();
    CHECK(added.find("\"usr/bin/ostree\"") != std::string::npos);
    CHECK(added.find("\"usr/lib/libostree-1.so.1\"") != std::string::npos);
    CHECK(added.find("\"usr/lib/libc.so.6\"") != std::string::npos);
    CHECK(added.find("ld-linux") != std::string::npos);
    CHECK(out["warnings"].dump().find("cannot update itself") == std::string::npos);

    // Checked out and run as the root of its own tree: nothing it needs is missing.
    fs::path checkout = ex.tmp / "checkout";
    auto co = run_process({"ostree", "checkout", "--repo=" + ex.repo.string(), "-U", "master", checkout.string()});
    REQUIRE_MESSAGE(co.ok(), co.err);
    auto probe = run_process({"unshare", "--user", "--map-root-user", "true"});
    if (!probe.ok()) {
        MESSAGE("no user namespaces here: the checkout is not run");
        return;
    }
    auto run = run_process({"unshare", "--user", "--map-root-user", "chroot", checkout.string(), "/usr/bin/ostree", "--version"});
    CHECK_MESSAGE(run.ok(), run.err);
    CHECK(run.out.find("libostree") != std::string::npos);

    // A library the rootfs already has is its own, and is left as it is.
    write_file(ex.rootfs / "usr/lib/libc.so.6", "the rootfs's own libc\n", 0644);
    result = run_treeflash(ex.args({"--userland", "/", "--program", "usr/bin/ostree", "--json"}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    out = json::parse(result.out);
    CHECK(out["programs"]["kept"].dump().find("\"libc.so.6\"") != std::string::npos);
    CHECK(out["programs"]["added"].dump().find("libc.so.6") == std::string::npos);
    auto cat = run_process({"ostree", "cat", "--repo=" + ex.repo.string(), "master", "/usr/lib/libc.so.6"});
    CHECK(cat.out == "the rootfs's own libc\n");
}

TEST_CASE("--program: paths that leave the userland or name nothing are refused")
{
    Example ex;
    fs::path userland = ex.tmp / "userland";
    fs::create_directories(userland / "usr/bin");
    fs::create_symlink("/etc/passwd", userland / "usr/bin/escape"); // resolves inside the userland: absent
    write_file(userland / "usr/bin/script", "#!/bin/sh\n", 0755);
    struct Case {
        std::vector<std::string> args;
        std::string error;
    };
    for (const Case& c : std::vector<Case>{
             {{"--program", "usr/bin/script"}, "--program needs --userland"},
             {{"--userland", userland.string()}, "--userland needs --program"},
             {{"--userland", userland.string(), "--program", "../../etc/passwd"}, "without empty, '.' or '..'"},
             {{"--userland", userland.string(), "--program", "usr/bin/escape"}, "usr/bin/escape is not in"},
             {{"--userland", userland.string(), "--program", "usr/bin/script"}, "not an ELF file"},
         }) {
        auto result = run_treeflash(ex.args(c.args));
        CHECK(!result.ok());
        CHECK_MESSAGE(result.err.find(c.error) != std::string::npos, result.err);
    }
    CHECK(!fs::exists(ex.repo)); // nothing committed, no repository left
}

TEST_CASE("the board's updater is in the commit, with its settings in /etc and its inittab line")
{
    Example ex;
    auto result = run_treeflash(ex.args({"--json"}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    CHECK(json::parse(result.out)["auto_update_hook"] == "inittab");
    auto show = [&](const std::string& path) {
        return run_process({"ostree", "cat", "--repo=" + ex.repo.string(), "master", path});
    };
    CHECK(show("/usr/lib/treeflash/auto-update").out.find("treeflash auto-update") != std::string::npos);
    CHECK(show("/usr/etc/treeflash/auto-update.conf").out.find("#interval=14400") != std::string::npos);
    CHECK(show("/usr/etc/inittab").out.find("::once:/usr/lib/treeflash/auto-update\n") != std::string::npos);
    auto ls = run_process({"ostree", "ls", "--repo=" + ex.repo.string(), "master", "/usr/lib/treeflash/auto-update"});
    CHECK(ls.out.find("-00755 ") != std::string::npos);

    // A rootfs's own settings are kept.
    write_file(ex.rootfs / "etc/treeflash/auto-update.conf", "reboot=never\n");
    result = run_treeflash(ex.args());
    REQUIRE_MESSAGE(result.ok(), result.err);
    CHECK(show("/usr/etc/treeflash/auto-update.conf").out == "reboot=never\n");

    // --no-auto-update leaves the script and its line out.
    fs::remove_all(ex.rootfs / "etc/treeflash");
    result = run_treeflash(ex.args({"--no-auto-update", "--json"}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    CHECK(json::parse(result.out)["auto_update_hook"] == "");
    CHECK(!show("/usr/lib/treeflash/auto-update").ok());
    CHECK(!show("/usr/etc/treeflash/auto-update.conf").ok());
    CHECK(show("/usr/etc/inittab").out.find("auto-update") == std::string::npos);
}

TEST_CASE("an unchanged rebuild adds no commit and writes no object; a change adds a child commit")
{
    Example ex;
    auto first = run_treeflash(ex.args());
    REQUIRE(first.ok());
    auto again = run_treeflash(ex.args({"--json"}));
    REQUIRE(again.ok());
    json out = json::parse(again.out);
    CHECK(out["commit"] == first_line(first.out));
    CHECK(out["unchanged"] == true);
    CHECK(out["objects_written"] == 0);

    write_file(ex.rootfs / "etc/hostname", "tcu-2\n");
    auto changed = run_treeflash(ex.args({"--json"}));
    REQUIRE(changed.ok());
    json next = json::parse(changed.out);
    CHECK(next["commit"] != out["commit"]);
    CHECK(next["parent"] == out["commit"]);
    CHECK(next["objects_written"].get<int>() >= 1);
    CHECK(next["objects_written"].get<int>() <= 2);
    CHECK(rev_parse(ex.repo, "master^") == first_line(first.out));
    CHECK(fsck_clean(ex.repo));
}

TEST_CASE("the same SOURCE_DATE_EPOCH gives the same commit in two repositories")
{
    Example ex;
    auto a = run_treeflash({"build", "--rootfs", ex.rootfs.string(), "--repo", (ex.tmp / "a").string(), "--kernel",
                        ex.kernel.kernel.string()},
                       {"SOURCE_DATE_EPOCH=1700000000"});
    auto b = run_treeflash({"build", "--rootfs", ex.rootfs.string(), "--repo", (ex.tmp / "b").string(), "--kernel",
                        ex.kernel.kernel.string()},
                       {"SOURCE_DATE_EPOCH=1700000000"});
    auto c = run_treeflash({"build", "--rootfs", ex.rootfs.string(), "--repo", (ex.tmp / "c").string(), "--kernel",
                        ex.kernel.kernel.string(), "--timestamp", "2023-11-14T22:13:20Z"});
    REQUIRE((a.ok() && b.ok() && c.ok()));
    CHECK(a.out == b.out);
    CHECK(a.out == c.out); // 1700000000 is 2023-11-14T22:13:20Z
    CHECK(ostree(ex.tmp / "a", {"log", "master"}).out.find("2023-11-14 22:13:20") != std::string::npos);
    for (const char* repo : {"a", "b", "c"})
        CHECK(fsck_clean(ex.tmp / repo));
}

// The directory's files must be owned by root to match the tarball's.
TEST_CASE("a tarball builds the same commit as the directory it was made from" * doctest::skip(!is_root()))
{
    Example ex;
    std::vector<TarEntry> entries;
    for (auto it = fs::recursive_directory_iterator(ex.rootfs); it != fs::recursive_directory_iterator(); ++it) {
        std::string rel = it->path().lexically_relative(ex.rootfs).string();
        struct stat st {};
        ::lstat(it->path().c_str(), &st);
        if (S_ISDIR(st.st_mode))
            entries.push_back({rel + "/", 'd', "", st.st_mode & 07777});
        else if (S_ISLNK(st.st_mode))
            entries.push_back({rel, 'l', fs::read_symlink(it->path()).string(), 0777});
        else
            entries.push_back({rel, 'f', read_text(it->path()), st.st_mode & 07777});
    }
    entries.insert(entries.begin(), {"./", 'd', "", 0755});
    ::chmod(ex.rootfs.c_str(), 0755);
    write_tarball(ex.tmp / "rootfs.tar.zst", entries);
    auto dir = run_treeflash({"build", "--rootfs", ex.rootfs.string(), "--repo", (ex.tmp / "d").string(), "--kernel",
                          ex.kernel.kernel.string(), "--timestamp", "1"});
    auto tar = run_treeflash({"build", "--rootfs", (ex.tmp / "rootfs.tar.zst").string(), "--repo",
                          (ex.tmp / "t").string(), "--kernel", ex.kernel.kernel.string(), "--timestamp", "1"});
    REQUIRE_MESSAGE(dir.ok(), dir.err);
    REQUIRE_MESSAGE(tar.ok(), tar.err);
    CHECK(dir.out == tar.out);
    CHECK_FALSE(has_import_scratch(ex.tmp / "t"));
    CHECK(fsck_clean(ex.tmp / "d"));
    CHECK(fsck_clean(ex.tmp / "t"));
}

TEST_CASE("GPG: the commit and the summary are signed with the given key")
{
    Example ex;
    fs::path home = ex.tmp / "gnupg";
    fs::create_directories(home);
    fs::permissions(home, fs::perms::owner_all);
    auto keygen = run_process({"gpg", "--homedir", home.string(), "--batch", "--passphrase", "", "--quick-gen-key",
                               "treeflash test <test@example.invalid>", "ed25519", "sign", "never"});
    REQUIRE_MESSAGE(keygen.ok(), keygen.err);
    auto list = run_process({"gpg", "--homedir", home.string(), "--with-colons", "--list-secret-keys"});
    std::string key;
    std::istringstream lines(list.out);
    for (std::string line; std::getline(lines, line);)
        if (line.rfind("fpr:", 0) == 0 && key.empty())
            key = line.substr(line.rfind(':', line.size() - 2) + 1, 40);
    REQUIRE(key.size() == 40);

    auto result = run_treeflash(ex.args({"--gpg-sign", key, "--gpg-homedir", home.string()}));
    REQUIRE_MESSAGE(result.ok(), result.err);
    // Verify as a client would: with only the exported public key.
    fs::create_directories(ex.tmp / "trusted");
    auto exported = run_process({"gpg", "--homedir", home.string(), "--export", key});
    write_file(ex.tmp / "trusted/release.gpg", exported.out);
    auto shown = ostree(ex.repo, {"show", "--gpg-homedir=" + (ex.tmp / "trusted").string(), "master"});
    CHECK_MESSAGE(shown.out.find("Good signature") != std::string::npos, shown.out);
    CHECK(fs::exists(ex.repo / "summary.sig"));
    CHECK(fsck_clean(ex.repo));

    // A key that does not exist fails the build before the branch moves.
    write_file(ex.rootfs / "etc/hostname", "changed\n");
    std::string before = rev_parse(ex.repo);
    auto bad = run_treeflash(ex.args({"--gpg-sign", "0000000000000000DEADBEEF", "--gpg-homedir", home.string()}));
    CHECK(bad.exit_code == 1);
    CHECK(bad.err.find("build: commit: sign: key 0000000000000000DEADBEEF") != std::string::npos);
    CHECK(rev_parse(ex.repo) == before);
    CHECK(fsck_clean(ex.repo));

    // An unsigned rebuild of a repository whose summary is signed is refused
    // (clients that verify it would refuse every update)...
    auto unsigned_build = run_treeflash(ex.args());
    CHECK(unsigned_build.exit_code == 1);
    CHECK_MESSAGE(unsigned_build.err.find("the repository's summary is GPG-signed: pass --gpg-sign KEY") != std::string::npos,
                  unsigned_build.err);
    CHECK(fs::exists(ex.repo / "summary.sig"));

    // ...and an unchanged rebuild with --gpg-sign signs the commit it keeps.
    Example other;
    REQUIRE(run_treeflash(other.args()).ok()); // unsigned
    std::string kept = rev_parse(other.repo);
    auto signed_again = run_treeflash(other.args({"--gpg-sign", key, "--gpg-homedir", home.string()}));
    REQUIRE_MESSAGE(signed_again.ok(), signed_again.err);
    CHECK(rev_parse(other.repo) == kept);
    auto verified = ostree(other.repo, {"show", "--gpg-homedir=" + (ex.tmp / "trusted").string(), "master"});
    CHECK_MESSAGE(verified.out.find("Good signature") != std::string::npos, verified.out);
    // Signing it again is not an error.
    CHECK(run_treeflash(other.args({"--gpg-sign", key, "--gpg-homedir", home.string()})).ok());
    run_process({"gpgconf", "--homedir", home.string(), "--kill", "all"});
}

TEST_CASE("an empty kernel, initramfs or devicetree is refused")
{
    Example ex;
    write_file(ex.tmp / "empty", "");
    for (const char* option : {"--kernel", "--initramfs", "--devicetree"}) {
        CAPTURE(option);
        std::vector<std::string> args{"build", "--rootfs", ex.rootfs.string(), "--repo", ex.repo.string()};
        if (std::string(option) != "--kernel")
            args.insert(args.end(), {"--kernel", ex.kernel.kernel.string()});
        args.insert(args.end(), {option, (ex.tmp / "empty").string()});
        auto r = run_treeflash(args);
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find((ex.tmp / "empty").string() + " is empty") != std::string::npos, r.err);
    }
    CHECK_FALSE(fs::exists(ex.repo));
}

TEST_CASE("SIGINT during the import of a large tarball stops it at once")
{
    Example ex;
    std::vector<TarEntry> entries;
    for (int d = 0; d < 400; ++d) {
        entries.push_back({"usr/share/many/" + std::to_string(d) + "/", 'd'});
        for (int f = 0; f < 250; ++f)
            entries.push_back({"usr/share/many/" + std::to_string(d) + "/" + std::to_string(f), 'f', "x"});
    }
    write_tarball(ex.tmp / "big.tar", entries);
    pid_t pid = spawn_treeflash({"build", "--rootfs", (ex.tmp / "big.tar").string(), "--repo", ex.repo.string(), "--kernel",
                                 ex.kernel.kernel.string()});
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    auto sent = std::chrono::steady_clock::now();
    ::kill(pid, SIGINT);
    CHECK(wait_exit(pid) == 130);
    // 100k entries take seconds to import; stopping takes one entry.
    CHECK(std::chrono::steady_clock::now() - sent < std::chrono::seconds(2));
    CHECK_FALSE(fs::exists(ex.repo));
    CHECK_FALSE(has_partial(ex.tmp.path()));
}

TEST_CASE("--static-delta makes a delta from the previous commit")
{
    Example ex;
    auto first = run_treeflash(ex.args());
    REQUIRE(first.ok());
    write_file(ex.rootfs / "etc/hostname", "tcu-delta\n");
    auto second = run_treeflash(ex.args({"--static-delta"}));
    REQUIRE_MESSAGE(second.ok(), second.err);
    auto deltas = ostree(ex.repo, {"static-delta", "list"});
    CHECK(deltas.out.find(first_line(first.out) + "-" + first_line(second.out)) != std::string::npos);
    CHECK(fsck_clean(ex.repo));
}

TEST_CASE("--static-deltas N makes deltas from each of the last N commits, and the summary lists them")
{
    Example ex;
    std::vector<std::string> commits;
    for (const char* name : {"one", "two", "three"}) {
        write_file(ex.rootfs / "etc/hostname", std::string(name) + "\n");
        auto r = run_treeflash(ex.args());
        REQUIRE_MESSAGE(r.ok(), r.err);
        commits.push_back(first_line(r.out));
    }
    write_file(ex.rootfs / "etc/hostname", "four\n");
    auto fourth = run_treeflash(ex.args({"--static-deltas", "2", "--json"}));
    REQUIRE_MESSAGE(fourth.ok(), fourth.err);
    json out = json::parse(fourth.out);
    std::string to = out["commit"];
    CHECK(out["static_deltas_from"] == json({commits[2], commits[1]}));
    auto deltas = ostree(ex.repo, {"static-delta", "list"});
    CHECK(deltas.out.find(commits[2] + "-" + to) != std::string::npos);
    CHECK(deltas.out.find(commits[1] + "-" + to) != std::string::npos);
    CHECK(deltas.out.find(commits[0] + "-" + to) == std::string::npos);
    // The summary names them, so a pulling board finds them.
    auto summary = ostree(ex.repo, {"summary", "--view"});
    CHECK_MESSAGE(summary.out.find("Static Deltas") != std::string::npos, summary.out);
    CHECK(fsck_clean(ex.repo));
    // More than the history holds: as many as there are.
    write_file(ex.rootfs / "etc/hostname", "five\n");
    auto fifth = run_treeflash(ex.args({"--static-deltas", "64", "--json"}));
    REQUIRE_MESSAGE(fifth.ok(), fifth.err);
    CHECK(json::parse(fifth.out)["static_deltas_from"].size() == 4);
    CHECK(run_treeflash(ex.args({"--static-deltas", "0"})).exit_code == 2);
}

TEST_CASE("the served repository's access log says which client fetched what, and how many bytes")
{
    Example ex;
    auto built = run_treeflash(ex.args());
    REQUIRE_MESSAGE(built.ok(), built.err);
    RepoServer server(ex.repo);
    REQUIRE(ostree(ex.tmp / "client", {"init", "--mode=archive"}).ok());
    REQUIRE(ostree(ex.tmp / "client", {"remote", "add", "--no-gpg-verify", "origin", server.url()}).ok());
    auto pulled = ostree(ex.tmp / "client", {"pull", "origin", "master"});
    REQUIRE_MESSAGE(pulled.ok(), pulled.err);
    std::string log = server.access_log();
    CHECK_MESSAGE(log.find(" 127.0.0.1 \"GET /summary HTTP/1.1\" 200 ") != std::string::npos, log);
    CHECK_MESSAGE(log.find("/objects/" + first_line(built.out).substr(0, 2) + "/") != std::string::npos, log);
    CHECK_MESSAGE(log.find("libostree/") != std::string::npos, log);
    // The bytes sent for the commit object are its size on the server.
    std::string commit = first_line(built.out);
    fs::path object = ex.repo / "objects" / commit.substr(0, 2) / (commit.substr(2) + ".commit");
    CHECK_MESSAGE(log.find(".commit HTTP/1.1\" 200 " + std::to_string(fs::file_size(object)) + " ") != std::string::npos,
                  log);
}

TEST_CASE("a failing build into a new repository leaves nothing behind")
{
    Example ex;
    auto result = run_treeflash({"build", "--rootfs", ex.rootfs.string(), "--repo", ex.repo.string()});
    CHECK(result.exit_code == 1);
    CHECK(result.err.find("build: kernel: no kernel") != std::string::npos);
    CHECK(std::count(result.err.begin(), result.err.end(), '\n') == 1);
    CHECK_FALSE(fs::exists(ex.repo));
    CHECK_FALSE(has_partial(ex.tmp.path()));
}

TEST_CASE("a path that is not a repository is refused untouched")
{
    Example ex;
    write_file(ex.repo / "precious.txt", "keep me");
    auto result = run_treeflash(ex.args());
    CHECK(result.exit_code == 1);
    CHECK(result.err.find("is not an OSTree repository") != std::string::npos);
    CHECK(read_text(ex.repo / "precious.txt") == "keep me");
}

TEST_CASE("SIGINT and SIGKILL during a build leave the branch where it was and fsck clean")
{
    Example ex;
    REQUIRE(run_treeflash(ex.args()).ok());
    std::string before = rev_parse(ex.repo);
    fill_random(ex.rootfs, 200, 256 * 1024, 1);

    pid_t pid = spawn_treeflash(ex.args({"--jobs", "1"}));
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    ::kill(pid, SIGINT);
    int code = wait_exit(pid);
    CHECK(code == 130);
    CHECK(rev_parse(ex.repo) == before);
    CHECK(fsck_clean(ex.repo));
    CHECK_FALSE(has_import_scratch(ex.repo));

    pid = spawn_treeflash(ex.args({"--jobs", "1"}));
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    ::kill(pid, SIGKILL);
    int signal = 0;
    wait_exit(pid, &signal);
    CHECK(signal == SIGKILL);
    CHECK(rev_parse(ex.repo) == before);
    CHECK(fsck_clean(ex.repo));

    // And the next build still works, and removes what the killed one left.
    auto after = run_treeflash(ex.args());
    CHECK(after.ok());
    CHECK(rev_parse(ex.repo, "master^") == before);
    CHECK_FALSE(has_import_scratch(ex.repo));
}

TEST_CASE("SIGKILL while creating a repository: the next build removes the partial one")
{
    Example ex;
    fill_random(ex.rootfs, 200, 256 * 1024, 4);
    pid_t pid = spawn_treeflash(ex.args({"--jobs", "1"}));
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    ::kill(pid, SIGKILL);
    wait_exit(pid);
    REQUIRE(has_partial(ex.tmp.path()));
    auto next = run_treeflash(ex.args());
    REQUIRE_MESSAGE(next.ok(), next.err);
    CHECK(next.err.find("left by an interrupted build") != std::string::npos);
    CHECK_FALSE(has_partial(ex.tmp.path()));
    CHECK(fsck_clean(ex.repo));
}

TEST_CASE("three builds into a repository that does not exist yet take turns")
{
    Example ex;
    std::vector<fs::path> roots;
    for (int i = 0; i < 3; ++i) {
        roots.push_back(ex.tmp / ("rootfs" + std::to_string(i)));
        make_rootfs(roots.back());
        write_file(roots.back() / "etc/hostname", "host" + std::to_string(i) + "\n");
    }
    std::vector<ProcessResult> results(3);
    std::vector<std::thread> threads;
    for (int i = 0; i < 3; ++i)
        threads.emplace_back([&, i] {
            results[i] = run_treeflash({"build", "--rootfs", roots[i].string(), "--repo", ex.repo.string(), "--kernel",
                                        ex.kernel.kernel.string()});
        });
    for (auto& t : threads)
        t.join();
    for (const auto& r : results)
        CHECK_MESSAGE(r.ok(), r.err);
    // One history of three commits.
    auto log = ostree(ex.repo, {"log", "master"});
    size_t commits = 0;
    for (size_t pos = 0; (pos = log.out.find("commit ", pos)) != std::string::npos; ++pos)
        ++commits;
    CHECK(commits == 3);
    CHECK_FALSE(has_partial(ex.tmp.path()));
    CHECK(fsck_clean(ex.repo));
}

TEST_CASE("owners: a directory read without root is committed as root's; --owner-uid/--owner-gid set them")
{
    Example ex;
    // Run as an unprivileged user: a copy of the binary it can reach, a
    // rootfs it owns, and a place to write the repository.
    fs::path binary = ex.tmp / "treeflash";
    fs::copy_file(TREEFLASH_BINARY, binary);
    fs::permissions(binary, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec | fs::perms::others_read | fs::perms::others_exec);
    fs::path out = ex.tmp / "out";
    fs::create_directories(out);
    fs::permissions(out, fs::perms::all);
    uid_t user = is_root() ? 65534 : ::getuid();
    if (is_root())
        REQUIRE(run_process({"chown", "-R", "65534:65534", ex.rootfs.string()}).ok());
    for (const fs::path& p : {ex.kernel.kernel})
        fs::permissions(p, fs::perms::others_read, fs::perm_options::add);
    auto as_user = [&](std::vector<std::string> args) {
        std::vector<std::string> argv;
        if (is_root())
            argv = {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"};
        argv.push_back(binary.string());
        argv.insert(argv.end(), args.begin(), args.end());
        return run_process(argv);
    };
    auto built = as_user({"build", "--rootfs", ex.rootfs.string(), "--repo", (out / "repo").string(), "--kernel",
                          ex.kernel.kernel.string()});
    REQUIRE_MESSAGE(built.ok(), built.err);
    CHECK(built.err.find("committed as owned by root (0:0)") != std::string::npos);
    auto listing = list_commit(out / "repo");
    REQUIRE(listing.count("/usr/bin/busybox"));
    CHECK_MESSAGE(listing["/usr/bin/busybox"].find(" 0 0 ") != std::string::npos, listing["/usr/bin/busybox"]);
    CHECK(listing["/usr/etc"].find(" 0 0 ") != std::string::npos);
    CHECK(listing["/usr/bin/busybox"].find(std::to_string(user)) == std::string::npos);

    auto owned = run_treeflash({"build", "--rootfs", ex.rootfs.string(), "--repo", (ex.tmp / "owned").string(), "--kernel",
                                ex.kernel.kernel.string(), "--owner-uid", "1234", "--owner-gid", "5678"});
    REQUIRE_MESSAGE(owned.ok(), owned.err);
    CHECK(list_commit(ex.tmp / "owned")["/usr/bin/busybox"].find(" 1234 5678 ") != std::string::npos);
}

TEST_CASE("a repository treeflash creates compresses at level 4, and stock ostree reads every object")
{
    Example ex;
    // Text compresses: the objects must be smaller than the files.
    std::string text;
    for (int i = 0; text.size() < 4 * 1024 * 1024; ++i)
        text += "line " + std::to_string(i) + " of a log nobody reads\n";
    write_file(ex.rootfs / "usr/share/doc/log.txt", text);
    write_file(ex.rootfs / "usr/share/doc/copy.txt", text); // the same object twice
    write_file(ex.rootfs / "usr/share/doc/empty", "");
    fs::create_symlink("log.txt", ex.rootfs / "usr/share/doc/latest");
    // Served to others whatever the builder's umask.
    std::vector<std::string> argv{"sh", "-c", "umask 077 && exec \"$@\"", "sh", TREEFLASH_BINARY};
    std::vector<std::string> args = ex.args();
    argv.insert(argv.end(), args.begin(), args.end());
    auto built = run_process(argv);
    REQUIRE_MESSAGE(built.ok(), built.err);

    auto level = ostree(ex.repo, {"config", "get", "archive.zlib-level"});
    CHECK(level.out == "4\n");
    CHECK(fsck_clean(ex.repo));
    CHECK_FALSE(has_import_scratch(ex.repo));
    uint64_t object_bytes = 0;
    for (const auto& entry : fs::recursive_directory_iterator(ex.repo / "objects")) {
        if (!entry.is_regular_file())
            continue;
        CHECK_MESSAGE((entry.status().permissions() & fs::perms::all) == (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read),
                      entry.path());
        object_bytes += entry.file_size();
    }
    CHECK(object_bytes < text.size() / 4);
    // Stock ostree copies every object into a repository of its own, which
    // inflates and checks each one.
    fs::path copy = ex.tmp / "copy";
    REQUIRE(ostree(copy, {"init", "--mode=bare-user"}).ok());
    auto pulled = ostree(copy, {"pull-local", "--untrusted", ex.repo.string(), "master"});
    REQUIRE_MESSAGE(pulled.ok(), pulled.err);
    CHECK(fsck_clean(copy));
    CHECK(ostree(copy, {"cat", "master", "/usr/share/doc/copy.txt"}).out == text);
    CHECK(ostree(copy, {"cat", "master", "/usr/share/doc/empty"}).out.empty());
    CHECK(ostree(ex.repo, {"cat", "master", "/usr/bin/busybox"}).out == read_text(ex.rootfs / "usr/bin/busybox"));
    auto link = ostree(copy, {"ls", "master", "/usr/share/doc/latest"});
    CHECK_MESSAGE(link.out.find("-> log.txt") != std::string::npos, link.out);
}

TEST_CASE("a build into an existing bare-user repository writes its objects through libostree")
{
    Example ex;
    REQUIRE(ostree(ex.repo, {"init", "--mode=bare-user"}).ok());
    auto built = run_treeflash(ex.args());
    REQUIRE_MESSAGE(built.ok(), built.err);
    CHECK(fsck_clean(ex.repo));
    CHECK(ostree(ex.repo, {"cat", "master", "/usr/bin/busybox"}).out == read_text(ex.rootfs / "usr/bin/busybox"));
    CHECK_FALSE(has_import_scratch(ex.repo));
}

TEST_CASE("extended attributes reach the commit")
{
    Example ex;
    REQUIRE(::setxattr((ex.rootfs / "usr/bin/busybox").c_str(), "user.treeflash-test", "cap", 3, 0) == 0);
    REQUIRE(run_treeflash(ex.args()).ok());
    auto shown = ostree(ex.repo, {"ls", "-X", "master", "/usr/bin/busybox"});
    CHECK_MESSAGE(shown.out.find("user.treeflash-test") != std::string::npos, shown.out);
    CHECK(fsck_clean(ex.repo));
}

TEST_CASE("SIGINT while creating a repository leaves no repository")
{
    Example ex;
    fill_random(ex.rootfs, 200, 256 * 1024, 2);
    pid_t pid = spawn_treeflash(ex.args({"--jobs", "1"}));
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    ::kill(pid, SIGINT);
    CHECK(wait_exit(pid) == 130);
    CHECK_FALSE(fs::exists(ex.repo));
    CHECK_FALSE(has_partial(ex.tmp.path()));
}

TEST_CASE("two builds into one repository at once are serialized into one history")
{
    Example ex;
    REQUIRE(run_treeflash(ex.args()).ok());
    fs::path other = ex.tmp / "rootfs2";
    make_rootfs(other);
    write_file(other / "etc/hostname", "other\n");
    fill_random(ex.rootfs, 40, 256 * 1024, 3);
    ProcessResult first, second;
    std::thread a([&] { first = run_treeflash(ex.args()); });
    std::thread b([&] {
        second = run_treeflash({"build", "--rootfs", other.string(), "--repo", ex.repo.string(), "--kernel",
                            ex.kernel.kernel.string()});
    });
    a.join();
    b.join();
    REQUIRE_MESSAGE(first.ok(), first.err);
    REQUIRE_MESSAGE(second.ok(), second.err);
    std::string c1 = first_line(first.out), c2 = first_line(second.out);
    std::string head = rev_parse(ex.repo);
    CHECK((head == c1 || head == c2));
    std::string older = head == c1 ? c2 : c1;
    CHECK(rev_parse(ex.repo, "master^") == older);
    CHECK(fsck_clean(ex.repo));
}

}

TEST_SUITE("cli") {

TEST_CASE("help explains every option with an example")
{
    auto top = run_treeflash({"--help"});
    CHECK(top.ok());
    CHECK(top.out.find("build") != std::string::npos);
    auto help = run_treeflash({"build", "--help"});
    CHECK(help.ok());
    for (const char* option : {"--rootfs", "--repo", "--branch", "--subject", "--body", "--version", "--kernel",
                               "--initramfs", "--devicetree", "--kernel-layout", "--kver", "--os-release",
                               "--timestamp", "--gpg-sign", "--gpg-homedir", "--static-delta", "--json"})
        CHECK_MESSAGE(help.out.find(option) != std::string::npos, option);
    CHECK(help.out.find("Examples:") != std::string::npos);
    for (const char* command : {"flash", "initramfs", "upgrade", "inspect", "bmap"}) {
        CAPTURE(command);
        CHECK(top.out.find(command) != std::string::npos);
        auto sub = run_treeflash({command, "--help"});
        CHECK(sub.ok());
        CHECK(sub.out.find("Example") != std::string::npos);
    }
    auto flash = run_treeflash({"flash", "--help"});
    for (const char* option : {"--board", "--device", "--image", "--size", "--repo", "--ref", "--os", "--remote-url",
                               "--gpg-import", "--karg", "--firmware", "--force", "--yes", "--json"})
        CHECK_MESSAGE(flash.out.find(option) != std::string::npos, option);
}

TEST_CASE("bad command lines exit 2 with one line")
{
    auto none = run_treeflash({});
    CHECK(none.exit_code == 2);
    auto unknown = run_treeflash({"frobnicate"});
    CHECK(unknown.exit_code == 2);
    CHECK(unknown.err == "treeflash: unknown command 'frobnicate' (see treeflash --help)\n");
    auto missing = run_treeflash({"build", "--repo", "r"});
    CHECK(missing.exit_code == 2);
    CHECK(missing.err.find("--rootfs is required") != std::string::npos);
    auto layout = run_treeflash({"build", "--rootfs", "x", "--repo", "r", "--kernel-layout", "uefi"});
    CHECK(layout.exit_code == 2);
    CHECK(layout.err.find("unknown kernel layout 'uefi'") != std::string::npos);
    for (const char* jobs : {"-1", "0", "4294967296", "x"}) {
        auto r = run_treeflash({"build", "--rootfs", "x", "--repo", "r", "--jobs", jobs});
        CHECK(r.exit_code == 2);
        CHECK_MESSAGE(r.err.find("--jobs") != std::string::npos, r.err);
    }
    auto stamp = run_treeflash({"build", "--rootfs", "x", "--repo", "r", "--timestamp", "99999999999999999999"});
    CHECK(stamp.exit_code == 2);
    CHECK_MESSAGE(stamp.err.find("--timestamp '99999999999999999999': a whole number from 0 to 253402300799") != std::string::npos, stamp.err);
    auto epoch = run_treeflash({"build", "--rootfs", "x", "--repo", "r"}, {"SOURCE_DATE_EPOCH=999999999999"});
    CHECK(epoch.exit_code == 2);
    CHECK_MESSAGE(epoch.err.find("SOURCE_DATE_EPOCH 999999999999: out of range") != std::string::npos, epoch.err);
}

}
