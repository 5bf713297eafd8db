// treeflash flash: the plan, one of the two ways of writing, then what is
// published beside an image (its block map, compressed form, SHA256SUMS).
#include "flasher/flash/steps.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/text.hpp"
#include "flasher/disk/format.hpp"
#include "flasher/disk/target.hpp"
#include "flasher/write/bmap.hpp"
#include "flasher/write/publish.hpp"

#include <chrono>
#include <fcntl.h>
#include <future>
#include <gio/gio.h>
#include <memory>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <system_error>
#include <unistd.h>

namespace treeflash::flasher {

using text::hex;

void check_cancelled(GCancellable* cancellable)
{
    if (cancellable && g_cancellable_is_cancelled(cancellable))
        throw Cancelled();
}

void describe_firmware(const FlashPlan& plan, FlashResult& result)
{
    for (const auto& blob : plan.firmware)
        result.firmware.push_back(blob.slot.name + " at " + hex(blob.slot.offset) + " (" + std::to_string(blob.size) + " bytes)");
}

std::jthread start_beside(const std::function<void()>& work)
{
    try {
        return std::jthread(work);
    } catch (const std::system_error&) {
        work();
        return {};
    }
}

std::filesystem::path memory_with_room(uint64_t bytes, uint64_t entries)
{
    struct statvfs shm {};
    if (bytes && ::access("/dev/shm", W_OK) == 0 && ::statvfs("/dev/shm", &shm) == 0
        && static_cast<uint64_t>(shm.f_bavail) * shm.f_frsize > bytes && static_cast<uint64_t>(shm.f_favail) > entries)
        return "/dev/shm";
    return {};
}

namespace {

std::string state_after(Progress progress, bool image)
{
    if (image)
        return "no image was written";
    switch (progress) {
    case Progress::Untouched: return "nothing was written to the device";
    case Progress::Partitioned: return "the device's partition table was being written or is written, nothing formatted; it will not boot";
    case Progress::Formatted: return "the device is partitioned and formatted but holds no deployment; it will not boot";
    case Progress::Deployed: return "the device holds a deployment and its boot script, not all of it synced; it may not boot";
    }
    return "";
}

// The line a board set up by hand takes: every argument was checked by
// validate::kernel_arg, so none holds a quote.
std::string bootargs_command(const std::string& args)
{
    return "setenv bootargs \"" + args + "\"";
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
    UniqueFd image_file;           // an image's, read for its block map
    std::future<PendingFile> bmap; // (declared after it: waited for before it closes)
    try {
        if (plan.unprivileged)
            remove_scratch_trees = write_image_from_directories(plan, *target, result, notice, cancellable);
        else
            write_card(plan, *target, result, progress, notice, cancellable);
        // An image is complete: its block map is read (from the page cache,
        // on the CPU) and written while the sync waits for the disk; it is
        // moved into place beside the image once the image is.
        if (options.image) {
            image_file = target->image_file();
            bmap = std::async(std::launch::async, [fd = image_file.get(), size = target->size(), &options, cancellable] {
                return in_step("bmap", [&] {
                    return prepare_bmap(fd, size, published_beside(*options.image, "").front(), options.image->string(),
                                        cancellable);
                });
            });
        }
        in_step("sync", [&] { target->commit(); });
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
            const std::filesystem::path& bmap_path = published.front();
            PendingFile prepared = bmap.get();
            in_step("bmap", [&] { publish_bmap(prepared, image_file.get(), bmap_path); });
            result.bmap = bmap_path.string();
            if (!options.compress.empty()) {
                auto compressed = in_step("compress", [&] {
                    return compress_image(*options.image, options.compress, options.overwrite, cancellable);
                });
                result.compressed = compressed.string();
                result.sums = in_step("SHA256SUMS", [&] { return update_sha256sums({compressed, bmap_path}, cancellable); }).string();
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
