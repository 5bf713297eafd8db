#include "flasher/inspect/inspect.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/glib.hpp"
#include "flasher/boot/uboot_env.hpp"
#include "flasher/inspect/card_files.hpp"
#include "flasher/inspect/ext4_reader.hpp"

#include <algorithm>
#include <cstring>
#include <fcntl.h>
#include <regex>
#include <sstream>
#include <glib.h>
#include <linux/fs.h>
#include <memory>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// OSTree writes one entry per deployment, a handful at most; a hostile card
// may hold thousands.
constexpr size_t max_loader_entries = 64;

void read_origin(const std::string& repo_config, InspectResult& result)
{
    glib::KeyFile config(g_key_file_new());
    if (g_key_file_load_from_data(config.get(), repo_config.data(), repo_config.size(), G_KEY_FILE_NONE, nullptr)) {
        result.origin_url = glib::take_string(g_key_file_get_string(config.get(), "remote \"origin\"", "url", nullptr));
        result.origin_gpg_verify =
            glib::take_string(g_key_file_get_string(config.get(), "remote \"origin\"", "gpg-verify", nullptr));
    }
}

// The deployments, default first, read from the sysroot's own files as
// libostree lays them out: each boot loader entry's ostree= argument leads
// through ostree/boot.N -> boot.N.M and the entry's symlink to
// deploy/OS/deploy/COMMIT.SERIAL; its .origin and the commit object give
// the refspec and version. Only fixed names are followed, each checked.
// Files too large to be what they claim are named in `warnings`.
std::vector<Deployment> read_deployments(const CardView& card, std::vector<std::string>& warnings)
{
    struct Entry {
        std::string version;
        Deployment deployment;
    };
    std::vector<Entry> entries;
    std::string loader = card.link("boot/loader");
    if (loader != "loader.0" && loader != "loader.1")
        return {};
    // Each argument is matched alone and numbers have at most 9 digits: an
    // options line of a hostile card may be a MiB long.
    static const std::regex ostree_arg(R"(ostree=(/ostree/boot\.([01])/([A-Za-z0-9_.-]{1,255})/([0-9a-f]{64})/([0-9]{1,9})))");
    static const std::regex target_form(R"(\.\./\.\./\.\./deploy/([A-Za-z0-9_.-]{1,255})/deploy/([0-9a-f]{64})\.([0-9]{1,9}))");
    size_t conf_files = 0;
    for (const auto& name : card.list("boot/" + loader + "/entries")) {
        if (name.size() < 6 || name.substr(name.size() - 5) != ".conf")
            continue;
        if (++conf_files > max_loader_entries)
            break;
        std::map<std::string, std::string> fields;
        std::istringstream in(read_or_warn(card, "boot/" + loader + "/entries/" + name, "a loader entry", warnings));
        for (std::string line; std::getline(in, line);) {
            auto space = line.find(' ');
            if (space != std::string::npos && line[0] != '#')
                fields[line.substr(0, space)] = line.substr(space + 1);
        }
        const std::string& options = fields["options"];
        std::smatch m;
        std::string ostree_word;
        std::istringstream words(options);
        for (std::string word; words >> word;)
            if (word.rfind("ostree=", 0) == 0 && word.size() <= 512) {
                ostree_word = word;
                break;
            }
        if (!std::regex_match(ostree_word, m, ostree_arg))
            continue;
        Entry entry;
        entry.version = fields["version"];
        Deployment& d = entry.deployment;
        d.kernel_args = options;
        d.ostree_path = m[1];
        d.os = m[3];
        d.bootcsum = m[4];
        d.boot_serial = std::stoi(m[5]);
        std::string bootdir = "boot." + std::string(m[2]);
        std::string subdir = card.link("ostree/" + bootdir);
        if (subdir != bootdir + ".0" && subdir != bootdir + ".1")
            continue;
        std::string target = card.link("ostree/" + subdir + "/" + d.os + "/" + d.bootcsum + "/" + std::string(m[5]));
        std::smatch t;
        if (!std::regex_match(target, t, target_form) || t[1] != d.os)
            continue;
        d.commit = t[2];
        d.deploy_serial = std::stoi(t[3]);
        std::string dir = "ostree/deploy/" + d.os + "/deploy/" + d.commit + "." + std::string(t[3]);
        glib::KeyFile origin(g_key_file_new());
        std::string origin_text = read_or_warn(card, dir + ".origin", "an origin file", warnings);
        if (g_key_file_load_from_data(origin.get(), origin_text.data(), origin_text.size(), G_KEY_FILE_NONE, nullptr)) {
            d.origin_refspec = glib::take_string(g_key_file_get_string(origin.get(), "origin", "refspec", nullptr));
            d.pinned = g_key_file_get_boolean(origin.get(), "libostree-transient", "pinned", nullptr);
        }
        std::string commit_object = read_or_warn(
            card, "ostree/repo/objects/" + d.commit.substr(0, 2) + "/" + d.commit.substr(2) + ".commit", "a commit object", warnings);
        if (!commit_object.empty()) {
            glib::Variant commit(g_variant_ref_sink(g_variant_new_from_data(
                G_VARIANT_TYPE("(a{sv}aya(say)sstayay)"), g_memdup2(commit_object.data(), commit_object.size()),
                commit_object.size(), FALSE, g_free, nullptr)));
            glib::Variant metadata = glib::adopt_variant(g_variant_get_child_value(commit.get(), 0));
            const char* version = nullptr;
            if (g_variant_lookup(metadata.get(), "version", "&s", &version))
                d.version = version;
        }
        entries.push_back(entry);
    }
    // libostree's order: the entry with the highest version first.
    std::sort(entries.begin(), entries.end(),
              [](const Entry& a, const Entry& b) { return strverscmp(a.version.c_str(), b.version.c_str()) > 0; });
    std::vector<Deployment> out;
    for (auto& e : entries)
        out.push_back(std::move(e.deployment));
    return out;
}

} // namespace

