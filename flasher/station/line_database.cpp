#include "flasher/station/line_database.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/text.hpp"

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <libpq-fe.h>
#include <regex>
#include <sstream>
#include <thread>
#include <unistd.h>

namespace treeflash::flasher {

// One libpq connection, with errors that say what was being done. Not
// thread-safe: its users hold a lock.
class PgSession {
public:
    struct Param {
        std::optional<std::string> value; // nullopt: SQL NULL
        bool binary = false;              // bytea sent as raw bytes
        Param(std::nullopt_t) {}
        Param(std::string text) : value(std::move(text)) {}
        Param(const char* text) : value(std::string(text)) {}
        Param(long number) : value(std::to_string(number)) {}
        static Param bytes(std::string data)
        {
            Param p(std::move(data));
            p.binary = true;
            return p;
        }
    };

    struct ResultDeleter {
        void operator()(PGresult* result) const { PQclear(result); }
    };
    using Result = std::unique_ptr<PGresult, ResultDeleter>;

    explicit PgSession(const std::string& url) : m_url(redacted_url(url))
    {
        // What was refused is not shown: it may hold a password.
        if (url.rfind("postgresql://", 0) != 0 && url.rfind("postgres://", 0) != 0)
            throw Error("--db must be a postgresql:// URL (e.g. postgresql://line@db.factory/line)");
        if (!readable_url(url))
            throw Error("--db: libpq cannot read this postgresql:// URL (a %-escape or an option in it is wrong, or "
                        "its user or password holds '/' or '@': write those as %2F and %40)");
        // Later keywords override earlier ones: the URL's own settings win
        // over these defaults. Over TCP, a server that stops answering (a
        // cable pulled) fails a statement in about 30 s instead of hanging
        // the station: it then stops, as it does when its records fail.
        const char* keys[] = {"connect_timeout", "keepalives_idle", "keepalives_interval", "keepalives_count",
                              "tcp_user_timeout", "fallback_application_name", "dbname", nullptr};
        const char* values[] = {"10", "10", "5", "3", "30000", "treeflash", url.c_str(), nullptr};
        m_connection.reset(PQconnectdbParams(keys, values, 1));
        if (!m_connection)
            throw Error("cannot connect to the line's database " + m_url + ": out of memory");
        if (PQstatus(m_connection.get()) != CONNECTION_OK)
            throw Error("cannot connect to the line's database " + m_url + ": " + last_error());
        // "relation already exists, skipping" and the like are not for the user.
        PQsetNoticeProcessor(m_connection.get(), [](void*, const char*) {}, nullptr);
        // The server's side of the same: a station gone without a word (a
        // power cut) loses its connection, and with it its run's lock,
        // within about 30 s instead of the kernel's two hours; nothing
        // waits on a lock or a statement for ever.
        exec_script("set up the session",
                    "SET client_min_messages = warning; SET tcp_keepalives_idle = 10;"
                    " SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3; SET tcp_user_timeout = 30000;"
                    " SET idle_in_transaction_session_timeout = '60s'; SET lock_timeout = '10s';"
                    " SET statement_timeout = '60s'");
    }

    // Runs `sql` with `params` ($1, $2, ...); throws "<what>: <server's
    // message>" unless it succeeds.
    Result exec(const std::string& what, const char* sql, const std::vector<Param>& params = {})
    {
        std::vector<const char*> values;
        std::vector<int> lengths, formats;
        for (const auto& p : params) {
            values.push_back(p.value ? p.value->data() : nullptr);
            lengths.push_back(p.value ? static_cast<int>(p.value->size()) : 0);
            formats.push_back(p.binary ? 1 : 0);
        }
        Result result(PQexecParams(m_connection.get(), sql, static_cast<int>(params.size()), nullptr, values.data(),
                                   lengths.data(), formats.data(), 0));
        ExecStatusType status = result ? PQresultStatus(result.get()) : PGRES_FATAL_ERROR;
        if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
            std::string message = result ? trimmed(PQresultErrorMessage(result.get())) : last_error();
            if (message.empty())
                message = last_error();
            if (PQstatus(m_connection.get()) != CONNECTION_OK)
                m_lost = true;
            const char* state = result ? PQresultErrorField(result.get(), PG_DIAG_SQLSTATE) : nullptr;
            const char* constraint = result ? PQresultErrorField(result.get(), PG_DIAG_CONSTRAINT_NAME) : nullptr;
            throw DatabaseError(what + " in the line's database " + m_url + ": " + message, state ? state : "",
                                constraint ? constraint : "");
        }
        return result;
    }

