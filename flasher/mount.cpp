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

Mount::Mount(const std::string& source, const std::string& fstype, const std::string& options,
             const std::filesystem::path& parent)
    : m_source(source)
{
    m_dir.emplace(parent, "treeflash-mnt-");
    MntContext cxt(mnt_new_context());
    if (!cxt)
        throw Error("mnt_new_context failed");
    mnt_context_disable_helpers(cxt.get(), 1);
    mnt_context_set_source(cxt.get(), source.c_str());
    mnt_context_set_target(cxt.get(), m_dir->path().c_str());
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
        UniqueFd fd(::open(m_dir->path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (fd)
            ::syncfs(fd.get());
    }
    for (int attempt = 0;; ++attempt) {
        if (::umount2(m_dir->path().c_str(), 0) == 0)
            break;
        if (errno != EBUSY || attempt >= 50)
            throw_errno("unmount " + m_source);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    m_mounted = false;
    m_dir->remove();
}

Mount::~Mount()
{
    if (!m_mounted)
        return;
    try {
        unmount();
    } catch (...) {
        // Last resort on an error path: detach now, the kernel finishes when it can.
        ::umount2(m_dir->path().c_str(), MNT_DETACH);
        m_dir->remove();
    }
}

} // namespace treeflash::flasher
