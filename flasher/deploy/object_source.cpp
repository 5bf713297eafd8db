#include "flasher/deploy/object_source.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/sha256.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <curl/curl.h>
#include <fcntl.h>
#include <filesystem>
#include <mutex>
#include <ostree.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// An archive repository in a local folder. Files are opened below it one
// component at a time without following symlinks: the folder may belong
// to someone else.
class LocalSource : public ObjectSource {
public:
    explicit LocalSource(std::shared_ptr<UniqueFd> repo) : m_repo(std::move(repo)) {}

    std::span<const unsigned char> fetch(const std::string& path, size_t limit, ByteBuffer& into,
                                         GCancellable*) override
    {
        UniqueFd file;
        try {
            file = fs::open_beneath(m_repo->get(), path, O_RDONLY | O_NONBLOCK);
        } catch (const Error& e) {
            if (missing(path))
                throw SourceMissing{path + ": no such file"};
            throw SourceStop{e.what()};
        }
        struct stat st {};
        if (::fstat(file.get(), &st) != 0 || !S_ISREG(st.st_mode))
            throw SourceStop{path + ": not a regular file"};
        if (static_cast<uint64_t>(st.st_size) > limit)
            throw SourceTooBig();
        size_t size = static_cast<size_t>(st.st_size);
        unsigned char* bytes = into.reserve(size);
        try {
            fs::read_at(file.get(), reinterpret_cast<char*>(bytes), size, 0, path);
        } catch (const Error& e) {
            throw SourceStop{e.what()};
        }
        return {bytes, size};
    }

private:
    // Whether `path` names nothing: its folder opens beneath the repository
    // and holds no entry of that name.
    bool missing(const std::string& path) const
    {
        std::filesystem::path relative(path);
        try {
            UniqueFd dir = fs::open_beneath(m_repo->get(), relative.parent_path().string(), O_RDONLY | O_DIRECTORY);
            struct stat st {};
            return ::fstatat(dir.get(), relative.filename().c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT;
        } catch (const Error&) {
            return false;
        }
    }

    std::shared_ptr<UniqueFd> m_repo;
};

// An archive repository served over plain HTTP: one easy handle, and so
// one keep-alive connection, per thread.
class HttpSource : public ObjectSource {
public:
    HttpSource(std::string base, unsigned timeout) : m_base(std::move(base)), m_timeout(timeout), m_curl(curl_easy_init())
    {
        if (!m_curl)
            throw SourceStop{"libcurl: no handle"};
        CURL* c = m_curl.get();
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http");
        curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L); // a redirect is left to libostree
        curl_easy_setopt(c, CURLOPT_USERAGENT, "treeflash");
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, static_cast<long>(timeout));
        // A server that stops sending for `timeout` seconds fails the request.
        curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
        curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, static_cast<long>(timeout));
        curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, &HttpSource::header);
        curl_easy_setopt(c, CURLOPT_HEADERDATA, this);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &HttpSource::receive);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, this);
        curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, &HttpSource::check_cancelled);
        curl_easy_setopt(c, CURLOPT_XFERINFODATA, this);
    }

    std::span<const unsigned char> fetch(const std::string& path, size_t limit, ByteBuffer& into,
                                         GCancellable* cancellable) override
    {
        std::string url = m_base + path;
        CURL* c = m_curl.get();
        curl_easy_setopt(c, CURLOPT_URL, url.c_str());
        curl_easy_setopt(c, CURLOPT_MAXFILESIZE_LARGE, static_cast<curl_off_t>(limit));
        m_into = &into;
        m_size = 0;
        m_room = 0;
        m_limit = limit;
        m_cancellable = cancellable;
        m_too_big = false;
        m_failed.clear();
        CURLcode code = curl_easy_perform(c);
        if (cancellable && g_cancellable_is_cancelled(cancellable))
            throw Cancelled();
        if (code == CURLE_FILESIZE_EXCEEDED || m_too_big)
            throw SourceTooBig();
        if (!m_failed.empty())
            throw SourceStop{url + ": " + m_failed};
        if (code == CURLE_OPERATION_TIMEDOUT) {
            curl_off_t connected = 0;
            curl_easy_getinfo(c, CURLINFO_CONNECT_TIME_T, &connected);
            std::string seconds = std::to_string(m_timeout) + " s";
            throw SourceStalled{url + (connected ? ": nothing arrived for " + seconds + " (the server accepted the connection)"
                                                 : ": no connection within " + seconds)};
        }
        if (code != CURLE_OK)
            throw SourceStop{url + ": " + curl_easy_strerror(code)};
        long status = 0;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
        if (status == 404 || status == 403 || status == 410)
            throw SourceMissing{url + ": HTTP " + std::to_string(status)};
        if (status != 200)
            throw SourceStop{url + ": HTTP " + std::to_string(status)};
        return {into.data(), m_size};
    }

