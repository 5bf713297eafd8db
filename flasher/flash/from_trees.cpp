// flash --image without loop devices, mounts or root: the sysroot and the
// boot files laid out in scratch trees, each file system made from its tree
// by mkfs.ext4 -d at its partition's offset, all as root of a user
// namespace of its own (unprivileged/userns.hpp).
#include "flasher/flash/steps.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/text.hpp"
#include "flasher/boot/boot_state.hpp"
#include "flasher/boot/bootscript.hpp"
#include "flasher/disk/format.hpp"
#include "flasher/unprivileged/reproducible.hpp"
#include "flasher/unprivileged/userns.hpp"

#include <fcntl.h>
#include <memory>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

using text::hex;

namespace {

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

} // namespace

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

} // namespace treeflash::flasher
