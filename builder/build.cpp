#include "builder/build.hpp"

#include "builder/repo.hpp"
#include "common/error.hpp"
#include "common/fs.hpp"

#include <unistd.h>

namespace treeflash::builder {

namespace {

void append(std::vector<std::string>& into, const std::vector<std::string>& more)
{
    into.insert(into.end(), more.begin(), more.end());
}

void check_not_cancelled(GCancellable* cancellable)
{
    if (cancellable && g_cancellable_is_cancelled(cancellable))
        throw Cancelled();
}

} // namespace

BuildResult build(const BuildOptions& options, GCancellable* cancellable, const Notice& notice)
{
    BuildResult result;
    result.repo = options.repo;
    result.ref = options.commit.branch;

    BuildRepo repo = in_step("repository", [&] { return BuildRepo(options.repo, cancellable, notice); });
    result.created_repo = repo.is_new();

    std::filesystem::create_directories(repo.scratch_parent());
    fs::TempDir scratch(repo.scratch_parent(), "treeflash-import-");
    ImportResult imported = in_step("import " + options.rootfs.string(),
                                    [&] { return import_rootfs(options.rootfs, scratch.path(), cancellable); });
    append(result.warnings, sanitize_warnings(imported));
    check_not_cancelled(cancellable);

    OwnerOptions owners = options.owners;
    if (!owners.uid && !owners.gid && ::geteuid() != 0 && std::filesystem::is_directory(options.rootfs)) {
        owners = {0, 0};
        if (apply_owners(imported.tree, owners))
            result.warnings.push_back("the rootfs directory's files belong to the user building it; they are committed "
                                      "as owned by root (0:0). Pass --owner-uid/--owner-gid for other owners, or build "
                                      "as root (or from a tarball) to keep the owners they have");
    } else {
        apply_owners(imported.tree, owners);
    }

    Tree& tree = imported.tree;
    result.normalize = in_step("normalize", [&] { return normalize(tree, options.normalize); });
    append(result.warnings, result.normalize.warnings);
    result.programs = in_step("programs", [&] { return add_programs(tree, options.programs); });
    append(result.warnings, result.programs.warnings);

    // A board updates itself with the ostree program (`ostree admin upgrade`):
    // a commit without one leaves every board that runs it where it is.
    const Node* ostree = tree.resolve("usr/bin/ostree");
    if (!ostree || !ostree->is_regular() || !(ostree->mode & 0111))
        result.warnings.push_back("the rootfs has no usr/bin/ostree: a board running this commit cannot update "
                                  "itself; add the ostree program and the libraries it needs");

    result.kernel = in_step("kernel", [&] { return place_kernel(tree, options.kernel); });
    append(result.warnings, result.kernel.warnings);
    check_not_cancelled(cancellable);

    CommitOptions commit = options.commit;
    if (commit.subject.empty())
        commit.subject = options.normalize.os_name + " " + (commit.version.empty() ? "" : commit.version + " ") + "rootfs";
    result.commit = in_step("commit", [&] { return commit_tree(repo.get(), tree, commit, cancellable); });
    append(result.warnings, result.commit.warnings);

    scratch.remove();
    in_step("repository", [&] { repo.publish(); });
    return result;
}

} // namespace treeflash::builder
