#include "tests/support/system.hpp"

#include "common/text.hpp"

#include <algorithm>
#include <arpa/inet.h>
#include <chrono>
#include <csignal>
#include <fcntl.h>
#include <fstream>
#include <map>
#include <sstream>
#include <netinet/in.h>
#include <nlohmann/json.hpp>
#include <spawn.h>
#include <stdexcept>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

extern char** environ;

namespace treeflash::test {

namespace {

int free_port()
{
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr {};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof addr);
    socklen_t len = sizeof addr;
    ::getsockname(fd, reinterpret_cast<struct sockaddr*>(&addr), &len);
    ::close(fd);
    return ntohs(addr.sin_port);
}

bool port_open(int port)
{
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr {};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bool ok = ::connect(fd, reinterpret_cast<struct sockaddr*>(&addr), sizeof addr) == 0;
    ::close(fd);
    return ok;
}

} // namespace

namespace {

bool below_any(const std::string& path, const std::vector<fs::path>& roots)
{
    for (const auto& root : roots)
        if (path == root.string() || path.rfind(root.string() + "/", 0) == 0)
            return true;
    return false;
}

// "/dev/loop3" or "/dev/loop3p2" names a partition of one of `loops` ("loop3").
bool on_loop_of(const std::string& device, const std::set<std::string>& loops)
{
    if (device.rfind("/dev/", 0) != 0)
        return false;
    std::string name = device.substr(5);
    if (auto p = name.find('p', 4); p != std::string::npos && name.rfind("loop", 0) == 0)
        name.resize(p);
    return loops.count(name) > 0;
}

} // namespace

std::set<std::string> system_leftovers()
{
    // This run's own: loop devices over files in its Scratch folders, loop
    // devices over those devices (an upgrade's partition), and mounts of
    // them or below those folders. What other processes attach or mount
    // meanwhile is not this test's to judge.
    std::vector<fs::path> roots = scratch_paths_made();
    std::map<std::string, std::string> backing_of;
    for (const auto& entry : fs::directory_iterator("/sys/block")) {
        std::ifstream backing(entry.path() / "loop/backing_file");
        std::string file;
        if (std::getline(backing, file))
            backing_of[entry.path().filename().string()] = file;
    }
    std::set<std::string> ours;
    for (bool grew = true; grew;) {
        grew = false;
        for (const auto& [loop, file] : backing_of)
            if (!ours.count(loop) && (below_any(file, roots) || on_loop_of(file, ours)))
                grew = ours.insert(loop).second;
    }
    std::set<std::string> out;
    for (const auto& loop : ours)
        out.insert("loop " + loop + " " + backing_of[loop]);
    std::ifstream mounts("/proc/self/mountinfo");
    for (std::string line; std::getline(mounts, line);) {
        std::istringstream in(line);
        std::string id, parent, devno, root, target, field, source;
        in >> id >> parent >> devno >> root >> target;
        while (in >> field && field != "-") {
        }
        in >> field >> source; // file system type, then the source
        if (below_any(target, roots) || on_loop_of(source, ours))
            out.insert("mount " + target + " of " + source);
    }
    return out;
}

// scripts/serve-repo, as a user runs it, with its access log in a file.
RepoServer::RepoServer(const fs::path& repo)
{
    int port = free_port();
    std::string script = (fs::path(TREEFLASH_SOURCE_DIR) / "scripts/serve-repo").string();
    std::string listen = "127.0.0.1:" + std::to_string(port);
    std::vector<std::string> argv{script, fs::absolute(repo).string(), listen};
    std::vector<std::string> env{"ACCESS_LOG=" + (m_run / "access.log").string()};
    for (char** e = environ; *e; ++e)
        if (std::string_view(*e).rfind("ACCESS_LOG=", 0) != 0)
            env.emplace_back(*e);
    std::vector<char*> raw_argv, raw_env;
    for (auto& a : argv)
        raw_argv.push_back(a.data());
    raw_argv.push_back(nullptr);
    for (auto& e : env)
        raw_env.push_back(e.data());
    raw_env.push_back(nullptr);
    // Its own lines ("serving ...") go to a file beside the access log.
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    std::string output = (m_run / "serve-repo.log").string();
    posix_spawn_file_actions_addopen(&actions, 1, output.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    int spawned = posix_spawn(&m_pid, script.c_str(), &actions, nullptr, raw_argv.data(), raw_env.data());
    posix_spawn_file_actions_destroy(&actions);
    if (spawned != 0)
        throw std::runtime_error("cannot start " + script);
    for (int i = 0; i < 250 && !port_open(port); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (!port_open(port)) {
        ::kill(m_pid, SIGTERM);
        ::waitpid(m_pid, nullptr, 0);
        throw std::runtime_error("serve-repo did not start on port " + std::to_string(port));
    }
    m_url = "http://" + listen + "/";
}

std::string RepoServer::access_log() const
{
    return read_text(m_run / "access.log");
}

RepoServer::~RepoServer()
{
    if (m_pid > 0) {
        ::kill(m_pid, SIGTERM);
        ::waitpid(m_pid, nullptr, 0);
    }
}

std::string build_commit(const fs::path& workdir, const fs::path& repo, const std::vector<std::string>& extra)
{
    fs::path rootfs = workdir / "rootfs";
    if (!fs::exists(rootfs))
        make_rootfs(rootfs);
    FakeKernel kernel = make_kernel_files(workdir);
    std::vector<std::string> args{"build", "--rootfs", rootfs.string(), "--repo", repo.string(),
                                  "--kernel", kernel.kernel.string(), "--devicetree", kernel.devicetree.string()};
    args.insert(args.end(), extra.begin(), extra.end());
    auto result = run_treeflash(args);
    if (!result.ok())
        throw std::runtime_error("build failed: " + result.err);
    return result.out.substr(0, 64);
}

SmallTmpfs::SmallTmpfs(uint64_t size)
{
    REQUIRE(::mount("tmpfs", dir.path().c_str(), "tmpfs", 0, ("size=" + std::to_string(size)).c_str()) == 0);
}

SmallTmpfs::~SmallTmpfs()
{
    ::umount2(dir.path().c_str(), MNT_DETACH);
}

ProcessResult flash_image(const fs::path& repo, const fs::path& image, const std::vector<std::string>& extra)
{
    std::vector<std::string> args{"flash", "--no-gpg-verify", "--image", image.string(), "--repo", repo.string()};
    if (std::find(extra.begin(), extra.end(), "--board") == extra.end()) {
        args.push_back("--board");
        args.push_back("qemu-arm64");
    }
    args.insert(args.end(), extra.begin(), extra.end());
    return run_treeflash(args);
}

std::pair<uint64_t, uint64_t> rootfs_extent(const fs::path& image)
{
    auto dump = run_process({"sfdisk", "-J", image.string()});
    auto parts = nlohmann::json::parse(dump.out)["partitiontable"]["partitions"];
    return {parts[2]["start"].get<uint64_t>() * 512, parts[2]["size"].get<uint64_t>() * 512};
}

std::string read_bytes(const fs::path& file, uint64_t offset, size_t length)
{
    std::ifstream in(file, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(offset));
    std::string data(length, '\0');
    in.read(data.data(), static_cast<std::streamsize>(length));
    data.resize(static_cast<size_t>(in.gcount()));
    return data;
}

} // namespace treeflash::test
