#include "flasher/station/line.hpp"

#include "common/text.hpp"

#include <cctype>
#include <cmath>
#include <cstdio>

namespace treeflash::flasher {

namespace {

constexpr size_t errors_kept = 8;

std::string format(const char* form, double value)
{
    char text[64];
    std::snprintf(text, sizeof text, form, value);
    return text;
}

// "1 min 05 s", "42 s"
std::string duration(double seconds)
{
    long whole = std::lround(std::ceil(seconds));
    if (whole < 60)
        return std::to_string(whole) + " s";
    char text[32];
    std::snprintf(text, sizeof text, "%ld min %02ld s", whole / 60, whole % 60);
    return text;
}

// Cut to `width` columns, counting each UTF-8 character as one.
std::string fit(const std::string& line, size_t width)
{
    size_t columns = 0;
    for (size_t i = 0; i < line.size(); ++i) {
        if ((static_cast<unsigned char>(line[i]) & 0xc0) == 0x80)
            continue;
        if (++columns > width)
            return line.substr(0, i);
    }
    return line;
}

} // namespace

double slot_rate(const SlotStatus& slot)
{
    double phase = slot.seconds - slot.phase_started;
    return phase > 0 && slot.done > 0 ? static_cast<double>(slot.done) / phase : 0;
}

double slot_seconds_left(const SlotStatus& slot)
{
    double rate = slot_rate(slot);
    return rate > 0 && slot.total > slot.done ? static_cast<double>(slot.total - slot.done) / rate : 0;
}

LineState::LineState(const std::vector<std::string>& slots)
{
    for (size_t i = 0; i < slots.size(); ++i) {
        SlotStatus status;
        status.slot = i;
        status.device = slots[i];
        m_slots.push_back(status);
    }
}

void LineState::set_info(const LineInfo& info)
{
    std::lock_guard lock(m_mutex);
    m_info = info;
    ++m_version;
}

void LineState::update(const SlotStatus& status)
{
    std::lock_guard lock(m_mutex);
    if (status.slot >= m_slots.size())
        return;
    SlotStatus& before = m_slots[status.slot];
    if (!status.result.empty() && before.result.empty()) {
        if (status.result == "ok") {
            ++m_ok;
            m_done_times.push_back(Clock::now());
        } else if (status.result == "failed" || status.result == "interrupted") {
            ++m_failed;
            m_errors.push_front({text::utc_now(), status.slot + 1, text::printable(status.message)});
            if (m_errors.size() > errors_kept)
                m_errors.pop_back();
        }
        if (status.units_left >= 0)
            m_info.units_left = static_cast<size_t>(status.units_left);
    }
    before = status;
    ++m_version;
}

LineSnapshot LineState::snapshot() const
{
    std::lock_guard lock(m_mutex);
    LineSnapshot out;
    out.info = m_info;
    out.ok = m_info.ok_today + m_ok;
    out.failed = m_info.failed_today + m_failed;
    auto now = Clock::now();
    for (auto t : m_done_times)
        out.per_hour += now - t < std::chrono::hours(1);
    out.slots = m_slots;
    out.errors.assign(m_errors.begin(), m_errors.end());
    return out;
}

uint64_t LineState::version() const
{
    std::lock_guard lock(m_mutex);
    return m_version;
}

std::vector<std::string> render_line(const LineSnapshot& line, size_t width)
{
    using text::printable;
    std::vector<std::string> out;
    std::string head = "image " + printable(line.info.image);
    if (!line.info.commit.empty())
        head += "  commit " + line.info.commit.substr(0, 12);
    out.push_back(fit(head, width));
    std::string counts = "today: " + std::to_string(line.ok) + " ok, " + std::to_string(line.failed) + " failed, "
                         + std::to_string(line.per_hour) + " in the last hour";
    if (line.info.units)
        counts += "; " + std::to_string(line.info.units_left) + " of " + std::to_string(line.info.units_total)
                  + " units left";
    out.push_back(fit(counts, width));
    for (const auto& s : line.slots) {
        std::string text = "slot " + std::to_string(s.slot + 1) + "  " + printable(s.device) + "  ";
        std::string name = slot_state_name(s.state);
        std::string state = name;
        for (auto& c : state)
            c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
        // "done — remove the card" reads "DONE — remove the card".
        std::string message = printable(s.message);
        if (message.rfind(name + " — ", 0) == 0) {
            state += message.substr(name.size());
            message.clear();
        }
        text += state;
        if ((s.state == SlotState::Writing || s.state == SlotState::Verifying) && s.total > 0) {
            text += format("  %.0f%%", 100.0 * static_cast<double>(s.done) / static_cast<double>(s.total));
            if (double rate = slot_rate(s); rate > 0)
                text += format("  %.1f MiB/s", rate / (1 << 20)) + "  " + duration(slot_seconds_left(s)) + " left";
        }
        if (!s.unit.empty())
            text += "  unit " + printable(s.unit);
        if (!s.card.empty() && s.state != SlotState::Empty)
            text += "  " + printable(s.card);
        if (!message.empty())
            text += "  " + message;
        out.push_back(fit(text, width));
    }
    return out;
}

} // namespace treeflash::flasher
