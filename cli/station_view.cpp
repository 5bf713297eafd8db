#include "cli/station_view.hpp"

#include "common/fs.hpp"
#include "common/text.hpp"

#include <chrono>
#include <cstdio>
#include <sys/ioctl.h>
#include <unistd.h>

namespace treeflash::cli {

namespace {

// Redrawn at most this often while the station works; at least once a
// second, so the counts of the last hour and the times left move on.
constexpr auto redraw_every = std::chrono::milliseconds(250);
constexpr auto redraw_at_least = std::chrono::seconds(1);

size_t columns_of(int fd)
{
    struct winsize size {};
    if (::ioctl(fd, TIOCGWINSZ, &size) == 0 && size.ws_col > 10)
        return size.ws_col;
    return 80;
}

} // namespace

std::string describe_slot_change(const flasher::SlotStatus& s)
{
    std::string out = text::utc_now() + "  slot " + std::to_string(s.slot + 1) + " " + text::printable(s.device) + "  "
                      + flasher::slot_state_name(s.state);
    if (!s.card.empty())
        out += "  " + text::printable(s.card);
    if (!s.unit.empty())
        out += "  unit " + text::printable(s.unit);
    if (s.state == flasher::SlotState::Done && s.seconds > 0) {
        char took[32];
        std::snprintf(took, sizeof took, "  %.1f s", s.seconds);
        out += took;
    }
    if (!s.message.empty())
        out += "  " + text::printable(s.message);
    return out;
}

LiveTerminal::LiveTerminal(const flasher::LineState& line, int fd)
    : m_line(line)
    , m_fd(fd)
    , m_thread([this] { run(); })
{
}

LiveTerminal::~LiveTerminal()
{
    {
        std::lock_guard lock(m_mutex);
        m_stopping = true;
    }
    m_wake.notify_all();
    m_thread.join();
    std::lock_guard lock(m_mutex);
    redraw_locked("");
}

void LiveTerminal::print(const std::string& text)
{
    std::lock_guard lock(m_mutex);
    redraw_locked(text::printable(text) + "\n");
}

// Moves to the block's first line, clears the screen from there down,
// prints `above` there (it scrolls up with the screen), then the block anew.
void LiveTerminal::redraw_locked(const std::string& above)
{
    std::vector<std::string> block = flasher::render_line(m_line.snapshot(), columns_of(m_fd) - 1);
    std::string out = "\r";
    if (m_drawn > 0)
        out += "\x1b[" + std::to_string(m_drawn) + "A";
    // Everything from there down cleared first: a line above that wraps
    // lands on cleared rows.
    out += "\x1b[J" + above;
    for (const auto& line : block)
        out += line + "\n";
    fs::write_to_pipe(m_fd, out);
    m_drawn = block.size();
}

void LiveTerminal::run()
{
    uint64_t drawn_version = 0;
    auto drawn_at = std::chrono::steady_clock::now() - redraw_at_least;
    std::unique_lock lock(m_mutex);
    while (!m_stopping) {
        uint64_t version = m_line.version();
        auto now = std::chrono::steady_clock::now();
        if (version != drawn_version || now - drawn_at >= redraw_at_least) {
            redraw_locked("");
            drawn_version = version;
            drawn_at = now;
        }
        m_wake.wait_for(lock, redraw_every, [this] { return m_stopping; });
    }
}

} // namespace treeflash::cli
