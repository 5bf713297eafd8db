#include "common/process.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"

#include <cerrno>
#include <gio/gio.h>
#include <cstring>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace treeflash {

namespace {

struct Pipe {
    UniqueFd read_end;
    UniqueFd write_end;
    Pipe()
    {
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0)
            throw_errno("pipe");
        read_end.reset(fds[0]);
        write_end.reset(fds[1]);
    }
};

class SpawnActions {
public:
    SpawnActions() { posix_spawn_file_actions_init(&m_actions); }
    ~SpawnActions() { posix_spawn_file_actions_destroy(&m_actions); }
    posix_spawn_file_actions_t* get() { return &m_actions; }

private:
    posix_spawn_file_actions_t m_actions;
};

} // namespace

std::vector<std::string> child_environment(const std::vector<std::string>& overrides)
{
    auto key_of = [](const std::string& entry) { return entry.substr(0, entry.find('=')); };
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) {
        std::string entry(*e);
        bool overridden = false;
        for (const auto& o : overrides)
            overridden |= key_of(o) == key_of(entry);
        if (!overridden)
            env.push_back(std::move(entry));
    }
    env.insert(env.end(), overrides.begin(), overrides.end());
    return env;
}

ProcessResult run_process(const std::vector<std::string>& argv, const ProcessOptions& options)
{
    if (argv.empty())
        throw Error("run: empty command");
    Pipe out, err;
    SpawnActions actions;
    posix_spawn_file_actions_addopen(actions.get(), 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(actions.get(), out.write_end.get(), 1);
    posix_spawn_file_actions_adddup2(actions.get(), err.write_end.get(), 2);

    std::vector<char*> args;
    for (const auto& arg : argv)
        args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    std::vector<std::string> env_storage = child_environment(options.extra_environment);
    std::vector<char*> env;
    for (auto& e : env_storage)
        env.push_back(e.data());
    env.push_back(nullptr);

    // The child must not inherit the signal mask that keeps SIGINT for our
    // own handler thread.
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t empty;
    sigemptyset(&empty);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    pid_t pid = 0;
    int rc = posix_spawnp(&pid, args[0], actions.get(), &attr, args.data(), env.data());
    posix_spawnattr_destroy(&attr);
    if (rc != 0)
        throw_errno("run " + argv[0], rc);
    out.write_end.reset();
    err.write_end.reset();

    ProcessResult result;
    int cancel_fd = options.cancellable ? g_cancellable_get_fd(options.cancellable) : -1;
    struct pollfd fds[3] = {{out.read_end.get(), POLLIN, 0}, {err.read_end.get(), POLLIN, 0}, {cancel_fd, POLLIN, 0}};
    std::string* sinks[2] = {&result.out, &result.err};
    int open_outputs = 2;
    char buffer[65536];
    bool cancelled = false;
    int timeout_ms = -1; // after SIGTERM: how long before SIGKILL
    while (open_outputs > 0) {
        int ready = ::poll(fds, 3, timeout_ms);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            throw_errno("poll");
        }
        if (ready == 0) {
            // Not yet reaped, so the pid is still the child's.
            ::kill(pid, SIGKILL);
            timeout_ms = -1;
            continue;
        }
        if (fds[2].fd >= 0 && (fds[2].revents & POLLIN)) {
            // Stop the child, then go on reading until it has closed its outputs.
            cancelled = true;
            ::kill(pid, SIGTERM);
            fds[2].fd = -1;
            timeout_ms = 1000;
        }
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t n = ::read(fds[i].fd, buffer, sizeof buffer);
            if (n > 0) {
                sinks[i]->append(buffer, static_cast<size_t>(n));
            } else if (n == 0 || errno != EINTR) {
                fds[i].fd = -1;
                --open_outputs;
            }
        }
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            throw_errno("wait for " + argv[0]);
    if (options.cancellable)
        g_cancellable_release_fd(options.cancellable);
    if (cancelled)
        throw Cancelled();
    if (WIFEXITED(status))
        result.exit_code = WEXITSTATUS(status);
    else if (WIFSIGNALED(status))
        result.signal = WTERMSIG(status);
    return result;
}

std::string run_checked(const std::vector<std::string>& argv, const ProcessOptions& options)
{
    ProcessResult result = run_process(argv, options);
    if (!result.ok()) {
        std::string message = result.err;
        while (!message.empty() && (message.back() == '\n' || message.back() == ' '))
            message.pop_back();
        if (message.empty())
            message = result.signal ? "killed by signal " + std::to_string(result.signal)
                                    : "exited with status " + std::to_string(result.exit_code);
        throw Error(argv[0] + ": " + message);
    }
    return result.out;
}

} // namespace treeflash
