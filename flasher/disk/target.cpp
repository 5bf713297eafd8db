#include "flasher/disk/target.hpp"

#include "common/error.hpp"
#include "common/named_file.hpp"
#include "flasher/disk/handles.hpp"
#include "flasher/write/publish.hpp"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <fcntl.h>
#include <fstream>
#include <stdio.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

namespace treeflash::flasher {

std::string sysfs_read(const std::filesystem::path& path)
{
    std::ifstream in(path);
    std::string value;
    std::getline(in, value);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\n'))
        value.pop_back();
    return value;
}

namespace {

dev_t whole_disk_of(dev_t devno)
{
    dev_t disk = 0;
    if (blkid_devno_to_wholedisk(devno, nullptr, 0, &disk) != 0)
        return devno;
    return disk;
}

std::string size_text(uint64_t bytes)
{
    char text[32];
    std::snprintf(text, sizeof text, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
    return text;
}

struct DiskMount {
    std::string source;
    std::string target;
};

// The mounts of `disk` or one of its partitions, oldest first, by device
// number or, for sources the kernel names by path, by what the path is.
std::vector<DiskMount> mounts_on(dev_t disk)
{
    MntTable mounts(mnt_new_table_from_file("/proc/self/mountinfo"));
    if (!mounts)
        throw Error("cannot read /proc/self/mountinfo");
    MntIter it(mnt_new_iter(MNT_ITER_FORWARD));
    struct libmnt_fs* fs = nullptr;
    std::vector<DiskMount> found;
    while (mnt_table_next_fs(mounts.get(), it.get(), &fs) == 0) {
        dev_t devno = mnt_fs_get_devno(fs);
        const char* source = mnt_fs_get_source(fs);
        bool on_disk = devno && (devno == disk || whole_disk_of(devno) == disk);
        if (!on_disk && source && source[0] == '/') {
            struct stat src {};
            on_disk = ::stat(source, &src) == 0 && S_ISBLK(src.st_mode)
                      && (src.st_rdev == disk || whole_disk_of(src.st_rdev) == disk);
        }
        const char* target = mnt_fs_get_target(fs);
        if (on_disk)
            found.push_back({source ? source : "?", target ? target : "?"});
    }
    return found;
}

void probe_existing_partition(const std::string& node, ExistingPartition& part)
{
    BlkidProbe probe(blkid_new_probe_from_filename(node.c_str()));
    if (!probe)
        return;
    blkid_probe_enable_superblocks(probe.get(), 1);
    blkid_probe_set_superblocks_flags(probe.get(), BLKID_SUBLKS_LABEL | BLKID_SUBLKS_TYPE);
    if (blkid_do_safeprobe(probe.get()) != 0)
        return;
    const char* value = nullptr;
    if (blkid_probe_lookup_value(probe.get(), "TYPE", &value, nullptr) == 0)
        part.fstype = value;
    if (blkid_probe_lookup_value(probe.get(), "LABEL", &value, nullptr) == 0)
        part.label = value;
}

dev_t devno_of(const std::filesystem::path& sys_dir)
{
    std::string text = sysfs_read(sys_dir / "dev");
    auto colon = text.find(':');
    if (colon == std::string::npos)
        return 0;
    try {
        return makedev(std::stoul(text.substr(0, colon)), std::stoul(text.substr(colon + 1)));
    } catch (const std::exception&) {
        return 0;
    }
}

// Opens the block device `devno` (the kernel's `name` for it): through
// /dev/NAME when that node is it, else through a node of our own made for
// the moment, since a device's node may have been deleted (a loop device
// stays attached without one).
UniqueFd open_block_device(dev_t devno, const std::string& name, int flags)
{
    flags |= O_CLOEXEC | O_NONBLOCK;
    UniqueFd fd(::open(("/dev/" + name).c_str(), flags | O_NOFOLLOW));
    struct stat st {};
    if (fd && ::fstat(fd.get(), &st) == 0 && S_ISBLK(st.st_mode) && st.st_rdev == devno)
        return fd;
    int err = fd ? ENOENT : errno;
    if (err == EBUSY)
        return UniqueFd(); // the node is right and the device is claimed: errno says so
    // /dev is the file system that allows device nodes (others are nodev).
    std::string node = "/dev/.treeflash-" + std::to_string(::getpid()) + "-" + name;
    ::unlink(node.c_str());
    if (::mknod(node.c_str(), S_IFBLK | 0600, devno) != 0)
        return UniqueFd();
    fd.reset(::open(node.c_str(), flags | O_NOFOLLOW));
    err = errno;
    ::unlink(node.c_str());
    errno = err;
    return fd;
}

// Removes the nodes open_block_device made for processes that are gone
// (killed between mknod and unlink).
void remove_stale_private_nodes()
{
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator("/dev", ec)) {
        std::string name = entry.path().filename().string();
        if (name.rfind(".treeflash-", 0) != 0)
            continue;
        pid_t pid = static_cast<pid_t>(std::strtol(name.c_str() + 11, nullptr, 10));
        if (pid > 0 && ::kill(pid, 0) != 0 && errno == ESRCH)
            ::unlink(entry.path().c_str());
    }
}

// Every attached loop device with its status: name ("loop3") -> loop_info64.
std::vector<std::pair<std::string, struct loop_info64>> loop_devices()
{
    std::vector<std::pair<std::string, struct loop_info64>> found;
    remove_stale_private_nodes();
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator("/sys/block", ec)) {
        std::string name = entry.path().filename().string();
        if (name.rfind("loop", 0) != 0 || !std::filesystem::exists(entry.path() / "loop"))
            continue;
        UniqueFd fd = open_block_device(devno_of(entry.path()), name, O_RDONLY);
        struct loop_info64 status {};
        if (fd && ::ioctl(fd.get(), LOOP_GET_STATUS64, &status) == 0)
            found.emplace_back(name, status);
    }
    return found;
}

// Everything that uses `disk` (a whole disk) or one of its partitions:
// mounts, swap, kernel holders (device mapper, md), and loop devices set up
// over it, with or without an offset, that are in turn used (the kernel does
// not list those as holders). `via` names the loop device a use goes
// through, for the message.
using LoopList = std::vector<std::pair<std::string, struct loop_info64>>;

void add_users(dev_t disk, DiskInfo& info, const LoopList& loops, const std::string& via, int depth)
{
    std::string through = via.empty() ? "" : " (through " + via + ", a loop device over it)";
    std::filesystem::path disk_sys = sysfs_block_dir(disk);
    std::vector<std::filesystem::path> dirs{disk_sys}; // the disk, then its partitions
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(disk_sys, ec))
        if (std::filesystem::exists(entry.path() / "partition"))
            dirs.push_back(entry.path());
    for (const auto& dir : dirs)
        for (const auto& holder : std::filesystem::directory_iterator(dir / "holders", ec))
            info.holders.push_back(holder.path().filename().string()
                                   + (dir == disk_sys ? "" : " (on " + dir.filename().string() + ")") + through);
    for (const auto& mount : mounts_on(disk)) {
        if (mount.target == "/")
            info.holds_root = true;
        info.mounted.push_back(mount.source + " on " + mount.target + through);
    }
    struct libmnt_fs* fs = nullptr;
    MntTable swaps(mnt_new_table());
    if (swaps && mnt_table_parse_swaps(swaps.get(), nullptr) == 0) {
        MntIter swap_it(mnt_new_iter(MNT_ITER_FORWARD));
        while (mnt_table_next_fs(swaps.get(), swap_it.get(), &fs) == 0) {
            const char* swap = mnt_fs_get_source(fs);
            struct stat sw {};
            if (swap && ::stat(swap, &sw) == 0 && S_ISBLK(sw.st_mode) && whole_disk_of(sw.st_rdev) == disk)
                info.mounted.push_back(std::string(swap) + " as swap" + through);
        }
    }
    for (const auto& [name, status] : loops) {
        // lo_rdevice is the backing file's rdev: the block device itself,
        // whatever the node it was set up through (even one deleted since).
        dev_t backing = static_cast<dev_t>(status.lo_rdevice);
        if (!backing || (backing != disk && whole_disk_of(backing) != disk))
            continue;
        dev_t loop = devno_of("/sys/block/" + name);
        if (!loop || loop == disk || depth > 32) // a loop over itself cannot be; 32 deep is enough
            continue;
        std::string node = "/dev/" + name;
        // An exclusive user of the loop device (a mount, a program's
        // O_EXCL) is in no list: the kernel's refusal of O_EXCL shows it.
        UniqueFd probe = open_block_device(loop, name, O_RDONLY | O_EXCL);
        if (!probe && errno == EBUSY)
            info.holders.push_back(node + ", a loop device over it" + (via.empty() ? "" : " (through " + via + ")")
                                   + ", which is open exclusively (mounted or in use)");
        add_users(loop, info, loops, via.empty() ? node : via, depth + 1);
    }
}

} // namespace

