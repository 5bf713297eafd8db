#include "flasher/deploy/pull.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/fd.hpp"
#include "common/glib.hpp"
#include "common/process.hpp"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <fcntl.h>
#include <gio/gio.h>
#include <dirent.h>
#include <ostree.h>
#include <poll.h>
#include <string>
#include <sys/statvfs.h>
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

constexpr int report_descriptor = 3; // the helper's end of the progress pipe

// What the helper says when it cannot pull, on one line.
void report_error(const std::string& text)
{
    std::string message = text;
    for (auto& c : message)
        if (c == '\n')
            c = ' ';
    fs::write_to_pipe(report_descriptor, "error " + message + "\n");
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
    // The pull runs in treeflash's own executable, started afresh: the
    // repository is named by its path (by its sysroot's when it has one,
    // which also holds its remotes), the options in GVariant text.
    ChildSetup setup;
    std::vector<std::string> argv = treeflash_command(pull_helper_command, setup);
    std::string repo_path = glib::take_string(g_file_get_path(ostree_repo_get_path(repo)));
    if (repo_path.rfind("/proc/self/", 0) == 0) // a repository opened at a descriptor of this process
        repo_path = std::filesystem::canonical(repo_path).string();
    if (ostree_repo_is_system(repo))
        argv.insert(argv.end(), {"--sysroot", std::filesystem::path(repo_path).parent_path().parent_path().string()});
    else
        argv.insert(argv.end(), {"--repo", repo_path});
    argv.insert(argv.end(), {"--remote", remote, "--options", glib::take_string(g_variant_print(options, TRUE))});
    if (ostree_repo_get_disable_fsync(repo))
        argv.push_back("--disable-fsync");
    Pipe report;
    // Ctrl-C reaches treeflash, which stops the pull; the helper itself
    // stays out of the terminal's process group.
    setup.new_process_group = true;
    // Whatever libostree prints goes to stderr, as in treeflash itself:
    // stdout is for the command's own output (--json).
    setup.descriptors = {{STDERR_FILENO, STDOUT_FILENO}, {report.write_end.get(), report_descriptor}};
    if (!download_dir.empty())
        setup.extra_environment.push_back("TMPDIR=" + download_dir.string());
    pid_t pid = spawn_child(argv, setup);
    report.write_end.reset();

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
        struct pollfd pfd[2] = {{report.read_end.get(), POLLIN, 0}, {cancel_fd, POLLIN, 0}};
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
            ssize_t n = ::read(report.read_end.get(), chunk, sizeof chunk);
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
    if (cancellable && g_cancellable_is_cancelled(cancellable))
        throw Cancelled();
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && outcome == "ok")
        return;
    if (outcome.rfind("error ", 0) == 0) {
        std::string text = outcome.substr(6);
        // libostree says "No space left on device" without a folder: name the
        // full one (its downloads' folder, or the repository's file system).
        if (text.find("No space left") != std::string::npos) {
            std::vector<std::pair<std::string, std::filesystem::path>> places{{"the repository", repo_path}};
            places.emplace_back("the pull's downloads", download_dir.empty() ? std::filesystem::path(g_get_tmp_dir()) : download_dir);
            std::string free_text;
            for (const auto& [role, place] : places) {
                struct statvfs vfs {};
                if (::statvfs(place.c_str(), &vfs) == 0)
                    free_text += (free_text.empty() ? "" : ", ") + role + " in " + place.string() + " has "
                                 + std::to_string(static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize >> 20) + " MiB free";
            }
            text += " (" + free_text + ")";
        }
        throw Error(what + ": " + text);
    }
    throw Error(what + ": the pull ended unexpectedly (" + (WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status)) : "status " + std::to_string(WEXITSTATUS(status))) + ")");
}

