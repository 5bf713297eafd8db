#include "flasher/write/write.hpp"

#include "common/error.hpp"
#include "common/named_file.hpp"
#include "common/fs.hpp"
#include "common/process.hpp"
#include "common/sha256.hpp"
#include "flasher/disk/format.hpp"
#include "flasher/inspect/image_commits.hpp"
#include "flasher/disk/partition.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <gio/gio.h>
#include <linux/fs.h>
#include <memory>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t chunk_bytes = 4 << 20;          // one write, one read-back
constexpr uint64_t sync_every_bytes = 128 << 20; // flush the card's cache this often

struct FreeDeleter {
    void operator()(char* p) const { std::free(p); }
};

// Memory aligned for O_DIRECT.
std::unique_ptr<char, FreeDeleter> aligned_buffer(size_t size)
{
    void* p = nullptr;
    if (::posix_memalign(&p, 4096, size) != 0)
        throw Error("out of memory for a write buffer");
    return std::unique_ptr<char, FreeDeleter>(static_cast<char*>(p));
}

UniqueFd reopen(int fd, int flags, const std::string& what)
{
    std::string self = "/proc/self/fd/" + std::to_string(fd);
    UniqueFd reopened(::open(self.c_str(), flags | O_CLOEXEC));
    if (!reopened)
        throw_errno("open " + what);
    return reopened;
}

std::string byte_span(uint64_t from, uint64_t to)
{
    return "bytes " + std::to_string(from) + "-" + std::to_string(to - 1);
}

// One card, on its own thread: write, read back, grow.
class CardWriter {
public:
    CardWriter(size_t index, Target& target, const PreparedImage& image, const WriteOptions& options,
               GCancellable* cancellable, CardResult& result)
        : m_index(index), m_target(target), m_image(image), m_options(options), m_cancellable(cancellable),
          m_result(result), m_what(result.disk.path)
    {
    }

    void run() noexcept
    {
        m_start = Clock::now();
        try {
            write_image();
            if (m_options.verify) {
                verify_image();
                m_result.verified = true;
            }
            if (m_options.grow)
                grow();
            report(CardPhase::Done, 0, 0);
        } catch (const Cancelled&) {
            m_result.error = !m_head_written ? "interrupted; its first MiB was not written, so it keeps its old partition table"
                             : m_result.verified ? "interrupted after it was written and verified, before --grow: the card is "
                                                   "good at the image's size (grow it with treeflash write --grow again, or "
                                                   "resize2fs)"
                                                 : "interrupted after writing (not verified)";
            report(CardPhase::Failed, 0, 0);
        } catch (const std::exception& e) {
            m_result.error = e.what();
            report(CardPhase::Failed, 0, 0);
        } catch (...) {
            m_result.error = "unknown error";
            report(CardPhase::Failed, 0, 0);
        }
        m_result.seconds = elapsed();
    }

private:
    double elapsed() const { return std::chrono::duration<double>(Clock::now() - m_start).count(); }

    void report(CardPhase phase, uint64_t done, uint64_t total) noexcept
    {
        try {
            if (m_options.progress)
                m_options.progress({m_index, phase, done, total, elapsed()});
        } catch (...) {
            // Progress is for people; a failure to draw it fails no card.
        }
    }

    void check_cancelled() const
    {
        if (g_cancellable_is_cancelled(m_cancellable))
            throw Cancelled();
    }

    void write_image()
    {
        if (::ioctl(m_target.fd(), BLKSSZGET, &m_sector) != 0 || m_sector <= 0)
            m_sector = 512;
        m_direct = reopen(m_target.fd(), O_WRONLY | O_DIRECT, m_what + " for direct writes");
        m_buffer = aligned_buffer(chunk_bytes);
        const Bmap& map = m_image.map;
        const uint64_t total = map.mapped_bytes();
        report(CardPhase::Writing, 0, total);
        // Everything past the first MiB, then the first MiB.
        for (bool head : {false, true}) {
            for (const auto& range : map.ranges) {
                auto [from, to] = map.bytes(range);
                if (head) {
                    to = std::min(to, held_back_bytes);
                } else {
                    from = std::max(from, held_back_bytes);
                }
                for (uint64_t pos = from; pos < to;) {
                    if (!head) // the first MiB, once begun, is finished: never half a table
                        check_cancelled();
                    size_t n = static_cast<size_t>(std::min<uint64_t>(chunk_bytes, to - pos));
                    fs::read_at(m_image.fd.get(), m_buffer.get(), n, pos, "the image");
                    bool aligned = pos % static_cast<uint64_t>(m_sector) == 0 && n % static_cast<size_t>(m_sector) == 0;
                    fs::write_at(aligned ? m_direct.get() : m_target.fd(), m_buffer.get(), n, pos, m_what);
                    pos += n;
                    m_result.bytes_written += n;
                    m_unsynced += n;
                    if (m_unsynced >= sync_every_bytes)
                        sync();
                    report(CardPhase::Writing, m_result.bytes_written, total);
                }
            }
            if (!head) {
                sync(); // the rest is on the card before its first MiB goes on
                check_cancelled();
                if (image_changed(m_image))
                    throw Error(m_image.path.string() + " changed while it was written; its first MiB was not written");
            }
        }
        sync();
        m_head_written = true;
        // The kernel still shows the card's old partitions.
        show_new_partitions(m_target.fd(), m_target.device());
    }

