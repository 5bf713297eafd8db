// Reading files on a mounted card that may be hostile: no symlink on the
// way is followed, sizes are bounded, and a missing file is simply empty.
#pragma once

#include <filesystem>
#include <map>
#include <string>

namespace treeflash::flasher {

// The file `relpath` below the card's mount `root`, read without following
// any symlink on the way; "" when absent, not a regular file or over 1 MiB.
std::string read_on_card(const std::filesystem::path& root, const std::string& relpath);

// The target of the symlink `relpath` on the card, "" when it is none.
std::string read_link_on_card(const std::filesystem::path& root, const std::string& relpath);

// What kind of thing `relpath` is (S_IFDIR, S_IFREG, ...), 0 when nothing is
// there without following a symlink.
unsigned type_on_card(const std::filesystem::path& root, const std::string& relpath);

// Replaces `dir`/`name` below the card's mount with `content` (a temporary
// file, then rename), creating `dir` when missing. A symlink anywhere on the
// way is an error, so the write stays on the card.
void write_on_card(const std::filesystem::path& root, const std::string& dir, const std::string& name,
                   const std::string& content);

// NAME=VALUE lines (uEnv.txt and treeflash's boot files); '#' lines skipped.
std::map<std::string, std::string> parse_env_lines(const std::string& text);

} // namespace treeflash::flasher
