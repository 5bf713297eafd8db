// Files of an archive repository, read without libostree: from a local
// folder, or over plain HTTP through libcurl (the library libostree fetches
// with). The prefetch reads objects through it; the plan reads a ref and
// its commit. Whatever it cannot read is left to libostree's pull, which
// reads it again and reports it in its own words.
#pragma once

#include "common/byte_buffer.hpp"
#include "common/glib.hpp"

#include <atomic>
#include <exception>
#include <functional>
#include <memory>
#include <span>
#include <string>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

// Why a read failed: the file, and what was wrong.
struct SourceStop : std::exception {
    explicit SourceStop(std::string text) : why(std::move(text)) {}
    const char* what() const noexcept override { return why.c_str(); }
    std::string why;
};

// The file is not there (HTTP 404, 403 or 410, as libostree reads them;
// or no such file).
struct SourceMissing : SourceStop {
    using SourceStop::SourceStop;
};

// The server did not answer for the network timeout: it did not accept
// the connection, or accepted it and then sent nothing.
struct SourceStalled : SourceStop {
    using SourceStop::SourceStop;
};

// The file is bigger than the caller's limit.
struct SourceTooBig : std::exception {};

// Where an archive repository's files come from: one per thread (an HTTP
// session is used by one thread only).
class ObjectSource {
public:
    virtual ~ObjectSource() = default;
    // The file at `path` (relative to the repository), at most `limit`
    // bytes, read into `into`. Throws SourceStop (or one of its kinds) when
    // it cannot be had, SourceTooBig past the limit, Cancelled once
    // `cancellable` is.
    virtual std::span<const unsigned char> fetch(const std::string& path, size_t limit, ByteBuffer& into,
                                                 GCancellable* cancellable) = 0;
    // A flag that, once set, ends a fetch under way.
    virtual void watch(const std::atomic<bool>*) {}
};

// Makes a source for each thread that reads; empty when `url` is not one
// read here (https, a proxy configured, credentials in the URL: those stay
// libostree's), or a local folder that cannot be opened.
// `network_timeout`: seconds an HTTP request may stay silent.
std::function<std::unique_ptr<ObjectSource>()> object_sources(const std::string& url, unsigned network_timeout);

// Whether the repository's config names an archive mode (the only one whose
// objects are read here). Throws SourceStalled when the server stays silent.
bool is_archive(ObjectSource& source, GCancellable* cancellable);

// The hex form of a checksum held as bytes ("ay") in a metadata object;
// throws SourceStop unless it has 32 bytes.
std::string checksum_hex(GVariant* bytes);

// objects/AB/CDEF....EXTENSION
std::string loose_object_path(const std::string& checksum, const char* extension);

// The most a metadata object (or a summary) may weigh, as libostree's pull
// allows by default.
constexpr size_t largest_metadata_object = 10u << 20;

enum class MetadataKind { Commit, DirTree, DirMeta };

// A metadata object's bytes as a variant, checked as libostree's pull
// checks what it fetches: its SHA-256 must be `checksum`, it must be in
// normal form (libostree stores the bytes as they are; any other form would
// be stored under a name it does not have), and its structure valid (file
// names, checksums' lengths). Throws SourceStop.
glib::Variant checked_metadata(std::span<const unsigned char> bytes, const std::string& checksum, MetadataKind kind);

// Throws an Error, as libostree's pull refuses it, when the commit `commit`
// (its variant) is bound to refs and `ref` is not one of them: a server
// cannot pass off another branch's commit as this ref's.
void check_ref_binding(GVariant* commit_object, const std::string& commit, const std::string& ref);

} // namespace treeflash::flasher
