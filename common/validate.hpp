// Checks for strings from the command line or a board file that become a
// path, a config line, a kernel argument or a U-Boot script word. Each
// throws an Error naming the option and what is wrong, so a bad value is
// refused before anything is written.
#pragma once

#include <string_view>
#include <vector>

namespace treeflash::validate {

// An OS name (ostree admin os-init): a single path component of letters,
// digits, '.', '_', '-', not starting with '.' or '-', at most 64 bytes.
void os_name(std::string_view name, std::string_view option);

// An OSTree ref: components of [A-Za-z0-9._-] separated by '/', none empty,
// none "." or "..", not starting with '-'.
void ref(std::string_view ref, std::string_view option);

// One kernel argument: printable ASCII, no space, no quote, backslash, '$'
// or ';' (it lands in uEnv.txt, a U-Boot setenv line and /proc/cmdline).
void kernel_arg(std::string_view arg, std::string_view option);

// arm64's COMMAND_LINE_SIZE (2048 bytes with the final NUL): a longer
// command line is cut by the kernel and may not boot. `args` are the ones
// treeflash writes; the reserve stays for what libostree and the boot add:
// ostree= and init=, each with the deployment's path (up to ~155 bytes with
// a 64-character OS name), and boot counting's treeflash.state= and
// treeflash.boot= (~60).
inline constexpr size_t kernel_command_line_size = 2048;
inline constexpr size_t kernel_command_line_reserve = 448;
void kernel_command_line(const std::vector<std::string>& args, std::string_view option);

// An http://, https:// or file:// URL without spaces or control characters
// (it becomes a line of the repository's config).
void url(std::string_view url, std::string_view option);

// A value for a KEY=VALUE text file (os-release, a config line): no
// newline or other control character.
void single_line(std::string_view value, std::string_view option);

// A word of a U-Boot script (an address, ${variable}, a device type):
// letters, digits and "_.:/-${}" only.
void uboot_word(std::string_view word, std::string_view option);

} // namespace treeflash::validate
