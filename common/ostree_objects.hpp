// OSTree object formats both halves need: the file headers libostree
// serializes, content checksums computed with OpenSSL, and a repository
// transaction that aborts unless committed.
#pragma once

#include <ostree.h>
#include <span>
#include <string>
#include <vector>

namespace treeflash::objects {

// The length-prefixed header a libostree stream starts with (a 32-bit
// big-endian size, 4 bytes of padding, then that many bytes), read whole.
std::vector<unsigned char> read_length_prefixed_header(GInputStream* stream, GCancellable* cancellable);

// The file header an OSTree content checksum starts with (uid, gid, mode,
// rdev, symlink target, xattrs), taken from the content stream libostree
// makes of `info` and `xattrs`.
std::vector<unsigned char> content_header(GFileInfo* info, GVariant* xattrs, GCancellable* cancellable);

// The archive file header libostree writes before an archive object's
// compressed bytes (the same fields and the file's size).
std::vector<unsigned char> archive_file_header(GFileInfo* info, GVariant* xattrs, GCancellable* cancellable);

// The OSTree content checksum of a file or symlink, as
// ostree_checksum_file_from_input computes it: SHA-256 of content_header
// followed by the file's bytes (none for a symlink). OpenSSL's SHA-256 uses
// the CPU's SHA instructions; GLib's, which libostree uses, does not.
std::string content_checksum(GFileInfo* info, GVariant* xattrs, std::span<const unsigned char> content,
                             GCancellable* cancellable);

// The same for a file read as a stream (too big to hold in memory).
std::string content_checksum(GFileInfo* info, GVariant* xattrs, GInputStream* content, GCancellable* cancellable);

// A transaction on `repo` (ostree_repo_prepare_transaction), aborted when
// it goes away uncommitted, so a failure leaves no staged objects behind.
class Transaction {
public:
    Transaction(OstreeRepo* repo, GCancellable* cancellable);
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    ~Transaction();
    void commit(GCancellable* cancellable);

private:
    OstreeRepo* m_repo;
    bool m_open = false;
};

} // namespace treeflash::objects
