// Fixtures for the root tier: real loop devices, mounts, nginx, and a check
// that a test left none of them behind.
#pragma once

#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>
#include <sys/types.h>

namespace treeflash::test {

// Loop devices and mounts that come from this test run's own Scratch
// folders (see system.cpp), whoever attached them.
std::set<std::string> system_leftovers();

// Checks, when it goes out of scope, that the test left no loop device
// or mount behind that was not there when it was made.
struct NoLeftovers {
    std::set<std::string> before = system_leftovers();
    ~NoLeftovers()
    {
        for (const auto& item : system_leftovers())
            CHECK_MESSAGE(before.count(item), "left behind: " << item);
    }
};

// mount(8) of one partition of an image (read-only unless `writable`),
// undone on scope exit.
struct MountedPartition {
    Scratch dir;
    bool mounted = false;
    MountedPartition(const fs::path& image, uint64_t offset, uint64_t size, bool writable = false)
    {
        std::string options = std::string(writable ? "rw" : "ro,noload") + ",loop,offset=" + std::to_string(offset)
                              + ",sizelimit=" + std::to_string(size);
        auto r = run_process({"mount", "-o", options, image.string(), dir.path().string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
        mounted = true;
    }
    ~MountedPartition()
    {
        if (mounted)
            run_process({"umount", dir.path().string()});
    }
    fs::path operator/(const std::string& name) const { return dir / name; }
};

// A tmpfs of `size` bytes mounted on a scratch directory, unmounted by the destructor.
struct SmallTmpfs {
    Scratch dir;
    explicit SmallTmpfs(uint64_t size);
    ~SmallTmpfs();
};

// treeflash flash of `repo`'s commit to a new qemu-arm64 `image`, unsigned.
// treeflash flash of `repo` into `image`, for qemu-arm64 unless `extra` names a --board.
ProcessResult flash_image(const fs::path& repo, const fs::path& image, const std::vector<std::string>& extra = {});

// The rootfs partition (p3) of a qemu-arm64 image: byte offset and size.
std::pair<uint64_t, uint64_t> rootfs_extent(const fs::path& image);

// An attached loop device over a file, for --device tests.
struct LoopGuard {
    std::string device;
    explicit LoopGuard(const fs::path& file)
    {
        auto r = run_process({"losetup", "-f", "-P", "--show", file.string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
        device = r.out.substr(0, r.out.find('\n'));
        run_process({"partx", "-u", device});
    }
    ~LoopGuard() { run_process({"losetup", "-d", device}); }
};

// scripts/serve-repo serving `repo` on 127.0.0.1 (nginx with the project's
// template); stopped, with its files removed, by the destructor.
class RepoServer {
public:
    explicit RepoServer(const fs::path& repo);
    ~RepoServer();
    RepoServer(const RepoServer&) = delete;
    RepoServer& operator=(const RepoServer&) = delete;
    const std::string& url() const { return m_url; }
    // nginx's access log so far: a line per request (time, client address,
    // "request", status, bytes sent, "user agent").
    std::string access_log() const;

private:
    Scratch m_run;
    pid_t m_pid = -1;
    std::string m_url;
};

// A rootfs plus kernel committed with treeflash build into `repo`; returns the commit.
std::string build_commit(const fs::path& workdir, const fs::path& repo, const std::vector<std::string>& extra = {});

// The image's bytes from `offset`, `length` of them.
std::string read_bytes(const fs::path& file, uint64_t offset, size_t length);

} // namespace treeflash::test
