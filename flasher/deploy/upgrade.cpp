#include "flasher/deploy/upgrade.hpp"

#include "common/error.hpp"
#include "common/glib.hpp"
#include "common/validate.hpp"
#include "flasher/boot/boot_state.hpp"
#include "flasher/inspect/card_files.hpp"
#include "flasher/disk/format.hpp"
#include "flasher/disk/loop.hpp"
#include "flasher/disk/mount.hpp"
#include "flasher/disk/partition.hpp"
#include "flasher/deploy/source.hpp"
#include "flasher/disk/target.hpp"

#include <ostree.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// The partition that holds the OSTree sysroot: the ext4 labelled rootfs.
PartitionEntry find_rootfs(const std::string& target)
{
    PartitionTable table = read_partition_table(target);
    for (const auto& entry : table.partitions) {
        FilesystemInfo fs = probe_filesystem(target, entry.start, entry.size);
        if (fs.type == "ext4" && fs.label == "rootfs")
            return entry;
    }
    throw Error(target + ": no ext4 partition labelled 'rootfs' (is it a card treeflash flashed?)");
}

void upgrade_sysroot(const std::filesystem::path& mountpoint, const UpgradeOptions& options, UpgradeResult& result,
                     GCancellable* cancellable);

} // namespace

UpgradeResult upgrade(const UpgradeOptions& options, GCancellable* cancellable)
{
    if (::geteuid() != 0)
        throw Error("upgrade needs root: it attaches loop devices and mounts the card");
    if (options.ref)
        validate::ref(*options.ref, "--ref");
    if (options.repo && is_url(*options.repo))
        validate::url(*options.repo, "--repo");
    for (const auto& arg : options.kernel_args_append)
        validate::kernel_arg(arg, "--karg");
    validate::kernel_command_line(options.kernel_args_append, "--karg");
    // Held to the end: no other upgrade, flash or mount of this card meanwhile.
    ExclusiveCard card(options.target);
    if (options.repo && !is_url(*options.repo) && !std::filesystem::is_regular_file(std::filesystem::path(*options.repo) / "config"))
        throw Error("repository " + *options.repo + ": not an OSTree repository");

    UpgradeResult result;
    PartitionEntry rootfs = in_step("find rootfs", [&] { return find_rootfs(options.target); });
    result.partition = static_cast<int>(rootfs.number);
    LoopDevice loop(options.target, false, rootfs.start, rootfs.size);
    Mount mount(loop.path(), "ext4", untrusted_mount_options, mount_point_parent());
    in_step("sysroot", [&] { check_sysroot_links(mount.path()); });
    // Every libostree handle on the mount is released before it is unmounted.
    upgrade_sysroot(mount.path(), options, result, cancellable);
    result.deployments = list_deployments(mount.path(), cancellable);
    result.current = result.deployments.front();
    in_step("sync", [&] { mount.unmount(); });
    return result;
}

