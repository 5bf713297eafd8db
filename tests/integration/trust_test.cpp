// A hostile user against write, bmap, upgrade and flash, as root: cards
// that are in use through a loop device layered on them, a card whose
// deployment's etc points at the host, logs that are symlinks, disks,
// FIFOs, the image or a target, a repository owned by another user, an
// MBR with logical partitions, an interrupted --grow and full folders.
#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/glib.hpp"
#include "flasher/deploy/sysroot.hpp"
#include "flasher/write/write.hpp"
#include "tests/support/system.hpp"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <gio/gio.h>
#include <nlohmann/json.hpp>
#include <ostree.h>
#include <optional>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using nlohmann::json;

namespace {

const bool not_root = !is_root();
constexpr uint64_t MiB = 1 << 20;
constexpr uid_t nobody = 65534;

// A 64 MiB raw image: a dos table, p1 an ext4 with a file; its bmap beside it.
fs::path raw_image(const fs::path& dir, const std::string& table = "label: dos\\nstart=2048, type=83\\n")
{
    fs::path image = dir / "card.img";
    write_file(image, "");
    fs::resize_file(image, 64 * MiB);
    auto r = run_process({"sh", "-c", "printf '" + table + "' | sfdisk -q \"$0\"", image.string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    return image;
}

fs::path card_file(const fs::path& path, uint64_t size = 128 * MiB)
{
    write_file(path, "");
    fs::resize_file(path, size);
    return path;
}

ProcessResult write(const std::vector<std::string>& args)
{
    std::vector<std::string> all{"timeout", "-s", "KILL", "120", TREEFLASH_BINARY, "write", "--yes", "--force"};
    all.insert(all.end(), args.begin(), args.end());
    return run_process(all);
}

// A loop device over a block device, from `offset` (a partition, say), removed by the destructor.
struct OffsetLoop {
    std::string device;
    OffsetLoop(const std::string& over, uint64_t offset)
    {
        auto r = run_process({"losetup", "-o", std::to_string(offset), "-f", "--show", over});
        REQUIRE_MESSAGE(r.ok(), r.err);
        device = r.out.substr(0, r.out.find('\n'));
    }
    ~OffsetLoop() { run_process({"losetup", "-d", device}); }
};

struct MountGuard {
    Scratch dir;
    bool mounted = false;
    MountGuard(const std::string& device, const std::string& options)
    {
        auto r = run_process({"mount", "-o", options, device, dir.path().string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
        mounted = true;
    }
    ~MountGuard()
    {
        if (mounted)
            run_process({"umount", dir.path().string()});
    }
};

// The deployment folder (ostree/deploy/OS/deploy/CSUM.N) below a mounted rootfs.
fs::path deployment_dir(const fs::path& root)
{
    for (const auto& os : fs::directory_iterator(root / "ostree/deploy"))
        for (const auto& d : fs::directory_iterator(os.path() / "deploy"))
            if (d.is_directory())
                return d.path();
    FAIL("no deployment");
    return {};
}

} // namespace

TEST_SUITE("trust") {

TEST_CASE("upgrade refuses a card whose deployment's etc leads off the card" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    REQUIRE(flash_image(tmp / "repo", image).ok());
    write_file(tmp / "rootfs/usr/bin/v2", "two\n");
    build_commit(tmp.path(), tmp / "repo");
    write_file(tmp / "host/etc/host-secret", "from the host\n");
    auto [offset, size] = rootfs_extent(image);
    // From ostree/deploy/OS/deploy/CSUM.0, eight levels up is past the card's root.
    std::string relative = "../../../../../../../.." + (tmp / "host/etc").string();
    for (const std::string& target : {(tmp / "host/etc").string(), relative}) {
        CAPTURE(target);
        {
            MountedPartition rootfs(image, offset, size, true);
            fs::path deployment = deployment_dir(rootfs.dir.path());
            REQUIRE(run_process({"chattr", "-i", deployment.string()}).ok()); // libostree makes it immutable
            fs::rename(deployment / "etc", deployment / "etc.orig");
            fs::create_symlink(target, deployment / "etc");
        }
        auto r = run_treeflash({"upgrade", image.string(), "--repo", (tmp / "repo").string()});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("/etc is a symlink") != std::string::npos, r.err);
        MountedPartition rootfs(image, offset, size, true);
        auto found = run_process({"grep", "-rl", "from the host", (rootfs.dir / "ostree").string()});
        CHECK_MESSAGE(found.out.empty(), found.out);
        fs::path deployment = deployment_dir(rootfs.dir.path());
        fs::remove(deployment / "etc");
        fs::rename(deployment / "etc.orig", deployment / "etc");
    }
    // Put back, the card upgrades.
    auto r = run_treeflash({"upgrade", image.string(), "--repo", (tmp / "repo").string()});
    CHECK_MESSAGE(r.ok(), r.err);
}

TEST_CASE("upgrade refuses a sysroot whose symlinks leave the card in two hops" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    REQUIRE(flash_image(tmp / "repo", image).ok());
    fs::create_directories(tmp / "host/deploy");
    auto [offset, size] = rootfs_extent(image);
    {
        // deploy -> var/x (relative, on the card), var/x -> a host folder.
        MountedPartition rootfs(image, offset, size, true);
        fs::path os = rootfs / "ostree/deploy/tcu";
        fs::rename(os / "deploy", os / "deploy.real");
        fs::create_symlink(tmp / "host/deploy", os / "var/x");
        fs::create_symlink("var/x", os / "deploy");
    }
    auto r = run_treeflash({"upgrade", image.string(), "--repo", (tmp / "repo").string()});
    CHECK(r.exit_code == 1);
    CHECK_MESSAGE(r.err.find("leads outside its file system") != std::string::npos, r.err);
    CHECK(fs::is_empty(tmp / "host/deploy"));
    {
        // A loop of links is named as such.
        MountedPartition rootfs(image, offset, size, true);
        fs::path os = rootfs / "ostree/deploy/tcu";
        fs::remove(os / "deploy");
        fs::remove(os / "var/x");
        fs::create_symlink("y", os / "var/x");
        fs::create_symlink("x", os / "var/y");
        fs::create_symlink("var/x", os / "deploy");
    }
    r = run_treeflash({"upgrade", image.string(), "--repo", (tmp / "repo").string()});
    CHECK(r.exit_code == 1);
    CHECK_MESSAGE(r.err.find("is a loop of symlinks") != std::string::npos, r.err);
}

TEST_CASE("a root flash from another user's repository checks every object it copies" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    // One file object replaced by another: `ostree fsck` calls it corrupted.
    std::vector<fs::path> objects;
    for (const auto& entry : fs::recursive_directory_iterator(tmp / "repo/objects"))
        if (entry.path().extension() == ".filez")
            objects.push_back(entry.path());
    REQUIRE(objects.size() >= 2);
    fs::copy_file(objects[0], objects[1], fs::copy_options::overwrite_existing);
    // The user owns one folder of objects (where they could have swapped the
    // file), then the whole repository.
    std::string user = std::to_string(nobody) + ":" + std::to_string(nobody);
    for (const fs::path& owned : {objects[1].parent_path(), tmp / "repo"}) {
        CAPTURE(owned);
        REQUIRE(run_process({"chown", "-R", user, owned.string()}).ok());
        auto r = flash_image(tmp / "repo", tmp / "card.img");
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("orrupted") != std::string::npos, r.err);
        CHECK(!fs::exists(tmp / "card.img"));
    }
}

TEST_CASE("a card in use through a loop device layered on it is neither written nor upgraded" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    REQUIRE(flash_image(tmp / "repo", image, {"--size", "256M"}).ok());
    auto [offset, size] = rootfs_extent(image);
    LoopGuard card(image);
    std::string before = sha256sum_files({image});
    {
        OffsetLoop layered(card.device, offset);
        MountGuard mounted(layered.device, "ro,noload");
        auto r = write({image.string(), card.device});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("through " + layered.device) != std::string::npos, r.err);
        r = run_treeflash({"upgrade", card.device, "--repo", (tmp / "repo").string()});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("through " + layered.device) != std::string::npos, r.err);
    }
    CHECK(sha256sum_files({image}) == before);

    // A loop device set up through a device node deleted since, and one
    // that a program holds open exclusively: the kernel lists neither.
    {
        struct stat p3 {};
        REQUIRE(::stat((card.device + "p3").c_str(), &p3) == 0);
        REQUIRE(::mknod((tmp / "alias").c_str(), S_IFBLK | 0600, p3.st_rdev) == 0);
        OffsetLoop layered((tmp / "alias").string(), 0);
        fs::remove(tmp / "alias");
        MountGuard mounted(layered.device, "ro,noload");
        auto r = write({image.string(), card.device});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("through " + layered.device) != std::string::npos, r.err);
    }
    {
        // The loop device's own node deleted: found by its number all the same.
        OffsetLoop layered(card.device, offset);
        MountGuard mounted(layered.device, "ro,noload");
        struct stat node {};
        REQUIRE(::stat(layered.device.c_str(), &node) == 0);
        REQUIRE(::unlink(layered.device.c_str()) == 0);
        auto r = write({image.string(), card.device});
        ::mknod(layered.device.c_str(), S_IFBLK | 0660, node.st_rdev); // put back for the cleanup
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("through " + layered.device) != std::string::npos, r.err);
    }
    {
        OffsetLoop layered(card.device, 0);
        UniqueFd held(::open(layered.device.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC));
        REQUIRE(held);
        auto r = write({image.string(), card.device});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("open exclusively") != std::string::npos, r.err);
    }
    CHECK(sha256sum_files({image}) == before);
}

