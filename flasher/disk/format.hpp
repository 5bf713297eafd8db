// Filesystems on the new partitions, and checking them with libblkid.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

struct FilesystemInfo {
    std::string type;
    std::string label;
    std::string uuid;
};

// mkfs.ext4 with the board's options and the partition's label. On a new
// image file every block already reads as zero, so inode tables and the
// journal need not be written out (`fresh_zeroed`); on a used card they must.
// `passed_fd`: a descriptor mkfs.ext4 gets as 3 (for a `node` of "/dev/fd/3").
void make_ext4(const std::string& node, const std::string& label, const std::vector<std::string>& options,
               bool fresh_zeroed = false, GCancellable* cancellable = nullptr, int passed_fd = -1);

// How make_ext4_in_image makes a file system that is the same every time.
struct ReproducibleExt4 {
    std::string uuid;      // -U
    std::string hash_seed; // -E hash_seed=
    uint64_t time = 0;     // E2FSPROGS_FAKE_TIME: the superblock's times
};

// mkfs.ext4 straight into the image file `image` at `offset`, `size` bytes
// long, filled with the tree at `content` (owners, modes, hardlinks and
// xattrs kept) unless it is empty. No loop device, no mount. A board's own
// -E options are kept beside the offset.
void make_ext4_in_image(const std::string& image, uint64_t offset, uint64_t size, const std::string& label,
                        const std::vector<std::string>& options, const std::filesystem::path& content,
                        const ReproducibleExt4& same);

// What libblkid finds on `path` (a partition node or image), at `offset`.
FilesystemInfo probe_filesystem(const std::string& path, uint64_t offset = 0, uint64_t size = 0);

// Throws unless `node` carries an `fstype` filesystem labelled `label`.
void verify_filesystem(const std::string& node, const std::string& fstype, const std::string& label);

} // namespace treeflash::flasher
