// Bad input is refused before anything is written: option strings that
// become paths, config lines or kernel arguments, hostile board files, and
// sizes that make no sense. In-process and through the CLI, without root.
#include "common/error.hpp"
#include "common/glib.hpp"
#include "common/validate.hpp"
#include "flasher/board.hpp"
#include "flasher/flash/flash.hpp"
#include "flasher/disk/partition.hpp"
#include "flasher/deploy/sysroot.hpp"
#include "flasher/disk/target.hpp"
#include "tests/support/fixtures.hpp"
#include "tests/support/system.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <fstream>
#include <array>
#include <arpa/inet.h>
#include <fcntl.h>
#include <chrono>
#include <functional>
#include <gio/gio.h>
#include <netinet/in.h>
#include <optional>
#include <ostree.h>
#include <sys/socket.h>
#include <thread>
#include <regex>
#include <sys/stat.h>
#include <sys/statvfs.h>

using namespace treeflash;
using namespace treeflash::flasher;
using namespace treeflash::test;

namespace {

const fs::path boards = fs::path(TREEFLASH_SOURCE_DIR) / "board";

FlashOptions image_options(const fs::path& image)
{
    FlashOptions options;
    options.board = (boards / "qemu-arm64").string();
    options.image = image;
    options.repo = "/nonexistent-repo";
    options.no_gpg_verify = true;
    return options;
}

// tmp/card.img: 64 MiB, a dos table of three 16 MiB partitions at 1, 17 and
// 33 MiB, each an ext4 made by mkfs.ext4 -d with the label and tree given.
fs::path three_partition_card(const Scratch& tmp, const std::array<std::pair<std::string, fs::path>, 3>& filesystems)
{
    fs::path image = tmp / "card.img";
    {
        std::ofstream(image).close();
        fs::resize_file(image, 64 << 20);
    }
    write_file(tmp / "table.sfdisk", "label: dos\nstart=1MiB, size=16MiB\nsize=16MiB\nsize=16MiB\n");
    auto table = run_process({"sh", "-c", "sfdisk -q \"$0\" < \"$1\"", image.string(), (tmp / "table.sfdisk").string()});
    REQUIRE_MESSAGE(table.ok(), table.err);
    uint64_t start_mib = 1;
    for (const auto& [label, tree] : filesystems) {
        auto r = run_process({"mkfs.ext4", "-q", "-F", "-L", label, "-d", tree.string(), "-E",
                              "offset=" + std::to_string(start_mib << 20), image.string(), "16M"});
        REQUIRE_MESSAGE(r.ok(), r.err);
        start_mib += 16;
    }
    return image;
}

} // namespace

