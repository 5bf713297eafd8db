#include "flasher/disk/partition.hpp"

#include "common/error.hpp"
#include "flasher/disk/handles.hpp"
#include "flasher/disk/target.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <linux/blkpg.h>
#include <regex>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <thread>
#include <unistd.h>
#include <zlib.h>

namespace treeflash::flasher {

namespace {

struct FileClose {
    void operator()(FILE* f) const { std::fclose(f); }
};

std::string fdisk_error(const std::string& what, int rc)
{
    return what + ": " + std::strerror(rc < 0 ? -rc : rc);
}

FdiskContext new_context()
{
    FdiskContext cxt(fdisk_new_context());
    if (!cxt)
        throw Error("fdisk_new_context failed");
    return cxt;
}

// Feeds the script to libfdisk one line at a time, so that an error (and
// each partition) can be traced to its line.
FdiskScript read_script(struct fdisk_context* cxt, const std::filesystem::path& path,
                        std::vector<int>* partition_lines = nullptr)
{
    std::ifstream in(path);
    if (!in)
        throw_errno("read " + path.string());
    FdiskScript script(fdisk_new_script(cxt));
    if (!script)
        throw Error("fdisk_new_script failed");
    size_t partitions_seen = 0;
    std::string line;
    char buffer[4096];
    for (int number = 1; std::getline(in, line); ++number) {
        size_t first = line.find_first_not_of(" \t");
        if (first == std::string::npos || line[first] == '#')
            continue;
        // libfdisk would read "size=-65536" as a huge unsigned number.
        static const std::regex negative(R"((^|[\s,])(start|size)\s*=\s*[-+])");
        if (std::regex_search(line, negative))
            throw Error(path.string() + ":" + std::to_string(number) + ": start= and size= take plain sector counts");
        line += "\n";
        std::unique_ptr<FILE, FileClose> one(fmemopen(line.data(), line.size(), "r"));
        if (!one)
            throw_errno("fmemopen");
        int rc = fdisk_script_read_line(script.get(), one.get(), buffer, sizeof buffer);
        if (rc < 0)
            throw Error(path.string() + ":" + std::to_string(number) + ": " + fdisk_error("cannot parse", rc));
        struct fdisk_table* table = fdisk_script_get_table(script.get());
        size_t now = table ? fdisk_table_get_nents(table) : 0;
        if (now != partitions_seen && partition_lines)
            partition_lines->push_back(number);
        partitions_seen = now;
    }
    return script;
}

// Waits for the device nodes of the partitions in `table` (devtmpfs makes
// them as soon as the kernel knows the partitions; there is no udev here).
void wait_for_nodes(const std::string& device_path, struct fdisk_table* table)
{
    for (size_t i = 0; table && i < fdisk_table_get_nents(table); ++i) {
        struct fdisk_partition* pa = fdisk_table_get_partition(table, i);
        std::string node = partition_node(device_path, static_cast<unsigned>(fdisk_partition_get_partno(pa)) + 1);
        for (int waited = 0; ::access(node.c_str(), F_OK) != 0; ++waited) {
            if (waited > 250)
                throw Error(node + " did not appear");
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
    }
}

// The GPT header as the UEFI specification lays it out, little endian.
uint32_t le32(const unsigned char* p)
{
    return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16
           | static_cast<uint32_t>(p[3]) << 24;
}

uint64_t le64(const unsigned char* p)
{
    return static_cast<uint64_t>(le32(p)) | static_cast<uint64_t>(le32(p + 4)) << 32;
}

constexpr uint32_t gpt_entry_size = 128; // the only size libfdisk reads

// The CRC32 of `bytes` bytes at `offset` of `fd`, read in pieces: a GPT's
// entry array may be larger than one buffer. False when unreadable.
bool crc32_of_range(int fd, uint64_t offset, uint64_t bytes, uint32_t& crc)
{
    std::vector<unsigned char> buffer(64 << 10);
    uLong sum = ::crc32(0L, Z_NULL, 0);
    while (bytes > 0) {
        size_t want = static_cast<size_t>(std::min<uint64_t>(bytes, buffer.size()));
        ssize_t got = ::pread(fd, buffer.data(), want, static_cast<off_t>(offset));
        if (got <= 0)
            return false;
        sum = ::crc32(sum, buffer.data(), static_cast<uInt>(got));
        offset += static_cast<uint64_t>(got);
        bytes -= static_cast<uint64_t>(got);
    }
    crc = static_cast<uint32_t>(sum);
    return true;
}

// Why the GPT header at `lba` is unusable, in words; "" when it passes the
// checks the UEFI specification asks for. Only used to explain a GPT
// libfdisk refused, so every field is hostile and every sum is checked.
std::string gpt_header_problem(int fd, uint64_t lba, uint64_t sector, uint64_t nsectors)
{
    std::vector<unsigned char> h(sector);
    if (sector < 92 || lba >= nsectors
        || ::pread(fd, h.data(), h.size(), static_cast<off_t>(lba * sector)) != static_cast<ssize_t>(h.size()))
        return "unreadable";
    if (std::memcmp(h.data(), "EFI PART", 8) != 0)
        return "no GPT signature";
    uint32_t header_size = le32(&h[12]);
    if (header_size < 92 || header_size > sector)
        return "header size " + std::to_string(header_size) + " out of range (92 to " + std::to_string(sector) + ")";
    uint32_t stored_crc = le32(&h[16]);
    std::fill(&h[16], &h[20], 0);
    if (static_cast<uint32_t>(::crc32(::crc32(0L, Z_NULL, 0), h.data(), header_size)) != stored_crc)
        return "header checksum does not match";
    if (le64(&h[24]) != lba)
        return "header says it is at LBA " + std::to_string(le64(&h[24]));
    uint64_t first_usable = le64(&h[40]), last_usable = le64(&h[48]), entries_lba = le64(&h[72]);
    uint32_t count = le32(&h[80]), entry_size = le32(&h[84]);
    if (entry_size != gpt_entry_size)
        return "entry size " + std::to_string(entry_size) + " is not " + std::to_string(gpt_entry_size);
    // 2^32 entries of 128 bytes fit in 64 bits; the sector sums below may not.
    uint64_t array_bytes = uint64_t {count} * entry_size;
    uint64_t array_end = 0;
    if (count == 0 || entries_lba < 2 || __builtin_add_overflow(entries_lba, (array_bytes + sector - 1) / sector, &array_end)
        || array_end > nsectors || (array_end > first_usable && entries_lba <= last_usable))
        return "entry count " + std::to_string(count) + " out of range: " + std::to_string(count) + " entries of "
               + std::to_string(entry_size) + " bytes at LBA " + std::to_string(entries_lba)
               + " do not fit on the disk outside its usable sectors " + std::to_string(first_usable) + " to "
               + std::to_string(last_usable);
    uint32_t entries_crc = 0;
    if (!crc32_of_range(fd, entries_lba * sector, array_bytes, entries_crc))
        return "entry array unreadable";
    if (entries_crc != le32(&h[88]))
        return "entry array checksum does not match";
    return "";
}

// libfdisk, finding neither GPT header usable, falls back to the
// protective MBR and reports a "dos" table of one 0xee partition over the
// disk: a misreport. An MBR that announces a GPT means the card has one,
// so the table is refused, saying what is wrong with both headers.
void refuse_unusable_gpt(struct fdisk_context* cxt, const PartitionTable& table, const std::string& path)
{
    if (table.label != "dos"
        || std::none_of(table.partitions.begin(), table.partitions.end(), [](const PartitionEntry& e) { return e.type == "ee"; }))
        return;
    int fd = fdisk_get_devfd(cxt);
    uint64_t sector = fdisk_get_sector_size(cxt), nsectors = fdisk_get_nsectors(cxt);
    std::string primary = gpt_header_problem(fd, 1, sector, nsectors);
    std::string backup = nsectors ? gpt_header_problem(fd, nsectors - 1, sector, nsectors) : "unreadable";
    throw Error(path + ": its protective MBR announces a GPT, but the GPT is invalid: primary header (LBA 1): "
                + (primary.empty() ? "refused by libfdisk" : primary) + "; backup header (LBA "
                + std::to_string(nsectors ? nsectors - 1 : 0) + "): " + (backup.empty() ? "refused by libfdisk" : backup));
}

// A table entry in bytes. A hostile table may name sectors whose byte
// offsets do not fit in 64 bits (sector 2^63-1 times 512 wraps to a small
// number): such an entry lies far past the end of any disk, so the table
// is refused with the entry's own figures, in sectors.
void entry_bytes(uint64_t start, uint64_t size, uint64_t sector, uint64_t nsectors, unsigned number,
                 const std::string& path, PartitionEntry& entry)
{
    uint64_t end = 0;
    if (__builtin_mul_overflow(start, sector, &entry.start) || __builtin_mul_overflow(size, sector, &entry.size)
        || __builtin_add_overflow(entry.start, entry.size, &end))
        throw Error(path + ": partition " + std::to_string(number) + " starts at sector " + std::to_string(start)
                    + " and holds " + std::to_string(size) + " sectors of " + std::to_string(sector)
                    + " bytes: it ends past 2^64 bytes, far outside the disk (" + std::to_string(nsectors)
                    + " sectors); the partition table is corrupt");
}

} // namespace

uint64_t PartitionLayout::minimum_disk_bytes(uint64_t growing_bytes) const
{
    uint64_t end = 0;
    for (const auto& p : partitions) {
        uint64_t bytes = p.size ? p.size * sector_size : growing_bytes;
        end = std::max(end, p.start * sector_size + bytes);
    }
    // Room for a GPT backup header, and alignment.
    return (end + (1 << 20) - 1) / (1 << 20) * (1 << 20) + (label == "gpt" ? (1 << 20) : 0);
}

uint64_t PartitionLayout::first_partition_offset() const
{
    uint64_t first = UINT64_MAX;
    for (const auto& p : partitions)
        first = std::min(first, p.start * sector_size);
    return first;
}

PartitionLayout read_partition_script(const std::filesystem::path& path)
{
    FdiskContext cxt = new_context();
    std::vector<int> lines;
    FdiskScript script = read_script(cxt.get(), path, &lines);
    PartitionLayout layout;
    const char* label = fdisk_script_get_header(script.get(), "label");
    if (!label)
        throw Error(path.string() + ": no 'label:' header (dos or gpt)");
    layout.label = label;
    if (layout.label != "dos" && layout.label != "gpt")
        throw Error(path.string() + ": label '" + layout.label + "': dos or gpt");
    const char* unit = fdisk_script_get_header(script.get(), "unit");
    if (unit && std::string(unit) != "sectors")
        throw Error(path.string() + ": unit '" + unit + "': only sectors");
    struct fdisk_table* table = fdisk_script_get_table(script.get());
    size_t count = table ? fdisk_table_get_nents(table) : 0;
    if (count == 0)
        throw Error(path.string() + ": no partitions");
    for (size_t i = 0; i < count; ++i) {
        struct fdisk_partition* pa = fdisk_table_get_partition(table, i);
        std::string where = path.string() + ":" + std::to_string(i < lines.size() ? lines[i] : 0);
        if (!fdisk_partition_has_start(pa))
            throw Error(where + ": every partition needs an explicit start= (one without it may land before an earlier one)");
        PartitionSpec spec;
        spec.number = fdisk_partition_has_partno(pa) ? static_cast<unsigned>(fdisk_partition_get_partno(pa)) + 1
                                                     : static_cast<unsigned>(i) + 1;
        spec.start = fdisk_partition_get_start(pa);
        spec.size = fdisk_partition_has_size(pa) ? fdisk_partition_get_size(pa) : 0;
        if (!spec.size && i + 1 != count)
            throw Error(where + ": only the last partition may omit size=");
        // An MBR entry holds 32-bit sector numbers.
        if (layout.label == "dos" && (spec.start >= (1ull << 32) || spec.start + spec.size > (1ull << 32)))
            throw Error(where + ": an MBR partition must end within 2 TiB (2^32 sectors)");
        spec.bootable = fdisk_partition_is_bootable(pa) == 1;
        if (struct fdisk_parttype* type = fdisk_partition_get_type(pa)) {
            const char* name = fdisk_parttype_get_string(type);
            spec.type = name ? name : std::to_string(fdisk_parttype_get_code(type));
            if (layout.label == "dos") {
                char hex[8];
                std::snprintf(hex, sizeof hex, "%x", fdisk_parttype_get_code(type));
                spec.type = hex;
            }
        }
        for (const auto& other : layout.partitions) {
            uint64_t other_end = other.size ? other.start + other.size : UINT64_MAX;
            uint64_t end = spec.size ? spec.start + spec.size : UINT64_MAX;
            if (spec.start < other_end && other.start < end)
                throw Error(where + ": overlaps partition " + std::to_string(other.number));
        }
        layout.partitions.push_back(spec);
    }
    return layout;
}

std::string partition_node(const std::string& disk, unsigned number)
{
    // libfdisk knows the kernel's naming (sdb3, mmcblk0p3, loop0p3, ...);
    // the disk must be named by its kernel name, not a /dev/disk/by-* link.
    std::unique_ptr<char, decltype(&free)> name(fdisk_partname(disk.c_str(), number), free);
    if (!name)
        throw Error("no partition name for " + disk + " " + std::to_string(number));
    return name.get();
}

void write_partition_table(int fd, const std::string& device_path, const std::filesystem::path& script_path,
                           bool fresh_zeroed, const std::string& disk_id)
{
    FdiskContext cxt = new_context();
    int rc = fdisk_assign_device_by_fd(cxt.get(), fd, device_path.c_str(), 0);
    if (rc != 0)
        throw Error(fdisk_error("fdisk_assign_device " + device_path, rc));
    FdiskScript script = read_script(cxt.get(), script_path);
    // What the kernel should drop: the partitions of the old table, if any.
    struct fdisk_table* old_raw = nullptr;
    if (fdisk_has_label(cxt.get()) != 1 || fdisk_get_partitions(cxt.get(), &old_raw) != 0)
        old_raw = fdisk_new_table();
    FdiskTable old_table(old_raw);
    fdisk_enable_wipe(cxt.get(), fresh_zeroed ? 0 : 1); // the wipe probes the whole disk for signatures
    if ((rc = fdisk_apply_script(cxt.get(), script.get())) != 0)
        throw Error(fdisk_error("fdisk_apply_script " + script_path.string(), rc));
    if (!disk_id.empty() && (rc = fdisk_set_disklabel_id_from_string(cxt.get(), disk_id.c_str())) != 0)
        throw Error(fdisk_error("set the disk identifier " + disk_id, rc));
    if ((rc = fdisk_write_disklabel(cxt.get())) != 0)
        throw Error(fdisk_error("fdisk_write_disklabel", rc));
    if (::fsync(fd) != 0)
        throw_errno("fsync " + device_path);

    // The kernel's view, changed partition by partition (BLKPG, as partx
    // does: a whole re-read is refused while any partition is open).
    struct stat st {};
    if (::fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
        if ((rc = fdisk_reread_changes(cxt.get(), old_table.get())) != 0)
            throw Error(fdisk_error("tell the kernel about the new partitions of " + device_path, rc));
        struct fdisk_table* raw = nullptr;
        if ((rc = fdisk_get_partitions(cxt.get(), &raw)) != 0)
            throw Error(fdisk_error("list the new partitions", rc));
        FdiskTable table(raw);
        wait_for_nodes(device_path, table.get());
    }
    fdisk_deassign_device(cxt.get(), 1);
}

PartitionTable read_partition_table(const std::string& path)
{
    FdiskContext cxt = new_context();
    int rc = fdisk_assign_device(cxt.get(), path.c_str(), 1);
    if (rc != 0)
        throw Error(fdisk_error("read partition table of " + path, rc));
    PartitionTable table;
    if (!fdisk_has_label(cxt.get()))
        return table;
    table.label = fdisk_label_get_name(fdisk_get_label(cxt.get(), nullptr));
    char* id = nullptr;
    if (fdisk_get_disklabel_id(cxt.get(), &id) == 0 && id) {
        table.id = id;
        free(id);
    }
    struct fdisk_table* raw = nullptr;
    if ((rc = fdisk_get_partitions(cxt.get(), &raw)) != 0)
        throw Error(fdisk_error("list partitions of " + path, rc));
    FdiskTable entries(raw);
    uint64_t sector = fdisk_get_sector_size(cxt.get());
    for (size_t i = 0; i < fdisk_table_get_nents(entries.get()); ++i) {
        struct fdisk_partition* pa = fdisk_table_get_partition(entries.get(), i);
        PartitionEntry entry;
        entry.number = static_cast<unsigned>(fdisk_partition_get_partno(pa)) + 1;
        entry_bytes(fdisk_partition_get_start(pa), fdisk_partition_get_size(pa), sector, fdisk_get_nsectors(cxt.get()),
                    entry.number, path, entry);
        entry.bootable = fdisk_partition_is_bootable(pa) == 1;
        if (struct fdisk_parttype* type = fdisk_partition_get_type(pa)) {
            if (table.label == "dos") {
                char hex[8];
                std::snprintf(hex, sizeof hex, "%x", fdisk_parttype_get_code(type));
                entry.type = hex;
            } else if (const char* s = fdisk_parttype_get_string(type)) {
                entry.type = s;
            }
        }
        table.partitions.push_back(entry);
    }
    refuse_unusable_gpt(cxt.get(), table, path);
    fdisk_deassign_device(cxt.get(), 1);
    return table;
}

void show_new_partitions(int fd, const std::string& device_path)
{
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISBLK(st.st_mode))
        return;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(sysfs_block_dir(st.st_rdev), ec)) {
        std::ifstream number_file(entry.path() / "partition");
        int number = 0;
        if (!(number_file >> number) || number <= 0)
            continue;
        struct blkpg_partition part {};
        part.pno = number;
        struct blkpg_ioctl_arg arg {};
        arg.op = BLKPG_DEL_PARTITION;
        arg.datalen = sizeof part;
        arg.data = &part;
        if (::ioctl(fd, BLKPG, &arg) != 0 && errno != ENXIO)
            throw_errno("drop the old partition " + std::to_string(number) + " of " + device_path);
    }
    FdiskContext cxt = new_context();
    int rc = fdisk_assign_device_by_fd(cxt.get(), fd, device_path.c_str(), 1);
    if (rc != 0)
        throw Error(fdisk_error("read the new partition table of " + device_path, rc));
    if (fdisk_has_label(cxt.get()) != 1)
        return;
    struct fdisk_table* raw = nullptr;
    if ((rc = fdisk_get_partitions(cxt.get(), &raw)) != 0)
        throw Error(fdisk_error("list the new partitions of " + device_path, rc));
    FdiskTable table(raw);
    unsigned long sector = fdisk_get_sector_size(cxt.get());
    for (size_t i = 0; i < fdisk_table_get_nents(table.get()); ++i) {
        struct fdisk_partition* pa = fdisk_table_get_partition(table.get(), i);
        struct blkpg_partition part {};
        part.pno = static_cast<int>(fdisk_partition_get_partno(pa)) + 1;
        part.start = static_cast<long long>(fdisk_partition_get_start(pa) * sector);
        part.length = static_cast<long long>(fdisk_partition_get_size(pa) * sector);
        // An MBR extended partition holds the logical ones: the kernel (and
        // partx) shows it as its first 1 KiB only, else they would overlap it.
        if (fdisk_partition_is_container(pa))
            part.length = std::min<long long>(part.length, sector == 512 ? 1024 : static_cast<long long>(sector));
        struct blkpg_ioctl_arg arg {};
        arg.op = BLKPG_ADD_PARTITION;
        arg.datalen = sizeof part;
        arg.data = &part;
        if (::ioctl(fd, BLKPG, &arg) != 0)
            throw_errno("show the new partition " + std::to_string(part.pno) + " of " + device_path);
    }
    wait_for_nodes(device_path, table.get());
    fdisk_deassign_device(cxt.get(), 1);
}

