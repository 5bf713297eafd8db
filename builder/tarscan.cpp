#include "builder/tarscan.hpp"

#include <cstring>

namespace treeflash::builder {

namespace {

constexpr size_t block_size = 512;

uint64_t round_up(uint64_t n)
{
    return (n + block_size - 1) / block_size * block_size;
}

// A numeric header field: octal digits, or base-256 when the top bit is set.
uint64_t number(const unsigned char* field, size_t length)
{
    uint64_t value = 0;
    if (field[0] & 0x80) {
        for (size_t i = 1; i < length; ++i)
            value = (value << 8) | field[i];
        return value;
    }
    for (size_t i = 0; i < length && field[i]; ++i)
        if (field[i] >= '0' && field[i] <= '7')
            value = value * 8 + (field[i] - '0');
    return value;
}

bool checksum_matches(const unsigned char* block)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < block_size; ++i)
        sum += (i >= 148 && i < 156) ? ' ' : block[i];
    return sum == number(block + 148, 8);
}

// The "size" record of pax extended header data ("NN size=1234\n" ...).
std::optional<uint64_t> pax_size(const std::string& records)
{
    for (size_t pos = 0; pos < records.size();) {
        size_t space = records.find(' ', pos);
        if (space == std::string::npos)
            break;
        uint64_t length = std::strtoull(records.c_str() + pos, nullptr, 10);
        if (length == 0)
            break;
        std::string record = records.substr(space + 1, pos + length - space - 2);
        if (record.rfind("size=", 0) == 0)
            return std::strtoull(record.c_str() + 5, nullptr, 10);
        pos += length;
    }
    return std::nullopt;
}

} // namespace

bool known_tar_type(char type)
{
    return std::strchr("01234567SD", type) != nullptr || type == '\0';
}

void TarHeaderScanner::feed(const char* data, size_t size)
{
    if (m_lost)
        return;
    m_buffer.append(data, size);
    size_t pos = 0;
    while (!m_lost) {
        if (m_skip) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(m_skip, m_buffer.size() - pos));
            m_skip -= n;
            pos += n;
            if (m_skip)
                break;
            continue;
        }
        if (m_pax_left) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(m_pax_left, m_buffer.size() - pos));
            m_pax.append(m_buffer, pos, n);
            m_pax_left -= n;
            pos += n;
            if (m_pax_left)
                break;
            m_pax_size = pax_size(m_pax);
            m_skip = m_pax_padding;
            continue;
        }
        if (m_buffer.size() - pos < block_size)
            break;
        const auto* block = reinterpret_cast<const unsigned char*>(m_buffer.data() + pos);
        pos += block_size;
        if (m_sparse_extension) {
            m_sparse_extension = block[504] != 0;
            continue;
        }
        header(block);
    }
    m_buffer.erase(0, pos);
}

void TarHeaderScanner::header(const unsigned char* block)
{
    bool zero = true;
    for (size_t i = 0; i < block_size && zero; ++i)
        zero = block[i] == 0;
    if (zero)
        return; // the end-of-archive blocks
    if (!checksum_matches(block)) {
        m_lost = true;
        return;
    }
    char type = static_cast<char>(block[156]);
    uint64_t size = number(block + 124, 12);
    switch (type) {
    case 'x': // pax extended header for the next entry
        m_pax.clear();
        m_pax_left = size;
        m_pax_padding = round_up(size) - size;
        return;
    case 'g': // pax global header
    case 'L': // GNU long name
    case 'K': // GNU long link name
    case 'V': // GNU volume label: libarchive reports no entry for it
        m_skip = round_up(size);
        return;
    default:
        break;
    }
    if (m_pax_size) {
        size = *m_pax_size;
        m_pax_size.reset();
    }
    m_types.push_back(type);
    if (type == 'S' && block[482] != 0)
        m_sparse_extension = true;
    // Hard links, symlinks, devices, directories and FIFOs carry no data.
    bool has_data = type != '1' && type != '2' && type != '3' && type != '4' && type != '5' && type != '6';
    m_skip = has_data ? round_up(size) : 0;
}

std::optional<char> TarHeaderScanner::next_entry_type()
{
    if (m_lost || m_types.empty())
        return std::nullopt;
    char type = m_types.front();
    m_types.pop_front();
    return type;
}

} // namespace treeflash::builder
