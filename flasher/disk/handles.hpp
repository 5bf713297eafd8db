// Owning pointers for the util-linux handles (libfdisk, libblkid, libmount).
#pragma once

#include <blkid/blkid.h>
#include <libfdisk/libfdisk.h>
#include <libmount/libmount.h>
#include <memory>

namespace treeflash::flasher {

struct FdiskContextUnref {
    void operator()(struct fdisk_context* c) const { fdisk_unref_context(c); }
};
struct FdiskScriptUnref {
    void operator()(struct fdisk_script* s) const { fdisk_unref_script(s); }
};
struct FdiskTableUnref {
    void operator()(struct fdisk_table* t) const { fdisk_unref_table(t); }
};
struct BlkidProbeFree {
    void operator()(blkid_probe p) const { blkid_free_probe(p); } // blkid_probe is already a pointer
};
struct MntContextFree {
    void operator()(struct libmnt_context* c) const { mnt_free_context(c); }
};
struct MntTableUnref {
    void operator()(struct libmnt_table* t) const { mnt_unref_table(t); }
};
struct MntIterFree {
    void operator()(struct libmnt_iter* i) const { mnt_free_iter(i); }
};

using FdiskContext = std::unique_ptr<struct fdisk_context, FdiskContextUnref>;
using FdiskScript = std::unique_ptr<struct fdisk_script, FdiskScriptUnref>;
using FdiskTable = std::unique_ptr<struct fdisk_table, FdiskTableUnref>;
using BlkidProbe = std::unique_ptr<std::remove_pointer_t<blkid_probe>, BlkidProbeFree>;
using MntContext = std::unique_ptr<struct libmnt_context, MntContextFree>;
using MntTable = std::unique_ptr<struct libmnt_table, MntTableUnref>;
using MntIter = std::unique_ptr<struct libmnt_iter, MntIterFree>;

} // namespace treeflash::flasher
