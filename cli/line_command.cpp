// treeflash line: the stations of a line on one PostgreSQL database.
//   import: a manifest (JSON lines or CSV) -> flasher::LineDatabase::import_units
//   status: flasher::LineDatabase::status -> text or JSON
//   export: flasher::LineDatabase::report -> CSV or JSON lines
#include "cli/command.hpp"
#include "common/error.hpp"
#include "common/named_file.hpp"
#include "common/text.hpp"
#include "flasher/station/line_database.hpp"
#include "flasher/station/units.hpp"

#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>
#include <sstream>

namespace po = boost::program_options;

namespace treeflash::cli {

namespace {

const char* line_usage = R"(Usage: treeflash line import MANIFEST --db URL
       treeflash line status --db URL [--json]
       treeflash line export --db URL [--format csv|jsonl] [--output FILE]

The stations of a factory line on one PostgreSQL database, named by a
postgresql:// URL (libpq's: postgresql://USER@HOST:PORT/DATABASE, or
postgresql:///DATABASE?host=/run/postgresql for a local socket; keep the
password in ~/.pgpass or PGPASSWORD rather than in the URL, which other
users see in the process list). The tables (treeflash_*) are created when
missing. Each station runs with the same --db:
  treeflash station card.img.zst --db URL --station NAME --slot DEVICE...
and takes its units from the database: a unit is handed out once across
all stations, in one transaction; a unit whose station stopped while its
card was being provisioned (killed, powered off, its connection lost) is
marked failed, never given again.

import   adds the units of MANIFEST, in one transaction: JSON lines as
         station --manifest reads them, or CSV with a header naming the
         columns serial, hostname, mac (addresses separated by spaces or ;)
         and file:PATH or file:PATH:MODE (each cell a source file below the
         manifest's folder, for /etc/PATH on the card; empty: none). A
         serial, MAC or hostname the database holds already refuses them
         all.
status   the whole line: each station (running or not, cards per hour, ok
         and failed in the last hour and today, its last card), the units
         (free, reserved, used, failed) and the failures by cause.
export   one record per unit, in manifest order: which card got it, at
         which station and slot, when, with which image and commit; CSV
         (default) or JSON lines, on stdout or into FILE.

Examples:
  treeflash line import units.csv --db postgresql://line@db.factory/line
  treeflash line status --db postgresql://line@db.factory/line
  treeflash line export --db postgresql://line@db.factory/line --format jsonl --output report.jsonl

Options)";

// A CSV field: quoted when it holds a comma, quote or line break.
std::string csv_field(const std::string& text)
{
    if (text.find_first_of(",\"\r\n") == std::string::npos)
        return text;
    std::string out = "\"";
    for (char c : text)
        out += c == '"' ? std::string("\"\"") : std::string(1, c);
    return out + "\"";
}

std::string csv_cell(const nlohmann::ordered_json& value)
{
    if (value.is_null())
        return "";
    if (value.is_string())
        return csv_field(value.get<std::string>());
    if (value.is_array()) {
        std::string joined;
        for (const auto& item : value)
            joined += (joined.empty() ? "" : " ") + item.get<std::string>();
        return csv_field(joined);
    }
    return value.dump();
}

std::string per_hour(double rate)
{
    char text[32];
    std::snprintf(text, sizeof text, "%.1f", rate);
    return text;
}

nlohmann::json status_json(const flasher::LineStatus& status)
{
    nlohmann::json stations = nlohmann::json::array();
    for (const auto& s : status.stations)
        stations.push_back({{"name", s.name}, {"host", s.host}, {"running", s.running}, {"slots", s.slots},
                            {"started", s.started}, {"last_card", s.last_card.empty() ? nlohmann::json(nullptr)
                                                                                        : nlohmann::json(s.last_card)},
                            {"cards_per_hour", s.cards_per_hour}, {"ok_last_hour", s.ok_hour},
                            {"failed_last_hour", s.failed_hour}, {"ok_today", s.ok_today},
                            {"failed_today", s.failed_today}});
    nlohmann::json failures = nlohmann::json::object();
    for (const auto& [cause, cards] : status.failures)
        failures[cause] = cards;
    return {{"stations", stations},
            {"cards_per_hour", status.cards_per_hour},
            {"ok_last_hour", status.ok_hour},
            {"failed_last_hour", status.failed_hour},
            {"ok_today", status.ok_today},
            {"failed_today", status.failed_today},
            {"units",
             {{"free", status.units_free},
              {"reserved", status.units_reserved},
              {"used", status.units_used},
              {"failed", status.units_failed},
              {"reserved_by_stopped_stations", status.units_reserved_by_stopped}}},
            {"failures", failures}};
}

void print_status(const flasher::LineStatus& status)
{
    size_t running = 0;
    for (const auto& s : status.stations)
        running += s.running;
    std::cout << "line: " << running << " of " << status.stations.size() << " station(s) running, "
              << per_hour(status.cards_per_hour) << " cards per hour; " << status.ok_hour << " ok and "
              << status.failed_hour << " failed in the last hour, " << status.ok_today << " ok and "
              << status.failed_today << " failed today (UTC)\n";
    std::cout << "units: " << status.units_free << " free, " << status.units_reserved << " reserved, "
              << status.units_used << " used, " << status.units_failed << " failed";
    if (status.units_reserved_by_stopped)
        std::cout << " (" << status.units_reserved_by_stopped
                  << " reserved by a stopped station: marked failed when a station next starts or takes a unit)";
    std::cout << "\n";
    if (!status.stations.empty())
        std::cout << "stations:\n";
    for (const auto& s : status.stations)
        std::cout << "  " << text::printable(s.name) << " (" << text::printable(s.host) << ", " << s.slots << " slot(s)): "
                  << (s.running ? "running" : "stopped") << ", " << per_hour(s.cards_per_hour)
                  << " cards per hour, " << s.ok_hour << " ok and " << s.failed_hour << " failed in the last hour, "
                  << s.ok_today << " ok today; last card " << (s.last_card.empty() ? "none" : s.last_card) << "\n";
    if (!status.failures.empty())
        std::cout << "failures by cause (all time):\n";
    for (const auto& [cause, cards] : status.failures)
        std::cout << "  " << text::printable(cause) << ": " << cards << "\n";
}

} // namespace

