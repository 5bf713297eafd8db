// RAII for e2fsprogs' libext2fs handles (kept out of handles.hpp: ext2fs.h
// is large and only the files that read or touch ext4 in place need it).
#pragma once

#include <ext2fs/ext2fs.h>
#include <memory>
#include <type_traits>

namespace treeflash::flasher {

struct Ext2Close {
    void operator()(ext2_filsys fs) const { ext2fs_close_free(&fs); }
};
struct Ext2InodeScanClose {
    void operator()(ext2_inode_scan scan) const { ext2fs_close_inode_scan(scan); }
};

using Ext2Filesystem = std::unique_ptr<std::remove_pointer_t<ext2_filsys>, Ext2Close>;
using Ext2InodeScan = std::unique_ptr<std::remove_pointer_t<ext2_inode_scan>, Ext2InodeScanClose>;

} // namespace treeflash::flasher
