#include "flasher/deploy/prefetch.hpp"

#include "common/byte_buffer.hpp"
#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/memory_budget.hpp"
#include "common/glib.hpp"
#include "common/ostree_objects.hpp"
#include "common/sha256.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <stop_token>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <cstring>
#include <fcntl.h>
#include <functional>
#include <libdeflate.h>
#include <curl/curl.h>
#include <memory>
#include <mutex>
#include <optional>
#include <ostree.h>
#include <set>
#include <span>
#include <string_view>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace treeflash::flasher {

namespace {

// Objects bigger than these (as fetched, or inflated) are left to
// libostree, which streams them; together the workers hold at most
// `inflated_budget` of inflated files at once (each worker's fetch buffer
// comes on top), whatever the server sends.
constexpr size_t largest_fetched = 64u << 20;
constexpr size_t largest_inflated = 128u << 20;
constexpr uint64_t inflated_budget = 256u << 20;
constexpr size_t largest_metadata = 64u << 20;
// A worker keeps buffers up to this size between objects.
constexpr size_t kept_buffer = 4u << 20;
constexpr uint64_t flush_every = 32u << 20;

// Why the prefetch stops: the object it could not take, and what was wrong.
struct Stop : std::exception {
    explicit Stop(std::string text) : why(std::move(text)) {}
    const char* what() const noexcept override { return why.c_str(); }
    std::string why;
};

// An object the prefetch leaves to libostree without stopping: too big to
// hold in memory.
struct Skip : std::exception {};

// A GError's message; the error is freed.
std::string message_of(GError*& error)
{
    glib::ErrorPtr owned(std::exchange(error, nullptr));
    return owned ? owned->message : "unknown error";
}

std::string loose_path(const std::string& checksum, const char* extension)
{
    return "objects/" + checksum.substr(0, 2) + "/" + checksum.substr(2) + "." + extension;
}

// Where objects come from: one per worker (an HTTP session is used by one
// thread only).
class ObjectSource {
public:
    virtual ~ObjectSource() = default;
    // The file at `path` (relative to the repository), at most `limit`
    // bytes, read into `into`; throws Stop when it cannot be had.
    virtual std::span<const unsigned char> fetch(const std::string& path, size_t limit, ByteBuffer& into,
                                                 GCancellable* cancellable) = 0;
    // A flag that, once set, ends a fetch under way (the prefetch stopped).
    virtual void watch(const std::atomic<bool>*) {}
};

// An archive repository in a local folder. Objects are opened below it
// one component at a time without following symlinks: the folder may
// belong to someone else.
class LocalSource : public ObjectSource {
public:
    explicit LocalSource(int repo_fd) : m_repo(repo_fd) {}

    std::span<const unsigned char> fetch(const std::string& path, size_t limit, ByteBuffer& into,
                                         GCancellable*) override
    {
        UniqueFd file;
        try {
            file = fs::open_beneath(m_repo, path, O_RDONLY | O_NONBLOCK);
        } catch (const Error& e) {
            throw Stop{e.what()};
        }
        struct stat st {};
        if (::fstat(file.get(), &st) != 0 || !S_ISREG(st.st_mode))
            throw Stop{path + ": not a regular file"};
        if (static_cast<uint64_t>(st.st_size) > limit)
            throw Skip();
        size_t size = static_cast<size_t>(st.st_size);
        unsigned char* bytes = into.reserve(size);
        try {
            fs::read_at(file.get(), reinterpret_cast<char*>(bytes), size, 0, path);
        } catch (const Error& e) {
            throw Stop{e.what()};
        }
        return {bytes, size};
    }

private:
    int m_repo;
};

// An archive repository served over plain HTTP, through libcurl (the
// library libostree fetches with): one easy handle, and so one keep-alive
// connection, per worker.
class HttpSource : public ObjectSource {
public:
    HttpSource(std::string base, unsigned timeout) : m_base(std::move(base)), m_curl(curl_easy_init())
    {
        if (!m_curl)
            throw Stop{"libcurl: no handle"};
        CURL* c = m_curl.get();
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http");
        curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L); // a redirect is left to libostree
        curl_easy_setopt(c, CURLOPT_USERAGENT, "treeflash");
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, static_cast<long>(timeout));
        // A server that stops sending for `timeout` seconds fails the request.
        curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
        curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, static_cast<long>(timeout));
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
            throw Skip();
        if (!m_failed.empty())
            throw Stop{url + ": " + m_failed};
        if (code != CURLE_OK)
            throw Stop{url + ": " + curl_easy_strerror(code)};
        long status = 0;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
        if (status != 200)
            throw Stop{url + ": HTTP " + std::to_string(status)};
        return {into.data(), m_size};
    }

