// What a station records: the units it hands out, one per card, and one
// record per card it handled. Two homes:
//  - FileRecords: files on this host (a manifest of units, its journal, a
//    JSON-lines card log); one station per manifest.
//  - LineRecords (line_database.hpp): a PostgreSQL database that every
//    station of a line shares; a unit is handed out once across all of them.
// The station (station.cpp) sees only this interface.
#pragma once

#include "flasher/station/units.hpp"

#include <cstddef>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace treeflash::flasher {

// Who asks for a unit: the card it is for, and with what.
struct UnitRequest {
    size_t slot = 0; // from 1
    std::string card;
    std::string image, image_sha256, commit;
};

class StationRecords {
public:
    virtual ~StationRecords() = default;

    // Where units come from, for messages ("units.jsonl", "the line's database").
    virtual std::string units_source() const = 0;
    // Whether this station gives each card a unit.
    virtual bool gives_units() const = 0;
    // Cards this station recorded today (UTC) before this run: ok, failed.
    virtual std::pair<size_t, size_t> counts_today() = 0;
    // The unit ("" for none) of `card` when a record says it was written
    // with the image `image_sha256`; nullopt when none does.
    virtual std::optional<std::string> done_unit(const std::string& card, const std::string& image_sha256) = 0;
    // The next free unit, recorded as given to the card before it returns;
    // nullopt when none is left.
    virtual std::optional<Unit> take(const UnitRequest& request) = 0;
    // How a card ended: its record (a JSON object with "result"), and, when
    // it got a unit, that unit's end ("ok" result: used; else failed). Throws
    // when it cannot be recorded.
    virtual void record_card(const nlohmann::json& record, const std::optional<Unit>& unit) = 0;
    virtual size_t units_left() = 0;
    virtual size_t units_total() = 0;
    // Units given to a card whose provisioning never ended (the station
    // stopped): they are not given again.
    virtual std::vector<std::string> unfinished() = 0;
    // Units can no longer be handed out safely: the station must stop.
    virtual bool broken() const = 0;
};

// The local files: `manifest` (optional) and its journal, and the card log
// open at `log_fd` (-1: none) whose earlier content is `log_text`.
class FileRecords final : public StationRecords {
public:
    FileRecords(const std::optional<std::filesystem::path>& manifest, int log_fd, const std::string& log_text);

    std::string units_source() const override;
    bool gives_units() const override { return m_units != nullptr; }
    std::pair<size_t, size_t> counts_today() override { return m_today; }
    std::optional<std::string> done_unit(const std::string& card, const std::string& image_sha256) override;
    std::optional<Unit> take(const UnitRequest& request) override;
    void record_card(const nlohmann::json& record, const std::optional<Unit>& unit) override;
    size_t units_left() override { return m_units ? m_units->left() : 0; }
    size_t units_total() override { return m_units ? m_units->total() : 0; }
    std::vector<std::string> unfinished() override;
    bool broken() const override { return m_units && m_units->broken(); }

private:
    std::optional<std::filesystem::path> m_manifest;
    std::unique_ptr<UnitPool> m_units;
    int m_log_fd;
    std::mutex m_mutex;
    // (card, image sha256) -> unit, of cards the log records as written.
    std::map<std::pair<std::string, std::string>, std::string> m_done;
    std::pair<size_t, size_t> m_today{0, 0};
};

} // namespace treeflash::flasher
