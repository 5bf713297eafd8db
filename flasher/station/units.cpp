#include "flasher/station/units.hpp"

#include "common/error.hpp"
#include "common/text.hpp"
#include "common/fs.hpp"
#include "common/named_file.hpp"

#include <cerrno>
#include <cstring>
#include <ctime>
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

using nlohmann::json;

constexpr uint64_t manifest_limit = 64 << 20; // bytes of manifest read at most
constexpr uint64_t unit_file_limit = 1 << 20; // a certificate or key, not a payload
constexpr uint64_t journal_limit = 256 << 20;


bool valid_serial(const std::string& serial)
{
    static const std::regex form("[A-Za-z0-9._-]{1,64}");
    return std::regex_match(serial, form) && serial != "." && serial != "..";
}

// A DNS name: labels of letters, digits and inner hyphens, 63 each, 253 in all.
bool valid_hostname(const std::string& name)
{
    static const std::regex label("[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?");
    if (name.empty() || name.size() > 253)
        return false;
    std::stringstream parts(name);
    std::string part;
    size_t count = 0;
    while (std::getline(parts, part, '.')) {
        if (!std::regex_match(part, label))
            return false;
        ++count;
    }
    return count > 0 && name.back() != '.';
}

// xx:xx:xx:xx:xx:xx, unicast (the first octet's lowest bit clear); lower case.
std::string checked_mac(std::string mac)
{
    static const std::regex form("[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}");
    if (!std::regex_match(mac, form))
        return "";
    for (auto& c : mac)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if ((std::stoi(mac.substr(0, 2), nullptr, 16) & 1) || mac == "00:00:00:00:00:00")
        return "";
    return mac;
}

std::string string_field(const json& entry, const char* key, const std::string& where)
{
    if (!entry.contains(key) || entry[key].is_null())
        return "";
    if (!entry[key].is_string())
        throw Error(where + ": \"" + key + "\" must be a string");
    return entry[key].get<std::string>();
}

} // namespace

namespace {

// U-Boot's names for a board's MAC addresses, in the order of its interfaces.
std::string mac_variable(size_t index)
{
    return index == 0 ? std::string("ethaddr") : "eth" + std::to_string(index) + "addr";
}

} // namespace

std::string Unit::unit_file() const
{
    std::string text = "serial=" + serial + "\n";
    if (!hostname.empty())
        text += "hostname=" + hostname + "\n";
    for (size_t i = 0; i < macs.size(); ++i)
        text += mac_variable(i) + "=" + macs[i] + "\n";
    return text;
}

std::vector<std::pair<std::string, std::string>> Unit::uboot_variables() const
{
    std::vector<std::pair<std::string, std::string>> variables{{"serial#", serial}};
    for (size_t i = 0; i < macs.size(); ++i)
        variables.emplace_back(mac_variable(i), macs[i]);
    return variables;
}

namespace {

// The records of a CSV text (RFC 4180: commas, "quoted" fields with ""
// for a quote, CRLF or LF), each with the line it starts on.
std::vector<std::pair<size_t, std::vector<std::string>>> csv_records(const std::string& text,
                                                                     const std::string& name)
{
    std::vector<std::pair<size_t, std::vector<std::string>>> records;
    std::vector<std::string> fields;
    std::string field;
    bool quoted = false, in_quotes = false, any = false;
    size_t line = 1, start = 1;
    auto end_field = [&] {
        fields.push_back(std::move(field));
        field.clear();
        quoted = false;
    };
    for (size_t i = 0; i < text.size(); ++i) {
        char c = text[i];
        if (in_quotes) {
            if (c == '"' && i + 1 < text.size() && text[i + 1] == '"') {
                field += '"';
                ++i;
            } else if (c == '"') {
                in_quotes = false;
            } else {
                // LF, CRLF or a lone CR, inside a field as between records.
                line += c == '\n' || (c == '\r' && (i + 1 == text.size() || text[i + 1] != '\n'));
                field += c;
            }
            continue;
        }
        if (c == '"' && field.empty() && !quoted) {
            in_quotes = quoted = any = true;
        } else if (c == ',') {
            end_field();
            any = true;
        } else if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') {
            continue;
        } else if (c == '\n' || c == '\r') { // LF, CRLF or a lone CR
            end_field();
            if (any || fields.size() > 1 || !fields.front().empty())
                records.emplace_back(start, std::move(fields));
            fields.clear();
            any = false;
            start = ++line;
        } else if (quoted) {
            throw Error(name + " line " + std::to_string(line) + ": text after a closing quote");
        } else {
            field += c;
            any = true;
        }
    }
    if (in_quotes)
        throw Error(name + " line " + std::to_string(start) + ": a quoted field does not end");
    end_field();
    if (any || fields.size() > 1 || !fields.front().empty())
        records.emplace_back(start, std::move(fields));
    return records;
}

