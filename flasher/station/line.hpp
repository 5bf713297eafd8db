// What the line sees of a station, shared by its two views (the page for
// the room, --http, and the terminal on a tty): every slot as it last
// changed, the counts of today and of the last hour, the image, and the last
// errors. Slot threads update it; the views take snapshots.
#pragma once

#include "flasher/station/station.hpp"

#include <chrono>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

namespace treeflash::flasher {

struct LineInfo {
    std::string image, image_sha256, commit;
    size_t ok_today = 0, failed_today = 0; // from the log, before this run
    bool units = false;                    // a manifest gives units
    size_t units_left = 0, units_total = 0;
};

struct LineError {
    std::string time; // UTC, ISO 8601
    size_t slot = 0;  // from 1
    std::string error;
};

struct LineSnapshot {
    LineInfo info;
    size_t ok = 0, failed = 0; // today, this run's included
    size_t per_hour = 0;       // cards done in the last hour
    std::vector<SlotStatus> slots;
    std::vector<LineError> errors; // newest first
};

// Bytes per second and seconds left of a slot's current phase (0 when not
// known yet).
double slot_rate(const SlotStatus& slot);
double slot_seconds_left(const SlotStatus& slot);

class LineState {
public:
    explicit LineState(const std::vector<std::string>& slots);

    void set_info(const LineInfo& info);
    // A slot changed; from any thread. A card's result counts once.
    void update(const SlotStatus& status);
    LineSnapshot snapshot() const;
    // Counts the changes: a view redraws when it differs from the one it drew.
    uint64_t version() const;

private:
    using Clock = std::chrono::steady_clock;
    mutable std::mutex m_mutex;
    LineInfo m_info;
    std::vector<SlotStatus> m_slots;
    std::vector<Clock::time_point> m_done_times; // cards ok in this run
    size_t m_ok = 0, m_failed = 0;
    std::deque<LineError> m_errors;
    uint64_t m_version = 1;
};

// The terminal's view of a snapshot: a header (image, counts) and one line
// per slot, each at most `width` columns, no escape sequences.
std::vector<std::string> render_line(const LineSnapshot& line, size_t width);

} // namespace treeflash::flasher
