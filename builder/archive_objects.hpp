#pragma once

// Content objects of an archive repository, compressed by treeflash.
//
// An archive object (objects/XX/REST.filez) is a length-prefixed file
// header followed by the file's bytes as a raw deflate stream. Any
// conforming encoder may write that stream; libostree uses zlib, treeflash
// libdeflate, which compresses a whole buffer about three times as fast at
// the same ratio. Objects are staged in a folder of their own under the
// repository's tmp/, flushed with one syncfs, then renamed into objects/:
// an interrupted build leaves no object that is not whole.

#include "common/byte_buffer.hpp"
#include "common/fs.hpp"
#include "common/fd.hpp"

#include <cstdint>
#include <memory>
#include <mutex>
#include <ostree.h>
#include <span>
#include <string>
#include <vector>

struct libdeflate_compressor;

namespace treeflash::builder {

// One libdeflate compressor (not thread-safe: one per worker).
class DeflateCompressor {
public:
    explicit DeflateCompressor(int level);
    ~DeflateCompressor();
    DeflateCompressor(const DeflateCompressor&) = delete;
    DeflateCompressor& operator=(const DeflateCompressor&) = delete;

    // `input` as one raw deflate stream, in `output`.
    std::span<const unsigned char> compress(std::span<const unsigned char> input, ByteBuffer& output);

private:
    libdeflate_compressor* m_compressor;
};

// The largest file compressed as one buffer; bigger ones are streamed
// through libostree, so memory stays bounded.
constexpr uint64_t whole_buffer_limit = 128ull << 20;

class ArchiveObjectWriter {
public:
    // `repo` must be an archive repository; objects are staged under
    // `repo_path`/tmp.
    ArchiveObjectWriter(OstreeRepo* repo, const std::filesystem::path& repo_path);
    ArchiveObjectWriter(const ArchiveObjectWriter&) = delete;
    ArchiveObjectWriter& operator=(const ArchiveObjectWriter&) = delete;

    // The repository's compression level (archive.zlib-level, default 6).
    int level() const { return m_level; }

    // Stages the object `checksum`: `header` is the archive file header
    // (objects::archive_file_header), `content` a regular file's bytes (empty for a
    // symlink, whose object is its header alone). False when this writer
    // already staged the same object.
    bool stage(const std::string& checksum, std::span<const unsigned char> header,
               std::span<const unsigned char> content, bool regular, DeflateCompressor& compressor,
               ByteBuffer& scratch);

    // Flushes every staged object to disk, then renames each into objects/.
    // Until then the repository has none of them.
    void publish();

private:
    int m_level = 6;
    UniqueFd m_objects;
    fs::TempDir m_staging;
    UniqueFd m_staging_fd;
    std::mutex m_lock;
    std::vector<std::string> m_staged;
};

// The prefix of staging folders under a repository's tmp/ (what a killed
// build leaves there).
inline constexpr const char* archive_staging_prefix = "treeflash-objects-";

} // namespace treeflash::builder
