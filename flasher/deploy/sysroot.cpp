#include "flasher/deploy/sysroot.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/glib.hpp"
#include "flasher/deploy/prefetch.hpp"
#include "flasher/deploy/pull.hpp"

#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <functional>
#include <linux/capability.h>
#include <linux/openat2.h>
#include <ostree.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// What `ostree admin init-fs` creates, plus the initramfs's mount points and
// the update marker the how-to's initramfs checks.
void lay_out_root(const std::filesystem::path& root)
{
    struct Dir {
        const char* name;
        mode_t mode;
    };
    for (const Dir& dir : {Dir{"boot", 0755}, Dir{"dev", 0755}, Dir{"home", 0755}, Dir{"proc", 0755},
                           Dir{"run", 0755}, Dir{"sys", 0755}, Dir{"tmp", 01777}, Dir{"root", 0700},
                           Dir{"newroot", 0755}, Dir{"mnt", 0755}}) {
        std::filesystem::path path = root / dir.name;
        if (::mkdir(path.c_str(), dir.mode) != 0 && errno != EEXIST)
            throw_errno("mkdir " + path.string());
        ::chmod(path.c_str(), dir.mode);
    }
    UniqueFd marker(::open((root / "update").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    if (!marker)
        throw_errno("create the update marker");
}

// OSTree 2022.7 picks its U-Boot backend only when boot/loader/uEnv.txt
// exists before the first deploy.
void seed_uboot_loader(const std::filesystem::path& root)
{
    std::filesystem::path boot = root / "boot";
    std::filesystem::create_directories(boot / "loader.0");
    UniqueFd env(::open((boot / "loader.0/uEnv.txt").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    if (!env)
        throw_errno("create boot/loader.0/uEnv.txt");
    std::error_code ec;
    if (!std::filesystem::is_symlink(boot / "loader", ec))
        std::filesystem::create_symlink("loader.0", boot / "loader");
}

void set_bootloader_uboot(OstreeRepo* repo)
{
    glib::KeyFile config(ostree_repo_copy_config(repo));
    g_key_file_set_string(config.get(), "sysroot", "bootloader", "uboot");
    GError* error = nullptr;
    if (!ostree_repo_write_config(repo, config.get(), &error))
        throw_gerror(error, "write repository config");
}

void add_remote(OstreeRepo* repo, const SysrootOptions& options, GCancellable* cancellable)
{
    GVariantBuilder builder;
    g_variant_builder_init(&builder, G_VARIANT_TYPE_VARDICT);
    g_variant_builder_add(&builder, "{sv}", "gpg-verify", g_variant_new_boolean(options.gpg_key.has_value()));
    glib::Variant remote_options = glib::adopt_variant(g_variant_builder_end(&builder));
    GError* error = nullptr;
    if (!ostree_repo_remote_change(repo, nullptr, OSTREE_REPO_REMOTE_CHANGE_ADD_IF_NOT_EXISTS, options.remote.c_str(),
                                   options.remote_url.c_str(), remote_options.get(), cancellable, &error))
        throw_gerror(error, "add remote " + options.remote);
    if (options.gpg_key) {
        GFile* file = g_file_new_for_path(options.gpg_key->c_str());
        glib::Object<GFile> key_file(file);
        GFileInputStream* raw = g_file_read(key_file.get(), cancellable, &error);
        if (!raw)
            throw_gerror(error, "read GPG key " + options.gpg_key->string());
        glib::Object<GFileInputStream> stream(raw);
        guint imported = 0;
        if (!ostree_repo_remote_gpg_import(repo, options.remote.c_str(), G_INPUT_STREAM(stream.get()), nullptr,
                                           &imported, cancellable, &error))
            throw_gerror(error, "import GPG key " + options.gpg_key->string());
        if (imported == 0)
            throw Error("import GPG key " + options.gpg_key->string() + ": no key in the file");
    }
}

std::string commit_version(OstreeRepo* repo, const char* commit)
{
    GVariant* raw = nullptr;
    if (!ostree_repo_load_variant(repo, OSTREE_OBJECT_TYPE_COMMIT, commit, &raw, nullptr))
        return "";
    glib::Variant variant(raw);
    glib::Variant metadata = glib::adopt_variant(g_variant_get_child_value(variant.get(), 0));
    const char* version = nullptr;
    return g_variant_lookup(metadata.get(), OSTREE_COMMIT_META_KEY_VERSION, "&s", &version) ? version : "";
}

Deployment describe(OstreeSysroot* sysroot, OstreeDeployment* deployment)
{
    Deployment out;
    out.os = ostree_deployment_get_osname(deployment);
    out.commit = ostree_deployment_get_csum(deployment);
    out.bootcsum = ostree_deployment_get_bootcsum(deployment);
    out.deploy_serial = ostree_deployment_get_deployserial(deployment);
    out.boot_serial = ostree_deployment_get_bootserial(deployment);
    out.pinned = ostree_deployment_is_pinned(deployment);
    if (GKeyFile* origin = ostree_deployment_get_origin(deployment)) {
        char* refspec = g_key_file_get_string(origin, "origin", "refspec", nullptr);
        out.origin_refspec = glib::take_string(refspec);
    }
    if (OstreeBootconfigParser* bootconfig = ostree_deployment_get_bootconfig(deployment)) {
        const char* options = ostree_bootconfig_parser_get(bootconfig, "options");
        out.kernel_args = options ? options : "";
    }
    auto pos = out.kernel_args.find("ostree=");
    if (pos != std::string::npos)
        out.ostree_path = out.kernel_args.substr(pos + 7, out.kernel_args.find(' ', pos) - pos - 7);
    OstreeRepo* repo = ostree_sysroot_repo(sysroot);
    out.version = commit_version(repo, out.commit.c_str());
    return out;
}

glib::Object<OstreeSysroot> open_sysroot(const std::filesystem::path& root)
{
    glib::Object<GFile> path(g_file_new_for_path(root.c_str()));
    return glib::Object<OstreeSysroot>(ostree_sysroot_new(path.get()));
}

} // namespace

bool deployment_has_devicetree(const std::filesystem::path& deployment_dir)
{
    namespace sfs = std::filesystem;
    std::error_code ec;
    auto is = [&](const sfs::path& path, sfs::file_type type) { return sfs::symlink_status(path, ec).type() == type; };
    sfs::path modules = deployment_dir / "usr/lib/modules";
    if (is(modules, sfs::file_type::directory))
        for (const auto& kver : sfs::directory_iterator(modules, ec))
            if (is(kver.path() / "devicetree", sfs::file_type::regular) || is(kver.path() / "dtb", sfs::file_type::directory))
                return true;
    for (const char* dir : {"usr/lib/ostree-boot", "boot"}) {
        sfs::path boot = deployment_dir / dir;
        if (!is(boot, sfs::file_type::directory))
            continue;
        for (const auto& entry : sfs::directory_iterator(boot, ec)) {
            std::string name = entry.path().filename().string();
            if ((name.rfind("devicetree-", 0) == 0 && is(entry.path(), sfs::file_type::regular))
                || (name.rfind("dtbs-", 0) == 0 && is(entry.path(), sfs::file_type::directory)))
                return true;
        }
    }
    return false;
}

void require_devicetree(OstreeSysroot* sysroot, OstreeDeployment* deployment, const std::string& commit)
{
    std::string dirpath = glib::take_string(ostree_sysroot_get_deployment_dirpath(sysroot, deployment));
    std::filesystem::path root = glib::take_string(g_file_get_path(ostree_sysroot_get_path(sysroot)));
    if (!deployment_has_devicetree(root / dirpath))
        throw Error("commit " + commit + " carries no devicetree, and the board boots only with one from the "
                    "commit (treeflash build --devicetree FILE)");
}

// While it lives, the calling thread (only: capabilities are per thread)
// lacks CAP_SYS_ADMIN in its effective set. Writing a deployment ends in a
// freeze and thaw of /boot, which libostree does to get a journal flushed
// for a bootloader reading the live file system; without the capability
// it syncs /boot instead. On a card being flashed the freeze buys nothing
// (the file system is unmounted next) and costs about 40 ms: freezing waits
// for three RCU grace periods.
class WithoutFreezeCapability {
public:
    WithoutFreezeCapability()
    {
        m_header.version = _LINUX_CAPABILITY_VERSION_3;
        if (::syscall(SYS_capget, &m_header, m_saved) != 0)
            return;
        if (!(m_saved[0].effective & (1u << CAP_SYS_ADMIN)))
            return;
        __user_cap_data_struct lowered[2] = {m_saved[0], m_saved[1]};
        lowered[0].effective &= ~(1u << CAP_SYS_ADMIN);
        m_header.pid = 0;
        m_lowered = ::syscall(SYS_capset, &m_header, lowered) == 0;
    }
    ~WithoutFreezeCapability()
    {
        if (m_lowered)
            ::syscall(SYS_capset, &m_header, m_saved);
    }
    WithoutFreezeCapability(const WithoutFreezeCapability&) = delete;
    WithoutFreezeCapability& operator=(const WithoutFreezeCapability&) = delete;

private:
    __user_cap_header_struct m_header{};
    __user_cap_data_struct m_saved[2]{};
    bool m_lowered = false;
};

void skip_global_sync_when_deploying()
{
    ::setenv("OSTREE_SYSROOT_OPTS", "skip-sync", 0); // a value the user set stays
}

Deployment provision_sysroot(const std::filesystem::path& root, const SysrootOptions& options,
                             const std::function<void(const std::string&)>& notice, GCancellable* cancellable)
{
    GError* error = nullptr;
    in_step("init-fs", [&] { lay_out_root(root); });
    glib::Object<OstreeSysroot> sysroot = open_sysroot(root);
    in_step("init-fs", [&] {
        if (!ostree_sysroot_ensure_initialized(sysroot.get(), cancellable, &error))
            throw_gerror(error);
        if (!ostree_sysroot_load(sysroot.get(), cancellable, &error))
            throw_gerror(error, "load");
    });
    in_step("os-init " + options.os, [&] {
        if (!ostree_sysroot_init_osname(sysroot.get(), options.os.c_str(), cancellable, &error))
            throw_gerror(error);
    });
    OstreeRepo* repo = ostree_sysroot_repo(sysroot.get());
    // A card being flashed is not a running system: one sync of the whole
    // file system at the end (before success is reported) replaces an
    // fsync per object.
    ostree_repo_set_disable_fsync(repo, TRUE);
    in_step("loader", [&] {
        seed_uboot_loader(root);
        set_bootloader_uboot(repo);
    });
    in_step("remote", [&] { add_remote(repo, options, cancellable); });
    if (notice)
        notice("pulling " + options.ref + " from " + options.pull_url);
    PrefetchResult prefetched;
    if (!options.commit.empty()) {
        prefetched = in_step("prefetch", [&] {
            if (options.started_prefetch)
                return options.started_prefetch->finish_into(repo, options.sync_while_fetching);
            return prefetch_objects(repo, options.pull_url, options.commit, options.network_timeout,
                                    options.sync_while_fetching, cancellable);
        });
        if (notice && prefetched.attempted && prefetched.stopped.empty()) {
            char mib[32];
            std::snprintf(mib, sizeof mib, "%.1f", static_cast<double>(prefetched.bytes) / (1 << 20));
            notice("fetched " + std::to_string(prefetched.objects) + " objects (" + mib + " MiB)"
                   + (prefetched.left ? "; " + std::to_string(prefetched.left) + " too big to hold in memory are left to libostree's pull" : ""));
        } else if (notice && prefetched.attempted) {
            notice("fetching objects ahead of the pull stopped (" + prefetched.stopped + "); the pull fetches the rest");
        }
    }
    in_step("pull", [&] {
        // With every object fetched over HTTP and no signature to check, what
        // the pull has left to do is writing the commit and its ref: done
        // here, without starting libostree's pull in a process of its own. A
        // signed commit is always checked by libostree's pull, and so is one
        // from a folder (whose collection ID libostree's pull also binds).
        bool over_http = options.pull_url.rfind("http://", 0) == 0;
        if (!options.gpg_key && over_http
            && record_prefetched_commit(repo, options.remote, options.ref, options.commit, prefetched)) {
            if (notice)
                notice("every object is here and no signature is checked: the commit and " + options.remote + ":"
                       + options.ref + " are written without libostree's pull");
            return;
        }
        pull_ref(repo, options.remote, options.ref, options.pull_url == options.remote_url ? "" : options.pull_url,
                 options.network_timeout, cancellable, options.untrusted_pull, options.download_dir, options.commit);
    });

    if (options.objects_written)
        options.objects_written();
    if (notice)
        notice("deploying " + options.remote + ":" + options.ref + " as " + options.os);
    return in_step("deploy", [&] {
        std::string refspec = options.remote + ":" + options.ref;
        char* raw_commit = nullptr;
        if (!ostree_repo_resolve_rev(repo, refspec.c_str(), FALSE, &raw_commit, &error))
            throw_gerror(error);
        std::string commit = glib::take_string(raw_commit);
        SysrootLock lock(sysroot.get());
        glib::KeyFile origin(ostree_sysroot_origin_new_from_refspec(sysroot.get(), refspec.c_str()));
        std::vector<char*> kargs;
        for (const auto& arg : options.kernel_args)
            kargs.push_back(const_cast<char*>(arg.c_str()));
        kargs.push_back(nullptr);
        OstreeSysrootDeployTreeOpts deploy_options{};
        deploy_options.override_kernel_argv = kargs.data();
        OstreeDeployment* raw = nullptr;
        in_step("deploy tree", [&] {
            if (!ostree_sysroot_deploy_tree_with_options(sysroot.get(), options.os.c_str(), commit.c_str(),
                                                         origin.get(), nullptr, &deploy_options, &raw, cancellable,
                                                         &error))
                throw_gerror(error);
        });
        glib::Object<OstreeDeployment> deployment(raw);
        if (options.require_devicetree)
            require_devicetree(sysroot.get(), deployment.get(), commit);
        in_step("write deployment", [&] {
            WithoutFreezeCapability no_freeze;
            if (!ostree_sysroot_simple_write_deployment(sysroot.get(), options.os.c_str(), deployment.get(), nullptr,
                                                        OSTREE_SYSROOT_SIMPLE_WRITE_DEPLOYMENT_FLAGS_NONE, cancellable,
                                                        &error))
                throw_gerror(error);
        });
        // Reload to read the bootconfig OSTree wrote (ostree= with its boot serial).
        if (!ostree_sysroot_load(sysroot.get(), cancellable, &error))
            throw_gerror(error, "reload");
        glib::PtrArray deployments(ostree_sysroot_get_deployments(sysroot.get()));
        if (!deployments || deployments->len == 0)
            throw Error("no deployment after deploy");
        return describe(sysroot.get(), static_cast<OstreeDeployment*>(deployments->pdata[0]));
    });
}

void check_sysroot_links(const std::filesystem::path& root)
{
    namespace sfs = std::filesystem;
    UniqueFd root_fd(::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!root_fd)
        throw_errno("open the card's root " + root.string());
    // Whether `rel` resolves inside the card, every hop of every symlink on
    // the way included (the kernel resolves it, refusing to leave the root).
    // "" when it does, else why not.
    auto leaves_card = [&](const sfs::path& rel) -> std::string {
        struct open_how how {};
        how.flags = O_PATH | O_CLOEXEC;
        how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
        // EAGAIN: a rename anywhere on the machine during a lookup through
        // ".." makes the kernel unsure the path stayed beneath; it asks to
        // retry (a busy machine does this often).
        int fd = -1;
        for (int attempt = 0; attempt < 100; ++attempt) {
            fd = static_cast<int>(::syscall(SYS_openat2, root_fd.get(), rel.c_str(), &how, sizeof how));
            if (fd >= 0 || errno != EAGAIN)
                break;
        }
        if (fd >= 0) {
            ::close(fd);
            return "";
        }
        if (errno == EAGAIN)
            return "could not be resolved (the kernel kept asking to retry)";
        if (errno == ENOENT || errno == ENOTDIR) // a link to nothing leads nowhere else
            return "";
        return errno == ELOOP ? "is a loop of symlinks (or a chain too long)" : "leads outside its file system";
    };
    // Walks `rel` (relative to root) to `depth` levels, checking every symlink.
    std::function<void(const sfs::path&, int)> walk = [&](const sfs::path& rel, int depth) {
        std::error_code ec;
        auto status = sfs::symlink_status(root / rel, ec);
        if (ec)
            return;
        if (sfs::is_symlink(status)) {
            std::string why = leaves_card(rel);
            sfs::path target = sfs::read_symlink(root / rel, ec); // for the message
            if (!why.empty())
                throw Error("the card's " + rel.string() + " is a symlink to " + target.string() + ", which " + why
                            + "; refusing to use it");
            return;
        }
        if (!sfs::is_directory(status) || depth == 0)
            return;
        for (const auto& entry : sfs::directory_iterator(root / rel, ec))
            walk(rel / entry.path().filename(), depth - 1);
    };
    walk("boot", 3);                // boot/loader -> loader.N, boot/loader.N/entries/*, boot/ostree/...
    walk("ostree", 2);              // ostree/repo, ostree/boot.N, ostree/deploy/OS
    walk("ostree/repo", 1);         // config, refs, objects, tmp
    walk("ostree/repo/refs", 3);
    walk("ostree/repo/objects", 1); // libostree writes the pulled objects there
    for (const char* boot : {"ostree/boot.0", "ostree/boot.1"})
        for (int sub : {0, 1})
            walk(std::string(boot) + "." + std::to_string(sub), 4); // OS/BOOTCSUM/SERIAL -> deployments
    std::error_code ec;
    for (const auto& os : std::filesystem::directory_iterator(root / "ostree/deploy", ec)) {
        auto rel = std::filesystem::path("ostree/deploy") / os.path().filename();
        walk(rel, 1);                 // OS/deploy, OS/var
        walk(rel / "deploy", 1);      // CSUM.SERIAL and CSUM.SERIAL.origin
        // What libostree's /etc merge reads and copies from: a deployment's
        // etc, usr and usr/etc are directories it made, never links (one
        // pointing at a host folder would copy the host's files onto the card).
        for (const auto& deployment : std::filesystem::directory_iterator(root / rel / "deploy", ec)) {
            if (deployment.path().extension() == ".origin")
                continue;
            for (const char* part : {"etc", "usr", "usr/etc"}) {
                auto inside = rel / "deploy" / deployment.path().filename() / part;
                if (sfs::is_symlink(sfs::symlink_status(root / inside, ec)))
                    throw Error("the card's " + inside.string() + " is a symlink (to "
                                + sfs::read_symlink(root / inside, ec).string()
                                + "); a deployment's " + part + " is a directory, refusing to use it");
            }
        }
    }
}

SysrootLock::SysrootLock(OstreeSysroot* sysroot) : m_sysroot(sysroot)
{
    GError* error = nullptr;
    if (!ostree_sysroot_lock(sysroot, &error))
        throw_gerror(error, "lock the sysroot");
}

SysrootLock::~SysrootLock()
{
    ostree_sysroot_unlock(m_sysroot);
}

void pull_ref(OstreeRepo* repo, const std::string& remote, const std::string& ref, const std::string& override_url,
              unsigned network_timeout, GCancellable* cancellable, bool untrusted,
              const std::filesystem::path& download_dir, const std::string& commit)
{
    GVariantBuilder builder;
    g_variant_builder_init(&builder, G_VARIANT_TYPE_VARDICT);
    const char* refs[] = {ref.c_str(), nullptr};
    g_variant_builder_add(&builder, "{sv}", "refs", g_variant_new_strv(refs, -1));
    if (!commit.empty()) {
        const char* commits[] = {commit.c_str(), nullptr};
        g_variant_builder_add(&builder, "{sv}", "override-commit-ids", g_variant_new_strv(commits, -1));
    }
    if (!override_url.empty())
        g_variant_builder_add(&builder, "{sv}", "override-url", g_variant_new_string(override_url.c_str()));
    g_variant_builder_add(&builder, "{sv}", "n-network-retries", g_variant_new_uint32(2));
    if (untrusted)
        g_variant_builder_add(&builder, "{sv}", "flags", g_variant_new_int32(OSTREE_REPO_PULL_FLAGS_UNTRUSTED));
    glib::Variant pull_options = glib::adopt_variant(g_variant_builder_end(&builder));
    watched_pull(repo, remote, pull_options.get(), remote + ":" + ref + (override_url.empty() ? "" : " from " + override_url),
                 network_timeout, cancellable, download_dir);
}

namespace {

void collect_foreign_owners(GFile* dir, const std::string& path, std::vector<std::string>& out, size_t limit)
{
    GError* error = nullptr;
    glib::Object<GFileEnumerator> children(g_file_enumerate_children(
        dir, "standard::name,standard::type,unix::uid,unix::gid", G_FILE_QUERY_INFO_NOFOLLOW_SYMLINKS, nullptr, &error));
    if (!children) {
        g_clear_error(&error);
        return;
    }
    while (out.size() < limit) {
        GFileInfo* raw = g_file_enumerator_next_file(children.get(), nullptr, &error);
        if (!raw)
            break;
        glib::Object<GFileInfo> info(raw);
        std::string child = path + "/" + g_file_info_get_name(info.get());
        guint32 uid = g_file_info_get_attribute_uint32(info.get(), "unix::uid");
        guint32 gid = g_file_info_get_attribute_uint32(info.get(), "unix::gid");
        if (uid != 0 || gid != 0)
            out.push_back(child + " (" + std::to_string(uid) + ":" + std::to_string(gid) + ")");
        if (g_file_info_get_file_type(info.get()) == G_FILE_TYPE_DIRECTORY) {
            glib::Object<GFile> sub(g_file_get_child(dir, g_file_info_get_name(info.get())));
            collect_foreign_owners(sub.get(), child, out, limit);
        }
    }
    g_clear_error(&error);
}

} // namespace

std::vector<std::string> files_not_owned_by_root(const std::filesystem::path& repo_path, const std::string& commit,
                                                 size_t limit)
{
    std::vector<std::string> out;
    glib::Object<GFile> path(g_file_new_for_path(repo_path.c_str()));
    glib::Object<OstreeRepo> repo(ostree_repo_new(path.get()));
    if (!ostree_repo_open(repo.get(), nullptr, nullptr))
        return out;
    GFile* raw_root = nullptr;
    if (!ostree_repo_read_commit(repo.get(), commit.c_str(), &raw_root, nullptr, nullptr, nullptr))
        return out;
    glib::Object<GFile> tree(raw_root);
    collect_foreign_owners(tree.get(), "", out, limit);
    return out;
}

std::vector<Deployment> list_deployments(const std::filesystem::path& root, GCancellable* cancellable)
{
    glib::Object<OstreeSysroot> sysroot = open_sysroot(root);
    GError* error = nullptr;
    if (!ostree_sysroot_load(sysroot.get(), cancellable, &error))
        throw_gerror(error, "load sysroot");
    std::vector<Deployment> out;
    glib::PtrArray deployments(ostree_sysroot_get_deployments(sysroot.get()));
    for (guint i = 0; deployments && i < deployments->len; ++i)
        out.push_back(describe(sysroot.get(), static_cast<OstreeDeployment*>(deployments->pdata[i])));
    return out;
}

} // namespace treeflash::flasher