TEST_CASE("upgrade refuses an image attached and mounted through a hardlink deleted since" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    REQUIRE(flash_image(tmp / "repo", image).ok());
    fs::create_hard_link(image, tmp / "alias.img");
    LoopGuard attached(tmp / "alias.img");
    fs::remove(tmp / "alias.img");
    MountGuard mounted(attached.device + "p3", "ro,noload");
    auto r = run_treeflash({"upgrade", image.string(), "--repo", (tmp / "repo").string()});
    CHECK(r.exit_code == 1);
    CHECK_MESSAGE(r.err.find("is attached to " + attached.device) != std::string::npos, r.err);
}

TEST_CASE("--log is a regular file that is neither an input nor a target, and a line it cannot take fails the card"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = raw_image(tmp.path());
    LoopGuard card(card_file(tmp / "card"));
    LoopGuard other(card_file(tmp / "other-disk", 16 * MiB));
    write_file(tmp / "other-disk-content", std::string(MiB, 'D'));
    REQUIRE(run_process({"dd", "if=" + (tmp / "other-disk-content").string(), "of=" + other.device, "conv=fsync", "status=none"}).ok());
    std::string other_before = sha256sum_files({tmp / "other-disk"});

    // A disk (not a target), the target itself: refused before anything is written.
    for (const std::string& log : {other.device, card.device}) {
        auto r = write({image.string(), card.device, "--log", log});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("is a block device, not a regular file") != std::string::npos, r.err);
    }
    CHECK(sha256sum_files({tmp / "other-disk"}) == other_before);
    CHECK(read_bytes(tmp / "card", 510, 2) != std::string("\x55\xaa", 2));

    // The image itself, and its bmap.
    REQUIRE(run_treeflash({"bmap", image.string()}).ok());
    std::string image_before = sha256sum_files({image, tmp / "card.img.bmap"});
    for (const fs::path& log : {image, tmp / "card.img.bmap"}) {
        auto r = write({image.string(), card.device, "--log", log.string()});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("is a file this write reads") != std::string::npos, r.err);
    }
    CHECK(sha256sum_files({image, tmp / "card.img.bmap"}) == image_before);

    // SHA256SUMS beside the image, listing it or not, and a bmap not there
    // yet that write would look for: refused, and nothing is created.
    write_file(tmp / "SHA256SUMS", std::string(64, 'a') + "  other.img\n");
    fs::remove(tmp / "card.img.bmap");
    for (const fs::path& log : {tmp / "SHA256SUMS", tmp / "card.img.bmap"}) {
        auto r = write({image.string(), card.device, "--log", log.string()});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("a file this write reads") != std::string::npos, r.err);
    }
    CHECK(read_text(tmp / "SHA256SUMS") == std::string(64, 'a') + "  other.img\n");
    CHECK(!fs::exists(tmp / "card.img.bmap"));
    fs::remove(tmp / "SHA256SUMS");

    // A symlink in a folder a user owns, to a file only root may write.
    write_file(tmp / "root-only", "root's\n", 0600);
    fs::create_directories(tmp / "user");
    REQUIRE(::chown((tmp / "user").c_str(), nobody, nobody) == 0);
    fs::create_symlink(tmp / "root-only", tmp / "user/cards.jsonl");
    auto r = write({image.string(), card.device, "--log", (tmp / "user/cards.jsonl").string()});
    CHECK(r.exit_code == 1);
    CHECK_MESSAGE(r.err.find("a folder other users can write") != std::string::npos, r.err);
    CHECK(read_text(tmp / "root-only") == "root's\n");

    // A FIFO, as the log or as SHA256SUMS: refused at once, not waited on.
    REQUIRE(::mkfifo((tmp / "fifo").c_str(), 0600) == 0);
    for (const std::string& option : {"--log", "--sums"}) {
        r = write({image.string(), card.device, option, (tmp / "fifo").string()});
        CHECK(r.exit_code == 1); // 137 when it hung
        CHECK_MESSAGE(r.err.find("is a FIFO") != std::string::npos, r.err);
    }

    // A log that cannot take the line: the card is written, the exit status says it is not recorded.
    r = write({image.string(), card.device, "--log", "/proc/version"});
    CHECK(r.exit_code == 1);
    {
        SmallTmpfs full(64 * 1024);
        write_file(full.dir / "filler", "");
        run_process({"dd", "if=/dev/zero", "of=" + (full.dir / "filler").string(), "bs=4096", "status=none"});
        r = write({image.string(), card.device, "--log", (full.dir / "cards.jsonl").string()});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("could not log " + card.device) != std::string::npos, r.err);
    }
    // A good log takes the line.
    r = write({image.string(), card.device, "--log", (tmp / "cards.jsonl").string()});
    CHECK_MESSAGE(r.exit_code == 0, r.err);
    CHECK(json::parse(read_text(tmp / "cards.jsonl"))["result"] == "ok");
}

