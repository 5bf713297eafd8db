// What makes an image made from directories bit-reproducible: identifiers
// derived from what the image is (commit, board, size) instead of drawn at
// random, and one time for everything in its file systems.
#pragma once

#include <cstdint>
#include <string>

namespace treeflash::flasher {

// A UUID (ext4 -U, -E hash_seed=) derived from `seed`: the same seed gives
// the same UUID, a different one another.
std::string derived_uuid(const std::string& seed);

// An MBR disk identifier ("0x1234abcd") derived from `seed`.
std::string derived_disk_id(const std::string& seed);

// Sets the times of every inode of the ext4 at `offset` of `image` through
// libext2fs: change and creation times become `epoch`, access and
// modification times too, except a modification time of 0 (OSTree's, for
// every file it deploys), which stays; nanoseconds 0.
// mkfs.ext4 -d copies the change times the files got when they were laid
// out, which no one can set.
void clamp_inode_times(const std::string& image, uint64_t offset, uint64_t epoch);

} // namespace treeflash::flasher