private:
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

struct DecompressorFree {
    void operator()(libdeflate_decompressor* d) const { libdeflate_free_decompressor(d); }
};

enum class Kind { DirTree, DirMeta, File };

// What a worker reuses from one object to the next.
struct Buffers {
    ByteBuffer fetched;
    ByteBuffer content;
};

struct Item {
    Kind kind;
    std::string checksum;
    std::string path = {}; // of a dirtree, as first met
};

// The order objects are taken in: the folders first (so every file is
// known early), then the boot files (the kernel and initramfs, the biggest
// files of most commits: started early, they do not finish last on one
// core), then everything else.
enum Priority { folders, boot_files, other_files, priorities };

Priority priority_of(const Item& item, const std::string& folder)
{
    if (item.kind != Kind::File)
        return folders;
    bool module_folder = folder.rfind("usr/lib/modules/", 0) == 0
                         && folder.find('/', std::string_view("usr/lib/modules/").size()) == std::string::npos;
    return folder == "usr/lib/ostree-boot" || module_folder ? boot_files : other_files;
}

std::string hex_of(GVariant* bytes)
{
    gsize size = 0;
    const void* data = g_variant_get_fixed_array(bytes, &size, 1);
    if (size != 32)
        throw Stop{"a checksum of " + std::to_string(size) + " bytes"};
    return glib::take_string(ostree_checksum_from_bytes(static_cast<const guchar*>(data)));
}

// A metadata object's bytes as a variant, checked: its SHA-256 must be
// its name, and it must be in normal form (libostree writes the variant's
// bytes; any other form would be stored under a name it does not have).
glib::Variant checked_metadata(std::span<const unsigned char> bytes, const std::string& checksum,
                               const GVariantType* type)
{
    Sha256 sha;
    sha.update(bytes.data(), bytes.size());
    if (sha.hex() != checksum)
        throw Stop{"object " + checksum + ": its bytes do not match its checksum"};
    gpointer copy = g_memdup2(bytes.data(), bytes.size());
    glib::Variant variant = glib::adopt_variant(g_variant_new_from_data(type, copy, bytes.size(), FALSE, g_free, copy));
    if (!g_variant_is_normal_form(variant.get()))
        throw Stop{"object " + checksum + ": not in normal form"};
    return variant;
}

bool proxy_configured()
{
    for (const char* name : {"http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"})
        if (const char* value = std::getenv(name); value && *value)
            return true;
    return false;
}

class Prefetch {
public:
    Prefetch(OstreeRepo* repo, std::function<std::unique_ptr<ObjectSource>()> make_source, GCancellable* cancellable)
        : m_repo(repo), m_make_source(std::move(make_source)), m_cancellable(cancellable)
    {
    }

    void run(const std::string& commit, unsigned jobs, bool sync_while_fetching, PrefetchResult& result)
    {
        // The commit is read, checked against its name, never written.
        try {
            auto source = m_make_source();
            ByteBuffer buffer;
            auto bytes = source->fetch(loose_path(commit, "commit"), largest_metadata, buffer, m_cancellable);
            glib::Variant variant = checked_metadata(bytes, commit, OSTREE_COMMIT_GVARIANT_FORMAT);
            glib::Variant contents(g_variant_get_child_value(variant.get(), 6));
            glib::Variant meta(g_variant_get_child_value(variant.get(), 7));
            add({Kind::DirTree, hex_of(contents.get()), ""}, "");
            add({Kind::DirMeta, hex_of(meta.get())}, "");
        } catch (const Stop& stop) {
            result.stopped = stop.why;
            return;
        } catch (const Skip&) {
            result.stopped = "the commit object is too big to hold in memory";
            return;
        }
        // The card is written while objects still arrive: every 32 MiB
        // fetched, the repository's file system is synced on a thread of its
        // own, rather than all at once when libostree deploys.
        auto flush = [this](std::stop_token stop) {
            uint64_t flushed = 0;
            std::unique_lock guard(m_lock);
            while (!m_flush_wake.wait_for(guard, stop, std::chrono::milliseconds(50), [&] { return stop.stop_requested(); })) {
                if (m_bytes - flushed < flush_every)
                    continue;
                flushed = m_bytes;
                guard.unlock();
                ::syncfs(ostree_repo_get_dfd(m_repo)); // a failure shows in the final sync
                guard.lock();
            }
        };
        std::jthread flusher;
        if (sync_while_fetching)
            flusher = std::jthread(flush);
        std::vector<std::jthread> workers;
        for (unsigned i = 0; i < jobs; ++i)
            workers.emplace_back([this] { work(); });
        workers.clear(); // joins
        flusher = {};    // stops and joins it
        if (m_cancelled)
            throw Cancelled();
        result.objects = m_written;
        result.bytes = m_bytes;
        result.stopped = m_stopped;
        result.complete = m_stopped.empty();
    }

private:
    // `folder`: where the item was found.
    void add(Item item, const std::string& folder)
    {
        std::lock_guard guard(m_lock);
        if (m_halted)
            return;
        if (!m_seen.insert(static_cast<char>(item.kind) + item.checksum).second)
            return;
        m_queues[priority_of(item, folder)].push_back(std::move(item));
        ++m_pending;
        m_wake.notify_one();
    }

