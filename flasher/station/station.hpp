// treeflash station: a factory's card writer. Each slot (a card reader's
// device) is watched on its own thread: when a card appears (the device's
// size goes from 0 to N, or its disk sequence number changes), it is checked
// by the rules of `write`, written, read back, given the next unit of the
// manifest, logged, and then the slot waits for the card to be taken out
// before it takes the next one. Slots fail alone; nothing but the named
// slots is ever written.
#pragma once

#include "common/fd.hpp"
#include "flasher/station/records.hpp"
#include "flasher/write/image.hpp"

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

enum class SlotState { Empty, Writing, Verifying, Provisioning, Done, Failed };
const char* slot_state_name(SlotState state);

struct SlotStatus {
    size_t slot = 0;              // index into StationOptions::slots
    std::string device;           // as named
    SlotState state = SlotState::Empty;
    uint64_t done = 0, total = 0; // bytes of the current phase
    double seconds = 0;           // since the card's write began
    double phase_started = 0;     // `seconds` when the current phase (writing, verifying) began
    std::string card;             // its identity (SD CID, disk serial, ...)
    std::string unit;             // the serial of the unit it got
    std::string message;          // why it failed, or what to do now
    // Set once the card is handled: "ok", "failed", "interrupted" or
    // "already-done" (as the log says), with the units then left (-1: no
    // manifest).
    std::string result;
    long units_left = -1;
};

// What the station knows once the image is checked, before any card.
struct StationStart {
    std::string image_sha256;
    std::vector<std::string> commits;
    size_t ok_today = 0, failed_today = 0; // in the log, today (UTC)
    size_t units_left = 0, units_total = 0;
};

struct StationOptions {
    std::filesystem::path image;
    ImageOptions image_options;
    std::vector<std::string> slots;
    // Where units come from and cards are recorded (records.hpp); the
    // caller's, alive until run_station returns.
    StationRecords* records = nullptr;
    bool force = false;          // slots that are not removable disks (loop devices in tests)
    bool rewrite = false;        // write cards the log says are done with this image
    unsigned poll_ms = 200;      // how often an idle slot looks for a card
    size_t stop_after = 0;       // stop once this many cards are done (0: until cancelled)
    std::function<void(const SlotStatus&)> status;  // each change of a slot, from its thread
    std::function<void(const StationStart&)> started;
    std::function<void(const std::string&)> notice;
};

struct StationReport {
    std::string image_sha256;
    std::vector<std::string> commits;
    size_t ok = 0, failed = 0;
    bool cancelled = false;
    std::vector<SlotStatus> slots;            // as each slot ended
    std::vector<std::string> unfinished_units; // given to a card whose provisioning did not end
    size_t units_left = 0, units_total = 0;
};

// The card's identity for the log: "cid:..." (an SD card on an MMC host,
// which names the card itself), "file:..." (a loop device's backing file),
// else "diskseq:N" (the kernel's number for this medium, new each time).
std::string card_identity(const std::string& device);
// The reader's own identity ("serial:...", "wwid:..."), "" when it shows
// none: a USB reader's serial names the reader, not the card in it.
std::string reader_identity(const std::string& device);

// Runs until cancelled (Ctrl-C) or stop_after cards are done. Throws before
// any card is touched when a slot is not a block device or is named twice,
// or the image is bad.
StationReport run_station(const StationOptions& options, GCancellable* cancellable);

} // namespace treeflash::flasher