TEST_SUITE("safety") {

TEST_CASE("option strings that would leave the card or add a line are refused before anything else")
{
    Scratch tmp;
    struct Case {
        std::function<void(FlashOptions&)> set;
        std::string expected;
    };
    std::vector<Case> cases{
        {[](FlashOptions& o) { o.os = "../../../../../../../../srv/escape"; }, "--os '../../../../../../../../srv/escape': an OS name holds only"},
        {[](FlashOptions& o) { o.os = ".."; }, "--os '..'"},
        {[](FlashOptions& o) { o.os = ""; }, "--os '': an OS name has 1 to 64 characters"},
        {[](FlashOptions& o) { o.ref = "../../heads/x"; }, "--ref '../../heads/x'"},
        {[](FlashOptions& o) { o.ref = "a//b"; }, "--ref 'a//b'"},
        {[](FlashOptions& o) { o.ref = std::string(64, 'e'); }, "a ref names a branch; this is a commit checksum"},
        {[](FlashOptions& o) { o.kernel_args = {"quiet\ninit=/bin/sh"}; }, "--karg 'quiet?init=/bin/sh': a kernel argument is one word"},
        {[](FlashOptions& o) { o.kernel_args = {"a=\"b\""}; }, "a kernel argument may not hold \""},
        {[](FlashOptions& o) { o.kernel_args = {"x;reset"}; }, "a kernel argument may not hold ;"},
        {[](FlashOptions& o) { o.remote_url = "http://host/\ngpg-verify=false"; }, "--remote-url 'http://host/?gpg-verify=false'"},
        {[](FlashOptions& o) { o.remote_url = "ftp://host/"; }, "expected an http://, https:// or file:// URL"},
        {[](FlashOptions& o) { o.no_gpg_verify = false; }, "no --gpg-import KEY: the card would accept unsigned updates"},
        {[&](FlashOptions& o) { o.gpg_import = tmp / "missing.gpg"; o.no_gpg_verify = false; }, "missing.gpg: No such file"},
        {[&](FlashOptions& o) { write_file(tmp / "empty.gpg", ""); o.gpg_import = tmp / "empty.gpg"; o.no_gpg_verify = false; },
         "empty.gpg: the file is empty"},
        {[&](FlashOptions& o) {
             o.board = (boards / "ls104x").string();
             write_file(tmp / "empty.pbl", "");
             o.firmware["rcw"] = (tmp / "empty.pbl").string();
         },
         "empty.pbl is empty"},
    };
    for (const auto& c : cases) {
        CAPTURE(c.expected);
        FlashOptions options = image_options(tmp / "x.img");
        c.set(options);
        std::string message = error_of([&] { plan_flash(options, nullptr); });
        CHECK_MESSAGE(message.find(c.expected) != std::string::npos, message);
        CHECK_FALSE(fs::exists(tmp / "x.img"));
    }
    CHECK_FALSE(fs::exists("/srv/escape"));
}

TEST_CASE("os-release values and config lines hold one line")
{
    CHECK_THROWS_WITH_AS(validate::single_line("1.0\nID=evil", "--os-release VERSION_ID"),
                         "--os-release VERSION_ID '1.0?ID=evil': a newline or control character would start another line", Error);
    CHECK_NOTHROW(validate::single_line("TCU 1.0 \"stable\"", "x"));
    CHECK_NOTHROW(validate::ref("tcu/ls104x/stable", "--ref"));
    CHECK_NOTHROW(validate::os_name("tcu", "--os"));
    CHECK_NOTHROW(validate::kernel_arg("console=ttyS0,115200", "--karg"));
    CHECK_NOTHROW(validate::url("http://10.0.0.2:8000/repo", "--remote-url"));
}

TEST_CASE("a board file cannot name host files or hold contradictions")
{
    Scratch tmp;
    struct Case {
        std::string name;
        std::function<std::string(std::string)> edit;
        std::string expected;
    };
    auto replace = [](const std::string& from, const std::string& to) {
        return [from, to](std::string conf) { return std::regex_replace(conf, std::regex(from), to); };
    };
    std::vector<Case> cases{
        {"shadow", replace("boot_script = .*", "boot_script = ../../../../../../etc/shadow"), "boot_script '../../../../../../etc/shadow'"},
        {"abs-table", replace("partition_table = .*", "partition_table = /etc/passwd"), "partition_table '/etc/passwd': name a file inside the board folder"},
        {"dup", [](std::string c) { return c + "boot_partition = 2\n"; }, "boot_partition is already set on line"},
        {"same", replace("boot_partition = 1", "boot_partition = 3"), "boot_partition and rootfs_partition are both 3"},
        {"negative-fw", [](std::string c) { return c + "firmware.rcw = -4096 0x1000\n"; }, "'-4096' is not a number"},
        {"karg", replace("kernel_args = .*", "kernel_args = console=ttyAMA0 x\"y"), "a kernel argument may not hold \""},
        {"uboot", replace("uboot.devtype = .*", "uboot.devtype = virtio; reset"), "uboot.devtype 'virtio; reset': a U-Boot script word"},
        {"default", [](std::string c) { return c + "uboot.default.foo = 1;reset\n"; }, "uboot.default.foo '1;reset'"},
        {"mkfs", replace("mkfs.ext4 = .*", "mkfs.ext4 = -d /etc"), "mkfs.ext4 option '-d' is not allowed"},
        {"mkfs-offset", replace("mkfs.ext4 = .*", "mkfs.ext4 = -E lazy_itable_init=1,offset=0"), "offset= is set by treeflash"},
        {"wait", replace("initramfs.root_wait = .*", "initramfs.root_wait = 0"), "initramfs.root_wait 0: 1 to 3600 seconds"},
    };
    for (const auto& c : cases) {
        CAPTURE(c.name);
        fs::path dir = edited_board(tmp, "qemu-arm64", c.name, c.edit);
        std::string message = error_of([&] { load_board(dir.string()); });
        CHECK_MESSAGE(message.find(c.expected) != std::string::npos, message);
    }

    // A symlink inside the board folder that leads out of it.
    fs::path linked = edited_board(tmp, "qemu-arm64", "link", replace("partition_table = .*", "partition_table = table"));
    fs::create_symlink("/etc/passwd", linked / "table");
    std::string message = error_of([&] { load_board(linked.string()); });
    CHECK_MESSAGE(message.find("partition_table 'table': leads outside the board folder") != std::string::npos, message);
}

TEST_CASE("partition scripts with negative or out-of-range numbers are refused")
{
    Scratch tmp;
    write_file(tmp / "neg.sfdisk", "label: dos\nunit: sectors\n\nstart=131072, size=-65536, type=83\n");
    std::string message = error_of([&] { read_partition_script(tmp / "neg.sfdisk"); });
    CHECK_MESSAGE(message.find("neg.sfdisk:4: start= and size= take plain sector counts") != std::string::npos, message);
    write_file(tmp / "big.sfdisk", "label: dos\nunit: sectors\n\nstart=131072, size=4294967296, type=83\n");
    message = error_of([&] { read_partition_script(tmp / "big.sfdisk"); });
    CHECK_MESSAGE(message.find("an MBR partition must end within 2 TiB") != std::string::npos, message);
}

TEST_CASE("flash command line: sizes, and --force and --overwrite for what they each mean")
{
    for (const char* size : {"-5", "0", "18446744073709551615", "99999999999999999999", "inf", "nan", "1.5G", "2X", "G"}) {
        CAPTURE(size);
        auto r = run_treeflash({"flash", "--board", "qemu-arm64", "--image", "/nonexistent/x.img", "--repo", "r",
                                "--no-gpg-verify", "--size", size});
        CHECK(r.exit_code == 2);
        CHECK_MESSAGE(r.err.find("--size '") != std::string::npos, r.err);
    }
    auto force = run_treeflash({"flash", "--board", "qemu-arm64", "--image", "x.img", "--repo", "r", "--force"});
    CHECK(force.exit_code == 2);
    CHECK(force.err.find("--force is for --device; --overwrite replaces an existing --image") != std::string::npos);
    auto overwrite = run_treeflash({"flash", "--board", "qemu-arm64", "--device", "/dev/null", "--repo", "r", "--overwrite"});
    CHECK(overwrite.exit_code == 2);
    CHECK(overwrite.err.find("--overwrite is for --image") != std::string::npos);
    auto method = run_treeflash({"flash", "--board", "qemu-arm64", "--image", "x.img", "--repo", "r", "--image-method", "bogus"});
    CHECK(method.exit_code == 2);
    CHECK(method.err.find("--image-method 'bogus': auto, loop or unprivileged") != std::string::npos);
}

TEST_CASE("an image larger than an MBR addresses or than the free space is refused")
{
    Scratch tmp;
    FlashOptions options = image_options(tmp / "big.img");
    options.repo = (tmp / "repo").string();
    make_rootfs(tmp / "rootfs");
    FakeKernel kernel = make_kernel_files(tmp.path());
    auto built = run_treeflash({"build", "--rootfs", (tmp / "rootfs").string(), "--repo", options.repo, "--kernel",
                                kernel.kernel.string()});
    REQUIRE_MESSAGE(built.ok(), built.err);
    options.size = 8000ull << 30;
    std::string message = error_of([&] { plan_flash(options, nullptr); });
    CHECK_MESSAGE(message.find("an MBR (dos) table addresses 2 TiB at most") != std::string::npos, message);
    struct statvfs vfs {};
    REQUIRE(::statvfs(tmp.path().c_str(), &vfs) == 0);
    uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    if (free_bytes < (1ull << 40)) {
        options.size = (free_bytes + (1ull << 30)) / (1 << 20) * (1 << 20);
        message = error_of([&] { plan_flash(options, nullptr); });
        CHECK_MESSAGE(message.find("MiB free in") != std::string::npos, message);
    }
    CHECK_FALSE(fs::exists(tmp / "big.img"));
}

TEST_CASE("a server that accepts and never answers: the pull gives up, and a cancel stops it at once")
{
    // A listener on 127.0.0.1 that takes connections and says nothing.
    int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(listener >= 0);
    UniqueFd owned(listener);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(listener, 16) == 0);
    socklen_t len = sizeof addr;
    REQUIRE(::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    std::string url = "http://127.0.0.1:" + std::to_string(ntohs(addr.sin_port)) + "/";

    Scratch tmp;
    FlashOptions options = image_options(tmp / "x.img");
    options.repo = url;
    options.network_timeout = 2;
    auto start = std::chrono::steady_clock::now();
    std::string message = error_of([&] { plan_flash(options, nullptr); });
    CHECK_MESSAGE(message.find("nothing arrived for 2 s") != std::string::npos, message);
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(15));

    options.network_timeout = 600;
    glib::Object<GCancellable> cancellable(g_cancellable_new());
    std::thread canceller([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
        g_cancellable_cancel(cancellable.get());
    });
    start = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(plan_flash(options, cancellable.get()), Cancelled);
    CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
    canceller.join();
    CHECK_FALSE(fs::exists(tmp / "x.img"));
}

