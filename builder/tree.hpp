// The staging tree: an in-memory model of the rootfs being built.
//
// Stages never modify the input. Import records, for every entry, its type,
// ownership, mode and where its bytes come from (a file below the input
// directory, a file extracted from a tarball into scratch space, a host file
// the user named, or bytes in memory). Later stages move, add and drop nodes;
// the commit stage streams each file's bytes from its source into the repo.
#pragma once

#include "common/fd.hpp"

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <sys/types.h>
#include <vector>

namespace treeflash::builder {

struct FileSource {
    enum class Origin {
        InputTree, // `path` relative to the input directory, opened without following symlinks
        Scratch,   // `path` relative to the scratch directory (tarball contents)
        HostFile,  // `path` is a file the user named on the command line
        Memory,    // `bytes`
    };
    Origin origin = Origin::Memory;
    std::string path;
    std::string bytes;
};

struct Node {
    enum class Kind { Directory, Regular, Symlink };

    Kind kind = Kind::Directory;
    uid_t uid = 0;
    gid_t gid = 0;
    mode_t mode = 0755; // permission bits only (07777)
    uint64_t size = 0;  // regular files
    std::string symlink_target;
    // Extended attributes (security.capability, ...), sorted by name.
    std::vector<std::pair<std::string, std::string>> xattrs;
    FileSource source;                                 // regular files
    std::map<std::string, std::unique_ptr<Node>> children; // directories, sorted by name
    std::string checksum; // filled by the commit stage (content object)

    bool is_dir() const { return kind == Kind::Directory; }
    bool is_regular() const { return kind == Kind::Regular; }
    bool is_symlink() const { return kind == Kind::Symlink; }

    static std::unique_ptr<Node> directory(mode_t mode = 0755, uid_t uid = 0, gid_t gid = 0);
    static std::unique_ptr<Node> symlink(std::string target, uid_t uid = 0, gid_t gid = 0);
    static std::unique_ptr<Node> memory_file(std::string bytes, mode_t mode = 0644);
};

class Tree {
public:
    Tree();

    Node& root() { return *m_root; }
    const Node& root() const { return *m_root; }

    // The node at a relative path ("usr/etc"), not following symlinks; nullptr if absent.
    Node* find(std::string_view path);
    const Node* find(std::string_view path) const;

    // The node `path` leads to with every symlink followed inside the tree,
    // as the booted system would (an absolute target starts at the tree's
    // root, "/etc" is the tree's usr/etc, ".." stops at the root). nullptr
    // when it leads nowhere in the tree or loops; `resolved` gets the path.
    const Node* resolve(std::string_view path, std::string* resolved = nullptr) const;
    // Inserts `node` at `path`, creating missing parent directories (0755,
    // root). A symlink or a file in the parent chain is an error: nothing is
    // ever written through a symlink. An existing node at `path` is replaced.
    Node& put(std::string_view path, std::unique_ptr<Node> node);

    // Makes sure a directory exists at `path` (created with `mode` when missing).
    Node& ensure_dir(std::string_view path, mode_t mode = 0755);

    // Detaches and returns the node at `path` (nullptr if absent).
    std::unique_ptr<Node> take(std::string_view path);

    // Where FileSource paths point.
    void set_input_root(UniqueFd fd) { m_input_root = std::move(fd); }
    void set_scratch_root(UniqueFd fd) { m_scratch_root = std::move(fd); }

    // Opens a regular file's bytes for reading; Memory sources have no fd and
    // are read through read_all().
    UniqueFd open_source(const FileSource& source) const;
    // Streams a regular file's bytes to `sink` in chunks.
    void read_chunks(const Node& file, const std::function<void(const char*, size_t)>& sink) const;
    std::string read_all(const Node& file) const;

    // Walks every node depth-first in name order; fn(path, node).
    template <typename Fn>
    void for_each(Fn&& fn) const
    {
        walk("", *m_root, fn);
    }

    // Walks `node` (at `path`) and everything below it.
    template <typename Fn>
    static void walk(const std::string& path, const Node& node, Fn&& fn)
    {
        fn(path, node);
        for (const auto& [name, child] : node.children)
            walk(path.empty() ? name : path + "/" + name, *child, fn);
    }

private:
    std::unique_ptr<Node> m_root;
    UniqueFd m_input_root;
    UniqueFd m_scratch_root;
};

// Paths of the entries below `path` (relative to the tree root), for reports.
std::vector<std::string> list_below(const Tree& tree, std::string_view path);

} // namespace treeflash::builder
