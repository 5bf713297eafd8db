#include "flasher/flash.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/text.hpp"
#include "common/validate.hpp"
#include "flasher/bmap.hpp"
#include "flasher/publish.hpp"
#include "flasher/boot_state.hpp"
#include "flasher/bootscript.hpp"
#include "flasher/format.hpp"
#include "flasher/mount.hpp"
#include "flasher/reproducible.hpp"
#include "flasher/userns.hpp"

#include <chrono>
#include <functional>
#include <memory>
#include <system_error>
#include <gio/gio.h>
#include <thread>
#include <sys/file.h>
#include <fcntl.h>
#include "common/fd.hpp"
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

namespace treeflash::flasher {

using text::hex;

namespace {

constexpr uint64_t MiB = 1 << 20;

void check_cancelled(GCancellable* cancellable)
{
    if (cancellable && g_cancellable_is_cancelled(cancellable))
        throw Cancelled();
}

// What is on the card when a step fails, for the error message.
enum class Progress { Untouched, Partitioned, Formatted, Deployed };

std::string state_after(Progress progress, bool image)
{
    if (image)
        return "no image was written";
    switch (progress) {
    case Progress::Untouched: return "nothing was written to the device";
    case Progress::Partitioned: return "the device's partition table was being written or is written, nothing formatted; it will not boot";
    case Progress::Formatted: return "the device is partitioned and formatted but holds no deployment; it will not boot";
    case Progress::Deployed: return "the device holds a deployment but no boot script; it will not boot";
    }
    return "";
}

// The line a board set up by hand takes: every argument was checked by
// validate::kernel_arg, so none holds a quote.
std::string bootargs_command(const std::string& args)
{
    return "setenv bootargs \"" + args + "\"";
}

void check_gpg_key(const std::filesystem::path& key)
{
    struct stat st {};
    if (::stat(key.c_str(), &st) != 0)
        throw_errno("--gpg-import " + key.string());
    if (!S_ISREG(st.st_mode))
        throw Error("--gpg-import " + key.string() + ": not a file");
    if (st.st_size == 0)
        throw Error("--gpg-import " + key.string() + ": the file is empty");
    if (::access(key.c_str(), R_OK) != 0)
        throw_errno("--gpg-import " + key.string());
}

void check_options(const FlashOptions& options)
{
    validate::os_name(options.os, "--os");
    validate::ref(options.ref, "--ref");
    for (const auto& arg : options.kernel_args)
        validate::kernel_arg(arg, "--karg");
    if (!options.remote_url.empty())
        validate::url(options.remote_url, "--remote-url");
    if (options.gpg_import && options.no_gpg_verify)
        throw Error("--gpg-import and --no-gpg-verify contradict each other");
    if (options.gpg_import)
        check_gpg_key(*options.gpg_import);
    else if (!options.no_gpg_verify)
        throw Error("no --gpg-import KEY: the card would accept unsigned updates; "
                    "pass the release key, or --no-gpg-verify to allow that knowingly");
}

// The directory an image is written in.
std::filesystem::path image_dir(const std::filesystem::path& image)
{
    return image.parent_path().empty() ? "." : image.parent_path();
}

// Bytes free for an unprivileged writer in `dir`; nothing when unknown.
std::optional<uint64_t> free_bytes(const std::filesystem::path& dir)
{
    struct statvfs vfs {};
    if (::statvfs(dir.c_str(), &vfs) != 0)
        return std::nullopt;
    return static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
}

// A full file system under an image shows up as I/O errors inside it
// ("Write error", "syncfs: Input/output error"): say what really happened.
std::string full_disk_hint(const FlashOptions& options)
{
    if (!options.image)
        return "";
    std::filesystem::path dir = image_dir(*options.image);
    auto free = free_bytes(dir);
    if (!free || *free >= MiB)
        return "";
    return "; no space left on device: the file system holding " + dir.string() + " is full";
}

} // namespace

RootfsNeeds rootfs_needs(uint64_t content_bytes, uint64_t content_entries)
{
    constexpr uint64_t block = 4096;
    RootfsNeeds needs;
    // Kernel copies in /boot, the journal and ext4's metadata: 64 MiB.
    needs.bytes = content_bytes + content_entries * block + 64 * MiB;
    needs.inodes = content_entries * 2 + 8192;
    return needs;
}

uint64_t default_image_size(const PartitionLayout& layout, uint64_t content_bytes, uint64_t content_entries)
{
    uint64_t rootfs = std::max<uint64_t>(256 * MiB, 2 * rootfs_needs(content_bytes, content_entries).bytes);
    uint64_t total = layout.minimum_disk_bytes(rootfs);
    return (total + MiB - 1) / MiB * MiB;
}

namespace {

// The bytes partition `number` gets on a disk of `disk_bytes`.
uint64_t partition_bytes(const PartitionLayout& layout, unsigned number, uint64_t disk_bytes)
{
    for (const auto& p : layout.partitions)
        if (p.number == number) {
            uint64_t start = p.start * PartitionLayout::sector_size;
            if (p.size)
                return p.size * PartitionLayout::sector_size;
            return disk_bytes > start + MiB ? disk_bytes - start - MiB : 0; // the end keeps a MiB (GPT backup, alignment)
        }
    return 0;
}

// Refuses a target whose rootfs partition cannot hold one deployment, and
// asks mkfs for enough inodes when a commit of many small files needs more
// than its default of one per 16 KiB.
void check_rootfs_room(FlashPlan& plan, uint64_t disk_bytes)
{
    RootfsNeeds needs = rootfs_needs(plan.source.content_bytes, plan.source.content_entries);
    uint64_t rootfs = partition_bytes(plan.layout, plan.board.rootfs_partition, disk_bytes);
    if (rootfs < needs.bytes)
        throw Error("the rootfs partition would get " + std::to_string(rootfs / MiB) + " MiB; the commit needs about "
                    + std::to_string(needs.bytes / MiB) + " MiB (" + std::to_string(plan.source.content_entries)
                    + " entries, " + std::to_string(plan.source.content_bytes / MiB) + " MiB of files)");
    bool board_sets_inodes = false;
    for (const auto& option : plan.board.mkfs_ext4_options)
        board_sets_inodes |= option == "-N" || option == "-i" || option == "-T";
    if (!board_sets_inodes && needs.inodes * 16384 > rootfs) {
        plan.rootfs_inodes = std::min<uint64_t>(needs.inodes * 2, rootfs / 4096); // room for an upgrade too
        if (plan.rootfs_inodes < needs.inodes)
            throw Error("the rootfs partition would get " + std::to_string(rootfs / MiB) + " MiB; the commit's "
                        + std::to_string(plan.source.content_entries) + " entries need more inodes than fit");
    }
}

} // namespace

namespace {

// loop: this process may use loop devices (root, /dev/loop-control); else
// the image is made from directories, which needs only a user namespace.
bool choose_unprivileged(const std::string& method)
{
    bool loop_possible = ::geteuid() == 0 && ::access("/dev/loop-control", R_OK | W_OK) == 0;
    if (method == "loop") {
        if (!loop_possible)
            throw Error("--image-method loop needs root and /dev/loop-control; --image-method unprivileged needs neither");
        return false;
    }
    if (method != "unprivileged" && method != "auto")
        throw Error("--image-method '" + method + "': loop, unprivileged or auto");
    if (method == "auto" && loop_possible)
        return false;
    if (!user_namespaces_available())
        throw Error("making an image without loop devices needs user namespaces, which this system refuses"
                    + std::string(loop_possible ? "; --image-method loop works here" : ""));
    return true;
}

} // namespace

FlashPlan plan_flash(const FlashOptions& options, GCancellable* cancellable)
{
    if (options.device.has_value() == options.image.has_value())
        throw Error("name exactly one target: --device or --image");
    check_options(options);
    if (!options.compress.empty()) {
        if (!options.image)
            throw Error("--compress is for --image");
        check_compression_name(options.compress);
        std::filesystem::path compressed = *options.image;
        compressed += "." + options.compress;
        std::error_code ec;
        if (std::filesystem::exists(std::filesystem::symlink_status(compressed, ec)) && !options.overwrite)
            throw Error(compressed.string() + " exists; pass --overwrite to replace it");
    }

    FlashPlan plan;
    plan.board = in_step("board", [&] { return load_board(options.board); });
    plan.layout = in_step("board", [&] { return read_partition_script(plan.board.partition_table); });
    for (const auto& role : plan.board.partitions) {
        bool found = false;
        for (const auto& spec : plan.layout.partitions)
            found |= spec.number == role.number;
        if (!found)
            throw Error("board: " + plan.board.partition_table.string() + " has no partition " + std::to_string(role.number));
    }
    plan.boot_script = in_step("boot script", [&] { return render_boot_script(plan.board); });
    plan.firmware = in_step("firmware", [&] {
        auto blobs = plan_firmware(plan.board, options.firmware, plan.layout.first_partition_offset());
        plan_generated_blobs(plan.board, blobs, plan.layout.first_partition_offset());
        return blobs;
    });
    plan.source = in_step("source", [&] { return resolve_source(options.repo, options.ref, options.network_timeout, cancellable); });
    plan.source_date_epoch = options.source_date_epoch.value_or(plan.source.timestamp);
    // mke2fs, libext2fs and mkimage all read a time of 0 as "use the clock".
    if (plan.source_date_epoch == 0)
        plan.source_date_epoch = 1;
    if (plan.source_date_epoch > latest_image_time)
        throw Error("the commit's time " + std::to_string(plan.source_date_epoch) + " is past what the image's file "
                    "systems can hold; set SOURCE_DATE_EPOCH");

    SysrootOptions& sysroot = plan.sysroot;
    sysroot.os = options.os;
    sysroot.remote_url = options.remote_url.empty() ? plan.source.url : options.remote_url;
    sysroot.pull_url = plan.source.url;
    sysroot.ref = options.ref;
    sysroot.gpg_key = options.gpg_import;
    sysroot.kernel_args = plan.board.kernel_args;
    sysroot.kernel_args.insert(sysroot.kernel_args.end(), options.kernel_args.begin(), options.kernel_args.end());
    sysroot.network_timeout = options.network_timeout;
    if (sysroot.remote_url.rfind("file://", 0) == 0)
        plan.warnings.push_back("the card's origin remote points at " + sysroot.remote_url
                                + "; pass --remote-url for upgrades over HTTP");
    if (!options.gpg_import)
        plan.warnings.push_back("--no-gpg-verify: the card's origin remote takes unsigned commits");

    if (options.image) {
        uint64_t size = options.size.value_or(0);
        if (!size) {
            if (!plan.source.content_bytes)
                throw Error("image: the commit does not record its size; pass --size");
            size = default_image_size(plan.layout, plan.source.content_bytes, plan.source.content_entries);
        }
        uint64_t minimum = plan.layout.minimum_disk_bytes(64 * MiB);
        if (size < minimum)
            throw Error("image: --size " + std::to_string(size / MiB) + " MiB is smaller than the layout needs ("
                        + std::to_string(minimum / MiB) + " MiB)");
        if (plan.layout.label == "dos" && size > (2ull << 40) + plan.layout.first_partition_offset())
            throw Error("image: --size " + std::to_string(size / MiB) + " MiB: an MBR (dos) table addresses 2 TiB at most");
        std::filesystem::path dir = image_dir(*options.image);
        if (auto free = free_bytes(dir); free && size > *free)
            throw Error("image: " + std::to_string(size / MiB) + " MiB is more than the " + std::to_string(*free / MiB)
                        + " MiB free in " + dir.string());
        plan.image_size = size;
        in_step("image", [&] { check_rootfs_room(plan, size); });
        plan.unprivileged = in_step("image", [&] { return choose_unprivileged(options.image_method); });
    } else {
        plan.disk = in_step("device " + *options.device, [&] { return describe_disk(*options.device); });
        uint64_t minimum = plan.layout.minimum_disk_bytes(
            rootfs_needs(plan.source.content_bytes, plan.source.content_entries).bytes);
        in_step("device " + *options.device, [&] {
            check_safe_to_write(*plan.disk, minimum, options.force);
            check_rootfs_room(plan, plan.disk->size);
        });
    }
    return plan;
}

namespace {

// "uboot-env at 0x500000 (8192 bytes)", a line per blob written.
void describe_firmware(const FlashPlan& plan, FlashResult& result)
{
    for (const auto& blob : plan.firmware)
        result.firmware.push_back(blob.slot.name + " at " + hex(blob.slot.offset) + " (" + std::to_string(blob.size) + " bytes)");
}

// Runs `work` on a thread of its own, joined when the returned handle goes;
// where no thread can be started (a container's limit), runs it here.
std::jthread start_beside(const std::function<void()>& work)
{
    try {
        return std::jthread(work);
    } catch (const std::system_error&) {
        work();
        return {};
    }
}

// /dev/shm when this user may write there and it has more than `bytes` and
// `entries` free; empty otherwise.
std::filesystem::path memory_with_room(uint64_t bytes, uint64_t entries)
{
    struct statvfs shm {};
    if (bytes && ::access("/dev/shm", W_OK) == 0 && ::statvfs("/dev/shm", &shm) == 0
        && static_cast<uint64_t>(shm.f_bavail) * shm.f_frsize > bytes && static_cast<uint64_t>(shm.f_favail) > entries)
        return "/dev/shm";
    return {};
}

// The writes, on an open target, in the order that leaves the clearest state.
void write_card(const FlashPlan& plan, Target& target, FlashResult& result, Progress& progress,
                const std::function<void(const std::string&)>& notice, GCancellable* cancellable)
{
    const BoardProfile& board = plan.board;
    notice("partitioning " + target.device() + " (" + plan.layout.label + ")");
    // From the first byte of the table on, the old contents are gone.
    progress = Progress::Partitioned;
    in_step("partition", [&] { write_partition_table(target.fd(), target.device(), board.partition_table); });
    in_step("firmware", [&] { write_firmware(target.fd(), plan.firmware); });
    in_step("partition", [&] { target.release_exclusive_claim(); });
    describe_firmware(plan, result);

    for (const auto& role : board.partitions) {
        check_cancelled(cancellable);
        std::string node = partition_node(target.device(), role.number);
        notice("formatting " + node + " as ext4 '" + role.label + "'");
        in_step("format " + node, [&] {
            std::vector<std::string> mkfs_options = board.mkfs_ext4_options;
            if (role.number == board.rootfs_partition && plan.rootfs_inodes) {
                mkfs_options.push_back("-N");
                mkfs_options.push_back(std::to_string(plan.rootfs_inodes));
            }
            make_ext4(node, role.label, mkfs_options, target.is_image(), cancellable);
            verify_filesystem(node, role.fstype, role.label);
        });
    }
    progress = Progress::Formatted;

    std::filesystem::path mount_parent = std::filesystem::temp_directory_path();
    {
        Mount rootfs(partition_node(target.device(), board.rootfs_partition), "ext4", "", mount_parent);
        // The pull's downloads live only until each is written to the card:
        // in memory when it has room for all of them at once.
        SysrootOptions sysroot = plan.sysroot;
        sysroot.download_dir = memory_with_room(plan.source.content_bytes, 1000);
        result.deployment = in_step("sysroot", [&] { return provision_sysroot(rootfs.path(), sysroot, notice, cancellable); });
        if (board.boot_count.enabled())
            in_step("boot counting", [&] {
                std::filesystem::path record = rootfs.path() / boot_board_record_path;
                std::filesystem::create_directories(record.parent_path());
                fs::write_file_atomic(record, boot_board_record(board));
            });
        in_step("sysroot", [&] { rootfs.unmount(); });
    }
    progress = Progress::Deployed;
    check_cancelled(cancellable);
    {
        Mount boot(partition_node(target.device(), board.boot_partition), "ext4", "", mount_parent);
        in_step("boot script", [&] {
            write_boot_script(board, plan.boot_script, boot.path(), plan.source_date_epoch);
            boot.unmount();
        });
    }
    in_step("sync", [&] { target.commit(); });
}

constexpr const char* scratch_prefix = ".treeflash-tree-";

// Trees of unprivileged flashes that were killed (no live process holds
// their lock) are removed; a Ctrl-C removes its own on the way out.
void reclaim_stale_trees(const std::filesystem::path& parent, const std::function<void(const std::string&)>& notice)
{
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(parent, ec)) {
        std::string name = entry.path().filename().string();
        if (name.rfind(scratch_prefix, 0) != 0 || !entry.is_directory(ec) || entry.is_symlink(ec))
            continue;
        UniqueFd dir(::open(entry.path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!dir || ::flock(dir.get(), LOCK_EX | LOCK_NB) != 0)
            continue; // a live flash works there
        struct stat st {};
        if (::fstat(dir.get(), &st) != 0 || st.st_uid != ::geteuid())
            continue; // someone else's
        fs::remove_tree_quietly(entry.path());
        if (std::filesystem::exists(std::filesystem::symlink_status(entry.path(), ec)))
            notice("could not remove all of " + entry.path().string() + ", left by an interrupted flash");
        else
            notice("removed " + entry.path().string() + ", left by an interrupted flash");
    }
}

// A scratch tree for this flash, locked while this process lives so that a
// later flash knows it is not stale. Another flash of the same user may
// reclaim it between its creation and the lock: then it is made again.
std::pair<fs::TempDir, UniqueFd> locked_scratch_tree(const std::filesystem::path& parent)
{
    for (int attempt = 0;; ++attempt) {
        fs::TempDir tree(parent, scratch_prefix);
        UniqueFd lock(::open(tree.path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (lock && ::flock(lock.get(), LOCK_EX | LOCK_NB) == 0 && fs::still_at(lock.get(), tree.path()))
            return {std::move(tree), std::move(lock)};
        if (attempt == 5)
            throw Error("could not lock a scratch tree in " + parent.string()
                        + ": other flashes keep removing them");
    }
}

// The same card as write_card, made without loop devices, mounts or root:
// the sysroot is laid out in a scratch directory (libostree's init-fs,
// os-init, pull and deploy work on any directory), the boot files in
// another, and mkfs.ext4 -d creates each file system straight into the
// image at its partition's offset. Both run as root of a user namespace of
// their own, so the files are root's in the image whoever runs this, and
// nothing libostree tries (freezing the file system under /boot) reaches
// the host. Returns the thread removing the trees, still at work.
std::jthread write_image_from_directories(const FlashPlan& plan, Target& target, FlashResult& result,
                                  const std::function<void(const std::string&)>& notice, GCancellable* cancellable)
{
    const BoardProfile& board = plan.board;
    // Everything that would be random or the current time derives from what
    // the image is: the commit, the board and the size, and one time.
    std::string identity = plan.source.commit + "\n" + board.name + "\n" + std::to_string(plan.image_size) + "\n";
    notice("partitioning " + target.image().string() + " (" + plan.layout.label + ", without loop devices)");
    in_step("partition", [&] {
        write_partition_table(target.fd(), target.device(), board.partition_table, derived_disk_id(identity));
    });
    in_step("firmware", [&] { write_firmware(target.fd(), plan.firmware); });
    describe_firmware(plan, result);
    PartitionTable table = in_step("partition", [&] { return read_partition_table(target.device()); });

    // The trees are written once and read once by mkfs: in memory when
    // /dev/shm has room and inodes for three times the commit (the
    // repository, the deployment's own files, and slack), else beside the
    // image. The pull's downloads go there too.
    std::filesystem::path scratch_parent = memory_with_room(3 * plan.source.content_bytes, 3 * plan.source.content_entries + 1000);
    if (scratch_parent.empty())
        scratch_parent = target.image().parent_path().empty() ? "." : target.image().parent_path();
    reclaim_stale_trees(scratch_parent, notice);
    auto [scratch, scratch_lock] = locked_scratch_tree(scratch_parent);
    std::filesystem::path rootfs = scratch.path() / "rootfs", boot = scratch.path() / "boot";
    std::filesystem::create_directories(rootfs);
    std::filesystem::create_directories(boot);
    in_step("sysroot", [&] {
        bool as_root = ::geteuid() == 0;
        SysrootOptions sysroot = plan.sysroot;
        sysroot.download_dir = scratch.path();
        // As root every owner is mapped (userns.cpp), and objects may be copied as files
        // from a local repository; a plain user's namespace cannot give
        // them their owners, so each is checked and written instead.
        sysroot.untrusted_pull = !as_root;
        run_as_namespace_root(
            [&](const NamespaceNotice& child_notice) {
                try {
                    provision_sysroot(rootfs, sysroot, child_notice, nullptr);
                } catch (const Error& e) {
                    // A plain user's namespace holds one id: files of other
                    // owners cannot be laid out. Say that, and which files
                    // when the source is at hand, rather than "fchown".
                    if (as_root || std::string(e.what()).find("fchown") == std::string::npos)
                        throw;
                    std::vector<std::string> foreign;
                    if (plan.source.url.rfind("file://", 0) == 0)
                        foreign = files_not_owned_by_root(plan.source.url.substr(7), plan.source.commit, 10);
                    std::string list;
                    for (const auto& f : foreign)
                        list += (list.empty() ? ": " : ", ") + f;
                    throw Error("the commit holds files owned by users other than root, which an image made without root "
                                "cannot carry (its user namespace maps only root's ids); flash it as root, or commit "
                                "them as root's (treeflash build --owner-uid 0 --owner-gid 0)" + list);
                }
                if (board.boot_count.enabled()) {
                    std::filesystem::create_directories(rootfs / "boot/treeflash");
                    fs::write_file_atomic(rootfs / boot_board_record_path, boot_board_record(board));
                }
            },
            notice, cancellable);
    });
    auto deployments = in_step("sysroot", [&] { return list_deployments(rootfs, cancellable); });
    if (deployments.empty())
        throw Error("sysroot: no deployment after deploying");
    result.deployment = deployments.front();
    in_step("boot script", [&] { write_boot_script(board, plan.boot_script, boot, plan.source_date_epoch); });

    for (const auto& role : board.partitions) {
        check_cancelled(cancellable);
        const PartitionEntry* entry = nullptr;
        for (const auto& e : table.partitions)
            if (e.number == role.number)
                entry = &e;
        if (!entry)
            throw Error("partition " + std::to_string(role.number) + " is missing from the table just written");
        notice("making ext4 '" + role.label + "' at " + hex(entry->start) + " in the image");
        in_step("format p" + std::to_string(role.number), [&] {
            std::vector<std::string> mkfs_options = board.mkfs_ext4_options;
            if (role.number == board.rootfs_partition && plan.rootfs_inodes) {
                mkfs_options.push_back("-N");
                mkfs_options.push_back(std::to_string(plan.rootfs_inodes));
            }
            std::filesystem::path content;
            if (role.number == board.rootfs_partition)
                content = rootfs;
            else if (role.number == board.boot_partition)
                content = boot;
            std::string seed = identity + std::to_string(role.number);
            ReproducibleExt4 same{derived_uuid(seed + "\nfilesystem"), derived_uuid(seed + "\nhash seed"), plan.source_date_epoch};
            // mkfs.ext4 fills the page cache and fsyncs at its end; started
            // from here while it works, the disk writes overlap its copying
            // rather than follow it.
            auto start_writeback = [&] {
                ::sync_file_range(target.fd(), static_cast<off_t>(entry->start), static_cast<off_t>(entry->size),
                                  SYNC_FILE_RANGE_WRITE);
            };
            run_as_namespace_root(
                [&](const NamespaceNotice&) {
                    make_ext4_in_image(target.device(), entry->start, entry->size, role.label, mkfs_options, content, same);
                },
                notice, cancellable, start_writeback);
            clamp_inode_times(target.device(), entry->start, plan.source_date_epoch);
            FilesystemInfo made = probe_filesystem(target.device(), entry->start, entry->size);
            if (made.type != role.fstype || made.label != role.label)
                throw Error("mkfs.ext4 left " + (made.type.empty() ? std::string("no file system") : made.type + " '" + made.label + "'")
                            + " where ext4 '" + role.label + "' belongs");
        });
    }
    // mkfs.ext4 has read the trees: removing them (thousands of files) runs
    // beside the rest, the bmap included; the caller joins it. The lock goes
    // once they are gone.
    std::jthread remove_trees = start_beside(
        [trees = std::make_shared<std::pair<fs::TempDir, UniqueFd>>(std::move(scratch), std::move(scratch_lock))] {
            trees->first.remove();
        });
    in_step("sync", [&] { target.commit(); });
    return remove_trees;
}

void describe_partitions(const FlashPlan& plan, FlashResult& result)
{
    PartitionTable table = read_partition_table(result.target);
    result.partition_table = table.label;
    for (const auto& entry : table.partitions) {
        FlashedPartition part;
        part.number = entry.number;
        part.start = entry.start;
        part.size = entry.size;
        FilesystemInfo fs = probe_filesystem(result.target, entry.start, entry.size);
        part.fstype = fs.type;
        part.label = fs.label;
        if (entry.number == plan.board.rootfs_partition)
            part.role = "rootfs";
        else if (entry.number == plan.board.boot_partition)
            part.role = "boot";
        result.partitions.push_back(part);
    }
}

// What a flash publishes beside `image`: IMAGE.bmap first, then the
// compressed form when `compress` names one.
std::vector<std::filesystem::path> published_beside(const std::filesystem::path& image, const std::string& compress)
{
    std::vector<std::filesystem::path> files{image.string() + ".bmap"};
    if (!compress.empty())
        files.emplace_back(image.string() + "." + compress);
    return files;
}

// Without --overwrite, what a flash publishes beside the image must not
// exist either: refused now, before anything is written, rather than once
// the image is made.
void check_outputs_are_new(const std::filesystem::path& image, const std::string& compress)
{
    for (const auto& derived : published_beside(image, compress)) {
        std::error_code ec;
        auto status = std::filesystem::symlink_status(derived, ec);
        if (ec && ec != std::errc::no_such_file_or_directory)
            throw Error("cannot tell whether " + derived.string() + " exists: " + ec.message());
        if (std::filesystem::exists(status))
            throw Error(derived.string() + " exists; pass --overwrite to replace it");
    }
}

// Flashes into one folder take turns: an image, its .bmap and its
// compressed form must all come from one flash, and SHA256SUMS belongs to
// the folder. Held (flock on the folder) until the flash returns.
UniqueFd take_turn_in_folder(const std::filesystem::path& image, const std::function<void(const std::string&)>& notice,
                             GCancellable* cancellable)
{
    std::filesystem::path dir = image.parent_path().empty() ? "." : image.parent_path();
    UniqueFd folder(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!folder)
        throw_errno("open " + dir.string());
    bool told = false;
    while (::flock(folder.get(), LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK && errno != EINTR)
            throw_errno("lock " + dir.string());
        if (!told)
            notice("waiting for another flash into " + dir.string() + " to finish");
        told = true;
        check_cancelled(cancellable);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return folder;
}

} // namespace

FlashResult flash(const FlashOptions& options, GCancellable* cancellable)
{
    if (::geteuid() != 0 && !options.image)
        throw Error("flash to a device needs root: it partitions block devices and mounts file systems");
    auto notice = [&](const std::string& text) {
        if (options.notice)
            options.notice(text);
    };
    FlashPlan plan = plan_flash(options, cancellable);

    FlashResult result;
    result.board = plan.board.name;
    result.remote_url = plan.sysroot.remote_url;
    result.gpg_verify = plan.sysroot.gpg_key.has_value();
    result.warnings = plan.warnings;

    // From here on the target is open; nothing is written before the
    // confirmation, and a device is re-identified right before the first write.
    std::unique_ptr<Target> target;
    UniqueFd folder_turn;
    if (options.image) {
        folder_turn = in_step("image " + options.image->string(),
                              [&] { return take_turn_in_folder(*options.image, notice, cancellable); });
        if (!options.overwrite)
            in_step("image " + options.image->string(), [&] { check_outputs_are_new(*options.image, options.compress); });
        std::vector<std::string> reclaimed;
        target = in_step("image " + options.image->string(), [&] {
            return Target::create_image(*options.image, plan.image_size, options.overwrite, &reclaimed, !plan.unprivileged);
        });
        result.image_method = plan.unprivileged ? "unprivileged" : "loop";
        for (const auto& note : reclaimed)
            notice(note);
        result.target = options.image->string();
    } else {
        target = in_step("device " + *options.device, [&] { return Target::open_device(*plan.disk); });
        if (options.confirm && !options.confirm(*plan.disk, plan.layout))
            throw Cancelled("not confirmed; nothing was written");
        in_step("device " + *options.device, [&] { target->verify_identity(*plan.disk); });
        result.target = *options.device;
    }
    check_cancelled(cancellable);

    Progress progress = Progress::Untouched;
    std::jthread remove_scratch_trees;
    try {
        if (plan.unprivileged)
            remove_scratch_trees = write_image_from_directories(plan, *target, result, notice, cancellable);
        else
            write_card(plan, *target, result, progress, notice, cancellable);
    } catch (const Cancelled&) {
        throw Cancelled("interrupted; " + state_after(progress, options.image.has_value()));
    } catch (const Error& e) {
        if (cancellable && g_cancellable_is_cancelled(cancellable))
            throw Cancelled("interrupted; " + state_after(progress, options.image.has_value()));
        throw Error(std::string(e.what()) + full_disk_hint(options) + " (" + state_after(progress, options.image.has_value()) + ")");
    }
    // Freeing the blocks of an image this one replaced takes a while for a
    // large one: it runs beside the bmap, the image's last read.
    std::jthread free_replaced_image =
        start_beside([replaced = std::make_shared<UniqueFd>(target->take_replaced_image())] { replaced->reset(); });
    target.reset();
    if (options.image) {
        // The image is in place: what stops now leaves it without some of
        // the files published beside it, and says so.
        std::string incomplete = options.image->string() + " is complete, but its .bmap"
                                 + (options.compress.empty() ? "" : ", ." + options.compress + " or SHA256SUMS")
                                 + " may be missing; flash again with --overwrite";
        // What an earlier image left under the names about to be written
        // describes another image: gone before anything can stop this run.
        std::vector<std::filesystem::path> published = published_beside(*options.image, options.compress);
        for (const auto& derived : published) {
            std::error_code ec;
            if (options.overwrite && std::filesystem::is_regular_file(std::filesystem::symlink_status(derived, ec)))
                std::filesystem::remove(derived, ec);
        }
        try {
            // The block map, made from the raw image (before anyone compresses it).
            const std::filesystem::path& bmap = published.front();
            in_step("bmap", [&] { write_bmap(*options.image, bmap, cancellable); });
            result.bmap = bmap.string();
            if (!options.compress.empty()) {
                auto compressed = in_step("compress", [&] {
                    return compress_image(*options.image, options.compress, options.overwrite, cancellable);
                });
                result.compressed = compressed.string();
                result.sums = in_step("SHA256SUMS", [&] { return update_sha256sums({compressed, bmap}, cancellable); }).string();
            }
        } catch (const Cancelled&) {
            throw Cancelled("interrupted; " + incomplete);
        } catch (const Error& e) {
            throw Error(std::string(e.what()) + " (" + incomplete + ")");
        }
    }
    describe_partitions(plan, result);
    result.bootargs_line = bootargs_command(result.deployment.kernel_args);
    return result;
}

} // namespace treeflash::flasher
