// treeflash flash: a commit becomes a partitioned, deployed card or image.
#pragma once

#include "flasher/board.hpp"
#include "flasher/partition.hpp"
#include "flasher/sysroot.hpp"
#include "flasher/target.hpp"

#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

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
    bool force = false;
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
    std::vector<std::string> warnings;
};

FlashResult flash(const FlashOptions& options, GCancellable* cancellable);

// The image size flash picks for a commit of `content_bytes`.
uint64_t default_image_size(const PartitionLayout& layout, uint64_t content_bytes);

} // namespace treeflash::flasher
