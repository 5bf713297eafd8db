// The initramfs: the ELF reading and the builder, on binaries this machine
// has, and the init script's command-line parsing.
#include "builder/elf.hpp"
#include "builder/initramfs.hpp"
#include "common/error.hpp"
#include "tests/support/fixtures.hpp"

#include <archive.h>
#include <archive_entry.h>
#include <chrono>
#include <doctest/doctest.h>
#include <map>
#include <memory>
#include <sstream>

using namespace treeflash;
using namespace treeflash::builder;
using namespace treeflash::test;

TEST_SUITE("initramfs") {

TEST_CASE("the loader and DT_NEEDED libraries of a dynamic executable")
{
    ElfDependencies deps = elf_dependencies(read_text(TREEFLASH_BINARY), "treeflash");
    CHECK(deps.interpreter.find("ld-linux") != std::string::npos);
    bool has_ostree = false, has_libc = false;
    for (const auto& lib : deps.needed) {
        has_ostree |= lib == "libostree-1.so.1";
        has_libc |= lib == "libc.so.6";
    }
    CHECK(has_ostree);
    CHECK(has_libc);
}

TEST_CASE("what is not a usable ELF file is named")
{
    CHECK_THROWS_WITH_AS(elf_dependencies("#!/bin/sh\n", "script"), "script: not an ELF file", Error);
    CHECK_THROWS_WITH_AS(elf_modinfo(read_text(TREEFLASH_BINARY), "treeflash"),
                         "treeflash: no .modinfo section (not a kernel module?)", Error);
    std::string truncated = read_text(TREEFLASH_BINARY).substr(0, 100);
    CHECK_THROWS_AS(elf_dependencies(truncated, "cut"), Error);
}

}

// build_initramfs itself, on host binaries: /bin/ls stands in for
// ostree-prepare-root (it needs libselinux, which needs libpcre2-8), the
// static /sbin/ldconfig for busybox, and small ELF objects with a .modinfo
// section for kernel modules.

