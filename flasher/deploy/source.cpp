#include "flasher/deploy/source.hpp"

#include "common/error.hpp"
#include "common/named_file.hpp"
#include "common/fs.hpp"
#include "common/glib.hpp"
#include "flasher/deploy/object_source.hpp"
#include "flasher/deploy/pull.hpp"

#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <optional>
#include <ostree.h>
#include <span>

namespace treeflash::flasher {

namespace {

// The commit's time, version and size (as treeflash build records it).
void read_commit_variant(GVariant* commit, Source& source)
{
    glib::Variant metadata = glib::adopt_variant(g_variant_get_child_value(commit, 0));
    source.timestamp = ostree_commit_get_timestamp(commit);
    const char* version = nullptr;
    if (g_variant_lookup(metadata.get(), OSTREE_COMMIT_META_KEY_VERSION, "&s", &version))
        source.version = version;
    guint64 bytes = 0, entries = 0;
    if (g_variant_lookup(metadata.get(), "treeflash.content-bytes", "t", &bytes))
        source.content_bytes = bytes;
    if (g_variant_lookup(metadata.get(), "treeflash.content-entries", "t", &entries))
        source.content_entries = entries;
}

void read_commit(OstreeRepo* repo, Source& source)
{
    GVariant* raw = nullptr;
    GError* error = nullptr;
    if (!ostree_repo_load_variant(repo, OSTREE_OBJECT_TYPE_COMMIT, source.commit.c_str(), &raw, &error))
        throw_gerror(error, "load commit " + source.commit);
    glib::Variant commit(raw);
    read_commit_variant(commit.get(), source);
}

// The commit `ref` names in a summary (OSTREE_SUMMARY_GVARIANT_FORMAT), as
// libostree's pull finds it for a remote without a collection ID (a binary
// search: a summary lists its refs sorted); empty when it is not there.
// Throws SourceStop when its checksum is not one.
std::string commit_in_summary(std::span<const unsigned char> bytes, const std::string& ref)
{
    gpointer copy = g_memdup2(bytes.data(), bytes.size());
    glib::Variant summary = glib::adopt_variant(
        g_variant_new_from_data(OSTREE_SUMMARY_GVARIANT_FORMAT, copy, bytes.size(), FALSE, g_free, copy));
    glib::Variant refs(g_variant_get_child_value(summary.get(), 0));
    gsize low = 0, high = g_variant_n_children(refs.get());
    while (low < high) {
        gsize middle = low + (high - low) / 2;
        glib::Variant entry(g_variant_get_child_value(refs.get(), middle));
        const char* name = nullptr;
        g_variant_get_child(entry.get(), 0, "&s", &name);
        int order = std::strcmp(name, ref.c_str());
        if (order < 0) {
            low = middle + 1;
        } else if (order > 0) {
            high = middle;
        } else {
            glib::Variant target(g_variant_get_child_value(entry.get(), 1));
            glib::Variant checksum(g_variant_get_child_value(target.get(), 1));
            return checksum_hex(checksum.get());
        }
    }
    return "";
}

// The ref and its commit read straight from an archive repository served
// over plain HTTP, as libostree's pull reads them from a server: the ref
// from the summary when the server has one, else from refs/heads/. (From
// a folder, libostree reads the refs themselves, whatever the summary says:
// that stays its job.)
// Nothing when this cannot read them, for whatever reason but a silent
// server or a cancel: libostree's pull then reads them, in a process of its
// own, and reports what is wrong in its words.
std::optional<Source> read_source_directly(const std::string& url, const std::string& ref, unsigned network_timeout,
                                           GCancellable* cancellable)
{
    auto make_source = url.rfind("http://", 0) == 0 ? object_sources(url, network_timeout) : nullptr;
    if (!make_source)
        return std::nullopt;
    try {
        auto files = make_source();
        if (!is_archive(*files, cancellable))
            return std::nullopt;
        Source source;
        source.url = url;
        source.ref = ref;
        ByteBuffer buffer;
        try {
            source.commit = commit_in_summary(files->fetch("summary", largest_metadata_object, buffer, cancellable), ref);
            if (source.commit.empty())
                return std::nullopt;
        } catch (const SourceMissing&) {
            auto bytes = files->fetch("refs/heads/" + ref, 4096, buffer, cancellable);
            std::string text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
            text.erase(text.find_last_not_of(" \t\r\n") + 1);
            if (!ostree_validate_checksum_string(text.c_str(), nullptr))
                return std::nullopt;
            source.commit = text;
        }
        auto bytes = files->fetch(loose_object_path(source.commit, "commit"), largest_metadata_object, buffer, cancellable);
        glib::Variant commit = checked_metadata(bytes, source.commit, MetadataKind::Commit);
        // Refused here, before the card is touched, as libostree's pull of
        // the commit alone refused it.
        check_ref_binding(commit.get(), source.commit, ref);
        read_commit_variant(commit.get(), source);
        return source;
    } catch (const SourceStalled& stalled) {
        throw Error("fetch " + ref + " from " + url + ": " + stalled.why + "; --network-timeout sets the limit");
    } catch (const SourceStop&) {
        return std::nullopt;
    } catch (const SourceTooBig&) {
        return std::nullopt;
    }
}

// For commits that do not record their size: the sum of the file objects,
// and how many file and directory objects there are (a lower bound of the
// entries: equal files share an object).
void measure_commit(OstreeRepo* repo, Source& source, GCancellable* cancellable)
{
    const std::string& commit = source.commit;
    GHashTable* reachable = nullptr;
    GError* error = nullptr;
    if (!ostree_repo_traverse_commit(repo, commit.c_str(), 0, &reachable, cancellable, &error))
        throw_gerror(error, "walk commit " + commit);
    uint64_t total = 0, entries = 0;
    GHashTableIter it;
    gpointer key = nullptr;
    glib::HashTable owned(reachable);
    g_hash_table_iter_init(&it, reachable);
    while (g_hash_table_iter_next(&it, &key, nullptr)) {
        const char* checksum = nullptr;
        OstreeObjectType type;
        ostree_object_name_deserialize(static_cast<GVariant*>(key), &checksum, &type);
        if (type == OSTREE_OBJECT_TYPE_DIR_TREE)
            ++entries;
        if (type != OSTREE_OBJECT_TYPE_FILE)
            continue;
        ++entries;
        GFileInfo* raw_info = nullptr;
        if (!ostree_repo_load_file(repo, checksum, nullptr, &raw_info, nullptr, cancellable, &error))
            throw_gerror(error, "read object " + std::string(checksum));
        glib::Object<GFileInfo> info(raw_info);
        total += static_cast<uint64_t>(g_file_info_get_size(info.get()));
    }
    source.content_bytes = total;
    source.content_entries = entries;
}

std::string list_refs(OstreeRepo* repo)
{
    GHashTable* refs = nullptr;
    std::string names;
    if (ostree_repo_list_refs(repo, nullptr, &refs, nullptr, nullptr)) {
        glib::HashTable owned(refs);
        GHashTableIter it;
        gpointer key = nullptr;
        g_hash_table_iter_init(&it, refs);
        while (g_hash_table_iter_next(&it, &key, nullptr))
            names += (names.empty() ? "" : ", ") + std::string(static_cast<const char*>(key));
    }
    return names.empty() ? "none" : names;
}

} // namespace

bool local_repository_untrusted(const std::filesystem::path& path)
{
    // Someone else may change the repository when they own or may write
    // one of its folders, or its config: then every object is checked.
    auto foreign = [](const std::filesystem::path& p) {
        struct stat st {};
        return ::lstat(p.c_str(), &st) != 0 || S_ISLNK(st.st_mode) || named::others_may_change(st);
    };
    if (foreign(path) || foreign(path / "config") || foreign(path / "objects"))
        return true;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(path / "objects", ec))
        if (foreign(entry.path()))
            return true;
    for (auto it = std::filesystem::recursive_directory_iterator(path / "refs", ec);
         !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec))
        if (it->is_directory(ec) && foreign(it->path()))
            return true;
    return ec.value() != 0 && ec != std::errc::no_such_file_or_directory;
}