PartitionEntry extend_last_partition(int fd, const std::string& device_path)
{
    FdiskContext cxt = new_context();
    int rc = fdisk_assign_device_by_fd(cxt.get(), fd, device_path.c_str(), 0);
    if (rc != 0)
        throw Error(fdisk_error("fdisk_assign_device " + device_path, rc));
    if (fdisk_has_label(cxt.get()) != 1)
        throw Error(device_path + " has no partition table to grow");
    struct fdisk_table* raw = nullptr;
    if ((rc = fdisk_get_partitions(cxt.get(), &raw)) != 0)
        throw Error(fdisk_error("list partitions of " + device_path, rc));
    FdiskTable old_table(raw);
    struct fdisk_partition* last = nullptr;
    for (size_t i = 0; i < fdisk_table_get_nents(old_table.get()); ++i) {
        struct fdisk_partition* pa = fdisk_table_get_partition(old_table.get(), i);
        if (!last || fdisk_partition_get_end(pa) > fdisk_partition_get_end(last))
            last = pa;
    }
    if (!last)
        throw Error(device_path + " has no partitions to grow");
    if (fdisk_partition_is_nested(last) || fdisk_partition_is_container(last))
        throw Error(device_path + ": the last partition is a logical or extended one; only a primary one grows");
    size_t partno = fdisk_partition_get_partno(last);

    // "size=+", as sfdisk -N reads it: enlarge to all the free space after
    // it. libfdisk offers that resize only through a script line.
    FdiskScript script(fdisk_new_script(cxt.get()));
    if (!script)
        throw Error("fdisk_new_script failed");
    std::string line = "size=+\n";
    char buffer[256];
    std::unique_ptr<FILE, FileClose> one(fmemopen(line.data(), line.size(), "r"));
    if (!one)
        throw_errno("fmemopen");
    if ((rc = fdisk_script_read_line(script.get(), one.get(), buffer, sizeof buffer)) < 0)
        throw Error(fdisk_error("prepare the resize", rc));
    struct fdisk_table* template_table = fdisk_script_get_table(script.get());
    if (!template_table || fdisk_table_get_nents(template_table) != 1)
        throw Error("prepare the resize: libfdisk read no partition");
    rc = fdisk_set_partition(cxt.get(), partno, fdisk_table_get_partition(template_table, 0));
    if (rc != 0)
        throw Error(fdisk_error("grow partition " + std::to_string(partno + 1) + " of " + device_path, rc));
    if ((rc = fdisk_write_disklabel(cxt.get())) != 0)
        throw Error(fdisk_error("fdisk_write_disklabel", rc));
    if (::fsync(fd) != 0)
        throw_errno("fsync " + device_path);

    struct fdisk_table* new_raw = nullptr;
    if ((rc = fdisk_get_partitions(cxt.get(), &new_raw)) != 0)
        throw Error(fdisk_error("list the grown partitions", rc));
    FdiskTable table(new_raw);
    struct stat st {};
    if (::fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
        if ((rc = fdisk_reread_changes(cxt.get(), old_table.get())) != 0)
            throw Error(fdisk_error("tell the kernel about the grown partition of " + device_path, rc));
        wait_for_nodes(device_path, table.get());
    }
    PartitionEntry entry;
    unsigned long sector = fdisk_get_sector_size(cxt.get());
    for (size_t i = 0; i < fdisk_table_get_nents(table.get()); ++i) {
        struct fdisk_partition* pa = fdisk_table_get_partition(table.get(), i);
        if (fdisk_partition_get_partno(pa) != partno)
            continue;
        entry.number = static_cast<unsigned>(partno) + 1;
        entry.start = fdisk_partition_get_start(pa) * sector;
        entry.size = fdisk_partition_get_size(pa) * sector;
    }
    fdisk_deassign_device(cxt.get(), 1);
    return entry;
}

} // namespace treeflash::flasher
