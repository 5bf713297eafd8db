// Small text helpers.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace treeflash::text {

// Replaces every occurrence of `from` in `text` with `to` (left to right,
// never rescanning what was inserted).
inline void replace_all(std::string& text, const std::string& from, const std::string& to)
{
    if (from.empty())
        return;
    for (size_t pos = 0; (pos = text.find(from, pos)) != std::string::npos; pos += to.size())
        text.replace(pos, from.size(), to);
}

// "0x1f": offsets and block numbers as board profiles and U-Boot write them.
inline std::string hex(uint64_t value)
{
    char out[24];
    std::snprintf(out, sizeof out, "0x%llx", static_cast<unsigned long long>(value));
    return out;
}

} // namespace treeflash::text
