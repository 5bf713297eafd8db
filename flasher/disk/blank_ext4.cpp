#include "flasher/disk/blank_ext4.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/process.hpp"
#include "common/sha256.hpp"
#include "common/text.hpp"
#include "flasher/disk/ext2fs_handles.hpp"
#include "flasher/disk/format.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <dirent.h>
#include <dlfcn.h>
#include <et/com_err.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

extern char** environ;

namespace treeflash::flasher {

namespace {

// Blank file systems kept at most (the oldest go first); a few MiB each.
constexpr size_t kept_filesystems = 16;
// What a flash killed while making one leaves, removed after this long.
constexpr time_t abandoned_after = 3600;

void random_bytes(void* into, size_t size)
{
    auto* bytes = static_cast<unsigned char*>(into);
    for (size_t done = 0; done < size;) {
        ssize_t n = ::getrandom(bytes + done, size - done, 0);
        if (n < 0 && errno != EINTR)
            throw_errno("getrandom");
        if (n > 0)
            done += static_cast<size_t>(n);
    }
}

// Whether the file system's UUID can change without rewriting every
// metadata block (tune2fs -U's test).
bool identity_can_change(ext2_filsys fs)
{
    ext2_super_block* sb = fs->super;
    if (ext2fs_has_feature_stable_inodes(sb))
        return false;
    return ext2fs_has_feature_csum_seed(sb)
           || (!ext2fs_has_feature_metadata_csum(sb) && !ext2fs_has_feature_ea_inode(sb));
}

Ext2Filesystem open_ext4(const std::string& path, int flags)
{
    ext2_filsys raw = nullptr;
    errcode_t err = ext2fs_open2(path.c_str(), nullptr, flags | EXT2_FLAG_64BITS, 0, 0, unix_io_manager, &raw);
    if (err)
        throw Error("open the ext4 file system on " + path + ": " + error_message(err));
    return Ext2Filesystem(raw);
}

// Whether the file system on `path` is as mkfs.ext4 left it: never
// mounted, nothing to recover, no errors, labelled `label`.
bool as_mkfs_left_it(const std::string& path, const std::string& label)
{
    Ext2Filesystem fs = open_ext4(path, 0);
    const ext2_super_block* sb = fs->super;
    const auto* volume = reinterpret_cast<const char*>(sb->s_volume_name);
    return (sb->s_state & EXT2_VALID_FS) && !(sb->s_state & EXT2_ERROR_FS) && sb->s_mnt_count == 0
           && !ext2fs_has_feature_journal_needs_recovery(fs->super)
           && std::string(volume, ::strnlen(volume, sizeof sb->s_volume_name)) == label;
}

// mke2fs reads variables besides its configuration file (fake times,
// sector sizes, meta_bg placement): with any of them set, what it makes
// is not what an earlier run made.
bool mke2fs_environment_is_plain()
{
    for (char** e = environ; *e; ++e) {
        std::string_view entry(*e);
        if ((entry.rfind("MKE2FS_", 0) == 0 && entry.rfind("MKE2FS_CONFIG=", 0) != 0) || entry.rfind("E2FSPROGS_", 0) == 0)
            return false;
    }
    return true;
}

// What tells one file of the system from its next version.
std::string file_identity(const std::string& path)
{
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
        return path + " none\n";
    return path + " " + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + " " + std::to_string(st.st_size)
           + " " + std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + "\n";
}

// The name a blank file system is kept under: everything that decides
// what mkfs.ext4 writes (the program, the library it runs on, its
// configuration, the size and the arguments).
std::string kept_name(uint64_t size, const std::string& label, const std::vector<std::string>& options)
{
    std::string key = "treeflash blank ext4 1\n" + file_identity(program_path("mkfs.ext4"));
    Dl_info library{};
    if (::dladdr(reinterpret_cast<void*>(&ext2fs_open2), &library) && library.dli_fname)
        key += file_identity(library.dli_fname);
    const char* config = std::getenv("MKE2FS_CONFIG");
    key += file_identity(config ? config : "/etc/mke2fs.conf");
    key += std::to_string(size) + "\n" + label + "\n";
    for (const auto& option : options)
        key += option + '\0';
    return sha256_hex(key).substr(0, 32);
}

// Whether no one but this user (and root) can change what a folder holds:
// theirs, and writable by no one else (a sticky folder of root's, such as
// /tmp, lets no one else rename or remove what is in it).
bool folder_is_ours(int fd, bool last)
{
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISDIR(st.st_mode))
        return false;
    if (last)
        return st.st_uid == ::geteuid() && (st.st_mode & 077) == 0;
    if (st.st_uid != ::geteuid() && st.st_uid != 0)
        return false;
    return (st.st_mode & 022) == 0 || (st.st_uid == 0 && (st.st_mode & S_ISVTX));
}

// The cache folder, walked from / without following links, each missing
// folder made 0700; empty when any folder on the way is someone else's (root
// with a user's HOME, say): then no one else can put a file system there,
// nor have root make folders in their place.
UniqueFd open_cache_folder(const std::filesystem::path& dir)
{
    if (!dir.is_absolute())
        return {};
    UniqueFd folder(::open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    std::vector<std::string> parts;
    for (const auto& part : dir.relative_path())
        if (!part.empty())
            parts.push_back(part.string());
    for (size_t i = 0; folder && i < parts.size(); ++i) {
        if (parts[i] == "." || parts[i] == "..")
            return {};
        if (!folder_is_ours(folder.get(), false))
            return {};
        UniqueFd next(::openat(folder.get(), parts[i].c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!next && errno == ENOENT && ::mkdirat(folder.get(), parts[i].c_str(), 0700) == 0)
            next.reset(::openat(folder.get(), parts[i].c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        folder = std::move(next);
    }
    if (!folder || !folder_is_ours(folder.get(), true))
        return {};
    return folder;
}

// A kept file system of `size` bytes, opened; empty when there is none fit
// to copy (missing, not a file of this user's, another size).
UniqueFd open_kept(int folder, const std::string& name, uint64_t size)
{
    UniqueFd file(::openat(folder, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)); // a FIFO does not block
    struct stat st {};
    if (!file || ::fstat(file.get(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid()
        || static_cast<uint64_t>(st.st_size) != size)
        return {};
    ::futimens(file.get(), nullptr); // recently used: kept longer
    return file;
}

// Keeps the `kept_filesystems` most recently used, and removes what
// flashes killed while making one left behind.
void prune(int folder)
{
    UniqueFd listing(::fcntl(folder, F_DUPFD_CLOEXEC, 0));
    DIR* dir = listing ? ::fdopendir(listing.get()) : nullptr;
    if (!dir)
        return;
    (void)listing.release(); // closedir closes it
    std::vector<std::pair<time_t, std::string>> kept;
    time_t now = ::time(nullptr);
    while (dirent* entry = ::readdir(dir)) {
        std::string name = entry->d_name;
        struct stat st {};
        if (name == "." || name == ".." || ::fstatat(folder, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
            continue;
        if (name.rfind(".new-", 0) == 0) {
            if (now - st.st_mtim.tv_sec > abandoned_after)
                ::unlinkat(folder, name.c_str(), 0);
            continue;
        }
        kept.emplace_back(st.st_mtim.tv_sec, name);
    }
    ::closedir(dir);
    if (kept.size() <= kept_filesystems)
        return;
    std::sort(kept.begin(), kept.end());
    for (size_t i = 0; i + kept_filesystems < kept.size(); ++i)
        ::unlinkat(folder, kept[i].second.c_str(), 0);
}

// Frees what reads zero but holds disk space: without uninit_bg, mkfs.ext4
// zeroes every inode table with fallocate(FALLOC_FL_ZERO_RANGE), which on a
// file takes size/64 of disk for nothing (unwritten extents, which SEEK_DATA
// reports as holes).
void punch_holes(int fd, uint64_t size, const std::string& what)
{
    uint64_t pos = 0;
    auto punch = [&](uint64_t to) {
        if (to > pos && ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(pos),
                                    static_cast<off_t>(to - pos)) != 0 && errno != EOPNOTSUPP)
            throw_errno("free the unwritten blocks of " + what);
    };
    for (const auto& [from, to] : fs::data_extents(fd, size, what)) {
        punch(from);
        pos = to;
    }
    punch(size);
}

// mkfs.ext4 into a new file of the cache, moved into place under `name`
// once made and checked. Empty when its UUID could not change in place:
// then `name`.mkfs is left to say so, and mkfs.ext4 runs on each card.
UniqueFd make_kept(int folder, const std::filesystem::path& dir, const std::string& name, uint64_t size,
                   const std::string& label, const std::vector<std::string>& options, GCancellable* cancellable)
{
    uint64_t tag = 0;
    random_bytes(&tag, sizeof tag);
    std::string temp = ".new-" + text::hex(tag);
    UniqueFd file(::openat(folder, temp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (!file)
        throw_errno("create " + (dir / temp).string());
    bool suitable = false;
    try {
        if (::ftruncate(file.get(), static_cast<off_t>(size)) != 0)
            throw_errno("size " + (dir / temp).string());
        // Through the descriptor: a folder swapped meanwhile cannot send
        // mkfs.ext4 anywhere else.
        make_ext4("/dev/fd/3", label, options, true, cancellable, file.get());
        std::string made = "/proc/self/fd/" + std::to_string(file.get());
        verify_filesystem(made, "ext4", label);
        suitable = identity_can_change(open_ext4(made, 0).get());
        if (suitable)
            punch_holes(file.get(), size, (dir / temp).string());
        if (suitable && ::fsync(file.get()) != 0)
            throw_errno("sync " + (dir / temp).string());
    } catch (...) {
        ::unlinkat(folder, temp.c_str(), 0);
        throw;
    }
    if (!suitable) {
        ::unlinkat(folder, temp.c_str(), 0);
        UniqueFd marker(::openat(folder, (name + ".mkfs").c_str(), O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
        return {};
    }
    if (::renameat(folder, temp.c_str(), folder, (name + ".ext4").c_str()) != 0) {
        ::unlinkat(folder, temp.c_str(), 0);
        throw_errno("keep " + (dir / (name + ".ext4")).string());
    }
    prune(folder);
    return file;
}

// Copies the byte ranges of `from` that hold data to the same offsets of
// `to`; its other bytes already read zero.
void copy_data(int from, int to, uint64_t size, const std::string& what)
{
    for (const auto& [start, end] : fs::data_extents(from, size, what)) {
        if (::lseek(to, static_cast<off_t>(start), SEEK_SET) != static_cast<off_t>(start))
            throw_errno("seek " + what);
        for (auto in = static_cast<off_t>(start); in < static_cast<off_t>(end);) {
            ssize_t n = ::sendfile(to, from, &in, static_cast<size_t>(end) - static_cast<size_t>(in));
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                throw_errno("copy " + what);
        }
    }
}

uint64_t size_of(int fd, const std::string& node)
{
    struct stat st {};
    if (::fstat(fd, &st) != 0)
        throw_errno("stat " + node);
    if (S_ISREG(st.st_mode))
        return static_cast<uint64_t>(st.st_size);
    uint64_t size = 0;
    if (::ioctl(fd, BLKGETSIZE64, &size) != 0)
        throw_errno("size of " + node);
    return size;
}

} // namespace

std::optional<std::filesystem::path> blank_ext4_cache_dir()
{
    if (const char* off = std::getenv("TREEFLASH_BLANK_CACHE"); off && std::string_view(off) == "off")
        return std::nullopt;
    if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && xdg[0] == '/')
        return std::filesystem::path(xdg) / "treeflash" / "blank-ext4";
    if (const char* home = std::getenv("HOME"); home && home[0] == '/')
        return std::filesystem::path(home) / ".cache" / "treeflash" / "blank-ext4";
    return std::nullopt;
}

bool give_new_identity(const std::string& path)
{
    Ext2Filesystem fs = open_ext4(path, EXT2_FLAG_RW | EXT2_FLAG_SKIP_MMP); // no one else can use it
    if (!identity_can_change(fs.get()))
        return false;
    // Group descriptor checksums (uninit_bg) are seeded by the UUID: set
    // again, unless they were wrong before (then left for e2fsck to see).
    bool set_group_checksums = ext2fs_has_group_desc_csum(fs.get());
    for (dgrp_t group = 0; set_group_checksums && group < fs->group_desc_count; ++group)
        set_group_checksums = ext2fs_group_desc_csum_verify(fs.get(), group);
    random_bytes(fs->super->s_uuid, sizeof fs->super->s_uuid);
    fs->super->s_uuid[6] = static_cast<__u8>((fs->super->s_uuid[6] & 0x0f) | 0x40); // version 4: random
    fs->super->s_uuid[8] = static_cast<__u8>((fs->super->s_uuid[8] & 0x3f) | 0x80);
    random_bytes(fs->super->s_hash_seed, sizeof fs->super->s_hash_seed);
    ext2fs_init_csum_seed(fs.get());
    fs->super->s_mkfs_time = static_cast<__u32>(::time(nullptr)); // made now, for whoever reads the card
    if (set_group_checksums) {
        for (dgrp_t group = 0; group < fs->group_desc_count; ++group)
            ext2fs_group_desc_csum_set(fs.get(), group);
        fs->flags &= ~EXT2_FLAG_SUPER_ONLY;
    }
    ext2fs_mark_super_dirty(fs.get());
    ext2_filsys raw = fs.release();
    if (errcode_t err = ext2fs_close_free(&raw))
        throw Error("write the new UUID of " + path + ": " + error_message(err));
    return true;
}

namespace {

// Puts a copy of the kept blank file system on `node`, making it first when
// there is none; false when the cache cannot give one (unsuitable folder or
// file system, or a kept file not as mkfs.ext4 left it, which is removed).
bool copy_kept(const std::string& node, const std::string& label, const std::vector<std::string>& options,
               const std::filesystem::path& cache_dir, GCancellable* cancellable)
{
    UniqueFd folder = mke2fs_environment_is_plain() ? open_cache_folder(cache_dir) : UniqueFd();
    if (!folder)
        return false;
    {
        // O_EXCL on a block device: refused while mounted or claimed.
        UniqueFd target(::open(node.c_str(), O_WRONLY | O_EXCL | O_CLOEXEC));
        if (!target)
            throw_errno("open " + node);
        uint64_t size = size_of(target.get(), node);
        const std::string name = kept_name(size, label, options);
        UniqueFd blank = open_kept(folder.get(), name + ".ext4", size);
        if (!blank && ::faccessat(folder.get(), (name + ".mkfs").c_str(), F_OK, AT_SYMLINK_NOFOLLOW) != 0)
            blank = make_kept(folder.get(), cache_dir, name, size, label, options, cancellable);
        if (!blank)
            return false;
        if (!as_mkfs_left_it("/proc/self/fd/" + std::to_string(blank.get()), label)) {
            ::unlinkat(folder.get(), (name + ".ext4").c_str(), 0); // made again next time
            return false;
        }
        copy_data(blank.get(), target.get(), size, node);
        if (::fsync(target.get()) != 0)
            throw_errno("sync " + node);
    }
    if (!give_new_identity(node))
        throw Error("the UUID of the copy on " + node + " cannot change"); // checked when it was kept
    return true;
}

} // namespace

void make_blank_ext4(const std::string& node, const std::string& label, const std::vector<std::string>& options,
                     const std::optional<std::filesystem::path>& cache_dir, GCancellable* cancellable)
{
    bool copied = false;
    if (cache_dir) {
        try {
            copied = copy_kept(node, label, options, *cache_dir, cancellable);
        } catch (const Cancelled&) {
            throw;
        } catch (const std::exception&) {
            // The cache only saves time (a full or read-only folder, say):
            // mkfs.ext4 below makes the file system, over whatever was copied.
        }
    }
    if (!copied)
        make_ext4(node, label, options, true, cancellable);
}

} // namespace treeflash::flasher
