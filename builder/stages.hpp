// The build pipeline's stages. Each takes plain structs and the staging
// Tree, does one job, and returns what it found for the report; none of them
// prints. See ARCHITECTURE.md for the order.
#pragma once

#include "builder/tree.hpp"

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;
typedef struct OstreeRepo OstreeRepo;

namespace treeflash::builder {

// ---- import.cpp ---------------------------------------------------------

struct ImportResult {
    Tree tree;
    std::vector<std::string> dropped_special; // "dev/null (character device)"
    std::vector<std::string> skipped_mounts;  // directories on another file system
    std::vector<std::string> dropped_xattrs;  // "usr/bin/x (security.selinux)": the build host's labels
    std::vector<std::string> unknown_types;   // tar entries of a type libarchive read as regular files
};

// Extended attributes an import keeps: all but security.selinux, whose
// labels belong to the build host's policy, not the device's.
bool keeps_xattr(std::string_view name);

// A directory: nothing in it is opened for writing, no symlink is followed.
// Extended attributes of files and directories are kept. A cancelled
// `cancellable` stops it within one directory entry.
ImportResult import_directory(const std::filesystem::path& dir, GCancellable* cancellable = nullptr);

// A .tar, .tar.gz, .tar.xz or .tar.zst read with libarchive. Regular files
// are extracted into `scratch_dir` (which must outlive the Tree). Entries with
// ".." or absolute paths, entries that would be written through a symlink,
// and a non-directory entry over a directory (as GNU tar refuses) are
// refused. Entries of a type tar does not define become regular files, as
// POSIX says, and are listed in unknown_types. Extended attributes (pax
// SCHILY.xattr) are kept.
ImportResult import_tarball(const std::filesystem::path& tarball, const std::filesystem::path& scratch_dir,
                            GCancellable* cancellable = nullptr);

// Chooses between the two by looking at `input`.
ImportResult import_rootfs(const std::filesystem::path& input, const std::filesystem::path& scratch_dir,
                           GCancellable* cancellable = nullptr);

// ---- sanitize.cpp -------------------------------------------------------

// Whether an entry of this st_mode can go into an OSTree commit (directories,
// regular files and symlinks); device nodes, FIFOs and sockets cannot.
bool is_committable(mode_t st_mode);
// "character device", "block device", "FIFO", "socket".
std::string special_kind_name(mode_t st_mode);

// One warning that lists every special file import dropped (empty when none).
std::vector<std::string> sanitize_warnings(const ImportResult& imported);

// Owners every entry of the commit gets, as `ostree commit --owner-uid/gid`.
struct OwnerOptions {
    std::optional<uid_t> uid;
    std::optional<gid_t> gid;
};

// Sets the owners `options` names on every node of `tree`. Returns how many
// nodes changed.
size_t apply_owners(Tree& tree, const OwnerOptions& options);

// ---- normalize.cpp ------------------------------------------------------

struct NormalizeOptions {
    std::string os_name = "tcu";
    std::string version; // VERSION_ID in a generated os-release
    std::map<std::string, std::string> os_release; // --os-release KEY=VALUE overrides
    bool boot_health = true; // add usr/lib/treeflash/boot-health and start it from a busybox inittab
    bool auto_update = true; // add usr/lib/treeflash/auto-update, its settings, and start it likewise
};

struct NormalizeResult {
    bool moved_etc = false;           // /etc became /usr/etc
    bool wrote_os_release = false;    // usr/lib/os-release was generated or rewritten
    std::vector<std::string> var_entries; // content under /var (not carried to existing deployments)
    std::string boot_health_hook; // "inittab" when the build added the line, "" otherwise
    std::string auto_update_hook; // likewise for auto-update
    std::vector<std::string> warnings;
};

// /etc -> /usr/etc, os-release, sysroot/, ostree -> sysroot/ostree, the
// empty API directories OSTree expects, and the boot health script.
NormalizeResult normalize(Tree& tree, const NormalizeOptions& options);

// Renders os-release text from templates/os-release with `options` applied.
std::string render_os_release(const NormalizeOptions& options, const std::string& existing = {});

// ---- programs.cpp -------------------------------------------------------

struct ProgramsOptions {
    std::filesystem::path userland;    // a tree holding the programs and their libraries
    std::vector<std::string> programs; // paths inside `userland` (usr/bin/ostree)
};

struct ProgramsResult {
    std::vector<std::string> added; // paths in the commit: programs, loader, libraries
    std::vector<std::string> kept;  // loader and sonames the rootfs already had (left as they are)
    uint64_t bytes = 0;             // bytes added
    std::vector<std::string> warnings;
};

// Adds each program at its own path, and (depth first) the loader its ELF
// header names and each library it needs that the rootfs lacks, in usr/lib,
// which the loader searches by default.
ProgramsResult add_programs(Tree& tree, const ProgramsOptions& options);

// ---- kernel.cpp ---------------------------------------------------------

enum class KernelLayout { Legacy, Modules };
std::string to_string(KernelLayout layout);
KernelLayout parse_kernel_layout(std::string_view text);

struct KernelOptions {
    std::optional<std::filesystem::path> kernel;
    std::optional<std::filesystem::path> initramfs;
    std::vector<std::filesystem::path> devicetrees;
    KernelLayout layout = KernelLayout::Legacy;
    std::string kver; // modules layout; derived from usr/lib/modules/ when empty
};

struct KernelResult {
    KernelLayout layout = KernelLayout::Legacy;
    std::string bootcsum;            // what OSTree will name the deployment's boot directory
    std::string kver;                // modules layout
    std::vector<std::string> placed; // tree paths of the kernel files
    bool from_rootfs = false;        // the rootfs already carried the kernel
    std::vector<std::string> warnings;
};

KernelResult place_kernel(Tree& tree, const KernelOptions& options);

// ---- commit.cpp ---------------------------------------------------------

struct GpgSigning {
    std::string key_id;
    std::string homedir; // empty: the user's default
};

struct CommitOptions {
    std::string branch = "master";
    std::string subject;
    std::string body;
    std::string version;
    std::optional<uint64_t> timestamp; // seconds since the epoch; now when unset
    std::optional<GpgSigning> gpg;
    // Static deltas to the new commit from each of the last N commits of
    // the branch (its parent, grandparent, ...): a board that is N releases
    // behind still fetches one delta instead of every changed object.
    unsigned static_deltas = 0;
    bool force = false; // commit even when tree and message equal the parent's
    unsigned jobs = 0;  // worker threads writing objects; 0 = one per CPU
};

struct CommitResult {
    std::string commit;
    std::string parent;
    bool unchanged = false; // the parent already was this tree: no new commit
    uint64_t files = 0;     // regular files and symlinks
    uint64_t directories = 0;
    uint64_t bytes = 0;     // bytes of regular files
    uint64_t objects_written = 0;
    std::vector<std::string> deltas_from; // the commits a static delta to this one starts from
    std::vector<std::string> warnings;
};

// Writes the tree into `repo`, signs it, makes the delta, then moves
// `branch` to the new commit and regenerates the summary. The branch moves
// after everything else: a failure or a kill before that leaves the branch
// where it was and the repository consistent.
CommitResult commit_tree(OstreeRepo* repo, Tree& tree, const CommitOptions& options, GCancellable* cancellable);

} // namespace treeflash::builder
