// treeflash upgrade: `ostree admin upgrade` on a flashed card or image.
#pragma once

#include "flasher/deploy/sysroot.hpp"

#include <functional>
#include <optional>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

struct UpgradeOptions {
    std::string target;              // a device or an image file
    std::optional<std::string> repo; // pull from here (path or URL) instead of the origin's URL
    std::optional<std::string> ref;  // switch to this ref on the same remote
    unsigned network_timeout = 30;   // seconds without progress before the pull fails
    std::vector<std::string> kernel_args_append; // added to the inherited kernel arguments
    std::function<void(const std::string&)> notice;
};

struct UpgradeResult {
    int partition = 0;
    Deployment previous;          // the default deployment before
    Deployment current;           // the default deployment after
    Deployment fallback;          // the deployment kept for rollback: the known-good one
    std::string fallback_reason;  // why it, when a board counts boots and it is not the previous default
    bool changed = false;         // false: already up to date
    std::vector<Deployment> deployments; // after, default first
};

// Pulls the newer commit of the default deployment's origin (the remote's
// URL and GPG settings apply), deploys it with /etc merged and /var kept,
// keeps one deployment for rollback, and leaves the boot files pointing at
// the new one. On a card that counts boots the kept one is the known-good
// deployment: after a rollback the failed default is dropped, not kept.
UpgradeResult upgrade(const UpgradeOptions& options, GCancellable* cancellable);

} // namespace treeflash::flasher
