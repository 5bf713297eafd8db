#include "flasher/inspect/image_commits.hpp"

#include "common/error.hpp"
#include "flasher/inspect/ext4_reader.hpp"
#include "flasher/disk/partition.hpp"

#include <regex>

namespace treeflash::flasher {

std::vector<std::string> deployed_commits(const std::string& path)
{
    static const std::regex deployment("([0-9a-f]{64})\\.[0-9]+");
    std::vector<std::string> commits;
    PartitionTable table = read_partition_table(path);
    for (const auto& part : table.partitions) {
        std::unique_ptr<Ext4Card> card;
        try {
            card = std::make_unique<Ext4Card>(path, part.start);
        } catch (const Error&) {
            continue; // not ext2/3/4
        }
        for (const auto& os : card->list("ostree/deploy")) {
            std::smatch m;
            for (const auto& name : card->list("ostree/deploy/" + os + "/deploy"))
                if (std::regex_match(name, m, deployment))
                    commits.push_back(m[1]);
        }
    }
    return commits;
}

} // namespace treeflash::flasher