TEST_CASE("bmap -o never replaces a device node" * doctest::skip(not_root))
{
    Scratch tmp;
    fs::path image = raw_image(tmp.path());
    REQUIRE(::mknod((tmp / "loop-node").c_str(), S_IFBLK | 0600, ::makedev(7, 200)) == 0);
    auto r = run_treeflash({"bmap", image.string(), "-o", (tmp / "loop-node").string()});
    CHECK(r.exit_code == 1);
    CHECK_MESSAGE(r.err.find("is a block device") != std::string::npos, r.err);
    struct stat st {};
    REQUIRE(::lstat((tmp / "loop-node").c_str(), &st) == 0);
    CHECK(S_ISBLK(st.st_mode));
}

TEST_CASE("flash as root from another user's repository leaves no uid but root's on the card" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    REQUIRE(run_process({"chown", "-R", std::to_string(nobody) + ":" + std::to_string(nobody), (tmp / "repo").string()}).ok());
    fs::path image = tmp / "card.img";
    auto flashed = flash_image(tmp / "repo", image);
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);
    auto [offset, size] = rootfs_extent(image);
    MountedPartition rootfs(image, offset, size);
    auto foreign = run_process({"find", (rootfs.dir / "ostree/repo/objects").string(), "!", "-uid", "0"});
    CHECK_MESSAGE(foreign.out.empty(), foreign.out);
    auto metadata = run_process({"find", (rootfs.dir / "ostree/repo/objects").string(), "-name", "*.dirtree"});
    CHECK(!metadata.out.empty());
}

