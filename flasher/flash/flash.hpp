// treeflash flash: a commit becomes a partitioned, deployed card or image.
#pragma once

#include "flasher/board.hpp"
#include "flasher/boot/firmware.hpp"
#include "flasher/disk/partition.hpp"
#include "flasher/deploy/source.hpp"
#include "flasher/deploy/sysroot.hpp"
#include "flasher/disk/target.hpp"

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

// The latest time an image's file systems are given (2038-01-19): the
// inode times reproducible.cpp writes are 32-bit seconds with the extra
// epoch bits cleared, so a later time would wrap.
constexpr uint64_t latest_image_time = 2147483647;

struct FlashOptions {
    std::string board;            // a name or a folder
    std::optional<std::string> device;
    std::optional<std::filesystem::path> image;
    std::optional<uint64_t> size; // image size in bytes; default from the commit
    std::string repo;             // path or URL
    std::string ref = "master";
    std::string os = "tcu";
    std::string remote_url;       // default: the URL pulled from
    std::optional<std::filesystem::path> gpg_import;
    std::vector<std::string> kernel_args;
    std::map<std::string, std::string> firmware; // slot -> file
    bool force = false;          // allow a non-removable --device
    bool overwrite = false;      // replace an existing --image
    // --image: "loop" (loop devices and mounts, as root), "unprivileged" (file
    // systems made from directories by mkfs.ext4 -d, no root needed), or
    // "auto": loop when this process can use loop devices.
    std::string image_method = "auto";
    // The time an unprivileged image's file systems and files carry
    // (SOURCE_DATE_EPOCH); unset: the commit's time. With the commit, the
    // board and the size it makes the image bit-reproducible.
    std::optional<uint64_t> source_date_epoch; // at most latest_image_time
    std::string compress;        // --image: also leave IMAGE.zst (xz, gz) and SHA256SUMS beside it
    bool no_gpg_verify = false;  // the card's origin takes unsigned commits (needed without gpg_import)
    unsigned network_timeout = 30; // seconds without progress before a pull fails
    // Asked before a device is erased; returning false stops without writing.
    std::function<bool(const DiskInfo&, const PartitionLayout&)> confirm;
    std::function<void(const std::string&)> notice;
};

struct FlashedPartition {
    unsigned number = 0;
    uint64_t start = 0;
    uint64_t size = 0;
    std::string label;
    std::string fstype;
    std::string role; // boot, rootfs, or empty
};

struct FlashResult {
    std::string board;
    std::string target;  // the device or image path
    std::string partition_table;
    std::vector<FlashedPartition> partitions;
    std::vector<std::string> firmware; // "rcw at 0x1000 (1234 bytes)"
    std::string remote_url;
    bool gpg_verify = false;
    Deployment deployment;
    std::string bootargs_line; // setenv bootargs "..." for boards set up by hand
    std::string bmap;          // --image: the block map written beside it (IMAGE.bmap)
    std::string compressed;    // --compress: IMAGE.zst (or .xz, .gz)
    std::string sums;          // --compress: the SHA256SUMS listing it and the bmap
    std::string image_method;  // --image: "loop" or "unprivileged"
    std::vector<std::string> warnings;
};

// Everything flash decides before it writes: read and checked, nothing
// written. write_flash consumes it.
struct FlashPlan {
    BoardProfile board;
    PartitionLayout layout;
    std::string boot_script;
    std::vector<FirmwareBlob> firmware;
    Source source;
    SysrootOptions sysroot;
    std::optional<DiskInfo> disk; // --device: the disk as checked
    uint64_t image_size = 0;      // --image
    uint64_t rootfs_inodes = 0;   // mkfs -N for the rootfs partition; 0: mkfs's default is enough
    bool unprivileged = false;    // --image made without loop devices, mounts or root
    uint64_t source_date_epoch = 0; // the time boot.scr records, and all of an unprivileged image's
    std::vector<std::string> warnings;
};

// Reads the board, the partition script, the firmware files and the
// source's ref, checks every option that becomes a path, a config line or
// a kernel argument, and for a --device every safety rule. Writes nothing.
FlashPlan plan_flash(const FlashOptions& options, GCancellable* cancellable);

// plan_flash, then (after confirmation for a device) the writes.
FlashResult flash(const FlashOptions& options, GCancellable* cancellable);

// `treeflash __image-trees JOB`: the helper in which an image made without
// privileges is laid out and formatted, as root of a user namespace
// (flash/from_trees.cpp). Returns the exit status.
constexpr const char* image_trees_command = "__image-trees";
int run_image_trees_helper(const std::vector<std::string>& args);

// What one deployment of a commit takes on the rootfs partition: its bytes,
// a block for every entry, and room for OSTree's own files; and the inodes
// (an object per file, a directory in the repository and in the deployment).
struct RootfsNeeds {
    uint64_t bytes = 0;
    uint64_t inodes = 0;
};
RootfsNeeds rootfs_needs(uint64_t content_bytes, uint64_t content_entries);

// The image size flash picks: room for two deployments (an upgrade keeps
// both until the old one is pruned).
uint64_t default_image_size(const PartitionLayout& layout, uint64_t content_bytes, uint64_t content_entries);

} // namespace treeflash::flasher
