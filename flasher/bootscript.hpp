// The U-Boot boot script: rendered from the board's template and packed
// with U-Boot's mkimage.
#pragma once

#include "flasher/board.hpp"

#include <filesystem>
#include <string>

namespace treeflash::flasher {

// The script text for `board` (board folder first, then templates/).
std::string render_boot_script(const BoardProfile& board);

// Writes boot.cmd and boot.scr (mkimage -T script) into `dir`.
void write_boot_script(const BoardProfile& board, const std::filesystem::path& dir);

} // namespace treeflash::flasher
