// Normalize: /etc -> /usr/etc, os-release, the directories OSTree needs.
#include "builder/stages.hpp"
#include "common/error.hpp"
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>

using namespace treeflash;
using namespace treeflash::builder;
using namespace treeflash::test;

TEST_SUITE("normalize") {

TEST_CASE("/etc moves to /usr/etc and OSTree's directories appear")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    write_file(tmp / "rootfs/var/lib/seed", "x");
    write_file(tmp / "rootfs/tmp/leftover", "x");
    ImportResult imported = import_directory(tmp / "rootfs");
    NormalizeResult result = normalize(imported.tree, {});
    Tree& tree = imported.tree;
    CHECK(result.moved_etc);
    CHECK_FALSE(tree.find("etc"));
    REQUIRE(tree.find("usr/etc/inittab"));
    CHECK(tree.find("sysroot")->is_dir());
    CHECK(tree.find("ostree")->symlink_target == "sysroot/ostree");
    for (const char* dir : {"dev", "proc", "sys", "run", "tmp", "var", "boot"}) {
        CAPTURE(dir);
        REQUIRE(tree.find(dir));
        CHECK(tree.find(dir)->is_dir());
    }
    CHECK(tree.find("tmp")->mode == 01777);
    CHECK(tree.find("tmp")->children.empty());
    CHECK(result.var_entries == std::vector<std::string>{"var/lib", "var/lib/seed"});
    bool var_reported = false;
    for (const auto& w : result.warnings)
        var_reported |= w.find("var/lib/seed") != std::string::npos && w.find("first deployment") != std::string::npos;
    CHECK(var_reported);
}

TEST_CASE("os-release is generated with the OS name and overrides")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    ImportResult imported = import_directory(tmp / "rootfs");
    NormalizeOptions options;
    options.version = "1.2";
    options.os_release = {{"PRETTY_NAME", "TCU gateway 1.2"}, {"HOME_URL", "http://example.invalid/"}};
    normalize(imported.tree, options);
    const Node* release = imported.tree.find("usr/lib/os-release");
    REQUIRE(release);
    std::string text = imported.tree.read_all(*release);
    CHECK(text.find("ID=tcu\n") != std::string::npos);
    CHECK(text.find("VERSION_ID=1.2\n") != std::string::npos);
    CHECK(text.find("PRETTY_NAME=\"TCU gateway 1.2\"\n") != std::string::npos);
    CHECK(text.find("HOME_URL=\"http://example.invalid/\"\n") != std::string::npos);
}

TEST_CASE("an existing os-release is kept")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    write_file(tmp / "rootfs/usr/lib/os-release", "ID=custom\nPRETTY_NAME=\"Custom\"\n");
    ImportResult imported = import_directory(tmp / "rootfs");
    NormalizeResult result = normalize(imported.tree, {});
    CHECK_FALSE(result.wrote_os_release);
    CHECK(imported.tree.read_all(*imported.tree.find("usr/lib/os-release")) == "ID=custom\nPRETTY_NAME=\"Custom\"\n");
}

TEST_CASE("an already normalized rootfs is accepted")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    fs::rename(tmp / "rootfs/etc", tmp / "rootfs/usr/etc");
    ImportResult imported = import_directory(tmp / "rootfs");
    NormalizeResult result = normalize(imported.tree, {});
    CHECK_FALSE(result.moved_etc);
    CHECK(imported.tree.find("usr/etc/inittab"));
}

TEST_CASE("both /etc and /usr/etc with content is an error naming both")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    write_file(tmp / "rootfs/usr/etc/other", "x");
    ImportResult imported = import_directory(tmp / "rootfs");
    CHECK_THROWS_WITH_AS(normalize(imported.tree, {}), doctest::Contains("both /etc and /usr/etc"), Error);
}

TEST_CASE("an empty /etc beside /usr/etc is dropped")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    fs::rename(tmp / "rootfs/etc", tmp / "rootfs/usr/etc");
    fs::create_directories(tmp / "rootfs/etc");
    ImportResult imported = import_directory(tmp / "rootfs");
    normalize(imported.tree, {});
    CHECK_FALSE(imported.tree.find("etc"));
    CHECK(imported.tree.find("usr/etc/inittab"));
}

