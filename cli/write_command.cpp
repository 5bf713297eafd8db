// treeflash write: options -> flasher::WriteOptions -> flasher::write_cards
// -> a line (or a JSON object) per card, and the factory log.
#include "cli/command.hpp"
#include "common/error.hpp"
#include "common/text.hpp"
#include "common/named_file.hpp"
#include "flasher/write/write.hpp"

#include <boost/program_options.hpp>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fcntl.h>
#include <iostream>
#include <mutex>
#include <sys/stat.h>
#include <unistd.h>

namespace po = boost::program_options;

namespace treeflash::cli {

namespace {

const char* write_usage = R"(Usage: treeflash write IMAGE DEVICE... [OPTIONS]

Writes one image to one or more cards at once. IMAGE is raw or compressed
(.gz, .xz, .zst, .bz2, .lz4) and is read and decompressed once. Only the
blocks its bmap lists are written (IMAGE.bmap, or card.img.bmap for
card.img.zst, or --bmap; without one the image's holes are skipped), the
first MiB last, so a card pulled mid-write does not half-boot. Then every
written block is read back from the card, past the page cache, and its
sha256 compared. A SHA256SUMS beside the image that lists it is checked
first; a compressed image that carries no checksum of its own (every frame
or stream) needs a bmap or SHA256SUMS to vouch for it. Archives (zip, tar,
...) are refused. Needs root.

Every DEVICE must be a whole disk, not the one holding /, not mounted or in
use, removable (or --force), and at least as large as the image. All
targets are listed and you are asked once, unless --yes. A card that fails
is reported and the others finish; the exit status is 0 only when every
card was written, verified and, with --log, logged. Files named here are
regular files; a symlink is followed only out of a folder no other user
can write.

Examples:
  treeflash write card.img.zst /dev/sdb /dev/sdc /dev/sdd --yes --log cards.jsonl
  treeflash write card.img /dev/sdb --grow --json

Options)";

struct CardLine {
    std::string device;
    flasher::CardPhase phase = flasher::CardPhase::Writing;
    uint64_t done = 0, total = 0;
    double phase_start = 0, seconds = 0;
    int last_decile = -1;
};

std::string rate(double bytes, double seconds)
{
    char text[32];
    std::snprintf(text, sizeof text, "%.1f MiB/s", seconds > 0 ? bytes / seconds / (1 << 20) : 0.0);
    return text;
}

// Progress of every card: on a terminal one live line per card, redrawn in
// place; otherwise plain lines at each tenth and each phase change.
class ProgressView {
public:
    ProgressView(std::ostream& out, bool live, const std::vector<std::string>& devices) : m_out(out), m_live(live)
    {
        for (const auto& device : devices)
            m_cards.push_back({device});
    }

    void update(const flasher::CardProgress& p)
    {
        std::lock_guard lock(m_mutex);
        CardLine& card = m_cards[p.card];
        bool phase_changed = card.phase != p.phase || card.total == 0;
        if (card.phase != p.phase)
            card.phase_start = p.seconds;
        card.phase = p.phase;
        card.done = p.done;
        card.seconds = p.seconds;
        if (p.total)
            card.total = p.total;
        if (m_live) {
            auto now = std::chrono::steady_clock::now();
            if (phase_changed || now - m_last_draw > std::chrono::milliseconds(250)) {
                draw();
                m_last_draw = now;
            }
            return;
        }
        int decile = card.total ? static_cast<int>(card.done * 10 / card.total) : 0;
        if (phase_changed)
            card.last_decile = -1;
        bool ends = p.phase == flasher::CardPhase::Done || p.phase == flasher::CardPhase::Failed;
        if ((decile != card.last_decile && !ends) || (phase_changed && ends)) {
            card.last_decile = decile;
            m_out << text(card) << "\n" << std::flush;
        }
    }

