#include "builder/stages.hpp"
#include "builder/tarscan.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"

#include <archive.h>
#include <archive_entry.h>
#include <cerrno>
#include <dirent.h>
#include <algorithm>
#include <fcntl.h>
#include <gio/gio.h>
#include <sys/xattr.h>
#include <memory>
#include <set>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::builder {

namespace {

std::string join(const std::string& dir, const std::string& name)
{
    return dir.empty() ? name : dir + "/" + name;
}

std::string read_symlink_at(int dirfd, const char* name, const std::string& path)
{
    std::string target(256, '\0');
    for (;;) {
        ssize_t n = ::readlinkat(dirfd, name, target.data(), target.size());
        if (n < 0)
            throw_errno("readlink " + path);
        if (static_cast<size_t>(n) < target.size()) {
            target.resize(static_cast<size_t>(n));
            return target;
        }
        target.resize(target.size() * 2);
    }
}

struct DirCloser {
    void operator()(DIR* d) const { ::closedir(d); }
};

void check_cancelled(GCancellable* cancellable)
{
    if (cancellable && g_cancellable_is_cancelled(cancellable))
        throw Cancelled();
}

// The extended attributes of the open file `fd`, sorted by name.
void read_xattrs(int fd, const std::string& path, Node& node, ImportResult& result)
{
    std::string names(1024, '\0');
    ssize_t n;
    while ((n = ::flistxattr(fd, names.data(), names.size())) < 0 && errno == ERANGE)
        names.resize(names.size() * 4);
    if (n < 0) {
        if (errno == ENOTSUP)
            return;
        throw_errno("list extended attributes of " + path);
    }
    for (size_t pos = 0; pos < static_cast<size_t>(n);) {
        std::string name(names.c_str() + pos);
        pos += name.size() + 1;
        if (!keeps_xattr(name)) {
            result.dropped_xattrs.push_back(path + " (" + name + ")");
            continue;
        }
        ssize_t size = ::fgetxattr(fd, name.c_str(), nullptr, 0);
        if (size < 0)
            throw_errno("read extended attribute " + name + " of " + path);
        std::string value(static_cast<size_t>(size), '\0');
        size = ::fgetxattr(fd, name.c_str(), value.data(), value.size());
        if (size < 0)
            throw_errno("read extended attribute " + name + " of " + path);
        value.resize(static_cast<size_t>(size));
        node.xattrs.emplace_back(name, value);
    }
    std::sort(node.xattrs.begin(), node.xattrs.end());
}

void import_dir_entries(int dirfd, dev_t root_dev, const std::string& relpath, Node& into, ImportResult& result,
                        GCancellable* cancellable)
{
    int dupfd = ::fcntl(dirfd, F_DUPFD_CLOEXEC, 0);
    if (dupfd < 0)
        throw_errno("dup");
    std::unique_ptr<DIR, DirCloser> dir(::fdopendir(dupfd));
    if (!dir) {
        ::close(dupfd);
        throw_errno("opendir " + (relpath.empty() ? std::string(".") : relpath));
    }
    for (;;) {
        errno = 0;
        struct dirent* entry = ::readdir(dir.get());
        if (!entry) {
            if (errno != 0)
                throw_errno("readdir " + relpath);
            break;
        }
        std::string name = entry->d_name;
        if (name == "." || name == "..")
            continue;
        check_cancelled(cancellable);
        std::string path = join(relpath, name);
        struct stat st {};
        if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
            throw_errno("stat " + path);
        if (!is_committable(st.st_mode)) {
            result.dropped_special.push_back(path + " (" + special_kind_name(st.st_mode) + ")");
            continue;
        }
        std::unique_ptr<Node> node;
        if (S_ISDIR(st.st_mode)) {
            node = Node::directory(st.st_mode & 07777, st.st_uid, st.st_gid);
            if (st.st_dev != root_dev) {
                result.skipped_mounts.push_back(path);
            } else {
                UniqueFd child(::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
                if (!child)
                    throw_errno("open " + path);
                read_xattrs(child.get(), path, *node, result);
                import_dir_entries(child.get(), root_dev, path, *node, result, cancellable);
            }
        } else if (S_ISLNK(st.st_mode)) {
            node = Node::symlink(read_symlink_at(dirfd, name.c_str(), path), st.st_uid, st.st_gid);
        } else {
            node = std::make_unique<Node>();
            node->kind = Node::Kind::Regular;
            node->uid = st.st_uid;
            node->gid = st.st_gid;
            node->mode = st.st_mode & 07777;
            node->size = static_cast<uint64_t>(st.st_size);
            node->source.origin = FileSource::Origin::InputTree;
            node->source.path = path;
            // O_PATH would do for the attributes, but flistxattr needs a real open.
            UniqueFd file(::openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
            if (!file)
                throw_errno("open " + path);
            read_xattrs(file.get(), path, *node, result);
        }
        into.children.emplace(std::move(name), std::move(node));
    }
}

struct ArchiveReadFree {
    void operator()(struct archive* a) const { archive_read_free(a); }
};
using ArchiveReader = std::unique_ptr<struct archive, ArchiveReadFree>;

std::string archive_error(struct archive* a)
{
    const char* message = archive_error_string(a);
    return message ? message : "unknown libarchive error";
}

// "./usr/bin/" -> "usr/bin"; refuses absolute paths and "..".
std::string tar_entry_path(const char* raw, std::string_view what)
{
    if (!raw)
        throw Error(std::string(what) + ": entry without a path");
    std::string_view path(raw);
    std::string joined;
    for (const auto& part : fs::split_relative_path(path, std::string(what) + " '" + std::string(path) + "'"))
        joined += (joined.empty() ? "" : "/") + part;
    return joined;
}

} // namespace

bool keeps_xattr(std::string_view name)
{
    return name != "security.selinux";
}

ImportResult import_directory(const std::filesystem::path& dir, GCancellable* cancellable)
{
    ImportResult result;
    UniqueFd root = fs::open_directory(dir);
    struct stat st {};
    if (::fstat(root.get(), &st) != 0)
        throw_errno("stat " + dir.string());
    Node& top = result.tree.root();
    top.mode = st.st_mode & 07777;
    top.uid = st.st_uid;
    top.gid = st.st_gid;
    read_xattrs(root.get(), ".", top, result);
    import_dir_entries(root.get(), st.st_dev, "", top, result, cancellable);
    result.tree.set_input_root(std::move(root));
    return result;
}

// The entry's pax extended attributes (SCHILY.xattr.*), sorted by name.
void tar_xattrs(struct archive_entry* entry, const std::string& path, Node& node, ImportResult& result)
{
    const char* name = nullptr;
    const void* value = nullptr;
    size_t size = 0;
    archive_entry_xattr_reset(entry);
    std::set<std::string> seen; // libarchive reports an attribute stored both as LIBARCHIVE.xattr and SCHILY.xattr twice
    while (archive_entry_xattr_next(entry, &name, &value, &size) == ARCHIVE_OK) {
        if (!seen.insert(name).second)
            continue;
        if (!keeps_xattr(name)) {
            result.dropped_xattrs.push_back(path + " (" + name + ")");
            continue;
        }
        node.xattrs.emplace_back(name, std::string(static_cast<const char*>(value), size));
    }
    std::sort(node.xattrs.begin(), node.xattrs.end());
}

// The decompressed bytes of a tarball, handed to the tar reader and shown to
// the header scanner on the way.
struct TarStream {
    ArchiveReader raw;
    TarHeaderScanner scanner;
    char buffer[1 << 16];

    static la_ssize_t read(struct archive* tar, void* self, const void** out)
    {
        auto* stream = static_cast<TarStream*>(self);
        la_ssize_t n = archive_read_data(stream->raw.get(), stream->buffer, sizeof stream->buffer);
        if (n < 0) {
            archive_set_error(tar, archive_errno(stream->raw.get()), "%s", archive_error(stream->raw.get()).c_str());
            return -1;
        }
        stream->scanner.feed(stream->buffer, static_cast<size_t>(n));
        *out = stream->buffer;
        return n;
    }
};

// GNU tar refuses to replace a directory with anything else: so do we,
// rather than silently dropping what the directory held.
void refuse_replacing_directory(const Tree& tree, const std::string& path, const char* what)
{
    const Node* existing = tree.find(path);
    if (existing && existing->is_dir())
        throw Error("tarball entry " + path + ": a " + what + " after the directory " + path + " ("
                    + std::to_string(existing->children.size()) + " entries) would replace it");
}

ImportResult import_tarball(const std::filesystem::path& tarball, const std::filesystem::path& scratch_dir,
                            GCancellable* cancellable)
{
    ImportResult result;
    UniqueFd scratch = fs::open_directory(scratch_dir);
    // Two readers: one undoes the compression, the other reads tar from its
    // output, which the header scanner sees on the way.
    TarStream stream;
    stream.raw.reset(archive_read_new());
    ArchiveReader reader(archive_read_new());
    if (!stream.raw || !reader)
        throw Error("archive_read_new failed");
    archive_read_support_filter_all(stream.raw.get());
    archive_read_support_format_raw(stream.raw.get());
    if (archive_read_open_filename(stream.raw.get(), tarball.c_str(), 1 << 16) != ARCHIVE_OK)
        throw Error("open " + tarball.string() + ": " + archive_error(stream.raw.get()));
    struct archive_entry* raw_entry = nullptr;
    if (archive_read_next_header(stream.raw.get(), &raw_entry) != ARCHIVE_OK)
        throw Error("read " + tarball.string() + ": " + archive_error(stream.raw.get()));
    archive_read_support_format_tar(reader.get());
    if (archive_read_open(reader.get(), &stream, nullptr, TarStream::read, nullptr) != ARCHIVE_OK)
        throw Error("read " + tarball.string() + ": " + archive_error(reader.get()));

    uint64_t extracted = 0;
    struct archive_entry* entry = nullptr;
    for (;;) {
        int rc = archive_read_next_header(reader.get(), &entry);
        if (rc == ARCHIVE_EOF)
            break;
        if (rc != ARCHIVE_OK && rc != ARCHIVE_WARN)
            throw Error("read " + tarball.string() + ": " + archive_error(reader.get()));
        check_cancelled(cancellable);
        std::string path = tar_entry_path(archive_entry_pathname(entry), "tarball entry");
        if (auto raw_type = stream.scanner.next_entry_type(); raw_type && !known_tar_type(*raw_type))
            result.unknown_types.push_back(path + " (type '" + std::string(1, *raw_type) + "')");
        mode_t type = archive_entry_filetype(entry);
        uid_t uid = static_cast<uid_t>(archive_entry_uid(entry));
        gid_t gid = static_cast<gid_t>(archive_entry_gid(entry));
        mode_t perm = archive_entry_perm(entry) & 07777;

        if (const char* link = archive_entry_hardlink(entry)) {
            std::string target = tar_entry_path(link, "tarball hardlink " + path);
            const Node* existing = result.tree.find(target);
            if (!existing || !existing->is_regular())
                throw Error("tarball entry " + path + ": hardlink to " + target + ", which is not a regular file before it");
            refuse_replacing_directory(result.tree, path, "hardlink");
            auto node = std::make_unique<Node>();
            node->kind = Node::Kind::Regular;
            node->uid = existing->uid;
            node->gid = existing->gid;
            node->mode = existing->mode;
            node->size = existing->size;
            node->source = existing->source;
            node->xattrs = existing->xattrs;
            result.tree.put(path, std::move(node));
            continue;
        }
        if (type != AE_IFDIR && type != AE_IFLNK && type != AE_IFREG && !S_ISCHR(type) && !S_ISBLK(type)
            && !S_ISFIFO(type) && !S_ISSOCK(type)) {
            char octal[16];
            std::snprintf(octal, sizeof octal, "0%o", static_cast<unsigned>(type));
            throw Error("tarball entry " + path + ": unknown entry type " + octal + " (not a file, directory or symlink)");
        }
        if (!is_committable(type)) {
            result.dropped_special.push_back(path + " (" + special_kind_name(type) + ")");
            continue;
        }
        if (path.empty()) { // "./": the root directory itself
            if (type != AE_IFDIR)
                throw Error("tarball entry '.': not a directory");
            Node& root = result.tree.root();
            root.mode = perm;
            root.uid = uid;
            root.gid = gid;
            continue;
        }
        if (type == AE_IFDIR) {
            Node* existing = result.tree.find(path);
            if (existing && existing->is_dir()) {
                existing->mode = perm;
                existing->uid = uid;
                existing->gid = gid;
                existing->xattrs.clear();
                tar_xattrs(entry, path, *existing, result);
            } else {
                tar_xattrs(entry, path, result.tree.put(path, Node::directory(perm, uid, gid)), result);
            }
        } else if (type == AE_IFLNK) {
            refuse_replacing_directory(result.tree, path, "symlink");
            const char* target = archive_entry_symlink(entry);
            result.tree.put(path, Node::symlink(target ? target : "", uid, gid));
        } else {
            refuse_replacing_directory(result.tree, path, "regular file");
            std::string name = std::to_string(extracted++);
            // Place the node first: a path through a symlink fails before any byte is written.
            auto node = std::make_unique<Node>();
            node->kind = Node::Kind::Regular;
            node->uid = uid;
            node->gid = gid;
            node->mode = perm;
            node->source.origin = FileSource::Origin::Scratch;
            node->source.path = name;
            Node& placed = result.tree.put(path, std::move(node));
            tar_xattrs(entry, path, placed, result);
            UniqueFd out(::openat(scratch.get(), name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
            if (!out)
                throw_errno("extract " + path);
            if (archive_read_data_into_fd(reader.get(), out.get()) != ARCHIVE_OK)
                throw Error("extract " + path + ": " + archive_error(reader.get()));
            struct stat st {};
            if (::fstat(out.get(), &st) != 0)
                throw_errno("stat extracted " + path);
            placed.size = static_cast<uint64_t>(st.st_size);
        }
    }
    result.tree.set_scratch_root(std::move(scratch));
    return result;
}

ImportResult import_rootfs(const std::filesystem::path& input, const std::filesystem::path& scratch_dir,
                           GCancellable* cancellable)
{
    std::error_code ec;
    auto status = std::filesystem::status(input, ec);
    if (ec || !std::filesystem::exists(status))
        throw Error(input.string() + ": no such file or directory");
    if (std::filesystem::is_directory(status))
        return import_directory(input, cancellable);
    if (std::filesystem::is_regular_file(status))
        return import_tarball(input, scratch_dir, cancellable);
    throw Error(input.string() + ": neither a directory nor a tarball");
}

} // namespace treeflash::builder
