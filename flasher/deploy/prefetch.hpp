// A commit's objects fetched ahead of libostree's pull.
//
// libostree pulls content through zlib and GLib's SHA-256, which on a card
// writer is most of a flash. Before its pull runs, treeflash fetches the
// commit's dirtrees, dirmetas and content objects itself from an archive
// repository (over http://, or in a local folder): on several threads, each
// object inflated with libdeflate and checked against its checksum with
// OpenSSL, then written to the card's repository through libostree.
// libostree's pull then finds them there and does the rest as always: the
// commit and its signature, the ref. When nothing is signature-checked,
// record_prefetched_commit does that rest instead (the ref binding checked
// as libostree checks it); a signed commit is only read here, never
// written, so signature checks stay libostree's.
//
// Whatever the prefetch cannot fetch, inflate or check, it leaves to that
// pull, which fetches it again and reports any error as it always did: the
// prefetch stops at its first problem and never fails a flash on its own
// (except when the user cancels). Objects too big to hold in memory (over
// 64 MiB as fetched, 128 MiB inflated; metadata over 10 MiB) are simply
// left to that pull, which streams them; the workers share a budget for the
// files they inflate.
#pragma once

#include "common/glib.hpp"

#include <cstdint>
#include <memory>
#include <string>

typedef struct _GCancellable GCancellable;
typedef struct OstreeRepo OstreeRepo;

namespace treeflash::flasher {

struct PrefetchResult {
    bool attempted = false; // false: the source is not one the prefetch reads (https, a proxy, not archive)
    bool complete = false;  // every object of the commit but the commit itself is in the repository
                            // (false too when objects were left to libostree's pull)
    uint64_t objects = 0;   // objects written
    uint64_t bytes = 0;     // bytes fetched
    uint64_t left = 0;      // objects too big to hold in memory, left to libostree's pull
    std::string stopped;    // why it stopped early, when it did
    glib::Variant commit_object;     // the commit, checked against its name
    glib::Variant detached_metadata; // its signatures and such, when it has any
};

// Fetches into `repo` the objects of `commit` (its dirtrees, dirmetas and
// content, not the commit itself) from the archive repository at `url`
// (http://HOST/PATH or file:///PATH). `network_timeout`: seconds an HTTP
// request may stay silent. `sync_while_fetching`: sync the repository's
// file system every 32 MiB fetched, so a card is written while objects
// still arrive rather than all at once at the end.
PrefetchResult prefetch_objects(OstreeRepo* repo, const std::string& url, const std::string& commit,
                                unsigned network_timeout, bool sync_while_fetching, GCancellable* cancellable);

// prefetch_objects started before the repository exists (while the card is
// partitioned and formatted): objects are fetched and checked on threads
// of their own from when this is made, held in memory (within the
// prefetch's budget) until finish_into names a new, empty repository.
// Destroyed unfinished, it stops its transfers and waits for its threads.
class StartedPrefetch {
public:
    StartedPrefetch(const std::string& url, const std::string& commit, unsigned network_timeout,
                    GCancellable* cancellable);
    ~StartedPrefetch();
    StartedPrefetch(StartedPrefetch&&) noexcept;
    StartedPrefetch& operator=(StartedPrefetch&&) = delete;

    // Writes what is held into `repo`, then the rest as it comes; waits
    // for the end (see prefetch_objects). Once only.
    PrefetchResult finish_into(OstreeRepo* repo, bool sync_while_fetching);

private:
    struct State;
    std::unique_ptr<State> m_state;
};

// What libostree's pull of `commit` (named by `remote`:`ref`) would still
// do once the prefetch brought every object over HTTP, for a remote whose
// commits are not signature-checked and that has no collection ID: checks
// the commit's ref binding, writes the commit and its detached metadata,
// and sets the ref, in one transaction.
// Returns false, having written nothing, when the prefetch was not
// complete (libostree's pull then does it all).
bool record_prefetched_commit(OstreeRepo* repo, const std::string& remote, const std::string& ref,
                              const std::string& commit, const PrefetchResult& prefetched);

} // namespace treeflash::flasher
