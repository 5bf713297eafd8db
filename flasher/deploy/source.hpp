// Where a flash pulls from: a repository path on this host or an HTTP URL.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

struct Source {
    std::string url;     // what libostree pulls from: file:///abs/path or http(s)://
    std::string ref;
    std::string commit;
    std::string version;
    uint64_t timestamp = 0;       // the commit's time, seconds since the epoch
    uint64_t content_bytes = 0;   // bytes of its files
    uint64_t content_entries = 0; // files, symlinks and directories
};

// Checks that `repo_or_url` is reachable and holds `ref`, and reads the
// commit's metadata. Over plain HTTP the ref and the commit are read
// directly, as libostree's pull reads them (the commit checked against its
// name and its ref binding); for other URLs, or what cannot be read that
// way, libostree pulls only the commit object into a temporary repository.
// Either gives up after `network_timeout` seconds without progress.
// Nothing is written anywhere else.
Source resolve_source(const std::string& repo_or_url, const std::string& ref, unsigned network_timeout,
                      GCancellable* cancellable);

bool is_url(const std::string& text);

// Whether a pull from the local repository at `path` must check every
// object rather than copy it: the repository or its objects belong to
// another user (who could change a file under a signed commit), or its
// folder is one others can write.
bool local_repository_untrusted(const std::filesystem::path& path);

} // namespace treeflash::flasher
