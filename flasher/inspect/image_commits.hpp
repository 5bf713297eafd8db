// Which OSTree commits an image holds, read straight from its ext4 file
// systems with libext2fs: no loop device, no mount, and no way out of the
// file system (libext2fs resolves paths inside it).
#pragma once

#include <string>
#include <vector>

namespace treeflash::flasher {

// The commits deployed in the image (or card) at `path`: the checksums of
// /ostree/deploy/*/deploy/CHECKSUM.SERIAL on any ext2/3/4 partition. Empty
// when the image holds no OSTree sysroot.
std::vector<std::string> deployed_commits(const std::string& path);

} // namespace treeflash::flasher
