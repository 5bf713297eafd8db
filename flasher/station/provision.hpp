// A unit's identity onto a freshly written card, without mounting it: the
// hostname, /etc/treeflash/unit (serial and MAC addresses, KEY=VALUE) and the
// unit's own files go into /etc of the card's deployment, where OSTree's
// 3-way merge keeps them across upgrades. Everything written is read back.
#pragma once

#include "flasher/station/units.hpp"

#include <string>
#include <vector>

namespace treeflash::flasher {

struct Provisioned {
    std::string deployment; // "ostree/deploy/OS/deploy/COMMIT.SERIAL"
    std::vector<std::string> files; // written, "/etc/..."
};

// Writes `unit` into the one deployment on the card or image `path`.
// Throws (nothing half-claimed: the caller records the unit as failed) when
// the card holds no OSTree sysroot, more than one deployment, an /etc that
// leads elsewhere, or reads back differently.
// `name` is the card as errors name it (the slot's device).
Provisioned provision_card(const std::string& path, const Unit& unit, const std::string& name);

} // namespace treeflash::flasher
