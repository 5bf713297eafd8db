#include "flasher/station/provision.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/text.hpp"
#include "flasher/boot/boot_state.hpp"
#include "flasher/boot/uboot_env.hpp"
#include "flasher/inspect/ext4_reader.hpp"
#include "flasher/inspect/inspect.hpp"
#include "flasher/station/ext4_writer.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// The folder that holds "a/b/c": "a/b" ("" for a name alone).
std::string parent_of(const std::string& relpath)
{
    auto slash = relpath.rfind('/');
    return slash == std::string::npos ? "" : relpath.substr(0, slash);
}

// Errors name the card as the user knows it, not by the descriptor it is
// written through.
template <typename Step>
auto naming_the_card(const std::string& path, const std::string& name, Step step)
{
    try {
        return step();
    } catch (const Error& e) {
        std::string message = e.what();
        text::replace_all(message, path, name);
        throw Error(message);
    }
}

} // namespace

ProvisionTarget find_provision_target(const std::string& path, const std::string& name)
{
    return naming_the_card(path, name, [&] {
        InspectResult card = inspect(path, nullptr);
        if (!card.sysroot_partition)
            throw Error(path + " holds no OSTree sysroot to provision");
        if (card.deployments.size() != 1)
            throw Error(path + " holds " + std::to_string(card.deployments.size())
                        + " deployments; a card is provisioned as written, with the image's one");
        ProvisionTarget target{path, name};
        target.card_size = card.size;
        for (const auto& part : card.partitions)
            if (static_cast<int>(part.entry.number) == card.sysroot_partition)
                target.sysroot_offset = part.entry.start;
        const Deployment& deployment = card.deployments.front();
        target.deployment = "ostree/deploy/" + deployment.os + "/deploy/" + deployment.commit + "."
                            + std::to_string(deployment.deploy_serial);

        // U-Boot's environment, where the board keeps one on the card: only a
        // valid environment (its CRC matches, as flash wrote it) in the raw
        // space outside the partitions is rewritten, in place, at its size.
        target.uboot_env = uboot_env_place(card.board_record);
        if (const auto& env = target.uboot_env) {
            auto overlaps = [&](uint64_t start, uint64_t size) {
                return env->offset < start + size && start < env->offset + env->size;
            };
            auto refuse = [&](const std::string& what) {
                throw Error("the U-Boot environment at " + text::hex(env->offset) + " of " + path + " overlaps " + what);
            };
            for (const auto& part : card.partitions)
                if (overlaps(part.entry.start, part.entry.size))
                    refuse("partition " + std::to_string(part.entry.number));
            if (card.table.label == "gpt" && card.size >= 34 * 512 && overlaps(card.size - 33 * 512, 33 * 512))
                refuse("the backup GPT");
            if (auto tries = boot_state_offset(card.board_record); tries && overlaps(*tries, boot_state_bytes))
                refuse("the boot counting block");
            std::vector<uint8_t> block = read_uboot_env_block(path, *env, card.size);
            try {
                read_uboot_env(block.data(), block.size());
            } catch (const Error& e) {
                throw Error("the U-Boot environment at " + text::hex(env->offset) + " of " + path + ": " + e.what());
            }
        }
        return target;
    });
}

Provisioned provision_card(const ProvisionTarget& target, const Unit& unit)
{
    const std::string& path = target.path;
    return naming_the_card(path, target.name, [&] {
        Provisioned done;
        done.deployment = target.deployment;
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

        // The environment with the unit in it, made before anything is
        // written: one that would not fit leaves the card untouched.
        const std::optional<UbootEnvPlace>& env_place = target.uboot_env;
        const uint64_t card_size = target.card_size;
        std::vector<uint8_t> env;
        if (env_place) {
            std::vector<uint8_t> block = read_uboot_env_block(path, *env_place, card_size);
            try {
                env = set_uboot_env(block.data(), block.size(), unit.uboot_variables());
            } catch (const Error& e) {
                throw Error("the U-Boot environment at " + text::hex(env_place->offset) + " of " + path + ": " + e.what());
            }
        }

        {
            Ext4Writer writer(path, target.sysroot_offset);
            for (const auto& file : planned) {
                std::string folder = parent_of(file.path);
                // An /etc that is not a folder (a symlink out) ends it here.
                writer.make_directories(folder.empty() ? etc : etc + "/" + folder);
                writer.write_file(etc + "/" + file.path, file.data, file.mode);
                done.files.push_back("/etc/" + file.path);
            }
            writer.close();
        }

        if (env_place) {
            UniqueFd device(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
            if (!device)
                throw_errno("open " + path + " to write its U-Boot environment");
            fs::write_at(device.get(), reinterpret_cast<const char*>(env.data()), env.size(), env_place->offset,
                         "the U-Boot environment of " + path);
            if (::fdatasync(device.get()) != 0)
                throw_errno("flush the U-Boot environment of " + path);
            for (const auto& variable : unit.uboot_variables())
                done.uboot_variables.push_back(variable.first);
        }

        // Read back through a reader of its own, as inspect would, from the
        // card rather than from what the kernel kept of the writes.
        {
            UniqueFd device(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
            if (!device || ::fsync(device.get()) != 0 || ::posix_fadvise(device.get(), 0, 0, POSIX_FADV_DONTNEED) != 0)
                throw_errno("drop the cached blocks of " + path);
        }
        Ext4Card check(path, target.sysroot_offset);
        for (const auto& file : planned)
            if (check.type(etc + "/" + file.path) != S_IFREG || check.read(etc + "/" + file.path) != file.data)
                throw Error("/etc/" + file.path + " read back differently from what was written to " + path);
        if (env_place && read_uboot_env_block(path, *env_place, card_size) != env)
            throw Error("the U-Boot environment read back differently from what was written to " + path);
        return done;
    });
}

} // namespace treeflash::flasher