// A CSV manifest as the JSON objects of a JSON-lines one. Its header names
// the columns: serial (required), hostname, mac (addresses separated by
// spaces or ;) and file:PATH or file:PATH:MODE, whose cells name each
// unit's source for /etc/PATH (an empty cell: no such file).
std::vector<std::pair<size_t, json>> csv_entries(const std::string& text, const std::string& name)
{
    // A byte order mark (spreadsheets write one) is not part of the header.
    auto records = csv_records(text.rfind("\xEF\xBB\xBF", 0) == 0 ? text.substr(3) : text, name);
    std::vector<std::pair<size_t, json>> entries;
    if (records.empty())
        return entries;
    const auto& header = records.front().second;
    const std::string header_line = name + " line " + std::to_string(records.front().first);
    std::set<std::string> seen;
    bool has_serial = false;
    for (const auto& column : header) {
        if (!seen.insert(column).second)
            throw Error(header_line + ": column \"" + text::printable(column) + "\" is named twice");
        has_serial |= column == "serial";
        if (column != "serial" && column != "hostname" && column != "mac" && column.rfind("file:", 0) != 0)
            throw Error(header_line + ": unknown column \"" + text::printable(column)
                        + "\" (serial, hostname, mac, file:PATH or file:PATH:MODE)");
    }
    if (!has_serial)
        throw Error(header_line + ": no \"serial\" column");
    for (size_t r = 1; r < records.size(); ++r) {
        const auto& [line, cells] = records[r];
        if (cells.size() != header.size())
            throw Error(name + " line " + std::to_string(line) + ": " + std::to_string(cells.size())
                        + " fields, the header names " + std::to_string(header.size()));
        json entry = json::object();
        for (size_t c = 0; c < header.size(); ++c) {
            const std::string& column = header[c];
            const std::string& cell = cells[c];
            if (column == "serial" || column == "hostname") {
                entry[column] = cell;
            } else if (column == "mac") {
                json macs = json::array();
                std::string word;
                for (char ch : cell + " ") {
                    if (ch == ' ' || ch == ';' || ch == '\t') {
                        if (!word.empty())
                            macs.push_back(word);
                        word.clear();
                    } else {
                        word += ch;
                    }
                }
                entry["mac"] = macs;
            } else if (!cell.empty()) {
                std::string spec = column.substr(5);
                json file{{"path", spec}, {"source", cell}};
                // file:PATH:MODE, MODE octal permissions such as 0600.
                size_t colon = spec.rfind(':');
                std::string mode = colon == std::string::npos ? "" : spec.substr(colon + 1);
                if ((mode.size() == 3 || mode.size() == 4)
                    && mode.find_first_not_of("01234567") == std::string::npos
                    && (mode.size() == 3 || mode[0] == '0')) {
                    file["path"] = spec.substr(0, colon);
                    file["mode"] = mode;
                }
                entry["files"].push_back(file);
            }
        }
        entries.emplace_back(line, std::move(entry));
    }
    return entries;
}

std::vector<std::pair<size_t, json>> json_lines_entries(const std::string& text, const std::string& name)
{
    std::vector<std::pair<size_t, json>> entries;
    // A byte order mark (some editors write one) is not part of the JSON.
    std::istringstream lines(text.rfind("\xEF\xBB\xBF", 0) == 0 ? text.substr(3) : text);
    std::string line;
    size_t number = 0;
    while (std::getline(lines, line)) {
        ++number;
        if (line.find_first_not_of(" \t\r") == std::string::npos)
            continue;
        json entry = json::parse(line, nullptr, false);
        if (entry.is_discarded() || !entry.is_object())
            throw Error(name + " line " + std::to_string(number) + ": not a JSON object");
        entries.emplace_back(number, std::move(entry));
    }
    return entries;
}

} // namespace

