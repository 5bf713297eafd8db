// treeflash flash: options -> flasher::FlashOptions -> flasher::flash -> report.
#include "cli/command.hpp"
#include "common/error.hpp"
#include "flasher/flash/flash.hpp"

#include <boost/program_options.hpp>
#include <cctype>
#include <cstdlib>
#include <iostream>
#include <unistd.h>

namespace po = boost::program_options;

namespace treeflash::cli {

namespace {

const char* flash_usage = R"(Usage: treeflash flash --board NAME|DIR (--device /dev/sdX | --image FILE) --repo PATH|URL [OPTIONS]

Partitions and formats the card as the board profile says, writes firmware
blobs into their slots, creates the OSTree sysroot on the rootfs partition
(init-fs, newroot/, mnt/, update, os-init), pulls REF from the repository,
deploys it with the board's kernel arguments and writes the U-Boot boot
script that loads the uEnv.txt OSTree keeps current. A --device needs root;
an --image does not (see --image-method).

A --device is checked first: never the disk holding /, never a mounted or
busy disk, never a partition; a non-removable disk needs --force. Its model,
serial, size and partitions are shown and you are asked before anything is
written, unless --yes.

An --image appears under its name only when complete, with IMAGE.bmap beside
it. Its empty file systems are copies, each with a UUID of its own, of ones
mkfs.ext4 made on an earlier flash of the same size, kept in
~/.cache/treeflash/blank-ext4 (TREEFLASH_BLANK_CACHE=off: mkfs.ext4 each
time). Flashes into one folder take turns, so an image, its .bmap, its
compressed form and the folder's SHA256SUMS come from one flash. The folder
must be one no other user can swap or empty meanwhile (a sticky one such as
/tmp is fine), and those files replace regular files only. A local --repo
that another user owns or may write is pulled with every object checked.

The pull takes the commit REF named when the flash was checked. From an
http:// URL or a local archive repository, treeflash fetches that commit's
objects itself first, on all cores, each checked against its checksum;
libostree's pull then checks the commit and its signature. Over http://
with --no-gpg-verify, once every object arrived, treeflash writes the
commit and its ref itself (after libostree's ref-binding check) and no
pull runs. https:// URLs and proxies are left to libostree.

Examples:
  treeflash flash --board ls104x --device /dev/sdb --repo http://10.0.0.2:8000/ \
      --gpg-import release.gpg --firmware rcw=bl2_sd.pbl --firmware fip=fip.bin
  treeflash flash --board qemu-arm64 --image card.img --repo build/example/repo --no-gpg-verify --json
  treeflash flash --board ls104x --image card.img --repo repo --no-gpg-verify --compress zst
      # card.img, card.img.bmap, card.img.zst and SHA256SUMS: publish the last three

Options)";

// "512M", "2G", "2048MiB", "1T": a whole number and a binary unit,
// rounded up to MiB. Anything else (negative, zero, a fraction written as
// "inf", an overflow) is refused.
std::optional<uint64_t> parse_size(const std::string& text)
{
    if (text.empty())
        return std::nullopt;
    size_t digits = 0;
    while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits])))
        ++digits;
    std::string usage = "--size '" + text + "': a whole number with a K, M, G or T suffix, e.g. 2G";
    if (digits == 0 || digits > 15)
        throw UsageError(usage);
    uint64_t value = std::stoull(text.substr(0, digits));
    std::string suffix = text.substr(digits);
    uint64_t unit = 0;
    for (const auto& [names, bytes] : {std::pair<std::vector<std::string>, uint64_t>{{"", "B"}, 1},
                                       {{"K", "KiB"}, 1ull << 10},
                                       {{"M", "MiB"}, 1ull << 20},
                                       {{"G", "GiB"}, 1ull << 30},
                                       {{"T", "TiB"}, 1ull << 40}})
        for (const auto& name : names)
            if (suffix == name)
                unit = bytes;
    if (!unit)
        throw UsageError(usage);
    if (value == 0)
        throw UsageError("--size '" + text + "': must be more than zero");
    if (value > (1ull << 50) / unit)
        throw UsageError("--size '" + text + "': larger than any card");
    uint64_t bytes = value * unit;
    return (bytes + (1 << 20) - 1) / (1 << 20) * (1 << 20);
}

