// treeflash station: options -> flasher::StationOptions -> flasher::run_station
// -> a line per slot change on the terminal, the card log, a summary.
#include "cli/command.hpp"
#include "cli/station_view.hpp"
#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/named_file.hpp"
#include "common/text.hpp"
#include "flasher/station/line_database.hpp"
#include "flasher/station/page.hpp"
#include "flasher/station/station.hpp"

#include <boost/program_options.hpp>
#include <cstdio>
#include <fcntl.h>
#include <iostream>
#include <mutex>
#include <unistd.h>

namespace po = boost::program_options;

namespace treeflash::cli {

namespace {

const char* station_usage = R"(Usage: treeflash station IMAGE --slot DEVICE... [OPTIONS]

A factory's card writer. Each --slot is a card reader's device (a
/dev/disk/by-path/... name stays the same slot across reboots). The station
watches every slot: when a card is put in, it is checked by the rules of
treeflash write (a whole disk, removable unless --force, not mounted or in
use, large enough), written, read back and compared, given the next unit
of --manifest, and recorded in --log; then the slot waits for the card to
be taken out before it takes the next one. Slots work in parallel and fail
alone; no disk but the named slots is ever written. Runs until Ctrl-C
(cards being written are cancelled as write cancels them) or --cards N.
On a terminal the line is redrawn in place (each slot's state, progress,
speed and time left); into a pipe, one line per change of a slot. --http
serves a live page of every slot for the line (server-sent events, no
outside assets), readable across a room.

With --manifest, each card gets a unit of its own: one JSON object per line,
  {"serial": "TCU-0001", "hostname": "tcu-0001", "mac": ["02:00:00:00:00:01"],
   "files": [{"path": "ssl/private/device.key", "source": "keys/0001.key", "mode": "0600"}]}
written into /etc of the card's deployment without mounting it (hostname,
/etc/treeflash/unit with serial= and ethaddr=..., the unit's files, sources
read from below the manifest's folder) and, on a board that keeps U-Boot's
environment on the card (ls104x), into that environment (serial#, ethaddr,
eth1addr, ...), and read back. A card that cannot be provisioned is found
so before a unit is taken for it. Which unit went to which card is
journalled in MANIFEST.journal, on disk before the unit reaches the card: a
unit is given out once, even across a crash or kill -9; a unit whose card
then failed is not given again.

With --db, the station is one of a line's: its units come from, and its
cards are recorded in, a PostgreSQL database every station of the line
shares (treeflash line --help: import the manifest there first). A unit is
handed out once across all stations; one given to a card whose station
then stopped is marked failed, never given again. --station names this
station in the database (default: the host's name; two running stations
cannot share a name). Each station holds one connection, which it needs
for itself: not through a pooler in transaction mode (PgBouncer's), which
would lose the lock that tells the line the station is alive.

The log gets one JSON line per card (time, slot, card identity: the SD
card's CID where the reader shows it, a loop device's file, else the disk
sequence number; the reader's serial; image sha256, commit, unit, what was
provisioned, result, seconds), flushed. A card the log records as written
with this image is not written again unless --rewrite. Needs root.

Example:
  treeflash station card.img.zst --slot /dev/disk/by-path/pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0 \
      --slot /dev/disk/by-path/pci-0000:00:14.0-usb-0:2:1.0-scsi-0:0:0:0 \
      --manifest units.jsonl --log cards.jsonl

Options)";

} // namespace

int run_station(const std::vector<std::string>& args, GCancellable* cancellable)
{
    flasher::StationOptions options;
    std::string image, bmap, sums, manifest, log, http, db, station;
    uint64_t cards = 0;
    std::string cards_text;
    bool json = false;
    po::options_description desc(station_usage);
    desc.add_options()
        ("help,h", "show this help")
        ("image", po::value(&image)->value_name("IMAGE"), "the golden image (raw, .gz, .xz, .zst)")
        ("slot", po::value(&options.slots)->value_name("DEVICE")->composing(), "a card reader's device; repeatable")
        ("manifest", po::value(&manifest)->value_name("FILE"), "units to give the cards, one JSON object per line")
        ("log", po::value(&log)->value_name("FILE"), "append one JSON line per card to FILE (default: none)")
        ("db", po::value(&db)->value_name("URL"), "the line's PostgreSQL database (postgresql://...): units and card records")
        ("station", po::value(&station)->value_name("NAME"), "this station's name in --db (default: the host's name)")
        ("bmap", po::value(&bmap)->value_name("FILE"), "the image's block map (default: beside the image)")
        ("sums", po::value(&sums)->value_name("FILE"), "check the image against this SHA256SUMS")
        ("cards", po::value(&cards_text)->value_name("N"), "stop once N cards are done, never writing more (default: run until Ctrl-C)")
        ("rewrite", po::bool_switch(&options.rewrite), "write cards the log records as done with this image")
        ("force", po::bool_switch(&options.force), "allow slots that are not removable disks")
        ("http", po::value(&http)->value_name("HOST:PORT"),
         "serve a live page of the line at http://HOST:PORT/ (e.g. 0.0.0.0:8080; default: none)")
        ("json", po::bool_switch(&json), "print the summary as JSON on stdout");
    po::positional_options_description positional;
    positional.add("image", 1);
    if (!parse_options(args, desc, &positional))
        return 0;
    if (image.empty())
        throw UsageError("name the IMAGE to write");
    if (options.slots.empty())
        throw UsageError("name at least one --slot DEVICE");
    if (!cards_text.empty())
        cards = parse_count(cards_text, "--cards", 1, 1000000000);
    if (!db.empty() && (!manifest.empty() || !log.empty()))
        throw UsageError("with --db the units and the card records are in the database: no --manifest or --log "
                         "(treeflash line import puts a manifest there)");
    if (db.empty() && !station.empty())
        throw UsageError("--station names a station in --db");
    options.image = image;
    options.stop_after = cards;
    if (!bmap.empty())
        options.image_options.bmap = bmap;
    if (!sums.empty())
        options.image_options.sums = sums;
    options.image_options.notice = print_notice;
    options.notice = print_notice;

    // The log and the journal are the station's only outputs: never a file
    // it reads.
    std::vector<std::filesystem::path> reads = flasher::files_read_with(options.image, options.image_options);
    if (!manifest.empty())
        reads.push_back(manifest);
    UniqueFd log_fd;
    std::string log_text; // what the log held at start: cards already done
    if (!log.empty()) {
        for (const auto& read : reads)
            if (named::same_name(log, read))
                throw Error("the log " + log + " is a file this station reads (" + read.string() + "); name another file");
        if (!manifest.empty() && named::same_name(log, manifest + ".journal"))
            throw Error("the log " + log + " is the manifest's journal; name another file");
        named::OpenFile opened = named::open_log(log, "the log");
        UniqueFd reader(::open(("/proc/self/fd/" + std::to_string(opened.fd.get())).c_str(), O_RDONLY | O_CLOEXEC));
        if (!reader)
            throw_errno("read the log " + log);
        log_text = fs::read_all(reader.get(), "the log " + log);
        log_fd = std::move(opened.fd);
    }
    if (!manifest.empty())
        for (const auto& read : flasher::files_read_with(options.image, options.image_options))
            if (named::same_name(manifest + ".journal", read))
                throw Error("the manifest's journal " + manifest + ".journal is a file this station reads; "
                            "move the manifest");
    std::unique_ptr<flasher::StationRecords> records;
    if (!db.empty()) {
        auto line = std::make_unique<flasher::LineRecords>(db, station, options.slots.size());
        print_notice("station " + line->station() + " on the line's database " + flasher::redacted_url(db));
        records = std::move(line);
    } else {
        std::optional<std::filesystem::path> manifest_path;
        if (!manifest.empty())
            manifest_path = manifest;
        records = std::make_unique<flasher::FileRecords>(manifest_path, log_fd ? log_fd.get() : -1, log_text);
    }
    options.records = records.get();

    // What the line sees, drawn on the terminal and, with --http, served.
    flasher::LineState line(options.slots);
    options.started = [&](const flasher::StationStart& start) {
        flasher::LineInfo info;
        info.image = image;
        info.image_sha256 = start.image_sha256;
        info.commit = start.commits.size() == 1 ? start.commits.front() : "";
        info.ok_today = start.ok_today;
        info.failed_today = start.failed_today;
        info.units = records->gives_units();
        info.units_left = start.units_left;
        info.units_total = start.units_total;
        line.set_info(info);
    };
    std::unique_ptr<flasher::StationPage> page;
    if (!http.empty()) {
        page = std::make_unique<flasher::StationPage>(http, line);
        print_notice("the line's page: " + page->url());
    }

    // On a tty, the line redrawn in place under the cards' results; else
    // one line per change of a slot, not per chunk, as a log keeps it.
    std::ostream& out = json ? std::cerr : std::cout;
    const int out_fd = json ? STDERR_FILENO : STDOUT_FILENO;
    std::unique_ptr<LiveTerminal> live;
    if (::isatty(out_fd))
        live = std::make_unique<LiveTerminal>(line, out_fd);
    std::mutex out_mutex;
    std::vector<flasher::SlotState> last(options.slots.size(), flasher::SlotState::Empty);
    std::vector<bool> seen(options.slots.size(), false);
    options.status = [&](const flasher::SlotStatus& s) {
        line.update(s);
        std::lock_guard lock(out_mutex);
        if (seen[s.slot] && last[s.slot] == s.state)
            return;
        seen[s.slot] = true;
        last[s.slot] = s.state;
        if (!live)
            out << describe_slot_change(s) << std::endl;
        else if (s.state == flasher::SlotState::Done || s.state == flasher::SlotState::Failed)
            live->print(describe_slot_change(s));
    };
    if (live) {
        auto above = [&](const std::string& text) { live->print("treeflash: " + text); };
        options.notice = above;
        options.image_options.notice = above;
    }

    flasher::StationReport report = in_step("station", [&] { return flasher::run_station(options, cancellable); });
    live.reset();
    page.reset();

    if (json) {
        nlohmann::json slots = nlohmann::json::array();
        for (const auto& s : report.slots)
            slots.push_back({{"slot", s.slot + 1}, {"device", s.device}, {"state", flasher::slot_state_name(s.state)},
                             {"card", s.card}, {"unit", s.unit}, {"message", s.message}});
        nlohmann::json summary{{"image_sha256", report.image_sha256}, {"ok", report.ok}, {"failed", report.failed},
                               {"cancelled", report.cancelled}, {"slots", slots}};
        if (records->gives_units()) {
            summary["units_left"] = report.units_left;
            summary["units_total"] = report.units_total;
            summary["units_unfinished"] = report.unfinished_units;
        }
        print_json(summary);
    } else {
        std::cout << "station: " << report.ok << " card(s) done, " << report.failed << " failed";
        if (records->gives_units())
            std::cout << "; " << report.units_left << " of " << report.units_total << " units left";
        std::cout << (report.cancelled ? " (interrupted)" : "") << "\n";
        for (const auto& s : report.slots)
            std::cout << "  slot " << s.slot + 1 << " " << s.device << ": " << flasher::slot_state_name(s.state)
                      << (s.message.empty() ? "" : " (" + text::printable(s.message) + ")") << "\n";
        for (const auto& serial : report.unfinished_units)
            std::cout << "  unit " << serial << " was given to a card whose provisioning did not end; it is not given "
                         "again\n";
    }
    if (report.cancelled)
        return 130;
    return report.failed == 0 ? 0 : 1;
}

} // namespace treeflash::cli
