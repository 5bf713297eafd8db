#include "builder/initramfs.hpp"

#include "builder/elf.hpp"
#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/text.hpp"
#include "common/fd.hpp"
#include "common/templates.hpp"

#include <archive.h>
#include <archive_entry.h>
#include <cerrno>
#include <fcntl.h>
#include <fstream>
#include <map>
#include <set>
#include <sys/stat.h>
#include <unistd.h>

namespace treeflash::builder {

namespace {

const char* const busybox_applets[] = {"sh",   "mount", "umount", "mkdir",  "cat",         "sleep",
                                       "insmod", "findfs", "switch_root", "poweroff", "reboot", "echo",
                                       "touch", "grep", "ls", "test", "["};

std::string read_host_file(const std::filesystem::path& path)
{
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd)
        throw_errno("open " + path.string());
    return fs::read_all(fd.get(), path.string());
}

std::string normalize_module_name(std::string name)
{
    for (auto& c : name)
        if (c == '-')
            c = '_';
    return name;
}

// Files and directories of the archive, written in path order with fixed
// timestamps so equal inputs give an equal initramfs (and bootcsum).
class CpioTree {
public:
    void dir(const std::string& path) { m_entries[path] = {AE_IFDIR, 0755, ""}; }
    void file(const std::string& path, std::string data, mode_t mode) { m_entries[path] = {AE_IFREG, mode, std::move(data)}; }
    void symlink(const std::string& path, const std::string& target) { m_entries[path] = {AE_IFLNK, 0777, target}; }
    void char_device(const std::string& path, unsigned major, unsigned minor)
    {
        m_entries[path] = {AE_IFCHR, 0600, ""};
        m_devices[path] = {major, minor};
    }
    bool has(const std::string& path) const { return m_entries.count(path) != 0; }

    uint64_t write(const std::filesystem::path& output) const;

private:
    struct Entry {
        mode_t type;
        mode_t mode;
        std::string data; // file bytes or symlink target
    };
    std::map<std::string, Entry> m_entries;
    std::map<std::string, std::pair<unsigned, unsigned>> m_devices;
};

struct ArchiveWriteFree {
    void operator()(struct archive* a) const { archive_write_free(a); }
};
struct ArchiveEntryFree {
    void operator()(struct archive_entry* e) const { archive_entry_free(e); }
};

uint64_t CpioTree::write(const std::filesystem::path& output) const
{
    std::filesystem::path tmp = output;
    tmp += ".tmp";
    std::unique_ptr<struct archive, ArchiveWriteFree> a(archive_write_new());
    archive_write_set_format_cpio_newc(a.get());
    archive_write_add_filter_gzip(a.get());
    archive_write_set_filter_option(a.get(), "gzip", "timestamp", nullptr); // no mtime in the gzip header
    if (archive_write_open_filename(a.get(), tmp.c_str()) != ARCHIVE_OK)
        throw Error("write " + tmp.string() + ": " + archive_error_string(a.get()));
    try {
        for (const auto& [path, e] : m_entries) {
            std::unique_ptr<struct archive_entry, ArchiveEntryFree> entry(archive_entry_new());
            archive_entry_set_pathname(entry.get(), path.c_str());
            archive_entry_set_filetype(entry.get(), e.type);
            archive_entry_set_perm(entry.get(), e.mode);
            archive_entry_set_uid(entry.get(), 0);
            archive_entry_set_gid(entry.get(), 0);
            archive_entry_set_mtime(entry.get(), 0, 0);
            archive_entry_set_nlink(entry.get(), e.type == AE_IFDIR ? 2 : 1);
            archive_entry_set_size(entry.get(), e.type == AE_IFREG ? static_cast<la_int64_t>(e.data.size()) : 0);
            if (e.type == AE_IFLNK)
                archive_entry_set_symlink(entry.get(), e.data.c_str());
            if (e.type == AE_IFCHR) {
                archive_entry_set_rdevmajor(entry.get(), m_devices.at(path).first);
                archive_entry_set_rdevminor(entry.get(), m_devices.at(path).second);
            }
            if (archive_write_header(a.get(), entry.get()) != ARCHIVE_OK)
                throw Error("write " + path + ": " + archive_error_string(a.get()));
            if (e.type == AE_IFREG && !e.data.empty()
                && archive_write_data(a.get(), e.data.data(), e.data.size()) != static_cast<la_ssize_t>(e.data.size()))
                throw Error("write " + path + ": " + archive_error_string(a.get()));
        }
        if (archive_write_close(a.get()) != ARCHIVE_OK)
            throw Error("write " + tmp.string() + ": " + archive_error_string(a.get()));
    } catch (...) {
        ::unlink(tmp.c_str());
        throw;
    }
    if (::rename(tmp.c_str(), output.c_str()) != 0) {
        int err = errno;
        ::unlink(tmp.c_str());
        throw_errno("rename to " + output.string(), err);
    }
    return std::filesystem::file_size(output);
}

void add_parent_dirs(CpioTree& tree, const std::string& path)
{
    for (size_t pos = path.find('/'); pos != std::string::npos; pos = path.find('/', pos + 1))
        tree.dir(path.substr(0, pos));
}

// Module name -> file, and the built-in ones, for one kernel's modules tree.
class ModuleIndex {
public:
    explicit ModuleIndex(const std::filesystem::path& dir)
    {
        std::error_code ec;
        if (!std::filesystem::is_directory(dir / "kernel", ec))
            throw Error(dir.string() + " is not a kernel modules directory (no kernel/)");
        for (auto it = std::filesystem::recursive_directory_iterator(dir / "kernel", ec);
             it != std::filesystem::recursive_directory_iterator(); ++it) {
            std::string name = it->path().filename().string();
            if (name.size() > 3 && name.compare(name.size() - 3, 3, ".ko") == 0)
                m_files[normalize_module_name(name.substr(0, name.size() - 3))] = it->path();
        }
        std::ifstream builtin(dir / "modules.builtin");
        for (std::string line; std::getline(builtin, line);) {
            std::string name = line.substr(line.rfind('/') + 1);
            if (name.size() > 3)
                m_builtin.insert(normalize_module_name(name.substr(0, name.size() - 3)));
        }
    }

