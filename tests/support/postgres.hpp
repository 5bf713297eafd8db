// A private PostgreSQL server for a test: its own cluster in a scratch
// folder, listening only on a socket in that folder (no TCP), under the
// `postgres` user when the test runs as root (the server refuses root),
// else as the caller. It dies with the test process (SIGQUIT on its
// parent's death), and is stopped and removed when the object goes.
#pragma once

#include "tests/support/fixtures.hpp"

#include <string>
#include <sys/types.h>

namespace treeflash::test {

class PostgresServer {
public:
    PostgresServer();
    ~PostgresServer();
    PostgresServer(const PostgresServer&) = delete;
    PostgresServer& operator=(const PostgresServer&) = delete;

    // The URL treeflash --db takes: postgresql:///postgres?host=DIR&port=N&user=treeflash
    const std::string& url() const { return m_url; }
    // Runs SQL through psql (not the project's code); its output, unaligned,
    // tuples only, fields separated by '|'. Throws when psql fails.
    std::string sql(const std::string& statements) const;

private:
    Scratch m_scratch;
    fs::path m_dir;
    int m_port = 0;
    pid_t m_pid = -1;
    std::string m_url;
};

// Whether a PostgreSQL server can be run here (its binaries are installed).
bool postgres_available();

} // namespace treeflash::test
