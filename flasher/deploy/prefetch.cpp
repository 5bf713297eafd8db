#include "flasher/deploy/prefetch.hpp"

#include "common/byte_buffer.hpp"
#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/memory_budget.hpp"
#include "common/glib.hpp"
#include "common/ostree_objects.hpp"
#include "common/sha256.hpp"
#include "flasher/deploy/object_source.hpp"

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
// A worker keeps buffers up to this size between objects.
constexpr size_t kept_buffer = 4u << 20;
constexpr uint64_t flush_every = 32u << 20;

// A GError's message; the error is freed.
std::string message_of(GError*& error)
{
    glib::ErrorPtr owned(std::exchange(error, nullptr));
    return owned ? owned->message : "unknown error";
}


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

// An object fetched and checked before the repository it goes to is there
// (see Prefetch::attach).
struct HeldWrite {
    Kind kind;
    std::string checksum;
    glib::Variant metadata;       // a dirtree or dirmeta
    glib::Object<GFileInfo> info; // a file
    glib::Variant xattrs;
    ByteBuffer content; // a regular file's bytes
    size_t size = 0;
    MemoryBudget::Grant grant;
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

class Prefetch {
public:
    Prefetch(std::function<std::unique_ptr<ObjectSource>()> make_source, GCancellable* cancellable)
        : m_make_source(std::move(make_source)), m_cancellable(cancellable)
    {
    }

    ~Prefetch()
    {
        stop("");
        m_workers.clear(); // joins
        m_flusher = {};
        m_held.clear(); // their grants go back to m_budget, still there
    }

    // Fetches the commit, then starts `jobs` workers on its objects, which
    // hold what they fetch in memory until attach() names the repository.
    void start(const std::string& commit, unsigned jobs)
    {
        // The commit and its detached metadata (signatures) are read and the
        // commit checked against its name; written only by
        // record_prefetched_commit, or by libostree's pull.
        try {
            auto source = m_make_source();
            ByteBuffer buffer;
            auto bytes = source->fetch(loose_object_path(commit, "commit"), largest_metadata_object, buffer, m_cancellable);
            m_result.commit_object = checked_metadata(bytes, commit, MetadataKind::Commit);
            glib::Variant contents(g_variant_get_child_value(m_result.commit_object.get(), 6));
            glib::Variant meta(g_variant_get_child_value(m_result.commit_object.get(), 7));
            add({Kind::DirTree, checksum_hex(contents.get()), ""}, "");
            add({Kind::DirMeta, checksum_hex(meta.get())}, "");
            try {
                bytes = source->fetch(loose_object_path(commit, "commitmeta"), largest_metadata_object, buffer, m_cancellable);
                gpointer copy = g_memdup2(bytes.data(), bytes.size());
                m_result.detached_metadata = glib::adopt_variant(
                    g_variant_new_from_data(G_VARIANT_TYPE_VARDICT, copy, bytes.size(), FALSE, g_free, copy));
            } catch (const SourceMissing&) {
                // Unsigned: nothing to keep beside the commit.
            }
        } catch (const SourceStop& stop) {
            m_result.stopped = stop.why;
            return;
        } catch (const SourceTooBig&) {
            m_result.stopped = "the commit or its detached metadata is over " + std::to_string(largest_metadata_object >> 20) + " MiB";
            return;
        }
        for (unsigned i = 0; i < jobs; ++i)
            m_workers.emplace_back([this] { work(); });
    }

    // From now on objects go to `repo`, in a transaction; those held so
    // far are written on this thread.
    void attach(OstreeRepo* repo, bool sync_while_fetching)
    {
        m_transaction.emplace(repo, nullptr);
        std::vector<HeldWrite> held;
        {
            std::lock_guard guard(m_lock);
            m_repo = repo;
            held.swap(m_held);
        }
        // The card is written while objects still arrive: every 32 MiB
        // fetched, the repository's file system is synced on a thread of its
        // own, rather than all at once when libostree deploys.
        if (sync_while_fetching)
            m_flusher = std::jthread([this](std::stop_token stop) { flush(stop); });
        for (auto& write : held) {
            if (m_halted)
                break;
            try {
                if (g_cancellable_is_cancelled(m_cancellable))
                    throw Cancelled();
                write_now(write);
            } catch (const Cancelled&) {
                m_cancelled = true;
                stop("cancelled");
            } catch (const std::exception& e) {
                stop("object " + write.checksum + ": " + e.what());
            }
        }
    }

