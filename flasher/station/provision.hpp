// A unit's identity onto a freshly written card, without mounting it: the
// hostname, /etc/treeflash/unit (serial and MAC addresses, KEY=VALUE) and the
// unit's own files go into /etc of the card's deployment, where OSTree's
// 3-way merge keeps them across upgrades; where the board keeps U-Boot's
// environment on the card (flash's board.env says where), serial# and
// ethaddr, eth1addr, ... go there too, with the CRC made anew. Everything
// written is read back.
#pragma once

#include "flasher/boot/boot_state.hpp"
#include "flasher/station/units.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace treeflash::flasher {

// Where a card's identity goes, found on the written card before any unit
// is taken for it: a card found unfit here (no sysroot, a damaged or
// misplaced environment) costs no unit.
struct ProvisionTarget {
    std::string path;       // the card or image, as it is opened
    std::string name;       // the card as errors name it (the slot's device)
    uint64_t card_size = 0;
    uint64_t sysroot_offset = 0;
    std::string deployment; // "ostree/deploy/OS/deploy/COMMIT.SERIAL"
    std::optional<UbootEnvPlace> uboot_env;
};

// Throws when the card holds no OSTree sysroot, more than one deployment,
// or a U-Boot environment that is damaged or overlaps a partition.
ProvisionTarget find_provision_target(const std::string& path, const std::string& name);

struct Provisioned {
    std::string deployment;
    std::vector<std::string> files; // written, "/etc/..."
    // Set in U-Boot's environment (serial#, ethaddr, ...); empty when the
    // board keeps none on the card.
    std::vector<std::string> uboot_variables;
};

// Writes `unit` onto the card. Throws when the unit's variables do not fit
// the environment (before anything is written), /etc leads elsewhere, a
// write fails or something reads back differently; the caller journals the
// unit as failed, so it is never given to another card.
Provisioned provision_card(const ProvisionTarget& target, const Unit& unit);

} // namespace treeflash::flasher
