// Board profiles: a folder of data (board.conf, an sfdisk script, an
// optional boot script) describing how a card for one board is laid out.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace treeflash::flasher {

struct FirmwareSlot {
    std::string name;
    uint64_t offset = 0;
    uint64_t max_size = 0;
};

struct PartitionRole {
    unsigned number = 0;
    std::string label;
    std::string fstype = "ext4";
};

// Boot counting (README "Boot chain"). A deployment is a trial until the
// booted system marks it good; U-Boot counts only trial boots and boots the
// previous deployment after `limit` failed tries.
struct BootCounting {
    unsigned limit = 0;         // 0: the board does not count boots
    uint64_t state_offset = 0;  // a 512-byte U-Boot environment holding the tries
    std::string mark = "rootfs-file"; // how the booted system marks good
    bool enabled() const { return limit > 0; }
};

// An environment treeflash writes where the board's U-Boot keeps its own.
struct UbootEnvironment {
    std::string slot;             // the firmware slot it fills, whose size is U-Boot's
    std::filesystem::path file;   // NAME=VALUE lines, @NAME@ placeholders rendered
};

struct BoardProfile {
    std::filesystem::path dir;
    std::string name;
    std::string description;
    std::string arch;
    std::filesystem::path partition_table; // the sfdisk script
    std::vector<PartitionRole> partitions;  // by number
    unsigned boot_partition = 0;
    unsigned rootfs_partition = 0;
    std::vector<std::string> mkfs_ext4_options;
    std::vector<FirmwareSlot> firmware;
    std::vector<std::string> kernel_args;
    std::string boot_script; // file in the board folder, else a template name
    std::string uboot_devtype;
    std::string uboot_devnum = "0";
    std::string uboot_fdt_fallback;
    std::map<std::string, std::string> uboot_defaults; // variables set when U-Boot lacks them
    std::vector<std::string> initramfs_modules; // loaded by the initramfs, dependencies first
    std::string initramfs_on_failure = "shell"; // shell, poweroff or reboot
    unsigned initramfs_root_wait = 10;          // seconds
    BootCounting boot_count;
    std::optional<UbootEnvironment> uboot_env;
    // image_size = power-of-two: the card model (QEMU's SD card) takes only
    // such sizes, so an image's default size is rounded up to one and a
    // --size that is not one is refused.
    bool image_size_power_of_two = false;
    // devicetree = required: no devicetree the board has at boot survives
    // the kernel's load, so a commit must carry one.
    bool devicetree_required = false;

    const PartitionRole& partition(unsigned number) const;
    const FirmwareSlot* slot(const std::string& name) const;
};

// Loads a profile from a folder, or by name from the built-in boards. A
// mistake is an Error naming the file and line ("board.conf:12: ...").
BoardProfile load_board(const std::string& name_or_dir);

// The folders searched for a board given by name, in order: those of
// $TREEFLASH_BOARD_PATH (colon-separated), the checkout's board/ when
// treeflash runs from the checkout's build tree, share/treeflash/board
// beside the installed binary, and the one it was configured to install to.
std::vector<std::filesystem::path> board_search_path();

} // namespace treeflash::flasher
