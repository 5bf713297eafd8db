#include "common/process.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"

#include <cerrno>
#include <gio/gio.h>
#include <cstring>
#include <filesystem>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace treeflash {

namespace {

// The program argv[0] names: itself when it holds a slash, else the first
// executable file of that name in PATH (from `env`), then in the system's
// folders: a plain user's PATH lacks /usr/sbin, where mkfs.ext4 and
// resize2fs are. Only absolute folders count: an empty or relative entry
// would run whatever the current folder holds.
std::string find_program(const std::string& name, const std::vector<std::string>& env)
{
    if (name.find('/') != std::string::npos)
        return name;
    std::string path;
    for (const auto& entry : env)
        if (entry.rfind("PATH=", 0) == 0)
            path = entry.substr(5);
    const std::string searched = (path.empty() ? "" : path + ":") + "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    for (size_t start = 0; start <= searched.size();) {
        size_t end = searched.find(':', start);
        if (end == std::string::npos)
            end = searched.size();
        std::string dir = searched.substr(start, end - start);
        start = end + 1;
        if (dir.empty() || dir.front() != '/')
            continue;
        std::string candidate = dir + "/" + name;
        struct stat st {};
        if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0)
            return candidate;
    }
    throw Error("run " + name + ": not found in PATH (" + path + ") nor in the system's folders");
}

} // namespace

std::string program_path(const std::string& name)
{
    return find_program(name, child_environment({}));
}

namespace {

// set_treeflash_executable's path; empty: this process's own file.
std::string executable_override;

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

Pipe::Pipe()
{
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0)
        throw_errno("pipe");
    read_end.reset(fds[0]);
    write_end.reset(fds[1]);
}

pid_t spawn_child(const std::vector<std::string>& argv, const ChildSetup& setup)
{
    if (argv.empty())
        throw Error("run: empty command");
    // Everything the child needs is made here: after fork it only makes
    // system calls, as a copy of a process with threads must.
    std::vector<std::string> env_storage = child_environment(setup.extra_environment);
    std::string program = setup.program.empty() ? find_program(argv[0], env_storage) : setup.program;
    std::vector<char*> args;
    for (const auto& arg : argv)
        args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    std::vector<char*> env;
    for (auto& e : env_storage)
        env.push_back(e.data());
    env.push_back(nullptr);
    // Standard input is /dev/null unless the caller maps one.
    std::vector<std::pair<int, int>> mappings = setup.descriptors;
    UniqueFd null_input;
    bool maps_stdin = false;
    for (const auto& mapping : mappings)
        maps_stdin |= mapping.second == 0;
    if (!maps_stdin) {
        null_input.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
        if (!null_input)
            throw_errno("open /dev/null");
        mappings.emplace_back(null_input.get(), 0);
    }
    constexpr size_t max_descriptors = 16;
    if (mappings.size() > max_descriptors)
        throw Error("run " + argv[0] + ": too many descriptors to hand over");
    // The child's errno when it cannot exec; a successful exec closes it. It
    // sits above every target number, so that no dup2 below replaces it.
    Pipe exec_error;
    exec_error.write_end.reset(::fcntl(exec_error.write_end.get(), F_DUPFD_CLOEXEC, 64));
    if (!exec_error.write_end)
        throw_errno("run " + argv[0]);
    pid_t parent = ::getpid();
    pid_t pid = ::fork();
    if (pid < 0)
        throw_errno("run " + argv[0]);
    if (pid == 0) {
        auto fail = [&] {
            int failed = errno;
            [[maybe_unused]] auto ignored = ::write(exec_error.write_end.get(), &failed, sizeof failed);
            ::_exit(127);
        };
        if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
            fail();
        if (::getppid() != parent) // the parent died before the line above
            ::_exit(127);
        if (setup.new_process_group && ::setpgid(0, 0) != 0)
            fail();
        // Each descriptor is first copied above every target number, so
        // that no dup2 below overwrites one still to be moved.
        int moved[max_descriptors];
        size_t count = mappings.size();
        for (size_t i = 0; i < count; ++i)
            if ((moved[i] = ::fcntl(mappings[i].first, F_DUPFD_CLOEXEC, 64)) < 0)
                fail();
        for (size_t i = 0; i < count; ++i)
            if (::dup2(moved[i], mappings[i].second) < 0)
                fail();
        // The mask that keeps SIGINT for treeflash's handler thread is not
        // the program's.
        sigset_t none;
        sigemptyset(&none);
        ::sigprocmask(SIG_SETMASK, &none, nullptr);
        ::execve(program.c_str(), args.data(), env.data());
        fail();
    }
    exec_error.write_end.reset();
    int child_errno = 0;
    ssize_t n;
    while ((n = ::read(exec_error.read_end.get(), &child_errno, sizeof child_errno)) < 0 && errno == EINTR) {
    }
    if (n > 0) {
        while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
        }
        throw_errno("run " + program, child_errno);
    }
    return pid;
}

std::vector<std::string> treeflash_command(const std::string& command, ChildSetup& setup)
{
    // argv[0] names the program in ps; what runs is this very file.
    static const std::string name = [] {
        std::error_code ec;
        std::string path = std::filesystem::read_symlink("/proc/self/exe", ec).string();
        return ec ? std::string("treeflash") : path;
    }();
    if (!executable_override.empty()) {
        setup.program = executable_override;
        return {executable_override, command};
    }
    setup.program = "/proc/self/exe";
    return {name, command};
}

void set_treeflash_executable(const std::string& path)
{
    executable_override = path;
}

ProcessResult run_process(const std::vector<std::string>& argv, const ProcessOptions& options)
{
    if (argv.empty())
        throw Error("run: empty command");
    Pipe out, err;
    ChildSetup setup;
    setup.descriptors = {{out.write_end.get(), 1}, {err.write_end.get(), 2}};
    setup.descriptors.insert(setup.descriptors.end(), options.descriptors.begin(), options.descriptors.end());
    setup.extra_environment = options.extra_environment;
    setup.new_process_group = options.new_process_group;
    pid_t pid = spawn_child(argv, setup);
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