bool is_url(const std::string& text)
{
    return text.rfind("http://", 0) == 0 || text.rfind("https://", 0) == 0 || text.rfind("file://", 0) == 0;
}

Source resolve_source(const std::string& repo_or_url, const std::string& ref, unsigned network_timeout,
                      GCancellable* cancellable)
{
    Source source;
    source.ref = ref;
    GError* error = nullptr;
    if (!is_url(repo_or_url)) {
        std::error_code ec;
        auto path = std::filesystem::absolute(repo_or_url, ec);
        if (!std::filesystem::is_regular_file(path / "config", ec))
            throw Error("repository " + repo_or_url + ": not an OSTree repository");
        source.url = "file://" + path.lexically_normal().string();
        glib::Object<OstreeRepo> repo(ostree_repo_open_at(AT_FDCWD, path.c_str(), cancellable, &error));
        if (!repo)
            throw_gerror(error, "open " + repo_or_url);
        char* commit = nullptr;
        if (!ostree_repo_resolve_rev(repo.get(), ref.c_str(), TRUE, &commit, &error))
            throw_gerror(error, "resolve " + ref);
        if (!commit)
            throw Error("ref '" + ref + "' is not in " + repo_or_url + " (refs: " + list_refs(repo.get()) + ")");
        source.commit = glib::take_string(commit);
        read_commit(repo.get(), source);
        if (!source.content_bytes || !source.content_entries)
            measure_commit(repo.get(), source, cancellable);
        return source;
    }

    if (auto direct = read_source_directly(repo_or_url, ref, network_timeout, cancellable))
        return *direct;
    source.url = repo_or_url;
    fs::TempDir scratch(std::filesystem::temp_directory_path(), "treeflash-source-");
    glib::Object<OstreeRepo> repo(ostree_repo_create_at(AT_FDCWD, scratch.path().c_str(), OSTREE_REPO_MODE_BARE_USER,
                                                        nullptr, cancellable, &error));
    if (!repo)
        throw_gerror(error, "temporary repository");
    GVariantBuilder options;
    g_variant_builder_init(&options, G_VARIANT_TYPE_VARDICT);
    g_variant_builder_add(&options, "{sv}", "gpg-verify", g_variant_new_boolean(FALSE));
    g_variant_builder_add(&options, "{sv}", "gpg-verify-summary", g_variant_new_boolean(FALSE));
    glib::Variant remote_options = glib::adopt_variant(g_variant_builder_end(&options));
    if (!ostree_repo_remote_change(repo.get(), nullptr, OSTREE_REPO_REMOTE_CHANGE_ADD, "source", repo_or_url.c_str(),
                                   remote_options.get(), cancellable, &error))
        throw_gerror(error, "remote " + repo_or_url);

    GVariantBuilder pull;
    g_variant_builder_init(&pull, G_VARIANT_TYPE_VARDICT);
    const char* refs[] = {ref.c_str(), nullptr};
    g_variant_builder_add(&pull, "{sv}", "refs", g_variant_new_strv(refs, -1));
    g_variant_builder_add(&pull, "{sv}", "flags", g_variant_new_int32(OSTREE_REPO_PULL_FLAGS_COMMIT_ONLY));
    g_variant_builder_add(&pull, "{sv}", "n-network-retries", g_variant_new_uint32(0));
    glib::Variant pull_options = glib::adopt_variant(g_variant_builder_end(&pull));
    watched_pull(repo.get(), "source", pull_options.get(), "fetch " + ref + " from " + repo_or_url, network_timeout,
                 cancellable);
    char* commit = nullptr;
    if (!ostree_repo_resolve_rev(repo.get(), ("source:" + ref).c_str(), FALSE, &commit, &error))
        throw_gerror(error, "resolve " + ref);
    source.commit = glib::take_string(commit);
    read_commit(repo.get(), source);
    return source;
}

} // namespace treeflash::flasher
