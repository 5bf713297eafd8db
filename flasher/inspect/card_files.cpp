#include "flasher/inspect/card_files.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"

#include <cerrno>
#include <fcntl.h>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

UniqueFd open_on_card(const std::filesystem::path& root, const std::string& relpath, int flags)
{
    try {
        return fs::open_beneath(fs::open_directory(root).get(), relpath, flags);
    } catch (const Error&) {
        return UniqueFd();
    }
}

} // namespace

std::string read_on_card(const std::filesystem::path& root, const std::string& relpath)
{
    // O_NONBLOCK: a FIFO where a file should be must not hang the reader.
    UniqueFd fd = open_on_card(root, relpath, O_RDONLY | O_NONBLOCK);
    struct stat st {};
    if (!fd || ::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) > CardView::max_read)
        return "";
    std::string data(static_cast<size_t>(st.st_size), '\0');
    ssize_t n = ::read(fd.get(), data.data(), data.size());
    data.resize(n > 0 ? static_cast<size_t>(n) : 0);
    return data;
}

void write_on_card(const std::filesystem::path& root, const std::string& dir, const std::string& name,
                   const std::string& content)
{
    UniqueFd top = fs::open_directory(root);
    std::string walked;
    for (const auto& part : fs::split_relative_path(dir, "write " + dir)) {
        UniqueFd parent = walked.empty() ? fs::open_beneath(top.get(), ".", O_RDONLY | O_DIRECTORY)
                                         : fs::open_beneath(top.get(), walked, O_RDONLY | O_DIRECTORY);
        if (::mkdirat(parent.get(), part.c_str(), 0755) != 0 && errno != EEXIST)
            throw_errno("create " + walked + "/" + part);
        walked += (walked.empty() ? "" : "/") + part;
    }
    UniqueFd target = fs::open_beneath(top.get(), walked, O_RDONLY | O_DIRECTORY);
    std::string temporary = name + ".new";
    {
        UniqueFd out(::openat(target.get(), temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644));
        if (!out)
            throw_errno("create " + dir + "/" + temporary);
        fs::write_at(out.get(), content.data(), content.size(), 0, dir + "/" + temporary);
        if (::fsync(out.get()) != 0)
            throw_errno("fsync " + dir + "/" + temporary);
    }
    if (::renameat(target.get(), temporary.c_str(), target.get(), name.c_str()) != 0)
        throw_errno("rename " + dir + "/" + temporary);
}

std::string MountedCard::read(const std::string& relpath) const
{
    return read_on_card(m_root, relpath);
}

uint64_t MountedCard::size(const std::string& relpath) const
{
    UniqueFd fd = open_on_card(m_root, relpath, O_PATH);
    struct stat st {};
    return fd && ::fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode) ? static_cast<uint64_t>(st.st_size) : 0;
}

std::string MountedCard::link(const std::string& relpath) const
{
    std::filesystem::path parent = std::filesystem::path(relpath).parent_path();
    UniqueFd dir = parent.empty() ? open_on_card(m_root, ".", O_PATH | O_DIRECTORY)
                                  : open_on_card(m_root, parent.string(), O_PATH | O_DIRECTORY);
    if (!dir)
        return "";
    char target[256];
    ssize_t n = ::readlinkat(dir.get(), std::filesystem::path(relpath).filename().c_str(), target, sizeof target - 1);
    return n > 0 ? std::string(target, static_cast<size_t>(n)) : "";
}

unsigned MountedCard::type(const std::string& relpath) const
{
    UniqueFd fd = open_on_card(m_root, relpath, O_PATH);
    struct stat st {};
    return fd && ::fstat(fd.get(), &st) == 0 ? (st.st_mode & S_IFMT) : 0;
}

std::vector<std::string> MountedCard::list(const std::string& relpath) const
{
    std::vector<std::string> names;
    UniqueFd dir = open_on_card(m_root, relpath.empty() ? "." : relpath, O_RDONLY | O_DIRECTORY);
    if (!dir)
        return names;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd/" + std::to_string(dir.get()), ec))
        names.push_back(entry.path().filename().string());
    return names;
}

std::map<std::string, std::string> parse_env_lines(const std::string& text)
{
    std::map<std::string, std::string> values;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
        auto eq = line.find('=');
        if (eq != std::string::npos && eq > 0 && line[0] != '#')
            values[line.substr(0, eq)] = line.substr(eq + 1);
    }
    return values;
}

std::string read_or_warn(const CardView& card, const std::string& relpath, const std::string& what,
                         std::vector<std::string>& warnings)
{
    std::string data = card.read(relpath);
    if (!data.empty())
        return data;
    // Whole MiB when the size is one (an inode set to 8 GiB says "8192 MiB").
    uint64_t claimed = card.size(relpath);
    if (claimed > CardView::max_read)
        warnings.push_back(relpath + " claims "
                           + (claimed % (1 << 20) ? std::to_string(claimed) + " bytes" : std::to_string(claimed >> 20) + " MiB")
                           + ", more than " + what + " can be; ignored");
    return data;
}

} // namespace treeflash::flasher