    void stop(const std::string& why)
    {
        std::lock_guard guard(m_lock);
        if (m_stopped.empty())
            m_stopped = why.empty() ? "stopped" : why;
        m_halted = true;
        for (auto& queue : m_queues)
            queue.clear();
        m_wake.notify_all();
    }

    void work()
    {
        std::unique_ptr<ObjectSource> source;
        std::unique_ptr<libdeflate_decompressor, DecompressorFree> inflater(libdeflate_alloc_decompressor());
        Buffers buffers;
        for (;;) {
            Item item;
            {
                std::unique_lock guard(m_lock);
                m_wake.wait(guard, [&] { return queued() || m_pending == 0 || m_halted; });
                if (!queued() || m_halted)
                    return;
                for (auto& queue : m_queues)
                    if (!queue.empty()) {
                        item = std::move(queue.front());
                        queue.pop_front();
                        break;
                    }
            }
            try {
                if (g_cancellable_is_cancelled(m_cancellable))
                    throw Cancelled();
                if (!source) {
                    source = m_make_source();
                    source->watch(&m_halted);
                }
                take(*source, item, inflater.get(), buffers);
            } catch (const Skip&) {
                // libostree's pull fetches it.
            } catch (const Stop& s) {
                stop(s.why);
            } catch (const Cancelled&) {
                m_cancelled = true;
                stop("cancelled");
            } catch (const std::exception& e) {
                // The card's repository refused it (full, say): libostree's
                // pull meets the same and says so with its context.
                stop("object " + item.checksum + ": " + e.what());
            }
            buffers.fetched.shrink(kept_buffer);
            buffers.content.shrink(kept_buffer);
            std::lock_guard guard(m_lock);
            if (--m_pending == 0)
                m_wake.notify_all();
        }
    }

    bool queued() const
    {
        for (const auto& queue : m_queues)
            if (!queue.empty())
                return true;
        return false;
    }

    bool have(OstreeObjectType type, const std::string& checksum)
    {
        GError* error = nullptr;
        gboolean have = FALSE;
        if (!ostree_repo_has_object(m_repo, type, checksum.c_str(), &have, nullptr, &error))
            throw_gerror(error, "look up object " + checksum);
        return have;
    }

