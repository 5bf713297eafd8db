// treeflash build: a rootfs (directory or tarball) becomes a normalized,
// committed OSTree tree. The whole pipeline behind one call.
#pragma once

#include "builder/stages.hpp"

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace treeflash::builder {

struct BuildOptions {
    std::filesystem::path rootfs;
    std::filesystem::path repo;
    NormalizeOptions normalize;
    ProgramsOptions programs;
    KernelOptions kernel;
    CommitOptions commit; // an empty subject becomes "<os> [<version> ]rootfs"
    // Owners for every entry. A directory read by a user other than root
    // defaults to 0:0: its files belong to the user building it, not to
    // whoever should own them on the device.
    OwnerOptions owners;
};

struct BuildResult {
    std::filesystem::path repo;
    std::string ref;
    CommitResult commit;
    KernelResult kernel;
    NormalizeResult normalize;
    ProgramsResult programs;
    bool created_repo = false;
    std::vector<std::string> warnings; // every stage's, in pipeline order
};

// Receives notices while the build runs (waiting for a lock, ...).
using Notice = std::function<void(const std::string&)>;

// Runs import, sanitize, normalize, kernel and commit. Throws Error naming
// the failing step; the repository is then as it was before the call.
BuildResult build(const BuildOptions& options, GCancellable* cancellable, const Notice& notice = {});

} // namespace treeflash::builder