std::filesystem::path sysfs_block_dir(dev_t devno)
{
    std::error_code ec;
    auto link = std::filesystem::path("/sys/dev/block") / (std::to_string(major(devno)) + ":" + std::to_string(minor(devno)));
    auto resolved = std::filesystem::canonical(link, ec);
    return ec ? link : resolved;
}

DiskInfo describe_disk(const std::string& path)
{
    DiskInfo info;
    info.path = path;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
        throw_errno(path);
    if (!S_ISBLK(st.st_mode))
        throw Error(path + " is not a block device");
    info.devno = st.st_rdev;
    if (char* name = blkid_devno_to_devname(info.devno)) {
        info.kernel_path = name;
        free(name);
    } else {
        info.kernel_path = std::filesystem::canonical(path).string();
    }
    std::filesystem::path sys = sysfs_block_dir(info.devno);
    info.is_partition = std::filesystem::exists(sys / "partition");
    dev_t disk = whole_disk_of(info.devno);
    if (char* name = blkid_devno_to_devname(disk)) {
        info.whole_disk = name;
        free(name);
    }
    std::filesystem::path disk_sys = sysfs_block_dir(disk);
    info.removable = sysfs_read(disk_sys / "removable") == "1";
    info.read_only = sysfs_read(sys / "ro") == "1";
    std::string diskseq = sysfs_read(disk_sys / "diskseq");
    info.diskseq = diskseq.empty() ? 0 : std::stoull(diskseq);
    info.vendor = sysfs_read(disk_sys / "device/vendor");
    info.model = sysfs_read(disk_sys / "device/model");
    if (info.model.empty())
        info.model = sysfs_read(disk_sys / "device/name"); // mmc
    info.serial = sysfs_read(disk_sys / "device/serial");
    if (info.serial.empty())
        info.serial = sysfs_read(disk_sys / "serial");
    // Everything comes from sysfs: the device is not even opened before it passed the checks.
    std::string sectors = sysfs_read(sys / "size");
    info.size = sectors.empty() ? 0 : std::stoull(sectors) * 512;
    for (const auto& entry : std::filesystem::directory_iterator(disk_sys)) {
        if (!std::filesystem::exists(entry.path() / "partition"))
            continue;
        ExistingPartition part;
        part.node = "/dev/" + entry.path().filename().string();
        part.size = std::stoull(sysfs_read(entry.path() / "size").empty() ? "0" : sysfs_read(entry.path() / "size")) * 512;
        probe_existing_partition(part.node, part);
        info.partitions.push_back(part);
    }
    std::sort(info.partitions.begin(), info.partitions.end(), [](const auto& a, const auto& b) { return a.node < b.node; });
    add_users(disk, info, loop_devices(), "", 0);
    return info;
}

