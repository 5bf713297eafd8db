// The station's live page for the line (treeflash station --http): every
// slot with its state, progress, speed and time left, today's counts, the
// image and commit being written, and the last errors. Served by libsoup 3
// on a thread of its own; the page (templates/station.html, no outside
// assets) follows the station through server-sent events (/events, a JSON
// snapshot at most every 250 ms while anything changes); /state is the
// same snapshot once.
#pragma once

#include "flasher/station/line.hpp"

#include <memory>
#include <string>

namespace treeflash::flasher {

class StationPage {
public:
    // Listens on `address` (HOST:PORT, e.g. 0.0.0.0:8080 or 127.0.0.1:8080)
    // and serves `line`, which must outlive it; throws when it cannot.
    StationPage(const std::string& address, const LineState& line);
    ~StationPage(); // stops the server; open pages show "not answering"
    StationPage(const StationPage&) = delete;
    StationPage& operator=(const StationPage&) = delete;

    // The URL the page is at (the port as bound, for port 0).
    std::string url() const;

private:
    struct Impl;
    std::unique_ptr<Impl> m;
};

} // namespace treeflash::flasher