private:
    // Room for the whole body as soon as its length is announced, rather
    // than doubling (and copying) as it arrives.
    static size_t header(char* data, size_t size, size_t count, void* user) noexcept
    {
        auto* self = static_cast<HttpSource*>(user);
        size_t n = size * count;
        constexpr std::string_view name = "content-length:";
        if (n <= name.size() || ::strncasecmp(data, name.data(), name.size()) != 0)
            return n;
        unsigned long long length = std::strtoull(std::string(data + name.size(), n - name.size()).c_str(), nullptr, 10);
        if (length > self->m_room && length <= self->m_limit) {
            try {
                self->m_into->grow(static_cast<size_t>(length), self->m_size);
                self->m_room = static_cast<size_t>(length);
            } catch (const std::bad_alloc&) {
                // Grown as the bytes arrive instead, which says so if it fails.
            }
        }
        return n;
    }

    // libcurl's write callback: no exception may cross it.
    static size_t receive(char* data, size_t size, size_t count, void* user) noexcept
    {
        auto* self = static_cast<HttpSource*>(user);
        size_t n = size * count;
        if (self->m_size + n > self->m_limit) {
            self->m_too_big = true;
            return 0; // fails the transfer
        }
        try {
            if (self->m_size + n > self->m_room) {
                self->m_room = std::min(self->m_limit, std::max(self->m_size + n, std::max<size_t>(self->m_room * 2, 256 * 1024)));
                self->m_into->grow(self->m_room, self->m_size);
            }
        } catch (const std::bad_alloc&) {
            self->m_failed = "out of memory";
            return 0;
        }
        std::memcpy(self->m_into->data() + self->m_size, data, n);
        self->m_size += n;
        return n;
    }

    void watch(const std::atomic<bool>* halted) override { m_halted = halted; }

    static int check_cancelled(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t)
    {
        auto* self = static_cast<HttpSource*>(user);
        if (self->m_halted && *self->m_halted)
            return 1;
        return self->m_cancellable && g_cancellable_is_cancelled(self->m_cancellable) ? 1 : 0;
    }

    struct CurlFree {
        void operator()(CURL* c) const { curl_easy_cleanup(c); }
    };
    std::string m_base;
    unsigned m_timeout;
    std::unique_ptr<CURL, CurlFree> m_curl;
    ByteBuffer* m_into = nullptr;
    size_t m_size = 0;
    size_t m_room = 0;
    size_t m_limit = 0;
    bool m_too_big = false;
    std::string m_failed;
    GCancellable* m_cancellable = nullptr;
    const std::atomic<bool>* m_halted = nullptr;
};

bool proxy_configured()
{
    for (const char* name : {"http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"})
        if (const char* value = std::getenv(name); value && *value)
            return true;
    return false;
}

} // namespace

