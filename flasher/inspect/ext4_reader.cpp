#include "flasher/inspect/ext4_reader.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "flasher/disk/ext2fs_handles.hpp"

#include <cstring>
#include <sys/stat.h>

namespace treeflash::flasher {

struct Ext4Card::Impl {
    Ext2Filesystem fs;

    // The inode `relpath` names, every component looked up in its
    // directory; 0 when absent or when a symlink (or a file) is on the way.
    ext2_ino_t lookup(const std::string& relpath) const
    {
        ext2_ino_t ino = EXT2_ROOT_INO;
        std::vector<std::string> parts;
        try {
            parts = fs::split_relative_path(relpath, "read");
        } catch (const Error&) {
            return 0;
        }
        for (size_t i = 0; i < parts.size(); ++i) {
            ext2_inode inode {};
            if (ext2fs_read_inode(fs.get(), ino, &inode) || !LINUX_S_ISDIR(inode.i_mode))
                return 0;
            ext2_ino_t next = 0;
            if (ext2fs_lookup(fs.get(), ino, parts[i].c_str(), static_cast<int>(parts[i].size()), nullptr, &next))
                return 0;
            ino = next;
        }
        return ino;
    }

    bool inode(ext2_ino_t ino, ext2_inode& out) const { return ino && !ext2fs_read_inode(fs.get(), ino, &out); }

    std::string contents(ext2_ino_t ino, uint64_t size) const
    {
        ext2_file_t file = nullptr;
        if (ext2fs_file_open(fs.get(), ino, 0, &file))
            return "";
        std::string data(size, '\0');
        unsigned int got = 0;
        errcode_t rc = ext2fs_file_read(file, data.data(), static_cast<unsigned int>(size), &got);
        ext2fs_file_close(file);
        if (rc)
            return "";
        data.resize(got);
        return data;
    }
};

Ext4Card::Ext4Card(const std::string& path, uint64_t offset) : m(std::make_unique<Impl>())
{
    ext2_filsys raw = nullptr;
    std::string io_options = "offset=" + std::to_string(offset);
    // Read only; the journal is not replayed, nothing is written.
    errcode_t rc = ext2fs_open2(path.c_str(), io_options.c_str(), EXT2_FLAG_64BITS | EXT2_FLAG_IGNORE_CSUM_ERRORS, 0, 0,
                                unix_io_manager, &raw);
    if (rc)
        throw Error("no ext2/3/4 file system at byte " + std::to_string(offset) + " of " + path);
    m->fs.reset(raw);
}

Ext4Card::~Ext4Card() = default;

std::string Ext4Card::read(const std::string& relpath) const
{
    ext2_ino_t ino = m->lookup(relpath);
    ext2_inode inode {};
    if (!m->inode(ino, inode) || !LINUX_S_ISREG(inode.i_mode))
        return "";
    uint64_t size = EXT2_I_SIZE(&inode);
    return size > max_read ? "" : m->contents(ino, size);
}

uint64_t Ext4Card::size(const std::string& relpath) const
{
    ext2_inode inode {};
    if (!m->inode(m->lookup(relpath), inode) || !LINUX_S_ISREG(inode.i_mode))
        return 0;
    return EXT2_I_SIZE(&inode);
}

std::string Ext4Card::link(const std::string& relpath) const
{
    ext2_ino_t ino = m->lookup(relpath);
    ext2_inode inode {};
    if (!m->inode(ino, inode) || !LINUX_S_ISLNK(inode.i_mode))
        return "";
    uint64_t size = EXT2_I_SIZE(&inode);
    if (size == 0 || size >= 4096)
        return "";
    // A short target lives in the inode itself, a longer one in a block
    // (or inline data), which the file reader handles.
    if (ext2fs_is_fast_symlink(&inode))
        return std::string(reinterpret_cast<const char*>(inode.i_block), strnlen(reinterpret_cast<const char*>(inode.i_block), size));
    return m->contents(ino, size);
}

unsigned Ext4Card::type(const std::string& relpath) const
{
    ext2_inode inode {};
    if (!m->inode(m->lookup(relpath), inode))
        return 0;
    return inode.i_mode & S_IFMT;
}

std::vector<std::string> Ext4Card::list(const std::string& relpath) const
{
    std::vector<std::string> names;
    ext2_ino_t ino = m->lookup(relpath);
    ext2_inode inode {};
    if (!m->inode(ino, inode) || !LINUX_S_ISDIR(inode.i_mode))
        return names;
    auto each = [](ext2_ino_t, int, struct ext2_dir_entry* entry, int, int, char*, void* data) -> int {
        std::string name(entry->name, static_cast<size_t>(ext2fs_dirent_name_len(entry)));
        if (name != "." && name != "..")
            static_cast<std::vector<std::string>*>(data)->push_back(name);
        return 0;
    };
    ext2fs_dir_iterate2(m->fs.get(), ino, 0, nullptr, each, &names);
    return names;
}

} // namespace treeflash::flasher