TEST_CASE("--overwrite: the old image stays whole until the new one is in place, then is handed back to be freed")
{
    Scratch tmp;
    fs::path image = tmp / "card.img";
    write_file(image, "the old image");
    struct stat old {};
    REQUIRE(::stat(image.c_str(), &old) == 0);
    {
        auto target = Target::create_image(image, 1 << 20, true, nullptr, false);
        REQUIRE(::pwrite(target->fd(), "new", 3, 0) == 3);
        CHECK(read_text(image) == "the old image");
        CHECK_FALSE(target->take_replaced_image()); // nothing replaced yet
        target->commit();
        UniqueFd replaced = target->take_replaced_image();
        REQUIRE(replaced);
        struct stat st {};
        REQUIRE(::fstat(replaced.get(), &st) == 0);
        CHECK(st.st_ino == old.st_ino);
        CHECK(st.st_nlink == 0); // no name left: its blocks go when it closes
        char content[32] = {};
        CHECK(::pread(replaced.get(), content, sizeof content, 0) == 13);
        CHECK(std::string(content) == "the old image");
        CHECK_FALSE(target->take_replaced_image()); // handed over once
    }
    CHECK(read_text(image).substr(0, 3) == "new");
    CHECK(fs::file_size(image) == 1 << 20);

    // Without --overwrite nothing is replaced, and nothing handed back.
    auto fresh = Target::create_image(tmp / "other.img", 1 << 20, false, nullptr, false);
    fresh->commit();
    CHECK_FALSE(fresh->take_replaced_image());
}