bool ask_to_erase(const flasher::DiskInfo& disk, const flasher::PartitionLayout&)
{
    std::cerr << "About to erase " << disk.path << ":\n"
              << "  model:  " << (disk.vendor.empty() ? "" : disk.vendor + " ") << (disk.model.empty() ? "unknown" : disk.model) << "\n"
              << "  serial: " << (disk.serial.empty() ? "unknown" : disk.serial) << "\n"
              << "  size:   " << mib(disk.size) << (disk.removable ? " (removable)" : " (NOT removable)") << "\n";
    if (disk.partitions.empty())
        std::cerr << "  partitions: none\n";
    for (const auto& part : disk.partitions)
        std::cerr << "  " << part.node << "  " << mib(part.size) << "  " << (part.fstype.empty() ? "-" : part.fstype)
                  << (part.label.empty() ? "" : "  '" + part.label + "'") << "\n";
    if (!::isatty(0))
        throw UsageError("refusing to erase " + disk.path + " without confirmation: pass --yes");
    std::cerr << "Type 'yes' to erase everything on " << disk.path << ": " << std::flush;
    std::string answer;
    std::getline(std::cin, answer);
    return answer == "yes";
}

nlohmann::json to_json(const flasher::FlashResult& r)
{
    nlohmann::json partitions = nlohmann::json::array();
    for (const auto& p : r.partitions)
        partitions.push_back({{"number", p.number}, {"start", p.start}, {"size", p.size}, {"label", p.label},
                              {"fstype", p.fstype}, {"role", p.role}});
    return {
        {"board", r.board},
        {"target", r.target},
        {"partition_table", r.partition_table},
        {"partitions", partitions},
        {"firmware", r.firmware},
        {"image_method", r.image_method},
        {"os", r.deployment.os},
        {"commit", r.deployment.commit},
        {"version", r.deployment.version},
        {"bootcsum", r.deployment.bootcsum},
        {"ostree", r.deployment.ostree_path},
        {"kernel_args", r.deployment.kernel_args},
        {"bootargs", r.bootargs_line},
        {"remote_url", r.remote_url},
        {"gpg_verify", r.gpg_verify},
        {"bmap", r.bmap},
        {"compressed", r.compressed},
        {"sha256sums", r.sums},
        {"warnings", r.warnings},
    };
}

void print_text(const flasher::FlashResult& r)
{
    std::cout << "board:      " << r.board << "\n"
              << "target:     " << r.target << " (" << r.partition_table << ")\n";
    for (const auto& p : r.partitions)
        std::cout << "  p" << p.number << "  " << mib(p.start) << " +" << mib(p.size) << "  " << p.fstype << " '"
                  << p.label << "'" << (p.role.empty() ? "" : "  " + p.role) << "\n";
    for (const auto& f : r.firmware)
        std::cout << "firmware:   " << f << "\n";
    std::cout << "os:         " << r.deployment.os << "\n"
              << "commit:     " << r.deployment.commit
              << (r.deployment.version.empty() ? "" : " (version " + r.deployment.version + ")") << "\n"
              << "bootcsum:   " << r.deployment.bootcsum << "\n"
              << "ostree=     " << r.deployment.ostree_path << "\n"
              << "origin:     " << r.remote_url << (r.gpg_verify ? " (GPG-verified)" : " (not GPG-verified)") << "\n"
              << "U-Boot, if its environment is set by hand:\n  " << r.bootargs_line << "\n";
    if (!r.bmap.empty())
        std::cout << "bmap:       " << r.bmap << "\n";
    if (!r.compressed.empty())
        std::cout << "compressed: " << r.compressed << "\n"
                  << "sums:       " << r.sums << "\n";
}

} // namespace