int run_line(const std::vector<std::string>& args, GCancellable*)
{
    std::string action, manifest, db, format = "csv", output;
    bool json = false;
    po::options_description desc(line_usage);
    desc.add_options()
        ("help,h", "show this help")
        ("action", po::value(&action)->value_name("ACTION"), "import, status or export")
        ("manifest", po::value(&manifest)->value_name("MANIFEST"), "import: the units, JSON lines or .csv")
        ("db", po::value(&db)->value_name("URL"), "the line's database: a postgresql:// URL")
        ("json", po::bool_switch(&json), "status: print JSON on stdout")
        ("format", po::value(&format)->value_name("FORMAT"), "export: csv (default) or jsonl")
        ("output", po::value(&output)->value_name("FILE"), "export: write FILE instead of stdout");
    po::positional_options_description positional;
    positional.add("action", 1).add("manifest", 1);
    if (!parse_options(args, desc, &positional))
        return 0;
    if (action != "import" && action != "status" && action != "export")
        throw UsageError(action.empty() ? "name what to do: import, status or export"
                                        : "unknown action '" + text::printable(action) + "' (import, status, export)");
    if (db.empty())
        throw UsageError("name the line's database with --db postgresql://...");
    if (action != "import" && !manifest.empty())
        throw UsageError("unexpected argument '" + text::printable(manifest) + "'");
    if (action != "status" && json)
        throw UsageError("--json is for status (export has --format jsonl)");
    if (action != "export" && (format != "csv" || !output.empty()))
        throw UsageError("--format and --output are for export");
    if (format != "csv" && format != "jsonl")
        throw UsageError("--format must be csv or jsonl");

    if (action == "import") {
        if (manifest.empty())
            throw UsageError("name the MANIFEST to import");
        // Every unit is read and checked before the database is touched.
        std::vector<flasher::Unit> units = flasher::read_manifest(manifest);
        flasher::LineDatabase line(db);
        size_t added = line.import_units(units, manifest);
        std::cout << "line: imported " << added << " unit(s) from " << manifest << " into "
                  << flasher::redacted_url(db) << "\n";
        return 0;
    }
    if (!output.empty())
        named::check_output(output, "the report"); // before the database is read
    flasher::LineDatabase line(db);
    if (action == "status") {
        flasher::LineStatus status = line.status();
        if (json)
            print_json(status_json(status));
        else
            print_status(status);
        return 0;
    }
    std::ostringstream out;
    auto rows = line.report();
    if (format == "jsonl") {
        for (const auto& row : rows)
            out << row.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    } else {
        const char* header[] = {"serial", "hostname", "mac", "state", "card", "station", "slot",
                                "given", "ended", "image", "image_sha256", "commit", "detail"};
        for (size_t i = 0; i < std::size(header); ++i)
            out << (i ? "," : "") << header[i];
        out << "\n";
        for (const auto& row : rows) {
            for (size_t i = 0; i < std::size(header); ++i)
                out << (i ? "," : "") << csv_cell(row[header[i]]);
            out << "\n";
        }
    }
    if (output.empty())
        std::cout << out.str() << std::flush;
    else
        named::write_output(output, "the report", out.str());
    return 0;
}

} // namespace treeflash::cli
