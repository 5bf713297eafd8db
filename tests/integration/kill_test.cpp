// treeflash killed with SIGKILL, the one signal it cannot handle, at each
// phase of flash and upgrade: the kernel must clean up for it. No mount,
// no loop device and no process of the killed run may remain, and the next
// run must succeed.
#include "tests/support/system.hpp"

#include <chrono>
#include <csignal>
#include <doctest/doctest.h>
#include <fstream>
#include <functional>
#include <map>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;

namespace {

const bool not_root = !is_root();

struct ProcessInfo {
    pid_t parent = 0;
    char state = '?';
    std::string name;    // comm
    std::string command; // cmdline, NULs as spaces
};

std::map<pid_t, ProcessInfo> all_processes()
{
    std::map<pid_t, ProcessInfo> out;
    for (const auto& entry : fs::directory_iterator("/proc")) {
        std::string name = entry.path().filename().string();
        if (name.find_first_not_of("0123456789") != std::string::npos)
            continue;
        std::ifstream stat(entry.path() / "stat");
        std::string line;
        if (!std::getline(stat, line))
            continue;
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        auto open = line.find('('), close = line.rfind(')');
        if (open == std::string::npos || close == std::string::npos)
            continue;
        ProcessInfo info;
        info.name = line.substr(open + 1, close - open - 1);
        std::istringstream rest(line.substr(close + 2));
        rest >> info.state >> info.parent;
        std::ifstream cmdline(entry.path() / "cmdline", std::ios::binary);
        std::getline(cmdline, info.command, '\0');
        for (std::string arg; std::getline(cmdline, arg, '\0');)
            info.command += " " + arg;
        out[std::stoi(name)] = info;
    }
    return out;
}

// `root`'s descendants now.
std::map<pid_t, ProcessInfo> descendants(pid_t root)
{
    auto all = all_processes();
    std::map<pid_t, ProcessInfo> out;
    for (bool grew = true; grew;) {
        grew = false;
        for (const auto& [pid, info] : all)
            if ((info.parent == root || out.count(info.parent)) && !out.count(pid))
                grew = out.emplace(pid, info).second;
    }
    return out;
}

// This runner is a subreaper: what a killed treeflash leaves running
// becomes a child of this process rather than of PID 1, where the check
// below finds it. Zombies among them are reaped and not counted.
std::set<pid_t> live_children()
{
    std::set<pid_t> out;
    for (const auto& [pid, info] : descendants(::getpid())) {
        if (info.parent != ::getpid())
            continue;
        if (info.state == 'Z')
            ::waitpid(pid, nullptr, WNOHANG);
        else
            out.insert(pid);
    }
    return out;
}

bool any_descendant(pid_t pid, const std::function<bool(const ProcessInfo&)>& match)
{
    for (const auto& [child, info] : descendants(pid))
        if (match(info))
            return true;
    return false;
}

// A phase of a run, and how to tell that the run is in it.
struct Phase {
    const char* name;
    std::function<bool(pid_t, const fs::path& log)> reached;
};

bool running(const char* program, pid_t pid)
{
    return any_descendant(pid, [&](const ProcessInfo& p) { return p.name == program; });
}

bool pulling(pid_t pid)
{
    return any_descendant(pid, [](const ProcessInfo& p) { return p.command.find(" __pull ") != std::string::npos; });
}

bool log_says(const fs::path& log, const std::string& text)
{
    return read_text(log).find(text) != std::string::npos;
}

// The /tmp/treeflash-mnt-* mount points that exist now.
std::set<std::string> tmp_mount_points()
{
    std::set<std::string> out;
    for (const auto& entry : fs::directory_iterator(fs::temp_directory_path()))
        if (entry.path().filename().string().rfind("treeflash-mnt-", 0) == 0)
            out.insert(entry.path().string());
    return out;
}

// The mount namespace `pid` is in ("mnt:[4026531841]"), empty when gone.
std::string mount_namespace_of(pid_t pid)
{
    std::error_code ec;
    return fs::read_symlink("/proc/" + std::to_string(pid) + "/ns/mnt", ec).string();
}

// Whether any process is still in mount namespace `ns`.
bool namespace_in_use(const std::string& ns)
{
    for (const auto& [pid, info] : all_processes())
        if (mount_namespace_of(pid) == ns)
            return true;
    return false;
}

// Starts treeflash with `args`, kills it with SIGKILL once `phase` is
// reached, then checks that nothing of it remains.
void kill_in_phase(const std::vector<std::string>& args, const Phase& phase, const fs::path& log)
{
    INFO("phase: " << std::string(phase.name));
    NoLeftovers guard;
    std::set<pid_t> children_before = live_children();
    std::set<std::string> mount_points_before = tmp_mount_points();
    pid_t pid = spawn_treeflash(args, log.string());
    bool reached = false;
    for (int i = 0; i < 3000 && !reached; ++i) {
        reached = phase.reached(pid, log);
        if (!reached)
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    // As root, flash and upgrade mount in a namespace of their own: once no
    // process is left in it, its mounts are gone wherever they were.
    std::string own_namespace = mount_namespace_of(::getpid());
    std::string killed_namespace = mount_namespace_of(pid);
    ::kill(pid, SIGKILL);
    int signal = 0;
    wait_exit(pid, &signal);
    INFO("treeflash said: " << read_text(log));
    REQUIRE_MESSAGE(reached, "the run never reached the phase");
    REQUIRE_MESSAGE(signal == SIGKILL, "the run ended before it was killed");
    // The kernel needs a moment: the mount namespace goes once its last
    // process is reaped, the loop devices once their file system is gone.
    std::set<pid_t> left;
    for (int i = 0; i < 100; ++i) {
        left.clear();
        for (pid_t child : live_children())
            if (!children_before.count(child))
                left.insert(child);
        bool namespace_gone = killed_namespace == own_namespace || !namespace_in_use(killed_namespace);
        if (left.empty() && namespace_gone && system_leftovers() == guard.before)
            break;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    for (pid_t child : left) {
        CHECK_MESSAGE(false, "still running after treeflash was killed: " << all_processes()[child].command);
        ::kill(child, SIGKILL);
        ::waitpid(child, nullptr, 0);
    }
    CHECK(tmp_mount_points() == mount_points_before);
    if (killed_namespace != own_namespace)
        CHECK_MESSAGE(!namespace_in_use(killed_namespace), "a process is still in the killed run's mount namespace");
}

struct Subreaper {
    Subreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, 1); }
    ~Subreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, 0); }
};