TEST_CASE("an MBR image with an extended and a logical partition is written and verified" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = raw_image(tmp.path(), "label: dos\\nstart=2048, size=16384, type=83\\nstart=18432, type=5\\n"
                                           "start=20480, size=16384, type=83\\n");
    REQUIRE(run_process({"mkfs.ext4", "-q", "-F", "-E", "offset=" + std::to_string(20480 * 512), image.string(), "8M"}).ok());
    LoopGuard card(card_file(tmp / "card"));
    auto r = write({image.string(), card.device, "--json"});
    CHECK_MESSAGE(r.exit_code == 0, r.err);
    if (r.exit_code == 0)
        CHECK(json::parse(r.out)[0]["verified"] == true);
    auto fsck = run_process({"e2fsck", "-fn", card.device + "p5"});
    CHECK_MESSAGE(fsck.exit_code == 0, fsck.out << fsck.err);
}

TEST_CASE("interrupted at --grow, the card is said to be written and verified, and its file system is whole"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = raw_image(tmp.path());
    REQUIRE(run_process({"mkfs.ext4", "-q", "-F", "-E", "offset=" + std::to_string(MiB), image.string(), "32M"}).ok());
    LoopGuard card(card_file(tmp / "card"));
    glib::Object<GCancellable> cancel(g_cancellable_new());
    flasher::WriteOptions options;
    options.image = image;
    options.devices = {card.device};
    options.force = true;
    options.grow = true;
    options.progress = [&](const flasher::CardProgress& p) {
        if (p.phase == flasher::CardPhase::Growing)
            g_cancellable_cancel(cancel.get());
    };
    flasher::WriteReport report = flasher::write_cards(options, cancel.get());
    REQUIRE(report.cards.size() == 1);
    CHECK(report.cards[0].verified);
    CHECK_MESSAGE(report.cards[0].error.find("written and verified") != std::string::npos, report.cards[0].error);
    auto fsck = run_process({"e2fsck", "-fn", card.device + "p1"});
    CHECK_MESSAGE(fsck.exit_code == 0, fsck.out << fsck.err);
}

