// flash through loop devices (an image, as root) or onto a card: the table
// and firmware by libfdisk, mkfs.ext4 on each partition, the sysroot
// deployed on the mounted rootfs while the other partitions are formatted
// and the boot script is written on the boot partition.
#include "flasher/flash/steps.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/glib.hpp"
#include "flasher/boot/boot_state.hpp"
#include "flasher/boot/bootscript.hpp"
#include "flasher/deploy/prefetch.hpp"
#include "flasher/disk/blank_ext4.hpp"
#include "flasher/disk/format.hpp"
#include "flasher/disk/mount.hpp"

#include <fcntl.h>
#include <future>
#include <gio/gio.h>
#include <mutex>
#include <thread>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// A cancellable of its own for work on another thread, cancelled with
// `parent` (Ctrl-C) or by cancel() (the work beside it failed).
class LinkedCancellable {
public:
    explicit LinkedCancellable(GCancellable* parent) : m_own(g_cancellable_new()), m_parent(parent)
    {
        if (m_parent)
            m_link = g_cancellable_connect(m_parent, G_CALLBACK(+[](GCancellable*, gpointer own) {
                                               g_cancellable_cancel(G_CANCELLABLE(own));
                                           }),
                                           m_own.get(), nullptr);
    }
    ~LinkedCancellable()
    {
        if (m_parent)
            g_cancellable_disconnect(m_parent, m_link);
    }
    LinkedCancellable(const LinkedCancellable&) = delete;
    LinkedCancellable& operator=(const LinkedCancellable&) = delete;

    GCancellable* get() const { return m_own.get(); }
    void cancel() { g_cancellable_cancel(m_own.get()); }

private:
    glib::Object<GCancellable> m_own;
    GCancellable* m_parent;
    gulong m_link = 0;
};

} // namespace

void write_card(const FlashPlan& plan, Target& target, FlashResult& result, Progress& progress,
                const std::function<void(const std::string&)>& notice, GCancellable* cancellable)
{
    const BoardProfile& board = plan.board;
    // The deploy tells its progress from a thread of its own.
    std::mutex notice_lock;
    auto say = [&](const std::string& text) {
        std::lock_guard hold(notice_lock);
        notice(text);
    };
    // The deploy, most of a flash, runs on a thread of its own (below), with
    // a cancellable of its own.
    LinkedCancellable deploy_cancellable(cancellable);
    // The commit's objects are fetched and checked from now on, while the
    // card is partitioned and formatted; written once its repository is
    // made.
    std::shared_ptr<StartedPrefetch> prefetch;
    if (!plan.sysroot.commit.empty())
        prefetch = std::make_shared<StartedPrefetch>(plan.sysroot.pull_url, plan.sysroot.commit,
                                                     plan.sysroot.network_timeout, deploy_cancellable.get());
    say("partitioning " + target.device() + " (" + plan.layout.label + ")");
    // From the first byte of the table on, the old contents are gone.
    progress = Progress::Partitioned;
    in_step("partition", [&] { write_partition_table(target.fd(), target.device(), board.partition_table, target.is_image()); });
    in_step("firmware", [&] { write_firmware(target.fd(), plan.firmware); });
    in_step("partition", [&] { target.release_exclusive_claim(); });
    describe_firmware(plan, result);

    // On a new image file, each empty file system is a copy of one kept
    // from an earlier flash of the same size (see blank_ext4.hpp).
    const auto blank_cache = target.is_image() ? blank_ext4_cache_dir() : std::nullopt;
    auto format = [&](const PartitionRole& role) {
        check_cancelled(cancellable);
        std::string node = partition_node(target.device(), role.number);
        say("formatting " + node + " as ext4 '" + role.label + "'");
        in_step("format " + node, [&] {
            std::vector<std::string> mkfs_options = board.mkfs_ext4_options;
            if (role.number == board.rootfs_partition && plan.rootfs_inodes) {
                mkfs_options.push_back("-N");
                mkfs_options.push_back(std::to_string(plan.rootfs_inodes));
            }
            if (target.is_image())
                make_blank_ext4(node, role.label, mkfs_options, blank_cache, cancellable);
            else
                make_ext4(node, role.label, mkfs_options, false, cancellable);
            verify_filesystem(node, role.fstype, role.label);
        });
    };
    // The rootfs first: its deploy, most of a flash, starts on it while the
    // other file systems are made and the boot script written.
    for (const auto& role : board.partitions)
        if (role.number == board.rootfs_partition)
            format(role);

    std::filesystem::path mount_parent = mount_point_parent();
    // The card's file systems are new: a flash cut short leaves a card that
    // does not boot whatever was flushed, and is flashed again. So they are
    // written without cache flushes between steps (libostree's deploy asks
    // for several); the unmount writes everything out and the sync at the
    // end flushes the card's cache once.
    const std::string mount_options = std::string(untrusted_mount_options) + ",barrier=0";
    Mount rootfs(partition_node(target.device(), board.rootfs_partition), "ext4", mount_options, mount_parent);
    // The pull's downloads live only until each is written to the card:
    // in memory when it has room for all of them at once.
    SysrootOptions sysroot = plan.sysroot;
    sysroot.download_dir = memory_with_room(plan.source.content_bytes, 1000);
    sysroot.started_prefetch = prefetch;
    // The objects are most of what the card holds: they go out to the card
    // (or the image's disk) while libostree deploys, rather than all in the
    // final sync. Joined before the unmount.
    std::jthread writeback;
    sysroot.objects_written = [&] {
        writeback = start_beside([&target, &rootfs] {
            UniqueFd root(::open(rootfs.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
            if (root && ::syncfs(root.get()) == 0) // a failure shows in the unmount or the final sync
                target.start_writeback();
        });
    };
    std::future<Deployment> deployed = std::async(std::launch::async, [&] {
        return in_step("sysroot", [&] { return provision_sysroot(rootfs.path(), sysroot, say, deploy_cancellable.get()); });
    });
    try {
        for (const auto& role : board.partitions)
            if (role.number != board.rootfs_partition)
                format(role);
        progress = Progress::Formatted;
        check_cancelled(cancellable);
        Mount boot(partition_node(target.device(), board.boot_partition), "ext4", mount_options, mount_parent);
        in_step("boot script", [&] {
            write_boot_script(board, plan.boot_script, boot.path(), plan.source_date_epoch);
            boot.unmount();
        });
    } catch (...) {
        deploy_cancellable.cancel(); // the future waits for it to stop
        throw;
    }
    result.deployment = deployed.get();
    if (std::string record = boot_board_record(board, renders_uboot_env(board, plan.firmware)); !record.empty())
        in_step("board record", [&] {
            std::filesystem::path path = rootfs.path() / boot_board_record_path;
            std::filesystem::create_directories(path.parent_path());
            fs::write_file_atomic(path, record);
        });
    writeback = {};
    in_step("sysroot", [&] { rootfs.unmount(); });
    progress = Progress::Deployed;
}

} // namespace treeflash::flasher
