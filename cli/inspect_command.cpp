// treeflash inspect: flasher::inspect -> text or JSON. Never writes.
#include "cli/command.hpp"
#include "common/error.hpp"
#include "common/text.hpp"
#include "flasher/inspect/inspect.hpp"

#include <boost/program_options.hpp>
#include <iostream>
#include <regex>

namespace po = boost::program_options;

namespace treeflash::cli {

namespace {

const char* inspect_usage = R"(Usage: treeflash inspect DEVICE|IMAGE [--json]

Shows what is on a flashed card or image without writing to it: partition
table, labels and file systems, the OSTree deployments (commit, version,
serial, default and rollback), on a board that counts boots each
deployment's state (known good, trial with the tries used, rolled back), the
origin URL, the bootargs in uEnv.txt, whether newroot/, mnt/ and the
update marker are present, and the board updater's last check (its outcome
and the commits it saw). File systems are read in place through
libext2fs: nothing is mounted or attached, no symlink on the card is
followed, and read permission on the card or image is all it needs. A file
system that cannot be read, or a partition past the end of a truncated image
or a smaller card, is named in a warning and the rest is shown; control
characters from the card are printed as \xNN.

Example:
  treeflash inspect /dev/sdb
  treeflash inspect build/example/ls104x.img --json

Options)";

// "trial (1 of 3 tries used)", "known good", ...: "" when not counted.
std::string boot_state_text(const flasher::BootStatus& boot, size_t index)
{
    if (!boot.counting || index >= boot.entries.size())
        return "";
    const auto& entry = boot.entries[index];
    std::string limit = std::to_string(boot.bootlimit);
    if (entry.state == "trial")
        return entry.tries ? "trial (" + std::to_string(*entry.tries) + " of " + limit + " tries used)"
                           : "trial (tries unknown: the counting block is unreadable)";
    if (entry.state == "rolled back")
        return "rolled back after " + limit + " failed tries";
    if (entry.state == "new")
        return "new (the only deployment: not counted, marked good at its first healthy boot)";
    return entry.state;
}

nlohmann::json boot_json(const flasher::BootStatus& boot)
{
    nlohmann::json out = {{"counting", boot.counting}};
    if (!boot.counting)
        return out;
    out["bootlimit"] = boot.bootlimit;
    out["good_entry"] = boot.good_entry;
    out["tries"] = boot.tries ? nlohmann::json(*boot.tries) : nlohmann::json();
    out["known_good"] = {{"deployment", boot.known_good_deployment}, {"version", boot.known_good_version}};
    if (!boot.rolled_back_deployment.empty())
        out["rolled_back"] = {{"deployment", boot.rolled_back_deployment},
                              {"commit", boot.rolled_back_deployment.substr(0, boot.rolled_back_deployment.find('.'))},
                              {"version", boot.rolled_back_version}};
    return out;
}

const char* role_of(size_t index)
{
    return index == 0 ? "default" : index == 1 ? "rollback" : "other";
}

} // namespace

