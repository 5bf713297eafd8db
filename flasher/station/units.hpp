// The units a factory station hands out, one per card: a manifest of JSON
// lines (serial, hostname, MAC addresses, per-unit files) and, beside it, a
// journal of which unit went where. A unit is journalled, and the journal
// flushed to disk, before any of it reaches a card; the journal is read at
// start, so a unit given out once is never given out again, whatever
// happened to the card or to the station (a crash, kill -9, a power cut).
#pragma once

#include "common/fd.hpp"

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace treeflash::flasher {

struct UnitFile {
    std::string path;   // inside /etc, relative: "ssl/private/device.key"
    std::string data;   // the bytes, read from the manifest's folder at start
    unsigned mode = 0644;
};

struct Unit {
    size_t line = 0;                // in the manifest, for messages
    std::string serial;             // unique in the manifest
    std::string hostname;           // may be empty
    std::vector<std::string> macs;  // ethaddr, eth1addr, ... in order; lower case
    std::vector<UnitFile> files;
    // KEY=VALUE lines of /etc/treeflash/unit on the card.
    std::string unit_file() const;
    // What U-Boot's environment gets: serial#, ethaddr, eth1addr, ...
    std::vector<std::pair<std::string, std::string>> uboot_variables() const;
};

// Reads and checks a manifest: one JSON object per line, e.g.
//   {"serial": "TCU-0001", "hostname": "tcu-0001", "mac": ["02:00:00:00:00:01"],
//    "files": [{"path": "ssl/private/device.key", "source": "keys/0001.key", "mode": "0600"}]}
// A manifest named *.csv is CSV instead, its header naming the columns:
// serial, hostname, mac (addresses separated by spaces or ;) and
// file:PATH or file:PATH:MODE, whose cells name each unit's source.
// Throws naming the line of the first problem: a serial that is missing,
// repeated or not [A-Za-z0-9._-]{1,64}, a hostname that is not a DNS name, a
// MAC that is not xx:xx:xx:xx:xx:xx (or is multicast), a file path that
// leaves /etc, a source that is not a regular file below the manifest's
// folder.
std::vector<Unit> read_manifest(const std::filesystem::path& manifest);

class UnitPool {
public:
    // The manifest and its journal (MANIFEST.journal), locked for this
    // process: a second station on the same manifest is refused.
    explicit UnitPool(const std::filesystem::path& manifest);

    // The next unit no card has had, journalled as given to `card` in
    // `slot` (flushed before it returns); nullopt when none is left.
    std::optional<Unit> take(const std::string& slot, const std::string& card);
    // Journals how the card that got `unit` ended: "ok", or "failed" and why.
    void finish(const Unit& unit, bool ok, const std::string& detail);

    size_t total() const { return m_units.size(); }
    size_t left() const;
    // Units journalled as given but never finished: the station stopped
    // while their card was being provisioned (they are not given again).
    std::vector<std::string> unfinished() const;
    const std::filesystem::path& journal_path() const { return m_journal_path; }
    // The journal could not be written: no unit can be given out safely.
    bool broken() const { return m_broken; }

private:
    void append(const std::string& line);

    std::vector<Unit> m_units;
    std::filesystem::path m_journal_path;
    UniqueFd m_journal;
    mutable std::mutex m_mutex;
    std::set<std::string> m_given;               // serials journalled as given
    std::map<std::string, std::string> m_ended;  // serial -> "ok" | "failed"
    std::atomic<bool> m_broken{false};
};

} // namespace treeflash::flasher
