// Import and sanitize: directories and tarballs become a staging tree
// without touching the input or anything outside it.
#include "builder/stages.hpp"
#include "common/error.hpp"
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>
#include <sys/xattr.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::builder;
using namespace treeflash::test;

namespace {

void make_socket(const fs::path& path)
{
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr {};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    REQUIRE(::bind(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof addr) == 0);
    ::close(fd);
}

} // namespace

TEST_SUITE("import") {

TEST_CASE("a directory import keeps modes, symlinks and hardlinks and never changes the input")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    auto before = snapshot(tmp / "rootfs");
    ImportResult imported = import_directory(tmp / "rootfs");
    CHECK(snapshot(tmp / "rootfs") == before);

    const Node* busybox = imported.tree.find("usr/bin/busybox");
    REQUIRE(busybox);
    CHECK(busybox->is_regular());
    CHECK(busybox->mode == 04755);
    const Node* bin = imported.tree.find("bin");
    REQUIRE(bin);
    CHECK(bin->is_symlink());
    CHECK(bin->symlink_target == "usr/bin");
    const Node* localtime = imported.tree.find("etc/localtime");
    REQUIRE(localtime);
    CHECK(localtime->symlink_target == "/usr/share/zoneinfo/UTC");
    CHECK(imported.tree.read_all(*imported.tree.find("usr/bin/busybox-hardlink"))
          == imported.tree.read_all(*busybox));
}

TEST_CASE("device nodes, FIFOs and sockets are dropped and listed")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    REQUIRE(::mkfifo((tmp / "rootfs/dev/initctl").c_str(), 0600) == 0);
    make_socket(tmp / "rootfs/tmp/sock");
    bool have_device = is_root() && ::mknod((tmp / "rootfs/dev/null").c_str(), S_IFCHR | 0666, makedev(1, 3)) == 0;

    ImportResult imported = import_directory(tmp / "rootfs");
    CHECK_FALSE(imported.tree.find("dev/initctl"));
    CHECK_FALSE(imported.tree.find("tmp/sock"));
    auto warnings = sanitize_warnings(imported);
    REQUIRE(warnings.size() == 1);
    CHECK(warnings[0].find("dev/initctl (FIFO)") != std::string::npos);
    CHECK(warnings[0].find("tmp/sock (socket)") != std::string::npos);
    if (have_device) {
        CHECK_FALSE(imported.tree.find("dev/null"));
        CHECK(warnings[0].find("dev/null (character device)") != std::string::npos);
    }
}

TEST_CASE("tarballs in every supported compression import with their ownership and modes")
{
    Scratch tmp;
    std::vector<TarEntry> entries{
        {"./", 'd', "", 0755},
        {"./usr/", 'd', "", 0755},
        {"./usr/bin/", 'd', "", 0755},
        {"./usr/bin/busybox", 'f', "busybox bytes", 04755},
        {"./usr/bin/sh", 'l', "busybox", 0777},
        {"./usr/bin/hard", 'h', "./usr/bin/busybox", 04755},
        {"./home/", 'd', "", 0755},
        {"./home/user/", 'd', "", 0700, 1000, 1000},
        {"./home/user/notes", 'f', "mine", 0600, 1000, 1000},
        {"./dev/console", 'c', "", 0600},
        {"./run/initctl", 'p', "", 0600},
    };
    for (const char* name : {"rootfs.tar", "rootfs.tar.gz", "rootfs.tar.xz", "rootfs.tar.zst"}) {
        CAPTURE(name);
        write_tarball(tmp / name, entries);
        fs::create_directories(tmp / "scratch");
        ImportResult imported = import_tarball(tmp / name, tmp / "scratch");
        const Node* busybox = imported.tree.find("usr/bin/busybox");
        REQUIRE(busybox);
        CHECK(busybox->mode == 04755);
        CHECK(imported.tree.read_all(*busybox) == "busybox bytes");
        CHECK(imported.tree.read_all(*imported.tree.find("usr/bin/hard")) == "busybox bytes");
        const Node* notes = imported.tree.find("home/user/notes");
        REQUIRE(notes);
        CHECK(notes->uid == 1000);
        CHECK(notes->mode == 0600);
        CHECK(imported.tree.find("home/user")->mode == 0700);
        CHECK(imported.tree.find("usr/bin/sh")->symlink_target == "busybox");
        CHECK(imported.dropped_special.size() == 2);
        fs::remove_all(tmp / "scratch");
    }
}