int run_flash(const std::vector<std::string>& args, GCancellable* cancellable)
{
    flasher::FlashOptions options;
    std::string device, image, size, gpg_import, network_timeout;
    std::vector<std::string> firmware;
    bool json = false, yes = false;

    po::options_description desc(flash_usage);
    desc.add_options()
        ("help,h", "show this help")
        ("board", po::value(&options.board)->value_name("NAME|DIR"),
         "board profile: a name (ls104x, qemu-arm64) or a folder holding board.conf (required)")
        ("device", po::value(&device)->value_name("/dev/sdX"), "the whole card to erase and write")
        ("image", po::value(&image)->value_name("FILE"), "write an image file instead of a card")
        ("size", po::value(&size)->value_name("SIZE"),
         "image size, e.g. 2G or 512M (default: what the commit needs plus headroom, rounded up to a power "
         "of two on boards whose card needs one, such as qemu-raspi3b)")
        ("repo", po::value(&options.repo)->value_name("PATH|URL"),
         "the repository to pull from: a local path or http://HOST:PORT/ (required)")
        ("ref", po::value(&options.ref)->value_name("REF")->default_value("master"), "the branch to deploy")
        ("os", po::value(&options.os)->value_name("NAME")->default_value("tcu"), "the OS name (ostree admin os-init)")
        ("remote-url", po::value(&options.remote_url)->value_name("URL"),
         "where the card's origin remote points for upgrades (default: the URL pulled from)")
        ("gpg-import", po::value(&gpg_import)->value_name("KEYFILE"),
         "trust this GPG public key for origin and verify the pull (needed unless --no-gpg-verify)")
        ("no-gpg-verify", po::bool_switch(&options.no_gpg_verify),
         "let the card's origin take unsigned commits (gpg-verify=false)")
        ("karg", po::value(&options.kernel_args)->value_name("ARG")->composing(),
         "an extra kernel argument, e.g. --karg quiet; repeatable (all must fit arm64's 2048-byte command line)")
        ("firmware", po::value(&firmware)->value_name("NAME=FILE")->composing(),
         "write FILE into the board's firmware slot NAME (ls104x: rcw, fip, uboot-env, fman, qe, phy); repeatable")
        ("force", po::bool_switch(&options.force), "allow a --device that is not removable")
        ("overwrite", po::bool_switch(&options.overwrite), "replace an existing --image (and its .bmap and compressed form)")
        ("image-method", po::value(&options.image_method)->value_name("auto|loop|unprivileged")->default_value("auto"),
         "how --image is made: loop devices and mounts (root), or file systems built from directories with "
         "mkfs.ext4 -d (no root, loop devices or mounts; bit-reproducible for a commit, board, size and "
         "$SOURCE_DATE_EPOCH, which defaults to the commit's time); auto picks loop when it can")
        ("compress", po::value(&options.compress)->value_name("zst|xz|gz"),
         "--image: also leave IMAGE.zst (or .xz, .gz) and a SHA256SUMS for it and IMAGE.bmap, ready to publish")
        ("yes,y", po::bool_switch(&yes), "do not ask before erasing --device")
        ("network-timeout", po::value(&network_timeout)->value_name("SECONDS"),
         "give up a pull after this long without any data (default 30)")
        ("json", po::bool_switch(&json), "print the result as JSON on stdout");

    if (!parse_options(args, desc))
        return 0;
    if (options.board.empty())
        throw UsageError("--board is required");
    if (options.repo.empty())
        throw UsageError("--repo is required");
    if (device.empty() == image.empty())
        throw UsageError("name one target: --device or --image");
    if (!size.empty() && image.empty())
        throw UsageError("--size is for --image");
    if (options.overwrite && image.empty())
        throw UsageError("--overwrite is for --image (a --device is always erased, after confirmation)");
    if (options.force && device.empty())
        throw UsageError("--force is for --device; --overwrite replaces an existing --image");
    if (!device.empty())
        options.device = device;
    if (!image.empty())
        options.image = image;
    options.size = parse_size(size);
    if (!network_timeout.empty())
        options.network_timeout = static_cast<unsigned>(parse_count(network_timeout, "--network-timeout", 1, 86400));
    if (!gpg_import.empty())
        options.gpg_import = gpg_import;
    for (const auto& item : firmware) {
        auto eq = item.find('=');
        if (eq == 0 || eq == std::string::npos || eq + 1 == item.size())
            throw UsageError("--firmware '" + item + "': expected NAME=FILE");
        options.firmware[item.substr(0, eq)] = item.substr(eq + 1);
    }
    if (options.image_method != "auto" && options.image_method != "loop" && options.image_method != "unprivileged")
        throw UsageError("--image-method '" + options.image_method + "': auto, loop or unprivileged");
    if (!yes)
        options.confirm = ask_to_erase;
    options.notice = print_notice;

    // The reproducible-builds convention: one time for everything made.
    if (const char* epoch = std::getenv("SOURCE_DATE_EPOCH"); epoch && *epoch) {
        std::string text = epoch;
        if (text.size() > 12 || text.find_first_not_of("0123456789") != std::string::npos)
            throw UsageError("SOURCE_DATE_EPOCH '" + text + "': seconds since 1970, digits only");
        options.source_date_epoch = std::stoull(text);
        if (*options.source_date_epoch > flasher::latest_image_time)
            throw UsageError("SOURCE_DATE_EPOCH " + text + ": past what the image's file systems can hold ("
                             + std::to_string(flasher::latest_image_time) + ", in 2038)");
    }
    flasher::FlashResult result =
        in_step("flash " + (device.empty() ? image : device), [&] { return flasher::flash(options, cancellable); });
    for (const auto& warning : result.warnings)
        print_warning(warning);
    if (json)
        print_json(to_json(result));
    else
        print_text(result);
    return 0;
}

} // namespace treeflash::cli
