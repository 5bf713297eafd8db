// Empty ext4 file systems for new image files, made by mkfs.ext4 once per
// size, label and options and copied onto every later image's partition
// with a UUID of its own: what the flash of an image redoes for nothing on
// every card of the same board and size.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

// Where blank file systems are kept: $XDG_CACHE_HOME/treeflash/blank-ext4,
// else ~/.cache/treeflash/blank-ext4; none when neither variable is set, or
// when TREEFLASH_BLANK_CACHE=off.
std::optional<std::filesystem::path> blank_ext4_cache_dir();

// An empty ext4 file system (labelled `label`, made with the board's mkfs
// `options`) on `node`, a partition of a new image file whose every block
// reads zero (mkfs.ext4's lazy init: inode tables and journal are not
// written). Copied from `cache_dir` when an earlier flash left one made
// there with the same mkfs.ext4, configuration, size, label and options,
// else made there by mkfs.ext4 first. A folder on a path where someone else
// could change it, a file system whose UUID cannot change in place
// (metadata_csum without metadata_csum_seed), a kept file that is not as
// mkfs.ext4 left it (removed, to be made again), or any failure of the
// cache itself (a full disk, say): mkfs.ext4 formats `node` instead.
void make_blank_ext4(const std::string& node, const std::string& label, const std::vector<std::string>& options,
                     const std::optional<std::filesystem::path>& cache_dir, GCancellable* cancellable = nullptr);

// Gives the unmounted ext4 file system on `path` a new random UUID and
// directory hash seed, as `tune2fs -U random` does. Returns false, leaving
// it untouched, when its features tie every metadata block's checksum to
// the UUID (metadata_csum without metadata_csum_seed) or forbid a change
// (stable_inodes).
bool give_new_identity(const std::string& path);

} // namespace treeflash::flasher