TEST_CASE("tarball entries with .. or absolute paths are refused")
{
    Scratch tmp;
    fs::create_directories(tmp / "scratch");
    write_tarball(tmp / "dotdot.tar", {{"usr/", 'd'}, {"usr/../../escape", 'f', "x"}});
    CHECK_THROWS_WITH_AS(import_tarball(tmp / "dotdot.tar", tmp / "scratch"), doctest::Contains("contains '..'"), Error);
    write_tarball(tmp / "absolute.tar", {{"/etc/passwd", 'f', "root::0:0::/:/bin/sh\n"}});
    CHECK_THROWS_WITH_AS(import_tarball(tmp / "absolute.tar", tmp / "scratch"), doctest::Contains("absolute path"), Error);
    write_tarball(tmp / "hardlink.tar", {{"a", 'h', "../../etc/shadow"}});
    CHECK_THROWS_WITH_AS(import_tarball(tmp / "hardlink.tar", tmp / "scratch"), doctest::Contains("'..'"), Error);
    CHECK(fs::is_empty(tmp / "scratch"));
}

TEST_CASE("a tarball cannot write through a symlink it created")
{
    Scratch tmp;
    fs::create_directories(tmp / "scratch");
    write_tarball(tmp / "evil.tar", {{"etc", 'l', "/etc"}, {"etc/evil.conf", 'f', "owned"}});
    auto host_etc = host_etc_state();
    CHECK_THROWS_WITH_AS(import_tarball(tmp / "evil.tar", tmp / "scratch"),
                         doctest::Contains("refusing to write through symlink etc -> /etc"), Error);
    CHECK_FALSE(fs::exists("/etc/evil.conf"));
    CHECK(host_etc_state() == host_etc);
}

TEST_CASE("a missing input names itself")
{
    Scratch tmp;
    CHECK_THROWS_WITH_AS(import_rootfs(tmp / "nope", tmp.path()), doctest::Contains("nope: no such file"), Error);
}

TEST_CASE("a tarball entry that would replace a directory is refused, as GNU tar does")
{
    Scratch tmp;
    fs::create_directories(tmp / "scratch");
    write_tarball(tmp / "file-over-dir.tar", {{"bin/", 'd'}, {"bin/busybox", 'f', "x"}, {"bin", 'f', "y"}});
    CHECK_THROWS_WITH_AS(import_tarball(tmp / "file-over-dir.tar", tmp / "scratch"),
                         "tarball entry bin: a regular file after the directory bin (1 entries) would replace it", Error);
    write_tarball(tmp / "link-over-dir.tar", {{"lib/", 'd'}, {"lib/x", 'f', "x"}, {"lib", 'l', "usr/lib"}});
    fs::create_directories(tmp / "scratch2");
    CHECK_THROWS_WITH_AS(import_tarball(tmp / "link-over-dir.tar", tmp / "scratch2"),
                         doctest::Contains("a symlink after the directory lib"), Error);
}