int run_inspect(const std::vector<std::string>& args, GCancellable* cancellable)
{
    std::string target;
    bool json = false;
    po::options_description desc(inspect_usage);
    desc.add_options()
        ("help,h", "show this help")
        ("target", po::value(&target)->value_name("DEVICE|IMAGE"), "the card or image to read")
        ("json", po::bool_switch(&json), "print the result as JSON on stdout");
    po::positional_options_description positional;
    positional.add("target", 1);
    if (!parse_options(args, desc, &positional))
        return 0;
    if (target.empty())
        throw UsageError("name a DEVICE or IMAGE");

    flasher::InspectResult r = in_step("inspect " + target, [&] { return flasher::inspect(target, cancellable); });
    if (json) {
        nlohmann::json partitions = nlohmann::json::array();
        for (const auto& p : r.partitions)
            partitions.push_back({{"number", p.entry.number}, {"start", p.entry.start}, {"size", p.entry.size},
                                  {"bootable", p.entry.bootable}, {"type", p.entry.type},
                                  {"fstype", p.filesystem.type}, {"label", p.filesystem.label}});
        nlohmann::json deployments = nlohmann::json::array();
        for (size_t i = 0; i < r.deployments.size(); ++i) {
            nlohmann::json d = deployment_json(r.deployments[i]);
            d["role"] = role_of(i);
            if (r.boot.counting && i < r.boot.entries.size()) {
                d["boot_state"] = r.boot.entries[i].state;
                d["boot_tries"] = r.boot.entries[i].tries ? nlohmann::json(*r.boot.entries[i].tries) : nlohmann::json();
            }
            deployments.push_back(d);
        }
        print_json({{"target", r.target},
                    {"size", r.size},
                    {"partition_table", r.table.label},
                    {"disk_id", r.table.id},
                    {"partitions", partitions},
                    {"sysroot_partition", r.sysroot_partition},
                    {"deployments", deployments},
                    {"origin_url", r.origin_url},
                    {"origin_gpg_verify", r.origin_gpg_verify},
                    {"uenv", r.uenv},
                    {"update_marker", r.has_update_marker},
                    {"newroot", r.has_newroot},
                    {"mnt", r.has_mnt},
                    {"boot_script", r.has_boot_script},
                    {"boot_counting", boot_json(r.boot)},
                    {"auto_update", r.auto_update.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.auto_update)},
                    {"unit", r.unit.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.unit)},
                    {"uboot_env", r.uboot_env.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.uboot_env)},
                    {"warnings", r.warnings}});
        return 0;
    }
    // Every string below except sizes and numbers comes from the card:
    // printed through text::printable, so it cannot drive the terminal.
    using text::printable;
    std::cout << r.target << ": " << mib(r.size) << ", " << (r.table.label.empty() ? "no partition table" : r.table.label)
              << (r.table.id.empty() ? "" : " " + printable(r.table.id)) << "\n";
    for (const auto& p : r.partitions)
        std::cout << "  p" << p.entry.number << "  " << mib(p.entry.start) << " +" << mib(p.entry.size) << "  "
                  << (p.filesystem.type.empty() ? "-" : printable(p.filesystem.type))
                  << (p.filesystem.label.empty() ? "" : " '" + printable(p.filesystem.label) + "'")
                  << (p.entry.bootable ? "  bootable" : "") << "\n";
    for (const auto& warning : r.warnings)
        std::cout << "warning: " << printable(warning) << "\n";
    if (!r.sysroot_partition) {
        std::cout << "no OSTree sysroot found\n";
        return 0;
    }
    std::cout << "sysroot on p" << r.sysroot_partition << ": update marker " << (r.has_update_marker ? "yes" : "NO")
              << ", newroot/ " << (r.has_newroot ? "yes" : "NO") << ", mnt/ " << (r.has_mnt ? "yes" : "NO")
              << ", boot.scr " << (r.has_boot_script ? "yes" : "NO") << "\n";
    std::cout << "origin: " << (r.origin_url.empty() ? "none" : printable(r.origin_url))
              << (r.origin_gpg_verify == "false" ? " (gpg-verify=false)" : "") << "\n";
    for (size_t i = 0; i < r.deployments.size(); ++i) {
        const auto& d = r.deployments[i];
        std::cout << role_of(i) << ": " << d.os << " " << d.commit << "." << d.deploy_serial
                  << (d.version.empty() ? "" : " version " + printable(d.version)) << "\n    ostree=" << d.ostree_path << "\n";
        if (std::string state = boot_state_text(r.boot, i); !state.empty())
            std::cout << "    boot: " << state << "\n";
    }
    if (r.boot.counting) {
        std::cout << "boot counting: bootlimit " << r.boot.bootlimit;
        if (!r.boot.rolled_back_deployment.empty())
            std::cout << "; rolled back from "
                      << printable(flasher::deployment_name(r.boot.rolled_back_version, r.boot.rolled_back_deployment));
        std::cout << "\n";
    }
    if (!r.auto_update.empty()) {
        auto value = [&](const char* key) {
            auto it = r.auto_update.find(key);
            return it == r.auto_update.end() ? std::string() : printable(it->second);
        };
        std::cout << "updater: " << (value("outcome").empty() ? "?" : value("outcome")) << " at "
                  << (value("checked").empty() ? "?" : value("checked")) << ": " << value("message") << "\n";
        if (!value("refused").empty())
            std::cout << "    refuses " << value("refused") << " (it rolled back on this board)\n";
    }
    if (!r.unit.empty()) {
        std::cout << "unit:";
        for (const auto& [key, value] : r.unit)
            std::cout << " " << printable(key) << "=" << printable(value);
        std::cout << "\n";
    }
    // A unit's identity in U-Boot's environment, as the board's U-Boot
    // hands it to the kernel and the network.
    std::string uboot_identity;
    for (const auto& [key, value] : r.uboot_env)
        if (key == "serial#" || std::regex_match(key, std::regex("eth[0-9]*addr")))
            uboot_identity += " " + printable(key) + "=" + printable(value);
    if (!uboot_identity.empty())
        std::cout << "U-Boot environment:" << uboot_identity << "\n";
    if (r.uenv.count("bootargs"))
        std::cout << "uEnv.txt bootargs: " << printable(r.uenv["bootargs"]) << "\n";
    return 0;
}

} // namespace treeflash::cli
