// The station's terminal: on a tty, a block at the bottom of the screen
// redrawn in place (the line as flasher::render_line draws it: counts, then
// one line per slot with progress, speed and time left), with each card's
// result and every notice printed above it, where the scrollback keeps them.
// Elsewhere (a pipe, a log file) each change of a slot is one line.
#pragma once

#include "flasher/station/line.hpp"

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

namespace treeflash::cli {

// One line for a slot's change of state, as a log keeps it.
std::string describe_slot_change(const flasher::SlotStatus& status);

class LiveTerminal {
public:
    // Draws `line` on the terminal `fd` until destroyed; `line` must outlive it.
    LiveTerminal(const flasher::LineState& line, int fd);
    ~LiveTerminal(); // the block drawn a last time, left on the screen
    LiveTerminal(const LiveTerminal&) = delete;
    LiveTerminal& operator=(const LiveTerminal&) = delete;

    // Prints `text` (one line) above the block.
    void print(const std::string& text);

private:
    void redraw_locked(const std::string& above);
    void run();

    const flasher::LineState& m_line;
    int m_fd;
    std::mutex m_mutex;
    std::condition_variable m_wake;
    bool m_stopping = false;
    size_t m_drawn = 0; // lines of the block on the screen now
    std::thread m_thread;
};

} // namespace treeflash::cli
