#include "builder/stages.hpp"

#include "builder/archive_objects.hpp"

#include "common/error.hpp"
#include "common/glib.hpp"
#include "common/memory_budget.hpp"
#include "common/ostree_objects.hpp"

#include <algorithm>
#include <fcntl.h>
#include <atomic>
#include <functional>
#include <ctime>
#include <cstdint>
#include <gio/gunixinputstream.h>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <ostree.h>
#include <sys/stat.h>
#include <thread>
#include <tuple>
#include <vector>
#include <unistd.h>

namespace treeflash::builder {

namespace {

glib::Object<GFileInfo> file_info_for(const Node& node)
{
    glib::Object<GFileInfo> info(g_file_info_new());
    GFileInfo* i = info.get();
    g_file_info_set_attribute_uint32(i, "unix::uid", node.uid);
    g_file_info_set_attribute_uint32(i, "unix::gid", node.gid);
    switch (node.kind) {
    case Node::Kind::Directory:
        g_file_info_set_file_type(i, G_FILE_TYPE_DIRECTORY);
        g_file_info_set_attribute_uint32(i, "unix::mode", S_IFDIR | (node.mode & 07777));
        break;
    case Node::Kind::Regular:
        g_file_info_set_file_type(i, G_FILE_TYPE_REGULAR);
        g_file_info_set_attribute_uint32(i, "unix::mode", S_IFREG | (node.mode & 07777));
        g_file_info_set_size(i, static_cast<goffset>(node.size));
        break;
    case Node::Kind::Symlink:
        g_file_info_set_file_type(i, G_FILE_TYPE_SYMBOLIC_LINK);
        g_file_info_set_attribute_boolean(i, "standard::is-symlink", TRUE);
        g_file_info_set_attribute_uint32(i, "unix::mode", S_IFLNK | 0777);
        g_file_info_set_symlink_target(i, node.symlink_target.c_str());
        g_file_info_set_size(i, 0);
        break;
    }
    return info;
}

// A node's extended attributes as OSTree stores them: a(ayay), sorted by name.
glib::Variant xattrs_of(const Node& node)
{
    GVariantBuilder builder;
    g_variant_builder_init(&builder, G_VARIANT_TYPE("a(ayay)"));
    for (const auto& [name, value] : node.xattrs)
        g_variant_builder_add(&builder, "(@ay@ay)", g_variant_new_bytestring(name.c_str()),
                              g_variant_new_fixed_array(G_VARIANT_TYPE_BYTE, value.data(), value.size(), 1));
    return glib::adopt_variant(g_variant_builder_end(&builder));
}

// The bytes of a regular file as a stream; fd-backed sources are read from
// the start every time it is called.
glib::Object<GInputStream> open_stream(const Tree& tree, const Node& node, UniqueFd& fd)
{
    if (node.source.origin == FileSource::Origin::Memory) {
        return glib::Object<GInputStream>(g_memory_input_stream_new_from_data(
            g_memdup2(node.source.bytes.data(), node.source.bytes.size()),
            static_cast<gssize>(node.source.bytes.size()), g_free));
    }
    if (!fd)
        fd = tree.open_source(node.source);
    else if (::lseek(fd.get(), 0, SEEK_SET) != 0)
        throw_errno("seek " + node.source.path);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0)
        throw_errno("stat " + node.source.path);
    if (static_cast<uint64_t>(st.st_size) != node.size)
        throw Error(node.source.path + " changed size while the build read it");
    return glib::Object<GInputStream>(g_unix_input_stream_new(fd.get(), FALSE));
}

// A regular file's bytes, read whole into `buffer` (or the node's own
// bytes): read once, so the checksum and the object see the same bytes.
std::span<const unsigned char> read_whole(const Tree& tree, const Node& node, ByteBuffer& buffer)
{
    if (node.source.origin == FileSource::Origin::Memory)
        return {reinterpret_cast<const unsigned char*>(node.source.bytes.data()), node.source.bytes.size()};
    UniqueFd fd = tree.open_source(node.source);
    unsigned char* bytes = buffer.reserve(node.size);
    size_t done = 0;
    while (done < node.size) {
        ssize_t n = ::read(fd.get(), bytes + done, node.size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            throw_errno("read " + node.source.path);
        if (n == 0)
            throw Error(node.source.path + " changed size while the build read it");
        done += static_cast<size_t>(n);
    }
    unsigned char more = 0;
    ssize_t n;
    while ((n = ::read(fd.get(), &more, 1)) < 0 && errno == EINTR) {
    }
    if (n != 0)
        throw Error(node.source.path + " changed size while the build read it");
    return {bytes, node.size};
}

// Files bigger than this are hashed in chunks before they are read whole.
constexpr uint64_t streamed_hash_threshold = 1u << 20;
// What the workers may hold at once for files read whole (each file counts
// twice: its bytes and its compressed bytes).
constexpr uint64_t whole_file_budget = 512ull << 20;

// What each worker keeps between files.
struct WorkerState {
    MemoryBudget* budget;
    std::optional<DeflateCompressor> compressor;
    ByteBuffer content;
    ByteBuffer compressed;
};

bool have_object(OstreeRepo* repo, const std::string& checksum, GCancellable* cancellable)
{
    GError* error = nullptr;
    gboolean have = FALSE;
    if (!ostree_repo_has_object(repo, OSTREE_OBJECT_TYPE_FILE, checksum.c_str(), &have, cancellable, &error))
        throw_gerror(error, "look up object");
    return have;
}

// Computes the content object checksum of one file and writes the object
// only when the repository lacks it. Archive repositories compress before
// they look for an existing object; checking first makes a rebuild of an
// unchanged tree cost a read and a hash per file instead of a compression.
// Archive objects are compressed here (`writer`); files too big to hold in
// memory, and objects of other repository modes, go through libostree.
bool write_content_object(OstreeRepo* repo, ArchiveObjectWriter* writer, WorkerState& state, const Tree& tree,
                          Node& node, GVariant* xattrs, GCancellable* cancellable)
{
    if (g_cancellable_is_cancelled(cancellable))
        throw Cancelled();
    auto info = file_info_for(node);
    if (writer && node.size <= whole_buffer_limit) {
        std::span<const unsigned char> bytes;
        MemoryBudget::Grant grant;
        // A big file's buffers are freed once its object is written.
        struct Shrink {
            WorkerState& state;
            ~Shrink()
            {
                state.content.shrink(streamed_hash_threshold);
                state.compressed.shrink(2 * streamed_hash_threshold);
            }
        } shrink{state};
        if (node.size > streamed_hash_threshold) {
            // A big file is hashed as it streams by (no buffer of its size to
            // fill in a rebuild that only hashes), and read whole only when
            // its object is new: then hashed again, so the object holds the
            // bytes its name says.
            UniqueFd fd;
            glib::Object<GInputStream> input = open_stream(tree, node, fd);
            node.checksum = objects::content_checksum(info.get(), xattrs, input.get(), cancellable);
            if (have_object(repo, node.checksum, cancellable))
                return false;
            // The file and its compressed bytes, from the workers' shared budget.
            grant = state.budget->take(2 * node.size);
            bytes = read_whole(tree, node, state.content);
            if (objects::content_checksum(info.get(), xattrs, bytes, cancellable) != node.checksum)
                throw Error(node.source.path + " changed while the build read it");
        } else {
            if (node.is_regular())
                bytes = read_whole(tree, node, state.content);
            node.checksum = objects::content_checksum(info.get(), xattrs, bytes, cancellable);
            if (have_object(repo, node.checksum, cancellable))
                return false;
        }
        if (!state.compressor)
            state.compressor.emplace(writer->level());
        return writer->stage(node.checksum, objects::archive_file_header(info.get(), xattrs, cancellable), bytes,
                             node.is_regular(), *state.compressor, state.compressed);
    }

    UniqueFd fd;
    GError* error = nullptr;
    glib::Object<GInputStream> input;
    if (node.is_regular())
        input = open_stream(tree, node, fd);
    node.checksum = input ? objects::content_checksum(info.get(), xattrs, input.get(), cancellable)
                          : objects::content_checksum(info.get(), xattrs, std::span<const unsigned char>(), cancellable);
    if (have_object(repo, node.checksum, cancellable))
        return false;

    if (node.is_regular())
        input = open_stream(tree, node, fd);
    GInputStream* content_raw = nullptr;
    guint64 length = 0;
    if (!ostree_raw_file_to_content_stream(input.get(), info.get(), xattrs, &content_raw, &length, cancellable,
                                           &error))
        throw_gerror(error, "content stream");
    glib::Object<GInputStream> content(content_raw);
    if (!ostree_repo_write_content(repo, node.checksum.c_str(), content.get(), length, nullptr, cancellable, &error))
        throw_gerror(error, "write object");
    return true;
}

// Writes every file and symlink of the tree, on `jobs` threads.
void write_contents(OstreeRepo* repo, ArchiveObjectWriter* writer, Tree& tree, unsigned jobs,
                    GCancellable* cancellable, CommitResult& result)
{
    std::vector<std::pair<std::string, Node*>> work;
    std::function<void(const std::string&, Node&)> collect = [&](const std::string& path, Node& node) {
        if (!node.is_dir()) {
            work.emplace_back(path, &node);
            return;
        }
        ++result.directories;
        for (auto& [name, child] : node.children)
            collect(path.empty() ? name : path + "/" + name, *child);
    };
    collect("", tree.root());
    // Big files first, so one large kernel does not finish last on its own.
    std::stable_sort(work.begin(), work.end(), [](const auto& a, const auto& b) { return a.second->size > b.second->size; });

    for (const auto& [path, node] : work) {
        ++result.files;
        result.bytes += node->size;
    }

    std::atomic<size_t> next{0};
    std::atomic<uint64_t> written{0};
    std::mutex failure_lock;
    std::string failure;
    bool cancelled = false;
    // Files read whole and compressed at once share this much memory,
    // whatever the number of workers.
    MemoryBudget budget(whole_file_budget);
    auto worker = [&] {
        WorkerState state{&budget, {}, {}, {}};
        for (;;) {
            size_t index = next.fetch_add(1);
            if (index >= work.size())
                return;
            auto& [path, node] = work[index];
            try {
                glib::Variant xattrs = xattrs_of(*node);
                if (write_content_object(repo, writer, state, tree, *node, xattrs.get(), cancellable))
                    ++written;
            } catch (const Cancelled&) {
                std::lock_guard guard(failure_lock);
                cancelled = true;
                next = work.size();
            } catch (const std::exception& e) {
                std::lock_guard guard(failure_lock);
                if (failure.empty())
                    failure = "write " + path + ": " + e.what();
                next = work.size();
            }
        }
    };
    if (jobs == 0)
        jobs = std::max(1u, std::thread::hardware_concurrency());
    {
        std::vector<std::jthread> threads;
        for (unsigned i = 1; i < jobs; ++i)
            threads.emplace_back(worker);
        worker();
    }
    if (cancelled)
        throw Cancelled();
    if (!failure.empty())
        throw Error(failure);
    result.objects_written = written;
}

std::filesystem::path repo_path(OstreeRepo* repo)
{
    std::string path = glib::take_string(g_file_get_path(ostree_repo_get_path(repo)));
    if (path.empty())
        throw Error("the repository has no local path");
    return path;
}

class DirMetaWriter {
public:
    DirMetaWriter(OstreeRepo* repo, GCancellable* cancellable) : m_repo(repo), m_cancellable(cancellable) {}

    const std::string& checksum_for(const Node& dir)
    {
        auto key = std::make_tuple(dir.uid, dir.gid, dir.mode, dir.xattrs);
        auto found = m_written.find(key);
        if (found != m_written.end())
            return found->second;
        auto info = file_info_for(dir);
        glib::Variant xattrs = xattrs_of(dir);
        glib::Variant meta = glib::adopt_variant(ostree_create_directory_metadata(info.get(), xattrs.get()));
        guchar* raw = nullptr;
        GError* error = nullptr;
        if (!ostree_repo_write_metadata(m_repo, OSTREE_OBJECT_TYPE_DIR_META, nullptr, meta.get(), &raw, m_cancellable,
                                        &error))
            throw_gerror(error, "write directory metadata");
        glib::Bytes csum(raw);
        return m_written.emplace(key, glib::take_string(ostree_checksum_from_bytes(csum.get()))).first->second;
    }

private:
    OstreeRepo* m_repo;
    GCancellable* m_cancellable;
    std::map<std::tuple<uid_t, gid_t, mode_t, std::vector<std::pair<std::string, std::string>>>, std::string> m_written;
};

void fill_mtree(OstreeMutableTree* mtree, const Node& dir, DirMetaWriter& dirmeta)
{
    ostree_mutable_tree_set_metadata_checksum(mtree, dirmeta.checksum_for(dir).c_str());
    GError* error = nullptr;
    for (const auto& [name, child] : dir.children) {
        if (child->is_dir()) {
            OstreeMutableTree* raw = nullptr;
            if (!ostree_mutable_tree_ensure_dir(mtree, name.c_str(), &raw, &error))
                throw_gerror(error, name);
            glib::Object<OstreeMutableTree> sub(raw);
            fill_mtree(sub.get(), *child, dirmeta);
        } else if (!ostree_mutable_tree_replace_file(mtree, name.c_str(), child->checksum.c_str(), &error)) {
            throw_gerror(error, name);
        }
    }
}

std::string checksum_child(GVariant* commit, gsize index)
{
    glib::Variant bytes = glib::adopt_variant(g_variant_get_child_value(commit, index));
    return glib::take_string(ostree_checksum_from_bytes_v(bytes.get()));
}

std::string string_child(GVariant* commit, gsize index)
{
    const char* text = nullptr;
    g_variant_get_child(commit, index, "&s", &text);
    return text ? text : "";
}

std::string version_of(GVariant* commit)
{
    glib::Variant metadata = glib::adopt_variant(g_variant_get_child_value(commit, 0));
    const char* version = nullptr;
    if (g_variant_lookup(metadata.get(), OSTREE_COMMIT_META_KEY_VERSION, "&s", &version))
        return version;
    return "";
}

// Whether `parent` already is this tree with this message: then a rebuild
// adds no commit.
bool same_as_parent(OstreeRepo* repo, const std::string& parent, OstreeRepoFile* root, const CommitOptions& options,
                    GCancellable*)
{
    GVariant* raw = nullptr;
    GError* error = nullptr;
    if (!ostree_repo_load_variant(repo, OSTREE_OBJECT_TYPE_COMMIT, parent.c_str(), &raw, &error))
        throw_gerror(error, "load parent commit " + parent);
    glib::Variant commit(raw);
    return checksum_child(commit.get(), 6) == ostree_repo_file_tree_get_contents_checksum(root)
           && checksum_child(commit.get(), 7) == ostree_repo_file_tree_get_metadata_checksum(root)
           && string_child(commit.get(), 3) == options.subject && string_child(commit.get(), 4) == options.body
           && version_of(commit.get()) == options.version;
}

glib::Variant commit_metadata(const CommitOptions& options, const CommitResult& counts)
{
    GVariantBuilder builder;
    g_variant_builder_init(&builder, G_VARIANT_TYPE_VARDICT);
    // Lets the flasher size an image (blocks and inodes) before pulling the tree.
    g_variant_builder_add(&builder, "{sv}", "treeflash.content-bytes", g_variant_new_uint64(counts.bytes));
    g_variant_builder_add(&builder, "{sv}", "treeflash.content-entries",
                          g_variant_new_uint64(counts.files + counts.directories));
    if (!options.version.empty())
        g_variant_builder_add(&builder, "{sv}", OSTREE_COMMIT_META_KEY_VERSION,
                              g_variant_new_string(options.version.c_str()));
    return glib::adopt_variant(g_variant_builder_end(&builder));
}

void generate_delta(OstreeRepo* repo, const std::string& from, const std::string& to, GCancellable* cancellable)
{
    GVariantBuilder params;
    g_variant_builder_init(&params, G_VARIANT_TYPE_VARDICT);
    glib::Variant params_v = glib::adopt_variant(g_variant_builder_end(&params));
    GError* error = nullptr;
    if (!ostree_repo_static_delta_generate(repo, OSTREE_STATIC_DELTA_GENERATE_OPT_MAJOR, from.c_str(), to.c_str(),
                                           nullptr, params_v.get(), cancellable, &error))
        throw_gerror(error, "static delta " + from.substr(0, 10) + " -> " + to.substr(0, 10));
}

// `commit` and up to `count` - 1 of its ancestors, newest first; fewer when
// the history is shorter (or was pruned).
std::vector<std::string> ancestors(OstreeRepo* repo, const std::string& commit, unsigned count)
{
    std::vector<std::string> found;
    std::string current = commit;
    while (!current.empty() && found.size() < count) {
        found.push_back(current);
        GVariant* raw = nullptr;
        if (!ostree_repo_load_variant_if_exists(repo, OSTREE_OBJECT_TYPE_COMMIT, current.c_str(), &raw, nullptr) || !raw)
            break;
        glib::Variant variant = glib::adopt_variant(raw);
        char* parent = ostree_commit_get_parent(variant.get());
        current = parent ? glib::take_string(parent) : "";
    }
    return found;
}

void update_summary(OstreeRepo* repo, const std::optional<GpgSigning>& gpg, GCancellable* cancellable)
{
    GError* error = nullptr;
    if (!ostree_repo_regenerate_summary(repo, nullptr, cancellable, &error))
        throw_gerror(error, "regenerate summary");
    if (gpg) {
        const char* keys[] = {gpg->key_id.c_str(), nullptr};
        if (!ostree_repo_add_gpg_signature_summary(repo, keys, gpg->homedir.empty() ? nullptr : gpg->homedir.c_str(),
                                                   cancellable, &error))
            throw_gerror(error, "sign summary with key " + gpg->key_id);
    }
}

// Signs `commit` with the key unless it already carries that key's signature.
void sign_commit(OstreeRepo* repo, const std::string& commit, const GpgSigning& gpg, GCancellable* cancellable)
{
    GError* error = nullptr;
    if (ostree_repo_sign_commit(repo, commit.c_str(), gpg.key_id.c_str(), gpg.homedir.empty() ? nullptr : gpg.homedir.c_str(),
                                cancellable, &error))
        return;
    glib::ErrorPtr owned(error);
    if (owned && std::string(owned->message).find("already signed") != std::string::npos)
        return;
    error = owned.release();
    throw_gerror(error, "key " + gpg.key_id);
}

// A signed summary must not silently become unsigned: clients that verify
// it would refuse every update.
void check_summary_signing(OstreeRepo* repo, const CommitOptions& options)
{
    if (options.gpg)
        return;
    struct stat st {};
    if (::fstatat(ostree_repo_get_dfd(repo), "summary.sig", &st, AT_SYMLINK_NOFOLLOW) == 0)
        throw Error("the repository's summary is GPG-signed: pass --gpg-sign KEY (or remove summary.sig to publish "
                    "an unsigned summary)");
}

} // namespace

CommitResult commit_tree(OstreeRepo* repo, Tree& tree, const CommitOptions& options, GCancellable* cancellable)
{
    CommitResult result;
    GError* error = nullptr;
    char* raw_parent = nullptr;
    if (!ostree_repo_resolve_rev(repo, options.branch.c_str(), TRUE, &raw_parent, &error))
        throw_gerror(error, "resolve " + options.branch);
    result.parent = glib::take_string(raw_parent);
    check_summary_signing(repo, options);

    objects::Transaction transaction(repo, cancellable);
    in_step("write objects", [&] {
        std::optional<ArchiveObjectWriter> writer;
        if (ostree_repo_get_mode(repo) == OSTREE_REPO_MODE_ARCHIVE)
            writer.emplace(repo, repo_path(repo));
        write_contents(repo, writer ? &*writer : nullptr, tree, options.jobs, cancellable, result);
        // Before the tree and commit: a static delta reads these objects.
        if (writer)
            writer->publish();
    });

    glib::Object<GFile> root;
    in_step("write tree", [&] {
        glib::Object<OstreeMutableTree> mtree(ostree_mutable_tree_new());
        DirMetaWriter dirmeta(repo, cancellable);
        fill_mtree(mtree.get(), tree.root(), dirmeta);
        GFile* raw_root = nullptr;
        if (!ostree_repo_write_mtree(repo, mtree.get(), &raw_root, cancellable, &error))
            throw_gerror(error);
        root.reset(raw_root);
    });

    if (!result.parent.empty() && !options.force
        && same_as_parent(repo, result.parent, OSTREE_REPO_FILE(root.get()), options, cancellable)) {
        transaction.commit(cancellable);
        result.commit = result.parent;
        result.unchanged = true;
        // The existing commit gets the signature this build was asked for.
        if (options.gpg)
            in_step("sign", [&] { sign_commit(repo, result.commit, *options.gpg, cancellable); });
        in_step("summary", [&] { update_summary(repo, options.gpg, cancellable); });
        return result;
    }

    in_step("write commit", [&] {
        uint64_t timestamp = options.timestamp ? *options.timestamp : static_cast<uint64_t>(::time(nullptr));
        glib::Variant metadata = commit_metadata(options, result);
        char* raw_commit = nullptr;
        if (!ostree_repo_write_commit_with_time(repo, result.parent.empty() ? nullptr : result.parent.c_str(),
                                                options.subject.c_str(),
                                                options.body.empty() ? nullptr : options.body.c_str(), metadata.get(),
                                                OSTREE_REPO_FILE(root.get()), timestamp, &raw_commit, cancellable,
                                                &error))
            throw_gerror(error);
        result.commit = glib::take_string(raw_commit);
        transaction.commit(cancellable);
    });

    if (options.gpg)
        in_step("sign", [&] { sign_commit(repo, result.commit, *options.gpg, cancellable); });
    if (options.static_deltas) {
        std::vector<std::string> sources = ancestors(repo, result.parent, options.static_deltas);
        if (sources.empty())
            result.warnings.push_back("no static delta: " + options.branch + " had no previous commit");
        for (const auto& from : sources)
            in_step("delta", [&] { generate_delta(repo, from, result.commit, cancellable); });
        result.deltas_from = sources;
    }
    // The branch moves last: everything before is invisible to clients.
    // From here on the few remaining writes are not cancellable, so an
    // interrupt cannot leave a moved branch with a stale summary.
    cancellable = nullptr;
    in_step("update ref", [&] {
        if (!ostree_repo_set_ref_immediate(repo, nullptr, options.branch.c_str(), result.commit.c_str(), cancellable,
                                           &error))
            throw_gerror(error, options.branch);
    });
    in_step("summary", [&] { update_summary(repo, options.gpg, cancellable); });
    return result;
}

} // namespace treeflash::builder