TEST_CASE("etc -> /etc and usr/etc -> /etc are refused and the host's /etc is untouched")
{
    auto host_before = host_etc_state();
    for (const char* link : {"etc", "usr/etc"}) {
        CAPTURE(link);
        Scratch tmp;
        make_rootfs(tmp / "rootfs");
        fs::remove_all(tmp / "rootfs/etc");
        fs::create_symlink("/etc", tmp / "rootfs" / link);
        ImportResult imported = import_directory(tmp / "rootfs");
        CHECK_THROWS_WITH_AS(normalize(imported.tree, {}), doctest::Contains((std::string("/") + link + " is a symlink (-> /etc)").c_str()),
                             Error);
    }
    CHECK(host_etc_state() == host_before);
}

}

TEST_SUITE("normalize") {

TEST_CASE("an os-release symlink is resolved inside the rootfs, never on the build host")
{
    Scratch tmp;
    // Debian's way round: /etc/os-release -> ../usr/lib/os-release, and the
    // other way, usr/lib/os-release -> /etc/os-release (absolute).
    make_rootfs(tmp / "a");
    write_file(tmp / "a/etc/os-release", "ID=mine\nNAME=\"Mine\"\n");
    fs::create_directories(tmp / "a/usr/lib");
    fs::create_symlink("/etc/os-release", tmp / "a/usr/lib/os-release");
    ImportResult a = import_directory(tmp / "a");
    NormalizeOptions options;
    options.version = "2.5";
    normalize(a.tree, options);
    const Node* lib = a.tree.find("usr/lib/os-release");
    REQUIRE(lib);
    REQUIRE(lib->is_regular()); // OSTree reads this one: a file, not a link to the host's
    std::string text = a.tree.read_all(*lib);
    CHECK(text.find("ID=mine") != std::string::npos);
    CHECK(text.find("VERSION_ID=2.5") != std::string::npos); // --version is not dropped
    CHECK(text.find("debian") == std::string::npos);

    // Debian's own layout, /etc/os-release -> ../usr/lib/os-release: the
    // link stays, the file is untouched unless --version asks for a change.
    make_rootfs(tmp / "debian");
    fs::create_directories(tmp / "debian/usr/lib");
    write_file(tmp / "debian/usr/lib/os-release", "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\n");
    fs::create_symlink("../usr/lib/os-release", tmp / "debian/etc/os-release");
    ImportResult debian = import_directory(tmp / "debian");
    normalize(debian.tree, {});
    CHECK(debian.tree.find("usr/etc/os-release")->symlink_target == "../usr/lib/os-release");
    CHECK(debian.tree.read_all(*debian.tree.find("usr/lib/os-release")) == read_text(tmp / "debian/usr/lib/os-release"));
    ImportResult versioned = import_directory(tmp / "debian");
    normalize(versioned.tree, options);
    CHECK(versioned.tree.find("usr/etc/os-release")->is_symlink());
    CHECK(versioned.tree.read_all(*versioned.tree.find("usr/lib/os-release")).find("VERSION_ID=2.5") != std::string::npos);

    // A link that leads out of the rootfs is an error, not the host's file.
    make_rootfs(tmp / "b");
    fs::create_directories(tmp / "b/usr/lib");
    fs::create_symlink("/etc/nonexistent-os-release", tmp / "b/usr/lib/os-release");
    ImportResult b = import_directory(tmp / "b");
    CHECK_THROWS_WITH_AS(normalize(b.tree, {}),
                         "os-release: usr/lib/os-release is a symlink to /etc/nonexistent-os-release, which is not a file "
                         "in the rootfs; OSTree would read the deploying host's instead",
                         Error);
}

TEST_CASE("--os-release and --version values stay on one line")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    ImportResult imported = import_directory(tmp / "rootfs");
    NormalizeOptions options;
    options.os_release["VERSION_ID"] = "1\nID=evil";
    CHECK_THROWS_WITH_AS(normalize(imported.tree, options),
                         doctest::Contains("--os-release VERSION_ID '1?ID=evil': a newline or control character"), Error);
    options.os_release.clear();
    options.version = "1\nID=evil";
    CHECK_THROWS_WITH_AS(normalize(imported.tree, options), doctest::Contains("--version '1?ID=evil'"), Error);
}

}