TEST_CASE("an HTTP pull keeps its downloads where it is told, whatever TMPDIR says")
{
    Scratch tmp;
    std::string commit = build_commit(tmp.path(), tmp / "served");
    RepoServer server(tmp / "served");
    REQUIRE(ostree(tmp / "repo", {"init", "--mode=bare-user"}).ok());
    REQUIRE(ostree(tmp / "repo", {"remote", "add", "--no-gpg-verify", "origin", server.url()}).ok());
    GError* error = nullptr;
    glib::Object<OstreeRepo> repo(ostree_repo_open_at(AT_FDCWD, (tmp / "repo").c_str(), nullptr, &error));
    REQUIRE_MESSAGE(repo, (error ? error->message : ""));

    // libostree keeps each object it downloads in an unnamed file in TMPDIR
    // until it is written: a TMPDIR that cannot hold one fails the pull...
    struct RestoreTmpdir {
        std::optional<std::string> saved = std::getenv("TMPDIR") ? std::optional<std::string>(std::getenv("TMPDIR")) : std::nullopt;
        ~RestoreTmpdir() { saved ? ::setenv("TMPDIR", saved->c_str(), 1) : ::unsetenv("TMPDIR"); }
    } restore;
    ::setenv("TMPDIR", (tmp / "no-such-dir").c_str(), 1);
    std::string message = error_of([&] { pull_ref(repo.get(), "origin", "master", "", 30, nullptr); });
    CHECK_MESSAGE(message.find("O_TMPFILE") != std::string::npos, message);
    // ...unless the pull is given a directory of its own for them.
    fs::create_directories(tmp / "downloads");
    CHECK_NOTHROW(pull_ref(repo.get(), "origin", "master", "", 30, nullptr, false, tmp / "downloads"));
    CHECK(rev_parse(tmp / "repo", "origin:master") == commit);
}

}

