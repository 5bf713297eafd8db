// Shared test fixtures: temporary trees, tiny rootfs and kernel builders,
// tarball writers and a runner for real tools (ostree, gpg, treeflash).
#pragma once

#include "common/process.hpp"

#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <sys/types.h>
#include <vector>

namespace treeflash::test {

namespace fs = std::filesystem;

bool is_root();

// A directory under $TMPDIR (default /tmp), removed when the test ends.
class Scratch {
public:
    Scratch();
    ~Scratch();
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    const fs::path& path() const { return m_path; }
    fs::path operator/(const std::string& name) const { return m_path / name; }

private:
    fs::path m_path;
};

// Every Scratch directory this process made, removed or not: what the
// leftover check counts as this test run's own.
std::vector<fs::path> scratch_paths_made();

void write_file(const fs::path& path, const std::string& content, mode_t mode = 0644);
std::string read_text(const fs::path& path);
// `size` bytes that do not compress, the same for the same `seed`.
std::string random_bytes(size_t size, unsigned seed);
std::string sha256_hex(const std::string& data);
// U-Boot's environment at `offset` of `file`, `size` bytes, as libubootenv's
// fw_printenv reads it (its config written to `config`): a reader that is
// not the project's code. Throws when fw_printenv cannot read it.
std::map<std::string, std::string> fw_printenv(const fs::path& file, uint64_t offset, uint64_t size,
                                               const fs::path& config);
// sha256sum(1) of the files' contents concatenated: a value computed
// without the project's code or GLib, to check checksums against.
std::string sha256sum_files(const std::vector<fs::path>& files);

// A minimal usr-merged busybox-like rootfs: usr/bin/busybox (setuid),
// bin -> usr/bin, etc/inittab, a hardlink, an absolute symlink.
void make_rootfs(const fs::path& dir);

struct FakeKernel {
    fs::path kernel, initramfs, devicetree;
    std::string kernel_bytes, initramfs_bytes, devicetree_bytes;
};
// Three small files standing in for Image, initramfs and a .dtb.
FakeKernel make_kernel_files(const fs::path& dir, const std::string& flavour = "v1");

// Every path below `dir` with its type, mode, owner, size and content hash:
// equal snapshots mean nothing was changed.
std::map<std::string, std::string> snapshot(const fs::path& dir);

// The names directly in the host's /etc and its modification time: a test
// that feeds `etc -> /etc` to the builder checks this did not change.
std::string host_etc_state();

// A tarball entry for write_tarball.
struct TarEntry {
    std::string path;
    char type = 'f'; // f regular, d directory, l symlink, h hardlink, c character device, p FIFO
    std::string content_or_target;
    mode_t mode = 0644;
    uid_t uid = 0;
    gid_t gid = 0;
    std::map<std::string, std::string> xattrs; // written as pax SCHILY.xattr records
};
// Writes a ustar/pax tarball; compression from the extension (.gz .xz .zst).
void write_tarball(const fs::path& path, const std::vector<TarEntry>& entries);

// Whether `dir` holds a partial file or repository treeflash works on
// (".NAME.partial-*").
bool has_partial(const fs::path& dir);

// treeflash and the bundled boards, copied below `dir` (made traversable by
// all) so another uid can run them wherever the checkout lives (a home
// folder of mode 0700, say).
struct ToolsForOtherUsers {
    fs::path treeflash;
    fs::path boards; // boards / "ls104x" is a board folder
};
ToolsForOtherUsers tools_for_other_users(const fs::path& dir);

// Whether this process may create a user namespace (a chroot or a
// container's seccomp profile may refuse it).
bool user_namespaces_work();

// The message of the treeflash::Error `fn` throws; "" when it throws none.
std::string error_of(const std::function<void()>& fn);

// A copy of the bundled board `board` in tmp/name, with `edit` applied to its board.conf.
fs::path edited_board(const Scratch& tmp, const std::string& board, const std::string& name,
                      const std::function<std::string(std::string)>& edit);

ProcessResult run_treeflash(const std::vector<std::string>& args, const std::vector<std::string>& env = {});
// Starts the treeflash executable without waiting; stderr goes to
// `stderr_file` (or /dev/null). Returns the pid.
pid_t spawn_treeflash(const std::vector<std::string>& args, const std::string& stderr_file = "/dev/null");
// Waits for `pid`; returns its exit code (-1 when killed, `signal` set).
int wait_exit(pid_t pid, int* signal = nullptr);
// Whether `done` holds within `seconds`, asked every 50 ms.
bool wait_until(const std::function<bool()>& done, int seconds);
// ostree CLI against a repo.
ProcessResult ostree(const fs::path& repo, const std::vector<std::string>& args);
// The ref's commit checksum, or "" when absent.
std::string rev_parse(const fs::path& repo, const std::string& ref = "master");
// `ostree fsck` passes.
bool fsck_clean(const fs::path& repo);
// `ostree ls -R -C` as a map path -> line.
std::map<std::string, std::string> list_commit(const fs::path& repo, const std::string& ref = "master");

} // namespace treeflash::test
