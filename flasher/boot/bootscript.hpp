// The U-Boot boot script: rendered from the board's template and packed
// with U-Boot's mkimage.
#pragma once

#include "flasher/board.hpp"

#include <filesystem>
#include <set>
#include <string>

namespace treeflash::flasher {

// The script text for `board` (board folder first, then templates/). Throws
// when the script uses a U-Boot variable that neither the script, OSTree's
// uEnv.txt, U-Boot itself nor a `uboot.default.NAME` of the board sets and
// that the script does not test for: such a script fails on an environment
// that lacks the variable.
std::string render_boot_script(const BoardProfile& board);

// The variables `script` reads (${NAME}) that nothing guarantees, as above.
std::set<std::string> unset_boot_script_variables(const std::string& script);

// Writes `script` as boot.cmd and boot.scr (mkimage -T script) into `dir`.
// `source_date_epoch`: the time mkimage records (0: now).
void write_boot_script(const BoardProfile& board, const std::string& script, const std::filesystem::path& dir,
                       uint64_t source_date_epoch = 0);

} // namespace treeflash::flasher
