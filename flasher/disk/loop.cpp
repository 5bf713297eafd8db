#include "flasher/disk/loop.hpp"

#include "common/error.hpp"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <thread>
#include <unistd.h>

namespace treeflash::flasher {

LoopDevice::LoopDevice(const std::filesystem::path& file, bool read_only, uint64_t offset, uint64_t size)
{
    UniqueFd backing(::open(file.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC));
    if (!backing)
        throw_errno("open " + file.string());
    UniqueFd control(::open("/dev/loop-control", O_RDWR | O_CLOEXEC));
    if (!control)
        throw_errno("open /dev/loop-control");
    // Another process may take the device between GET_FREE and CONFIGURE: retry.
    for (int attempt = 0; attempt < 20; ++attempt) {
        int number = ::ioctl(control.get(), LOOP_CTL_GET_FREE);
        if (number < 0)
            throw_errno("find a free loop device");
        std::string path = "/dev/loop" + std::to_string(number);
        UniqueFd loop;
        for (int wait = 0; wait < 50 && !loop; ++wait) {
            loop.reset(::open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC));
            if (!loop && errno == ENOENT)
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
            else if (!loop)
                throw_errno("open " + path);
        }
        if (!loop)
            throw Error("open " + path + ": the device node did not appear");
        struct loop_config config {};
        config.fd = static_cast<__u32>(backing.get());
        config.info.lo_flags = (size ? 0 : LO_FLAGS_PARTSCAN) | LO_FLAGS_AUTOCLEAR | (read_only ? LO_FLAGS_READ_ONLY : 0);
        config.info.lo_offset = offset;
        config.info.lo_sizelimit = size;
        std::snprintf(reinterpret_cast<char*>(config.info.lo_file_name), LO_NAME_SIZE, "%s", file.c_str());
        if (::ioctl(loop.get(), LOOP_CONFIGURE, &config) == 0) {
            m_path = path;
            m_fd = std::move(loop);
            return;
        }
        if (errno != EBUSY)
            throw_errno("attach " + file.string() + " to " + path);
    }
    throw Error("attach " + file.string() + ": no free loop device");
}

LoopDevice::~LoopDevice()
{
    detach();
}

void LoopDevice::detach()
{
    if (!m_fd)
        return;
    // Fails with EBUSY while a partition is still mounted; autoclear then
    // detaches the device when the last user goes away.
    ::ioctl(m_fd.get(), LOOP_CLR_FD, 0);
    m_fd.reset();
}

} // namespace treeflash::flasher
