// A line of stations on one PostgreSQL database (libpq): the units they hand
// out and a record of every card, shared by all of them.
//
// A unit is handed out in one transaction (SELECT ... FOR UPDATE SKIP
// LOCKED, then marked reserved with the station's run and the card), so two
// stations never get the same unit. Each run of a station holds a
// session-level advisory lock for as long as it is connected: the database
// itself says which runs are alive. A unit left reserved by a run that is
// gone (killed, its host powered off, its connection lost) is marked failed,
// with a card record saying so, by the next station that starts or takes a
// unit: it is never given again, never silently reused. A card's record and
// its unit's end are written in one transaction.
//
// Tables (created when missing, all named treeflash_*): units, unit_macs,
// unit_files, unit_events (each change of a unit), runs (each start of a
// station), cards (one row per card handled, with its whole record).
#pragma once

#include "flasher/station/records.hpp"

#include <cstddef>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace treeflash::flasher {

class PgSession;

// `url` as messages show it: user, host, port and database only (no
// password or other option), or a placeholder when it is not a URL libpq
// reads.
std::string redacted_url(const std::string& url);
// Whether libpq can read `url` as written: a postgresql:// URL whose user
// and password hold no '/' or '@' (libpq would read them as the host).
bool readable_url(const std::string& url);

struct StationRow {
    std::string name, host;
    bool running = false;
    size_t slots = 0;
    std::string started;   // the last run's start, UTC ISO 8601
    std::string last_card; // "" when none
    size_t ok_hour = 0, failed_hour = 0, ok_today = 0, failed_today = 0;
    double cards_per_hour = 0;
};

struct LineStatus {
    std::vector<StationRow> stations;
    size_t ok_hour = 0, failed_hour = 0, ok_today = 0, failed_today = 0;
    double cards_per_hour = 0;
    size_t units_free = 0, units_reserved = 0, units_used = 0, units_failed = 0;
    // Reserved by a run that is gone: marked failed when a station next
    // starts or takes a unit.
    size_t units_reserved_by_stopped = 0;
    std::vector<std::pair<std::string, size_t>> failures; // cause, cards; most first
};

class LineDatabase {
public:
    // Connects (a postgresql:// or postgres:// URL; anything else is
    // refused) and creates the tables when they are missing.
    explicit LineDatabase(const std::string& url);
    ~LineDatabase();
    LineDatabase(const LineDatabase&) = delete;
    LineDatabase& operator=(const LineDatabase&) = delete;

    // Adds `units` (read and checked by read_manifest) in one transaction:
    // a serial, MAC or hostname the database already holds refuses all of
    // them, naming it. Returns the number added.
    size_t import_units(const std::vector<Unit>& units, const std::string& manifest);
    LineStatus status();
    // One object per unit, in manifest order: which card got it, when,
    // where, with which image and commit (keys in a fixed order).
    std::vector<nlohmann::ordered_json> report();

    PgSession& session() { return *m_session; }

private:
    std::unique_ptr<PgSession> m_session;
};

// A station's records in the line's database (see above).
class LineRecords final : public StationRecords {
public:
    // Registers a run of the station `name` ([A-Za-z0-9._-]{1,64}; "" for
    // the host's name) with
    // `slots` slots. Refused when a run of that name is alive (but for one
    // of this kernel and PID namespace whose process is gone: its
    // connection is ended), and when the database holds no unit.
    LineRecords(const std::string& url, const std::string& name, size_t slots);
    ~LineRecords() override;

    std::string units_source() const override { return "the line's database"; }
    bool gives_units() const override { return true; }
    std::pair<size_t, size_t> counts_today() override;
    std::optional<std::string> done_unit(const std::string& card, const std::string& image_sha256) override;
    std::optional<Unit> take(const UnitRequest& request) override;
    void record_card(const nlohmann::json& record, const std::optional<Unit>& unit) override;
    size_t units_left() override;
    size_t units_total() override;
    std::vector<std::string> unfinished() override;
    bool broken() const override;

    long run() const { return m_run; }
    const std::string& station() const { return m_station; }

private:
    std::unique_ptr<LineDatabase> m_database;
    std::mutex m_mutex; // one connection, many slot threads
    std::string m_station;
    long m_run = 0;
};

// Whether `name` may name a station: [A-Za-z0-9._-]{1,64}.
bool valid_station_name(const std::string& name);

} // namespace treeflash::flasher
