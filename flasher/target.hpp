// What flash writes to: a new image file on a loop device, or a disk the
// user named, checked against every safety rule before any write.
#pragma once

#include "common/fd.hpp"
#include "flasher/loop.hpp"

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <sys/types.h>
#include <vector>

namespace treeflash::flasher {

struct ExistingPartition {
    std::string node;
    std::string fstype;
    std::string label;
    uint64_t size = 0;
};

struct DiskInfo {
    std::string path;
    dev_t devno = 0;
    bool is_partition = false;
    std::string whole_disk; // /dev/sdb for /dev/sdb1
    uint64_t size = 0;
    bool removable = false;
    bool read_only = false;
    std::string vendor, model, serial;
    std::vector<ExistingPartition> partitions;
    std::vector<std::string> mounted; // "/dev/sdb1 on /media/card"
    std::vector<std::string> holders; // kernel users (device mapper, md)
    bool holds_root = false;
};

// The sysfs directory of a block device (/sys/devices/.../block/sdb).
std::filesystem::path sysfs_block_dir(dev_t devno);

// Looks at a block device without writing (sysfs, libblkid, libmount).
DiskInfo describe_disk(const std::string& path);

// Throws an Error naming the first rule `disk` breaks: a partition instead
// of a disk, the disk holding /, anything mounted or held, read-only, too
// small, or not removable without `force`.
void check_safe_to_write(const DiskInfo& disk, uint64_t minimum_bytes, bool force);

// An open, exclusively locked block device to write to.
class Target {
public:
    // A new image of `size` bytes written as FILE.partial-* beside `image`
    // and attached to a loop device; commit() renames it to `image`, and the
    // destructor removes it otherwise.
    static std::unique_ptr<Target> create_image(const std::filesystem::path& image, uint64_t size, bool force);
    // A checked disk (see check_safe_to_write), held with flock(LOCK_EX).
    static std::unique_ptr<Target> open_device(const std::string& path);

    ~Target();
    Target(const Target&) = delete;
    Target& operator=(const Target&) = delete;

    const std::string& device() const { return m_device; } // the block device written to
    int fd() const { return m_fd.get(); }
    bool is_image() const { return !m_image.empty(); }
    const std::filesystem::path& image() const { return m_image; }
    uint64_t size() const { return m_size; }
    // Flushes and, for an image, detaches the loop device and moves the file into place.
    void commit();

private:
    Target() = default;
    std::string m_device;
    UniqueFd m_fd;
    uint64_t m_size = 0;
    std::filesystem::path m_image;
    std::filesystem::path m_partial;
    std::unique_ptr<LoopDevice> m_loop;
    bool m_committed = false;
};

} // namespace treeflash::flasher