    void sync()
    {
        if (::fdatasync(m_target.fd()) != 0)
            throw_errno("flush " + m_what);
        m_unsynced = 0;
    }

    // Bytes [from, to) of the card, read with O_DIRECT in sector-aligned
    // pieces, handed to `use` chunk by chunk.
    template <typename Use>
    void read_back(int direct, uint64_t from, uint64_t to, Use use)
    {
        const uint64_t sector = static_cast<uint64_t>(m_sector);
        for (uint64_t pos = from; pos < to;) {
            check_cancelled();
            uint64_t aligned_from = pos / sector * sector;
            uint64_t aligned_to = std::min(aligned_from + chunk_bytes, (to + sector - 1) / sector * sector);
            fs::read_at(direct, m_buffer.get(), static_cast<size_t>(aligned_to - aligned_from), aligned_from, m_what);
            uint64_t end = std::min(to, aligned_to);
            use(m_buffer.get() + (pos - aligned_from), pos, end);
            pos = end;
        }
    }

    void verify_image()
    {
        const Bmap& map = m_image.map;
        const uint64_t total = map.mapped_bytes();
        report(CardPhase::Verifying, 0, total);
        // Nothing the kernel kept of our writes may answer the reads.
        ::posix_fadvise(m_target.fd(), 0, 0, POSIX_FADV_DONTNEED);
        UniqueFd direct = reopen(m_target.fd(), O_RDONLY | O_DIRECT, m_what + " for reading back");
        uint64_t done = 0;
        for (const auto& range : map.ranges) {
            auto [from, to] = map.bytes(range);
            Sha256 sum;
            read_back(direct.get(), from, to, [&](const char* data, uint64_t a, uint64_t b) {
                sum.update(data, b - a);
                done += b - a;
                report(CardPhase::Verifying, done, total);
            });
            if (sum.hex() != range.sha256)
                throw Error(mismatch(direct.get(), range));
        }
    }

    // Names the bytes of `range` that read back differently from the image.
    std::string mismatch(int direct, const BmapRange& range)
    {
        auto [from, to] = m_image.map.bytes(range);
        auto source = aligned_buffer(chunk_bytes);
        uint64_t first = to, last = from;
        read_back(direct, from, to, [&](const char* data, uint64_t a, uint64_t b) {
            fs::read_at(m_image.fd.get(), source.get(), static_cast<size_t>(b - a), a, "the image");
            for (uint64_t i = 0; i < b - a; ++i)
                if (data[i] != source.get()[i]) {
                    first = std::min(first, a + i);
                    last = std::max(last, a + i);
                }
        });
        std::string where = first < to ? byte_span(first, last + 1) : "the range";
        return "verification failed: " + where + " read back differently from what was written (bmap blocks "
               + std::to_string(range.first) + "-" + std::to_string(range.last) + ", " + byte_span(from, to)
               + "); a bad or fake-capacity card?";
    }

    void grow()
    {
        report(CardPhase::Growing, 0, 0);
        check_cancelled();
        const std::string device = m_target.device();
        PartitionTable table = read_partition_table(device);
        const PartitionEntry* last = nullptr;
        for (const auto& entry : table.partitions)
            if (!last || entry.start + entry.size > last->start + last->size)
                last = &entry;
        if (!last)
            throw Error("--grow: the image has no partitions");
        FilesystemInfo fs = probe_filesystem(device, last->start, last->size);
        if (fs.type != "ext4" && fs.type != "ext3" && fs.type != "ext2")
            throw Error("--grow: the last partition (" + std::to_string(last->number) + ") holds "
                        + (fs.type.empty() ? "no file system" : fs.type) + ", not ext4");
        PartitionEntry grown = extend_last_partition(m_target.fd(), device);
        // e2fsck and resize2fs claim the partition: the whole disk must be let go.
        m_target.release_exclusive_claim();
        std::string node = partition_node(device, grown.number);
        // From here on the grow runs to its end, Ctrl-C or not: a resize2fs
        // cut short leaves the file system half-grown ("clean with errors").
        // It takes seconds; the card is then whole, and the run still ends
        // as interrupted.
        ProcessOptions process;
        process.new_process_group = true;
        ProcessResult check = run_process({"e2fsck", "-f", "-p", node}, process);
        if (check.exit_code != 0 && check.exit_code != 1)
            throw Error("--grow: e2fsck " + node + " found problems it did not fix: " + check.out + check.err);
        run_checked({"resize2fs", node}, process);
        m_result.grown_to = grown.size;
    }

