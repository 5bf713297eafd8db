// The line's database: a real PostgreSQL server of the test's own (a
// private socket folder and port), stations as real processes, psql as the
// judge of what the database holds. No root needed (as root the server runs
// as the postgres user).
#include "flasher/station/line_database.hpp"
#include "flasher/station/units.hpp"
#include "tests/support/postgres.hpp"

#include <csignal>
#include <functional>
#include <doctest/doctest.h>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <sys/wait.h>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using nlohmann::json;

namespace {

const bool no_postgres = !postgres_available();

// A manifest of `count` units TCU-0001... with a MAC, a hostname and a key
// file each, as CSV.
fs::path csv_manifest(const Scratch& tmp, int count, const std::string& name = "units.csv", int first = 1)
{
    std::string text = "serial,hostname,mac,file:ssl/private/device.key:0600\n";
    for (int i = first; i < first + count; ++i) {
        char serial[16], mac[32];
        std::snprintf(serial, sizeof serial, "TCU-%04d", i);
        std::snprintf(mac, sizeof mac, "02:00:00:00:%02x:%02x", i / 256, i % 256);
        write_file(tmp / "keys" / (std::string(serial) + ".key"), std::string("key of ") + serial + "\n");
        text += std::string(serial) + ",tcu-" + std::to_string(i) + "," + mac + ",keys/" + serial + ".key\n";
    }
    write_file(tmp / name, text);
    return tmp / name;
}

void import(const PostgresServer& db, const fs::path& manifest)
{
    flasher::LineDatabase line(db.url());
    line.import_units(flasher::read_manifest(manifest), manifest.string());
}

std::vector<std::string> lines_of(const std::string& text)
{
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);)
        if (!line.empty())
            out.push_back(line);
    return out;
}

// A station as a process of its own, through the library: registers as
// `name`, then runs `body` and exits 0 (1 when it throws). The parent
// learns through a pipe when it has registered.
struct StationProcess {
    pid_t pid = -1;
    StationProcess(const std::string& url, const std::string& name,
                   const std::function<void(flasher::LineRecords&)>& body)
    {
        int ready[2];
        REQUIRE(::pipe(ready) == 0);
        pid = ::fork();
        REQUIRE(pid >= 0);
        if (pid == 0) {
            ::close(ready[0]);
            int code = 0;
            try {
                flasher::LineRecords records(url, name, 1);
                char c = 'r';
                (void)!::write(ready[1], &c, 1);
                body(records);
            } catch (const std::exception& e) {
                std::fprintf(stderr, "station %s: %s\n", name.c_str(), e.what());
                code = 1;
            }
            ::_exit(code);
        }
        ::close(ready[1]);
        char c = 0;
        (void)!::read(ready[0], &c, 1);
        ::close(ready[0]);
    }
    int wait()
    {
        int status = 0;
        ::waitpid(pid, &status, 0);
        pid = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    // A test that fails early leaves no station behind.
    ~StationProcess()
    {
        if (pid > 0) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, nullptr, 0);
        }
    }
    StationProcess(const StationProcess&) = delete;
    StationProcess& operator=(const StationProcess&) = delete;
};

json line_status(const PostgresServer& db)
{
    auto status = run_treeflash({"line", "status", "--db", db.url(), "--json"});
    REQUIRE_MESSAGE(status.ok(), status.err);
    return json::parse(status.out);
}

json card_record(const std::string& card, const std::string& result)
{
    return {{"slot", 1}, {"card", card}, {"image", "golden.img"}, {"image_sha256", "ab12"}, {"commit", "c0ffee"},
            {"result", result}, {"cause", result == "ok" ? json(nullptr) : json("write")},
            {"error", result == "ok" ? json(nullptr) : json("an I/O error")}};
}

} // namespace