    // Waits for the workers; what the prefetch did.
    PrefetchResult finish()
    {
        m_workers.clear(); // joins
        m_flusher = {};    // stops and joins it
        if (m_cancelled)
            throw Cancelled();
        if (m_transaction)
            m_transaction->commit(nullptr);
        m_result.objects = m_written;
        m_result.bytes = m_bytes;
        if (m_result.stopped.empty())
            m_result.stopped = m_stopped;
        m_result.left = m_skipped;
        m_result.complete = m_result.stopped.empty() && m_skipped == 0 && m_held.empty();
        return std::move(m_result);
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
        m_budget.close(); // a worker waiting for room held by writes never made
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
            } catch (const SourceTooBig&) {
                ++m_skipped; // libostree's pull fetches it, streaming
            } catch (const SourceStop& s) {
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

    void flush(std::stop_token stop)
    {
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
        OstreeRepo* repo = attached();
        if (!repo)
            return false; // a new repository: it has nothing yet
        GError* error = nullptr;
        gboolean have = FALSE;
        if (!ostree_repo_has_object(repo, type, checksum.c_str(), &have, nullptr, &error))
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
            auto bytes = fetched(source, loose_object_path(item.checksum, "dirmeta"), largest_metadata_object, buffers.fetched);
            write_or_hold({Kind::DirMeta, item.checksum, checked_metadata(bytes, item.checksum, MetadataKind::DirMeta)});
            return;
        }
        case Kind::DirTree: {
            glib::Variant tree;
            if (have(OSTREE_OBJECT_TYPE_DIR_TREE, item.checksum)) {
                GVariant* raw = nullptr;
                if (!ostree_repo_load_variant(attached(), OSTREE_OBJECT_TYPE_DIR_TREE, item.checksum.c_str(), &raw, &error))
                    throw_gerror(error);
                tree.reset(raw); // a full reference already
            } else {
                auto bytes = fetched(source, loose_object_path(item.checksum, "dirtree"), largest_metadata_object, buffers.fetched);
                tree = checked_metadata(bytes, item.checksum, MetadataKind::DirTree);
                write_or_hold({Kind::DirTree, item.checksum, glib::Variant(g_variant_ref(tree.get()))});
            }
            glib::Variant files(g_variant_get_child_value(tree.get(), 0));
            for (gsize i = 0, n = g_variant_n_children(files.get()); i < n; ++i) {
                glib::Variant entry(g_variant_get_child_value(files.get(), i));
                glib::Variant csum(g_variant_get_child_value(entry.get(), 1));
                add({Kind::File, checksum_hex(csum.get())}, item.path);
            }
            glib::Variant dirs(g_variant_get_child_value(tree.get(), 1));
            for (gsize i = 0, n = g_variant_n_children(dirs.get()); i < n; ++i) {
                glib::Variant entry(g_variant_get_child_value(dirs.get(), i));
                const char* name = nullptr;
                g_variant_get_child(entry.get(), 0, "&s", &name);
                glib::Variant contents(g_variant_get_child_value(entry.get(), 1));
                glib::Variant meta(g_variant_get_child_value(entry.get(), 2));
                std::string path = item.path.empty() ? name : item.path + "/" + name;
                add({Kind::DirTree, checksum_hex(contents.get()), path}, item.path);
                add({Kind::DirMeta, checksum_hex(meta.get())}, item.path);
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
        auto object = fetched(source, loose_object_path(checksum, "filez"), largest_fetched, buffers.fetched);
        if (object.size() < 8)
            throw SourceStop{"object " + checksum + ": shorter than a header"};
        size_t header_size = 8 + ((size_t{object[0]} << 24) | (size_t{object[1]} << 16) | (size_t{object[2]} << 8) | object[3]);
        if (header_size > object.size())
            throw SourceStop{"object " + checksum + ": a header longer than the object"};
        GError* error = nullptr;
        glib::Object<GInputStream> header_stream(
            g_memory_input_stream_new_from_data(object.data(), static_cast<gssize>(object.size()), nullptr));
        GFileInfo* raw_info = nullptr;
        GVariant* raw_xattrs = nullptr;
        if (!ostree_content_stream_parse(TRUE, header_stream.get(), object.size(), FALSE, nullptr, &raw_info,
                                         &raw_xattrs, nullptr, &error)) {
            throw SourceStop{"object " + checksum + ": " + message_of(error)};
        }
        glib::Object<GFileInfo> info(raw_info);
        glib::Variant xattrs(raw_xattrs); // a full reference already
        std::span<const unsigned char> bytes;
        MemoryBudget::Grant grant;
        if (g_file_info_get_file_type(info.get()) == G_FILE_TYPE_REGULAR) {
            goffset size = g_file_info_get_size(info.get());
            if (size < 0)
                throw SourceStop{"object " + checksum + ": a file of " + std::to_string(size) + " bytes"};
            if (static_cast<uint64_t>(size) > largest_inflated)
                throw SourceTooBig();
            grant = m_budget.take(static_cast<uint64_t>(size));
            if (!grant)
                throw SourceStop{"stopped"}; // halted while waiting for room
            unsigned char* content = buffers.content.reserve(static_cast<size_t>(size));
            // Exactly `size` bytes, or an error (an empty file is checked by
            // its checksum alone).
            if (size > 0
                && libdeflate_deflate_decompress(inflater, object.data() + header_size, object.size() - header_size,
                                                 content, static_cast<size_t>(size), nullptr)
                       != LIBDEFLATE_SUCCESS)
                throw SourceStop{"object " + checksum + ": its compressed bytes do not inflate to its size"};
            bytes = {content, static_cast<size_t>(size)};
        }
        if (objects::content_checksum(info.get(), xattrs.get(), bytes, nullptr) != checksum)
            throw SourceStop{"object " + checksum + ": its content does not match its checksum"};
        HeldWrite write{Kind::File, checksum};
        write.info = std::move(info);
        write.xattrs = std::move(xattrs);
        write.size = bytes.size();
        write.grant = std::move(grant);
        if (attached()) {
            write_file(write, bytes);
            return;
        }
        // Held: the bytes go with it, and this worker takes a new buffer.
        write.content = std::move(buffers.content);
        write_or_hold(std::move(write));
    }

    OstreeRepo* attached()
    {
        std::lock_guard guard(m_lock);
        return m_repo;
    }

    // Writes `write` now, or holds it when there is no repository yet.
    void write_or_hold(HeldWrite write)
    {
        {
            std::lock_guard guard(m_lock);
            if (!m_repo) {
                m_held.push_back(std::move(write));
                return;
            }
        }
        write_now(write);
    }

    void write_now(HeldWrite& write)
    {
        GError* error = nullptr;
        switch (write.kind) {
        case Kind::DirMeta:
        case Kind::DirTree:
            if (!ostree_repo_write_metadata_trusted(m_repo,
                                                    write.kind == Kind::DirMeta ? OSTREE_OBJECT_TYPE_DIR_META
                                                                                : OSTREE_OBJECT_TYPE_DIR_TREE,
                                                    write.checksum.c_str(), write.metadata.get(), nullptr, &error))
                throw_gerror(error);
            ++m_written;
            return;
        case Kind::File:
            write_file(write, {write.content.data(), write.size});
            return;
        }
    }

    // Checked: libostree writes it as it is, without hashing it again.
    void write_file(HeldWrite& write, std::span<const unsigned char> bytes)
    {
        GError* error = nullptr;
        glib::Object<GInputStream> input;
        if (g_file_info_get_file_type(write.info.get()) == G_FILE_TYPE_REGULAR)
            input.reset(g_memory_input_stream_new_from_data(bytes.data(), static_cast<gssize>(bytes.size()), nullptr));
        GInputStream* raw_stream = nullptr;
        guint64 length = 0;
        if (!ostree_raw_file_to_content_stream(input.get(), write.info.get(), write.xattrs.get(), &raw_stream, &length,
                                               nullptr, &error))
            throw_gerror(error);
        glib::Object<GInputStream> stream(raw_stream);
        if (!ostree_repo_write_content(m_repo, write.checksum.c_str(), stream.get(), length, nullptr, nullptr, &error))
            throw_gerror(error);
        ++m_written;
    }

    OstreeRepo* m_repo = nullptr; // set by attach()
    std::vector<HeldWrite> m_held;
    std::optional<objects::Transaction> m_transaction;
    std::vector<std::jthread> m_workers;
    std::jthread m_flusher;
    PrefetchResult m_result;
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
    std::atomic<uint64_t> m_skipped{0};
    std::atomic<uint64_t> m_bytes{0};
    MemoryBudget m_budget{inflated_budget};
};

} // namespace

struct StartedPrefetch::State {
    std::unique_ptr<Prefetch> prefetch;
    bool attempted = false;
};

StartedPrefetch::StartedPrefetch(const std::string& url, const std::string& commit, unsigned network_timeout,
                                 GCancellable* cancellable)
    : m_state(std::make_unique<State>())
{
    auto make_source = object_sources(url, network_timeout);
    if (!make_source)
        return;
    // Over HTTP, more workers than cores hide each request's round trip.
    unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    unsigned jobs = url.rfind("http://", 0) == 0 ? std::max(4u, 2 * cores) : std::max(2u, cores);
    try {
        if (!is_archive(*make_source(), cancellable))
            return;
    } catch (const SourceStop&) { // no libcurl handle: libostree's pull does it all
        return;
    }
    m_state->attempted = true;
    m_state->prefetch = std::make_unique<Prefetch>(make_source, cancellable);
    m_state->prefetch->start(commit, jobs);
}

StartedPrefetch::~StartedPrefetch() = default;
StartedPrefetch::StartedPrefetch(StartedPrefetch&&) noexcept = default;

PrefetchResult StartedPrefetch::finish_into(OstreeRepo* repo, bool sync_while_fetching)
{
    PrefetchResult result;
    if (!m_state->prefetch)
        return result;
    // Whatever happens, the prefetch (and its transaction) ends here, while
    // `repo` is still there.
    std::unique_ptr<Prefetch> prefetch = std::move(m_state->prefetch);
    prefetch->attach(repo, sync_while_fetching);
    result = prefetch->finish();
    result.attempted = true;
    return result;
}

PrefetchResult prefetch_objects(OstreeRepo* repo, const std::string& url, const std::string& commit,
                                unsigned network_timeout, bool sync_while_fetching, GCancellable* cancellable)
{
    return StartedPrefetch(url, commit, network_timeout, cancellable).finish_into(repo, sync_while_fetching);
}

bool record_prefetched_commit(OstreeRepo* repo, const std::string& remote, const std::string& ref,
                              const std::string& commit, const PrefetchResult& prefetched)
{
    if (!prefetched.complete || !prefetched.commit_object)
        return false;
    GVariant* object = prefetched.commit_object.get();
    check_ref_binding(object, commit, ref);
    GError* error = nullptr;
    objects::Transaction transaction(repo, nullptr);
    if (!ostree_repo_write_metadata_trusted(repo, OSTREE_OBJECT_TYPE_COMMIT, commit.c_str(), object, nullptr, &error))
        throw_gerror(error, "write commit " + commit);
    if (prefetched.detached_metadata
        && !ostree_repo_write_commit_detached_metadata(repo, commit.c_str(), prefetched.detached_metadata.get(), nullptr,
                                                       &error))
        throw_gerror(error, "write the detached metadata of " + commit);
    ostree_repo_transaction_set_ref(repo, remote.c_str(), ref.c_str(), commit.c_str());
    transaction.commit(nullptr);
    return true;
}

} // namespace treeflash::flasher