void check_not_in_use(const DiskInfo& disk)
{
    if (!disk.mounted.empty())
        throw Error(disk.path + " is in use: " + disk.mounted.front() + "; unmount it first");
    if (!disk.holders.empty())
        throw Error(disk.path + " is in use by " + disk.holders.front());
}

void check_safe_to_write(const DiskInfo& disk, uint64_t minimum_bytes, bool force)
{
    if (disk.is_partition)
        throw Error(disk.path + " is a partition; name the whole disk (" + disk.whole_disk + ")");
    if (disk.holds_root)
        throw Error(disk.path + " holds the running system's root file system");
    check_not_in_use(disk);
    if (disk.read_only)
        throw Error(disk.path + " is read-only (write-protect switch?)");
    if (disk.size < minimum_bytes)
        throw Error(disk.path + " is too small: " + size_text(disk.size) + ", the layout needs " + size_text(minimum_bytes));
    if (!disk.removable && !force)
        throw Error(disk.path + " is not a removable disk; pass --force if it really is the card to erase");
}

std::vector<std::string> loop_devices_backed_by(const std::filesystem::path& file)
{
    std::vector<std::string> found;
    struct stat want {};
    if (::stat(file.c_str(), &want) != 0)
        return found;
    // By device and inode, as the kernel holds it: a loop device set up
    // through another name (a hardlink, deleted since) is found too.
    for (const auto& [name, status] : loop_devices())
        if (static_cast<dev_t>(status.lo_device) == want.st_dev && status.lo_inode == want.st_ino)
            found.push_back("/dev/" + name);
    return found;
}

