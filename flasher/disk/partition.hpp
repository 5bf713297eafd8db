// Partition tables: the board's sfdisk script, read and applied with libfdisk.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace treeflash::flasher {

struct PartitionSpec {
    unsigned number = 0;
    uint64_t start = 0; // sectors of 512 bytes
    uint64_t size = 0;  // sectors; 0 = up to the end of the disk
    bool bootable = false;
    std::string type;
};

struct PartitionLayout {
    std::string label; // "dos" or "gpt"
    std::vector<PartitionSpec> partitions;
    static constexpr uint64_t sector_size = 512;

    // Bytes a disk needs so the partition that grows gets at least `growing_bytes`.
    uint64_t minimum_disk_bytes(uint64_t growing_bytes) const;
    uint64_t first_partition_offset() const;
};

// Parses an sfdisk script. Every partition needs an explicit start= (one
// without it could land in a gap before an earlier one). Errors name the
// file and line.
PartitionLayout read_partition_script(const std::filesystem::path& script);

// Writes the table from `script` onto the open disk `fd` (after wiping old
// signatures, unless `fresh_zeroed`: a new image file holds none), then
// makes the kernel re-read it and waits for the partition device nodes.
// `disk_id`: the MBR disk identifier or GPT disk GUID to give the table
// instead of a random one ("" keeps libfdisk's).
void write_partition_table(int fd, const std::string& device_path, const std::filesystem::path& script,
                           bool fresh_zeroed, const std::string& disk_id = "");

// The partition device node for partition `number` of `disk` (/dev/sdb3, /dev/loop0p3).
std::string partition_node(const std::string& disk, unsigned number);

struct PartitionEntry {
    unsigned number = 0;
    uint64_t start = 0; // bytes
    uint64_t size = 0;  // bytes
    bool bootable = false;
    std::string type;
};

struct PartitionTable {
    std::string label; // "dos", "gpt" or "" when none
    std::string id;
    std::vector<PartitionEntry> partitions;
};

// Reads the partition table of a disk or image file without writing.
PartitionTable read_partition_table(const std::string& path);

// Makes the kernel show the partitions of the table now on the open disk
// `fd` (after an image was written over it): the old ones are dropped and
// the new ones added (BLKPG, as partx -u does; a re-read is not always
// honoured), then waits for their nodes. Nothing for an image file.
void show_new_partitions(int fd, const std::string& device_path);

// Extends the partition that ends last on the open disk `fd` to the end of
// the free space after it (on GPT the backup table moves to the disk's
// end), tells the kernel and waits for its node. Returns the new entry.
// Throws when the last partition is a logical or extended one.
PartitionEntry extend_last_partition(int fd, const std::string& device_path);

} // namespace treeflash::flasher
