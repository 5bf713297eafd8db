#include "flasher/image_commits.hpp"

#include "flasher/partition.hpp"

#include <ext2fs/ext2fs.h>
#include <memory>
#include <regex>

namespace treeflash::flasher {

namespace {

struct Ext2Close {
    void operator()(ext2_filsys fs) const { ext2fs_close_free(&fs); }
};
using Ext2Filesystem = std::unique_ptr<std::remove_pointer_t<ext2_filsys>, Ext2Close>;

// The names in directory `dir` of `fs`.
std::vector<std::string> names_in(ext2_filsys fs, ext2_ino_t dir)
{
    std::vector<std::string> names;
    auto each = [](ext2_ino_t, int, struct ext2_dir_entry* entry, int, int, char*, void* data) -> int {
        std::string name(entry->name, static_cast<size_t>(ext2fs_dirent_name_len(entry)));
        if (name != "." && name != "..")
            static_cast<std::vector<std::string>*>(data)->push_back(name);
        return 0;
    };
    ext2fs_dir_iterate2(fs, dir, 0, nullptr, each, &names);
    return names;
}

} // namespace

std::vector<std::string> deployed_commits(const std::string& path)
{
    static const std::regex deployment("([0-9a-f]{64})\\.[0-9]+");
    std::vector<std::string> commits;
    PartitionTable table = read_partition_table(path);
    for (const auto& part : table.partitions) {
        ext2_filsys raw = nullptr;
        std::string io_options = "offset=" + std::to_string(part.start);
        if (ext2fs_open2(path.c_str(), io_options.c_str(), EXT2_FLAG_64BITS, 0, 0, unix_io_manager, &raw) != 0)
            continue; // not ext2/3/4
        Ext2Filesystem fs(raw);
        ext2_ino_t deploy = 0;
        if (ext2fs_namei(fs.get(), EXT2_ROOT_INO, EXT2_ROOT_INO, "ostree/deploy", &deploy) != 0)
            continue;
        for (const auto& os : names_in(fs.get(), deploy)) {
            ext2_ino_t os_deploy = 0;
            if (ext2fs_namei(fs.get(), EXT2_ROOT_INO, deploy, (os + "/deploy").c_str(), &os_deploy) != 0)
                continue;
            std::smatch m;
            for (const auto& name : names_in(fs.get(), os_deploy))
                if (std::regex_match(name, m, deployment))
                    commits.push_back(m[1]);
        }
    }
    return commits;
}

} // namespace treeflash::flasher
