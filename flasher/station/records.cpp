#include "flasher/station/records.hpp"

#include "common/error.hpp"
#include "common/text.hpp"

#include <cerrno>
#include <sstream>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

using nlohmann::json;

// A field as a string; "" when absent or not a string (the log is a file
// anyone with access may have edited).
std::string string_field(const json& entry, const char* key)
{
    auto it = entry.find(key);
    return it != entry.end() && it->is_string() ? it->get<std::string>() : std::string();
}

} // namespace

FileRecords::FileRecords(const std::optional<std::filesystem::path>& manifest, int log_fd, const std::string& log_text)
    : m_manifest(manifest), m_log_fd(log_fd)
{
    if (manifest)
        m_units = std::make_unique<UnitPool>(*manifest);
    const std::string today = text::utc_now().substr(0, 10);
    std::istringstream lines(log_text);
    std::string line;
    while (std::getline(lines, line)) {
        json entry = json::parse(line, nullptr, false);
        if (entry.is_discarded() || !entry.is_object())
            continue;
        std::string result = string_field(entry, "result");
        if (string_field(entry, "time").rfind(today, 0) == 0) {
            m_today.first += result == "ok";
            m_today.second += result == "failed" || result == "interrupted";
        }
        std::string card = string_field(entry, "card");
        if (result == "ok" && !card.empty())
            m_done[{card, string_field(entry, "image_sha256")}] = string_field(entry, "unit");
    }
}

std::string FileRecords::units_source() const
{
    return m_manifest ? m_manifest->string() : "no manifest";
}

std::optional<std::string> FileRecords::done_unit(const std::string& card, const std::string& image_sha256)
{
    std::lock_guard lock(m_mutex);
    auto it = m_done.find({card, image_sha256});
    if (it == m_done.end())
        return std::nullopt;
    return it->second;
}

std::optional<Unit> FileRecords::take(const UnitRequest& request)
{
    if (!m_units)
        return std::nullopt;
    return m_units->take(std::to_string(request.slot), request.card);
}

void FileRecords::record_card(const json& record, const std::optional<Unit>& unit)
{
    const bool ok = record.value("result", "") == "ok";
    std::string journal_error;
    if (unit && m_units) {
        try {
            m_units->finish(*unit, ok, ok ? "" : record.value("error", ""));
        } catch (const std::exception& e) {
            // The unit stays given, never given again; the card's record
            // still goes to the log.
            journal_error = e.what();
        }
    }
    if (m_log_fd >= 0) {
        // Bytes that are not UTF-8 (in a message from the card) become U+FFFD.
        std::string text = record.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
        std::lock_guard lock(m_mutex);
        errno = ENOSPC; // a short write sets none
        if (::write(m_log_fd, text.data(), text.size()) != static_cast<ssize_t>(text.size())
            || ::fdatasync(m_log_fd) != 0)
            throw_errno("write the card log");
    }
    if (ok) {
        std::lock_guard lock(m_mutex);
        m_done[{string_field(record, "card"), string_field(record, "image_sha256")}] = unit ? unit->serial : "";
    }
    if (!journal_error.empty())
        throw Error(journal_error);
}

std::vector<std::string> FileRecords::unfinished()
{
    return m_units ? m_units->unfinished() : std::vector<std::string>{};
}

} // namespace treeflash::flasher
