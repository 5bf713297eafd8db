#include "flasher/station/ext4_writer.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "flasher/disk/ext2fs_handles.hpp"

#include <ctime>
#include <vector>

namespace treeflash::flasher {

namespace {

std::string ext2_error(errcode_t rc) { return error_message(rc); }

void check(errcode_t rc, const std::string& what)
{
    if (rc)
        throw Error(what + ": " + ext2_error(rc));
}

// The names of `relpath`, each a valid ext4 name: libext2fs takes some of
// them as C strings, so a NUL inside would cut a name short.
std::vector<std::string> names_of(const std::string& relpath, const char* what)
{
    if (relpath.find('\0') != std::string::npos)
        throw Error(std::string(what) + ": a path holds a NUL byte");
    auto parts = fs::split_relative_path(relpath, what);
    for (const auto& part : parts)
        if (part.size() > EXT2_NAME_LEN)
            throw Error(std::string(what) + " " + relpath + ": a name is longer than 255 bytes");
    return parts;
}

} // namespace

struct Ext4Writer::Impl {
    Ext2Filesystem fs;
    std::string where; // "ext4 at byte N of PATH", for errors

    // The directory inode of `parts[0..count)`, every component a directory.
    ext2_ino_t directory(const std::vector<std::string>& parts, size_t count, const std::string& relpath)
    {
        ext2_ino_t ino = EXT2_ROOT_INO;
        for (size_t i = 0; i < count; ++i) {
            ext2_ino_t next = 0;
            errcode_t rc = ext2fs_lookup(fs.get(), ino, parts[i].c_str(), static_cast<int>(parts[i].size()), nullptr, &next);
            if (rc == EXT2_ET_FILE_NOT_FOUND)
                throw Error(relpath + ": " + parts[i] + " does not exist in " + where);
            check(rc, "look up " + parts[i] + " in " + where);
            ext2_inode inode {};
            check(ext2fs_read_inode(fs.get(), next, &inode), "read the inode of " + parts[i]);
            if (!LINUX_S_ISDIR(inode.i_mode))
                throw Error(relpath + ": " + parts[i] + " is not a directory in " + where
                            + (LINUX_S_ISLNK(inode.i_mode) ? " (a symlink, not followed)" : ""));
            ino = next;
        }
        return ino;
    }

    // ext2fs_link, growing the directory when its blocks are full.
    void link(ext2_ino_t dir, const std::string& name, ext2_ino_t ino, int type)
    {
        errcode_t rc = ext2fs_link(fs.get(), dir, name.c_str(), ino, type);
        if (rc == EXT2_ET_DIR_NO_SPACE) {
            check(ext2fs_expand_dir(fs.get(), dir), "grow a directory in " + where);
            rc = ext2fs_link(fs.get(), dir, name.c_str(), ino, type);
        }
        check(rc, "add " + name + " to its directory in " + where);
    }

    // Points the entry `name` of `dir` at inode `ino` (a regular file), in
    // the directory block itself: the name never goes missing.
    void repoint(ext2_ino_t dir, const std::string& name, ext2_ino_t ino)
    {
        struct Change {
            const std::string* name;
            ext2_ino_t ino;
            bool done;
        } change{&name, ino, false};
        auto each = [](ext2_ino_t, int, struct ext2_dir_entry* entry, int, int, char*, void* data) -> int {
            auto* c = static_cast<Change*>(data);
            if (entry->inode == 0
                || static_cast<size_t>(ext2fs_dirent_name_len(entry)) != c->name->size()
                || c->name->compare(0, c->name->size(), entry->name, c->name->size()) != 0)
                return 0;
            entry->inode = c->ino;
            ext2fs_dirent_set_file_type(entry, EXT2_FT_REG_FILE);
            c->done = true;
            return DIRENT_CHANGED | DIRENT_ABORT;
        };
        check(ext2fs_dir_iterate2(fs.get(), dir, 0, nullptr, each, &change), "update " + name + " in " + where);
        if (!change.done)
            throw Error(name + " vanished from its directory in " + where);
    }

