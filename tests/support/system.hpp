// Fixtures for the root tier: real loop devices, mounts, nginx, and a check
// that a test left none of them behind.
#pragma once

#include "tests/support/fixtures.hpp"

#include <set>
#include <string>
#include <sys/types.h>

namespace treeflash::test {

// Loop devices attached and mounts below /tmp, /var/tmp and /work.
std::set<std::string> system_leftovers();

// nginx serving `repo` on 127.0.0.1 with the project's template; stopped
// (and its files removed) by the destructor.
class RepoServer {
public:
    explicit RepoServer(const fs::path& repo);
    ~RepoServer();
    RepoServer(const RepoServer&) = delete;
    RepoServer& operator=(const RepoServer&) = delete;
    const std::string& url() const { return m_url; }

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