    size_t m_index;
    Target& m_target;
    const PreparedImage& m_image;
    const WriteOptions& m_options;
    GCancellable* m_cancellable;
    CardResult& m_result;
    std::string m_what;
    Clock::time_point m_start;
    UniqueFd m_direct;
    std::unique_ptr<char, FreeDeleter> m_buffer;
    int m_sector = 512;
    uint64_t m_unsynced = 0;
    bool m_head_written = false;
};

} // namespace

const char* phase_name(CardPhase phase)
{
    switch (phase) {
    case CardPhase::Writing: return "writing";
    case CardPhase::Verifying: return "verifying";
    case CardPhase::Growing: return "growing";
    case CardPhase::Done: return "done";
    case CardPhase::Failed: return "failed";
    }
    return "?";
}

void write_one_card(size_t index, Target& target, const PreparedImage& image, const WriteOptions& options,
                    GCancellable* cancellable, CardResult& result)
{
    CardWriter(index, target, image, options, cancellable, result).run();
}

bool WriteReport::all_ok() const
{
    if (cancelled || cards.empty())
        return false;
    for (const auto& card : cards)
        if (!card.ok())
            return false;
    return true;
}

WriteReport write_cards(const WriteOptions& options, GCancellable* cancellable)
{
    if (options.devices.empty())
        throw Error("name at least one device to write");
    auto notice = [&](const std::string& text) {
        if (options.notice)
            options.notice(text);
    };

    // Every device first: an unsafe one stops everything before the image is even read.
    WriteReport report;
    report.cards.resize(options.devices.size());
    for (size_t i = 0; i < options.devices.size(); ++i) {
        DiskInfo disk = describe_disk(options.devices[i]);
        for (size_t j = 0; j < i; ++j)
            if (report.cards[j].disk.devno == disk.devno)
                throw Error(disk.path + " is named twice (as " + report.cards[j].disk.path + " too)");
        check_safe_to_write(disk, 0, options.force);
        report.cards[i].disk = disk;
    }

    ImageOptions image_options = options.image_options;
    for (const auto& card : report.cards)
        image_options.max_size = std::max(image_options.max_size, card.disk.size);
    PreparedImage image = prepare_image(options.image, image_options, cancellable);
    for (const auto& output : options.outputs)
        for (const auto& input : image.inputs)
            if (named::same_file(output.st, input))
                throw Error(output.what + " is a file this write reads (the image, its bmap or SHA256SUMS); "
                            "name another file; nothing was written");
    report.image = options.image.string();
    report.image_sha256 = image.image_sha256;
    report.bmap = image.bmap_path;
    report.sums = image.sums_path;
    report.compression = image.compression;
    report.image_size = image.map.image_size;
    report.mapped_bytes = image.map.mapped_bytes();
    try {
        report.commits = deployed_commits("/proc/self/fd/" + std::to_string(image.fd.get()));
    } catch (const std::exception&) {
        // Not an image with a partition table: it holds no commit to name.
    }

    // Cards too small fail alone, untouched; the others are opened and held.
    std::vector<std::unique_ptr<Target>> targets(options.devices.size());
    for (size_t i = 0; i < targets.size(); ++i) {
        CardResult& card = report.cards[i];
        if (card.disk.size < image.map.image_size) {
            card.error = "too small: " + std::to_string(card.disk.size >> 20) + " MiB, the image needs "
                         + std::to_string((image.map.image_size + (1 << 20) - 1) >> 20) + " MiB; nothing was written";
            continue;
        }
        targets[i] = Target::open_device(card.disk);
    }

    std::vector<DiskInfo> disks;
    for (const auto& card : report.cards)
        disks.push_back(card.disk);
    if (options.confirm && !options.confirm(disks, image))
        throw Error("nothing was written");

    // Re-identified after the question: a card swapped meanwhile is not written.
    for (size_t i = 0; i < targets.size(); ++i) {
        if (!targets[i])
            continue;
        try {
            targets[i]->verify_identity(report.cards[i].disk);
        } catch (const std::exception& e) {
            report.cards[i].error = e.what();
            targets[i].reset();
        }
    }

    std::vector<std::unique_ptr<CardWriter>> writers; // outlive the threads
    std::vector<std::thread> threads;
    try {
        for (size_t i = 0; i < targets.size(); ++i) {
            if (!targets[i])
                continue;
            writers.push_back(std::make_unique<CardWriter>(i, *targets[i], image, options, cancellable, report.cards[i]));
            threads.emplace_back([writer = writers.back().get()] { writer->run(); });
        }
    } catch (...) {
        // No thread for a card: stop the others before their first MiB.
        g_cancellable_cancel(cancellable);
        for (auto& thread : threads)
            thread.join();
        throw;
    }
    for (auto& thread : threads)
        thread.join();
    report.cancelled = g_cancellable_is_cancelled(cancellable);
    size_t good = 0;
    for (const auto& card : report.cards)
        good += card.ok();
    notice(std::to_string(good) + " of " + std::to_string(report.cards.size()) + " cards written"
           + (options.verify ? " and verified" : " (not verified)"));
    return report;
}

} // namespace treeflash::flasher
