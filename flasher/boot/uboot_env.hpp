// U-Boot environment images: a CRC32 (little endian) of the data area, then
// NAME=VALUE strings each ended by a NUL, padded with NULs to the size U-Boot
// was built with. The format `mkenvimage` writes, `fw_printenv -c` reads and
// U-Boot's `env export -c` / `env import -c` use.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace treeflash::flasher {

using UbootVariables = std::vector<std::pair<std::string, std::string>>; // in the order they are written

// The image of `variables` in `size` bytes. Throws when they do not fit or a
// name or value cannot be stored (a name holding '=', a NUL or newline).
std::vector<uint8_t> make_uboot_env(const UbootVariables& variables, size_t size);

// The variables of an image; throws when its CRC does not match (an erased
// or damaged environment, which U-Boot replaces with its built-in one).
std::map<std::string, std::string> read_uboot_env(const uint8_t* data, size_t size);
// The same, every entry in the order it is stored.
UbootVariables read_uboot_env_entries(const uint8_t* data, size_t size);

// The image of `size` bytes at `data` with `changes` set (each replacing any
// earlier value, added at the end), its CRC computed anew. Throws when the
// image's CRC does not match or the result does not fit.
std::vector<uint8_t> set_uboot_env(const uint8_t* data, size_t size, const UbootVariables& changes);

// NAME=VALUE lines as `mkenvimage` reads them: '#' comments and blank lines
// skipped, the value running to the end of the line.
UbootVariables parse_uboot_env_text(const std::string& text);

} // namespace treeflash::flasher