    // Runs the statements of `sql`, which takes no parameters.
    void exec_script(const std::string& what, const char* sql)
    {
        Result result(PQexec(m_connection.get(), sql));
        if (!result || PQresultStatus(result.get()) != PGRES_COMMAND_OK) {
            if (PQstatus(m_connection.get()) != CONNECTION_OK)
                m_lost = true;
            throw Error(what + " in the line's database " + m_url + ": "
                        + (result ? trimmed(PQresultErrorMessage(result.get())) : last_error()));
        }
    }

    // The connection is gone, or a commit's outcome is unknown: nothing
    // more can be recorded on it. From any thread.
    bool lost() const { return m_lost; }
    const std::string& url() const { return m_url; }

    class DatabaseError : public Error {
    public:
        DatabaseError(const std::string& message, std::string state, std::string constraint_name)
            : Error(message), sqlstate(std::move(state)), constraint(std::move(constraint_name))
        {
        }
        std::string sqlstate, constraint;
    };

    // BEGIN now; ROLLBACK when it ends without commit().
    class Transaction {
    public:
        explicit Transaction(PgSession& session) : m_session(session) { m_session.exec("begin a transaction", "BEGIN"); }
        ~Transaction()
        {
            if (!m_done)
                PQclear(PQexec(m_session.m_connection.get(), "ROLLBACK"));
        }
        Transaction(const Transaction&) = delete;
        Transaction& operator=(const Transaction&) = delete;
        void commit()
        {
            m_done = true;
            try {
                m_session.exec("commit", "COMMIT");
            } catch (...) {
                // Whether it committed is not known: nothing more is
                // recorded on this connection.
                m_session.m_lost = true;
                throw;
            }
        }

    private:
        PgSession& m_session;
        bool m_done = false;
    };

private:
    static std::string trimmed(std::string text)
    {
        while (!text.empty() && (text.back() == '\n' || text.back() == ' '))
            text.pop_back();
        return text;
    }
    std::string last_error() const { return trimmed(PQerrorMessage(m_connection.get())); }

    struct ConnectionDeleter {
        void operator()(PGconn* connection) const { PQfinish(connection); }
    };
    std::unique_ptr<PGconn, ConnectionDeleter> m_connection;
    std::string m_url;
    std::atomic<bool> m_lost{false};
};