ExclusiveCard::ExclusiveCard(const std::string& path)
{
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
        throw_errno(path);
    if (S_ISREG(st.st_mode)) {
        m_image = true;
        // Not blocking: a FIFO swapped in after the stat is refused, not waited on.
        m_fd.reset(::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
        if (!m_fd)
            throw_errno("open " + path);
        struct stat opened {};
        if (::fstat(m_fd.get(), &opened) != 0 || !S_ISREG(opened.st_mode) || !named::same_file(opened, st))
            throw Error(path + " changed while it was opened; try again");
        if (::flock(m_fd.get(), LOCK_EX | LOCK_NB) != 0) {
            if (errno == EWOULDBLOCK)
                throw Error(path + " is in use by another treeflash; try again when it has finished");
            throw_errno("lock " + path);
        }
        auto loops = loop_devices_backed_by(path);
        if (!loops.empty())
            throw Error(path + " is attached to " + loops.front()
                        + " (perhaps mounted); detach it first (losetup -d " + loops.front() + ")");
        return;
    }
    if (!S_ISBLK(st.st_mode))
        throw Error(path + " is neither a block device nor an image file");
    DiskInfo disk = describe_disk(path);
    if (disk.is_partition)
        throw Error(path + " is a partition; name the whole card (" + disk.whole_disk + ")");
    check_not_in_use(disk);
    m_fd.reset(::open(disk.kernel_path.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC));
    if (!m_fd)
        throw_errno("open " + path + " exclusively");
}

namespace {

// Removes `partial` when no flash holds its lock any more: first the
// treeflash mounts of its loop device's partitions (the loop device, set to
// autoclear, then goes by itself), then the file. Anything else using it is
// left alone and reported.
void reclaim_partial(const std::filesystem::path& partial, std::vector<std::string>& reclaimed)
{
    UniqueFd fd(::open(partial.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd || ::flock(fd.get(), LOCK_EX | LOCK_NB) != 0)
        return; // gone, or a live flash holds it
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid())
        return; // not ours to remove (someone else's, in a shared folder)
    std::string ours = (std::filesystem::temp_directory_path() / "treeflash-mnt-").string();
    bool blocked = false;
    for (const auto& loop : loop_devices_backed_by(partial)) {
        struct stat loop_st {};
        if (::stat(loop.c_str(), &loop_st) != 0)
            continue;
        auto mounts = mounts_on(loop_st.st_rdev);
        // Newest first: one stacked on another comes off before it.
        for (auto it = mounts.rbegin(); it != mounts.rend(); ++it) {
            const std::string& target = it->target;
            if (target.rfind(ours, 0) == 0 && ::umount2(target.c_str(), 0) == 0) {
                ::rmdir(target.c_str());
                reclaimed.push_back("unmounted " + target + " (" + loop + ")");
            } else {
                blocked = true;
                reclaimed.push_back(partial.string() + " is still in use by the mount at " + target + "; left alone");
            }
        }
    }
    if (!blocked && ::unlink(partial.c_str()) == 0)
        reclaimed.push_back("removed " + partial.string() + ", left by an interrupted flash");
}

} // namespace

std::unique_ptr<Target> Target::create_image(const std::filesystem::path& image, uint64_t size, bool overwrite,
                                             std::vector<std::string>* reclaimed, bool attach_loop)
{
    std::error_code ec;
    if (std::filesystem::exists(std::filesystem::symlink_status(image, ec)) && !overwrite)
        throw Error(image.string() + " exists; pass --overwrite to replace it");
    if (std::filesystem::exists(std::filesystem::symlink_status(image, ec)) && !std::filesystem::is_regular_file(std::filesystem::symlink_status(image, ec)))
        throw Error(image.string() + " exists and is not a regular file");
    std::unique_ptr<Target> target(new Target());
    std::filesystem::path dir = image.parent_path().empty() ? "." : image.parent_path();
    std::string prefix = "." + image.filename().string() + ".partial-";
    std::vector<std::string> notes;
    // Partial images, the partial compressed forms a killed publish left,
    // and block maps written but not yet moved into place (see flash.cpp).
    std::vector<std::string> prefixes{prefix, image.filename().string() + ".bmap.tmp-"};
    for (const char* compressed : compressions)
        prefixes.push_back("." + image.filename().string() + "." + compressed + ".partial-");
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
        for (const auto& stale : prefixes)
            if (entry.path().filename().string().rfind(stale, 0) == 0)
                reclaim_partial(entry.path(), notes);
    if (reclaimed)
        reclaimed->insert(reclaimed->end(), notes.begin(), notes.end());
    std::string templ = (dir / (prefix + "XXXXXX")).string();
    UniqueFd fd(::mkostemp(templ.data(), O_CLOEXEC));
    if (!fd)
        throw_errno("create an image in " + dir.string());
    // Held while this process lives: a later flash knows the file is not stale.
    target->m_partial_lock.reset(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0));
    if (!target->m_partial_lock || ::flock(target->m_partial_lock.get(), LOCK_EX | LOCK_NB) != 0) {
        int err = errno;
        ::unlink(templ.c_str());
        throw_errno("lock " + templ, err);
    }
    target->m_partial = templ;
    target->m_image = image;
    target->m_overwrite = overwrite;
    if (::fchmod(fd.get(), 0644) != 0 || ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
        int err = errno;
        ::unlink(templ.c_str());
        throw_errno("size " + templ, err);
    }
    target->m_size = size;
    if (!attach_loop) {
        target->m_device = templ;
        target->m_fd = std::move(fd);
        return target;
    }
    fd.reset();
    try {
        target->m_loop = std::make_unique<LoopDevice>(target->m_partial, false);
    } catch (...) {
        ::unlink(templ.c_str());
        throw;
    }
    target->m_device = target->m_loop->path();
    target->m_fd.reset(::dup(target->m_loop->fd()));
    target->m_size = size;
    return target;
}

