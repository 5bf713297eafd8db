// treeflash build: options -> builder::BuildOptions -> builder::build -> report.
#include "builder/build.hpp"
#include "cli/command.hpp"
#include "common/error.hpp"
#include "common/glib.hpp"

#include <boost/program_options.hpp>
#include <cstdlib>
#include <iostream>

namespace po = boost::program_options;

namespace treeflash::cli {

namespace {

const char* build_usage = R"(Usage: treeflash build --rootfs DIR|TARBALL --repo REPO [OPTIONS]

Turns a rootfs into a commit on BRANCH of the OSTree repository REPO (an
archive repository, created when missing) and regenerates its summary.
The input is never modified. The rootfs is normalized as OSTree needs it:
/etc moves to /usr/etc, usr/lib/os-release is written when missing, and
sysroot/, ostree -> sysroot/ostree and empty dev proc sys run tmp var boot
are added. Device nodes, FIFOs and sockets are dropped with a warning, and
a rootfs without an executable usr/bin/ostree is named in one (a board
running it could not update itself). --program adds a program of another
tree (ostree, gpg) with exactly the libraries it needs.

Two scripts are added and started from a busybox /etc/inittab:
usr/lib/treeflash/boot-health (marks a healthy boot good, for boot
counting) and usr/lib/treeflash/auto-update (the board follows its origin:
checks at boot and every four hours, pulls, deploys, reboots; settings in
/etc/treeflash/auto-update.conf). --no-boot-health, --no-auto-update leave
them out.

Prints the commit checksum on stdout. A build whose tree and message equal
the branch's last commit adds no commit and prints that one.

Examples:
  treeflash build --rootfs rootfs/ --repo repo \
      --kernel Image --devicetree fsl-ls1043a-rdb.dtb --initramfs initramfs.img \
      --subject "image v1 (ls104x) rootfs" --version 1.0 \
      --userland userland/ --program usr/bin/ostree --program usr/bin/gpg
  SOURCE_DATE_EPOCH=1700000000 treeflash build --rootfs rootfs.tar.zst --repo repo --json

Options)";

// Seconds since the epoch ("1700000000", "@1700000000") or ISO 8601, up to
// the year 9999. `option` names where the text came from.
uint64_t parse_timestamp(const std::string& text, const std::string& option = "--timestamp")
{
    constexpr uint64_t year_9999_end = 253402300799;
    std::string digits = text.size() > 1 && text[0] == '@' ? text.substr(1) : text;
    if (!digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos)
        return parse_count(digits, option, 0, year_9999_end);
    glib::TimeZone utc(g_time_zone_new_utc());
    glib::DateTime parsed(g_date_time_new_from_iso8601(text.c_str(), utc.get()));
    if (!parsed)
        throw UsageError(option + " '" + text + "': use seconds since the epoch or ISO 8601 (2024-05-01T12:00:00Z)");
    gint64 seconds = g_date_time_to_unix(parsed.get());
    if (seconds < 0)
        throw UsageError(option + " '" + text + "' is before 1970");
    return static_cast<uint64_t>(seconds);
}

std::map<std::string, std::string> parse_key_values(const std::vector<std::string>& items, const char* option)
{
    std::map<std::string, std::string> out;
    for (const auto& item : items) {
        auto eq = item.find('=');
        if (eq == 0 || eq == std::string::npos)
            throw UsageError(std::string(option) + " '" + item + "': expected KEY=VALUE");
        std::string key = item.substr(0, eq);
        for (char c : key)
            if (!(isupper(static_cast<unsigned char>(c)) || isdigit(static_cast<unsigned char>(c)) || c == '_'))
                throw UsageError(std::string(option) + " '" + item + "': keys are upper case, digits and _");
        out[key] = item.substr(eq + 1);
    }
    return out;
}

nlohmann::json to_json(const builder::BuildResult& result)
{
    return {
        {"commit", result.commit.commit},
        {"ref", result.ref},
        {"parent", result.commit.parent.empty() ? nlohmann::json(nullptr) : nlohmann::json(result.commit.parent)},
        {"static_deltas_from", result.commit.deltas_from},
        {"unchanged", result.commit.unchanged},
        {"repo", result.repo.string()},
        {"created_repo", result.created_repo},
        {"bootcsum", result.kernel.bootcsum},
        {"kernel_layout", builder::to_string(result.kernel.layout)},
        {"kernel_files", result.kernel.placed},
        {"kernel_from_rootfs", result.kernel.from_rootfs},
        {"files", result.commit.files},
        {"bytes", result.commit.bytes},
        {"objects_written", result.commit.objects_written},
        {"var_entries", result.normalize.var_entries.size()},
        {"boot_health_hook", result.normalize.boot_health_hook},
        {"auto_update_hook", result.normalize.auto_update_hook},
        {"programs", {{"added", result.programs.added}, {"kept", result.programs.kept}, {"bytes", result.programs.bytes}}},
        {"warnings", result.warnings},
    };
}

} // namespace

