// Reading an ext4 file system on a card or in an image in place, through
// e2fsprogs' libext2fs: no mount, no loop device, so the kernel's ext4 code
// never sees an untrusted card, and read permission on the device is all it
// takes. Each path is looked up one name at a time and a symlink on the
// way ends the lookup: nothing leads outside what was asked for.
#pragma once

#include "flasher/inspect/card_files.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace treeflash::flasher {

class Ext4Card : public CardView {
public:
    // The ext4 (or ext2/3) at `offset` of `path`; throws when there is none.
    Ext4Card(const std::string& path, uint64_t offset);
    ~Ext4Card() override;
    Ext4Card(const Ext4Card&) = delete;
    Ext4Card& operator=(const Ext4Card&) = delete;

    std::string read(const std::string& relpath) const override;
    uint64_t size(const std::string& relpath) const override;
    std::string link(const std::string& relpath) const override;
    unsigned type(const std::string& relpath) const override;
    std::vector<std::string> list(const std::string& relpath) const override;

private:
    struct Impl;
    std::unique_ptr<Impl> m;
};

} // namespace treeflash::flasher
