#include "flasher/flash.hpp"

#include "common/error.hpp"
#include "flasher/bootscript.hpp"
#include "flasher/firmware.hpp"
#include "flasher/format.hpp"
#include "flasher/mount.hpp"
#include "flasher/source.hpp"

#include <gio/gio.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

constexpr uint64_t MiB = 1 << 20;

std::string hex(uint64_t value)
{
    char text[32];
    std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(value));
    return text;
}

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
    case Progress::Partitioned: return "the device is partitioned but not formatted; it will not boot";
    case Progress::Formatted: return "the device is partitioned and formatted but holds no deployment; it will not boot";
    case Progress::Deployed: return "the device holds a deployment but no boot script; it will not boot";
    }
    return "";
}

std::string bootargs_command(const std::string& args)
{
    return "setenv bootargs \"" + args + "\"";
}

} // namespace

uint64_t default_image_size(const PartitionLayout& layout, uint64_t content_bytes)
{
    // Room for the commit twice (an upgrade keeps both until the old one is
    // pruned), the kernel copies in /boot, and ext4's own overhead.
    uint64_t rootfs = std::max<uint64_t>(256 * MiB, content_bytes * 2 + 128 * MiB);
    uint64_t total = layout.minimum_disk_bytes(rootfs);
    return (total + MiB - 1) / MiB * MiB;
}

FlashResult flash(const FlashOptions& options, GCancellable* cancellable)
{
    if (::geteuid() != 0)
        throw Error("flash needs root: it partitions block devices, attaches loop devices and mounts file systems");
    if (options.device.has_value() == options.image.has_value())
        throw Error("name exactly one target: --device or --image");
    auto notice = [&](const std::string& text) {
        if (options.notice)
            options.notice(text);
    };

    FlashResult result;
    BoardProfile board = in_step("board", [&] { return load_board(options.board); });
    result.board = board.name;
    PartitionLayout layout = in_step("board", [&] { return read_partition_script(board.partition_table); });
    for (const auto& role : board.partitions) {
        bool found = false;
        for (const auto& spec : layout.partitions)
            found |= spec.number == role.number;
        if (!found)
            throw Error("board: " + board.partition_table.string() + " has no partition " + std::to_string(role.number));
    }
    std::string boot_script = in_step("boot script", [&] { return render_boot_script(board); });
    auto firmware = in_step("firmware", [&] { return plan_firmware(board, options.firmware, layout.first_partition_offset()); });
    Source source = in_step("source", [&] { return resolve_source(options.repo, options.ref, cancellable); });
    result.remote_url = options.remote_url.empty() ? source.url : options.remote_url;
    result.gpg_verify = options.gpg_import.has_value();
    if (!result.gpg_verify)
        result.warnings.push_back("no --gpg-import key: the card's " + std::string("origin remote has gpg-verify=false"));
    if (result.remote_url.rfind("file://", 0) == 0)
        result.warnings.push_back("the card's origin remote points at " + result.remote_url
                                  + "; pass --remote-url for upgrades over HTTP");

    // Target: everything above only read; from here on the target is written.
    std::unique_ptr<Target> target;
    if (options.image) {
        uint64_t size = options.size.value_or(0);
        if (!size) {
            if (!source.content_bytes)
                throw Error("image: the commit does not record its size; pass --size");
            size = default_image_size(layout, source.content_bytes);
        }
        uint64_t minimum = layout.minimum_disk_bytes(64 * MiB);
        if (size < minimum)
            throw Error("image: --size " + std::to_string(size / MiB) + " MiB is smaller than the layout needs ("
                        + std::to_string(minimum / MiB) + " MiB)");
        target = in_step("image " + options.image->string(), [&] { return Target::create_image(*options.image, size, options.force); });
        result.target = options.image->string();
    } else {
        DiskInfo disk = in_step("device " + *options.device, [&] { return describe_disk(*options.device); });
        uint64_t minimum = layout.minimum_disk_bytes(std::max<uint64_t>(64 * MiB, source.content_bytes * 2));
        in_step("device " + *options.device, [&] { check_safe_to_write(disk, minimum, options.force); });
        if (options.confirm && !options.confirm(disk, layout))
            throw Cancelled("not confirmed; nothing was written");
        target = in_step("device " + *options.device, [&] { return Target::open_device(*options.device); });
        result.target = *options.device;
    }
    check_cancelled(cancellable);

    Progress progress = Progress::Untouched;
    try {
        notice("partitioning " + target->device() + " (" + layout.label + ")");
        in_step("partition", [&] { write_partition_table(target->fd(), target->device(), board.partition_table); });
        progress = Progress::Partitioned;
        in_step("firmware", [&] { write_firmware(target->fd(), firmware); });
        for (const auto& blob : firmware)
            result.firmware.push_back(blob.slot.name + " at " + hex(blob.slot.offset) + " (" + std::to_string(blob.size) + " bytes)");

        for (const auto& role : board.partitions) {
            check_cancelled(cancellable);
            std::string node = partition_node(target->device(), role.number);
            notice("formatting " + node + " as ext4 '" + role.label + "'");
            in_step("format " + node, [&] {
                make_ext4(node, role.label, board.mkfs_ext4_options, target->is_image());
                verify_filesystem(node, role.fstype, role.label);
            });
        }
        progress = Progress::Formatted;

        std::filesystem::path mount_parent = std::filesystem::temp_directory_path();
        {
            Mount rootfs(partition_node(target->device(), board.rootfs_partition), "ext4", "", mount_parent);
            SysrootOptions sysroot;
            sysroot.os = options.os;
            sysroot.remote_url = result.remote_url;
            sysroot.pull_url = source.url;
            sysroot.ref = options.ref;
            sysroot.gpg_key = options.gpg_import;
            sysroot.kernel_args = board.kernel_args;
            sysroot.kernel_args.insert(sysroot.kernel_args.end(), options.kernel_args.begin(), options.kernel_args.end());
            result.deployment = in_step("sysroot", [&] { return provision_sysroot(rootfs.path(), sysroot, notice, cancellable); });
            in_step("sysroot", [&] { rootfs.unmount(); });
        }
        progress = Progress::Deployed;
        check_cancelled(cancellable);
        {
            Mount boot(partition_node(target->device(), board.boot_partition), "ext4", "", mount_parent);
            in_step("boot script", [&] {
                write_boot_script(board, boot_script, boot.path());
                boot.unmount();
            });
        }
        in_step("sync", [&] { target->commit(); });
    } catch (const Cancelled&) {
        throw Cancelled("interrupted; " + state_after(progress, options.image.has_value()));
    } catch (const Error& e) {
        if (cancellable && g_cancellable_is_cancelled(cancellable))
            throw Cancelled("interrupted; " + state_after(progress, options.image.has_value()));
        throw Error(std::string(e.what()) + " (" + state_after(progress, options.image.has_value()) + ")");
    }

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
        if (entry.number == board.rootfs_partition)
            part.role = "rootfs";
        else if (entry.number == board.boot_partition)
            part.role = "boot";
        result.partitions.push_back(part);
    }
    result.bootargs_line = bootargs_command(result.deployment.kernel_args);
    return result;
}

} // namespace treeflash::flasher
