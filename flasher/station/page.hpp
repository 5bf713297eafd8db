// The station's live page for the line (treeflash station --http): every
// slot with its state, progress, speed and time left, today's counts, the
// image and commit being written, and the last errors. Served by libsoup 3
// on a thread of its own; the page (templates/station.html, no outside
// assets) follows the station through server-sent events (/events, a JSON
// snapshot at most every 250 ms while anything changes); /state is the
// same snapshot once.
#pragma once

#include "flasher/station/station.hpp"

#include <memory>
#include <string>

namespace treeflash::flasher {

struct PageInfo {
    std::string image, image_sha256, commit;
    size_t ok_today = 0, failed_today = 0; // from the log, before this run
    bool units = false;
    size_t units_left = 0, units_total = 0;
};

class StationPage {
public:
    // Listens on `address` (HOST:PORT, e.g. 0.0.0.0:8080 or 127.0.0.1:8080);
    // throws when it cannot. `slots` are the devices, in order.
    StationPage(const std::string& address, const std::vector<std::string>& slots);
    ~StationPage(); // stops the server; open pages show "not answering"
    StationPage(const StationPage&) = delete;
    StationPage& operator=(const StationPage&) = delete;

    void set_info(const PageInfo& info);
    // A slot changed; from any thread.
    void update(const SlotStatus& status);
    // The URL the page is at (the port as bound, for port 0).
    std::string url() const;

private:
    struct Impl;
    std::unique_ptr<Impl> m;
};

} // namespace treeflash::flasher
