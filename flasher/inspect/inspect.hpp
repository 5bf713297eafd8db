// treeflash inspect: what is on a card or image, read without writing.
#pragma once

#include "flasher/boot/boot_state.hpp"
#include "flasher/disk/format.hpp"
#include "flasher/disk/partition.hpp"
#include "flasher/deploy/sysroot.hpp"

#include <map>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

struct InspectedPartition {
    PartitionEntry entry;
    FilesystemInfo filesystem;
};

struct InspectResult {
    std::string target;
    uint64_t size = 0;
    PartitionTable table;
    std::vector<InspectedPartition> partitions;
    int sysroot_partition = 0; // 0 when no partition holds an OSTree sysroot
    std::vector<Deployment> deployments; // default first, then rollback
    std::string origin_url;
    std::string origin_gpg_verify;
    std::map<std::string, std::string> uenv; // boot/loader/uEnv.txt
    bool has_update_marker = false;
    bool has_newroot = false;
    bool has_mnt = false;
    bool has_boot_script = false;
    BootStatus boot; // boot counting: each deployment's state, the tries
    // The board's updater after its last check (boot/treeflash/auto-update.env,
    // written by usr/lib/treeflash/auto-update): checked, outcome, booted,
    // offered, refused, deployed, message. Empty: it never ran.
    std::map<std::string, std::string> auto_update;
    // The unit a factory station gave the card: /etc/treeflash/unit of the
    // default deployment (serial, hostname, ethaddr, ...). Empty: none.
    std::map<std::string, std::string> unit;
    // The U-Boot environment the board keeps on the card (where flash's
    // boot/treeflash/board.env says), when it has one and its CRC matches:
    // a station's unit is there too (serial#, ethaddr, ...).
    std::map<std::string, std::string> uboot_env;
    // boot/treeflash/board.env of the sysroot: how flash set the card up
    // for its board (bootlimit, where the tries and the environment are).
    std::map<std::string, std::string> board_record;
    std::vector<std::string> warnings; // file systems that could not be read, partitions past the end, files too large
};

// Reads a device or image without writing, mounting or attaching it: each
// ext4 is read in place through libext2fs (ext4_reader.hpp), its journal
// not replayed. Everything read from the card is treated as hostile.
InspectResult inspect(const std::string& path, GCancellable* cancellable);

} // namespace treeflash::flasher
