#include "tests/support/postgres.hpp"

#include <chrono>
#include <csignal>
#include <fcntl.h>
#include <sys/stat.h>
#include <cstdlib>
#include <grp.h>
#include <pwd.h>
#include <stdexcept>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

namespace treeflash::test {

namespace {

// The server's binaries: pg_config --bindir (libpq-dev's pg_config).
fs::path postgres_bindir()
{
    auto r = run_process({"pg_config", "--bindir"});
    if (!r.ok())
        return {};
    std::string dir = r.out.substr(0, r.out.find('\n'));
    return fs::exists(fs::path(dir) / "postgres") ? fs::path(dir) : fs::path();
}

// The user the server runs as: postgres when we are root.
struct ServerUser {
    uid_t uid = ::getuid();
    gid_t gid = ::getgid();
    ServerUser()
    {
        if (::getuid() != 0)
            return;
        const struct passwd* pw = ::getpwnam("postgres");
        if (!pw)
            throw std::runtime_error("no postgres user to run the test's PostgreSQL server as");
        uid = pw->pw_uid;
        gid = pw->pw_gid;
    }
};

// Forks and runs argv as `user`, dying with this process (the signal is set
// after the change of user, which would clear it).
pid_t start_as(const ServerUser& user, const std::vector<std::string>& argv, const fs::path& log, int death_signal)
{
    std::vector<char*> raw;
    for (const auto& a : argv)
        raw.push_back(const_cast<char*>(a.c_str()));
    raw.push_back(nullptr);
    pid_t parent = ::getpid();
    pid_t pid = ::fork();
    if (pid < 0)
        throw std::runtime_error("fork failed");
    if (pid == 0) {
        int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (fd >= 0) {
            ::dup2(fd, 1);
            ::dup2(fd, 2);
        }
        int devnull = ::open("/dev/null", O_RDONLY);
        if (devnull >= 0)
            ::dup2(devnull, 0);
        if (::getuid() == 0 && (::setgroups(0, nullptr) != 0 || ::setgid(user.gid) != 0 || ::setuid(user.uid) != 0))
            ::_exit(126);
        if (death_signal) {
            ::prctl(PR_SET_PDEATHSIG, death_signal);
            if (::getppid() != parent)
                ::_exit(1);
        }
        ::execv(raw[0], raw.data());
        ::_exit(127);
    }
    return pid;
}

} // namespace

bool postgres_available()
{
    return !postgres_bindir().empty();
}

PostgresServer::PostgresServer()
{
    fs::path bin = postgres_bindir();
    if (bin.empty())
        throw std::runtime_error("PostgreSQL's server is not installed (Debian: postgresql)");
    ServerUser user;
    m_dir = m_scratch / "pg";
    fs::create_directories(m_dir);
    if (::chown(m_dir.c_str(), user.uid, user.gid) != 0)
        throw std::runtime_error("cannot give " + m_dir.string() + " to the server's user");
    ::chmod(m_dir.c_str(), 0711);
    fs::path log = m_scratch / "postgres.log";
    write_file(log, "");
    ::chown(log.c_str(), user.uid, user.gid);

    pid_t init = start_as(user,
                          {(bin / "initdb").string(), "-D", (m_dir / "data").string(), "-U", "treeflash",
                           "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"},
                          log, SIGKILL);
    if (wait_exit(init) != 0)
        throw std::runtime_error("initdb failed: " + read_text(log));
    // A port of our own: with no TCP listener it only names the socket.
    m_port = 20000 + static_cast<int>(::getpid() % 30000);
    m_pid = start_as(user,
                     {(bin / "postgres").string(), "-D", (m_dir / "data").string(), "-k", m_dir.string(), "-p",
                      std::to_string(m_port), "-c", "listen_addresses=", "-c", "fsync=off", "-c",
                      "max_connections=50"},
                     log, SIGQUIT);
    m_url = "postgresql:///postgres?host=" + m_dir.string() + "&port=" + std::to_string(m_port) + "&user=treeflash";
    for (int i = 0; i < 300; ++i) {
        auto ready = run_process({(bin / "pg_isready").string(), "-q", "-h", m_dir.string(), "-p",
                                  std::to_string(m_port), "-U", "treeflash", "-d", "postgres"});
        if (ready.ok())
            return;
        int status = 0;
        if (::waitpid(m_pid, &status, WNOHANG) == m_pid) {
            m_pid = -1;
            throw std::runtime_error("the test's PostgreSQL server did not start: " + read_text(log));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    // The destructor does not run for a constructor that throws.
    ::kill(m_pid, SIGQUIT);
    wait_exit(m_pid);
    m_pid = -1;
    throw std::runtime_error("the test's PostgreSQL server did not answer in 15 s: " + read_text(log));
}

PostgresServer::~PostgresServer()
{
    if (m_pid > 0) {
        // Fast shutdown: clients are disconnected, the server exits.
        ::kill(m_pid, SIGINT);
        wait_exit(m_pid);
    }
}

std::string PostgresServer::sql(const std::string& statements) const
{
    auto r = run_process({"psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", m_url, "-c", statements});
    if (!r.ok())
        throw std::runtime_error("psql failed: " + r.err);
    return r.out;
}

} // namespace treeflash::test
