#include "flasher/deploy/pull.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/fd.hpp"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <fcntl.h>
#include <gio/gio.h>
#include <ostree.h>
#include <poll.h>
#include <string>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

// Each change of the pull's progress becomes one line on the pipe: the
// parent only needs to see that something moves.
void report_progress(OstreeAsyncProgress* progress, gpointer user_data)
{
    int fd = *static_cast<int*>(user_data);
    guint fetched = 0, requested = 0;
    guint64 bytes = 0;
    ostree_async_progress_get(progress, "fetched", "u", &fetched, "requested", "u", &requested,
                              "bytes-transferred", "t", &bytes, nullptr);
    fs::write_to_pipe(fd, "progress " + std::to_string(fetched) + " " + std::to_string(requested) + " " + std::to_string(bytes) + "\n");
}

[[noreturn]] void run_child(OstreeRepo* repo, const std::string& remote, GVariant* options, int report_fd)
{
    OstreeAsyncProgress* progress = ostree_async_progress_new_and_connect(report_progress, &report_fd);
    GError* error = nullptr;
    gboolean ok = ostree_repo_pull_with_options(repo, remote.c_str(), options, progress, nullptr, &error);
    ostree_async_progress_finish(progress);
    if (ok) {
        fs::write_to_pipe(report_fd, "ok\n");
        ::_exit(0);
    }
    std::string message = error ? error->message : "failed";
    for (auto& c : message)
        if (c == '\n')
            c = ' ';
    fs::write_to_pipe(report_fd, "error " + message + "\n");
    ::_exit(1);
}

void stop_child(pid_t pid)
{
    ::kill(pid, SIGKILL);
    while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
    }
}

} // namespace

void watched_pull(OstreeRepo* repo, const std::string& remote, GVariant* options, const std::string& what,
                  unsigned stall_seconds, GCancellable* cancellable, const std::filesystem::path& download_dir)
{
    const std::string tmpdir = download_dir.string();
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0)
        throw_errno("pipe");
    UniqueFd read_end(fds[0]), write_end(fds[1]);
    pid_t parent = ::getpid();
    pid_t pid = ::fork();
    if (pid < 0)
        throw_errno("fork");
    if (pid == 0) {
        // Dies with its parent: a treeflash killed with SIGKILL must not
        // leave a pull running on (and holding) the card.
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (::getppid() != parent)
            ::_exit(1);
        read_end.reset();
        if (!tmpdir.empty())
            ::setenv("TMPDIR", tmpdir.c_str(), 1);
        run_child(repo, remote, options, write_end.get());
    }
    write_end.reset();

    using clock = std::chrono::steady_clock;
    auto last_progress = clock::now();
    std::string buffer, last_line, outcome;
    int cancel_fd = cancellable ? g_cancellable_get_fd(cancellable) : -1;
    struct CancelFdRelease {
        GCancellable* c;
        ~CancelFdRelease()
        {
            if (c)
                g_cancellable_release_fd(c);
        }
    } release{cancellable};
    for (bool open = true; open;) {
        struct pollfd pfd[2] = {{read_end.get(), POLLIN, 0}, {cancel_fd, POLLIN, 0}};
        int ready = ::poll(pfd, 2, 1000);
        if (ready < 0 && errno != EINTR) {
            stop_child(pid);
            throw_errno("poll");
        }
        if (cancel_fd >= 0 && (pfd[1].revents & POLLIN)) {
            stop_child(pid);
            throw Cancelled();
        }
        if (ready > 0 && (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))) {
            char chunk[4096];
            ssize_t n = ::read(read_end.get(), chunk, sizeof chunk);
            if (n <= 0 && !(n < 0 && errno == EINTR)) {
                open = false;
            } else if (n > 0) {
                buffer.append(chunk, static_cast<size_t>(n));
                for (size_t nl; (nl = buffer.find('\n')) != std::string::npos; buffer.erase(0, nl + 1)) {
                    std::string line = buffer.substr(0, nl);
                    if (line.rfind("progress ", 0) == 0) {
                        if (line != last_line)
                            last_progress = clock::now();
                        last_line = line;
                    } else {
                        outcome = line;
                    }
                }
            }
        }
        if (open && clock::now() - last_progress > std::chrono::seconds(stall_seconds)) {
            stop_child(pid);
            throw Error(what + ": nothing arrived for " + std::to_string(stall_seconds)
                        + " s (the server accepts connections but does not answer?); --network-timeout sets the limit");
        }
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            throw_errno("wait for the pull");
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && outcome == "ok")
        return;
    if (outcome.rfind("error ", 0) == 0)
        throw Error(what + ": " + outcome.substr(6));
    throw Error(what + ": the pull ended unexpectedly (" + (WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status)) : "status " + std::to_string(WEXITSTATUS(status))) + ")");
}

} // namespace treeflash::flasher
