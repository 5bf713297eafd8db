// Writing a few files into an ext4 file system in place, through
// e2fsprogs' libext2fs: no mount and no loop device, so a card being
// provisioned is never handed to the kernel's ext4 code, and a station needs
// no mount namespace per slot. Paths are looked up one name at a time; a
// symlink, or a file where a directory should be, ends the write with an
// error: nothing leads outside the directory asked for.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace treeflash::flasher {

class Ext4Writer {
public:
    // The ext4 at byte `offset` of `path`, opened for writing. Refuses a file
    // system whose journal needs recovery (it was not cleanly unmounted):
    // writing behind a journal that is then replayed would lose the write.
    Ext4Writer(const std::string& path, uint64_t offset);
    ~Ext4Writer();
    Ext4Writer(const Ext4Writer&) = delete;
    Ext4Writer& operator=(const Ext4Writer&) = delete;

    // Creates the directories of `relpath` that are missing (mode 0755,
    // owned by root). Each existing component must be a directory.
    void make_directories(const std::string& relpath);

    // Writes `data` as the regular file `relpath` (its directory must
    // exist), with `mode` (permission bits) and owner uid/gid. A file that
    // was there is replaced by a new inode, its directory entry repointed in
    // place (the name is never missing); another hard link to the old inode
    // keeps the old bytes. Anything but a regular file there is an error.
    // New files carry no extended attributes (no SELinux label).
    void write_file(const std::string& relpath, const std::string& data, unsigned mode, unsigned uid = 0,
                    unsigned gid = 0);

    // Writes the bitmaps, group descriptors and superblock, and flushes the
    // device; throws when that fails. A writer destroyed without close()
    // (an error on the way) flushes as well, ignoring errors: a call that
    // failed half-way may leave an inode allocated that no name reaches,
    // which e2fsck reclaims; names and their files stay as they were.
    void close();

private:
    struct Impl;
    std::unique_ptr<Impl> m;
};

} // namespace treeflash::flasher
