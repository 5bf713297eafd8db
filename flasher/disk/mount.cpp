#include "flasher/disk/mount.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "flasher/disk/handles.hpp"

#include <cerrno>
#include <chrono>
#include <fcntl.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/mount.h>
#include <thread>
#include <unistd.h>

namespace treeflash::flasher {

const char* const untrusted_mount_options = "nosuid,nodev,noexec";

namespace {

// The directory a private tmpfs covers inside treeflash's mount namespace;
// outside it the directory stays empty. /run is itself a tmpfs, gone at
// the next boot.
constexpr const char* private_mount_dir = "/run/treeflash";

// Whether enter_own_mount_namespace succeeded.
bool in_own_namespace = false;

} // namespace

bool enter_own_mount_namespace()
{
    if (in_own_namespace)
        return true;
    if (::unshare(CLONE_NEWNS) != 0)
        return false;
    // Slave: the host's later mounts (a card someone mounts meanwhile) are
    // still seen by the safety checks; nothing mounted here goes back.
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_SLAVE, nullptr) != 0)
        return false;
    if (::mkdir(private_mount_dir, 0700) != 0 && errno != EEXIST)
        return false;
    struct stat st {};
    if (::lstat(private_mount_dir, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != 0)
        return false;
    if (::mount("treeflash", private_mount_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0700,size=1m") != 0)
        return false;
    in_own_namespace = true;
    return true;
}

std::filesystem::path mount_point_parent()
{
    return in_own_namespace ? std::filesystem::path(private_mount_dir) : std::filesystem::temp_directory_path();
}

Mount::Mount(const std::string& source, const std::string& fstype, const std::string& options,
             const std::filesystem::path& parent)
    : m_source(source)
{
    std::string templ = (parent / "treeflash-mnt-XXXXXX").string();
    if (!::mkdtemp(templ.data()))
        throw_errno("create a mount point in " + parent.string());
    m_dir = templ;
    try {
        mount(source, fstype, options);
    } catch (...) {
        remove_mount_point();
        throw;
    }
}

void Mount::mount(const std::string& source, const std::string& fstype, const std::string& options)
{
    MntContext cxt(mnt_new_context());
    if (!cxt)
        throw Error("mnt_new_context failed");
    mnt_context_disable_helpers(cxt.get(), 1);
    mnt_context_set_source(cxt.get(), source.c_str());
    mnt_context_set_target(cxt.get(), m_dir.c_str());
    mnt_context_set_fstype(cxt.get(), fstype.c_str());
    if (!options.empty())
        mnt_context_set_options(cxt.get(), options.c_str());
    int rc = mnt_context_mount(cxt.get());
    if (rc != 0) {
        char message[512] = "";
        mnt_context_get_excode(cxt.get(), rc, message, sizeof message);
        throw Error("mount " + source + ": " + (message[0] ? message : "failed"));
    }
    m_mounted = true;
}

void Mount::unmount()
{
    if (!m_mounted)
        return;
    {
        UniqueFd fd(::open(m_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (fd && ::syncfs(fd.get()) != 0)
            throw_errno("sync " + m_source);
    }
    // A file closed a moment ago may still hold the file system (the kernel
    // finishes some closes later, on a worker of its own): a busy file
    // system is retried for up to two seconds before it is called busy.
    MntContext cxt;
    int rc = 0;
    for (int attempt = 0;; ++attempt) {
        cxt = MntContext(mnt_new_context());
        if (!cxt)
            throw Error("mnt_new_context failed");
        mnt_context_disable_helpers(cxt.get(), 1);
        mnt_context_disable_mtab(cxt.get(), 1);
        mnt_context_set_target(cxt.get(), m_dir.c_str());
        rc = mnt_context_umount(cxt.get());
        if (rc == 0 || mnt_context_get_syscall_errno(cxt.get()) != EBUSY || attempt == 100)
            break;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (rc != 0) {
        char message[512] = "";
        mnt_context_get_excode(cxt.get(), rc, message, sizeof message);
        throw Error("unmount " + m_source + ": " + (message[0] ? message : "failed"));
    }
    m_mounted = false;
    remove_mount_point();
}

void Mount::remove_mount_point() noexcept
{
    // rmdir, never a recursive removal: if anything is still mounted here
    // it fails and the card's files stay untouched.
    if (!m_dir.empty())
        ::rmdir(m_dir.c_str());
}

Mount::~Mount()
{
    if (!m_mounted)
        return;
    try {
        unmount();
    } catch (...) {
        // Last resort on an error path: detach now, the kernel finishes when
        // it can. The mount point goes only if it is empty.
        ::umount2(m_dir.c_str(), MNT_DETACH);
        remove_mount_point();
    }
}

} // namespace treeflash::flasher
