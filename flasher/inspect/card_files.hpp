// Reading files on a mounted card that may be hostile: no symlink on the
// way is followed, sizes are bounded, and a missing file is simply empty.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace treeflash::flasher {

// A file system on a card, read by relative paths with no symlink on the way
// followed: a mounted one (MountedCard) or one read in place through
// libext2fs (Ext4Card, ext4_reader.hpp). Missing things read as empty.
class CardView {
public:
    // The most read() returns: every file treeflash reads on a card is a
    // few KiB at most; a larger one reads as empty (size() tells why).
    static constexpr uint64_t max_read = 1 << 20;

    virtual ~CardView() = default;
    virtual std::string read(const std::string& relpath) const = 0;       // a regular file, up to max_read
    virtual uint64_t size(const std::string& relpath) const = 0;          // the size a regular file claims; 0
    virtual std::string link(const std::string& relpath) const = 0;       // a symlink's target
    virtual unsigned type(const std::string& relpath) const = 0;          // S_IFDIR, S_IFREG, S_IFLNK, ...; 0
    virtual std::vector<std::string> list(const std::string& relpath) const = 0; // a directory's names
};

class MountedCard : public CardView {
public:
    explicit MountedCard(std::filesystem::path root) : m_root(std::move(root)) {}
    std::string read(const std::string& relpath) const override;
    uint64_t size(const std::string& relpath) const override;
    std::string link(const std::string& relpath) const override;
    unsigned type(const std::string& relpath) const override;
    std::vector<std::string> list(const std::string& relpath) const override;

private:
    std::filesystem::path m_root;
};

// The file `relpath` below the card's mount `root`, read without following
// any symlink on the way; "" when absent, not a regular file or over 1 MiB.
std::string read_on_card(const std::filesystem::path& root, const std::string& relpath);

// Replaces `dir`/`name` below the card's mount with `content` (a temporary
// file, then rename), creating `dir` when missing. A symlink anywhere on the
// way is an error, so the write stays on the card.
void write_on_card(const std::filesystem::path& root, const std::string& dir, const std::string& name,
                   const std::string& content);

// NAME=VALUE lines (uEnv.txt and treeflash's boot files); '#' lines skipped.
std::map<std::string, std::string> parse_env_lines(const std::string& text);

// card.read(relpath), for a file that is `what` ("a loader entry"): when
// the file claims more than CardView::max_read, a warning naming it and its
// claimed size goes to `warnings` instead of the file vanishing silently.
std::string read_or_warn(const CardView& card, const std::string& relpath, const std::string& what,
                         std::vector<std::string>& warnings);

} // namespace treeflash::flasher
