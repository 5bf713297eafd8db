// The OSTree sysroot on a mounted rootfs partition: what the how-to does
// with `ostree admin init-fs`, `os-init`, `remote add`, `pull` and `deploy`.
#pragma once

#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;
typedef struct OstreeRepo OstreeRepo;
typedef struct OstreeSysroot OstreeSysroot;
typedef struct _OstreeDeployment OstreeDeployment;

namespace treeflash::flasher {

class StartedPrefetch;

struct SysrootOptions {
    std::string os = "tcu";
    bool untrusted_pull = false; // see pull_ref
    std::string remote = "origin";
    std::string remote_url;              // what the card's origin remote points at
    std::string pull_url;                // where to pull from now (file:// or http://)
    std::string ref = "master";
    std::string commit;                  // the commit the ref named when the flash was planned: the one pulled
    std::optional<std::filesystem::path> gpg_key; // imported into the remote; verification on
    std::vector<std::string> kernel_args;
    unsigned network_timeout = 30;       // seconds without progress before a pull fails
    std::filesystem::path download_dir;  // see watched_pull; empty: $TMPDIR
    bool sync_while_fetching = true;     // the rootfs is the card: sync it as objects arrive (see prefetch_objects)
    bool require_devicetree = false;     // the board boots only with a devicetree from the commit
    // Called once every object of the commit is in the card's repository,
    // before the deploy: where the card starts writing them out.
    std::function<void()> objects_written;
    // The prefetch of `commit`, started before the card's repository was
    // made (see StartedPrefetch); otherwise it starts once it is.
    std::shared_ptr<StartedPrefetch> started_prefetch;
};

// Whether a deployment's tree carries a devicetree where OSTree looks for
// one (usr/lib/modules/KVER/devicetree or dtb/, usr/lib/ostree-boot/
// devicetree-* or dtbs-*), read without following links.
bool deployment_has_devicetree(const std::filesystem::path& deployment_dir);

// Throws unless the deployment `deployment` of `sysroot` (deployed, not yet
// written) carries a devicetree: for boards with `devicetree = required`.
void require_devicetree(OstreeSysroot* sysroot, OstreeDeployment* deployment, const std::string& commit);

struct Deployment {
    std::string os;
    std::string commit;
    std::string version;
    std::string bootcsum;
    int deploy_serial = 0;
    int boot_serial = 0;
    std::string origin_refspec;
    std::string kernel_args; // the bootconfig "options" line, ostree= included
    std::string ostree_path; // the ostree= argument
    bool pinned = false;
};

// Lays out a fresh sysroot at `root` (init-fs, the initramfs's newroot/ and
// mnt/, the `update` marker, os-init, OSTree's U-Boot loader files), adds
// the remote, pulls the ref and deploys it. Returns the new deployment.
Deployment provision_sysroot(const std::filesystem::path& root, const SysrootOptions& options,
                             const std::function<void(const std::string&)>& notice, GCancellable* cancellable);

// libostree ends every deploy with a sync() of every file system on the
// machine, as a running system's update must. A card being flashed runs
// nothing yet: its file system is synced when it is unmounted, and the card
// or image once at the end, before success is reported. This turns that
// global sync off for the process (an environment variable libostree reads
// when a sysroot object is made): call it before the first thread starts,
// and only in a process that deploys onto new cards.
void skip_global_sync_when_deploying();

// Holds the sysroot lock (ostree_sysroot_lock) while it exists.
class SysrootLock {
public:
    explicit SysrootLock(OstreeSysroot* sysroot);
    SysrootLock(const SysrootLock&) = delete;
    SysrootLock& operator=(const SysrootLock&) = delete;
    ~SysrootLock();

private:
    OstreeSysroot* m_sysroot;
};

// Pulls `ref` of `remote` into `repo`, from `override_url` when given
// (the remote's GPG settings apply either way), under watched_pull; when
// `commit` is given, that commit (the ref must have named it when it was
// looked up) rather than whatever the ref names now.
// `untrusted`: objects from a local repository are checked and written one
// by one instead of copied as files (a copy keeps the files' owners, which a
// user namespace cannot give them). `download_dir`: see watched_pull.
void pull_ref(OstreeRepo* repo, const std::string& remote, const std::string& ref, const std::string& override_url,
              unsigned network_timeout, GCancellable* cancellable, bool untrusted = false,
              const std::filesystem::path& download_dir = {}, const std::string& commit = {});

// Throws unless every symlink of the sysroot's own structure at `root`
// (boot/, boot/loader*, ostree/boot.*, ostree/deploy/*, ostree/repo, but not
// the deployments' contents) stays inside `root`. libostree follows those
// links as root: on a hostile card one pointing at /etc would make it read
// or write the host's files.
void check_sysroot_links(const std::filesystem::path& root);

// The deployments of the sysroot at `root`, the default one first. Reads only.
// Up to `limit` paths of `commit` in the repository `repo` whose owner or
// group is not root, as "/path (uid:gid)".
std::vector<std::string> files_not_owned_by_root(const std::filesystem::path& repo, const std::string& commit,
                                                 size_t limit);

std::vector<Deployment> list_deployments(const std::filesystem::path& root, GCancellable* cancellable);

} // namespace treeflash::flasher
