// Watches a tar stream's bytes as libarchive reads them and records the type
// flag of every entry header. libarchive turns types it does not know into
// regular files, as POSIX says, without telling; the import uses this to
// warn about them (as GNU tar does).
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <string>

namespace treeflash::builder {

class TarHeaderScanner {
public:
    // The next bytes of the (decompressed) tar stream, in order.
    void feed(const char* data, size_t size);
    // The type flag of the next entry libarchive reports ('0', '5', 'Z', ...),
    // or nothing once the scanner lost track of the stream (it then stops
    // rather than guess: a header whose checksum does not match).
    std::optional<char> next_entry_type();

private:
    void header(const unsigned char* block);

    std::string m_buffer;          // bytes not yet consumed
    uint64_t m_skip = 0;           // entry data still to pass over
    uint64_t m_pax_left = 0;       // bytes of a pax extended header still to read
    uint64_t m_pax_padding = 0;
    std::string m_pax;             // the pax extended header being read
    std::optional<uint64_t> m_pax_size; // "size=" of the pax header before an entry
    bool m_sparse_extension = false;    // old GNU sparse extension headers follow
    bool m_lost = false;
    std::deque<char> m_types;
};

// Whether libarchive reads a tar entry of this type flag for what it is
// (regular, hard link, symlink, device, directory, FIFO, contiguous, GNU
// sparse and dump directory).
bool known_tar_type(char type);

} // namespace treeflash::builder