namespace {

void upgrade_sysroot(const std::filesystem::path& mountpoint, const UpgradeOptions& options, UpgradeResult& result,
                     GCancellable* cancellable)
{
    GError* error = nullptr;
    glib::Object<GFile> root(g_file_new_for_path(mountpoint.c_str()));
    glib::Object<OstreeSysroot> sysroot(ostree_sysroot_new(root.get()));
    in_step("load sysroot", [&] {
        if (!ostree_sysroot_load(sysroot.get(), cancellable, &error))
            throw_gerror(error);
    });
    SysrootLock lock(sysroot.get());

    auto before = list_deployments(mountpoint, cancellable);
    if (before.empty())
        throw Error(options.target + ": the sysroot has no deployment to upgrade");
    result.previous = before.front();
    std::string os = result.previous.os;

    // The deployment to keep for rollback, and to merge /etc from: libostree
    // keeps the merge deployment and drops the others. On a card that counts
    // boots it is the known-good one, never a default that was rolled back.
    BootFiles boot_files = read_boot_files(MountedCard(mountpoint), options.target);
    BootStatus status = boot_status(boot_files, before);
    if (status.counting)
        for (const auto& arg : options.kernel_args_append)
            if (arg.rfind("panic=", 0) == 0 && (arg == "panic=0" || arg == "panic="))
                throw Error("--karg " + arg + ": this card counts boots, and a panic must reboot to count as a failed try");
    size_t keep = fallback_deployment(status, before.size());
    result.fallback = before[keep];
    if (keep != 0) {
        std::string state = status.entries[0].state.empty() ? "not known good" : status.entries[0].state;
        result.fallback_reason = "the default " + deployment_name(before[0].version, before[0].commit) + " is " + state
                                 + "; keeping " + deployment_name(before[keep].version, before[keep].commit)
                                 + " for rollback and dropping it";
        if (options.notice)
            options.notice(result.fallback_reason);
    }
    glib::PtrArray all(ostree_sysroot_get_deployments(sysroot.get()));
    if (!all || keep >= all->len)
        throw Error("the sysroot lists fewer deployments than it did a moment ago");
    glib::Object<OstreeDeployment> merge(
        OSTREE_DEPLOYMENT(g_object_ref(static_cast<OstreeDeployment*>(g_ptr_array_index(all.get(), keep)))));
    if (ostree_deployment_get_csum(merge.get()) != before[keep].commit)
        throw Error("the sysroot's deployments changed while reading them");

    std::string refspec = result.previous.origin_refspec;
    auto colon = refspec.find(':');
    if (colon == std::string::npos)
        throw Error("the deployment's origin '" + refspec + "' names no remote; treeflash upgrade needs remote:ref");
    std::string remote = refspec.substr(0, colon);
    std::string ref = options.ref.value_or(refspec.substr(colon + 1));
    refspec = remote + ":" + ref;

    std::optional<std::string> override_url;
    if (options.repo)
        override_url = is_url(*options.repo)
                           ? *options.repo
                           : "file://" + std::filesystem::absolute(*options.repo).lexically_normal().string();
    OstreeRepo* repo = ostree_sysroot_repo(sysroot.get());
    ostree_repo_set_disable_fsync(repo, TRUE); // the file system is synced on unmount
    if (options.notice)
        options.notice("pulling " + refspec + (override_url ? " from " + *override_url : ""));
    bool untrusted = options.repo && !is_url(*options.repo) && local_repository_untrusted(*options.repo);
    in_step("pull", [&] {
        pull_ref(repo, remote, ref, override_url.value_or(""), options.network_timeout, cancellable, untrusted);
    });
    char* raw = nullptr;
    if (!ostree_repo_resolve_rev(repo, refspec.c_str(), FALSE, &raw, &error))
        throw_gerror(error, "resolve " + refspec);
    std::string commit = glib::take_string(raw);

    if (commit == result.previous.commit)
        return;
    if (options.notice)
        options.notice("deploying " + commit.substr(0, 12) + " with /etc merged from the current deployment");
    in_step("deploy", [&] {
        glib::KeyFile origin(ostree_sysroot_origin_new_from_refspec(sysroot.get(), refspec.c_str()));
        OstreeSysrootDeployTreeOpts deploy_options{}; // kernel arguments are inherited from the merge deployment
        glib::Strv kernel_argv;
        if (!options.kernel_args_append.empty()) {
            OstreeBootconfigParser* config = ostree_deployment_get_bootconfig(merge.get());
            const char* inherited = config ? ostree_bootconfig_parser_get(config, "options") : nullptr;
            std::unique_ptr<OstreeKernelArgs, decltype(&ostree_kernel_args_free)> kargs(
                ostree_kernel_args_from_string(inherited ? inherited : ""), &ostree_kernel_args_free);
            ostree_kernel_args_delete_key_entry(kargs.get(), "ostree", nullptr); // libostree adds the new one
            for (const auto& arg : options.kernel_args_append)
                ostree_kernel_args_append(kargs.get(), arg.c_str());
            kernel_argv = glib::Strv(ostree_kernel_args_to_strv(kargs.get()));
            // ostree= and init= are libostree's, counted in the reserve.
            std::vector<std::string> all_args;
            for (char** arg = kernel_argv.get(); arg && *arg; ++arg)
                if (std::string_view(*arg).rfind("init=", 0) != 0 && std::string_view(*arg).rfind("ostree=", 0) != 0)
                    all_args.emplace_back(*arg);
            validate::kernel_command_line(all_args, "--karg with the inherited kernel arguments");
            deploy_options.override_kernel_argv = kernel_argv.get();
        }
        OstreeDeployment* raw_new = nullptr;
        if (!ostree_sysroot_deploy_tree_with_options(sysroot.get(), os.c_str(), commit.c_str(), origin.get(), merge.get(),
                                                     &deploy_options, &raw_new, cancellable, &error))
            throw_gerror(error);
        glib::Object<OstreeDeployment> created(raw_new);
        // The card's board record says when a commit must bring its devicetree.
        if (boot_files.board.count("devicetree") && boot_files.board.at("devicetree") == "required")
            require_devicetree(sysroot.get(), created.get(), commit);
        if (!ostree_sysroot_simple_write_deployment(sysroot.get(), os.c_str(), created.get(), merge.get(),
                                                    OSTREE_SYSROOT_SIMPLE_WRITE_DEPLOYMENT_FLAGS_NONE, cancellable, &error))
            throw_gerror(error, "write deployment");
    });
    result.changed = true;
    // The new deployment is a trial: acknowledge the tries counted so far, so
    // it starts from zero even if a trial was cut short on this card.
    if (status.counting && boot_files.tries_block) {
        auto serial = boot_files.tries_block->find("treeflash_serial");
        bool plain = serial != boot_files.tries_block->end() && !serial->second.empty() && serial->second.size() <= 16
                     && serial->second.find_first_not_of("0123456789abcdef") == std::string::npos;
        if (plain)
            in_step("boot counting", [&] {
                std::string ack = "treeflash_acked=" + serial->second + "\n";
                for (const char* key : {"treeflash_known_good", "treeflash_known_good_version"})
                    if (auto it = boot_files.ack.find(key); it != boot_files.ack.end())
                        ack += std::string(key) + "=" + it->second + "\n";
                write_on_card(mountpoint, "boot/treeflash", "ack.env", ack);
            });
    }
}

} // namespace

} // namespace treeflash::flasher
