// Bytes that threads working on whole files in memory share: a worker asks
// for what its next file needs and waits while others hold too much, so N
// workers on N big files do not need N times the memory. One request bigger
// than the whole budget is granted once nothing else is held.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace treeflash {

class MemoryBudget {
public:
    explicit MemoryBudget(uint64_t bytes) : m_total(bytes) {}

    class Grant {
    public:
        Grant() = default;
        Grant(MemoryBudget* budget, uint64_t bytes) : m_budget(budget), m_bytes(bytes) {}
        Grant(Grant&& other) noexcept : m_budget(other.m_budget), m_bytes(other.m_bytes) { other.m_budget = nullptr; }
        Grant& operator=(Grant&& other) noexcept
        {
            if (this != &other) {
                release();
                m_budget = other.m_budget;
                m_bytes = other.m_bytes;
                other.m_budget = nullptr;
            }
            return *this;
        }
        Grant(const Grant&) = delete;
        Grant& operator=(const Grant&) = delete;
        ~Grant() { release(); }

        explicit operator bool() const { return m_budget != nullptr; }

        void release()
        {
            if (m_budget)
                m_budget->give_back(m_bytes);
            m_budget = nullptr;
        }

    private:
        MemoryBudget* m_budget = nullptr;
        uint64_t m_bytes = 0;
    };

    // Waits until `bytes` fit (or nothing else is held), then holds them
    // until the grant goes away. Once close() was called, returns at once
    // an empty grant (false).
    Grant take(uint64_t bytes)
    {
        std::unique_lock guard(m_lock);
        m_room.wait(guard, [&] { return m_closed || m_used == 0 || m_used + bytes <= m_total; });
        if (m_closed)
            return Grant();
        m_used += bytes;
        return Grant(this, bytes);
    }

    // Wakes every take() waiting and empties every later one: for work that
    // stops while others hold grants that may never go.
    void close()
    {
        {
            std::lock_guard guard(m_lock);
            m_closed = true;
        }
        m_room.notify_all();
    }

private:
    void give_back(uint64_t bytes)
    {
        {
            std::lock_guard guard(m_lock);
            m_used -= bytes;
        }
        m_room.notify_all();
    }

    uint64_t m_total;
    uint64_t m_used = 0;
    bool m_closed = false;
    std::mutex m_lock;
    std::condition_variable m_room;
};

} // namespace treeflash
