// flash --image without loop devices, mounts or root: the sysroot and the
// boot files laid out in scratch trees, each file system made from its tree
// by mkfs.ext4 -d at its partition's offset, all as root of a user
// namespace of its own (unprivileged/userns.hpp).
#include "flasher/flash/steps.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/text.hpp"
#include "flasher/boot/boot_state.hpp"
#include "flasher/boot/bootscript.hpp"
#include "flasher/disk/format.hpp"
#include "flasher/unprivileged/reproducible.hpp"
#include "flasher/unprivileged/userns.hpp"

#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <optional>
#include <sys/mount.h>
#include <memory>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

using text::hex;

namespace {

constexpr const char* scratch_prefix = ".treeflash-tree-";

// Trees of unprivileged flashes that were killed (no live process holds
// their lock) are removed; a Ctrl-C removes its own on the way out.
void reclaim_stale_trees(const std::filesystem::path& parent, const std::function<void(const std::string&)>& notice)
{
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(parent, ec)) {
        std::string name = entry.path().filename().string();
        if (name.rfind(scratch_prefix, 0) != 0 || !entry.is_directory(ec) || entry.is_symlink(ec))
            continue;
        UniqueFd dir(::open(entry.path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!dir || ::flock(dir.get(), LOCK_EX | LOCK_NB) != 0)
            continue; // a live flash works there
        struct stat st {};
        if (::fstat(dir.get(), &st) != 0 || st.st_uid != ::geteuid())
            continue; // someone else's
        fs::remove_tree_quietly(entry.path());
        if (std::filesystem::exists(std::filesystem::symlink_status(entry.path(), ec)))
            notice("could not remove all of " + entry.path().string() + ", left by an interrupted flash");
        else
            notice("removed " + entry.path().string() + ", left by an interrupted flash");
    }
}

// A scratch tree for this flash, locked while this process lives so that a
// later flash knows it is not stale. Another flash of the same user may
// reclaim it between its creation and the lock: then it is made again.
std::pair<fs::TempDir, UniqueFd> locked_scratch_tree(const std::filesystem::path& parent)
{
    for (int attempt = 0;; ++attempt) {
        fs::TempDir tree(parent, scratch_prefix);
        UniqueFd lock(::open(tree.path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (lock && ::flock(lock.get(), LOCK_EX | LOCK_NB) == 0 && fs::still_at(lock.get(), tree.path()))
            return {std::move(tree), std::move(lock)};
        if (attempt == 5)
            throw Error("could not lock a scratch tree in " + parent.string()
                        + ": other flashes keep removing them");
    }
}

// The job the helper gets, as JSON, and what it sends back.
using json = nlohmann::json;

json sysroot_to_json(const SysrootOptions& o)
{
    return {{"os", o.os},
            {"untrusted_pull", o.untrusted_pull},
            {"remote", o.remote},
            {"remote_url", o.remote_url},
            {"pull_url", o.pull_url},
            {"ref", o.ref},
            {"commit", o.commit},
            {"gpg_key", o.gpg_key ? o.gpg_key->string() : ""},
            {"kernel_args", o.kernel_args},
            {"network_timeout", o.network_timeout},
            {"require_devicetree", o.require_devicetree}};
}

SysrootOptions sysroot_from_json(const json& j)
{
    SysrootOptions o;
    o.os = j.at("os");
    o.untrusted_pull = j.at("untrusted_pull");
    o.remote = j.at("remote");
    o.remote_url = j.at("remote_url");
    o.pull_url = j.at("pull_url");
    o.ref = j.at("ref");
    o.commit = j.at("commit");
    if (std::string key = j.at("gpg_key"); !key.empty())
        o.gpg_key = key;
    o.kernel_args = j.at("kernel_args").get<std::vector<std::string>>();
    o.require_devicetree = j.at("require_devicetree");
    o.network_timeout = j.at("network_timeout");
    return o;
}

json deployment_to_json(const Deployment& d)
{
    return {{"os", d.os},
            {"commit", d.commit},
            {"version", d.version},
            {"bootcsum", d.bootcsum},
            {"deploy_serial", d.deploy_serial},
            {"boot_serial", d.boot_serial},
            {"origin_refspec", d.origin_refspec},
            {"kernel_args", d.kernel_args},
            {"ostree_path", d.ostree_path},
            {"pinned", d.pinned}};
}

Deployment deployment_from_json(const json& j)
{
    Deployment d;
    d.os = j.at("os");
    d.commit = j.at("commit");
    d.version = j.at("version");
    d.bootcsum = j.at("bootcsum");
    d.deploy_serial = j.at("deploy_serial");
    d.boot_serial = j.at("boot_serial");
    d.origin_refspec = j.at("origin_refspec");
    d.kernel_args = j.at("kernel_args");
    d.ostree_path = j.at("ostree_path");
    d.pinned = j.at("pinned");
    return d;
}

// Whether `path` lies in /dev/shm, which the helper covers with a tmpfs of
// its own.
bool in_shared_memory(const std::filesystem::path& path)
{
    std::error_code ec;
    std::string resolved = std::filesystem::weakly_canonical(std::filesystem::absolute(path, ec), ec).string();
    return resolved == "/dev/shm" || resolved.rfind("/dev/shm/", 0) == 0;
}

// The sysroot laid out, the deployment listed, the boot files made and
// every file system written into the image: the helper's job.
void lay_out_and_make_file_systems(const json& job, const NamespaceChannel& channel)
{
    std::filesystem::path scratch;
    if (job.contains("memory")) {
        // The trees live in a tmpfs that only this namespace sees: when
        // this process dies, for whatever reason, they are gone with it.
        std::string options = "mode=0700,size=" + std::to_string(job.at("memory").get<uint64_t>());
        if (::mount("treeflash", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, options.c_str()) != 0)
            throw_errno("mount a tmpfs for the trees");
        scratch = "/dev/shm";
    } else {
        scratch = job.at("scratch").get<std::string>();
    }
    std::filesystem::path rootfs = scratch / "rootfs", boot = scratch / "boot";
    std::filesystem::create_directories(rootfs);
    std::filesystem::create_directories(boot);
    auto notice = [&](const std::string& text) { channel.notice(text); };

    in_step("sysroot", [&] {
        SysrootOptions sysroot = sysroot_from_json(job.at("sysroot"));
        sysroot.download_dir = scratch;
        sysroot.sync_while_fetching = false; // scratch space, copied into the image later
        provision_sysroot(rootfs, sysroot, notice, nullptr);
        if (std::string record = job.at("board_record"); !record.empty()) {
            std::filesystem::create_directories(rootfs / "boot/treeflash");
            fs::write_file_atomic(rootfs / boot_board_record_path, record);
        }
        auto deployments = list_deployments(rootfs, nullptr);
        if (deployments.empty())
            throw Error("no deployment after deploying");
        channel.data(deployment_to_json(deployments.front()).dump());
    });
    in_step("boot script", [&] {
        BoardProfile board;
        board.name = job.at("board").get<std::string>();
        board.arch = job.at("arch").get<std::string>();
        write_boot_script(board, job.at("boot_script").get<std::string>(), boot, job.at("time").get<uint64_t>());
    });
    for (const auto& made : job.at("file_systems")) {
        std::string label = made.at("label");
        uint64_t offset = made.at("offset");
        channel.notice("making ext4 '" + label + "' at " + hex(offset) + " in the image");
        in_step("format p" + std::to_string(made.at("partition").get<unsigned>()), [&] {
            std::string content = made.at("content");
            ReproducibleExt4 same{made.at("uuid").get<std::string>(), made.at("hash_seed").get<std::string>(),
                                  job.at("time").get<uint64_t>()};
            make_ext4_in_image(job.at("image").get<std::string>(), offset, made.at("size").get<uint64_t>(), label,
                               made.at("options").get<std::vector<std::string>>(),
                               content.empty() ? std::filesystem::path() : scratch / content, same);
        });
    }
}

} // namespace

int run_image_trees_helper(const std::vector<std::string>& args)
{
    return run_namespace_helper([&](const NamespaceChannel& channel) {
        if (args.size() != 1)
            throw Error(std::string(image_trees_command) + ": one JSON job expected");
        lay_out_and_make_file_systems(json::parse(args[0]), channel);
    });
}

// The same card as write_card, made without loop devices, mounts or root:
// the sysroot is laid out in a scratch directory (libostree's init-fs,
// os-init, pull and deploy work on any directory), the boot files in
// another, and mkfs.ext4 -d creates each file system straight into the
// image at its partition's offset. A helper does all of that as root of a
// user namespace of its own, so the files are root's in the image whoever
// runs this, and nothing libostree tries (freezing the file system under
// /boot) reaches the host. Returns the thread removing the trees, still at
// work (none when they lived in the helper's memory).
std::jthread write_image_from_directories(const FlashPlan& plan, Target& target, FlashResult& result,
                                  const std::function<void(const std::string&)>& notice, GCancellable* cancellable)
{
    const BoardProfile& board = plan.board;
    // Everything that would be random or the current time derives from what
    // the image is: the commit, the board and the size, and one time.
    std::string identity = plan.source.commit + "\n" + board.name + "\n" + std::to_string(plan.image_size) + "\n";
    notice("partitioning " + target.image().string() + " (" + plan.layout.label + ", without loop devices)");
    in_step("partition", [&] {
        write_partition_table(target.fd(), target.device(), board.partition_table, true, derived_disk_id(identity));
    });
    in_step("firmware", [&] { write_firmware(target.fd(), plan.firmware); });
    describe_firmware(plan, result);
    PartitionTable table = in_step("partition", [&] { return read_partition_table(target.device()); });

    bool as_root = ::geteuid() == 0;
    SysrootOptions sysroot = plan.sysroot;
    // As root every owner is mapped (userns.cpp), and objects may be copied
    // as files from a local repository; a plain user's namespace cannot give
    // them their owners, so each is checked and written instead.
    sysroot.untrusted_pull = sysroot.untrusted_pull || !as_root;
    json job = {{"image", target.device()},
                {"sysroot", sysroot_to_json(sysroot)},
                {"board_record", boot_board_record(board, renders_uboot_env(board, plan.firmware))},
                {"board", board.name},
                {"arch", board.arch},
                {"boot_script", plan.boot_script},
                {"time", plan.source_date_epoch},
                {"file_systems", json::array()}};
    for (const auto& role : board.partitions) {
        const PartitionEntry* entry = nullptr;
        for (const auto& e : table.partitions)
            if (e.number == role.number)
                entry = &e;
        if (!entry)
            throw Error("partition " + std::to_string(role.number) + " is missing from the table just written");
        std::vector<std::string> mkfs_options = board.mkfs_ext4_options;
        if (role.number == board.rootfs_partition && plan.rootfs_inodes) {
            mkfs_options.push_back("-N");
            mkfs_options.push_back(std::to_string(plan.rootfs_inodes));
        }
        std::string seed = identity + std::to_string(role.number);
        job["file_systems"].push_back({{"partition", role.number},
                                       {"offset", entry->start},
                                       {"size", entry->size},
                                       {"label", role.label},
                                       {"fstype", role.fstype},
                                       {"options", mkfs_options},
                                       {"content", role.number == board.rootfs_partition ? "rootfs"
                                                   : role.number == board.boot_partition ? "boot" : ""},
                                       {"uuid", derived_uuid(seed + "\nfilesystem")},
                                       {"hash_seed", derived_uuid(seed + "\nhash seed")}});
    }

    // The trees are written once and read once by mkfs: in memory when
    // /dev/shm has room and inodes for three times the commit (the
    // repository, the deployment's own files, and slack), else beside the
    // image. The pull's downloads go there too. In memory they are a tmpfs
    // of the helper's own, which goes when it does; beside the image they
    // are locked, and the next flash removes what a killed one left.
    std::filesystem::path memory = memory_with_room(3 * plan.source.content_bytes, 3 * plan.source.content_entries + 1000);
    bool local_source = plan.source.url.rfind("file://", 0) == 0;
    bool hidden_by_tmpfs = in_shared_memory(target.device()) || (local_source && in_shared_memory(plan.source.url.substr(7)))
                           || (sysroot.gpg_key && in_shared_memory(*sysroot.gpg_key));
    std::optional<std::pair<fs::TempDir, UniqueFd>> trees;
    if (!memory.empty())
        reclaim_stale_trees(memory, notice); // left there by killed flashes of older versions
    // The tmpfs holds what the room check counted on, and never more than
    // /dev/shm had free: parallel flashes then get ENOSPC, not the OOM killer.
    uint64_t tmpfs_bytes = std::min<uint64_t>(free_bytes(memory).value_or(0), 3 * plan.source.content_bytes + 64 * MiB);
    if (!memory.empty() && !hidden_by_tmpfs && tmpfs_bytes > 0) {
        job["memory"] = tmpfs_bytes;
    } else {
        std::filesystem::path parent = memory;
        if (parent.empty()) {
            parent = target.image().parent_path().empty() ? "." : target.image().parent_path();
            reclaim_stale_trees(parent, notice);
        }
        trees.emplace(locked_scratch_tree(parent));
        job["scratch"] = trees->first.path().string();
    }

    // mkfs.ext4 fills the page cache and fsyncs at its end; started from
    // here while it works, the disk writes overlap its copying rather than
    // follow it.
    auto start_writeback = [&] { ::sync_file_range(target.fd(), 0, 0, SYNC_FILE_RANGE_WRITE); };
    std::vector<std::string> sent;
    try {
        sent = run_as_namespace_root(image_trees_command, {job.dump()}, notice, cancellable, start_writeback);
    } catch (const Error& e) {
        // A plain user's namespace holds one id: files of other owners
        // cannot be laid out. Say that, and which files when the source is
        // at hand, rather than "fchown".
        if (as_root || std::string(e.what()).find("fchown") == std::string::npos)
            throw;
        std::vector<std::string> foreign;
        if (local_source)
            foreign = files_not_owned_by_root(plan.source.url.substr(7), plan.source.commit, 10);
        std::string list;
        for (const auto& f : foreign)
            list += (list.empty() ? ": " : ", ") + f;
        throw Error("sysroot: the commit holds files owned by users other than root, which an image made without root "
                    "cannot carry (its user namespace maps only root's ids); flash it as root, or commit "
                    "them as root's (treeflash build --owner-uid 0 --owner-gid 0)" + list);
    }
    if (sent.size() != 1)
        throw Error("sysroot: the helper did not name the deployment");
    result.deployment = deployment_from_json(json::parse(sent.front()));

    for (const auto& made : job["file_systems"]) {
        std::string label = made["label"], fstype = made["fstype"];
        unsigned number = made["partition"];
        uint64_t offset = made["offset"], size = made["size"];
        in_step("format p" + std::to_string(number), [&] {
            clamp_inode_times(target.device(), offset, plan.source_date_epoch);
            FilesystemInfo found = probe_filesystem(target.device(), offset, size);
            if (found.type != fstype || found.label != label)
                throw Error("mkfs.ext4 left " + (found.type.empty() ? std::string("no file system") : found.type + " '" + found.label + "'")
                            + " where " + fstype + " '" + label + "' belongs");
        });
    }
    // mkfs.ext4 has read the trees: removing them (thousands of files) runs
    // beside the rest, the bmap included; the caller joins it. The lock goes
    // once they are gone.
    std::jthread remove_trees;
    if (trees)
        remove_trees = start_beside([trees = std::make_shared<std::pair<fs::TempDir, UniqueFd>>(std::move(*trees))] {
            trees->first.remove();
        });
    return remove_trees;
}

} // namespace treeflash::flasher
