#include "common/ostree_objects.hpp"

#include "common/error.hpp"
#include "common/glib.hpp"
#include "common/sha256.hpp"

#include <cstdint>

namespace treeflash::objects {

std::vector<unsigned char> read_length_prefixed_header(GInputStream* stream, GCancellable* cancellable)
{
    GError* error = nullptr;
    std::vector<unsigned char> header(8);
    gsize got = 0;
    if (!g_input_stream_read_all(stream, header.data(), header.size(), &got, cancellable, &error))
        throw_gerror(error, "file header");
    if (got != header.size())
        throw Error("file header: short stream");
    uint32_t size = (uint32_t{header[0]} << 24) | (uint32_t{header[1]} << 16) | (uint32_t{header[2]} << 8) | header[3];
    header.resize(8 + size);
    if (!g_input_stream_read_all(stream, header.data() + 8, size, &got, cancellable, &error))
        throw_gerror(error, "file header");
    if (got != size)
        throw Error("file header: short stream");
    return header;
}

std::vector<unsigned char> content_header(GFileInfo* info, GVariant* xattrs, GCancellable* cancellable)
{
    GError* error = nullptr;
    glib::Object<GInputStream> empty(g_memory_input_stream_new());
    GInputStream* raw = nullptr;
    guint64 length = 0;
    if (!ostree_raw_file_to_content_stream(g_file_info_get_file_type(info) == G_FILE_TYPE_REGULAR ? empty.get() : nullptr,
                                           info, xattrs, &raw, &length, cancellable, &error))
        throw_gerror(error, "file header");
    glib::Object<GInputStream> stream(raw);
    return read_length_prefixed_header(stream.get(), cancellable);
}

std::vector<unsigned char> archive_file_header(GFileInfo* info, GVariant* xattrs, GCancellable* cancellable)
{
    // libostree's archive stream of an empty input: the header, then an
    // empty deflate stream that is not read.
    GError* error = nullptr;
    glib::Object<GInputStream> empty(g_memory_input_stream_new());
    GInputStream* raw = nullptr;
    if (!ostree_raw_file_to_archive_z2_stream(empty.get(), info, xattrs, &raw, cancellable, &error))
        throw_gerror(error, "archive file header");
    glib::Object<GInputStream> stream(raw);
    return read_length_prefixed_header(stream.get(), cancellable);
}

std::string content_checksum(GFileInfo* info, GVariant* xattrs, std::span<const unsigned char> content,
                             GCancellable* cancellable)
{
    std::vector<unsigned char> header = content_header(info, xattrs, cancellable);
    Sha256 sha;
    sha.update(header.data(), header.size());
    sha.update(content.data(), content.size());
    return sha.hex();
}

std::string content_checksum(GFileInfo* info, GVariant* xattrs, GInputStream* content, GCancellable* cancellable)
{
    std::vector<unsigned char> header = content_header(info, xattrs, cancellable);
    Sha256 sha;
    sha.update(header.data(), header.size());
    std::vector<unsigned char> buffer(256 * 1024);
    GError* error = nullptr;
    for (;;) {
        gssize n = g_input_stream_read(content, buffer.data(), buffer.size(), cancellable, &error);
        if (n < 0)
            throw_gerror(error, "read");
        if (n == 0)
            break;
        sha.update(buffer.data(), static_cast<size_t>(n));
    }
    return sha.hex();
}

Transaction::Transaction(OstreeRepo* repo, GCancellable* cancellable) : m_repo(repo)
{
    GError* error = nullptr;
    if (!ostree_repo_prepare_transaction(repo, nullptr, cancellable, &error))
        throw_gerror(error, "prepare transaction");
    m_open = true;
}

Transaction::~Transaction()
{
    if (m_open)
        ostree_repo_abort_transaction(m_repo, nullptr, nullptr);
}

void Transaction::commit(GCancellable* cancellable)
{
    GError* error = nullptr;
    if (!ostree_repo_commit_transaction(m_repo, nullptr, cancellable, &error))
        throw_gerror(error, "commit transaction");
    m_open = false;
}

} // namespace treeflash::objects
