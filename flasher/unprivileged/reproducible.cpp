#include "flasher/unprivileged/reproducible.hpp"

#include "common/error.hpp"
#include "common/sha256.hpp"
#include "flasher/disk/ext2fs_handles.hpp"

#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

namespace treeflash::flasher {

namespace {

std::string ext2_error(const std::string& what, errcode_t code)
{
    // Small codes are errno values; libext2fs's own are large (com_err tables).
    return what + ": " + (code > 0 && code < 4096 ? std::string(std::strerror(static_cast<int>(code)))
                                                  : "libext2fs error " + std::to_string(code));
}

} // namespace

std::string derived_uuid(const std::string& seed)
{
    std::string hex = sha256_hex("uuid\n" + seed).substr(0, 32);
    // RFC 9562 version 8 (custom), variant 10.
    hex[12] = '8';
    static const char variant[] = "89ab";
    hex[16] = variant[std::stoi(hex.substr(16, 1), nullptr, 16) & 3];
    return hex.substr(0, 8) + "-" + hex.substr(8, 4) + "-" + hex.substr(12, 4) + "-" + hex.substr(16, 4) + "-" + hex.substr(20, 12);
}

std::string derived_disk_id(const std::string& seed)
{
    std::string hex = sha256_hex("disk id\n" + seed).substr(0, 8);
    if (hex == "00000000")
        hex = "00000001"; // 0 means "none" to some tools
    return "0x" + hex;
}

void clamp_inode_times(const std::string& image, uint64_t offset, uint64_t epoch)
{
    ext2_filsys raw = nullptr;
    std::string io_options = "offset=" + std::to_string(offset);
    errcode_t rc = ext2fs_open2(image.c_str(), io_options.c_str(), EXT2_FLAG_RW | EXT2_FLAG_64BITS, 0, 0, unix_io_manager, &raw);
    if (rc)
        throw Error(ext2_error("open the ext4 at " + std::to_string(offset) + " of " + image, rc));
    Ext2Filesystem fs(raw);
    fs->now = static_cast<time_t>(epoch); // the superblock's write time, on close
    ext2_inode_scan raw_scan = nullptr;
    if ((rc = ext2fs_open_inode_scan(fs.get(), 0, &raw_scan)))
        throw Error(ext2_error("scan the inodes of " + image, rc));
    Ext2InodeScan scan(raw_scan);
    int size = EXT2_INODE_SIZE(fs->super);
    std::vector<char> buffer(static_cast<size_t>(size));
    auto* inode = reinterpret_cast<ext2_inode_large*>(buffer.data());
    auto clamp = static_cast<__u32>(epoch);
    for (;;) {
        ext2_ino_t ino = 0;
        if ((rc = ext2fs_get_next_inode_full(scan.get(), &ino, reinterpret_cast<ext2_inode*>(inode), size)))
            throw Error(ext2_error("read an inode of " + image, rc));
        if (!ino)
            break;
        if (inode->i_links_count == 0 && inode->i_mode == 0)
            continue; // not in use
        // OSTree gives its file objects (and so every deployed file) the
        // modification time 0: that stays. Everything else, made while
        // laying the sysroot out or copied from wherever, gets `epoch`.
        __u32 mtime = inode->i_mtime == 0 ? 0 : clamp;
        inode->i_mtime = inode->i_atime = mtime;
        inode->i_ctime = clamp;
        if (size > EXT2_GOOD_OLD_INODE_SIZE && inode->i_extra_isize >= 24) {
            inode->i_ctime_extra = inode->i_mtime_extra = inode->i_atime_extra = 0;
            inode->i_crtime = clamp;
            inode->i_crtime_extra = 0;
        }
        if ((rc = ext2fs_write_inode_full(fs.get(), ino, reinterpret_cast<ext2_inode*>(inode), size)))
            throw Error(ext2_error("write an inode of " + image, rc));
    }
    scan.reset();
    // ext2fs_close_free frees the handle even when it fails: the holder
    // lets go of it first.
    raw = fs.release();
    if ((rc = ext2fs_close_free(&raw)))
        throw Error(ext2_error("close " + image, rc));
}

} // namespace treeflash::flasher
