#include "flasher/station/station.hpp"

#include "common/error.hpp"
#include "common/text.hpp"
#include "common/fs.hpp"
#include "flasher/disk/target.hpp"
#include "flasher/inspect/image_commits.hpp"
#include "flasher/station/provision.hpp"
#include "flasher/write/write.hpp"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <fcntl.h>
#include <gio/gio.h>
#include <linux/fs.h>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

#ifndef BLKGETDISKSEQ
#define BLKGETDISKSEQ _IOR(0x12, 128, __u64)
#endif

namespace treeflash::flasher {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;


// What a slot holds right now: the medium's size (0: no card) and the
// kernel's disk sequence number, which changes with each new medium.
struct Medium {
    uint64_t size = 0;
    uint64_t diskseq = 0;
};

Medium look_at(const std::string& device)
{
    Medium medium;
    // O_NONBLOCK: an empty reader answers at once. A slot whose node is gone
    // (a USB reader unplugged) or that has no medium reads as empty.
    UniqueFd fd(::open(device.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
    if (!fd)
        return medium;
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0 || !S_ISBLK(st.st_mode))
        return medium;
    if (::ioctl(fd.get(), BLKGETSIZE64, &medium.size) != 0)
        medium.size = 0;
    if (::ioctl(fd.get(), BLKGETDISKSEQ, &medium.diskseq) != 0)
        medium.diskseq = 0;
    return medium;
}

// The sysfs directory of the block device `device` names, or nullopt.
std::optional<std::filesystem::path> sysfs_dir_of(const std::string& device)
{
    struct stat st {};
    if (::stat(device.c_str(), &st) != 0 || !S_ISBLK(st.st_mode))
        return std::nullopt;
    try {
        return sysfs_block_dir(st.st_rdev);
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

// No unit is left for a card that was written.
class NoUnitLeft : public Error {
public:
    using Error::Error;
};

class Station {
public:
    Station(const StationOptions& options, GCancellable* cancellable)
        : m_options(options), m_cancellable(cancellable)
    {
    }

    StationReport run()
    {
        check_slots();
        if (!m_options.records)
            throw Error("the station has nowhere to record its cards");
        m_records = m_options.records;
        ImageOptions image_options = m_options.image_options;
        image_options.hash_image = true; // the log names the image by its sha256
        m_image = prepare_image(m_options.image, image_options, m_cancellable);
        try {
            m_commits = deployed_commits("/proc/self/fd/" + std::to_string(m_image.fd.get()));
        } catch (const std::exception&) {
            // Not an image with a partition table: no commit to name.
        }
        StationStart start;
        std::tie(start.ok_today, start.failed_today) = m_records->counts_today();
        start.image_sha256 = m_image.image_sha256;
        start.commits = m_commits;
        if (m_records->gives_units()) {
            start.units_left = m_records->units_left();
            start.units_total = m_records->units_total();
        }
        if (m_options.started)
            m_options.started(start);
        notice("station: " + std::to_string(m_options.slots.size()) + " slot(s), image " + m_options.image.string()
               + " (sha256 " + m_image.image_sha256.substr(0, 12) + ")"
               + (m_records->gives_units() ? ", " + std::to_string(start.units_left) + " of "
                                                 + std::to_string(start.units_total) + " units left in "
                                                 + m_records->units_source()
                                           : ""));

        m_status.resize(m_options.slots.size());
        for (size_t i = 0; i < m_status.size(); ++i) {
            m_status[i].slot = i;
            m_status[i].device = m_options.slots[i];
        }
        std::vector<std::thread> threads;
        for (size_t i = 0; i < m_options.slots.size(); ++i)
            threads.emplace_back([this, i] { slot_loop(i); });
        for (auto& thread : threads)
            thread.join();

        StationReport report;
        report.image_sha256 = m_image.image_sha256;
        report.commits = m_commits;
        report.ok = m_ok;
        report.failed = m_failed;
        report.cancelled = g_cancellable_is_cancelled(m_cancellable);
        report.slots = m_status;
        if (m_records->gives_units()) {
            try {
                report.unfinished_units = m_records->unfinished();
                report.units_left = m_records->units_left();
                report.units_total = m_records->units_total();
            } catch (const std::exception& e) {
                notice(std::string("station: ") + e.what());
            }
        }
        return report;
    }

private:
    void notice(const std::string& text)
    {
        if (m_options.notice)
            m_options.notice(text);
    }

    void check_slots()
    {
        if (m_options.slots.empty())
            throw Error("name at least one slot (--slot DEVICE)");
        std::map<dev_t, std::string> seen;
        for (const auto& slot : m_options.slots) {
            struct stat st {};
            if (::stat(slot.c_str(), &st) != 0)
                throw_errno("slot " + slot);
            if (!S_ISBLK(st.st_mode))
                throw Error("slot " + slot + " is not a block device (a card reader's device, such as /dev/sdb)");
            auto [it, added] = seen.emplace(st.st_rdev, slot);
            if (!added)
                throw Error("slot " + slot + " is named twice (as " + it->second + " too)");
            m_slot_devno.push_back(st.st_rdev);
        }
    }

    bool stopping() const
    {
        return g_cancellable_is_cancelled(m_cancellable)
               || (m_options.stop_after && m_ok.load() >= m_options.stop_after);
    }

    bool reserve_card()
    {
        if (!m_options.stop_after)
            return true;
        std::lock_guard lock(m_count_mutex);
        if (m_ok.load() + m_in_hand >= m_options.stop_after)
            return false;
        ++m_in_hand;
        return true;
    }

    void release_card()
    {
        if (!m_options.stop_after)
            return;
        std::lock_guard lock(m_count_mutex);
        --m_in_hand;
    }

    // A card reserved by reserve_card(), released however its handling ends.
    struct CardReservation {
        explicit CardReservation(Station& owner) : station(owner) {}
        ~CardReservation() { station.release_card(); }
        CardReservation(const CardReservation&) = delete;
        CardReservation& operator=(const CardReservation&) = delete;
        Station& station;
    };

    void sleep_a_poll() const { std::this_thread::sleep_for(std::chrono::milliseconds(m_options.poll_ms)); }

    void update(size_t slot, const std::function<void(SlotStatus&)>& change)
    {
        SlotStatus copy;
        {
            std::lock_guard lock(m_status_mutex);
            change(m_status[slot]);
            copy = m_status[slot];
        }
        if (m_options.status) {
            try {
                m_options.status(copy);
            } catch (...) {
                // Showing a state fails no card.
            }
        }
    }

    void slot_loop(size_t slot)
    {
        const std::string& device = m_options.slots[slot];
        uint64_t handled_diskseq = 0;
        bool holding = false; // a card we handled is still in the slot
        bool waiting = false; // a card is in, but --cards N are in hand
        while (!stopping()) {
            Medium medium = look_at(device);
            if (holding) {
                // The card handled stays until it is taken out (or replaced).
                if (medium.size == 0 || (medium.diskseq && medium.diskseq != handled_diskseq)) {
                    holding = false;
                    update(slot, [](SlotStatus& s) {
                        s = SlotStatus{s.slot, s.device};
                    });
                    continue;
                }
                sleep_a_poll();
                continue;
            }
            if (medium.size == 0) {
                if (waiting) { // the waiting card was taken out
                    waiting = false;
                    update(slot, [](SlotStatus& s) { s = SlotStatus{s.slot, s.device}; });
                }
                sleep_a_poll();
                continue;
            }
            // With --cards N, a card is taken only while fewer than N are
            // done or being written: the station never writes more than N.
            if (!reserve_card()) {
                if (!waiting)
                    update(slot, [&](SlotStatus& s) {
                        s.message = "waiting: " + std::to_string(m_options.stop_after)
                                    + " card(s) are done or being written (--cards)";
                    });
                waiting = true;
                sleep_a_poll();
                continue;
            }
            waiting = false;
            {
                CardReservation reserved(*this);
                handle_card(slot, medium);
            }
            handled_diskseq = medium.diskseq;
            holding = true;
        }
    }

    void handle_card(size_t slot, const Medium& medium)
    {
        const std::string& device = m_options.slots[slot];
        auto started = Clock::now();
        auto seconds = [&] { return std::chrono::duration<double>(Clock::now() - started).count(); };
        std::string identity;
        std::optional<Unit> unit;
        json line{{"slot", slot + 1}, {"device", device}, {"image", m_options.image.string()},
                  {"image_sha256", m_image.image_sha256},
                  {"commit", m_commits.size() == 1 ? json(m_commits.front()) : json(nullptr)}};
        auto fail = [&](const std::string& why, const std::string& cause) {
            ++m_failed;
            update(slot, [&](SlotStatus& s) {
                s.state = SlotState::Failed;
                s.message = why + " — remove the card";
            });
            bool interrupted = g_cancellable_is_cancelled(m_cancellable);
            line["result"] = interrupted ? "interrupted" : "failed";
            line["cause"] = interrupted ? "interrupted" : cause;
            line["error"] = why;
        };
        try {
            identity = card_identity(device);
            line["card"] = identity;
            if (std::string reader = reader_identity(device); !reader.empty())
                line["reader"] = reader;
            update(slot, [&](SlotStatus& s) {
                s = SlotStatus{s.slot, s.device};
                s.card = identity;
            });
            DiskInfo disk = describe_disk(device);
            // The name must still lead to the slot's device: a reader
            // unplugged and another disk plugged in may take its name.
            if (disk.devno != m_slot_devno[slot])
                throw Error(device + " now names another device than when the station started (a reader unplugged "
                                     "and plugged back?); nothing was written; restart the station");
            line["size"] = disk.size;
            if (medium.diskseq && disk.diskseq && disk.diskseq != medium.diskseq)
                throw Error("the card changed while it was looked at; take it out and put it back");
            check_safe_to_write(disk, 0, m_options.force);
            if (disk.size < m_image.map.image_size)
                throw Error("too small: " + std::to_string(disk.size >> 20) + " MiB, the image needs "
                            + std::to_string((m_image.map.image_size + (1 << 20) - 1) >> 20)
                            + " MiB; nothing was written");
            // Only an identity of the card itself (an SD card's CID, a
            // loop device's file) says the card was seen before.
            std::optional<std::string> done_before = m_records->done_unit(identity, m_image.image_sha256);
            bool card_known = identity.rfind("cid:", 0) == 0 || identity.rfind("file:", 0) == 0;
            if (!m_options.rewrite && card_known && done_before) {
                update(slot, [&](SlotStatus& s) {
                    s.state = SlotState::Done;
                    s.unit = *done_before;
                    s.message = "already written with this image"
                                + (done_before->empty() ? "" : " (unit " + *done_before + ")")
                                + "; not written again — remove the card";
                });
                notice("slot " + std::to_string(slot + 1) + ": " + identity
                       + " was already written with this image; not written again (--rewrite writes it)");
                line["result"] = "already-done";
                if (!done_before->empty())
                    line["unit"] = *done_before;
            } else {
                write_and_provision(slot, disk, identity, unit, line);
            }
        } catch (const std::exception& e) {
            // A card pulled out mid-write makes the write fail; say so first.
            Medium now = look_at(device);
            bool taken_out = now.size == 0 || (medium.diskseq && now.diskseq && now.diskseq != medium.diskseq);
            if (taken_out)
                fail(std::string("the card was taken out before it was done (") + e.what() + ")", "taken-out");
            else if (dynamic_cast<const NoUnitLeft*>(&e))
                fail(e.what(), "no-unit-left");
            else
                fail(e.what(), failure_phase(slot));
        }
        line["time"] = text::utc_now();
        line["seconds"] = seconds();
        try {
            // The card's record and its unit's end, together.
            m_records->record_card(line, unit);
        } catch (const std::exception& e) {
            // A factory that cannot record its cards stops taking them. A
            // good card whose record is missing is not shown as good: the
            // records may say its unit failed, while the card carries it.
            notice(std::string("station: ") + e.what() + "; stopping");
            g_cancellable_cancel(m_cancellable);
            if (line.value("result", "") == "ok") {
                --m_ok;
                ++m_failed;
                line["result"] = "failed";
                update(slot, [&](SlotStatus& s) {
                    s.state = SlotState::Failed;
                    s.message = std::string("written") + (unit ? " with unit " + unit->serial : "")
                                + ", but it could not be recorded (" + e.what() + ") — set this card aside";
                });
            }
        }
        long left = -1;
        if (m_records->gives_units()) {
            try {
                left = static_cast<long>(m_records->units_left());
            } catch (const std::exception&) {
                // Counting fails no card; broken() below stops the station.
            }
        }
        update(slot, [&](SlotStatus& s) {
            s.result = line.value("result", "failed");
            s.units_left = left;
        });
        if (m_records->broken()) {
            notice("station: " + m_records->units_source()
                   + " can no longer record the units given; stopping (no unit is given out without it)");
            g_cancellable_cancel(m_cancellable);
        }
    }

    // The phase a slot was in when its card failed, as the records count it.
    std::string failure_phase(size_t slot)
    {
        std::lock_guard lock(m_status_mutex);
        switch (m_status[slot].state) {
        case SlotState::Writing: return "write";
        case SlotState::Verifying: return "verify";
        case SlotState::Provisioning: return "provision";
        default: return "check";
        }
    }

    // Writes, reads back and provisions the checked card `disk`; throws when
    // any of it fails. `unit` is set once a unit is given to the card.
    void write_and_provision(size_t slot, const DiskInfo& disk, const std::string& identity, std::optional<Unit>& unit,
                             json& line)
    {
        auto target = Target::open_device(disk);
        target->verify_identity(disk);
        update(slot, [](SlotStatus& s) { s.state = SlotState::Writing; });
        WriteOptions write;
        write.verify = true;
        write.progress = [&](const CardProgress& p) {
            update(slot, [&](SlotStatus& s) {
                if (p.phase == CardPhase::Writing || p.phase == CardPhase::Verifying) {
                    SlotState state = p.phase == CardPhase::Writing ? SlotState::Writing : SlotState::Verifying;
                    if (state != s.state)
                        s.phase_started = p.seconds;
                    s.state = state;
                    s.done = p.done;
                    s.total = p.total;
                    s.seconds = p.seconds;
                }
            });
        };
        CardResult result;
        result.disk = disk;
        write_one_card(slot, *target, m_image, write, m_cancellable, result);
        line["bytes_written"] = result.bytes_written;
        line["verified"] = result.verified;
        if (!result.ok())
            throw Error(result.error);

        if (m_records->gives_units()) {
            update(slot, [](SlotStatus& s) { s.state = SlotState::Provisioning; });
            if (m_records->units_left() == 0)
                throw NoUnitLeft("no unit left in " + m_records->units_source()
                                 + ": the card is written but has no identity");
            // Through the open device: the card provisioned is the one
            // written. A card that cannot take a unit costs none.
            ProvisionTarget where =
                find_provision_target("/proc/self/fd/" + std::to_string(target->fd()), disk.path);
            UnitRequest request{slot + 1, identity, m_options.image.string(), m_image.image_sha256,
                                m_commits.size() == 1 ? m_commits.front() : ""};
            unit = m_records->take(request);
            if (!unit)
                throw NoUnitLeft("no unit left in " + m_records->units_source()
                                 + ": the card is written but has no identity");
            line["unit"] = unit->serial;
            update(slot, [&](SlotStatus& s) { s.unit = unit->serial; });
            Provisioned provisioned = provision_card(where, *unit);
            target->verify_identity(disk);
            line["provisioned"] = provisioned.files;
            if (!provisioned.uboot_variables.empty())
                line["uboot_env"] = provisioned.uboot_variables;
        }
        ++m_ok;
        line["result"] = "ok";
        update(slot, [&](SlotStatus& s) {
            s.state = SlotState::Done;
            s.seconds = result.seconds;
            s.message = "done — remove the card";
        });
    }

    const StationOptions& m_options;
    GCancellable* m_cancellable;
    PreparedImage m_image;
    std::vector<std::string> m_commits;
    StationRecords* m_records = nullptr;
    std::mutex m_status_mutex;
    std::vector<SlotStatus> m_status;
    std::vector<dev_t> m_slot_devno; // each slot's device as named at start
    std::atomic<size_t> m_ok{0}, m_failed{0};
    std::mutex m_count_mutex;
    size_t m_in_hand = 0; // cards being handled, counted for --cards
};

} // namespace

const char* slot_state_name(SlotState state)
{
    switch (state) {
    case SlotState::Empty: return "empty";
    case SlotState::Writing: return "writing";
    case SlotState::Verifying: return "verifying";
    case SlotState::Provisioning: return "provisioning";
    case SlotState::Done: return "done";
    case SlotState::Failed: return "failed";
    }
    return "?";
}

std::string card_identity(const std::string& device)
{
    auto sys = sysfs_dir_of(device);
    if (!sys)
        return "";
    if (std::string cid = sysfs_read(*sys / "device/cid"); !cid.empty())
        return "cid:" + cid;
    if (std::string backing = sysfs_read(*sys / "loop/backing_file"); !backing.empty())
        return "file:" + backing;
    return "diskseq:" + sysfs_read(*sys / "diskseq");
}

std::string reader_identity(const std::string& device)
{
    auto sys = sysfs_dir_of(device);
    if (!sys)
        return "";
    if (std::string serial = sysfs_read(*sys / "device/serial"); !serial.empty())
        return "serial:" + serial;
    if (std::string wwid = sysfs_read(*sys / "device/wwid"); !wwid.empty())
        return "wwid:" + wwid;
    return "";
}

StationReport run_station(const StationOptions& options, GCancellable* cancellable)
{
    return Station(options, cancellable).run();
}

} // namespace treeflash::flasher
