// The initramfs: busybox, ostree-prepare-root with exactly the libraries
// and loader its ELF headers ask for, the board's kernel modules with their
// dependencies in load order, and the init template; a gzip'd newc cpio.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace treeflash::builder {

struct InitramfsOptions {
    std::filesystem::path busybox;  // a static busybox for the target
    std::filesystem::path userland; // a tree holding ostree-prepare-root and its libraries
    std::string prepare_root = "usr/lib/ostree/ostree-prepare-root"; // inside `userland`
    std::filesystem::path modules_dir; // lib/modules/KVER of the kernel; empty when no modules
    std::vector<std::string> modules;  // names to load; their dependencies are added
    std::string on_failure = "shell";  // shell, poweroff or reboot
    unsigned root_wait = 10;           // seconds to wait for the root device
    std::string board;                 // named in the rendered init
    std::filesystem::path output;
};

struct InitramfsResult {
    std::vector<std::string> modules; // in load order
    std::vector<std::string> files;   // paths inside the initramfs that hold binaries
    uint64_t bytes = 0;               // size of the compressed archive
};

InitramfsResult build_initramfs(const InitramfsOptions& options);

} // namespace treeflash::builder