int run_build(const std::vector<std::string>& args, GCancellable* cancellable)
{
    builder::BuildOptions options;
    std::string rootfs, repo, userland, layout = "legacy", timestamp, kernel, initramfs, gpg_key, gpg_home, owner_uid, owner_gid, jobs, static_deltas;
    std::vector<std::string> devicetrees, os_release, programs;
    bool json = false, static_delta = false, force = false, no_boot_health = false, no_auto_update = false;

    po::options_description desc(build_usage);
    desc.add_options()
        ("help,h", "show this help")
        ("rootfs", po::value(&rootfs)->value_name("DIR|TARBALL"),
         "the root filesystem: a directory, or a .tar/.tar.gz/.tar.xz/.tar.zst (required)")
        ("repo", po::value(&repo)->value_name("REPO"), "the OSTree repository; created in archive mode when missing (required)")
        ("branch", po::value(&options.commit.branch)->value_name("REF")->default_value("master"), "the branch to commit to")
        ("subject", po::value(&options.commit.subject)->value_name("TEXT"),
         "commit subject (default: \"OS [VERSION ]rootfs\"), e.g. \"image v1 (ls104x) rootfs\"")
        ("body", po::value(&options.commit.body)->value_name("TEXT"), "commit body")
        ("version", po::value(&options.commit.version)->value_name("V"),
         "the commit's version metadata and os-release VERSION_ID, e.g. 1.0")
        ("kernel", po::value(&kernel)->value_name("FILE"),
         "the kernel image (raw arm64 Image); without it the rootfs must carry one")
        ("initramfs", po::value(&initramfs)->value_name("FILE"), "the initramfs to deploy with the kernel")
        ("devicetree", po::value(&devicetrees)->value_name("FILE")->composing(),
         "a devicetree blob; repeat for several (modules layout only)")
        ("kernel-layout", po::value(&layout)->value_name("legacy|modules")->default_value("legacy"),
         "legacy: usr/lib/ostree-boot/vmlinuz-SHA256...; modules: usr/lib/modules/KVER/vmlinuz...")
        ("kver", po::value(&options.kernel.kver)->value_name("KVER"),
         "kernel version for the modules layout (default: from vmlinuz-KVER or usr/lib/modules/)")
        ("os", po::value(&options.normalize.os_name)->value_name("NAME")->default_value("tcu"),
         "the OS name a generated os-release carries (ID and NAME)")
        ("os-release", po::value(&os_release)->value_name("KEY=VALUE")->composing(),
         "set a key of usr/lib/os-release, e.g. PRETTY_NAME=\"TCU 1.0\"; repeatable")
        ("no-boot-health", po::bool_switch(&no_boot_health),
         "do not add usr/lib/treeflash/boot-health (which marks a deployment good on boards that count boots) "
         "nor its line in a busybox /etc/inittab")
        ("no-auto-update", po::bool_switch(&no_auto_update),
         "do not add usr/lib/treeflash/auto-update (the board's own updater: it follows the card's origin, "
         "pulls, deploys and reboots into new commits), its settings /etc/treeflash/auto-update.conf, nor its "
         "inittab line")
        ("userland", po::value(&userland)->value_name("DIR"),
         "a tree (Debian packages unpacked into one folder) that --program reads from")
        ("program", po::value(&programs)->value_name("PATH")->composing(),
         "add this program of --userland (e.g. usr/bin/ostree) at its path, with the loader and the libraries "
         "its ELF headers ask for that the rootfs lacks (into usr/lib); repeatable")
        ("timestamp", po::value(&timestamp)->value_name("T"),
         "commit time, seconds since the epoch or ISO 8601 (default: $SOURCE_DATE_EPOCH, else now); "
         "equal inputs and timestamp give an equal commit")
        ("gpg-sign", po::value(&gpg_key)->value_name("KEYID"), "sign the commit and the summary with this GPG key")
        ("gpg-homedir", po::value(&gpg_home)->value_name("DIR"), "GPG home directory holding the key")
        ("static-delta", po::bool_switch(&static_delta), "also generate a static delta from the previous commit")
        ("static-deltas", po::value(&static_deltas)->value_name("N"),
         "static deltas from each of the branch's last N commits (a board N releases behind fetches one delta)")
        ("force-commit", po::bool_switch(&force), "commit even when nothing changed since the last commit")
        ("owner-uid", po::value(&owner_uid)->value_name("UID"),
         "commit every file as owned by this user id (default: the files' own; 0 for a directory read without root)")
        ("owner-gid", po::value(&owner_gid)->value_name("GID"), "commit every file as owned by this group id")
        ("jobs", po::value(&jobs)->value_name("N"), "threads writing objects, 1 to 256 (default: one per CPU)")
        ("json", po::bool_switch(&json), "print the result as JSON on stdout");

    if (!parse_options(args, desc))
        return 0;
    if (rootfs.empty())
        throw UsageError("--rootfs is required");
    if (repo.empty())
        throw UsageError("--repo is required");
    if (!gpg_home.empty() && gpg_key.empty())
        throw UsageError("--gpg-homedir needs --gpg-sign");
    if ((!initramfs.empty() || !devicetrees.empty()) && kernel.empty())
        throw UsageError("--initramfs and --devicetree need --kernel");

    options.rootfs = rootfs;
    options.repo = repo;
    try {
        options.kernel.layout = builder::parse_kernel_layout(layout);
    } catch (const Error& e) {
        throw UsageError(e.what());
    }
    if (!kernel.empty())
        options.kernel.kernel = kernel;
    if (!initramfs.empty())
        options.kernel.initramfs = initramfs;
    for (const auto& dtb : devicetrees)
        options.kernel.devicetrees.emplace_back(dtb);
    options.normalize.version = options.commit.version;
    options.normalize.boot_health = !no_boot_health;
    options.normalize.auto_update = !no_auto_update;
    if (!userland.empty() && programs.empty())
        throw UsageError("--userland needs --program, the programs to add from it");
    options.programs.userland = userland;
    options.programs.programs = programs;
    options.normalize.os_release = parse_key_values(os_release, "--os-release");
    if (!timestamp.empty())
        options.commit.timestamp = parse_timestamp(timestamp);
    else if (const char* epoch = std::getenv("SOURCE_DATE_EPOCH"); epoch && *epoch)
        options.commit.timestamp = parse_timestamp(epoch, "SOURCE_DATE_EPOCH");
    if (!gpg_key.empty())
        options.commit.gpg = builder::GpgSigning{gpg_key, gpg_home};
    options.commit.static_deltas = static_delta ? 1 : 0;
    if (!static_deltas.empty()) {
        if (static_delta)
            throw UsageError("--static-delta and --static-deltas: give one");
        options.commit.static_deltas = static_cast<unsigned>(parse_count(static_deltas, "--static-deltas", 1, 64));
    }
    if (!owner_uid.empty())
        options.owners.uid = static_cast<uid_t>(parse_count(owner_uid, "--owner-uid", 0, 0xfffffffe));
    if (!owner_gid.empty())
        options.owners.gid = static_cast<gid_t>(parse_count(owner_gid, "--owner-gid", 0, 0xfffffffe));
    if (!jobs.empty())
        options.commit.jobs = static_cast<unsigned>(parse_count(jobs, "--jobs", 1, 256));
    options.commit.force = force;

    builder::BuildResult result = in_step("build", [&] { return builder::build(options, cancellable, print_notice); });
    for (const auto& warning : result.warnings)
        print_warning(warning);
    if (json)
        print_json(to_json(result));
    else
        std::cout << result.commit.commit << "\n";
    return 0;
}

} // namespace treeflash::cli
