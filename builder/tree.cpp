#include "builder/tree.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"

#include <cerrno>
#include <fcntl.h>
#include <unistd.h>

namespace treeflash::builder {

std::unique_ptr<Node> Node::directory(mode_t mode, uid_t uid, gid_t gid)
{
    auto node = std::make_unique<Node>();
    node->kind = Kind::Directory;
    node->mode = mode;
    node->uid = uid;
    node->gid = gid;
    return node;
}

std::unique_ptr<Node> Node::symlink(std::string target, uid_t uid, gid_t gid)
{
    auto node = std::make_unique<Node>();
    node->kind = Kind::Symlink;
    node->mode = 0777;
    node->uid = uid;
    node->gid = gid;
    node->symlink_target = std::move(target);
    return node;
}

std::unique_ptr<Node> Node::memory_file(std::string bytes, mode_t mode)
{
    auto node = std::make_unique<Node>();
    node->kind = Kind::Regular;
    node->mode = mode;
    node->size = bytes.size();
    node->source.origin = FileSource::Origin::Memory;
    node->source.bytes = std::move(bytes);
    return node;
}

Tree::Tree() : m_root(Node::directory()) {}

Node* Tree::find(std::string_view path)
{
    return const_cast<Node*>(std::as_const(*this).find(path));
}

const Node* Tree::find(std::string_view path) const
{
    const Node* node = m_root.get();
    for (const auto& part : fs::split_relative_path(path, "tree lookup")) {
        if (!node->is_dir())
            return nullptr;
        auto it = node->children.find(part);
        if (it == node->children.end())
            return nullptr;
        node = it->second.get();
    }
    return node;
}

const Node* Tree::resolve(std::string_view path, std::string* resolved) const
{
    std::vector<std::string> pending;
    auto push_front = [&](std::string_view text) {
        std::vector<std::string> parts;
        size_t start = 0;
        while (start <= text.size()) {
            size_t end = text.find('/', start);
            std::string part(text.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start));
            if (!part.empty() && part != ".")
                parts.push_back(part);
            if (end == std::string_view::npos)
                break;
            start = end + 1;
        }
        pending.insert(pending.begin(), parts.begin(), parts.end());
    };
    push_front(path);
    std::vector<const Node*> stack{m_root.get()};
    std::vector<std::string> names;
    int hops = 0;
    while (!pending.empty()) {
        std::string part = pending.front();
        pending.erase(pending.begin());
        if (part == "..") {
            if (stack.size() > 1) {
                stack.pop_back();
                names.pop_back();
            }
            continue;
        }
        const Node* dir = stack.back();
        if (!dir->is_dir())
            return nullptr;
        auto it = dir->children.find(part);
        // /etc of the booted system is the commit's usr/etc, and ".." from
        // it leads back to /.
        if (it == dir->children.end() && stack.size() == 1 && part == "etc") {
            const Node* usr_etc = find("usr/etc");
            if (!usr_etc || !usr_etc->is_dir())
                return nullptr;
            stack.push_back(usr_etc);
            names.push_back("usr/etc");
            continue;
        }
        if (it == dir->children.end())
            return nullptr;
        const Node* node = it->second.get();
        if (node->is_symlink()) {
            if (++hops > 40)
                return nullptr;
            const std::string& target = node->symlink_target;
            if (!target.empty() && target[0] == '/') {
                stack.resize(1);
                names.clear();
            }
            push_front(target);
            continue;
        }
        stack.push_back(node);
        names.push_back(part);
    }
    if (resolved) {
        resolved->clear();
        for (const auto& n : names)
            *resolved += (resolved->empty() ? "" : "/") + n;
    }
    return stack.back();
}

static Node& parent_for_write(Node& root, const std::vector<std::string>& parts, std::string_view path)
{
    Node* dir = &root;
    std::string walked;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
        walked += (walked.empty() ? "" : "/") + parts[i];
        auto it = dir->children.find(parts[i]);
        if (it == dir->children.end()) {
            it = dir->children.emplace(parts[i], Node::directory()).first;
        } else if (it->second->is_symlink()) {
            throw Error(std::string(path) + ": refusing to write through symlink " + walked + " -> "
                        + it->second->symlink_target);
        } else if (!it->second->is_dir()) {
            throw Error(std::string(path) + ": " + walked + " is not a directory");
        }
        dir = it->second.get();
    }
    return *dir;
}

Node& Tree::put(std::string_view path, std::unique_ptr<Node> node)
{
    auto parts = fs::split_relative_path(path, "tree");
    if (parts.empty()) {
        if (!node->is_dir())
            throw Error("the root of the tree must be a directory");
        node->children = std::move(m_root->children);
        m_root = std::move(node);
        return *m_root;
    }
    Node& parent = parent_for_write(*m_root, parts, path);
    auto& slot = parent.children[parts.back()];
    slot = std::move(node);
    return *slot;
}

Node& Tree::ensure_dir(std::string_view path, mode_t mode)
{
    Node* existing = find(path);
    if (existing) {
        if (!existing->is_dir())
            throw Error(std::string(path) + " exists and is not a directory");
        return *existing;
    }
    return put(path, Node::directory(mode));
}

std::unique_ptr<Node> Tree::take(std::string_view path)
{
    auto parts = fs::split_relative_path(path, "tree");
    if (parts.empty())
        return nullptr;
    Node* dir = m_root.get();
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
        auto it = dir->children.find(parts[i]);
        if (it == dir->children.end() || !it->second->is_dir())
            return nullptr;
        dir = it->second.get();
    }
    auto it = dir->children.find(parts.back());
    if (it == dir->children.end())
        return nullptr;
    auto node = std::move(it->second);
    dir->children.erase(it);
    return node;
}

UniqueFd Tree::open_source(const FileSource& source) const
{
    switch (source.origin) {
    case FileSource::Origin::InputTree:
        return fs::open_beneath(m_input_root.get(), source.path, O_RDONLY);
    case FileSource::Origin::Scratch:
        return fs::open_beneath(m_scratch_root.get(), source.path, O_RDONLY);
    case FileSource::Origin::HostFile: {
        UniqueFd fd(::open(source.path.c_str(), O_RDONLY | O_CLOEXEC));
        if (!fd)
            throw_errno("open " + source.path);
        return fd;
    }
    case FileSource::Origin::Memory:
        break;
    }
    throw Error("in-memory file has no descriptor");
}

void Tree::read_chunks(const Node& file, const std::function<void(const char*, size_t)>& sink) const
{
    if (file.source.origin == FileSource::Origin::Memory) {
        sink(file.source.bytes.data(), file.source.bytes.size());
        return;
    }
    UniqueFd fd = open_source(file.source);
    std::vector<char> buffer(1 << 20);
    for (;;) {
        ssize_t n = ::read(fd.get(), buffer.data(), buffer.size());
        if (n < 0) {
            if (errno == EINTR)
                continue;
            throw_errno("read " + file.source.path);
        }
        if (n == 0)
            return;
        sink(buffer.data(), static_cast<size_t>(n));
    }
}

std::string Tree::read_all(const Node& file) const
{
    std::string data;
    read_chunks(file, [&](const char* bytes, size_t size) { data.append(bytes, size); });
    return data;
}

std::vector<std::string> list_below(const Tree& tree, std::string_view path)
{
    std::vector<std::string> out;
    const Node* node = tree.find(path);
    if (!node || !node->is_dir())
        return out;
    auto collect = [&](const std::string& p, const Node&) { out.push_back(p); };
    for (const auto& [name, child] : node->children)
        Tree::walk(std::string(path) + "/" + name, *child, collect);
    return out;
}

} // namespace treeflash::builder
