// A reusable byte buffer that is never zero-filled: for the hot loops that
// read, inflate or compress one object after another, where a
// std::vector's resize would clear every byte it is about to overwrite.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>

namespace treeflash {

class ByteBuffer {
public:
    // Room for `size` bytes; what the buffer held is lost. Grows at least
    // twofold, so objects of slowly rising sizes do not reallocate each time.
    unsigned char* reserve(size_t size)
    {
        if (size > m_capacity) {
            size_t capacity = std::max(size, m_capacity * 2);
            m_bytes.reset();
            m_bytes = std::make_unique_for_overwrite<unsigned char[]>(capacity);
            m_capacity = capacity;
        }
        return m_bytes.get();
    }

    // Room for `size` bytes, keeping the first `kept` (grows by doubling,
    // for data whose length is not known in advance).
    unsigned char* grow(size_t size, size_t kept)
    {
        if (size > m_capacity) {
            size_t capacity = std::max(size, m_capacity * 2);
            auto bytes = std::make_unique_for_overwrite<unsigned char[]>(capacity);
            if (kept)
                std::memcpy(bytes.get(), m_bytes.get(), kept);
            m_bytes = std::move(bytes);
            m_capacity = capacity;
        }
        return m_bytes.get();
    }

    unsigned char* data() { return m_bytes.get(); }

    // Frees the bytes when more than `keep` are held: after a big file, so
    // an idle worker does not sit on its largest buffer.
    void shrink(size_t keep)
    {
        if (m_capacity > keep) {
            m_bytes.reset();
            m_capacity = 0;
        }
    }

private:
    std::unique_ptr<unsigned char[]> m_bytes;
    size_t m_capacity = 0;
};

} // namespace treeflash
