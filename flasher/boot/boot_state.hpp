// Boot counting on the card (README "Boot chain"): the files and the block
// U-Boot and the booted system share, and what they say about each
// deployment.
//
//   ostree/boot.N/treeflash-good.env  written by the booted system once a boot
//       passed its health checks: treeflash_good= is the uEnv.txt bootargs of
//       the good entry. OSTree replaces that folder at every deploy, so a mark
//       never outlives the deployments it was made for.
//   boot/treeflash/ack.env            the booted system's acknowledgement of
//       the last counted boot (treeflash_acked=) and the last known-good
//       deployment; it survives deploys, so U-Boot can tell a new trial from
//       the tries of an old one.
//   boot/treeflash/board.env          written by flash: bootlimit and where
//       the tries are kept, for inspect and upgrade; where U-Boot keeps its
//       environment (uboot_env=OFFSET SIZE), for the factory station.
//   boot/treeflash/auto-update.env    written by the board's updater after
//       each check: its outcome and the commits it saw, for inspect.
//   a 512-byte U-Boot environment at the board's boot_count.state offset:
//       treeflash_tries and treeflash_serial, written by U-Boot on trial boots.
#pragma once

#include "flasher/board.hpp"
#include "flasher/inspect/card_files.hpp"
#include "flasher/deploy/sysroot.hpp"

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace treeflash::flasher {

inline constexpr size_t boot_state_bytes = 512;
inline constexpr const char* boot_mark_name = "treeflash-good.env";
inline constexpr const char* boot_ack_path = "boot/treeflash/ack.env";
inline constexpr const char* boot_board_record_path = "boot/treeflash/board.env";
// What the board's updater (templates/auto-update) found at its last check.
inline constexpr const char* auto_update_state_path = "boot/treeflash/auto-update.env";

// The block flash writes at boot_count.state: no tries, serial 0.
std::vector<uint8_t> initial_boot_state();

// The board's uboot.env file rendered and packed into `size` bytes.
std::vector<uint8_t> render_uboot_environment(const BoardProfile& board, size_t size);

// The text of boot/treeflash/board.env ("" when there is nothing to say);
// where the environment is only when flash rendered it from the board's
// uboot.env (`rendered_uboot_env`): one given with --firmware may be of a
// format or size the station does not know.
std::string boot_board_record(const BoardProfile& board, bool rendered_uboot_env);

// The boot files of a sysroot, read from its mount without following a
// symlink out of it; the tries are read from `card` (image or device) at the
// offset board.env names.
struct BootFiles {
    std::map<std::string, std::string> board; // board.env; no bootlimit: the card does not count boots
    std::map<std::string, std::string> uenv;  // boot/loader/uEnv.txt
    std::map<std::string, std::string> mark;  // the current bootversion's treeflash-good.env
    std::map<std::string, std::string> ack;   // ack.env
    std::optional<std::map<std::string, std::string>> tries_block; // absent: unreadable or damaged
};
BootFiles read_boot_files(const CardView& sysroot, const std::string& card);

// Where board.env says the tries are kept (boot_state_offset=); nullopt
// when it names no such place or not as a number.
std::optional<uint64_t> boot_state_offset(const std::map<std::string, std::string>& board);

// Where board.env says U-Boot keeps its environment (uboot_env=OFFSET SIZE):
// nullopt when it names none; throws when the line is malformed or names a
// place no U-Boot environment can be (not in 512-byte sectors, within the
// first 34 sectors, where an MBR or a GPT is, past 1 MiB in size).
struct UbootEnvPlace {
    uint64_t offset = 0;
    uint64_t size = 0;
};
std::optional<UbootEnvPlace> uboot_env_place(const std::map<std::string, std::string>& board);
// The bytes at `place` of `card` (an image or device of `card_size` bytes);
// throws when they lie past its end.
std::vector<uint8_t> read_uboot_env_block(const std::string& card, const UbootEnvPlace& place, uint64_t card_size);

// One deployment's state, in uEnv.txt order (default first).
struct DeploymentBootState {
    std::string state; // "known good", "trial", "rolled back", "previous", "new", or "" when not counted
    std::optional<unsigned> tries; // trial boots used (trial and rolled back)
};

struct BootStatus {
    bool counting = false;
    unsigned bootlimit = 0;
    int good_entry = 0; // 1 or 2: the uEnv.txt entry the mark names; 0: no valid mark
    std::optional<unsigned> tries; // of the current trial, when the block could be read
    std::string rolled_back_deployment, rolled_back_version; // from the mark, after a rollback
    std::string known_good_deployment, known_good_version;   // from ack.env
    std::vector<DeploymentBootState> entries;                 // [0] the default, [1] the previous
};
BootStatus boot_status(const BootFiles& files, const std::vector<Deployment>& deployments);

// Which of the card's deployments (default first) an upgrade keeps as the
// fallback: the known-good one, or one that has not failed in its place.
size_t fallback_deployment(const BootStatus& status, size_t deployment_count);

// "tcu 2 (0123456789ab)": how the booted system and inspect name a deployment.
std::string deployment_name(const std::string& version, const std::string& deployment_dir);

} // namespace treeflash::flasher