namespace {

using nlohmann::json;
using Param = PgSession::Param;
using Transaction = PgSession::Transaction;

// Advisory lock keys (two int4 keys: class, object): the schema's, taken
// while tables are created and runs registered; and each run's own, held by
// its connection while it lives.
#define TREEFLASH_LOCK_SCHEMA "1952841728"
#define TREEFLASH_LOCK_RUN "1952841729"

// The ids of the runs whose connection is alive, as a subquery.
#define TREEFLASH_ALIVE_RUNS                                                                                       \
    "(SELECT l.objid::bigint FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"       \
    " AND l.classid = " TREEFLASH_LOCK_RUN "::oid"                                                                 \
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"

#define TREEFLASH_UTC(column) "to_char(" column " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

const char* const schema_sql = R"(
CREATE TABLE IF NOT EXISTS treeflash_units (
    serial text PRIMARY KEY,
    position bigint NOT NULL,
    hostname text NOT NULL DEFAULT '',
    macs text[] NOT NULL DEFAULT '{}',
    state text NOT NULL DEFAULT 'free' CHECK (state IN ('free', 'reserved', 'used', 'failed')),
    station text, run integer, slot integer, card text,
    image text, image_sha256 text, commit text,
    imported_at timestamptz NOT NULL DEFAULT now(),
    reserved_at timestamptz, ended_at timestamptz,
    detail text);
CREATE UNIQUE INDEX IF NOT EXISTS treeflash_units_hostname ON treeflash_units (lower(hostname)) WHERE hostname <> '';
CREATE INDEX IF NOT EXISTS treeflash_units_free ON treeflash_units (position, serial) WHERE state = 'free';
CREATE INDEX IF NOT EXISTS treeflash_units_reserved ON treeflash_units (run) WHERE state = 'reserved';
CREATE TABLE IF NOT EXISTS treeflash_unit_macs (
    mac text PRIMARY KEY,
    serial text NOT NULL REFERENCES treeflash_units ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS treeflash_unit_files (
    serial text NOT NULL REFERENCES treeflash_units ON DELETE CASCADE,
    position integer NOT NULL,
    path text NOT NULL,
    mode integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (serial, path));
CREATE TABLE IF NOT EXISTS treeflash_unit_events (
    id bigserial PRIMARY KEY,
    time timestamptz NOT NULL DEFAULT now(),
    serial text NOT NULL,
    event text NOT NULL,
    station text, run integer, slot integer, card text, detail text);
CREATE TABLE IF NOT EXISTS treeflash_runs (
    id serial PRIMARY KEY,
    station text NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    pid_space text NOT NULL,
    process_start bigint NOT NULL,
    slots integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS treeflash_cards (
    id bigserial PRIMARY KEY,
    time timestamptz NOT NULL DEFAULT now(),
    station text NOT NULL, run integer NOT NULL, slot integer,
    card text, image text, image_sha256 text, commit text, unit text,
    result text NOT NULL, cause text, error text,
    record jsonb NOT NULL);
CREATE INDEX IF NOT EXISTS treeflash_cards_done ON treeflash_cards (card, image_sha256) WHERE result = 'ok';
CREATE INDEX IF NOT EXISTS treeflash_cards_time ON treeflash_cards (time);
)";

// Marks the units reserved by runs that are gone as failed, each with an
// event and a card record saying why, in one statement.
const char* const sweep_sql =
    "WITH lost AS ("
    "  UPDATE treeflash_units u SET state = 'failed', ended_at = now(),"
    "    detail = 'station ' || u.station || ' stopped while this unit''s card was being provisioned;"
    " the unit is not given again'"
    "  WHERE u.serial IN (SELECT serial FROM treeflash_units WHERE state = 'reserved'"
    "   AND run NOT IN " TREEFLASH_ALIVE_RUNS " FOR UPDATE SKIP LOCKED)"
    "  RETURNING u.serial, u.station, u.run, u.slot, u.card, u.image, u.image_sha256, u.commit, u.detail),"
    " events AS (INSERT INTO treeflash_unit_events (serial, event, station, run, slot, card, detail)"
    "  SELECT serial, 'lost', station, run, slot, card, detail FROM lost)"
    " INSERT INTO treeflash_cards (station, run, slot, card, image, image_sha256, commit, unit, result, cause,"
    "  error, record)"
    " SELECT station, run, slot, card, image, image_sha256, commit, serial, 'failed', 'station-stopped', detail,"
    "  jsonb_build_object('slot', slot, 'card', card, 'image', image, 'image_sha256', image_sha256, 'commit',"
    "   commit, 'unit', serial, 'result', 'failed', 'cause', 'station-stopped', 'error', detail)"
    " FROM lost";

std::string value(const PGresult* result, int row, int column)
{
    return PQgetisnull(result, row, column) ? std::string() : std::string(PQgetvalue(result, row, column));
}

size_t count(const PGresult* result, int row, int column)
{
    return static_cast<size_t>(std::stoull(value(result, row, column).empty() ? "0" : value(result, row, column)));
}

// bytea as encode(data, 'hex') gives it: lower-case hex digits.
std::string hex_decoded(const std::string& hex)
{
    auto digit = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
    std::string out;
    out.reserve(hex.size() / 2);
    for (size_t i = 0; i + 1 < hex.size(); i += 2)
        out.push_back(static_cast<char>(digit(hex[i]) << 4 | digit(hex[i + 1])));
    return out;
}

std::string joined(const std::vector<std::string>& words)
{
    std::string out;
    for (const auto& word : words)
        out += (out.empty() ? "" : " ") + word;
    return out;
}

std::vector<std::string> split_words(const std::string& text)
{
    std::vector<std::string> out;
    std::string word;
    for (char c : text) {
        if (c == ' ') {
            if (!word.empty())
                out.push_back(word);
            word.clear();
        } else {
            word += c;
        }
    }
    if (!word.empty())
        out.push_back(word);
    return out;
}

// `value` as the database takes text: bytes that are not UTF-8 (in a
// message from a card) and NUL characters become U+FFFD.
json database_text(const json& value)
{
    json clean = json::parse(value.dump(-1, ' ', false, json::error_handler_t::replace));
    std::function<void(json&)> visit = [&](json& node) {
        if (node.is_string()) {
            text::replace_all(node.get_ref<std::string&>(), std::string(1, '\0'), "\xEF\xBF\xBD");
        } else if (node.is_structured()) {
            for (auto& child : node)
                visit(child);
        }
    };
    visit(clean);
    return clean;
}

void create_schema(PgSession& session)
{
    // Tables already there need no right to create them: a role that may
    // only read runs `line status`.
    auto present = session.exec("look for the line's tables",
                                "SELECT count(to_regclass(name)) FROM unnest(ARRAY['treeflash_units',"
                                " 'treeflash_unit_macs', 'treeflash_unit_files', 'treeflash_unit_events',"
                                " 'treeflash_runs', 'treeflash_cards']) AS name");
    if (std::string(PQgetvalue(present.get(), 0, 0)) == "6")
        return;
    Transaction transaction(session);
    session.exec("lock the schema", "SELECT pg_advisory_xact_lock(" TREEFLASH_LOCK_SCHEMA ", 0)");
    session.exec_script("create the line's tables", schema_sql);
    transaction.commit();
}

std::string this_host()
{
    char name[256] = {};
    if (::gethostname(name, sizeof name - 1) != 0)
        return "";
    return name;
}

} // namespace

namespace {

bool has_postgres_scheme(const std::string& url)
{
    return url.rfind("postgresql://", 0) == 0 || url.rfind("postgres://", 0) == 0;
}

// A URL split as libpq splits it: the user and password end at the first
// '@', unless a '/' comes first (then there are none).
struct UrlParts {
    std::string userinfo; // "user:password", "" when none
    std::string rest;     // hosts, ports, database, query
};

UrlParts split_url(const std::string& url)
{
    std::string after = url.substr(url.find("://") + 3);
    size_t at = after.find_first_of("@/");
    if (at == std::string::npos || after[at] != '@')
        return {"", after};
    return {after.substr(0, at), after.substr(at + 1)};
}

} // namespace

bool readable_url(const std::string& url)
{
    if (!has_postgres_scheme(url))
        return false;
    // A password holding '@' or '/' (not %-escaped) leaves an '@' after
    // what libpq takes for the user and password: it would read the rest as
    // hosts, ports or a database, and show them in its errors.
    if (split_url(url).rest.find('@') != std::string::npos)
        return false;
    char* error = nullptr;
    PQconninfoOption* options = PQconninfoParse(url.c_str(), &error);
    if (error)
        PQfreemem(error); // it may quote the URL, password included
    if (!options)
        return false;
    PQconninfoFree(options);
    return true;
}

std::string redacted_url(const std::string& url)
{
    if (!has_postgres_scheme(url))
        return "(not a postgresql:// URL)";
    if (!readable_url(url))
        return "(a postgresql:// URL libpq cannot read)";
    // From the text as written: the user without the password, the hosts,
    // ports and database, and of the query only where to connect.
    UrlParts parts = split_url(url);
    std::string main = parts.rest.substr(0, parts.rest.find('?'));
    std::string query = main.size() < parts.rest.size() ? parts.rest.substr(main.size() + 1) : "";
    std::string out = "postgresql://";
    if (!parts.userinfo.empty())
        out += parts.userinfo.substr(0, parts.userinfo.find(':')) + "@";
    out += main;
    std::string kept;
    size_t start = 0;
    while (start <= query.size() && !query.empty()) {
        size_t end = query.find('&', start);
        std::string pair = query.substr(start, end == std::string::npos ? std::string::npos : end - start);
        for (const char* key : {"host=", "hostaddr=", "port=", "dbname=", "user="})
            if (pair.rfind(key, 0) == 0)
                kept += (kept.empty() ? "?" : "&") + pair;
        if (end == std::string::npos)
            break;
        start = end + 1;
    }
    return text::printable(out + kept);
}

bool valid_station_name(const std::string& name)
{
    static const std::regex form("[A-Za-z0-9._-]{1,64}");
    return std::regex_match(name, form);
}

LineDatabase::LineDatabase(const std::string& url) : m_session(std::make_unique<PgSession>(url))
{
    create_schema(*m_session);
}

LineDatabase::~LineDatabase() = default;

size_t LineDatabase::import_units(const std::vector<Unit>& units, const std::string& manifest)
{
    PgSession& db = *m_session;
    Transaction transaction(db);
    // Two imports at once number their units one after the other (a lock
    // of their own: a long import does not hold up stations starting).
    db.exec("lock the line's imports", "SELECT pg_advisory_xact_lock(" TREEFLASH_LOCK_SCHEMA ", 1)");
    auto first = db.exec("number the new units", "SELECT coalesce(max(position), 0) FROM treeflash_units");
    long position = std::stol(value(first.get(), 0, 0));
    for (const auto& unit : units) {
        std::string where = manifest + " line " + std::to_string(unit.line);
        try {
            db.exec("add unit " + unit.serial,
                    "INSERT INTO treeflash_units (serial, position, hostname, macs)"
                    " VALUES ($1, $2, $3, string_to_array($4, ' '))",
                    {unit.serial, ++position, unit.hostname, joined(unit.macs)});
            for (const auto& mac : unit.macs)
                db.exec("add unit " + unit.serial + "'s MAC " + mac,
                        "INSERT INTO treeflash_unit_macs (mac, serial) VALUES ($1, $2)", {mac, unit.serial});
            long file_position = 0;
            for (const auto& file : unit.files)
                db.exec("add unit " + unit.serial + "'s file " + file.path,
                        "INSERT INTO treeflash_unit_files (serial, position, path, mode, data)"
                        " VALUES ($1, $2, $3, $4, $5)",
                        {unit.serial, ++file_position, file.path, static_cast<long>(file.mode), Param::bytes(file.data)});
        } catch (const PgSession::DatabaseError& e) {
            if (e.sqlstate != "23505") // unique_violation
                throw;
            std::string what = e.constraint == "treeflash_unit_macs_pkey"      ? "a MAC of serial " + unit.serial
                               : e.constraint == "treeflash_units_hostname" ? "hostname " + unit.hostname
                                                                             : "serial " + unit.serial;
            throw Error(where + ": " + what + " is already in the line's database " + db.url()
                        + "; nothing was imported");
        }
    }
    transaction.commit();
    return units.size();
}

LineStatus LineDatabase::status()
{
    PgSession& db = *m_session;
    LineStatus status;
    // One snapshot for every count.
    Transaction transaction(db);
    db.exec("read the line", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY");

    auto units = db.exec("count the units",
                         "SELECT count(*) FILTER (WHERE state = 'free'), count(*) FILTER (WHERE state = 'reserved'),"
                         " count(*) FILTER (WHERE state = 'used'), count(*) FILTER (WHERE state = 'failed'),"
                         " count(*) FILTER (WHERE state = 'reserved' AND run NOT IN " TREEFLASH_ALIVE_RUNS ")"
                         " FROM treeflash_units");
    status.units_free = count(units.get(), 0, 0);
    status.units_reserved = count(units.get(), 0, 1);
    status.units_used = count(units.get(), 0, 2);
    status.units_failed = count(units.get(), 0, 3);
    status.units_reserved_by_stopped = count(units.get(), 0, 4);

    // Cards per hour: the cards done in the last hour, over the last hour
    // or, for a line started less than an hour ago, over the time since.
    const char* stations_sql =
        "WITH runs AS (SELECT station, max(id) AS last_run, bool_or(id IN " TREEFLASH_ALIVE_RUNS ") AS running,"
        "   min(started_at) AS first_start FROM treeflash_runs GROUP BY station),"
        " cards AS (SELECT station,"
        "   count(*) FILTER (WHERE result = 'ok' AND time > now() - interval '1 hour') AS ok_hour,"
        "   count(*) FILTER (WHERE result IN ('failed', 'interrupted') AND time > now() - interval '1 hour')"
        "     AS failed_hour,"
        "   count(*) FILTER (WHERE result = 'ok' AND time >= date_trunc('day', now() AT TIME ZONE 'UTC')"
        "     AT TIME ZONE 'UTC') AS ok_today,"
        "   count(*) FILTER (WHERE result IN ('failed', 'interrupted') AND time >= date_trunc('day', now()"
        "     AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') AS failed_today,"
        "   max(time) AS last_card FROM treeflash_cards GROUP BY station)"
        " SELECT r.station, l.host, r.running, l.slots, " TREEFLASH_UTC("l.started_at") ","
        "  " TREEFLASH_UTC("c.last_card") ", coalesce(c.ok_hour, 0), coalesce(c.failed_hour, 0),"
        "  coalesce(c.ok_today, 0), coalesce(c.failed_today, 0),"
        "  extract(epoch FROM now() - greatest(r.first_start, now() - interval '1 hour'))"
        " FROM runs r JOIN treeflash_runs l ON l.id = r.last_run LEFT JOIN cards c ON c.station = r.station"
        " ORDER BY r.station";
    auto stations = db.exec("read the stations", stations_sql);
    double line_window = 0;
    for (int row = 0; row < PQntuples(stations.get()); ++row) {
        StationRow s;
        s.name = value(stations.get(), row, 0);
        s.host = value(stations.get(), row, 1);
        s.running = value(stations.get(), row, 2) == "t";
        s.slots = count(stations.get(), row, 3);
        s.started = value(stations.get(), row, 4);
        s.last_card = value(stations.get(), row, 5);
        s.ok_hour = count(stations.get(), row, 6);
        s.failed_hour = count(stations.get(), row, 7);
        s.ok_today = count(stations.get(), row, 8);
        s.failed_today = count(stations.get(), row, 9);
        double window = std::stod(value(stations.get(), row, 10));
        s.cards_per_hour = static_cast<double>(s.ok_hour) * 3600 / std::max(window, 60.0);
        line_window = std::max(line_window, window);
        status.ok_hour += s.ok_hour;
        status.failed_hour += s.failed_hour;
        status.ok_today += s.ok_today;
        status.failed_today += s.failed_today;
        status.stations.push_back(std::move(s));
    }
    status.cards_per_hour = static_cast<double>(status.ok_hour) * 3600 / std::max(line_window, 60.0);

    auto failures = db.exec("count the failures",
                            "SELECT coalesce(cause, 'unknown'), count(*) FROM treeflash_cards"
                            " WHERE result IN ('failed', 'interrupted') GROUP BY 1 ORDER BY 2 DESC, 1");
    for (int row = 0; row < PQntuples(failures.get()); ++row)
        status.failures.emplace_back(value(failures.get(), row, 0), count(failures.get(), row, 1));
    transaction.commit();
    return status;
}

std::vector<nlohmann::ordered_json> LineDatabase::report()
{
    auto rows = m_session->exec(
        "read the units",
        "SELECT serial, hostname, array_to_string(macs, ' '), state, card, station, slot, " TREEFLASH_UTC(
            "reserved_at") ", " TREEFLASH_UTC("ended_at") ", image, image_sha256, commit, detail"
                           " FROM treeflash_units ORDER BY position, serial");
    std::vector<nlohmann::ordered_json> out;
    for (int row = 0; row < PQntuples(rows.get()); ++row) {
        auto text = [&](int column) {
            return PQgetisnull(rows.get(), row, column) ? nlohmann::ordered_json(nullptr)
                                                        : nlohmann::ordered_json(value(rows.get(), row, column));
        };
        nlohmann::ordered_json unit;
        unit["serial"] = text(0);
        unit["hostname"] = text(1);
        unit["mac"] = split_words(value(rows.get(), row, 2));
        unit["state"] = text(3);
        unit["card"] = text(4);
        unit["station"] = text(5);
        unit["slot"] = PQgetisnull(rows.get(), row, 6) ? nlohmann::ordered_json(nullptr)
                                                       : nlohmann::ordered_json(count(rows.get(), row, 6));
        unit["given"] = text(7);
        unit["ended"] = text(8);
        unit["image"] = text(9);
        unit["image_sha256"] = text(10);
        unit["commit"] = text(11);
        unit["detail"] = text(12);
        out.push_back(std::move(unit));
    }
    return out;
}

namespace {

// The station's name, checked before anything is connected to.
const std::string& checked_station_name(const std::string& station)
{
    if (!valid_station_name(station))
        throw Error("station name '" + text::printable(station)
                    + "' must be 1 to 64 of A-Z a-z 0-9 . _ - (name it with --station)");
    return station;
}

// This running kernel and PID namespace: two hosts cloned from one image,
// or two containers, never share it, so a process id means the same
// process to every run that records it.
std::string pid_space()
{
    std::string boot;
    try {
        boot = fs::read_file("/proc/sys/kernel/random/boot_id");
    } catch (const Error&) {
        return "";
    }
    while (!boot.empty() && boot.back() == '\n')
        boot.pop_back();
    char ns[64] = {};
    ssize_t n = ::readlink("/proc/self/ns/pid", ns, sizeof ns - 1);
    if (boot.empty() || n <= 0)
        return "";
    return boot + " " + std::string(ns, static_cast<size_t>(n));
}

// When process `pid` started, in clock ticks since boot (0: no such process).
long long process_start(long pid)
{
    std::string stat;
    try {
        stat = fs::read_file("/proc/" + std::to_string(pid) + "/stat");
    } catch (const Error&) {
        return 0; // no such process
    }
    // Field 22; fields after the command's closing parenthesis.
    size_t at = stat.rfind(')');
    if (at == std::string::npos)
        return 0;
    std::istringstream rest(stat.substr(at + 2));
    std::string field;
    for (int i = 3; i <= 22 && rest >> field; ++i) {
    }
    try {
        return std::stoll(field);
    } catch (const std::exception&) {
        return 0;
    }
}

// Whether the run recorded as process `pid` started at `started` in the
// PID space `space` is gone: only a run of this kernel and namespace can
// be judged, and then its process is gone or is another process.
bool run_process_gone(const std::string& space, long pid, long long started)
{
    if (space.empty() || space != pid_space() || pid <= 0)
        return false;
    long long now = process_start(pid);
    return now == 0 || now != started;
}

} // namespace

LineRecords::LineRecords(const std::string& url, const std::string& name, size_t slots)
    : m_station(checked_station_name(name.empty() ? this_host() : name))
{
    const std::string& station = m_station;
    m_database = std::make_unique<LineDatabase>(url);
    PgSession& db = m_database->session();
    if (units_total() == 0)
        throw Error("the line's database " + db.url()
                    + " holds no unit; import a manifest first (treeflash line import MANIFEST --db URL)");
    {
        // One run of a name at a time: registering runs one after another.
        Transaction transaction(db);
        db.exec("lock the line's runs", "SELECT pg_advisory_xact_lock(" TREEFLASH_LOCK_SCHEMA ", 0)");
        const char* running_sql =
            "SELECT host, pid, pid_space, process_start, id FROM treeflash_runs WHERE station = $1 AND id IN "
            TREEFLASH_ALIVE_RUNS;
        auto running = db.exec("look for a running station " + station, running_sql, {station});
        if (PQntuples(running.get()) > 0) {
            std::string host = value(running.get(), 0, 0);
            long pid = std::stol(value(running.get(), 0, 1));
            // The same station on this host, killed so lately that the
            // server has not noticed yet (or a power cut it never will
            // notice until its keepalives do): its connection is ended.
            bool gone_here = run_process_gone(value(running.get(), 0, 2), pid,
                                              std::stoll(value(running.get(), 0, 3)));
            if (gone_here) {
                db.exec("end the connection of station " + station + "'s earlier run",
                        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory'"
                        " AND l.granted AND l.objsubid = 2 AND l.classid = " TREEFLASH_LOCK_RUN "::oid"
                        " AND l.objid = $1::bigint::oid"
                        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                        {value(running.get(), 0, 4)});
                for (int i = 0; i < 100 && PQntuples(running.get()) > 0; ++i) {
                    std::this_thread::sleep_for(std::chrono::milliseconds(50));
                    running = db.exec("look for a running station " + station, running_sql, {station});
                }
            }
            if (PQntuples(running.get()) > 0)
                throw Error("a station named " + station + " is running on the line already (host "
                            + text::printable(host) + ", pid " + std::to_string(pid)
                            + (gone_here ? ", gone, but its connection could not be ended" : "")
                            + "); give this one another name with --station");
        }
        auto run = db.exec("register station " + station,
                           "INSERT INTO treeflash_runs (station, host, pid, pid_space, process_start, slots)"
                           " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                           {station, this_host(), static_cast<long>(::getpid()), pid_space(),
                            std::to_string(process_start(::getpid())), static_cast<long>(slots)});
        m_run = std::stol(value(run.get(), 0, 0));
        // Session-level: held after the commit, until this connection ends.
        db.exec("lock this station's run", "SELECT pg_advisory_lock(" TREEFLASH_LOCK_RUN ", $1::integer)", {m_run});
        transaction.commit();
    }
    db.exec("mark the units of stopped stations", sweep_sql);
}

LineRecords::~LineRecords() = default;

std::pair<size_t, size_t> LineRecords::counts_today()
{
    std::lock_guard lock(m_mutex);
    auto counts = m_database->session().exec(
        "count today's cards",
        "SELECT count(*) FILTER (WHERE result = 'ok'), count(*) FILTER (WHERE result IN ('failed', 'interrupted'))"
        " FROM treeflash_cards WHERE station = $1"
        " AND time >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
        {m_station});
    return {count(counts.get(), 0, 0), count(counts.get(), 0, 1)};
}

std::optional<std::string> LineRecords::done_unit(const std::string& card, const std::string& image_sha256)
{
    std::lock_guard lock(m_mutex);
    auto done = m_database->session().exec(
        "look up card " + card,
        "SELECT coalesce(unit, '') FROM treeflash_cards WHERE card = $1 AND image_sha256 = $2 AND result = 'ok'"
        " ORDER BY id DESC LIMIT 1",
        {card, image_sha256});
    if (PQntuples(done.get()) == 0)
        return std::nullopt;
    return value(done.get(), 0, 0);
}

std::optional<Unit> LineRecords::take(const UnitRequest& request)
{
    std::lock_guard lock(m_mutex);
    PgSession& db = m_database->session();
    // Units locked by another station's transaction are skipped; while any
    // unit is free, a unit is found (they are only ever locked briefly).
    for (int attempt = 0; attempt < 100; ++attempt) {
        Transaction transaction(db);
        db.exec("mark the units of stopped stations", sweep_sql);
        auto taken = db.exec(
            "take a unit",
            "WITH next AS (SELECT serial FROM treeflash_units WHERE state = 'free' ORDER BY position, serial"
            "  LIMIT 1 FOR UPDATE SKIP LOCKED)"
            " UPDATE treeflash_units u SET state = 'reserved', station = $1, run = $2, slot = $3, card = $4,"
            "  image = $5, image_sha256 = $6, commit = nullif($7, ''), reserved_at = now()"
            " FROM next WHERE u.serial = next.serial"
            " RETURNING u.serial, u.hostname, array_to_string(u.macs, ' ')",
            {m_station, m_run, static_cast<long>(request.slot), request.card, request.image, request.image_sha256,
             request.commit});
        if (PQntuples(taken.get()) == 0) {
            auto free = db.exec("count the free units", "SELECT count(*) FROM treeflash_units WHERE state = 'free'");
            transaction.commit();
            if (count(free.get(), 0, 0) == 0)
                return std::nullopt;
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            continue;
        }
        Unit unit;
        unit.serial = value(taken.get(), 0, 0);
        unit.hostname = value(taken.get(), 0, 1);
        unit.macs = split_words(value(taken.get(), 0, 2));
        auto files = db.exec("read unit " + unit.serial + "'s files",
                             "SELECT path, mode, encode(data, 'hex') FROM treeflash_unit_files WHERE serial = $1"
                             " ORDER BY position",
                             {unit.serial});
        for (int row = 0; row < PQntuples(files.get()); ++row)
            unit.files.push_back(UnitFile{value(files.get(), row, 0), hex_decoded(value(files.get(), row, 2)),
                                          static_cast<unsigned>(count(files.get(), row, 1))});
        db.exec("record unit " + unit.serial + " as given",
                "INSERT INTO treeflash_unit_events (serial, event, station, run, slot, card)"
                " VALUES ($1, 'given', $2, $3, $4, $5)",
                {unit.serial, m_station, m_run, static_cast<long>(request.slot), request.card});
        transaction.commit();
        return unit;
    }
    throw Error("no unit could be taken from the line's database " + db.url()
                + ": every free unit stayed locked by other stations");
}

void LineRecords::record_card(const json& record, const std::optional<Unit>& unit)
{
    std::lock_guard lock(m_mutex);
    PgSession& db = m_database->session();
    const json clean = database_text(record);
    auto field = [&](const char* key) -> Param {
        auto it = clean.find(key);
        if (it == clean.end() || it->is_null())
            return std::nullopt;
        return it->is_string() ? it->get<std::string>() : it->dump();
    };
    const std::string result = clean.value("result", "failed");
    const std::string text = clean.dump();
    Transaction transaction(db);
    if (unit) {
        const bool ok = result == "ok";
        auto ended = db.exec("record unit " + unit->serial + "'s end",
                             "UPDATE treeflash_units SET state = $1, ended_at = now(), detail = $2"
                             " WHERE serial = $3 AND state = 'reserved' AND run = $4 RETURNING serial",
                             {ok ? "used" : "failed", ok ? Param(std::nullopt) : field("error"), unit->serial, m_run});
        if (PQntuples(ended.get()) != 1)
            throw Error("unit " + unit->serial + " is no longer reserved by this station in the line's database "
                        + db.url() + " (its connection was lost and another station marked it failed?)");
        db.exec("record unit " + unit->serial + "'s end",
                "INSERT INTO treeflash_unit_events (serial, event, station, run, slot, card, detail)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                {unit->serial, ok ? "ok" : "failed", m_station, m_run, field("slot"), field("card"),
                 ok ? Param(std::nullopt) : field("error")});
    }
    db.exec("record the card",
            "INSERT INTO treeflash_cards (station, run, slot, card, image, image_sha256, commit, unit, result, cause,"
            " error, record) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb)",
            {m_station, m_run, field("slot"), field("card"), field("image"), field("image_sha256"), field("commit"),
             unit ? Param(unit->serial) : field("unit"), result, field("cause"), field("error"), text});
    transaction.commit();
}

size_t LineRecords::units_left()
{
    std::lock_guard lock(m_mutex);
    auto left = m_database->session().exec("count the free units",
                                           "SELECT count(*) FROM treeflash_units WHERE state = 'free'");
    return count(left.get(), 0, 0);
}

size_t LineRecords::units_total()
{
    std::lock_guard lock(m_mutex);
    auto total = m_database->session().exec("count the units", "SELECT count(*) FROM treeflash_units");
    return count(total.get(), 0, 0);
}

std::vector<std::string> LineRecords::unfinished()
{
    std::lock_guard lock(m_mutex);
    auto rows = m_database->session().exec(
        "list this station's unfinished units",
        "SELECT serial FROM treeflash_units WHERE state = 'reserved' AND run = $1 ORDER BY position, serial", {m_run});
    std::vector<std::string> out;
    for (int row = 0; row < PQntuples(rows.get()); ++row)
        out.push_back(value(rows.get(), row, 0));
    return out;
}

bool LineRecords::broken() const
{
    return m_database->session().lost();
}

} // namespace treeflash::flasher
