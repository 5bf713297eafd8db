// flash's plan: every option, the board, the firmware, the source and the
// target checked and measured before anything is written.
#include "flasher/flash/steps.hpp"

#include "common/error.hpp"
#include "common/named_file.hpp"
#include "common/validate.hpp"
#include "flasher/write/publish.hpp"
#include "flasher/boot/bootscript.hpp"
#include "flasher/unprivileged/userns.hpp"

#include <bit>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <system_error>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

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
    validate::kernel_command_line(options.kernel_args, "--karg");
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

} // namespace

std::filesystem::path image_dir(const std::filesystem::path& image)
{
    return image.parent_path().empty() ? "." : image.parent_path();
}

std::optional<uint64_t> free_bytes(const std::filesystem::path& dir)
{
    struct statvfs vfs {};
    if (::statvfs(dir.c_str(), &vfs) != 0)
        return std::nullopt;
    return static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
}

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
    if (options.image) {
        // The image and what flash leaves beside it are made by path, over a
        // while: no other user may swap a folder on the way meanwhile. And
        // they replace regular files only.
        named::check_folder_is_stable(image_dir(*options.image), "the image's folder");
        named::check_output(*options.image, "the image");
        named::check_output(options.image->string() + ".bmap", "the bmap");
        if (!options.compress.empty()) {
            named::check_output(options.image->string() + "." + options.compress, "the compressed image");
            named::check_output(options.image->parent_path() / "SHA256SUMS", "SHA256SUMS");
        }
    }
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
    // Another user's repository is read object by object, each checked.
    sysroot.untrusted_pull = !is_url(options.repo) && local_repository_untrusted(options.repo);
    sysroot.ref = options.ref;
    sysroot.commit = plan.source.commit;
    sysroot.gpg_key = options.gpg_import;
    sysroot.kernel_args = plan.board.kernel_args;
    sysroot.require_devicetree = plan.board.devicetree_required;
    sysroot.kernel_args.insert(sysroot.kernel_args.end(), options.kernel_args.begin(), options.kernel_args.end());
    validate::kernel_command_line(sysroot.kernel_args, "--karg with the board's kernel arguments");
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
            if (plan.board.image_size_power_of_two)
                size = std::bit_ceil(size);
        } else if (plan.board.image_size_power_of_two && !std::has_single_bit(size)) {
            throw Error("image: --size " + std::to_string(size / MiB) + " MiB: board " + plan.board.name
                        + " takes only images whose size is a power of two (512M, 1G, 2G, ...)");
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

} // namespace treeflash::flasher