std::function<std::unique_ptr<ObjectSource>()> object_sources(const std::string& url, unsigned network_timeout)
{
    if (url.rfind("file://", 0) == 0) {
        std::string path = url.substr(7);
        auto repo = std::make_shared<UniqueFd>(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (!*repo)
            return {};
        return [repo] { return std::make_unique<LocalSource>(repo); };
    }
    if (url.rfind("http://", 0) != 0 || proxy_configured())
        return {};
    // Credentials in the URL are libostree's to send.
    size_t slash = url.find('/', 7);
    std::string authority = url.substr(7, slash == std::string::npos ? std::string::npos : slash - 7);
    if (authority.find('@') != std::string::npos)
        return {};
    std::string base = url.back() == '/' ? url : url + "/";
    static std::once_flag curl_ready;
    std::call_once(curl_ready, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
    return [base, network_timeout] { return std::make_unique<HttpSource>(base, network_timeout); };
}

bool is_archive(ObjectSource& source, GCancellable* cancellable)
{
    ByteBuffer buffer;
    std::span<const unsigned char> config;
    try {
        config = source.fetch("config", 64 * 1024, buffer, cancellable);
    } catch (const SourceStalled&) {
        throw;
    } catch (const SourceStop&) {
        return false;
    } catch (const SourceTooBig&) {
        return false;
    }
    glib::KeyFile keys(g_key_file_new());
    if (!g_key_file_load_from_data(keys.get(), reinterpret_cast<const char*>(config.data()), config.size(),
                                   G_KEY_FILE_NONE, nullptr))
        return false;
    std::string mode = glib::take_string(g_key_file_get_string(keys.get(), "core", "mode", nullptr));
    return mode == "archive-z2" || mode == "archive";
}

std::string checksum_hex(GVariant* bytes)
{
    gsize size = 0;
    const void* data = g_variant_get_fixed_array(bytes, &size, 1);
    if (size != 32)
        throw SourceStop{"a checksum of " + std::to_string(size) + " bytes"};
    return glib::take_string(ostree_checksum_from_bytes(static_cast<const guchar*>(data)));
}

std::string loose_object_path(const std::string& checksum, const char* extension)
{
    return "objects/" + checksum.substr(0, 2) + "/" + checksum.substr(2) + "." + extension;
}

glib::Variant checked_metadata(std::span<const unsigned char> bytes, const std::string& checksum, MetadataKind kind)
{
    Sha256 sha;
    sha.update(bytes.data(), bytes.size());
    if (sha.hex() != checksum)
        throw SourceStop{"object " + checksum + ": its bytes do not match its checksum"};
    const GVariantType* type = kind == MetadataKind::Commit    ? OSTREE_COMMIT_GVARIANT_FORMAT
                               : kind == MetadataKind::DirTree ? OSTREE_TREE_GVARIANT_FORMAT
                                                               : OSTREE_DIRMETA_GVARIANT_FORMAT;
    gpointer copy = g_memdup2(bytes.data(), bytes.size());
    glib::Variant variant = glib::adopt_variant(g_variant_new_from_data(type, copy, bytes.size(), FALSE, g_free, copy));
    if (!g_variant_is_normal_form(variant.get()))
        throw SourceStop{"object " + checksum + ": not in normal form"};
    GError* error = nullptr;
    gboolean valid = kind == MetadataKind::Commit    ? ostree_validate_structureof_commit(variant.get(), &error)
                     : kind == MetadataKind::DirTree ? ostree_validate_structureof_dirtree(variant.get(), &error)
                                                     : ostree_validate_structureof_dirmeta(variant.get(), &error);
    if (!valid) {
        glib::ErrorPtr owned(error);
        throw SourceStop{"object " + checksum + ": " + (owned ? owned->message : "invalid")};
    }
    return variant;
}

void check_ref_binding(GVariant* commit_object, const std::string& commit, const std::string& ref)
{
    glib::Variant metadata(g_variant_get_child_value(commit_object, 0));
    const char** bound = nullptr;
    if (!g_variant_lookup(metadata.get(), OSTREE_COMMIT_META_KEY_REF_BINDING, "^a&s", &bound))
        return;
    std::unique_ptr<const char*, glib::Free> owned(bound);
    std::string names;
    bool found = false;
    for (const char** name = bound; *name; ++name) {
        found = found || ref == *name;
        names += (names.empty() ? "" : ", ") + std::string(*name);
    }
    if (!found)
        throw Error("commit " + commit + " is bound to the refs " + (names.empty() ? "(none)" : names) + ", not to " + ref);
}

} // namespace treeflash::flasher