std::vector<Unit> read_manifest(const std::filesystem::path& manifest)
{
    std::string text = named::read_input(manifest, "the manifest", manifest_limit);
    std::filesystem::path folder = manifest.parent_path().empty() ? "." : manifest.parent_path();
    UniqueFd folder_fd; // opened on the first per-unit file
    std::vector<Unit> units;
    std::set<std::string> serials, hostnames, macs;
    std::string extension = manifest.extension().string();
    for (auto& c : extension)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    auto entries = extension == ".csv" ? csv_entries(text, manifest.string()) : json_lines_entries(text, manifest.string());
    for (const auto& [number, entry] : entries) {
        std::string where = manifest.string() + " line " + std::to_string(number);
        for (const auto& [key, value] : entry.items())
            if (key != "serial" && key != "hostname" && key != "mac" && key != "files")
                throw Error(where + ": unknown key \"" + key + "\" (serial, hostname, mac, files)");
        Unit unit;
        unit.line = number;
        unit.serial = string_field(entry, "serial", where);
        if (!valid_serial(unit.serial))
            throw Error(where + ": serial '" + text::printable(unit.serial) + "' must be 1 to 64 of A-Z a-z 0-9 . _ -");
        if (!serials.insert(unit.serial).second)
            throw Error(where + ": serial " + unit.serial + " is listed twice");
        unit.hostname = string_field(entry, "hostname", where);
        if (!unit.hostname.empty()) {
            if (!valid_hostname(unit.hostname))
                throw Error(where + ": hostname '" + text::printable(unit.hostname) + "' is not a DNS name");
            std::string folded = unit.hostname;
            for (auto& c : folded)
                c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
            if (!hostnames.insert(folded).second)
                throw Error(where + ": hostname " + unit.hostname + " is listed twice");
        }
        if (entry.contains("mac")) {
            json list = entry["mac"].is_string() ? json::array({entry["mac"]}) : entry["mac"];
            if (!list.is_array())
                throw Error(where + ": \"mac\" must be an address or a list of them");
            for (const auto& value : list) {
                std::string mac = value.is_string() ? checked_mac(value.get<std::string>()) : "";
                if (mac.empty())
                    throw Error(where + ": MAC " + value.dump() + " is not a unicast xx:xx:xx:xx:xx:xx");
                if (!macs.insert(mac).second)
                    throw Error(where + ": MAC " + mac + " is listed twice");
                unit.macs.push_back(mac);
            }
        }
        if (entry.contains("files")) {
            if (!entry["files"].is_array())
                throw Error(where + ": \"files\" must be a list");
            for (const auto& file : entry["files"]) {
                if (!file.is_object())
                    throw Error(where + ": each of \"files\" must be an object (path, source, mode)");
                for (const auto& [key, value] : file.items())
                    if (key != "path" && key != "source" && key != "mode")
                        throw Error(where + ": unknown key \"" + key + "\" in a file (path, source, mode)");
                UnitFile out;
                std::string path = string_field(file, "path", where);
                // Inside /etc: "/etc/x", "etc/x" and "x" all name /etc/x.
                if (path.rfind("/etc/", 0) == 0)
                    path = path.substr(5);
                else if (path.rfind("etc/", 0) == 0)
                    path = path.substr(4);
                try {
                    if (path.find('\0') != std::string::npos)
                        throw Error("it holds a NUL byte");
                    auto parts = fs::split_relative_path(path, "a unit file");
                    if (parts.empty())
                        throw Error("no file name");
                    for (const auto& part : parts)
                        if (part.size() > 255)
                            throw Error("a name is longer than 255 bytes");
                    out.path.clear();
                    for (const auto& part : parts)
                        out.path += (out.path.empty() ? "" : "/") + part;
                } catch (const std::exception& e) {
                    throw Error(where + ": file path '" + text::printable(string_field(file, "path", where))
                                + "' must name a file inside /etc: " + e.what());
                }
                if (out.path == "treeflash/unit" || out.path == "hostname")
                    throw Error(where + ": /etc/" + out.path + " is written from the unit's own fields");
                for (const auto& earlier : unit.files)
                    if (earlier.path == out.path)
                        throw Error(where + ": /etc/" + out.path + " is listed twice");
                std::string mode = file.contains("mode") ? string_field(file, "mode", where) : "0644";
                static const std::regex octal("0?[0-7]{3}");
                if (!std::regex_match(mode, octal))
                    throw Error(where + ": mode '" + mode + "' must be octal permissions such as 0600");
                out.mode = static_cast<unsigned>(std::stoul(mode, nullptr, 8));
                std::string source = string_field(file, "source", where);
                if (source.empty())
                    throw Error(where + ": each file needs a \"source\", below the manifest's folder");
                if (!folder_fd)
                    folder_fd = fs::open_directory(folder);
                try {
                    UniqueFd fd = fs::open_beneath(folder_fd.get(), source, O_RDONLY | O_NONBLOCK);
                    struct stat st {};
                    if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode))
                        throw Error("not a regular file");
                    if (static_cast<uint64_t>(st.st_size) > unit_file_limit)
                        throw Error("larger than 1 MiB");
                    out.data = fs::read_all(fd.get(), source);
                } catch (const std::exception& e) {
                    throw Error(where + ": source " + text::printable(source) + " (below " + folder.string() + "): " + e.what());
                }
                unit.files.push_back(std::move(out));
            }
        }
        units.push_back(std::move(unit));
    }
    if (units.empty())
        throw Error(manifest.string() + " lists no unit");
    return units;
}

