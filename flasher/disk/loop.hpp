// Loop devices attached with LOOP_CONFIGURE and detached on every exit path.
#pragma once

#include "common/fd.hpp"

#include <cstdint>
#include <filesystem>
#include <string>

namespace treeflash::flasher {

class LoopDevice {
public:
    // Attaches `file` to a free loop device, with partition scanning.
    // Autoclear is set too, so even a killed process leaves no attached
    // device once nothing holds it open.
    // With `size` set, only `size` bytes from `offset` are visible (one
    // partition of an image or disk) and no partition scan is done.
    LoopDevice(const std::filesystem::path& file, bool read_only, uint64_t offset = 0, uint64_t size = 0);
    LoopDevice(const LoopDevice&) = delete;
    LoopDevice& operator=(const LoopDevice&) = delete;
    ~LoopDevice();

    const std::string& path() const { return m_path; }
    int fd() const { return m_fd.get(); }
    void detach();

private:
    std::string m_path;
    UniqueFd m_fd;
};

} // namespace treeflash::flasher