    void finish()
    {
        std::lock_guard lock(m_mutex);
        if (m_live)
            draw();
    }

private:
    std::string text(const CardLine& card) const
    {
        std::string line = card.device + "  " + flasher::phase_name(card.phase);
        bool moving = card.phase == flasher::CardPhase::Writing || card.phase == flasher::CardPhase::Verifying;
        if (moving && card.total) {
            double spent = card.seconds - card.phase_start;
            line += "  " + mib(card.done) + " of " + mib(card.total) + " ("
                    + std::to_string(card.done * 100 / card.total) + "%)  " + rate(static_cast<double>(card.done), spent);
            if (card.done && card.done < card.total) {
                double eta = spent * static_cast<double>(card.total - card.done) / static_cast<double>(card.done);
                line += "  ETA " + std::to_string(static_cast<long>(eta + 0.5)) + " s";
            }
        }
        return line;
    }

    void draw()
    {
        if (m_drawn)
            m_out << "\x1b[" << m_cards.size() << "A";
        for (const auto& card : m_cards)
            m_out << "\r\x1b[K" << text(card) << "\n";
        m_out << std::flush;
        m_drawn = true;
    }

    std::ostream& m_out;
    bool m_live;
    std::vector<CardLine> m_cards;
    std::mutex m_mutex;
    bool m_drawn = false;
    std::chrono::steady_clock::time_point m_last_draw{};
};

bool ask_to_erase_all(const std::vector<flasher::DiskInfo>& disks, const flasher::PreparedImage& image)
{
    std::cerr << "About to write " << image.path.string() << " (" << mib(image.map.mapped_bytes()) << " of data, "
              << mib(image.map.image_size) << " image) to " << disks.size() << (disks.size() == 1 ? " card" : " cards")
              << ", erasing them:\n";
    for (const auto& disk : disks) {
        std::cerr << "  " << disk.path << "  " << mib(disk.size) << "  "
                  << (disk.vendor.empty() ? "" : disk.vendor + " ") << (disk.model.empty() ? "unknown model" : disk.model)
                  << "  serial " << (disk.serial.empty() ? "unknown" : disk.serial)
                  << (disk.removable ? "" : "  (NOT removable)") << "\n";
        for (const auto& part : disk.partitions)
            std::cerr << "      " << part.node << "  " << mib(part.size) << "  " << (part.fstype.empty() ? "-" : part.fstype)
                      << (part.label.empty() ? "" : "  '" + part.label + "'") << "\n";
    }
    if (!::isatty(0))
        throw UsageError("refusing to erase without confirmation: pass --yes");
    std::cerr << "Type 'yes' to erase everything on " << (disks.size() == 1 ? "it" : "all of them") << ": " << std::flush;
    std::string answer;
    std::getline(std::cin, answer);
    return answer == "yes";
}

nlohmann::json card_json(const flasher::CardResult& card)
{
    nlohmann::json j = {
        {"device", card.disk.path},
        {"model", (card.disk.vendor.empty() ? "" : card.disk.vendor + " ") + card.disk.model},
        {"serial", card.disk.serial},
        {"size", card.disk.size},
        {"bytes_written", card.bytes_written},
        {"seconds", static_cast<double>(static_cast<long>(card.seconds * 1000)) / 1000},
        {"verified", card.verified},
        {"ok", card.ok()},
        {"error", card.ok() ? nlohmann::json(nullptr) : nlohmann::json(card.error)},
    };
    if (card.grown_to)
        j["grown_partition_size"] = *card.grown_to;
    return j;
}

std::string seconds_text(double seconds)
{
    char text[32];
    std::snprintf(text, sizeof text, "%.1f s", seconds);
    return text;
}


} // namespace

int run_write(const std::vector<std::string>& args, GCancellable* cancellable)
{
    flasher::WriteOptions options;
    std::string image, bmap, sums, log;
    bool no_verify = false, yes = false, json = false;
    po::options_description desc(write_usage);
    desc.add_options()
        ("help,h", "show this help")
        ("image", po::value(&image)->value_name("IMAGE"), "the image (raw, .gz, .xz, .zst)")
        ("device", po::value(&options.devices)->value_name("DEVICE")->composing(), "a card to write (whole disk)")
        ("bmap", po::value(&bmap)->value_name("FILE"), "the image's block map (default: beside the image)")
        ("sums", po::value(&sums)->value_name("FILE"),
         "check the image and its bmap against this SHA256SUMS (default: SHA256SUMS beside the image, if it lists it)")
        ("no-verify", po::bool_switch(&no_verify), "do not read the cards back")
        ("grow", po::bool_switch(&options.grow), "grow the last partition and its ext4 file system to fill each card")
        ("log", po::value(&log)->value_name("FILE")->notifier([](const std::string& value) {
             if (value.empty())
                 throw UsageError("--log: name a file (an empty name would turn the log off)");
         }), "append one JSON line per card to FILE (a regular file; exit 1 when a line cannot be written)")
        ("yes,y", po::bool_switch(&yes), "do not ask before erasing the cards")
        ("force", po::bool_switch(&options.force), "allow devices that are not removable")
        ("json", po::bool_switch(&json), "print the results as a JSON array on stdout");
    po::positional_options_description positional;
    positional.add("image", 1);
    positional.add("device", -1);
    if (!parse_options(args, desc, &positional))
        return 0;
    if (image.empty())
        throw UsageError("name an IMAGE and at least one DEVICE");
    if (options.devices.empty())
        throw UsageError("name at least one DEVICE to write " + image + " to");
    options.image = image;
    options.verify = !no_verify;
    if (!bmap.empty())
        options.image_options.bmap = bmap;
    if (!sums.empty())
        options.image_options.sums = sums;
    options.image_options.hash_image = !log.empty();
    options.image_options.notice = print_notice;
    options.notice = print_notice;
    if (!yes)
        options.confirm = ask_to_erase_all;

    // The log opens first: a factory that cannot record a card should not write it.
    // It is a regular file (never a card, a device or a FIFO), and not one of
    // the files the write reads (write_cards checks that).
    UniqueFd log_fd;
    if (!log.empty()) {
        // Checked by name before the log is created: an empty file made
        // under the bmap's name would read as a broken bmap.
        for (const auto& read : flasher::files_read_with(options.image, options.image_options))
            if (named::same_name(log, read))
                throw Error("the log " + log + " is a file this write reads (" + read.string()
                            + ": the image, a bmap or SHA256SUMS); name another file");
        named::OpenFile opened = named::open_log(log, "the log");
        options.outputs.push_back({"the log " + log, opened.st});
        log_fd = std::move(opened.fd);
    }

    std::ostream& progress_out = json ? std::cerr : std::cout;
    int progress_fd = json ? 2 : 1;
    ProgressView view(progress_out, ::isatty(progress_fd) == 1, options.devices);
    options.progress = [&view](const flasher::CardProgress& p) { view.update(p); };

    flasher::WriteReport report = in_step("write " + image, [&] { return flasher::write_cards(options, cancellable); });
    view.finish();

    bool logged = true;
    if (log_fd) {
        for (const auto& card : report.cards) {
            nlohmann::json line = card_json(card);
            line["time"] = text::utc_now();
            line["image"] = report.image;
            line["image_sha256"] = report.image_sha256;
            line["commit"] = report.commits.size() == 1 ? nlohmann::json(report.commits.front()) : nlohmann::json(nullptr);
            if (report.commits.size() > 1)
                line["commits"] = report.commits;
            line["result"] = card.ok() ? "ok" : "failed";
            std::string text = line.dump() + "\n";
            errno = ENOSPC; // a short write sets none
            if (::write(log_fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())
                || ::fdatasync(log_fd.get()) != 0) {
                print_error("could not log " + card.disk.path + " to " + log + ": " + std::strerror(errno)
                            + "; the card is not recorded");
                logged = false;
            }
        }
    }

    if (json) {
        nlohmann::json cards = nlohmann::json::array();
        for (const auto& card : report.cards)
            cards.push_back(card_json(card));
        print_json(cards);
    } else {
        for (const auto& card : report.cards) {
            if (card.ok())
                std::cout << card.disk.path << "  ok  " << mib(card.bytes_written) << " written in "
                          << seconds_text(card.seconds) << ", "
                          << (card.verified ? "verified" : "NOT verified")
                          << (card.grown_to ? ", last partition grown to " + mib(*card.grown_to) : "") << "\n";
            else
                std::cout << card.disk.path << "  FAILED  " << card.error << "\n";
        }
    }
    if (report.cancelled)
        return 130;
    return report.all_ok() && logged ? 0 : 1;
}

} // namespace treeflash::cli
