// Pulls with libostree under a watchdog: the pull runs in a child process
// that reports its progress, and the parent stops it when the user cancels
// or when no data arrives for a while (a server that accepts connections and
// never answers would otherwise hang the pull for ever).
//
// The pull itself gets no GCancellable: libostree connects a handler to the
// cancellable for every object, and with 200k objects those connections
// cost quadratic time. Cancellation goes through the child process instead.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;
typedef struct _GVariant GVariant;
typedef struct OstreeRepo OstreeRepo;

namespace treeflash::flasher {

// Seconds without any progress (no object, no byte) after which a pull fails.
constexpr unsigned default_network_timeout = 30;

// ostree_repo_pull_with_options(repo, remote, options) in a child process.
// Throws Cancelled when `cancellable` is cancelled, an Error naming `what`
// when the pull fails or stalls for `stall_seconds`. libostree keeps each
// object it downloads in an unnamed file in $TMPDIR (else /var/tmp) until it
// is written to the repository: `download_dir`, when given, is used instead.
void watched_pull(OstreeRepo* repo, const std::string& remote, GVariant* options, const std::string& what,
                  unsigned stall_seconds, GCancellable* cancellable, const std::filesystem::path& download_dir = {});

// The pull's own process, which watched_pull starts as
// `treeflash __pull (--repo PATH | --sysroot PATH) --remote NAME --options
// GVARIANT [--disable-fsync]`: pulls, reporting progress and the outcome on
// descriptor 3. Returns the exit status.
constexpr const char* pull_helper_command = "__pull";
int run_pull_helper(const std::vector<std::string>& args);

} // namespace treeflash::flasher