// The scratch trees of unprivileged flashes (this user's) that exist now.
std::set<std::string> scratch_trees(const fs::path& beside)
{
    std::set<std::string> out;
    for (const fs::path& dir : {fs::path("/dev/shm"), beside})
        for (const auto& entry : fs::directory_iterator(dir))
            if (entry.path().filename().string().rfind(".treeflash-tree-", 0) == 0)
                out.insert(entry.path().string());
    return out;
}

// Block maps of `image` written but not moved into place.
std::vector<std::string> pending_bmaps(const fs::path& image)
{
    std::vector<std::string> out;
    for (const auto& entry : fs::directory_iterator(image.parent_path()))
        if (entry.path().filename().string().rfind(image.filename().string() + ".bmap.tmp-", 0) == 0)
            out.push_back(entry.path().string());
    return out;
}

void kill_flash_at_each_phase(const std::string& method)
{
    Subreaper subreaper;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    std::vector<std::string> args{"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(),
                                  "--repo", (tmp / "repo").string(), "--image-method", method, "--compress", "zst",
                                  "--overwrite"};
    const Phase phases[] = {
        // An unsigned commit fetched whole by treeflash needs no pull by
        // libostree: the notice that starts the fetching marks the phase.
        {"fetch and pull", [](pid_t pid, const fs::path& log) { return pulling(pid) || log_says(log, "treeflash: pulling "); }},
        {"deploy", [](pid_t, const fs::path& log) { return log_says(log, "deploying"); }},
        // With loop devices each mkfs.ext4 of an empty partition may end
        // between two looks at the process tree; the notice that starts the
        // formatting is the sure sign there ("formatting" comes only from
        // that path; the unprivileged one runs one long mkfs.ext4 -d).
        {"mkfs", [](pid_t pid, const fs::path& log) {
             return running("mkfs.ext4", pid) || log_says(log, "treeflash: formatting ");
         }},
        {"bmap and publish", [&](pid_t, const fs::path&) { return fs::exists(image); }},
    };
    for (const auto& phase : phases) {
        fs::remove(image);
        std::set<std::string> trees_before = scratch_trees(tmp.path());
        kill_in_phase(args, phase, tmp / "flash.log");
        // The trees lived in the helper's own tmpfs: nothing of them stays.
        // (Where /dev/shm is the test's own folder, they go beside the image
        // and the next run removes them.)
        if (tmp.path().string().rfind("/dev/shm/", 0) != 0)
            CHECK(scratch_trees(tmp.path()) == trees_before);
        // The next run succeeds, and removes what the killed one left: a
        // block map is written while the image syncs and moved into place
        // after it, a window too short to catch here, so one is put there.
        write_file(image.string() + ".bmap.tmp-1", "left by a killed run");
        auto again = run_treeflash(args);
        CHECK_MESSAGE(again.ok(), again.err);
        CHECK(pending_bmaps(image).empty());
    }
}

} // namespace

TEST_SUITE("kill") {

TEST_CASE("flash --image-method loop killed at each phase leaves nothing behind" * doctest::skip(not_root))
{
    kill_flash_at_each_phase("loop");
}

TEST_CASE("flash --image-method unprivileged killed at each phase leaves nothing behind" * doctest::skip(not_root))
{
    kill_flash_at_each_phase("unprivileged");
}

TEST_CASE("upgrade killed while pulling or deploying leaves the card upgradable" * doctest::skip(not_root))
{
    Subreaper subreaper;
    Scratch tmp;
    build_commit(tmp.path(), tmp / "repo");
    fs::path image = tmp / "card.img";
    auto flashed = run_treeflash({"flash", "--no-gpg-verify", "--board", "qemu-arm64", "--image", image.string(),
                                  "--repo", (tmp / "repo").string()});
    REQUIRE_MESSAGE(flashed.ok(), flashed.err);
    const Phase phases[] = {
        {"pull", [](pid_t pid, const fs::path&) { return pulling(pid); }},
        {"deploy", [](pid_t, const fs::path& log) { return log_says(log, "deploying"); }},
    };
    int version = 2;
    for (const auto& phase : phases) {
        // A newer commit each time, so that there is something to pull.
        write_file(tmp / "rootfs/usr/share/version", std::to_string(version++) + "\n");
        build_commit(tmp.path(), tmp / "repo");
        kill_in_phase({"upgrade", image.string()}, phase, tmp / "upgrade.log");
        auto again = run_treeflash({"upgrade", image.string()});
        CHECK_MESSAGE(again.ok(), again.err);
    }
}

} // TEST_SUITE
