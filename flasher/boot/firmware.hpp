// Raw firmware blobs written at the board's slots before the first partition.
#pragma once

#include "flasher/board.hpp"

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace treeflash::flasher {

struct FirmwareBlob {
    FirmwareSlot slot;
    std::filesystem::path file;  // a blob the user gave, or
    std::vector<uint8_t> bytes;  // one treeflash made (U-Boot environments)
    uint64_t size = 0;
};

// Checks every NAME=FILE against the board: the slot exists, the file is
// readable, fits its slot and ends before the first partition.
std::vector<FirmwareBlob> plan_firmware(const BoardProfile& board, const std::map<std::string, std::string>& given,
                                        uint64_t first_partition_offset);

// Adds what the board has treeflash write itself: its U-Boot environment
// (unless the user gave that slot a file) and the boot counting block.
void plan_generated_blobs(const BoardProfile& board, std::vector<FirmwareBlob>& blobs, uint64_t first_partition_offset);

// Whether `blobs` hold the U-Boot environment flash renders from the board's
// uboot.env (not one given with --firmware): the one the station rewrites.
bool renders_uboot_env(const BoardProfile& board, const std::vector<FirmwareBlob>& blobs);

void write_firmware(int fd, const std::vector<FirmwareBlob>& blobs);

} // namespace treeflash::flasher