std::unique_ptr<Target> Target::open_device(const DiskInfo& checked)
{
    std::unique_ptr<Target> target(new Target());
    // One descriptor from here to the last write: O_EXCL fails while the
    // kernel uses the disk (mounts, device mapper, md) and keeps others out.
    target->m_fd.reset(::open(checked.kernel_path.c_str(), O_RDWR | O_EXCL | O_CLOEXEC));
    if (!target->m_fd)
        throw_errno("open " + checked.path + " exclusively");
    // The lock udev and systemd-repart honour: no one else probes or writes meanwhile.
    if (::flock(target->m_fd.get(), LOCK_EX | LOCK_NB) != 0)
        throw_errno("lock " + checked.path);
    target->m_device = checked.kernel_path;
    if (::ioctl(target->m_fd.get(), BLKGETSIZE64, &target->m_size) != 0)
        throw_errno("size of " + checked.path);
    target->verify_identity(checked);
    return target;
}

void Target::release_exclusive_claim()
{
    if (is_image())
        return;
    std::string self = "/proc/self/fd/" + std::to_string(m_fd.get());
    UniqueFd shared(::open(self.c_str(), O_RDWR | O_CLOEXEC));
    if (!shared)
        throw_errno("reopen " + m_device);
    // The lock belongs to the open file description: move it to the new one.
    ::flock(m_fd.get(), LOCK_UN);
    // udev may take its shared lock in the moment between (a new table
    // makes it probe): wait a little for it to let go.
    for (int tries = 0; ::flock(shared.get(), LOCK_EX | LOCK_NB) != 0; ++tries) {
        if (errno != EWOULDBLOCK || tries == 100)
            throw_errno("lock " + m_device);
        ::usleep(50 * 1000);
    }
    m_fd = std::move(shared);
}

