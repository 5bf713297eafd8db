#include "flasher/boot/firmware.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "flasher/boot/boot_state.hpp"

#include <cerrno>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace treeflash::flasher {

std::vector<FirmwareBlob> plan_firmware(const BoardProfile& board, const std::map<std::string, std::string>& given,
                                        uint64_t first_partition_offset)
{
    std::vector<FirmwareBlob> blobs;
    for (const auto& [name, file] : given) {
        const FirmwareSlot* slot = board.slot(name);
        if (!slot) {
            std::string known;
            for (const auto& s : board.firmware)
                known += (known.empty() ? "" : ", ") + s.name;
            throw Error("board " + board.name + " has no firmware slot '" + name + "'"
                        + (known.empty() ? "" : " (slots: " + known + ")"));
        }
        struct stat st {};
        if (::stat(file.c_str(), &st) != 0)
            throw_errno("firmware " + name + " " + file);
        if (!S_ISREG(st.st_mode))
            throw Error("firmware " + name + " " + file + ": not a regular file");
        uint64_t size = static_cast<uint64_t>(st.st_size);
        if (size == 0)
            throw Error("firmware " + name + " " + file + " is empty");
        if (size > slot->max_size)
            throw Error("firmware " + name + " " + file + " is " + std::to_string(size) + " bytes; slot " + name
                        + " holds " + std::to_string(slot->max_size));
        if (slot->offset + size > first_partition_offset)
            throw Error("firmware " + name + " would reach into the first partition");
        blobs.push_back({*slot, file, {}, size});
    }
    return blobs;
}

void plan_generated_blobs(const BoardProfile& board, std::vector<FirmwareBlob>& blobs, uint64_t first_partition_offset)
{
    auto add = [&](const FirmwareSlot& slot, std::vector<uint8_t> bytes) {
        if (slot.offset + bytes.size() > first_partition_offset)
            throw Error(slot.name + " (" + std::to_string(bytes.size()) + " bytes at byte " + std::to_string(slot.offset)
                        + ") would reach into the first partition");
        uint64_t size = bytes.size();
        blobs.push_back({slot, {}, std::move(bytes), size});
    };
    if (board.uboot_env) {
        bool given = false;
        for (const auto& blob : blobs)
            given |= blob.slot.name == board.uboot_env->slot;
        const FirmwareSlot* slot = board.slot(board.uboot_env->slot);
        if (!given && slot)
            add(*slot, render_uboot_environment(board, slot->max_size));
    }
    if (board.boot_count.enabled())
        add(FirmwareSlot{"boot-count", board.boot_count.state_offset, boot_state_bytes}, initial_boot_state());
}

bool renders_uboot_env(const BoardProfile& board, const std::vector<FirmwareBlob>& blobs)
{
    if (!board.uboot_env)
        return false;
    for (const auto& blob : blobs)
        if (blob.slot.name == board.uboot_env->slot)
            return !blob.bytes.empty();
    return false;
}

void write_firmware(int fd, const std::vector<FirmwareBlob>& blobs)
{
    std::vector<char> buffer(1 << 20);
    for (const auto& blob : blobs) {
        if (!blob.bytes.empty()) {
            fs::write_at(fd, reinterpret_cast<const char*>(blob.bytes.data()), blob.bytes.size(), blob.slot.offset,
                         "write " + blob.slot.name);
            continue;
        }
        UniqueFd in(::open(blob.file.c_str(), O_RDONLY | O_CLOEXEC));
        if (!in)
            throw_errno("open " + blob.file.string());
        off_t offset = static_cast<off_t>(blob.slot.offset);
        for (;;) {
            ssize_t n = ::read(in.get(), buffer.data(), buffer.size());
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                throw_errno("read " + blob.file.string());
            if (n == 0)
                break;
            for (ssize_t done = 0; done < n;) {
                ssize_t w = ::pwrite(fd, buffer.data() + done, static_cast<size_t>(n - done), offset);
                if (w < 0 && errno == EINTR)
                    continue;
                if (w < 0)
                    throw_errno("write firmware " + blob.slot.name);
                done += w;
                offset += w;
            }
        }
    }
}

} // namespace treeflash::flasher
