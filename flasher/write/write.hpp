// treeflash write: one image onto many cards at once. The image is
// prepared (and checked) once; then each card gets its own thread that
// writes the mapped ranges, the first MiB last, reads everything back past
// the page cache and compares checksums. A card that fails is reported and
// the others finish.
#pragma once

#include "flasher/write/image.hpp"
#include "flasher/disk/target.hpp"

#include <chrono>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

enum class CardPhase { Writing, Verifying, Growing, Done, Failed };
const char* phase_name(CardPhase phase);

// Reported from the card's own thread: at each phase's start and end and
// after every chunk, so a caller can draw progress (and a test can act
// between writing and verifying).
struct CardProgress {
    size_t card = 0; // index into WriteOptions::devices
    CardPhase phase = CardPhase::Writing;
    uint64_t done = 0, total = 0; // bytes of this phase
    double seconds = 0;           // since the card's write started
};

struct WriteOptions {
    std::filesystem::path image;
    ImageOptions image_options;
    std::vector<std::string> devices;
    bool verify = true;
    bool grow = false;
    bool force = false; // allow disks that are not removable
    // Files this run writes besides the cards (a log): refused before any
    // card is touched when one is a file the write reads (image, bmap, sums).
    struct Output {
        std::string what;
        struct stat st {};
    };
    std::vector<Output> outputs;
    // Asked once, with every target, before anything is written; false stops.
    std::function<bool(const std::vector<DiskInfo>&, const PreparedImage&)> confirm;
    std::function<void(const CardProgress&)> progress;
    std::function<void(const std::string&)> notice;
};

struct CardResult {
    DiskInfo disk;
    uint64_t bytes_written = 0;
    double seconds = 0;
    bool verified = false;
    std::optional<uint64_t> grown_to;    // --grow: the last partition's new size in bytes
    std::string error;                   // empty when the card is good
    bool ok() const { return error.empty(); }
};

struct WriteReport {
    std::string image;
    std::string image_sha256;
    std::string bmap;
    std::string sums;
    std::string compression;
    std::vector<std::string> commits; // the OSTree commits the image holds (deployed)
    uint64_t image_size = 0;
    uint64_t mapped_bytes = 0;
    std::vector<CardResult> cards;
    bool cancelled = false;
    bool all_ok() const;
};

// The first bytes of a card are written last: the partition table and the
// boot firmware, so a card pulled mid-write does not half-boot.
constexpr uint64_t held_back_bytes = 1 << 20;

// Writes the prepared image onto one card open in `target`, reads it back
// (options.verify) and grows it (options.grow), on the caller's thread: what
// write_cards does for each card. Never throws; `result` says how it ended.
// `index` names the card in progress reports.
void write_one_card(size_t index, Target& target, const PreparedImage& image, const WriteOptions& options,
                    GCancellable* cancellable, CardResult& result);

// Checks every device (the rules of flash, plus: named once), prepares the
// image, opens all devices exclusively, asks, re-identifies each, then
// writes them in parallel. Throws before any write when a device is unsafe
// or the image is bad; per-card failures after that are in the report.
WriteReport write_cards(const WriteOptions& options, GCancellable* cancellable);

} // namespace treeflash::flasher
