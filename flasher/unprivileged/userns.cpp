#include "flasher/unprivileged/userns.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <gio/gio.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

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

void send(int fd, char kind, const std::string& text)
{
    std::string line(1, kind);
    for (char c : text)
        line += c == '\n' ? ' ' : c;
    line += '\n';
    fs::write_to_pipe(fd, line);
}

} // namespace

void run_as_namespace_root(const std::function<void(const NamespaceNotice&)>& work, const NamespaceNotice& notice,
                           GCancellable* cancellable, const std::function<void()>& meanwhile)
{
    int fds[2], ready_fds[2], go_fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0 || ::pipe2(ready_fds, O_CLOEXEC) != 0 || ::pipe2(go_fds, O_CLOEXEC) != 0)
        throw_errno("pipe");
    UniqueFd read_end(fds[0]), write_end(fds[1]);
    UniqueFd ready_read(ready_fds[0]), ready_write(ready_fds[1]), go_read(go_fds[0]), go_write(go_fds[1]);
    uid_t uid = ::geteuid();
    gid_t gid = ::getegid();
    // Root maps every id to itself (the parent writes that map: only it holds
    // CAP_SETUID where the ids live), so files of any owner keep their owner.
    // Anyone else maps just its own ids to 0, which needs no helper.
    bool identity = uid == 0;
    pid_t pid = ::fork();
    if (pid < 0)
        throw_errno("fork");
    if (pid == 0) {
        read_end.reset();
        ready_read.reset();
        go_write.reset();
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        // A process group of its own, so that a cancel kills the programs it
        // runs (mkfs.ext4, the pull's child) with it; the parent, which sees
        // Ctrl-C and SIGTERM, does that. Signals the parent's threads block
        // are unblocked here.
        ::setpgid(0, 0);
        ::signal(SIGINT, SIG_DFL);
        ::signal(SIGTERM, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        ::pthread_sigmask(SIG_SETMASK, &none, nullptr);
        int code = 0;
        try {
            if (::unshare(CLONE_NEWUSER) != 0)
                throw_errno("create a user namespace");
            if (identity) {
                if (::write(ready_write.get(), "r", 1) != 1 || !wait_byte(go_read.get()))
                    throw Error("the user namespace's id maps were not written");
            } else {
                if (!write_proc_of(0, "setgroups", "deny") && errno != ENOENT)
                    throw_errno("refuse setgroups in the user namespace");
                if (!write_proc_of(0, "uid_map", "0 " + std::to_string(uid) + " 1\n"))
                    throw_errno("map uid " + std::to_string(uid) + " to root in the user namespace");
                if (!write_proc_of(0, "gid_map", "0 " + std::to_string(gid) + " 1\n"))
                    throw_errno("map gid " + std::to_string(gid) + " to root in the user namespace");
            }
            work([&](const std::string& text) { send(write_end.get(), 'N', text); });
        } catch (const std::exception& e) {
            send(write_end.get(), 'E', e.what());
            code = 1;
        }
        ::_exit(code);
    }
    ::setpgid(pid, pid); // also here: the group exists before any kill below
    ready_write.reset();
    go_read.reset();
    if (identity && wait_byte(ready_read.get())) {
        if (write_proc_of(pid, "uid_map", "0 0 4294967295\n") && write_proc_of(pid, "gid_map", "0 0 4294967295\n"))
            (void)!::write(go_write.get(), "g", 1);
    }
    go_write.reset();
    write_end.reset();

    std::string error, pending;
    bool cancelled = false;
    for (;;) {
        if (cancellable && g_cancellable_is_cancelled(cancellable) && !cancelled) {
            ::kill(-pid, SIGKILL); // the child and every program it runs
            cancelled = true;
        }
        struct pollfd p {read_end.get(), POLLIN, 0};
        int ready = ::poll(&p, 1, meanwhile ? 25 : 200);
        if (meanwhile && !cancelled)
            meanwhile();
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready <= 0)
            continue;
        char buffer[4096];
        ssize_t n = ::read(read_end.get(), buffer, sizeof buffer);
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
        throw Error("the work in the user namespace died (" + std::string(WIFSIGNALED(status) ? strsignal(WTERMSIG(status)) : "exit")
                    + ")");
}

bool user_namespaces_available()
{
    try {
        run_as_namespace_root([](const NamespaceNotice&) {}, {}, nullptr);
        return true;
    } catch (const Error&) {
        return false;
    }
}

} // namespace treeflash::flasher