    void take(ObjectSource& source, const Item& item, libdeflate_decompressor* inflater, Buffers& buffers)
    {
        GError* error = nullptr;
        switch (item.kind) {
        case Kind::DirMeta: {
            if (have(OSTREE_OBJECT_TYPE_DIR_META, item.checksum))
                return;
            auto bytes = fetched(source, loose_path(item.checksum, "dirmeta"), largest_metadata, buffers.fetched);
            glib::Variant meta = checked_metadata(bytes, item.checksum, OSTREE_DIRMETA_GVARIANT_FORMAT);
            if (!ostree_repo_write_metadata_trusted(m_repo, OSTREE_OBJECT_TYPE_DIR_META, item.checksum.c_str(),
                                                    meta.get(), nullptr, &error))
                throw_gerror(error);
            ++m_written;
            return;
        }
        case Kind::DirTree: {
            glib::Variant tree;
            if (have(OSTREE_OBJECT_TYPE_DIR_TREE, item.checksum)) {
                GVariant* raw = nullptr;
                if (!ostree_repo_load_variant(m_repo, OSTREE_OBJECT_TYPE_DIR_TREE, item.checksum.c_str(), &raw, &error))
                    throw_gerror(error);
                tree.reset(raw); // a full reference already
            } else {
                auto bytes = fetched(source, loose_path(item.checksum, "dirtree"), largest_metadata, buffers.fetched);
                tree = checked_metadata(bytes, item.checksum, OSTREE_TREE_GVARIANT_FORMAT);
                if (!ostree_repo_write_metadata_trusted(m_repo, OSTREE_OBJECT_TYPE_DIR_TREE, item.checksum.c_str(),
                                                        tree.get(), nullptr, &error))
                    throw_gerror(error);
                ++m_written;
            }
            glib::Variant files(g_variant_get_child_value(tree.get(), 0));
            for (gsize i = 0, n = g_variant_n_children(files.get()); i < n; ++i) {
                glib::Variant entry(g_variant_get_child_value(files.get(), i));
                glib::Variant csum(g_variant_get_child_value(entry.get(), 1));
                add({Kind::File, hex_of(csum.get())}, item.path);
            }
            glib::Variant dirs(g_variant_get_child_value(tree.get(), 1));
            for (gsize i = 0, n = g_variant_n_children(dirs.get()); i < n; ++i) {
                glib::Variant entry(g_variant_get_child_value(dirs.get(), i));
                const char* name = nullptr;
                g_variant_get_child(entry.get(), 0, "&s", &name);
                glib::Variant contents(g_variant_get_child_value(entry.get(), 1));
                glib::Variant meta(g_variant_get_child_value(entry.get(), 2));
                std::string path = item.path.empty() ? name : item.path + "/" + name;
                add({Kind::DirTree, hex_of(contents.get()), path}, item.path);
                add({Kind::DirMeta, hex_of(meta.get())}, item.path);
            }
            return;
        }
        case Kind::File:
            if (have(OSTREE_OBJECT_TYPE_FILE, item.checksum))
                return;
            take_file(source, item.checksum, inflater, buffers);
            return;
        }
    }

    std::span<const unsigned char> fetched(ObjectSource& source, const std::string& path, size_t limit,
                                           ByteBuffer& into)
    {
        auto bytes = source.fetch(path, limit, into, m_cancellable);
        m_bytes += bytes.size();
        return bytes;
    }

    // An archive content object: header, then the file's bytes as a raw
    // deflate stream (none for a symlink).
    void take_file(ObjectSource& source, const std::string& checksum, libdeflate_decompressor* inflater,
                   Buffers& buffers)
    {
        auto object = fetched(source, loose_path(checksum, "filez"), largest_fetched, buffers.fetched);
        if (object.size() < 8)
            throw Stop{"object " + checksum + ": shorter than a header"};
        size_t header_size = 8 + ((size_t{object[0]} << 24) | (size_t{object[1]} << 16) | (size_t{object[2]} << 8) | object[3]);
        if (header_size > object.size())
            throw Stop{"object " + checksum + ": a header longer than the object"};
        GError* error = nullptr;
        glib::Object<GInputStream> header_stream(
            g_memory_input_stream_new_from_data(object.data(), static_cast<gssize>(object.size()), nullptr));
        GFileInfo* raw_info = nullptr;
        GVariant* raw_xattrs = nullptr;
        if (!ostree_content_stream_parse(TRUE, header_stream.get(), object.size(), FALSE, nullptr, &raw_info,
                                         &raw_xattrs, nullptr, &error)) {
            throw Stop{"object " + checksum + ": " + message_of(error)};
        }
        glib::Object<GFileInfo> info(raw_info);
        glib::Variant xattrs(raw_xattrs); // a full reference already
        std::span<const unsigned char> bytes;
        MemoryBudget::Grant grant;
        if (g_file_info_get_file_type(info.get()) == G_FILE_TYPE_REGULAR) {
            goffset size = g_file_info_get_size(info.get());
            if (size < 0)
                throw Stop{"object " + checksum + ": a file of " + std::to_string(size) + " bytes"};
            if (static_cast<uint64_t>(size) > largest_inflated)
                throw Skip();
            grant = m_budget.take(static_cast<uint64_t>(size));
            unsigned char* content = buffers.content.reserve(static_cast<size_t>(size));
            // Exactly `size` bytes, or an error (an empty file is checked by
            // its checksum alone).
            if (size > 0
                && libdeflate_deflate_decompress(inflater, object.data() + header_size, object.size() - header_size,
                                                 content, static_cast<size_t>(size), nullptr)
                       != LIBDEFLATE_SUCCESS)
                throw Stop{"object " + checksum + ": its compressed bytes do not inflate to its size"};
            bytes = {content, static_cast<size_t>(size)};
        }
        if (objects::content_checksum(info.get(), xattrs.get(), bytes, nullptr) != checksum)
            throw Stop{"object " + checksum + ": its content does not match its checksum"};
        // Checked: libostree writes it as it is, without hashing it again.
        glib::Object<GInputStream> input;
        if (g_file_info_get_file_type(info.get()) == G_FILE_TYPE_REGULAR)
            input.reset(g_memory_input_stream_new_from_data(bytes.data(), static_cast<gssize>(bytes.size()), nullptr));
        GInputStream* raw_stream = nullptr;
        guint64 length = 0;
        if (!ostree_raw_file_to_content_stream(input.get(), info.get(), xattrs.get(), &raw_stream, &length, nullptr,
                                               &error))
            throw_gerror(error);
        glib::Object<GInputStream> stream(raw_stream);
        if (!ostree_repo_write_content(m_repo, checksum.c_str(), stream.get(), length, nullptr, nullptr, &error))
            throw_gerror(error);
        ++m_written;
    }