void Target::verify_identity(const DiskInfo& checked) const
{
    if (is_image())
        return;
    struct stat st {};
    if (::fstat(m_fd.get(), &st) != 0)
        throw_errno("stat " + checked.path);
    std::string changed = checked.path + " changed since it was checked";
    if (!S_ISBLK(st.st_mode) || st.st_rdev != checked.devno)
        throw Error(changed + " (another device number); nothing was written");
    if (m_size != checked.size)
        throw Error(changed + " (another size: a different card?); nothing was written");
    std::string seq = sysfs_read(sysfs_block_dir(checked.devno) / "diskseq");
    if (checked.diskseq && !seq.empty() && std::stoull(seq) != checked.diskseq)
        throw Error(changed + " (the card was replaced); nothing was written");
}

void Target::start_writeback() const
{
    if (is_image() && m_partial_lock)
        ::sync_file_range(m_partial_lock.get(), 0, 0, SYNC_FILE_RANGE_WRITE); // a failure shows in commit()'s fsync
}

UniqueFd Target::image_file() const
{
    UniqueFd file(is_image() ? ::fcntl(m_partial_lock.get(), F_DUPFD_CLOEXEC, 0) : -1);
    if (!file)
        throw_errno("open " + m_partial.string() + " again");
    // The loop device's cached writes go to the file, without the cache
    // flush an fsync asks for. (Without a loop device the file is written
    // directly: its page cache is what a read sees.)
    if (m_loop
        && ::sync_file_range(m_fd.get(), 0, 0,
                             SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
               != 0)
        throw_errno("write out " + m_device);
    return file;
}

void Target::commit()
{
    if (::fsync(m_fd.get()) != 0)
        throw_errno("sync " + m_device);
    if (!is_image()) {
        m_committed = true;
        return;
    }
    m_fd.reset();
    m_loop.reset();
    // The loop device wrote into the file's page cache: flush the file itself.
    {
        UniqueFd file(::open(m_partial.c_str(), O_RDONLY | O_CLOEXEC));
        if (!file || ::fsync(file.get()) != 0)
            throw_errno("sync " + m_partial.string());
    }
    // Without --overwrite, never over a file that appeared while we worked
    // (another flash to the same path, say).
    unsigned flags = m_overwrite ? 0 : RENAME_NOREPLACE;
    if (m_overwrite) {
        // The file about to be replaced, held open (see take_replaced_image):
        // looked at through O_PATH, which opens nothing, and opened only if
        // it is a regular file, through that same descriptor.
        UniqueFd found(::open(m_image.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
        struct stat st {};
        if (found && ::fstat(found.get(), &st) == 0 && S_ISREG(st.st_mode)) {
            std::string same = "/proc/self/fd/" + std::to_string(found.get());
            m_replaced.reset(::open(same.c_str(), O_RDONLY | O_CLOEXEC));
        }
    }
    if (::renameat2(AT_FDCWD, m_partial.c_str(), AT_FDCWD, m_image.c_str(), flags) != 0) {
        if (errno == EEXIST)
            throw Error(m_image.string() + " appeared while the image was written; it was left alone (pass --overwrite to replace it)");
        throw_errno("move the image into place at " + m_image.string());
    }
    m_committed = true;
}

Target::~Target()
{
    m_fd.reset();
    m_loop.reset();
    if (is_image() && !m_committed)
        ::unlink(m_partial.c_str());
}

} // namespace treeflash::flasher