InspectResult inspect(const std::string& path, GCancellable* cancellable)
{
    InspectResult result;
    result.target = path;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
        throw_errno(path);
    if (!S_ISBLK(st.st_mode) && !S_ISREG(st.st_mode))
        throw Error(path + " is neither a block device nor an image file");
    if (S_ISREG(st.st_mode)) {
        result.size = static_cast<uint64_t>(st.st_size);
    } else {
        UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
        if (!fd || ::ioctl(fd.get(), BLKGETSIZE64, &result.size) != 0)
            throw_errno("size of " + path);
    }
    // libfdisk answers "Invalid argument" for less than one sector: say
    // what it is instead.
    if (result.size == 0)
        throw Error(path + (S_ISREG(st.st_mode) ? " is empty (0 bytes): not an image" : " is empty (0 bytes): no card in the reader?"));
    if (result.size < 512)
        throw Error(path + " is " + std::to_string(result.size) + " bytes, less than one 512-byte sector: not an image");
    result.table = in_step("partition table", [&] { return read_partition_table(path); });
    // A truncated image, or a card smaller than its table: what is there is
    // still read, and the rest named.
    const std::string shorter = " the end of " + path + " (" + std::to_string(result.size)
                                + " bytes): a truncated image, or a card smaller than its table";
    for (const auto& entry : result.table.partitions) {
        std::string node = "p" + std::to_string(entry.number);
        FilesystemInfo filesystem;
        if (entry.start >= result.size) {
            result.warnings.push_back(node + ": starts past" + shorter);
        } else {
            uint64_t present = std::min(entry.size, result.size - entry.start);
            if (present < entry.size)
                result.warnings.push_back(node + ": ends " + std::to_string(entry.size - present) + " bytes past" + shorter);
            filesystem = probe_filesystem(path, entry.start, present);
        }
        result.partitions.push_back({entry, filesystem});
    }

    // The sysroot partition: an ext4 labelled rootfs first, then any other
    // ext4 in table order; the first of them holding ostree/repo.
    std::vector<const InspectedPartition*> order;
    for (const auto& part : result.partitions)
        if (part.filesystem.type == "ext4" && part.filesystem.label == "rootfs")
            order.push_back(&part);
    for (const auto& part : result.partitions)
        if (part.filesystem.type == "ext4" && part.filesystem.label != "rootfs")
            order.push_back(&part);

    for (const InspectedPartition* part : order) {
        if (cancellable && g_cancellable_is_cancelled(cancellable))
            throw Cancelled();
        std::string node = "p" + std::to_string(part->entry.number);
        // Read in place by libext2fs: no mount, no loop device, no journal
        // replayed, and no symlink on the card followed on the way. A file
        // system libext2fs refuses is reported; the others are still read.
        std::unique_ptr<Ext4Card> card;
        try {
            card = std::make_unique<Ext4Card>(path, part->entry.start);
        } catch (const Error& e) {
            result.warnings.push_back(node + ": " + e.what());
            continue;
        }
        if (card->type("boot.scr") == S_IFREG || card->type("boot/boot.scr") == S_IFREG)
            result.has_boot_script = true;
        if (card->type("ostree/repo") != S_IFDIR || result.sysroot_partition)
            continue;
        result.sysroot_partition = static_cast<int>(part->entry.number);
        result.has_update_marker = card->type("update") == S_IFREG;
        result.has_newroot = card->type("newroot") == S_IFDIR;
        result.has_mnt = card->type("mnt") == S_IFDIR;
        result.deployments = in_step("sysroot on " + node, [&] { return read_deployments(*card, result.warnings); });
        // boot/loader is a symlink OSTree flips between loader.0 and loader.1:
        // resolved by hand, to a name inside boot/ only.
        std::string loader = card->link("boot/loader");
        if (loader == "loader.0" || loader == "loader.1")
            result.uenv = parse_env_lines(read_or_warn(*card, "boot/" + loader + "/uEnv.txt", "a uEnv.txt", result.warnings));
        read_origin(read_or_warn(*card, "ostree/repo/config", "a repository config", result.warnings), result);
        BootFiles boot_files = read_boot_files(*card, path);
        result.boot = boot_status(boot_files, result.deployments);
        result.board_record = boot_files.board;
        try {
            if (auto place = uboot_env_place(boot_files.board))
            {
                std::vector<uint8_t> block = read_uboot_env_block(path, *place, result.size);
                result.uboot_env = read_uboot_env(block.data(), block.size());
            }
        } catch (const Error& e) {
            result.warnings.push_back(std::string("the U-Boot environment: ") + e.what());
        }
        if (card->type(auto_update_state_path) == S_IFREG)
            result.auto_update = parse_env_lines(
                read_or_warn(*card, auto_update_state_path, "the updater's state", result.warnings));
        if (!result.deployments.empty()) {
            const Deployment& d = result.deployments.front();
            std::string unit_file = "ostree/deploy/" + d.os + "/deploy/" + d.commit + "."
                                    + std::to_string(d.deploy_serial) + "/etc/treeflash/unit";
            if (card->type(unit_file) == S_IFREG)
                result.unit = parse_env_lines(read_or_warn(*card, unit_file, "the unit's identity", result.warnings));
        }
    }
    return result;
}

} // namespace treeflash::flasher