TEST_CASE("a full TMPDIR or download folder is named" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Scratch tmp;
    fs::path image = raw_image(tmp.path());
    {
        std::string data(8 * MiB, '\0');
        for (size_t i = 0; i < data.size(); ++i)
            data[i] = static_cast<char>((i * 2654435761u) >> 11);
        int fd = ::open(image.c_str(), O_WRONLY | O_CLOEXEC);
        REQUIRE(::pwrite(fd, data.data(), data.size(), MiB) == static_cast<ssize_t>(data.size()));
        ::close(fd);
    }
    REQUIRE(run_process({"zstd", "-q", image.string(), "-o", (tmp / "card.img.zst").string()}).ok());
    LoopGuard card(card_file(tmp / "card"));
    {
        SmallTmpfs tiny(2 * MiB);
        auto r = run_process({"env", "TMPDIR=" + tiny.dir.path().string(), TREEFLASH_BINARY, "write", "--yes", "--force",
                              (tmp / "card.img.zst").string(), card.device});
        CHECK(r.exit_code == 1);
        CHECK_MESSAGE(r.err.find("in " + tiny.dir.path().string() + " (TMPDIR)") != std::string::npos, r.err);
    }

    // The pull's downloads: a commit with a 4 MiB file that does not compress, into a folder of 1 MiB.
    write_file(tmp / "rootfs/usr/lib/big", read_bytes("/dev/urandom", 0, 4 * MiB));
    build_commit(tmp.path(), tmp / "served");
    RepoServer server(tmp / "served");
    REQUIRE(ostree(tmp / "repo", {"init", "--mode=bare"}).ok());
    REQUIRE(ostree(tmp / "repo", {"remote", "add", "--no-gpg-verify", "origin", server.url()}).ok());
    GError* error = nullptr;
    glib::Object<OstreeRepo> repo(ostree_repo_open_at(AT_FDCWD, (tmp / "repo").c_str(), nullptr, &error));
    REQUIRE(repo);
    SmallTmpfs downloads(MiB);
    std::string message = error_of([&] { flasher::pull_ref(repo.get(), "origin", "master", "", 30, nullptr, false, downloads.dir.path()); });
    CHECK_MESSAGE(message.find("No space left") != std::string::npos, message);
    CHECK_MESSAGE(message.find("the pull's downloads in " + downloads.dir.path().string()) != std::string::npos, message);
}

}