namespace {

struct DirClose {
    void operator()(DIR* dir) const { ::closedir(dir); }
};

// A pull from a local repository copies its metadata objects (commits,
// dirtrees, dirmetas) with their owner, so a repository owned by a user
// would leave that user's uid on the card: on the board that uid could
// rewrite them. They become the puller's, as an HTTP pull makes them.
// Content objects keep their owner: in a bare repository it is the file's.
void own_metadata_objects(OstreeRepo* repo)
{
    int objects = ::openat(ostree_repo_get_dfd(repo), "objects", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (objects < 0)
        throw_errno("open the repository's objects");
    UniqueFd objects_fd(objects);
    const uid_t uid = ::geteuid();
    const gid_t gid = ::getegid();
    for (int prefix = 0; prefix < 256; ++prefix) {
        char name[3];
        std::snprintf(name, sizeof name, "%02x", prefix);
        UniqueFd dir(::openat(objects, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!dir)
            continue;
        UniqueFd listed(::dup(dir.get()));
        std::unique_ptr<DIR, DirClose> listing(listed ? ::fdopendir(listed.get()) : nullptr);
        if (!listing)
            continue;
        listed.release(); // the DIR owns it now
        while (struct dirent* entry = ::readdir(listing.get())) {
            std::string_view object = entry->d_name;
            bool metadata = object.ends_with(".commit") || object.ends_with(".commitmeta") || object.ends_with(".dirtree")
                            || object.ends_with(".dirmeta");
            struct stat st {};
            if (!metadata || ::fstatat(dir.get(), entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
                continue;
            if ((st.st_uid == uid && st.st_gid == gid) || !S_ISREG(st.st_mode))
                continue;
            // In a user namespace a foreign owner cannot be changed (EPERM, EINVAL): it stays.
            if (::fchownat(dir.get(), entry->d_name, uid, gid, AT_SYMLINK_NOFOLLOW) != 0 && errno != EPERM
                && errno != EINVAL)
                throw_errno(std::string("own the pulled object ") + name + "/" + entry->d_name);
        }
    }
}

} // namespace

int run_pull_helper(const std::vector<std::string>& args)
{
    // The report pipe is this process's alone: what it starts (gpg) does
    // not inherit it.
    ::fcntl(report_descriptor, F_SETFD, FD_CLOEXEC);
    std::string repo_path, sysroot_path, remote, options_text;
    bool disable_fsync = false;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& arg = args[i];
        std::string* value = arg == "--repo" ? &repo_path : arg == "--sysroot" ? &sysroot_path : arg == "--remote" ? &remote
                           : arg == "--options" ? &options_text : nullptr;
        if (value && i + 1 < args.size())
            *value = args[++i];
        else if (arg == "--disable-fsync")
            disable_fsync = true;
        else {
            report_error("the pull helper was started wrongly (" + arg + ")");
            return 2;
        }
    }
    GError* error = nullptr;
    glib::Object<OstreeRepo> repo;
    if (!sysroot_path.empty()) {
        glib::Object<GFile> path(g_file_new_for_path(sysroot_path.c_str()));
        glib::Object<OstreeSysroot> sysroot(ostree_sysroot_new(path.get()));
        OstreeRepo* raw = nullptr;
        if (ostree_sysroot_get_repo(sysroot.get(), &raw, nullptr, &error))
            repo = glib::Object<OstreeRepo>(raw);
    } else {
        repo = glib::Object<OstreeRepo>(ostree_repo_open_at(AT_FDCWD, repo_path.c_str(), nullptr, &error));
    }
    if (!repo) {
        report_error(std::string("open the repository: ") + (error ? error->message : "failed"));
        return 1;
    }
    if (disable_fsync)
        ostree_repo_set_disable_fsync(repo.get(), TRUE);
    glib::Variant options = glib::adopt_variant(g_variant_parse(G_VARIANT_TYPE_VARDICT, options_text.c_str(), nullptr, nullptr, &error));
    if (!options) {
        report_error(std::string("the pull options: ") + (error ? error->message : "unreadable"));
        return 2;
    }
    int report_fd = report_descriptor;
    OstreeAsyncProgress* progress = ostree_async_progress_new_and_connect(report_progress, &report_fd);
    gboolean ok = ostree_repo_pull_with_options(repo.get(), remote.c_str(), options.get(), progress, nullptr, &error);
    ostree_async_progress_finish(progress);
    if (!ok) {
        report_error(error ? error->message : "failed");
        return 1;
    }
    try {
        own_metadata_objects(repo.get());
    } catch (const Error& e) {
        report_error(e.what());
        return 1;
    }
    fs::write_to_pipe(report_descriptor, "ok\n");
    return 0;
}

} // namespace treeflash::flasher