TEST_SUITE("safety") {

TEST_CASE("inspect of a truncated image reads what is there and names what is missing")
{
    Scratch tmp;
    fs::path rootfs = tmp / "rootfs";
    fs::create_directories(rootfs / "ostree/repo");
    write_file(rootfs / "ostree/repo/config", "[core]\nrepo_version=1\nmode=bare\n");
    fs::create_directories(tmp / "empty");
    fs::path image = three_partition_card(tmp, {{{"boot", tmp / "empty"}, {"rootfs", rootfs}, {"data", tmp / "empty"}}});

    // Cut inside p3: p1 and p2 are whole, p3 is named.
    fs::resize_file(image, 40 << 20);
    auto cut = run_treeflash({"inspect", image.string(), "--json"});
    REQUIRE_MESSAGE(cut.ok(), cut.err);
    auto report = nlohmann::json::parse(cut.out);
    CHECK(report["sysroot_partition"] == 2);
    REQUIRE(report["warnings"].size() == 1);
    CHECK_MESSAGE(report["warnings"][0].get<std::string>().find("p3: ends 9437184 bytes past the end of") == 0,
                  report["warnings"][0]);
    CHECK(report["warnings"][0].get<std::string>().find("a truncated image") != std::string::npos);
    CHECK(report["partitions"][2]["fstype"] == "ext4"); // its superblock is there

    // Cut inside p2: p3 starts past the end; no crash, no "cannot probe".
    fs::resize_file(image, 30 << 20);
    auto text = run_treeflash({"inspect", image.string()});
    CHECK_MESSAGE(text.ok(), text.err);
    CHECK_MESSAGE(text.out.find("warning: p2: ends 3145728 bytes past the end of") != std::string::npos, (text.out + text.err));
    CHECK_MESSAGE(text.out.find("warning: p3: starts past the end of") != std::string::npos, (text.out + text.err));
    CHECK(text.err.find("cannot probe") == std::string::npos);
}

// A card made to hurt its reader: a decoy ostree/repo on the data partition,
// a boot loader entry whose options line is a MiB-long word (a recursive
// regex would overflow the stack), a serial past any int, escape sequences
// and bytes that are not UTF-8 in uEnv.txt, and an ext4 libext2fs refuses.
// inspect reports what it can, picks the partition labelled rootfs, and
// prints nothing that drives a terminal.
TEST_CASE("inspect reads a hostile card without crashing, choosing rootfs, and escapes what it prints")
{
    Scratch tmp;
    const std::string commit(64, 'c'), bootcsum(64, 'b');
    auto card_tree = [&](const std::string& name) {
        fs::path dir = tmp / name;
        fs::create_directories(dir / "ostree/repo");
        return dir;
    };
    card_tree("data");
    fs::path rootfs = card_tree("rootfs");
    fs::create_directories(rootfs / "boot/loader.0/entries");
    fs::create_symlink("loader.0", rootfs / "boot/loader");
    fs::create_directories(rootfs / "ostree/boot.0.0/tcu" / bootcsum);
    fs::create_symlink("boot.0.0", rootfs / "ostree/boot.0");
    fs::create_symlink("../../../deploy/tcu/deploy/" + commit + ".0", rootfs / "ostree/boot.0.0/tcu" / bootcsum / "0");
    fs::create_directories(rootfs / "ostree/deploy/tcu/deploy" / (commit + ".0"));
    write_file(rootfs / "boot/loader.0/entries/ostree-1-tcu.conf",
               "version 1\noptions ostree=/ostree/boot.0/tcu/" + bootcsum + "/0 " + std::string(600000, 'a') + "\n");
    write_file(rootfs / "boot/loader.0/entries/ostree-2-tcu.conf",
               "version 2\noptions ostree=/ostree/boot.0/tcu/" + bootcsum + "/99999999999\n");
    write_file(rootfs / "boot/loader.0/entries/ostree-3-tcu.conf",
               "version 3\noptions ostree=/ostree/boot.0/" + std::string(600000, 'x') + "\n");
    write_file(rootfs / "boot/loader.0/uEnv.txt", "bootargs=console=\x1b[31mRED\xff\xfe\n");
    write_file(rootfs / "ostree/repo/config", "[remote \"origin\"]\nurl=http://\x1b]0;title\x07/\n");

    fs::create_directories(tmp / "empty");
    fs::path image = three_partition_card(tmp, {{{"data", tmp / "data"}, {"rootfs", rootfs}, {"broken", tmp / "empty"}}});
    // A feature no libext2fs knows: blkid still says ext4, libext2fs refuses.
    auto feature = run_process({"debugfs", "-w", "-R", "ssv feature_incompat 0x10000242",
                                image.string() + "?offset=" + std::to_string(33 << 20)});
    REQUIRE_MESSAGE(feature.ok(), feature.err);

    auto json_run = run_treeflash({"inspect", image.string(), "--json"});
    REQUIRE_MESSAGE(json_run.ok(), json_run.err);
    auto report = nlohmann::json::parse(json_run.out);
    CHECK(report["sysroot_partition"] == 2);
    REQUIRE(report["partitions"].size() == 3);
    CHECK(report["partitions"][2]["fstype"] == "ext4");
    REQUIRE(report["warnings"].size() == 1);
    CHECK(report["warnings"][0].get<std::string>().rfind("p3: ", 0) == 0);
    // Only the first entry is a deployment: the others name no serial that
    // fits, or no checksum.
    REQUIRE(report["deployments"].size() == 1);
    CHECK(report["deployments"][0]["commit"] == commit);
    CHECK(report["uenv"]["bootargs"].get<std::string>().find("RED") != std::string::npos);

    auto text_run = run_treeflash({"inspect", image.string()});
    REQUIRE_MESSAGE(text_run.ok(), text_run.err);
    CHECK(text_run.out.find('\x1b') == std::string::npos);
    CHECK(text_run.out.find('\x07') == std::string::npos);
    CHECK(text_run.out.find("console=\\x1b[31mRED") != std::string::npos);
    CHECK(text_run.out.find("warning: p3: ") != std::string::npos);
    CHECK(text_run.out.find("sysroot on p2") != std::string::npos);
}

} // TEST_SUITE