    // Adds `name` after its dependencies (depth first), skipping built-ins.
    void resolve(const std::string& requested, std::vector<std::string>& order, std::set<std::string>& seen,
                 std::map<std::string, std::string>& bytes, int depth = 0)
    {
        std::string name = normalize_module_name(requested);
        if (seen.count(name) || m_builtin.count(name))
            return;
        if (depth > 64)
            throw Error("module dependencies loop at " + name);
        auto it = m_files.find(name);
        if (it == m_files.end())
            throw Error("kernel module " + requested + " is neither a .ko file nor built into the kernel");
        seen.insert(name);
        std::string data = read_host_file(it->second);
        for (const auto& entry : elf_modinfo(data, it->second.string())) {
            if (entry.rfind("depends=", 0) != 0)
                continue;
            std::string list = entry.substr(8);
            for (size_t pos = 0; pos < list.size();) {
                size_t end = list.find(',', pos);
                if (end == std::string::npos)
                    end = list.size();
                if (end > pos)
                    resolve(list.substr(pos, end - pos), order, seen, bytes, depth + 1);
                pos = end + 1;
            }
        }
        order.push_back(name);
        bytes[name] = std::move(data);
    }

private:
    std::map<std::string, std::filesystem::path> m_files;
    std::set<std::string> m_builtin;
};

} // namespace

InitramfsResult build_initramfs(const InitramfsOptions& options)
{
    if (options.on_failure != "shell" && options.on_failure != "poweroff" && options.on_failure != "reboot")
        throw Error("on_failure '" + options.on_failure + "': shell, poweroff or reboot");
    InitramfsResult result;
    CpioTree tree;
    for (const char* dir : {"bin", "sbin", "dev", "proc", "sys", "run", "sysroot", "tmp", "etc", "lib", "usr"})
        tree.dir(dir);
    tree.char_device("dev/console", 5, 1);

    in_step("busybox", [&] {
        std::string busybox = read_host_file(options.busybox);
        ElfDependencies deps = elf_dependencies(busybox, options.busybox.string());
        if (!deps.interpreter.empty())
            throw Error(options.busybox.string() + " is dynamically linked; the initramfs needs a static busybox");
        tree.file("bin/busybox", busybox, 0755);
        for (const char* applet : busybox_applets)
            tree.symlink(std::string("bin/") + applet, "busybox");
        result.files.push_back("bin/busybox");
    });

    in_step("ostree-prepare-root", [&] {
        // The program at its place, the loader where PT_INTERP names it,
        // every library in lib/, which the loader searches by default.
        RuntimeResolver resolver(options.userland);
        for (RuntimeFile& file : resolver.resolve(options.prepare_root)) {
            std::string target = file.role == RuntimeFile::Role::Program ? "usr/lib/ostree/ostree-prepare-root"
                                 : file.role == RuntimeFile::Role::Loader ? file.name.substr(1)
                                                                           : "lib/" + file.name;
            add_parent_dirs(tree, target);
            tree.file(target, std::move(file.bytes), 0755);
            result.files.push_back(target);
        }
    });

    std::string module_list;
    if (!options.modules.empty()) {
        in_step("modules", [&] {
            ModuleIndex index(options.modules_dir);
            std::set<std::string> seen;
            std::map<std::string, std::string> bytes;
            for (const auto& name : options.modules)
                index.resolve(name, result.modules, seen, bytes);
            tree.dir("lib/modules");
            for (const auto& name : result.modules) {
                tree.file("lib/modules/" + name + ".ko", std::move(bytes[name]), 0644);
                module_list += name + "\n";
            }
        });
    }
    tree.file("etc/modules", module_list, 0644);

    std::string init(templates::get("initramfs/init"));
    text::replace_all(init, "@BOARD@", options.board.empty() ? "(any)" : options.board);
    text::replace_all(init, "@ON_FAILURE@", options.on_failure);
    text::replace_all(init, "@ROOT_WAIT@", std::to_string(options.root_wait));
    tree.file("init", init, 0755);

    result.bytes = in_step("write " + options.output.string(), [&] { return tree.write(options.output); });
    return result;
}

} // namespace treeflash::builder
