#include "builder/archive_objects.hpp"

#include "common/error.hpp"
#include "common/glib.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstdio>
#include <fcntl.h>
#include <libdeflate.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::builder {

namespace {

// The repository's archive.zlib-level, read as libostree reads it: a
// number clamped to 1..9, 6 when absent.
int configured_level(OstreeRepo* repo)
{
    GKeyFile* config = ostree_repo_get_config(repo); // borrowed
    std::string text = glib::take_string(g_key_file_get_value(config, "archive", "zlib-level", nullptr));
    if (text.empty())
        return 6;
    unsigned long long level = std::strtoull(text.c_str(), nullptr, 10);
    return static_cast<int>(std::max(1ull, std::min(9ull, level)));
}

} // namespace

DeflateCompressor::DeflateCompressor(int level) : m_compressor(libdeflate_alloc_compressor(level))
{
    if (!m_compressor)
        throw Error("libdeflate: cannot make a compressor of level " + std::to_string(level));
}

DeflateCompressor::~DeflateCompressor()
{
    libdeflate_free_compressor(m_compressor);
}

std::span<const unsigned char> DeflateCompressor::compress(std::span<const unsigned char> input, ByteBuffer& output)
{
    size_t bound = libdeflate_deflate_compress_bound(m_compressor, input.size());
    unsigned char* out = output.reserve(bound);
    size_t size = libdeflate_deflate_compress(m_compressor, input.data(), input.size(), out, bound);
    if (size == 0) // cannot happen with a buffer of the bound's size
        throw Error("libdeflate: compressed data did not fit its bound");
    return {out, size};
}

ArchiveObjectWriter::ArchiveObjectWriter(OstreeRepo* repo, const std::filesystem::path& repo_path)
    : m_level(configured_level(repo)), m_staging(repo_path / "tmp", archive_staging_prefix)
{
    m_objects.reset(::openat(ostree_repo_get_dfd(repo), "objects", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!m_objects)
        throw_errno("open " + (repo_path / "objects").string());
    m_staging_fd.reset(::open(m_staging.path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!m_staging_fd)
        throw_errno("open " + m_staging.path().string());
    // Staged as in objects/, in a folder per first byte: 200,000 new files
    // in one folder queue the writers on its lock and its inode group.
    for (unsigned byte = 0; byte < 256; ++byte) {
        char prefix[3];
        std::snprintf(prefix, sizeof prefix, "%02x", byte);
        if (::mkdirat(m_staging_fd.get(), prefix, 0700) != 0)
            throw_errno("create " + (m_staging.path() / prefix).string());
    }
}

bool ArchiveObjectWriter::stage(const std::string& checksum, std::span<const unsigned char> header,
                                std::span<const unsigned char> content, bool regular, DeflateCompressor& compressor,
                                ByteBuffer& scratch)
{
    std::string name = checksum.substr(0, 2) + "/" + checksum.substr(2) + ".filez";
    UniqueFd fd(::openat(m_staging_fd.get(), name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (!fd) {
        if (errno == EEXIST) // the same content twice in one tree
            return false;
        throw_errno("create " + (m_staging.path() / name).string());
    }
    // Served to others: readable whatever the umask (as libostree does).
    if (::fchmod(fd.get(), 0644) != 0)
        throw_errno("chmod " + (m_staging.path() / name).string());
    fs::write_at(fd.get(), reinterpret_cast<const char*>(header.data()), header.size(), 0, name);
    if (regular) {
        std::span<const unsigned char> compressed = compressor.compress(content, scratch);
        fs::write_at(fd.get(), reinterpret_cast<const char*>(compressed.data()), compressed.size(), header.size(), name);
    }
    std::lock_guard guard(m_lock);
    m_staged.push_back(checksum);
    return true;
}

void ArchiveObjectWriter::publish()
{
    std::lock_guard guard(m_lock);
    if (m_staged.empty())
        return;
    // Every object's bytes reach the disk before any is renamed into
    // objects/: after a crash an object is whole or absent.
    if (::syncfs(m_staging_fd.get()) != 0)
        throw_errno("sync " + m_staging.path().string());
    for (const auto& checksum : m_staged) {
        std::string prefix = checksum.substr(0, 2);
        if (::mkdirat(m_objects.get(), prefix.c_str(), 0777) != 0 && errno != EEXIST) // less the umask, as libostree
            throw_errno("create objects/" + prefix);
        std::string to = prefix + "/" + checksum.substr(2) + ".filez";
        const std::string& from = to; // the same name under the staging folder
        // An object already there has the same content by its name: keep it.
        // File systems without RENAME_NOREPLACE (NFS, some FUSE) get a plain
        // rename, as libostree does: same name, same bytes.
        int rc = ::renameat2(m_staging_fd.get(), from.c_str(), m_objects.get(), to.c_str(), RENAME_NOREPLACE);
        if (rc != 0 && (errno == EINVAL || errno == ENOSYS))
            rc = ::renameat(m_staging_fd.get(), from.c_str(), m_objects.get(), to.c_str());
        if (rc != 0 && errno != EEXIST)
            throw_errno("move object " + checksum + " into objects/");
    }
    m_staged.clear();
}

} // namespace treeflash::builder