    // One link fewer to inode `ino`, which no longer has the name `name`;
    // the inode, its blocks and its extended attribute block are freed when
    // that was its last link.
    void release(const std::string& name, ext2_ino_t ino)
    {
        ext2_inode_large inode {};
        check(ext2fs_read_inode_full(fs.get(), ino, reinterpret_cast<ext2_inode*>(&inode), sizeof inode),
              "read the inode of the old " + name);
        if (inode.i_links_count > 1) {
            --inode.i_links_count;
            check(ext2fs_write_inode_full(fs.get(), ino, reinterpret_cast<ext2_inode*>(&inode), sizeof inode),
                  "write the inode of the old " + name);
            return;
        }
        check(ext2fs_free_ext_attr(fs.get(), ino, &inode), "free the attributes of the old " + name);
        inode.i_links_count = 0;
        inode.i_dtime = static_cast<uint32_t>(::time(nullptr));
        auto* plain = reinterpret_cast<ext2_inode*>(&inode);
        if (ext2fs_inode_has_valid_blocks2(fs.get(), plain))
            check(ext2fs_punch(fs.get(), ino, plain, nullptr, 0, ~0ULL), "free the blocks of the old " + name);
        check(ext2fs_write_inode_full(fs.get(), ino, plain, sizeof inode), "write the inode of the old " + name);
        ext2fs_inode_alloc_stats2(fs.get(), ino, -1, 0);
    }

};

Ext4Writer::Ext4Writer(const std::string& path, uint64_t offset) : m(std::make_unique<Impl>())
{
    m->where = "the ext4 at byte " + std::to_string(offset) + " of " + path;
    ext2_filsys raw = nullptr;
    std::string io_options = "offset=" + std::to_string(offset);
    errcode_t rc = ext2fs_open2(path.c_str(), io_options.c_str(), EXT2_FLAG_RW | EXT2_FLAG_64BITS, 0, 0,
                                unix_io_manager, &raw);
    if (rc)
        throw Error("no ext2/3/4 file system at byte " + std::to_string(offset) + " of " + path + ": " + ext2_error(rc));
    m->fs.reset(raw);
    if (ext2fs_has_feature_journal_needs_recovery(raw->super))
        throw Error(m->where + " was not cleanly unmounted (its journal needs recovery); not writing to it");
    check(ext2fs_read_bitmaps(raw), "read the allocation bitmaps of " + m->where);
}

Ext4Writer::~Ext4Writer() = default;

void Ext4Writer::make_directories(const std::string& relpath)
{
    auto parts = names_of(relpath, "create");
    ext2_ino_t dir = EXT2_ROOT_INO;
    for (size_t i = 0; i < parts.size(); ++i) {
        ext2_ino_t next = 0;
        errcode_t rc = ext2fs_lookup(m->fs.get(), dir, parts[i].c_str(), static_cast<int>(parts[i].size()), nullptr, &next);
        if (rc == EXT2_ET_FILE_NOT_FOUND) {
            rc = ext2fs_mkdir(m->fs.get(), dir, 0, parts[i].c_str());
            if (rc == EXT2_ET_DIR_NO_SPACE) {
                check(ext2fs_expand_dir(m->fs.get(), dir), "grow a directory in " + m->where);
                rc = ext2fs_mkdir(m->fs.get(), dir, 0, parts[i].c_str());
            }
            check(rc, "create " + parts[i] + " in " + m->where);
            check(ext2fs_lookup(m->fs.get(), dir, parts[i].c_str(), static_cast<int>(parts[i].size()), nullptr, &next),
                  "look up the new " + parts[i]);
            ext2_inode inode {};
            check(ext2fs_read_inode(m->fs.get(), next, &inode), "read the inode of " + parts[i]);
            inode.i_mode = LINUX_S_IFDIR | 0755;
            inode.i_uid = inode.i_gid = 0;
            ext2fs_set_i_uid_high(inode, 0);
            ext2fs_set_i_gid_high(inode, 0);
            check(ext2fs_write_inode(m->fs.get(), next, &inode), "write the inode of " + parts[i]);
        } else {
            check(rc, "look up " + parts[i] + " in " + m->where);
            ext2_inode inode {};
            check(ext2fs_read_inode(m->fs.get(), next, &inode), "read the inode of " + parts[i]);
            if (!LINUX_S_ISDIR(inode.i_mode))
                throw Error(relpath + ": " + parts[i] + " is not a directory in " + m->where
                            + (LINUX_S_ISLNK(inode.i_mode) ? " (a symlink, not followed)" : ""));
        }
        dir = next;
    }
}

void Ext4Writer::write_file(const std::string& relpath, const std::string& data, unsigned mode, unsigned uid,
                            unsigned gid)
{
    auto parts = names_of(relpath, "write");
    if (parts.empty())
        throw Error("write: no file name in '" + relpath + "'");
    ext2_filsys fs = m->fs.get();
    ext2_ino_t dir = m->directory(parts, parts.size() - 1, relpath);
    const std::string& name = parts.back();

    ext2_ino_t old = 0;
    errcode_t rc = ext2fs_lookup(fs, dir, name.c_str(), static_cast<int>(name.size()), nullptr, &old);
    if (rc && rc != EXT2_ET_FILE_NOT_FOUND)
        check(rc, "look up " + name + " in " + m->where);
    if (!rc) {
        ext2_inode inode {};
        check(ext2fs_read_inode(fs, old, &inode), "read the inode of " + relpath);
        if (!LINUX_S_ISREG(inode.i_mode))
            throw Error(relpath + " in " + m->where + " is not a regular file"
                        + (LINUX_S_ISLNK(inode.i_mode) ? " (a symlink, not followed)" : "") + "; not replacing it");
    }

    ext2_ino_t ino = 0;
    check(ext2fs_new_inode(fs, dir, LINUX_S_IFREG | 0600, nullptr, &ino), "allocate an inode in " + m->where);
    ext2_inode inode {};
    inode.i_mode = static_cast<uint16_t>(LINUX_S_IFREG | (mode & 07777));
    inode.i_uid = static_cast<uint16_t>(uid);
    inode.i_gid = static_cast<uint16_t>(gid);
    ext2fs_set_i_uid_high(inode, uid >> 16);
    ext2fs_set_i_gid_high(inode, gid >> 16);
    inode.i_atime = inode.i_ctime = inode.i_mtime = static_cast<uint32_t>(::time(nullptr));
    inode.i_links_count = 1;
    check(ext2fs_inode_size_set(fs, &inode, data.size()), "set the size of " + relpath);
    if (ext2fs_has_feature_extents(fs->super)) {
        // An empty extent tree in the inode, as the kernel writes for a new file.
        ext2_extent_handle_t handle = nullptr;
        check(ext2fs_extent_open2(fs, ino, &inode, &handle), "start the extent tree of " + relpath);
        ext2fs_extent_free(handle);
    }
    check(ext2fs_write_new_inode(fs, ino, &inode), "write the inode of " + relpath);
    ext2fs_inode_alloc_stats2(fs, ino, +1, 0);

    ext2_file_t file = nullptr;
    check(ext2fs_file_open(fs, ino, EXT2_FILE_WRITE, &file), "open the new " + relpath);
    unsigned int written = 0;
    rc = data.empty() ? 0 : ext2fs_file_write(file, data.data(), static_cast<unsigned int>(data.size()), &written);
    errcode_t closed = ext2fs_file_close(file);
    check(rc, "write " + relpath + " in " + m->where);
    check(closed, "finish " + relpath + " in " + m->where);
    if (written != data.size())
        throw Error("write " + relpath + " in " + m->where + ": " + std::to_string(written) + " of "
                    + std::to_string(data.size()) + " bytes written");

    // The new file takes the name only now: until here, the old one stayed.
    if (old) {
        m->repoint(dir, name, ino);
        m->release(relpath, old);
    } else {
        m->link(dir, name, ino, EXT2_FT_REG_FILE);
    }
}

void Ext4Writer::close()
{
    ext2_filsys fs = m->fs.release();
    check(ext2fs_close_free(&fs), "write the metadata of " + m->where);
}

} // namespace treeflash::flasher
