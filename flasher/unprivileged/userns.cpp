#include "flasher/unprivileged/userns.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/process.hpp"

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <gio/gio.h>
#include <poll.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// The helper's descriptors: its reports, and the handshake by which the
// parent writes root's identity maps.
constexpr int report_descriptor = 3;
constexpr int ready_descriptor = 4; // the helper writes one byte once it has unshared
constexpr int go_descriptor = 5;    // the parent writes one byte once the maps are written

// Writes `text` to /proc/PID/FILE (PID 0: this process) in one write, as
// the id map files want.
bool write_proc_of(pid_t pid, const char* file, const std::string& text)
{
    std::string path = "/proc/" + (pid ? std::to_string(pid) : std::string("self")) + "/" + file;
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
    return fd && ::write(fd.get(), text.data(), text.size()) == static_cast<ssize_t>(text.size());
}

// Waits for one byte on `fd` (false when the other end closed first).
bool wait_byte(int fd)
{
    char c = 0;
    for (;;) {
        ssize_t n = ::read(fd, &c, 1);
        if (n < 0 && errno == EINTR)
            continue;
        return n == 1;
    }
}

void send(char kind, const std::string& text)
{
    std::string line(1, kind);
    for (char c : text)
        line += c == '\n' ? ' ' : c;
    line += '\n';
    fs::write_to_pipe(report_descriptor, line);
}

// In the helper: a user namespace whose root is this process's user (as
// root: every id maps to itself, which only the parent may write), and a
// mount namespace of its own whose mounts reach nobody else.
void enter_namespaces()
{
    uid_t uid = ::geteuid();
    gid_t gid = ::getegid();
    if (::unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0)
        throw_errno("create a user namespace");
    if (uid == 0) {
        if (::write(ready_descriptor, "r", 1) != 1 || !wait_byte(go_descriptor))
            throw Error("the user namespace's id maps were not written");
    } else {
        if (!write_proc_of(0, "setgroups", "deny") && errno != ENOENT)
            throw_errno("refuse setgroups in the user namespace");
        if (!write_proc_of(0, "uid_map", "0 " + std::to_string(uid) + " 1\n"))
            throw_errno("map uid " + std::to_string(uid) + " to root in the user namespace");
        if (!write_proc_of(0, "gid_map", "0 " + std::to_string(gid) + " 1\n"))
            throw_errno("map gid " + std::to_string(gid) + " to root in the user namespace");
    }
    ::close(ready_descriptor);
    ::close(go_descriptor);
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0)
        throw_errno("make the helper's mounts private");
}

} // namespace

void NamespaceChannel::notice(const std::string& text) const
{
    send('N', text);
}

void NamespaceChannel::data(const std::string& text) const
{
    send('D', text);
}

int run_namespace_helper(const std::function<void(const NamespaceChannel&)>& work)
{
    // The report pipe is this process's alone: the programs it runs do
    // not inherit it.
    ::fcntl(report_descriptor, F_SETFD, FD_CLOEXEC);
    try {
        enter_namespaces();
        work(NamespaceChannel{});
        return 0;
    } catch (const std::exception& e) {
        send('E', e.what());
        return 1;
    }
}

std::vector<std::string> run_as_namespace_root(const std::string& command, const std::vector<std::string>& args,
                                               const NamespaceNotice& notice, GCancellable* cancellable,
                                               const std::function<void()>& meanwhile)
{
    Pipe report, ready, go;
    ChildSetup setup;
    std::vector<std::string> argv = treeflash_command(command, setup);
    argv.insert(argv.end(), args.begin(), args.end());
    // A process group of its own, which a cancel kills whole: the helper
    // and every program it runs.
    setup.new_process_group = true;
    // Its stdout is the command's stdout here: what it prints goes to stderr.
    setup.descriptors = {{STDERR_FILENO, STDOUT_FILENO},
                         {report.write_end.get(), report_descriptor},
                         {ready.write_end.get(), ready_descriptor},
                         {go.read_end.get(), go_descriptor}};
    pid_t pid = spawn_child(argv, setup);
    report.write_end.reset();
    ready.write_end.reset();
    go.read_end.reset();
    // Root maps every id to itself, so files of any owner keep their owner;
    // only this side holds CAP_SETUID where the ids live. Anyone else maps
    // just its own ids to 0, which the helper does itself.
    if (::geteuid() == 0 && wait_byte(ready.read_end.get())) {
        if (write_proc_of(pid, "uid_map", "0 0 4294967295\n") && write_proc_of(pid, "gid_map", "0 0 4294967295\n"))
            (void)!::write(go.write_end.get(), "g", 1);
    }
    go.write_end.reset();
    ready.read_end.reset();

    std::string error, pending;
    std::vector<std::string> data;
    bool cancelled = false;
    for (;;) {
        if (cancellable && g_cancellable_is_cancelled(cancellable) && !cancelled) {
            ::kill(-pid, SIGKILL); // the helper and every program it runs
            cancelled = true;
        }
        struct pollfd p {report.read_end.get(), POLLIN, 0};
        int ready_count = ::poll(&p, 1, meanwhile ? 25 : 200);
        if (meanwhile && !cancelled)
            meanwhile();
        if (ready_count <= 0)
            continue;
        char buffer[4096];
        ssize_t n = ::read(report.read_end.get(), buffer, sizeof buffer);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        pending.append(buffer, static_cast<size_t>(n));
        for (size_t end; (end = pending.find('\n')) != std::string::npos; pending.erase(0, end + 1)) {
            std::string line = pending.substr(0, end);
            if (line.empty())
                continue;
            if (line[0] == 'E')
                error = line.substr(1);
            else if (line[0] == 'D')
                data.push_back(line.substr(1));
            else if (line[0] == 'N' && notice)
                notice(line.substr(1));
        }
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (cancelled)
        throw Cancelled("interrupted");
    if (!error.empty())
        throw Error(error);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        throw Error("the work in the user namespace died ("
                    + std::string(WIFSIGNALED(status) ? strsignal(WTERMSIG(status)) : "exit status " + std::to_string(WEXITSTATUS(status)))
                    + ")");
    return data;
}

int run_namespace_check()
{
    return run_namespace_helper([](const NamespaceChannel& channel) { channel.data("uid " + std::to_string(::geteuid())); });
}

bool user_namespaces_available()
{
    try {
        auto data = run_as_namespace_root(namespace_check_command, {}, {}, nullptr);
        return data.size() == 1 && data[0] == "uid 0";
    } catch (const Error&) {
        return false;
    }
}

} // namespace treeflash::flasher
