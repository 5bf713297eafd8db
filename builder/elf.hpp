// Just enough ELF reading for the initramfs and for programs added to a
// commit: the dynamic loader and the DT_NEEDED libraries of an executable,
// the files those lead to in a userland tree, and a kernel module's .modinfo.
#pragma once

#include "common/fd.hpp"

#include <filesystem>
#include <functional>
#include <optional>
#include <set>
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

// A file a program needs at run time, read from a userland tree.
struct RuntimeFile {
    enum class Role { Program, Loader, Library };
    Role role = Role::Program;
    std::string name;  // Program: its path in the userland; Loader: PT_INTERP (absolute); Library: the soname
    std::string found; // where in the userland it was read (links resolved inside the userland)
    std::string bytes;
};

// Finds what programs need in `userland` (a tree laid out like a root file
// system: Debian packages unpacked into one folder), the way the dynamic
// loader would: the loader PT_INTERP names, then each DT_NEEDED soname in
// lib/<triplet>, usr/lib/<triplet>, lib, usr/lib, lib64 and usr/lib64.
// Links inside the userland resolve inside it, never on the host.
class RuntimeResolver {
public:
    explicit RuntimeResolver(const std::filesystem::path& userland);

    // `provided` says whether the target already has a loader or library
    // (Role and name filled); such a file and what it needs are skipped.
    using Provided = std::function<bool(const RuntimeFile&)>;

    // `program` (a path inside the userland) first, then, depth first, the
    // loader and the libraries it needs that no earlier call returned.
    // Throws Error naming the program when one is missing.
    std::vector<RuntimeFile> resolve(const std::string& program, const Provided& provided = {});

private:
    void add_dependencies(const std::string& bytes, const std::string& what, const Provided& provided,
                          std::vector<RuntimeFile>& out);

    std::filesystem::path m_userland;
    UniqueFd m_root;
    std::vector<std::string> m_search;
    std::set<std::string> m_done;
};

// Reads `path` inside `root` as if `root` were `/` (absolute links resolve
// inside it). Returns false when it does not exist there.
bool read_in_root(int root, const std::string& path, std::string& bytes);

} // namespace treeflash::builder
