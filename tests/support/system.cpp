#include "tests/support/system.hpp"

#include "common/text.hpp"

#include <arpa/inet.h>
#include <chrono>
#include <csignal>
#include <fstream>
#include <netinet/in.h>
#include <spawn.h>
#include <stdexcept>
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

std::set<std::string> system_leftovers()
{
    std::set<std::string> out;
    for (const auto& entry : fs::directory_iterator("/sys/block")) {
        std::ifstream backing(entry.path() / "loop/backing_file");
        std::string file;
        if (std::getline(backing, file))
            out.insert("loop " + entry.path().filename().string() + " " + file);
    }
    std::ifstream mounts("/proc/self/mountinfo");
    for (std::string line; std::getline(mounts, line);) {
        std::istringstream in(line);
        std::string id, parent, devno, root, target;
        in >> id >> parent >> devno >> root >> target;
        for (const char* prefix : {"/tmp/", "/var/tmp/", "/work/"})
            if (target.rfind(prefix, 0) == 0)
                out.insert("mount " + target);
    }
    return out;
}

RepoServer::RepoServer(const fs::path& repo)
{
    ::chmod(m_run.path().c_str(), 0755);
    int port = free_port();
    std::string conf = read_text(fs::path(TREEFLASH_SOURCE_DIR) / "templates/nginx-repo.conf");
    text::replace_all(conf, "@LISTEN@", "127.0.0.1:" + std::to_string(port));
    text::replace_all(conf, "@REPO@", fs::absolute(repo).string());
    text::replace_all(conf, "@RUNDIR@", m_run.path().string());
    write_file(m_run / "nginx.conf", conf);
    std::string conf_path = (m_run / "nginx.conf").string();
    std::vector<std::string> argv{"nginx", "-c", conf_path, "-g", "daemon off;"};
    std::vector<char*> raw;
    for (auto& a : argv)
        raw.push_back(a.data());
    raw.push_back(nullptr);
    if (posix_spawnp(&m_pid, "nginx", nullptr, nullptr, raw.data(), environ) != 0)
        throw std::runtime_error("cannot start nginx");
    for (int i = 0; i < 200 && !port_open(port); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (!port_open(port)) {
        ::kill(m_pid, SIGKILL);
        ::waitpid(m_pid, nullptr, 0);
        throw std::runtime_error("nginx did not start on port " + std::to_string(port));
    }
    m_url = "http://127.0.0.1:" + std::to_string(port) + "/";
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
