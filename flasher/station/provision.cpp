#include "flasher/station/provision.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/text.hpp"
#include "flasher/inspect/ext4_reader.hpp"
#include "flasher/inspect/inspect.hpp"
#include "flasher/station/ext4_writer.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// The folders of "a/b/c" that hold it: "a", "a/b".
std::string parent_of(const std::string& relpath)
{
    auto slash = relpath.rfind('/');
    return slash == std::string::npos ? "" : relpath.substr(0, slash);
}

} // namespace

namespace {

Provisioned provision(const std::string& path, const Unit& unit);

} // namespace

Provisioned provision_card(const std::string& path, const Unit& unit, const std::string& name)
{
    try {
        return provision(path, unit);
    } catch (const Error& e) {
        // Named as the user knows the card, not by the descriptor it is written through.
        std::string message = e.what();
        text::replace_all(message, path, name);
        throw Error(message);
    }
}

namespace {

Provisioned provision(const std::string& path, const Unit& unit)
{
    InspectResult card = inspect(path, nullptr);
    if (!card.sysroot_partition)
        throw Error(path + " holds no OSTree sysroot to provision");
    if (card.deployments.size() != 1)
        throw Error(path + " holds " + std::to_string(card.deployments.size())
                    + " deployments; a card is provisioned as written, with the image's one");
    const Deployment& deployment = card.deployments.front();
    uint64_t offset = 0;
    for (const auto& part : card.partitions)
        if (static_cast<int>(part.entry.number) == card.sysroot_partition)
            offset = part.entry.start;

    Provisioned done;
    done.deployment = "ostree/deploy/" + deployment.os + "/deploy/" + deployment.commit + "."
                      + std::to_string(deployment.deploy_serial);
    const std::string etc = done.deployment + "/etc";

    // What goes where, relative to the deployment's /etc.
    struct Planned {
        std::string path;
        std::string data;
        unsigned mode;
    };
    std::vector<Planned> planned;
    if (!unit.hostname.empty())
        planned.push_back({"hostname", unit.hostname + "\n", 0644});
    planned.push_back({"treeflash/unit", unit.unit_file(), 0644});
    for (const auto& file : unit.files)
        planned.push_back({file.path, file.data, file.mode});

    {
        Ext4Writer writer(path, offset);
        for (const auto& file : planned) {
            std::string folder = parent_of(file.path);
            // An /etc that is not a folder (a symlink out) ends it here.
            writer.make_directories(folder.empty() ? etc : etc + "/" + folder);
            writer.write_file(etc + "/" + file.path, file.data, file.mode);
            done.files.push_back("/etc/" + file.path);
        }
        writer.close();
    }

    // Read back through a reader of its own, as inspect would, from the card
    // rather than from what the kernel kept of the writes.
    {
        UniqueFd device(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
        if (!device || ::fsync(device.get()) != 0 || ::posix_fadvise(device.get(), 0, 0, POSIX_FADV_DONTNEED) != 0)
            throw_errno("drop the cached blocks of " + path);
    }
    Ext4Card check(path, offset);
    for (const auto& file : planned)
        if (check.type(etc + "/" + file.path) != S_IFREG || check.read(etc + "/" + file.path) != file.data)
            throw Error("/etc/" + file.path + " read back differently from what was written to " + path);
    return done;
}

} // namespace

} // namespace treeflash::flasher
