// A reusable byte buffer that is never zero-filled: for the hot loops that
// read, inflate or compress one object after another, where a
// std::vector's resize would clear every byte it is about to overwrite.
//
// Buffers of 2 MiB and more are mapped on 2 MiB boundaries and asked for
// huge pages: filling a fresh 32 MiB buffer page by page costs 8192 page
// faults, which on a virtual machine took longer than inflating a kernel
// into it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <sys/mman.h>
#include <utility>

namespace treeflash {

class ByteBuffer {
public:
    ByteBuffer() = default;
    ByteBuffer(const ByteBuffer&) = delete;
    ByteBuffer& operator=(const ByteBuffer&) = delete;
    ByteBuffer(ByteBuffer&& other) noexcept { swap(other); }
    ByteBuffer& operator=(ByteBuffer&& other) noexcept
    {
        ByteBuffer gone(std::move(other));
        swap(gone);
        return *this;
    }
    ~ByteBuffer() { release(); }

    // Room for `size` bytes; what the buffer held is lost. Grows at least
    // twofold, so objects of slowly rising sizes do not reallocate each time.
    unsigned char* reserve(size_t size)
    {
        if (size > m_capacity) {
            size_t capacity = std::max(size, m_capacity * 2);
            release();
            allocate(capacity);
        }
        return m_bytes;
    }

    // Room for `size` bytes, keeping the first `kept` (grows by doubling,
    // for data whose length is not known in advance).
    unsigned char* grow(size_t size, size_t kept)
    {
        if (size > m_capacity) {
            ByteBuffer bigger;
            bigger.allocate(std::max(size, m_capacity * 2));
            if (kept)
                std::memcpy(bigger.m_bytes, m_bytes, kept);
            swap(bigger);
        }
        return m_bytes;
    }

    unsigned char* data() { return m_bytes; }

    // Frees the bytes when more than `keep` are held: after a big file, so
    // an idle worker does not sit on its largest buffer.
    void shrink(size_t keep)
    {
        if (m_capacity > keep)
            release();
    }

private:
    static constexpr size_t huge_page = 2u << 20;

    void allocate(size_t capacity)
    {
        if (capacity < huge_page) {
            m_bytes = new unsigned char[capacity];
        } else {
            size_t rounded = (capacity + huge_page - 1) & ~(huge_page - 1);
            m_map_length = rounded + huge_page; // room to align the start
            m_map = ::mmap(nullptr, m_map_length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m_map == MAP_FAILED) {
                m_map = nullptr;
                throw std::bad_alloc();
            }
            auto aligned = (reinterpret_cast<uintptr_t>(m_map) + huge_page - 1) & ~(uintptr_t{huge_page} - 1);
            m_bytes = reinterpret_cast<unsigned char*>(aligned);
            ::madvise(m_bytes, rounded, MADV_HUGEPAGE); // a hint: without huge pages it still works
        }
        m_capacity = capacity;
    }

    void release()
    {
        if (m_map)
            ::munmap(m_map, m_map_length);
        else
            delete[] m_bytes;
        m_map = nullptr;
        m_bytes = nullptr;
        m_capacity = 0;
    }

    void swap(ByteBuffer& other)
    {
        std::swap(m_bytes, other.m_bytes);
        std::swap(m_capacity, other.m_capacity);
        std::swap(m_map, other.m_map);
        std::swap(m_map_length, other.m_map_length);
    }

    unsigned char* m_bytes = nullptr;
    size_t m_capacity = 0;
    void* m_map = nullptr; // set when the bytes are mapped
    size_t m_map_length = 0;
};

} // namespace treeflash
