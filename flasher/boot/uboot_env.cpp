#include "flasher/boot/uboot_env.hpp"

#include "common/error.hpp"

#include <cstring>
#include <sstream>
#include <zlib.h>

namespace treeflash::flasher {

namespace {

constexpr size_t crc_bytes = 4;

uint32_t crc_of(const uint8_t* data, size_t size)
{
    return static_cast<uint32_t>(::crc32(::crc32(0L, Z_NULL, 0), data, static_cast<uInt>(size)));
}

} // namespace

std::vector<uint8_t> make_uboot_env(const UbootVariables& variables, size_t size)
{
    if (size <= crc_bytes + 1)
        throw Error("a U-Boot environment of " + std::to_string(size) + " bytes holds nothing");
    std::vector<uint8_t> image(size, 0);
    size_t at = crc_bytes;
    for (const auto& [name, value] : variables) {
        if (name.empty() || name.find_first_of(std::string("=\n\0", 3)) != std::string::npos)
            throw Error("'" + name + "' is not a U-Boot variable name");
        if (value.find_first_of(std::string("\n\0", 2)) != std::string::npos)
            throw Error("U-Boot variable " + name + ": a value cannot hold a newline or NUL");
        std::string entry = name + "=" + value;
        // One NUL ends the entry, and the list ends with a second one.
        if (at + entry.size() + 2 > size)
            throw Error("the U-Boot variables do not fit in " + std::to_string(size) + " bytes");
        std::memcpy(image.data() + at, entry.data(), entry.size());
        at += entry.size() + 1;
    }
    uint32_t crc = crc_of(image.data() + crc_bytes, size - crc_bytes);
    for (size_t i = 0; i < crc_bytes; ++i)
        image[i] = static_cast<uint8_t>(crc >> (8 * i));
    return image;
}

UbootVariables read_uboot_env_entries(const uint8_t* data, size_t size)
{
    if (size <= crc_bytes)
        throw Error("a U-Boot environment of " + std::to_string(size) + " bytes holds nothing");
    uint32_t stored = 0;
    for (size_t i = 0; i < crc_bytes; ++i)
        stored |= static_cast<uint32_t>(data[i]) << (8 * i);
    if (stored != crc_of(data + crc_bytes, size - crc_bytes))
        throw Error("the U-Boot environment's CRC does not match (erased or damaged)");
    UbootVariables variables;
    const char* text = reinterpret_cast<const char*>(data + crc_bytes);
    size_t length = size - crc_bytes;
    for (size_t at = 0; at < length && text[at];) {
        size_t end = at;
        while (end < length && text[end])
            ++end;
        std::string entry(text + at, end - at);
        auto eq = entry.find('=');
        if (eq != std::string::npos && eq > 0)
            variables.emplace_back(entry.substr(0, eq), entry.substr(eq + 1));
        at = end + 1;
    }
    return variables;
}

std::map<std::string, std::string> read_uboot_env(const uint8_t* data, size_t size)
{
    std::map<std::string, std::string> variables;
    for (auto& [name, value] : read_uboot_env_entries(data, size))
        variables[name] = std::move(value); // the last of a repeated name, as U-Boot's import keeps it
    return variables;
}

std::vector<uint8_t> set_uboot_env(const uint8_t* data, size_t size, const UbootVariables& changes)
{
    UbootVariables variables = read_uboot_env_entries(data, size);
    for (const auto& [name, value] : changes) {
        std::erase_if(variables, [&](const auto& entry) { return entry.first == name; });
        variables.emplace_back(name, value);
    }
    return make_uboot_env(variables, size);
}

UbootVariables parse_uboot_env_text(const std::string& text)
{
    UbootVariables variables;
    std::istringstream in(text);
    size_t number = 0;
    for (std::string line; std::getline(in, line);) {
        ++number;
        size_t start = line.find_first_not_of(" \t");
        if (start == std::string::npos || line[start] == '#')
            continue;
        auto eq = line.find('=');
        if (eq == std::string::npos || eq == 0)
            throw Error("line " + std::to_string(number) + ": expected NAME=VALUE");
        variables.emplace_back(line.substr(0, eq), line.substr(eq + 1));
    }
    return variables;
}

} // namespace treeflash::flasher
