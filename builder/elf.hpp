// Just enough ELF reading for the initramfs: the dynamic loader and the
// DT_NEEDED libraries of an executable, and a kernel module's .modinfo.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace treeflash::builder {

struct ElfDependencies {
    std::string interpreter;           // PT_INTERP, empty for static binaries
    std::vector<std::string> needed;   // DT_NEEDED sonames
};

// Parses a 64-bit little-endian ELF image held in `bytes`; throws Error for
// anything else, naming `what`.
ElfDependencies elf_dependencies(const std::string& bytes, const std::string& what);

// The key=value strings of a kernel module's .modinfo section.
std::vector<std::string> elf_modinfo(const std::string& bytes, const std::string& what);

} // namespace treeflash::builder
