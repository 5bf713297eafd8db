#include "flasher/mount.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "flasher/handles.hpp"

#include <chrono>
#include <fcntl.h>
#include <sys/mount.h>
#include <thread>
#include <unistd.h>

namespace treeflash::flasher {

const char* const untrusted_mount_options = "nosuid,nodev,noexec";

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
        if (fd)
            ::syncfs(fd.get());
    }
    for (int attempt = 0;; ++attempt) {
        if (::umount2(m_dir.c_str(), 0) == 0)
            break;
        if (errno != EBUSY || attempt >= 50)
            throw_errno("unmount " + m_source);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
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