UnitPool::UnitPool(const std::filesystem::path& manifest) : m_units(read_manifest(manifest))
{
    // Beside the manifest's real file: a symlink or another name for the
    // same manifest finds the same journal, and its lock.
    std::error_code ec;
    std::filesystem::path real = std::filesystem::canonical(manifest, ec);
    m_journal_path = (ec ? manifest : real).string() + ".journal";
    named::OpenFile journal = named::open_log(m_journal_path, "the journal");
    // One station per manifest: two would hand out the same units.
    if (::flock(journal.fd.get(), LOCK_EX | LOCK_NB) != 0)
        throw Error(m_journal_path.string() + " is in use by another station (one manifest, one station)");
    UniqueFd reader(::open(("/proc/self/fd/" + std::to_string(journal.fd.get())).c_str(), O_RDONLY | O_CLOEXEC));
    if (!reader)
        throw_errno("read " + m_journal_path.string());
    std::string text = fs::read_all(reader.get(), m_journal_path.string());
    if (text.size() > journal_limit)
        throw Error(m_journal_path.string() + " is larger than 256 MiB");
    // A last line without its newline was being written when the station
    // died: its unit had not reached a card (a unit goes to a card only
    // once its line is on disk). It is cut off, so the next line starts clean.
    size_t whole = text.rfind('\n');
    whole = whole == std::string::npos ? 0 : whole + 1;
    if (whole < text.size()) {
        if (::ftruncate(journal.fd.get(), static_cast<off_t>(whole)) != 0 || ::fsync(journal.fd.get()) != 0)
            throw_errno("cut the torn last line of " + m_journal_path.string());
        text.resize(whole);
    }
    std::istringstream lines(text);
    std::string line;
    size_t number = 0;
    while (std::getline(lines, line)) {
        ++number;
        json entry = json::parse(line, nullptr, false);
        if (entry.is_discarded() || !entry.is_object() || !entry.contains("serial") || !entry["serial"].is_string()
            || !entry.contains("event") || !entry["event"].is_string())
            throw Error(m_journal_path.string() + " line " + std::to_string(number)
                        + " is not a journal entry; it is not changed, and no unit is given out");
        std::string serial = entry["serial"], event = entry["event"];
        // A unit the manifest no longer lists stays used all the same.
        if (event == "given")
            m_given.insert(serial);
        else if (event == "ok" || event == "failed")
            m_ended[serial] = event;
    }
    m_journal = std::move(journal.fd);
}

void UnitPool::append(const std::string& line)
{
    if (m_broken)
        throw Error(m_journal_path.string() + " could not be written before; no unit is given out");
    std::string text = line + "\n";
    off_t before = ::lseek(m_journal.get(), 0, SEEK_END);
    errno = ENOSPC; // a short write sets none
    if (before < 0 || ::write(m_journal.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())
        || ::fdatasync(m_journal.get()) != 0) {
        int saved = errno;
        // Whatever part of the line got in goes; no unit is given out after this.
        if (before >= 0 && ::ftruncate(m_journal.get(), before) == 0)
            ::fdatasync(m_journal.get());
        m_broken = true;
        errno = saved;
        throw_errno("write to the journal " + m_journal_path.string());
    }
}

std::optional<Unit> UnitPool::take(const std::string& slot, const std::string& card)
{
    std::lock_guard lock(m_mutex);
    for (const auto& unit : m_units) {
        if (m_given.count(unit.serial))
            continue;
        append(json{{"time", text::utc_now()}, {"event", "given"}, {"serial", unit.serial}, {"slot", slot}, {"card", card}}
                   .dump());
        m_given.insert(unit.serial);
        return unit;
    }
    return std::nullopt;
}

void UnitPool::finish(const Unit& unit, bool ok, const std::string& detail)
{
    std::lock_guard lock(m_mutex);
    json entry{{"time", text::utc_now()}, {"event", ok ? "ok" : "failed"}, {"serial", unit.serial}};
    if (!detail.empty())
        entry["detail"] = detail;
    append(entry.dump());
    m_ended[unit.serial] = ok ? "ok" : "failed";
}

size_t UnitPool::left() const
{
    std::lock_guard lock(m_mutex);
    size_t n = 0;
    for (const auto& unit : m_units)
        n += m_given.count(unit.serial) == 0;
    return n;
}

std::vector<std::string> UnitPool::unfinished() const
{
    std::lock_guard lock(m_mutex);
    std::vector<std::string> out;
    for (const auto& serial : m_given)
        if (!m_ended.count(serial))
            out.push_back(serial);
    return out;
}

} // namespace treeflash::flasher
