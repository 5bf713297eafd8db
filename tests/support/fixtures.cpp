#include "tests/support/fixtures.hpp"

#include "common/error.hpp"
#include "common/process.hpp"

#include <archive.h>
#include <archive_entry.h>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <glib.h>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <sys/stat.h>
#include <thread>
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace treeflash::test {

std::string random_bytes(size_t size, unsigned seed)
{
    std::mt19937 rng(seed);
    std::string data(size, '\0');
    for (auto& c : data)
        c = static_cast<char>(rng());
    return data;
}

bool is_root()
{
    return ::geteuid() == 0;
}

namespace {

std::mutex scratch_registry_mutex;
std::set<fs::path> scratch_registry;

} // namespace

Scratch::Scratch()
{
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/treeflash-test-XXXXXX";
    if (!::mkdtemp(templ.data()))
        throw std::runtime_error("mkdtemp failed");
    // Readable by others: nginx workers serve repositories from here.
    ::chmod(templ.c_str(), 0755);
    m_path = templ;
    std::lock_guard lock(scratch_registry_mutex);
    scratch_registry.insert(fs::weakly_canonical(m_path));
}

std::vector<fs::path> scratch_paths_made()
{
    std::lock_guard lock(scratch_registry_mutex);
    return {scratch_registry.begin(), scratch_registry.end()};
}

Scratch::~Scratch()
{
    std::error_code ec;
    fs::remove_all(m_path, ec);
}

void write_file(const fs::path& path, const std::string& content, mode_t mode)
{
    fs::create_directories(path.parent_path());
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << content;
    out.close();
    if (!out || ::chmod(path.c_str(), mode) != 0)
        throw std::runtime_error("cannot write " + path.string());
}

std::string read_text(const fs::path& path)
{
    std::ifstream in(path, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

std::map<std::string, std::string> fw_printenv(const fs::path& file, uint64_t offset, uint64_t size,
                                               const fs::path& config)
{
    // fw_env.config wants its numbers in hex.
    std::ostringstream line;
    line << file.string() << std::hex << " 0x" << offset << " 0x" << size << "\n";
    write_file(config, line.str());
    auto r = run_process({"fw_printenv", "-c", config.string()});
    if (!r.ok())
        throw std::runtime_error("fw_printenv cannot read " + file.string() + ": " + r.err);
    std::map<std::string, std::string> values;
    std::istringstream in(r.out);
    for (std::string text; std::getline(in, text);)
        if (auto eq = text.find('='); eq != std::string::npos)
            values[text.substr(0, eq)] = text.substr(eq + 1);
    return values;
}

std::string sha256_hex(const std::string& data)
{
    gchar* hex = g_compute_checksum_for_data(G_CHECKSUM_SHA256, reinterpret_cast<const guchar*>(data.data()), data.size());
    std::string out = hex;
    g_free(hex);
    return out;
}

std::string sha256sum_files(const std::vector<fs::path>& files)
{
    std::vector<std::string> argv{"sh", "-c", "cat \"$@\" | sha256sum", "sh"};
    for (const auto& f : files)
        argv.push_back(f.string());
    ProcessResult r = run_process(argv);
    if (!r.ok() || r.out.size() < 64)
        throw std::runtime_error("sha256sum: " + r.err);
    return r.out.substr(0, 64);
}

bool has_partial(const fs::path& dir)
{
    for (const auto& entry : fs::directory_iterator(dir))
        if (entry.path().filename().string().find(".partial-") != std::string::npos)
            return true;
    return false;
}

void make_rootfs(const fs::path& dir)
{
    fs::create_directories(dir / "usr/bin");
    fs::create_directories(dir / "usr/sbin");
    fs::create_directories(dir / "usr/lib");
    write_file(dir / "usr/bin/busybox", "#!fake busybox\n" + std::string(4096, 'b'), 04755);
    fs::create_symlink("busybox", dir / "usr/bin/sh");
    fs::create_symlink("../bin/busybox", dir / "usr/sbin/init");
    fs::create_symlink("usr/bin", dir / "bin");
    fs::create_symlink("usr/sbin", dir / "sbin");
    fs::create_symlink("usr/lib", dir / "lib");
    write_file(dir / "etc/inittab", "::sysinit:/etc/init.d/rcS\n");
    write_file(dir / "etc/init.d/rcS", "#!/bin/sh\necho booted\n", 0755);
    write_file(dir / "etc/hostname", "tcu\n");
    fs::create_hard_link(dir / "usr/bin/busybox", dir / "usr/bin/busybox-hardlink");
    fs::create_symlink("/usr/share/zoneinfo/UTC", dir / "etc/localtime"); // absolute, points inside the target
    for (const char* d : {"dev", "proc", "sys", "tmp"})
        fs::create_directories(dir / d);
}

FakeKernel make_kernel_files(const fs::path& dir, const std::string& flavour)
{
    FakeKernel k;
    k.kernel_bytes = "ARM64 Image " + flavour + std::string(10000, 'k');
    k.initramfs_bytes = "initramfs " + flavour + std::string(5000, 'i');
    k.devicetree_bytes = "dtb " + flavour + std::string(2000, 'd');
    k.kernel = dir / ("Image-" + flavour);
    k.initramfs = dir / ("initramfs-" + flavour + ".img");
    k.devicetree = dir / ("board-" + flavour + ".dtb");
    write_file(k.kernel, k.kernel_bytes);
    write_file(k.initramfs, k.initramfs_bytes);
    write_file(k.devicetree, k.devicetree_bytes);
    return k;
}

std::map<std::string, std::string> snapshot(const fs::path& dir)
{
    std::map<std::string, std::string> out;
    for (auto it = fs::recursive_directory_iterator(dir, fs::directory_options::none); it != fs::recursive_directory_iterator(); ++it) {
        struct stat st {};
        ::lstat(it->path().c_str(), &st);
        std::ostringstream line;
        line << std::oct << st.st_mode << std::dec << " " << st.st_uid << ":" << st.st_gid << " " << st.st_size << " "
             << st.st_nlink;
        if (S_ISREG(st.st_mode))
            line << " " << sha256_hex(read_text(it->path()));
        if (S_ISLNK(st.st_mode))
            line << " -> " << fs::read_symlink(it->path()).string();
        out[it->path().lexically_relative(dir).string()] = line.str();
    }
    return out;
}

std::string host_etc_state()
{
    std::string state;
    for (const auto& entry : fs::directory_iterator("/etc"))
        state += entry.path().filename().string() + "\n";
    struct stat st {};
    ::stat("/etc", &st);
    return state + std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec);
}

void write_tarball(const fs::path& path, const std::vector<TarEntry>& entries)
{
    struct archive* a = archive_write_new();
    bool any_xattrs = false;
    for (const auto& e : entries)
        any_xattrs |= !e.xattrs.empty();
    // Restricted pax leaves extended attributes out.
    if (any_xattrs)
        archive_write_set_format_pax(a);
    else
        archive_write_set_format_pax_restricted(a);
    std::string name = path.string();
    auto ends_with = [&](const std::string& suffix) {
        return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    if (ends_with(".gz"))
        archive_write_add_filter_gzip(a);
    else if (ends_with(".xz"))
        archive_write_add_filter_xz(a);
    else if (ends_with(".zst"))
        archive_write_add_filter_zstd(a);
    if (archive_write_open_filename(a, name.c_str()) != ARCHIVE_OK)
        throw std::runtime_error("cannot write " + name);
    for (const auto& e : entries) {
        struct archive_entry* entry = archive_entry_new();
        archive_entry_set_pathname(entry, e.path.c_str());
        archive_entry_set_uid(entry, e.uid);
        archive_entry_set_gid(entry, e.gid);
        archive_entry_set_perm(entry, e.mode);
        for (const auto& [xname, value] : e.xattrs)
            archive_entry_xattr_add_entry(entry, xname.c_str(), value.data(), value.size());
        switch (e.type) {
        case 'f':
            archive_entry_set_filetype(entry, AE_IFREG);
            archive_entry_set_size(entry, static_cast<la_int64_t>(e.content_or_target.size()));
            break;
        case 'd': archive_entry_set_filetype(entry, AE_IFDIR); break;
        case 'l':
            archive_entry_set_filetype(entry, AE_IFLNK);
            archive_entry_set_symlink(entry, e.content_or_target.c_str());
            break;
        case 'h':
            archive_entry_set_filetype(entry, AE_IFREG);
            archive_entry_set_hardlink(entry, e.content_or_target.c_str());
            break;
        case 'c':
            archive_entry_set_filetype(entry, AE_IFCHR);
            archive_entry_set_rdevmajor(entry, 1);
            archive_entry_set_rdevminor(entry, 3);
            break;
        case 'p': archive_entry_set_filetype(entry, AE_IFIFO); break;
        }
        archive_write_header(a, entry);
        if (e.type == 'f')
            archive_write_data(a, e.content_or_target.data(), e.content_or_target.size());
        archive_entry_free(entry);
    }
    archive_write_close(a);
    archive_write_free(a);
}

ProcessResult run_treeflash(const std::vector<std::string>& args, const std::vector<std::string>& env)
{
    std::vector<std::string> argv{TREEFLASH_BINARY};
    argv.insert(argv.end(), args.begin(), args.end());
    ProcessOptions options;
    options.extra_environment = env;
    return run_process(argv, options);
}

pid_t spawn_treeflash(const std::vector<std::string>& args, const std::string& stderr_file)
{
    std::vector<std::string> argv{TREEFLASH_BINARY};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> raw;
    for (auto& a : argv)
        raw.push_back(a.data());
    raw.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, stderr_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid = 0;
    int rc = posix_spawn(&pid, raw[0], &actions, nullptr, raw.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0)
        throw std::runtime_error("cannot start treeflash");
    return pid;
}

bool wait_until(const std::function<bool()>& done, int seconds)
{
    for (int i = 0; i < seconds * 20; ++i) {
        if (done())
            return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return done();
}

int wait_exit(pid_t pid, int* signal)
{
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (signal)
        *signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

ProcessResult ostree(const fs::path& repo, const std::vector<std::string>& args)
{
    std::vector<std::string> argv{"ostree"};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back("--repo=" + repo.string());
    return run_process(argv);
}

std::string rev_parse(const fs::path& repo, const std::string& ref)
{
    auto result = ostree(repo, {"rev-parse", ref});
    std::string out = result.out;
    while (!out.empty() && out.back() == '\n')
        out.pop_back();
    return result.ok() ? out : "";
}

bool fsck_clean(const fs::path& repo)
{
    return ostree(repo, {"fsck"}).ok();
}

std::map<std::string, std::string> list_commit(const fs::path& repo, const std::string& ref)
{
    std::map<std::string, std::string> out;
    auto result = ostree(repo, {"ls", "-R", "-C", ref});
    std::istringstream in(result.out);
    std::string line;
    while (std::getline(in, line)) {
        // "-00644 0 0     10 <csum> /usr/etc/group" or "l00777 0 0 0 <csum> /bin -> usr/bin"
        auto slash = line.find(" /");
        if (slash == std::string::npos)
            continue;
        std::string path = line.substr(slash + 1);
        auto arrow = path.find(" -> ");
        if (arrow != std::string::npos)
            path = path.substr(0, arrow);
        out[path] = line;
    }
    return out;
}

std::string error_of(const std::function<void()>& fn)
{
    try {
        fn();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

fs::path edited_board(const Scratch& tmp, const std::string& board, const std::string& name,
                      const std::function<std::string(std::string)>& edit)
{
    fs::path dir = tmp / name;
    fs::copy(fs::path(TREEFLASH_SOURCE_DIR) / "board" / board, dir, fs::copy_options::recursive);
    write_file(dir / "board.conf", edit(read_text(dir / "board.conf")));
    return dir;
}

ToolsForOtherUsers tools_for_other_users(const fs::path& dir)
{
    auto open_up = [](const fs::path& path) {
        fs::permissions(path, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec | fs::perms::others_read
                                  | fs::perms::others_exec);
    };
    ToolsForOtherUsers tools;
    fs::create_directories(dir / "tools");
    open_up(dir); // a scratch folder; its parent ($TMPDIR) is everyone's
    open_up(dir / "tools");
    tools.treeflash = dir / "tools/treeflash";
    fs::copy_file(TREEFLASH_BINARY, tools.treeflash, fs::copy_options::overwrite_existing);
    open_up(tools.treeflash);
    tools.boards = dir / "tools/board";
    fs::copy(fs::path(TREEFLASH_SOURCE_DIR) / "board", tools.boards, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    for (const auto& entry : fs::recursive_directory_iterator(tools.boards))
        fs::permissions(entry.path(), fs::perms::others_read | fs::perms::group_read, fs::perm_options::add);
    for (const auto& entry : fs::recursive_directory_iterator(tools.boards))
        if (entry.is_directory())
            open_up(entry.path());
    open_up(tools.boards);
    return tools;
}

bool user_namespaces_work()
{
    static const bool works = run_process({"unshare", "--user", "--map-root-user", "true"}).ok();
    return works;
}

} // namespace treeflash::test