    OstreeRepo* m_repo;
    std::function<std::unique_ptr<ObjectSource>()> m_make_source;
    GCancellable* m_cancellable;
    std::mutex m_lock;
    std::condition_variable m_wake;
    std::condition_variable_any m_flush_wake;
    std::deque<Item> m_queues[priorities];
    std::set<std::string> m_seen;
    size_t m_pending = 0;
    std::string m_stopped;
    std::atomic<bool> m_halted{false}; // set by stop(): no more work, fetches under way end
    std::atomic<bool> m_cancelled{false};
    std::atomic<uint64_t> m_written{0};
    std::atomic<uint64_t> m_bytes{0};
    MemoryBudget m_budget{inflated_budget};
};

// The repository's mode from its config, when it is one the prefetch reads.
bool is_archive(ObjectSource& source, GCancellable* cancellable)
{
    ByteBuffer buffer;
    std::span<const unsigned char> config;
    try {
        config = source.fetch("config", 64 * 1024, buffer, cancellable);
    } catch (const Stop&) {
        return false;
    } catch (const Skip&) {
        return false;
    }
    glib::KeyFile keys(g_key_file_new());
    if (!g_key_file_load_from_data(keys.get(), reinterpret_cast<const char*>(config.data()), config.size(),
                                   G_KEY_FILE_NONE, nullptr))
        return false;
    std::string mode = glib::take_string(g_key_file_get_string(keys.get(), "core", "mode", nullptr));
    return mode == "archive-z2" || mode == "archive";
}

} // namespace

PrefetchResult prefetch_objects(OstreeRepo* repo, const std::string& url, const std::string& commit,
                                unsigned network_timeout, bool sync_while_fetching, GCancellable* cancellable)
{
    PrefetchResult result;
    std::function<std::unique_ptr<ObjectSource>()> make_source;
    UniqueFd local_repo;
    unsigned jobs = std::max(2u, std::thread::hardware_concurrency());
    if (url.rfind("file://", 0) == 0) {
        std::string path = url.substr(7);
        local_repo.reset(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (!local_repo)
            return result;
        int fd = local_repo.get();
        make_source = [fd] { return std::make_unique<LocalSource>(fd); };
    } else if (url.rfind("http://", 0) == 0 && !proxy_configured()) {
        // Credentials in the URL are libostree's to send.
        std::string authority = url.substr(7, url.find('/', 7) == std::string::npos ? std::string::npos : url.find('/', 7) - 7);
        if (authority.find('@') != std::string::npos)
            return result;
        std::string base = url.back() == '/' ? url : url + "/";
        static std::once_flag curl_ready;
        std::call_once(curl_ready, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
        make_source = [base, network_timeout] { return std::make_unique<HttpSource>(base, network_timeout); };
        jobs = std::max(4u, 2 * std::thread::hardware_concurrency()); // hides each request's round trip
    } else {
        return result;
    }
    try {
        if (!is_archive(*make_source(), cancellable))
            return result;
    } catch (const Stop&) { // no libcurl handle: libostree's pull does it all
        return result;
    }
    result.attempted = true;
    objects::Transaction transaction(repo, nullptr);
    Prefetch(repo, make_source, cancellable).run(commit, jobs, sync_while_fetching, result);
    transaction.commit(nullptr);
    return result;
}

} // namespace treeflash::flasher
