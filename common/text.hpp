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
// sequences, newlines, carriage returns, C1 controls such as U+009B, which
// some terminals take as CSI) become \xNN or \u{NNNN}, as do bytes that are
// not UTF-8 and the invisible marks that reorder text (bidi overrides). For
// text read from a card or image, which may be hostile.
inline std::string printable(const std::string& value)
{
    std::string out;
    out.reserve(value.size());
    auto escape_byte = [&](unsigned char c) {
        char escaped[5];
        std::snprintf(escaped, sizeof escaped, "\\x%02x", c);
        out += escaped;
    };
    for (size_t i = 0; i < value.size();) {
        auto c = static_cast<unsigned char>(value[i]);
        if (c < 0x80) {
            if (c < 0x20 || c == 0x7f)
                escape_byte(c);
            else
                out += static_cast<char>(c);
            ++i;
            continue;
        }
        // A UTF-8 sequence: its length from the lead byte, each following
        // byte 10xxxxxx, no overlong form, no surrogate, U+10FFFF at most.
        size_t length = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xc2 && c <= 0xdf ? 2 : 0;
        uint32_t point = length == 4 ? c & 0x07u : length == 3 ? c & 0x0fu : c & 0x1fu;
        bool valid = length > 0 && i + length <= value.size();
        for (size_t k = 1; valid && k < length; ++k) {
            auto next = static_cast<unsigned char>(value[i + k]);
            valid = (next & 0xc0) == 0x80;
            point = (point << 6) | (next & 0x3fu);
        }
        valid = valid && !(length == 3 && point < 0x800) && !(length == 4 && (point < 0x10000 || point > 0x10ffff))
                && !(point >= 0xd800 && point <= 0xdfff);
        if (!valid) {
            escape_byte(c);
            ++i;
            continue;
        }
        bool control = point <= 0x9f // C1
                       || point == 0x200e || point == 0x200f || (point >= 0x202a && point <= 0x202e)
                       || (point >= 0x2066 && point <= 0x2069);
        if (control) {
            char escaped[16];
            std::snprintf(escaped, sizeof escaped, "\\u{%04x}", static_cast<unsigned>(point));
            out += escaped;
        } else {
            out.append(value, i, length);
        }
        i += length;
    }
    return out;
}

} // namespace treeflash::text