TEST_CASE("extended attributes are kept, from directories and tarballs; SELinux labels of the host are not")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    std::string capability("\x01\x00\x00\x02\x00\x20\x00\x00", 8); // a capability blob, as bytes
    REQUIRE(::setxattr((tmp / "rootfs/usr/bin/busybox").c_str(), "user.treeflash-test", capability.data(), capability.size(), 0) == 0);
    REQUIRE(::setxattr((tmp / "rootfs/usr").c_str(), "user.dir-attr", "d", 1, 0) == 0);
    ImportResult dir = import_directory(tmp / "rootfs");
    const Node* busybox = dir.tree.find("usr/bin/busybox");
    REQUIRE(busybox);
    REQUIRE(busybox->xattrs.size() == 1);
    CHECK(busybox->xattrs[0].first == "user.treeflash-test");
    CHECK(busybox->xattrs[0].second == capability);
    CHECK(dir.tree.find("usr")->xattrs == std::vector<std::pair<std::string, std::string>>{{"user.dir-attr", "d"}});

    fs::create_directories(tmp / "scratch");
    TarEntry ping{"usr/bin/ping", 'f', "ping", 0755};
    ping.xattrs = {{"security.capability", capability}, {"security.selinux", "system_u:object_r:ping_exec_t:s0"}};
    write_tarball(tmp / "caps.tar.zst", {{"usr/", 'd'}, {"usr/bin/", 'd'}, ping});
    ImportResult tar = import_tarball(tmp / "caps.tar.zst", tmp / "scratch");
    const Node* node = tar.tree.find("usr/bin/ping");
    REQUIRE(node);
    CHECK(node->xattrs == std::vector<std::pair<std::string, std::string>>{{"security.capability", capability}});
    CHECK(tar.dropped_xattrs == std::vector<std::string>{"usr/bin/ping (security.selinux)"});
}

}

namespace {

// One ustar header block of type flag `type`, with its checksum.
std::string ustar_header(const std::string& name, char type, size_t size)
{
    std::string block(512, '\0');
    auto put = [&](size_t at, const std::string& text) { block.replace(at, text.size(), text); };
    auto octal = [](uint64_t value, int width) {
        char text[32];
        std::snprintf(text, sizeof text, "%0*llo", width - 1, static_cast<unsigned long long>(value));
        return std::string(text);
    };
    put(0, name);
    put(100, octal(0644, 8));
    put(108, octal(0, 8));
    put(116, octal(0, 8));
    put(124, octal(size, 12));
    put(136, octal(0, 12));
    block[156] = type;
    put(257, std::string("ustar\0", 6));
    put(263, "00");
    put(148, std::string(8, ' '));
    unsigned sum = 0;
    for (unsigned char c : block)
        sum += c;
    put(148, octal(sum, 7) + std::string(1, '\0'));
    return block;
}

std::string padded(std::string data)
{
    data.resize((data.size() + 511) / 512 * 512, '\0');
    return data;
}

} // namespace

TEST_SUITE("import") {

TEST_CASE("tarball entries of a type tar does not define are named in a warning")
{
    Scratch tmp;
    std::string tar = ustar_header("usr/", '5', 0) + ustar_header("usr/weird", 'Z', 700) + padded(std::string(700, 'a'))
                      + ustar_header("usr/plain", '0', 3) + padded("abc") + std::string(1024, '\0');
    write_file(tmp / "odd.tar", tar);
    fs::create_directories(tmp / "scratch");
    ImportResult imported = import_tarball(tmp / "odd.tar", tmp / "scratch");
    CHECK(imported.unknown_types == std::vector<std::string>{"usr/weird (type 'Z')"});
    REQUIRE(imported.tree.find("usr/plain"));
    CHECK(imported.tree.read_all(*imported.tree.find("usr/plain")) == "abc");
    auto warnings = sanitize_warnings(imported);
    REQUIRE(warnings.size() == 1);
    CHECK(warnings[0].find("usr/weird (type 'Z')") != std::string::npos);

    // Tarballs libarchive writes (pax, with extended attributes and long
    // names) give no such warning.
    std::string long_name = "usr/" + std::string(150, 'n');
    write_tarball(tmp / "fine.tar.gz", {{"usr/", 'd'}, {long_name, 'f', "x"}, {"usr/l", 'l', "x"}, {"usr/h", 'h', long_name}});
    fs::create_directories(tmp / "scratch2");
    CHECK(import_tarball(tmp / "fine.tar.gz", tmp / "scratch2").unknown_types.empty());
}

}
