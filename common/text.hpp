// Small text helpers.
#pragma once

#include <cstdint>
#include <cstdio>
#include <ctime>
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

// The time now in UTC as logs write it: "2026-12-07T03:04:05Z".
inline std::string utc_now()
{
    std::time_t now = std::time(nullptr);
    std::tm tm {};
    ::gmtime_r(&now, &tm);
    char out[32];
    std::strftime(out, sizeof out, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return out;
}

// "0x1f": offsets and block numbers as board profiles and U-Boot write them.
inline std::string hex(uint64_t value)
{
    char out[24];
    std::snprintf(out, sizeof out, "0x%llx", static_cast<unsigned long long>(value));
    return out;
}

// `value` safe to print on a terminal: control characters (escape
// sequences, newlines, carriage returns) become \xNN. For text read from a
// card or image, which may be hostile.
inline std::string printable(const std::string& value)
{
    std::string out;
    out.reserve(value.size());
    for (unsigned char c : value) {
        if (c < 0x20 || c == 0x7f) {
            char escaped[5];
            std::snprintf(escaped, sizeof escaped, "\\x%02x", c);
            out += escaped;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out;
}

} // namespace treeflash::text