namespace {

struct CpioEntry {
    mode_t type = 0;
    mode_t perm = 0;
    std::string data; // file bytes or symlink target
    unsigned rdev_major = 0, rdev_minor = 0;
};

std::map<std::string, CpioEntry> read_cpio(const fs::path& file)
{
    std::unique_ptr<struct archive, int (*)(struct archive*)> a(archive_read_new(), archive_read_free);
    archive_read_support_filter_all(a.get());
    archive_read_support_format_cpio(a.get());
    REQUIRE(archive_read_open_filename(a.get(), file.c_str(), 1 << 16) == ARCHIVE_OK);
    std::map<std::string, CpioEntry> out;
    struct archive_entry* entry = nullptr;
    while (archive_read_next_header(a.get(), &entry) == ARCHIVE_OK) {
        CpioEntry e;
        e.type = archive_entry_filetype(entry);
        e.perm = archive_entry_perm(entry);
        CHECK(archive_entry_mtime(entry) == 0);
        CHECK(archive_entry_uid(entry) == 0);
        if (e.type == AE_IFLNK)
            e.data = archive_entry_symlink(entry);
        if (e.type == AE_IFCHR) {
            e.rdev_major = archive_entry_rdevmajor(entry);
            e.rdev_minor = archive_entry_rdevminor(entry);
        }
        char buffer[1 << 16];
        for (la_ssize_t n; (n = archive_read_data(a.get(), buffer, sizeof buffer)) > 0;)
            e.data.append(buffer, static_cast<size_t>(n));
        out[archive_entry_pathname(entry)] = e;
    }
    return out;
}

// A relocatable ELF object with a .modinfo section, as a kernel module has.
void make_module(const fs::path& base_object, const fs::path& ko, const std::string& modinfo)
{
    fs::create_directories(ko.parent_path());
    fs::path info = ko;
    info += ".modinfo";
    write_file(info, modinfo);
    auto r = run_process({"objcopy", "--add-section", ".modinfo=" + info.string(), base_object.string(), ko.string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    fs::remove(info);
}

// Copies `host` into `tree` at the same path, as a regular file.
void copy_into(const fs::path& tree, const fs::path& host)
{
    fs::create_directories(tree / host.relative_path().parent_path());
    fs::copy_file(host, tree / host.relative_path(), fs::copy_options::overwrite_existing);
}

struct InitramfsInputs {
    Scratch tmp;
    InitramfsOptions options;
    std::vector<std::string> ldd_sonames; // what ldd says /bin/ls needs

    InitramfsInputs()
    {
        fs::path userland = tmp / "userland";
        fs::create_directories(userland / "usr/lib/ostree");
        fs::copy_file("/bin/ls", userland / "usr/lib/ostree/ostree-prepare-root");
        auto ldd = run_process({"ldd", "/bin/ls"});
        REQUIRE(ldd.ok());
        std::istringstream lines(ldd.out);
        for (std::string line; std::getline(lines, line);) {
            auto arrow = line.find(" => ");
            std::string path = arrow != std::string::npos ? line.substr(arrow + 4) : line;
            path = path.substr(path.find_first_not_of(" \t"));
            path = path.substr(0, path.find(" ("));
            if (path.empty() || path[0] != '/')
                continue; // the vdso
            copy_into(userland, fs::canonical(path).parent_path() / fs::path(path).filename());
            if (arrow != std::string::npos)
                ldd_sonames.push_back(fs::path(path).filename().string());
            else // the loader, also under its own name
                copy_into(userland, path);
        }

        fs::path modules = tmp / "modules";
        auto cc = run_process({"cc", "-c", "-x", "c", "/dev/null", "-o", (tmp / "base.o").string()});
        REQUIRE_MESSAGE(cc.ok(), cc.err);
        using namespace std::string_literals;
        make_module(tmp / "base.o", modules / "kernel/fs/ext4/ext4.ko", "name=ext4\0depends=mbcache,jbd2,crc16\0"s);
        make_module(tmp / "base.o", modules / "kernel/fs/jbd2/jbd2.ko", "name=jbd2\0depends=\0"s);
        make_module(tmp / "base.o", modules / "kernel/fs/mbcache.ko", "name=mbcache\0depends=\0"s);
        make_module(tmp / "base.o", modules / "kernel/drivers/block/virtio_blk.ko", "depends=virtio,virtio_ring\0name=virtio_blk\0"s);
        make_module(tmp / "base.o", modules / "kernel/drivers/virtio/virtio-ring.ko", "name=virtio_ring\0depends=virtio\0"s);
        make_module(tmp / "base.o", modules / "kernel/drivers/virtio/virtio.ko", "name=virtio\0"s);
        make_module(tmp / "base.o", modules / "kernel/unused.ko", "name=unused\0"s);
        write_file(modules / "modules.builtin", "kernel/lib/crc16.ko\n");

        options.busybox = "/sbin/ldconfig"; // static
        options.userland = userland;
        options.modules_dir = modules;
        options.modules = {"virtio_blk", "ext4"};
        options.on_failure = "poweroff";
        options.root_wait = 7;
        options.board = "testboard";
        options.output = tmp / "initramfs.img";
    }
};

} // namespace

TEST_SUITE("initramfs") {

TEST_CASE("build_initramfs: init, busybox, prepare-root with what ldd lists, modules after their dependencies")
{
    InitramfsInputs in;
    InitramfsResult result = build_initramfs(in.options);
    CHECK(result.modules == std::vector<std::string>{"virtio", "virtio_ring", "virtio_blk", "mbcache", "jbd2", "ext4"});
    CHECK(result.bytes == fs::file_size(in.options.output));

    auto cpio = read_cpio(in.options.output);
    REQUIRE(cpio.count("init"));
    CHECK(cpio["init"].perm == 0755);
    CHECK(cpio["init"].data.find("on_failure=poweroff") != std::string::npos);
    CHECK(cpio["init"].data.find("root_wait=7") != std::string::npos);
    CHECK(cpio["init"].data.find("board testboard") != std::string::npos);
    CHECK(cpio["init"].data.find('@') == std::string::npos);
    CHECK(cpio["bin/busybox"].data == read_text("/sbin/ldconfig"));
    CHECK(cpio["bin/sh"].type == AE_IFLNK);
    CHECK(cpio["bin/sh"].data == "busybox");
    CHECK(cpio["dev/console"].type == AE_IFCHR);
    CHECK((cpio["dev/console"].rdev_major == 5 && cpio["dev/console"].rdev_minor == 1));
    CHECK(cpio["usr/lib/ostree/ostree-prepare-root"].data == read_text("/bin/ls"));
    CHECK(cpio["usr/lib/ostree/ostree-prepare-root"].perm == 0755);
    CHECK(cpio.count("lib64/ld-linux-x86-64.so.2"));
    REQUIRE(in.ldd_sonames.size() >= 3); // libselinux, libc, libpcre2-8 (through libselinux)
    for (const auto& soname : in.ldd_sonames) {
        CAPTURE(soname);
        CHECK(cpio.count("lib/" + soname));
    }
    CHECK(cpio["etc/modules"].data == "virtio\nvirtio_ring\nvirtio_blk\nmbcache\njbd2\next4\n");
    CHECK(cpio.count("lib/modules/virtio_ring.ko"));
    CHECK(cpio.count("lib/modules/crc16.ko") == 0); // built in
    CHECK(cpio.count("lib/modules/unused.ko") == 0);
}

TEST_CASE("build_initramfs: equal inputs give an equal archive, whatever the files' times")
{
    InitramfsInputs in;
    build_initramfs(in.options);
    std::string first = read_text(in.options.output);
    for (const auto& entry : fs::recursive_directory_iterator(in.tmp / "modules"))
        fs::last_write_time(entry.path(), fs::file_time_type::clock::now() - std::chrono::hours(24));
    in.options.output = in.tmp / "again.img";
    build_initramfs(in.options);
    CHECK(read_text(in.options.output) == first);
    in.options.root_wait = 8;
    in.options.output = in.tmp / "changed.img";
    build_initramfs(in.options);
    CHECK(read_text(in.options.output) != first);
}

TEST_CASE("build_initramfs refuses a dynamic busybox, a missing library and an unknown module")
{
    InitramfsInputs in;
    in.options.busybox = "/bin/ls";
    CHECK_THROWS_WITH_AS(build_initramfs(in.options),
                         "busybox: /bin/ls is dynamically linked; the initramfs needs a static busybox", Error);
    in.options.busybox = "/sbin/ldconfig";
    in.options.modules = {"nosuch"};
    CHECK_THROWS_WITH_AS(build_initramfs(in.options),
                         "modules: kernel module nosuch is neither a .ko file nor built into the kernel", Error);
    in.options.modules = {};
    for (const auto& entry : fs::recursive_directory_iterator(in.tmp / "userland"))
        if (entry.path().filename().string().rfind("libpcre2-8", 0) == 0)
            fs::remove(entry.path());
    auto message = [&] {
        try {
            build_initramfs(in.options);
        } catch (const Error& e) {
            return std::string(e.what());
        }
        return std::string();
    }();
    CHECK_MESSAGE(message.find("needs libpcre2-8.so.0, which is not in") != std::string::npos, message);
    CHECK_FALSE(fs::exists(in.options.output));
}

TEST_CASE("the init script reads ostree_root=, root= and ostree= as whole arguments, without globbing")
{
    // The script's parse_cmdline, sourced into a POSIX shell.
    Scratch tmp;
    std::string init(read_text(fs::path(TREEFLASH_SOURCE_DIR) / "templates/initramfs/init"));
    write_file(tmp / "init", init);
    write_file(tmp / "glob-would-match", "");
    auto parse = [&](const std::string& cmdline) {
        auto r = run_process({"sh", "-c", "cd \"$1\" && TREEFLASH_INIT_FUNCTIONS_ONLY=1 . ./init && parse_cmdline \"$2\" && "
                                          "echo \"root=[$root] deployment=[$deployment]\"",
                              "sh", tmp.path().string(), cmdline});
        REQUIRE_MESSAGE(r.ok(), r.err);
        return r.out.substr(0, r.out.find('\n'));
    };
    CHECK(parse("console=ttyAMA0 root=/dev/vda3 ostree=/ostree/boot.1/tcu/abc/0")
          == "root=[/dev/vda3] deployment=[/ostree/boot.1/tcu/abc/0]");
    CHECK(parse("ostree_root=LABEL=rootfs root=/dev/vda3 ostree=/x") == "root=[LABEL=rootfs] deployment=[/x]");
    // xostree= and ostree_root= are not ostree=.
    CHECK(parse("ostree_root=/dev/sda3 xostree=/y") == "root=[/dev/sda3] deployment=[]");
    // A glob on the command line stays a word.
    CHECK(parse("root=glob* ostree=/z") == "root=[glob*] deployment=[/z]");
}

}
