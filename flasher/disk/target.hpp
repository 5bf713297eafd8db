// What flash writes to: a new image file on a loop device, or a disk the
// user named, checked against every safety rule before any write.
#pragma once

#include "common/fd.hpp"
#include "flasher/disk/loop.hpp"

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
    std::string path;        // as the user named it (/dev/disk/by-id/... too)
    std::string kernel_path; // the kernel's name for it (/dev/sdb)
    dev_t devno = 0;
    uint64_t diskseq = 0;    // the kernel's disk sequence number, 0 when it has none
    bool is_partition = false;
    std::string whole_disk; // /dev/sdb for /dev/sdb1
    uint64_t size = 0;
    bool removable = false;
    bool read_only = false;
    std::string vendor, model, serial;
    std::vector<ExistingPartition> partitions;
    std::vector<std::string> mounted; // "/dev/sdb1 on /media/card", also through a loop device over it
    std::vector<std::string> holders; // kernel users (device mapper, md), also of a loop device over it
    bool holds_root = false;
};

// The sysfs directory of a block device (/sys/devices/.../block/sdb).
std::filesystem::path sysfs_block_dir(dev_t devno);

// The first line of a sysfs attribute, trailing blanks cut; "" when absent.
std::string sysfs_read(const std::filesystem::path& path);

// Looks at a block device without writing (sysfs, libblkid, libmount).
DiskInfo describe_disk(const std::string& path);

// The loop devices (/dev/loopN) whose backing file is `file` (same inode).
std::vector<std::string> loop_devices_backed_by(const std::filesystem::path& file);

// An existing card or image opened for exclusive use by this process while
// it lives: an image is flock()ed and refused when a loop device backs it
// (it may be mounted elsewhere); a disk is opened O_EXCL and refused when
// it is a partition, mounted, or held by another kernel user.
class ExclusiveCard {
public:
    explicit ExclusiveCard(const std::string& path);
    ExclusiveCard(const ExclusiveCard&) = delete;
    ExclusiveCard& operator=(const ExclusiveCard&) = delete;
    bool is_image() const { return m_image; }

private:
    UniqueFd m_fd;
    bool m_image = false;
};

// The one check that a disk is free: throws when it or a partition is
// mounted, used as swap, held by another kernel user, or backs a loop device
// (with or without an offset) that is itself mounted or held.
void check_not_in_use(const DiskInfo& disk);

// Throws an Error naming the first rule `disk` breaks: a partition instead
// of a disk, the disk holding /, anything mounted or held, read-only, too
// small, or not removable without `force`.
void check_safe_to_write(const DiskInfo& disk, uint64_t minimum_bytes, bool force);

// An open, exclusively locked block device to write to.
class Target {
public:
    // A new image of `size` bytes written as .FILE.partial-* beside `image`
    // and attached to a loop device; commit() moves it to `image` (never over
    // a file that appeared meanwhile, unless `overwrite`), and the destructor
    // removes it otherwise.
    // Partial images (and partial compressed forms) of flashes that were
    // killed (no live process holds their lock) are removed first, with the
    // loop devices and treeflash mounts still using them; what was removed
    // is added to `reclaimed`. The caller holds the folder's turn (flash.cpp),
    // so no other flash creates a partial here meanwhile.
    // Without `attach_loop` the file itself is the target (device() is its
    // path), for images made without loop devices.
    static std::unique_ptr<Target> create_image(const std::filesystem::path& image, uint64_t size, bool overwrite,
                                                std::vector<std::string>* reclaimed = nullptr, bool attach_loop = true);
    // The checked disk (see check_safe_to_write), opened exclusively (O_EXCL:
    // the kernel refuses mounts and other exclusive users while it is open)
    // and held with flock(LOCK_EX). Throws when the device node now leads to
    // another device than the one checked.
    static std::unique_ptr<Target> open_device(const DiskInfo& checked);

    // Throws unless the open device is still the one checked: same device
    // number, size and disk sequence number. Called again right before the
    // first write, after the user confirmed.
    void verify_identity(const DiskInfo& checked) const;

    // Gives up the exclusive claim on a device, keeping the same open device
    // (reopened through this descriptor, so it cannot be another one) and
    // the flock: the kernel lets mkfs and mount claim partitions only while
    // no one claims the whole disk.
    void release_exclusive_claim();

    ~Target();
    Target(const Target&) = delete;
    Target& operator=(const Target&) = delete;

    const std::string& device() const { return m_device; } // the block device written to
    int fd() const { return m_fd.get(); }
    bool is_image() const { return !m_image.empty(); }
    const std::filesystem::path& image() const { return m_image; }
    uint64_t size() const { return m_size; }
    // Starts writing out what reached an image file's page cache, without
    // waiting for it: the disk works while the caller goes on, and commit()
    // has less to wait for. Nothing to do for a device, whose writes go to
    // the device as they are flushed.
    void start_writeback() const;
    // Flushes and, for an image, detaches the loop device and moves the file into place.
    void commit();
    // An image: another descriptor of the file written (through the same
    // open file, which stays the image once commit() moved it into place),
    // once all written to the loop device itself (the partition table and
    // firmware) has reached the file: enough to read the image back, while
    // commit() makes it durable.
    UniqueFd image_file() const;
    // The image file commit() replaced (with `overwrite`), still open: its
    // blocks are freed when this closes, which takes a while for a large
    // image, so a caller may close it beside other work. Empty when nothing
    // was replaced; the destructor closes it otherwise.
    UniqueFd take_replaced_image() { return std::move(m_replaced); }

private:
    Target() = default;
    std::string m_device;
    UniqueFd m_fd;
    uint64_t m_size = 0;
    std::filesystem::path m_image;
    std::filesystem::path m_partial;
    UniqueFd m_partial_lock; // flock()ed while this process works on the partial image
    std::unique_ptr<LoopDevice> m_loop;
    bool m_overwrite = false;
    bool m_committed = false;
    UniqueFd m_replaced;
};

} // namespace treeflash::flasher