TEST_SUITE("line") {

TEST_CASE("import: every unit or none; a serial, MAC or hostname the database holds refuses the whole manifest"
          * doctest::skip(no_postgres))
{
    Scratch tmp;
    PostgresServer db;
    fs::path manifest = csv_manifest(tmp, 5);
    auto r = run_treeflash({"line", "import", manifest.string(), "--db", db.url()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    CHECK(r.out.find("imported 5 unit(s)") != std::string::npos);
    CHECK(db.sql("SELECT serial, hostname, array_to_string(macs, ' '), state FROM treeflash_units ORDER BY position")
          == "TCU-0001|tcu-1|02:00:00:00:00:01|free\nTCU-0002|tcu-2|02:00:00:00:00:02|free\n"
             "TCU-0003|tcu-3|02:00:00:00:00:03|free\nTCU-0004|tcu-4|02:00:00:00:00:04|free\n"
             "TCU-0005|tcu-5|02:00:00:00:00:05|free\n");
    CHECK(db.sql("SELECT path, mode, encode(data, 'escape') FROM treeflash_unit_files WHERE serial = 'TCU-0003'")
          == "ssl/private/device.key|384|key of TCU-0003\n\n");

    // Six new units, the last of which repeats one already there.
    auto refused = [&](const std::string& line, const std::string& expected) {
        std::string text = "serial,hostname,mac\n";
        for (int i = 6; i <= 10; ++i) {
            char row[64];
            std::snprintf(row, sizeof row, "TCU-%04d,tcu-%d,02:00:00:00:01:%02x\n", i, i, i);
            text += row;
        }
        write_file(tmp / "more.csv", text + line + "\n");
        auto again = run_treeflash({"line", "import", (tmp / "more.csv").string(), "--db", db.url()});
        CHECK(again.exit_code == 1);
        CHECK_MESSAGE(again.err.find(expected) != std::string::npos, again.err);
        CHECK_MESSAGE(again.err.find("nothing was imported") != std::string::npos, again.err);
        CHECK(db.sql("SELECT count(*) FROM treeflash_units") == "5\n");
    };
    refused("TCU-0002,tcu-x,02:00:00:00:02:00", "line 7: serial TCU-0002 is already in the line's database");
    refused("TCU-0100,tcu-x,02:00:00:00:00:04", "line 7: a MAC of serial TCU-0100 is already in the line's database");
    refused("TCU-0100,TCU-3,02:00:00:00:02:00", "line 7: hostname TCU-3 is already in the line's database");

    // A bad manifest is refused before the database is touched.
    write_file(tmp / "bad.jsonl", "{\"serial\": \"TCU-0200\"}\n{\"serial\": \"TCU-0200\"}\n");
    auto bad = run_treeflash({"line", "import", (tmp / "bad.jsonl").string(), "--db", db.url()});
    CHECK(bad.exit_code == 1);
    CHECK(bad.err.find("line 2: serial TCU-0200 is listed twice") != std::string::npos);
    CHECK(db.sql("SELECT count(*) FROM treeflash_units") == "5\n");
}

TEST_CASE("three station processes take units at once: each unit goes to one card, none is lost"
          * doctest::skip(no_postgres))
{
    Scratch tmp;
    PostgresServer db;
    import(db, csv_manifest(tmp, 60));
    // All three start taking at once: when the parent closes `go`.
    int go[2];
    REQUIRE(::pipe(go) == 0);
    std::vector<std::unique_ptr<StationProcess>> stations;
    for (int s = 1; s <= 3; ++s) {
        std::string name = "s" + std::to_string(s);
        fs::path out = tmp / (name + ".taken");
        stations.push_back(std::make_unique<StationProcess>(db.url(), name, [=](flasher::LineRecords& records) {
            ::close(go[1]);
            char c;
            (void)!::read(go[0], &c, 1);
            std::string taken;
            for (int card = 0;; ++card) {
                flasher::UnitRequest request{1, name + "-card-" + std::to_string(card), "golden.img", "ab12", "c0ffee"};
                auto unit = records.take(request);
                if (!unit)
                    break;
                taken += unit->serial + "\n";
                // Every fifth card fails after it got its unit.
                records.record_card(card_record(request.card, card % 5 == 4 ? "failed" : "ok"), unit);
            }
            write_file(out, taken);
        }));
    }
    ::close(go[0]);
    ::close(go[1]);
    for (auto& s : stations)
        CHECK(s->wait() == 0);
    std::map<std::string, int> given;
    size_t per_station_min = 60, failed = 0;
    for (int s = 1; s <= 3; ++s) {
        auto taken = lines_of(read_text(tmp / ("s" + std::to_string(s) + ".taken")));
        per_station_min = std::min(per_station_min, taken.size());
        failed += taken.size() / 5;
        for (const auto& serial : taken)
            ++given[serial];
    }
    CHECK(given.size() == 60);
    for (const auto& [serial, times] : given)
        CHECK_MESSAGE(times == 1, serial);
    // They took turns: each got some.
    CHECK_MESSAGE(per_station_min >= 1, "the fewest units one station took: " << per_station_min);
    // The database agrees: every unit ended once, with one card record and
    // two events (given, then its end), written together.
    CHECK(db.sql("SELECT state, count(*) FROM treeflash_units GROUP BY state ORDER BY state")
          == "failed|" + std::to_string(failed) + "\nused|" + std::to_string(60 - failed) + "\n");
    CHECK(db.sql("SELECT count(DISTINCT card), count(*) FROM treeflash_cards") == "60|60\n");
    CHECK(db.sql("SELECT count(*) FROM treeflash_units u JOIN treeflash_cards c ON c.unit = u.serial"
                 " AND c.card = u.card AND c.station = u.station AND (c.result = 'ok') = (u.state = 'used')")
          == "60\n");
    CHECK(db.sql("SELECT count(*) FROM (SELECT serial FROM treeflash_unit_events GROUP BY serial"
                 " HAVING count(*) FILTER (WHERE event = 'given') = 1 AND count(*) = 2) ok")
          == "60\n");
    // No station gave out a unit after the last: a fourth finds none.
    StationProcess late(db.url(), "s4", [](flasher::LineRecords& records) {
        if (records.take({1, "late", "golden.img", "ab12", ""}))
            throw std::runtime_error("a unit after the last");
    });
    CHECK(late.wait() == 0);
}

TEST_CASE("a station killed holding a unit: the unit is marked failed with a record, never given again"
          * doctest::skip(no_postgres))
{
    Scratch tmp;
    PostgresServer db;
    import(db, csv_manifest(tmp, 3));
    int taken[2];
    REQUIRE(::pipe(taken) == 0);
    StationProcess doomed(db.url(), "s1", [&](flasher::LineRecords& records) {
        auto unit = records.take({2, "file:/cards/a", "golden.img", "ab12", "c0ffee"});
        (void)!::write(taken[1], unit ? "t" : "n", 1);
        ::pause(); // provisioning, until killed
    });
    ::close(taken[1]); // a child that fails ends the read below
    char c = 0;
    REQUIRE(::read(taken[0], &c, 1) == 1);
    REQUIRE(c == 't');
    CHECK(db.sql("SELECT serial, state, station, slot, card FROM treeflash_units WHERE state <> 'free'")
          == "TCU-0001|reserved|s1|2|file:/cards/a\n");
    // While it lives, its name is taken and its unit is not touched.
    try {
        flasher::LineRecords twin(db.url(), "s1", 1);
        FAIL("a second station s1 started");
    } catch (const std::exception& e) {
        CHECK_MESSAGE(std::string(e.what()).find("a station named s1 is running on the line already")
                          != std::string::npos,
                      e.what());
    }
    {
        flasher::LineRecords other(db.url(), "s2", 1);
        CHECK(db.sql("SELECT state FROM treeflash_units WHERE serial = 'TCU-0001'") == "reserved\n");
    }
    CHECK(line_status(db)["units"]["reserved_by_stopped_stations"] == 0);

    ::kill(doomed.pid, SIGKILL);
    doomed.wait();
    ::close(taken[0]);
    // Seen as stopped once the server sees its connection closed ...
    CHECK(wait_until([&] { return line_status(db)["units"]["reserved_by_stopped_stations"] == 1; }, 10));
    CHECK(db.sql("SELECT state FROM treeflash_units WHERE serial = 'TCU-0001'") == "reserved\n");
    // ... and marked by the next station to start, the same name again.
    flasher::LineRecords restarted(db.url(), "s1", 1);
    CHECK(db.sql("SELECT state, detail FROM treeflash_units WHERE serial = 'TCU-0001'")
          == "failed|station s1 stopped while this unit's card was being provisioned; the unit is not given again\n");
    CHECK(db.sql("SELECT station, slot, card, unit, result, cause FROM treeflash_cards")
          == "s1|2|file:/cards/a|TCU-0001|failed|station-stopped\n");
    CHECK(db.sql("SELECT string_agg(event, ',' ORDER BY id) FROM treeflash_unit_events WHERE serial = 'TCU-0001'")
          == "given,lost\n");
    auto next = restarted.take({1, "file:/cards/b", "golden.img", "ab12", ""});
    REQUIRE(next);
    CHECK(next->serial == "TCU-0002");
    REQUIRE(next->files.size() == 1);
    CHECK(next->files[0].data == "key of TCU-0002\n");
    CHECK(next->files[0].mode == 0600);
    CHECK(next->macs == std::vector<std::string>{"02:00:00:00:00:02"});
    restarted.record_card(card_record("file:/cards/b", "ok"), next);
    CHECK(restarted.units_left() == 1);
    CHECK(restarted.done_unit("file:/cards/b", "ab12") == "TCU-0002");
    CHECK(!restarted.done_unit("file:/cards/b", "other image"));
    CHECK(!restarted.done_unit("file:/cards/a", "ab12"));
    // A card's message with bytes that are not UTF-8, and a NUL: recorded,
    // as U+FFFD, instead of failing the record (and stopping the station).
    auto odd = restarted.take({1, "file:/cards/c", "golden.img", "ab12", ""});
    REQUIRE(odd);
    json failed = card_record("file:/cards/c", "failed");
    failed["error"] = std::string("bad \xff byte, nul \0 here", 22);
    restarted.record_card(failed, odd);
    CHECK(db.sql("SELECT error, record->>'error' FROM treeflash_cards WHERE card = 'file:/cards/c'")
          == "bad \xEF\xBF\xBD byte, nul \xEF\xBF\xBD here|bad \xEF\xBF\xBD byte, nul \xEF\xBF\xBD here\n");
    CHECK(db.sql("SELECT state, detail FROM treeflash_units WHERE serial = 'TCU-0003'")
          == "failed|bad \xEF\xBF\xBD byte, nul \xEF\xBF\xBD here\n");
}

TEST_CASE("a station restarted on its host while the server still holds its dead predecessor's connection takes over"
          * doctest::skip(no_postgres))
{
    Scratch tmp;
    PostgresServer db;
    import(db, csv_manifest(tmp, 2));
    // The station's process ends, but a child of it keeps its connection
    // open: to the server, the run is alive (as after a power cut, until
    // keepalives end it).
    int holder[2];
    REQUIRE(::pipe(holder) == 0);
    StationProcess gone(db.url(), "s1", [&](flasher::LineRecords&) {
        pid_t child = ::fork();
        if (child == 0) {
            ::pause();
            ::_exit(0);
        }
        (void)!::write(holder[1], &child, sizeof child);
        ::_exit(0); // no goodbye to the server
    });
    ::close(holder[1]);
    struct Holder {
        pid_t pid = 0;
        ~Holder()
        {
            if (pid > 0)
                ::kill(pid, SIGKILL); // not our child: init reaps it
        }
    } child;
    REQUIRE(::read(holder[0], &child.pid, sizeof child.pid) == sizeof child.pid);
    ::close(holder[0]);
    CHECK(gone.wait() == 0);
    CHECK(db.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'treeflash'") == "1\n");
    // Another host's station of that name would be refused; this host's
    // process is gone, so its connection is ended and the new run starts.
    {
        flasher::LineRecords restarted(db.url(), "s1", 1);
        CHECK(db.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'treeflash'") == "1\n");
        CHECK(restarted.take({1, "file:/cards/a", "golden.img", "ab12", ""}));
    }
}

TEST_CASE("status and export show the whole line: stations, cards per hour, units, failures by cause"
          * doctest::skip(no_postgres))
{
    Scratch tmp;
    PostgresServer db;
    import(db, csv_manifest(tmp, 6));
    {
        flasher::LineRecords s1(db.url(), "s1", 2);
        flasher::LineRecords s2(db.url(), "s2", 1);
        for (int i = 0; i < 3; ++i) {
            std::string card = "file:/cards/" + std::to_string(i);
            auto unit = s1.take({1, card, "golden.img", "ab12", "c0ffee"});
            s1.record_card(card_record(card, i == 2 ? "failed" : "ok"), unit);
        }
        auto unit = s2.take({1, "cid:0123", "golden.img", "ab12", "c0ffee"});
        s2.record_card(card_record("cid:0123", "ok"), unit);
        s2.record_card(json{{"slot", 1}, {"card", "cid:4567"}, {"image_sha256", "ab12"}, {"result", "failed"},
                            {"cause", "check"}, {"error", "too small"}},
                       std::nullopt);

        auto status = run_treeflash({"line", "status", "--db", db.url(), "--json"});
        REQUIRE_MESSAGE(status.ok(), status.err);
        json line = json::parse(status.out);
        REQUIRE(line["stations"].size() == 2);
        CHECK(line["stations"][0]["name"] == "s1");
        CHECK(line["stations"][0]["running"] == true);
        CHECK(line["stations"][0]["slots"] == 2);
        CHECK(line["stations"][0]["ok_last_hour"] == 2);
        CHECK(line["stations"][0]["failed_last_hour"] == 1);
        CHECK(line["stations"][1]["ok_today"] == 1);
        CHECK(line["ok_last_hour"] == 3);
        CHECK(line["failed_last_hour"] == 2);
        // Less than a minute old: three cards over at least a minute.
        CHECK(line["cards_per_hour"].get<double>() <= 180.0);
        CHECK(line["cards_per_hour"].get<double>() > 0.0);
        CHECK(line["units"] == json{{"free", 2}, {"reserved", 0}, {"used", 3}, {"failed", 1},
                                    {"reserved_by_stopped_stations", 0}});
        CHECK(line["failures"] == json{{"check", 1}, {"write", 1}});
        auto text = run_treeflash({"line", "status", "--db", db.url()});
        REQUIRE_MESSAGE(text.ok(), text.err);
        CHECK_MESSAGE(text.out.find("line: 2 of 2 station(s) running") != std::string::npos, text.out);
        CHECK_MESSAGE(text.out.find("units: 2 free, 0 reserved, 3 used, 1 failed") != std::string::npos, text.out);
        CHECK_MESSAGE(text.out.find("  s1 (") != std::string::npos, text.out);
        CHECK_MESSAGE(text.out.find("  write: 1") != std::string::npos, text.out);
    }
    auto stopped = run_treeflash({"line", "status", "--db", db.url(), "--json"});
    REQUIRE_MESSAGE(stopped.ok(), stopped.err);
    CHECK(json::parse(stopped.out)["stations"][0]["running"] == false);

    auto csv = run_treeflash({"line", "export", "--db", db.url()});
    REQUIRE_MESSAGE(csv.ok(), csv.err);
    auto rows = lines_of(csv.out);
    REQUIRE(rows.size() == 7);
    CHECK(rows[0] == "serial,hostname,mac,state,card,station,slot,given,ended,image,image_sha256,commit,detail");
    CHECK(rows[1].rfind("TCU-0001,tcu-1,02:00:00:00:00:01,used,file:/cards/0,s1,1,20", 0) == 0);
    CHECK(rows[1].find(",golden.img,ab12,c0ffee,") != std::string::npos);
    CHECK(rows[3].rfind("TCU-0003,tcu-3,02:00:00:00:00:03,failed,file:/cards/2,s1,1,", 0) == 0);
    CHECK(rows[3].find(",an I/O error") != std::string::npos);
    CHECK(rows[4].rfind("TCU-0004,tcu-4,02:00:00:00:00:04,used,cid:0123,s2,", 0) == 0);
    CHECK(rows[6] == "TCU-0006,tcu-6,02:00:00:00:00:06,free,,,,,,,,,");

    fs::path report = tmp / "report.jsonl";
    auto jsonl = run_treeflash({"line", "export", "--db", db.url(), "--format", "jsonl", "--output", report.string()});
    REQUIRE_MESSAGE(jsonl.ok(), jsonl.err);
    auto records = lines_of(read_text(report));
    REQUIRE(records.size() == 6);
    json first = json::parse(records[0]);
    CHECK(first["serial"] == "TCU-0001");
    CHECK(first["mac"] == json::array({"02:00:00:00:00:01"}));
    CHECK(first["card"] == "file:/cards/0");
    CHECK(first["image_sha256"] == "ab12");
    CHECK(first["commit"] == "c0ffee");
    CHECK(first["given"].get<std::string>().size() == 20);
    CHECK(json::parse(records[5])["card"].is_null());
    // An output that is a symlink is refused, and nothing is read.
    fs::create_symlink(tmp / "elsewhere", tmp / "link.jsonl");
    auto link = run_treeflash({"line", "export", "--db", db.url(), "--output", (tmp / "link.jsonl").string()});
    CHECK(link.exit_code == 1);
    CHECK(!fs::exists(tmp / "elsewhere"));
}

TEST_CASE("a database that is not there, or not PostgreSQL, is a clear error that shows no password")
{
    Scratch tmp;
    auto wrong = run_treeflash({"line", "status", "--db", "mysql://line:secret@db/line"});
    CHECK(wrong.exit_code == 1);
    CHECK_MESSAGE(wrong.err.find("--db must be a postgresql:// URL") != std::string::npos, wrong.err);
    CHECK(wrong.err.find("secret") == std::string::npos);
    auto absent = run_treeflash(
        {"line", "status", "--db", "postgresql://line:secret@/line?host=" + tmp.path().string() + "&port=5"});
    CHECK(absent.exit_code == 1);
    CHECK_MESSAGE(absent.err.find("cannot connect to the line's database postgresql://line@/line?host=")
                      != std::string::npos,
                  absent.err);
    CHECK(absent.err.find("secret") == std::string::npos);
    auto usage = run_treeflash({"line", "status"});
    CHECK(usage.exit_code == 2);
    auto both = run_treeflash({"station", "x.img", "--slot", "/dev/null", "--db", "postgresql:///x", "--manifest",
                               "u.jsonl"});
    CHECK(both.exit_code == 2);
    CHECK(flasher::redacted_url("postgresql://u:p%40ss@h:5432/db?password=x&sslmode=require&sslpassword=y")
          == "postgresql://u@h:5432/db");
    CHECK(flasher::redacted_url("postgresql://u:p?ss#x@h/db") == "postgresql://u@h/db");
    CHECK(flasher::redacted_url("postgresql://") == "postgresql://");
    // A password holding a bare '/' or '@' is refused, never shown: libpq
    // would read part of it as the host, the port or the database.
    for (const char* url : {"postgresql://line:ab/cd@db/line", "postgresql://u:pa@ss@h/db"}) {
        CHECK(flasher::redacted_url(url) == "(a postgresql:// URL libpq cannot read)");
        auto refused = run_treeflash({"line", "status", "--db", url});
        CHECK(refused.exit_code == 1);
        CHECK_MESSAGE(refused.err.find("write those as %2F and %40") != std::string::npos, refused.err);
        CHECK(refused.err.find("ab/cd") == std::string::npos);
        CHECK(refused.err.find("ss@h") == std::string::npos);
    }
    CHECK(flasher::redacted_url("postgresql:///line?host=/run/pg&port=5433&password=x")
          == "postgresql:///line?host=/run/pg&port=5433");
    CHECK(flasher::redacted_url("POSTGRESQL://u:secret@h/db") == "(not a postgresql:// URL)");
    CHECK(flasher::redacted_url("host=db password=secret") == "(not a postgresql:// URL)");
    auto keywords = run_treeflash({"line", "status", "--db", "host=db password=secret"});
    CHECK(keywords.exit_code == 1);
    CHECK(keywords.err.find("secret") == std::string::npos);
    // libpq's own complaint about a bad %-escape quotes the password: not shown.
    auto escape = run_treeflash({"line", "status", "--db", "postgresql://u:sec%zzret@h/db"});
    CHECK(escape.exit_code == 1);
    CHECK_MESSAGE(escape.err.find("libpq cannot read this postgresql:// URL") != std::string::npos, escape.err);
    CHECK(escape.err.find("sec") == std::string::npos);
}

TEST_CASE("a station on a database that holds no unit is refused before it registers" * doctest::skip(no_postgres))
{
    PostgresServer db;
    try {
        flasher::LineRecords records(db.url(), "s1", 1);
        FAIL("a station started with no unit to give");
    } catch (const std::exception& e) {
        CHECK_MESSAGE(std::string(e.what()).find("holds no unit; import a manifest first") != std::string::npos,
                      e.what());
    }
    CHECK(db.sql("SELECT count(*) FROM treeflash_runs") == "0\n");
    try {
        flasher::LineRecords records(db.url(), "../s1", 1);
        FAIL("a station named ../s1");
    } catch (const std::exception& e) {
        CHECK(std::string(e.what()).find("station name '../s1' must be") != std::string::npos);
    }
}

} // TEST_SUITE
