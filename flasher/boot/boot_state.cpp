#include "flasher/boot/boot_state.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/text.hpp"
#include "flasher/inspect/card_files.hpp"
#include "flasher/boot/uboot_env.hpp"

#include <fcntl.h>
#include <sstream>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

std::string value_of(const std::map<std::string, std::string>& values, const std::string& name)
{
    auto it = values.find(name);
    return it == values.end() ? "" : it->second;
}

// N of the ostree=/ostree/boot.N/... argument in `bootargs`, -1 when none.
int bootversion_of(const std::string& bootargs)
{
    std::istringstream in(bootargs);
    for (std::string arg; in >> arg;)
        if (arg.rfind("ostree=/ostree/boot.", 0) == 0 && arg.size() > 21 && (arg[20] == '0' || arg[20] == '1')
            && arg[21] == '/')
            return arg[20] - '0';
    return -1;
}

std::optional<unsigned> small_number(const std::string& text)
{
    if (text.size() != 1 || text[0] < '0' || text[0] > '9')
        return std::nullopt; // the tries stay single digits (boot_count.limit <= 8)
    return static_cast<unsigned>(text[0] - '0');
}

// A number as board.env writes it ("0x5ff000"); nullopt when it is not one.
std::optional<uint64_t> record_number(const std::string& text)
{
    if (text.empty() || text[0] == '-' || text[0] == '+' || text[0] == ' ')
        return std::nullopt;
    try {
        size_t used = 0;
        uint64_t value = std::stoull(text, &used, 0);
        if (used != text.size())
            return std::nullopt;
        return value;
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

std::optional<std::map<std::string, std::string>> read_tries_block(const std::string& card, uint64_t offset)
{
    try {
        UniqueFd fd(::open(card.c_str(), O_RDONLY | O_CLOEXEC));
        if (!fd)
            return std::nullopt;
        std::vector<char> block(boot_state_bytes);
        fs::read_at(fd.get(), block.data(), block.size(), offset, "boot counting block of " + card);
        return read_uboot_env(reinterpret_cast<const uint8_t*>(block.data()), block.size());
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

std::string deployment_dir(const Deployment& deployment)
{
    return deployment.commit + "." + std::to_string(deployment.deploy_serial);
}

} // namespace

std::vector<uint8_t> initial_boot_state()
{
    return make_uboot_env({{"treeflash_serial", "0"}, {"treeflash_tries", "0"}}, boot_state_bytes);
}

std::vector<uint8_t> render_uboot_environment(const BoardProfile& board, size_t size)
{
    if (!board.uboot_env)
        throw Error("board " + board.name + " has no uboot.env");
    std::string text = fs::read_file(board.uboot_env->file);
    auto scriptaddr = board.uboot_defaults.find("scriptaddr");
    text::replace_all(text, "@DEVTYPE@", board.uboot_devtype);
    text::replace_all(text, "@DEVNUM@", board.uboot_devnum);
    text::replace_all(text, "@BOOT_PART@", std::to_string(board.boot_partition));
    text::replace_all(text, "@ROOTFS_PART@", std::to_string(board.rootfs_partition));
    text::replace_all(text, "@SCRIPTADDR@", scriptaddr == board.uboot_defaults.end() ? "" : scriptaddr->second);
    text::replace_all(text, "@BOOTLIMIT@", std::to_string(board.boot_count.limit));
    UbootVariables variables = in_step(board.uboot_env->file.string(), [&] { return parse_uboot_env_text(text); });
    for (const auto& [name, value] : variables)
        if (value.find('@') != std::string::npos)
            throw Error(board.uboot_env->file.string() + ": " + name + " holds an unknown @NAME@ placeholder");
    return make_uboot_env(variables, size);
}

std::string boot_board_record(const BoardProfile& board, bool rendered_uboot_env)
{
    const FirmwareSlot* env = rendered_uboot_env && board.uboot_env ? board.slot(board.uboot_env->slot) : nullptr;
    if (!board.boot_count.enabled() && !env)
        return "";
    std::string record = "# Written by treeflash flash: how this card's board boots.\n"
                         "board=" + board.name + "\n";
    if (board.boot_count.enabled())
        record += "bootlimit=" + std::to_string(board.boot_count.limit) + "\n"
                  "boot_state_offset=" + text::hex(board.boot_count.state_offset) + "\n";
    record += std::string("devicetree=") + (board.devicetree_required ? "required" : "optional") + "\n";
    if (env)
        record += "uboot_env=" + text::hex(env->offset) + " " + text::hex(env->max_size) + "\n";
    return record;
}

BootFiles read_boot_files(const CardView& sysroot, const std::string& card)
{
    BootFiles files;
    files.board = parse_env_lines(sysroot.read(boot_board_record_path));
    std::string loader = sysroot.link("boot/loader");
    if (loader == "loader.0" || loader == "loader.1")
        files.uenv = parse_env_lines(sysroot.read("boot/" + loader + "/uEnv.txt"));
    int bootversion = bootversion_of(value_of(files.uenv, "bootargs"));
    if (bootversion >= 0) {
        // ostree/boot.N -> boot.N.M, resolved by hand to a name in ostree/.
        std::string link = "boot." + std::to_string(bootversion);
        std::string subdir = sysroot.link("ostree/" + link);
        if (subdir == link + ".0" || subdir == link + ".1")
            files.mark = parse_env_lines(sysroot.read("ostree/" + subdir + "/" + boot_mark_name));
    }
    files.ack = parse_env_lines(sysroot.read(boot_ack_path));
    if (auto offset = boot_state_offset(files.board))
        files.tries_block = read_tries_block(card, *offset);
    return files;
}

std::optional<UbootEnvPlace> uboot_env_place(const std::map<std::string, std::string>& board)
{
    auto line = board.find("uboot_env");
    if (line == board.end())
        return std::nullopt;
    std::istringstream in(line->second);
    std::string offset_text, size_text, rest;
    in >> offset_text >> size_text >> rest;
    auto offset = record_number(offset_text), size = record_number(size_text);
    if (!offset || !size || !rest.empty())
        throw Error(std::string(boot_board_record_path) + ": expected uboot_env=OFFSET SIZE, not '"
                    + text::printable(line->second) + "'");
    UbootEnvPlace place{*offset, *size};
    // Past the partition table, MBR or GPT (34 sectors), in whole sectors.
    if (place.offset < 34 * 512 || place.offset % 512 || place.size < 512 || place.size % 512 || place.size > (1u << 20))
        throw Error(std::string(boot_board_record_path) + ": uboot_env=" + text::printable(line->second)
                    + " is no place for a U-Boot environment (whole 512-byte sectors past the partition table, "
                      "1 MiB at most)");
    return place;
}

std::optional<uint64_t> boot_state_offset(const std::map<std::string, std::string>& board)
{
    auto line = board.find("boot_state_offset");
    return line == board.end() ? std::nullopt : record_number(line->second);
}

std::vector<uint8_t> read_uboot_env_block(const std::string& card, const UbootEnvPlace& place, uint64_t card_size)
{
    if (place.offset > card_size || place.size > card_size - place.offset)
        throw Error("the U-Boot environment at " + text::hex(place.offset) + " lies past the end of " + card);
    UniqueFd fd(::open(card.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd)
        throw_errno("open " + card);
    std::vector<uint8_t> block(place.size);
    fs::read_at(fd.get(), reinterpret_cast<char*>(block.data()), block.size(), place.offset,
                "the U-Boot environment of " + card);
    return block;
}

BootStatus boot_status(const BootFiles& files, const std::vector<Deployment>& deployments)
{
    BootStatus status;
    status.entries.resize(deployments.size());
    auto limit = small_number(value_of(files.board, "bootlimit"));
    if (!limit || *limit == 0)
        return status;
    status.counting = true;
    status.bootlimit = *limit;
    status.known_good_deployment = value_of(files.ack, "treeflash_known_good");
    status.known_good_version = value_of(files.ack, "treeflash_known_good_version");

    // The mark counts only when it names one of the entries uEnv.txt has now,
    // exactly as the boot script compares it.
    std::string good = value_of(files.mark, "treeflash_good");
    std::string args1 = value_of(files.uenv, "bootargs");
    std::string args2 = value_of(files.uenv, "bootargs2");
    if (!good.empty() && good == args1)
        status.good_entry = 1;
    else if (!good.empty() && !args2.empty() && good == args2)
        status.good_entry = 2;
    if (status.good_entry == 2) {
        status.rolled_back_deployment = value_of(files.mark, "treeflash_rolled_back_deployment");
        status.rolled_back_version = value_of(files.mark, "treeflash_rolled_back_version");
    }
    if (files.tries_block) {
        // Tries whose last boot the system acknowledged belong to an earlier
        // trial: the boot script starts the current one from zero.
        std::string serial = value_of(*files.tries_block, "treeflash_serial");
        if (serial == value_of(files.ack, "treeflash_acked"))
            status.tries = 0;
        else
            status.tries = small_number(value_of(*files.tries_block, "treeflash_tries"));
    }

    auto& entries = status.entries;
    if (entries.empty())
        return status;
    if (status.good_entry == 1) {
        entries[0].state = "known good";
        if (entries.size() > 1)
            entries[1].state = "previous";
    } else if (status.good_entry == 2) {
        entries[0] = {"rolled back", status.bootlimit};
        if (entries.size() > 1)
            entries[1].state = "known good";
    } else if (entries.size() == 1) {
        entries[0].state = "new"; // nothing to fall back to: booted without counting, marked good once healthy
    } else {
        if (status.tries && *status.tries > status.bootlimit)
            entries[0] = {"rolled back", status.bootlimit};
        else
            entries[0] = {"trial", status.tries};
        entries[1].state = deployment_dir(deployments[1]) == status.known_good_deployment ? "known good" : "previous";
    }
    return status;
}

size_t fallback_deployment(const BootStatus& status, size_t deployment_count)
{
    if (!status.counting || deployment_count < 2 || status.good_entry == 1)
        return 0;
    // Rolled back, or a trial that has not proven itself: the deployment
    // before it is the one known to boot.
    return 1;
}

std::string deployment_name(const std::string& version, const std::string& deployment_dir)
{
    return (version.empty() ? std::string("unversioned") : version) + " (" + deployment_dir.substr(0, 12) + ")";
}

} // namespace treeflash::flasher
