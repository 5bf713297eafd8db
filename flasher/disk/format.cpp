#include "flasher/disk/format.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/process.hpp"
#include "flasher/disk/handles.hpp"

#include <fcntl.h>

namespace treeflash::flasher {

void make_ext4(const std::string& node, const std::string& label, const std::vector<std::string>& options,
               bool fresh_zeroed, GCancellable* cancellable, int passed_fd)
{
    std::vector<std::string> argv{"mkfs.ext4", "-F", "-q", "-L", label};
    argv.insert(argv.end(), options.begin(), options.end());
    if (fresh_zeroed) {
        argv.push_back("-E");
        argv.push_back("lazy_itable_init=1,lazy_journal_init=1,nodiscard");
    }
    argv.push_back(node);
    ProcessOptions process;
    process.cancellable = cancellable;
    if (passed_fd >= 0)
        process.descriptors = {{passed_fd, 3}};
    run_checked(argv, process);
}

void make_ext4_in_image(const std::string& image, uint64_t offset, uint64_t size, const std::string& label,
                        const std::vector<std::string>& options, const std::filesystem::path& content,
                        const ReproducibleExt4& same)
{
    std::vector<std::string> argv{"mkfs.ext4", "-F", "-q", "-L", label, "-U", same.uuid};
    // A fresh, zeroed file: no discard (it would punch the file), lazy init.
    // The board's -E first and treeflash's after (mke2fs keeps the last value
    // of each; board.cpp refuses a board's offset= anyway).
    std::string extended;
    for (size_t i = 0; i < options.size(); ++i) {
        if (options[i] == "-E" && i + 1 < options.size()) {
            extended += options[++i] + ","; // mke2fs keeps only the last -E
            continue;
        }
        argv.push_back(options[i]);
    }
    extended += "lazy_itable_init=1,lazy_journal_init=1,nodiscard,hash_seed=" + same.hash_seed + ",offset="
                + std::to_string(offset);
    argv.push_back("-E");
    argv.push_back(extended);
    if (!content.empty()) {
        argv.push_back("-d");
        argv.push_back(content.string());
    }
    argv.push_back(image);
    argv.push_back(std::to_string(size / 1024) + "k");
    ProcessOptions process;
    process.extra_environment = {"E2FSPROGS_FAKE_TIME=" + std::to_string(same.time)};
    run_checked(argv, process);
}

FilesystemInfo probe_filesystem(const std::string& path, uint64_t offset, uint64_t size)
{
    FilesystemInfo info;
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd)
        throw_errno("open " + path);
    BlkidProbe probe(blkid_new_probe());
    if (!probe || blkid_probe_set_device(probe.get(), fd.get(), static_cast<blkid_loff_t>(offset),
                                         static_cast<blkid_loff_t>(size)) != 0)
        throw Error("blkid cannot probe " + path);
    blkid_probe_enable_superblocks(probe.get(), 1);
    blkid_probe_set_superblocks_flags(probe.get(), BLKID_SUBLKS_LABEL | BLKID_SUBLKS_TYPE | BLKID_SUBLKS_UUID);
    if (blkid_do_safeprobe(probe.get()) != 0)
        return info;
    const char* value = nullptr;
    if (blkid_probe_lookup_value(probe.get(), "TYPE", &value, nullptr) == 0)
        info.type = value;
    if (blkid_probe_lookup_value(probe.get(), "LABEL", &value, nullptr) == 0)
        info.label = value;
    if (blkid_probe_lookup_value(probe.get(), "UUID", &value, nullptr) == 0)
        info.uuid = value;
    return info;
}

void verify_filesystem(const std::string& node, const std::string& fstype, const std::string& label)
{
    FilesystemInfo found = probe_filesystem(node);
    if (found.type != fstype || found.label != label)
        throw Error(node + ": expected " + fstype + " labelled '" + label + "', found "
                    + (found.type.empty() ? "no filesystem" : found.type + " labelled '" + found.label + "'"));
}

} // namespace treeflash::flasher
