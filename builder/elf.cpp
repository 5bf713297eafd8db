#include "builder/elf.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"

#include <cerrno>
#include <cstring>
#include <elf.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace treeflash::builder {

namespace {

template <typename T>
T read_at(const std::string& bytes, uint64_t offset, const std::string& what)
{
    if (offset > bytes.size() || bytes.size() - offset < sizeof(T))
        throw Error(what + ": truncated ELF file");
    T value;
    std::memcpy(&value, bytes.data() + offset, sizeof(T));
    return value;
}

Elf64_Ehdr header(const std::string& bytes, const std::string& what)
{
    if (bytes.size() < sizeof(Elf64_Ehdr) || std::memcmp(bytes.data(), ELFMAG, SELFMAG) != 0)
        throw Error(what + ": not an ELF file");
    auto ehdr = read_at<Elf64_Ehdr>(bytes, 0, what);
    if (ehdr.e_ident[EI_CLASS] != ELFCLASS64 || ehdr.e_ident[EI_DATA] != ELFDATA2LSB)
        throw Error(what + ": only 64-bit little-endian ELF is supported");
    return ehdr;
}

std::string c_string_at(const std::string& bytes, uint64_t offset, const std::string& what)
{
    if (offset >= bytes.size())
        throw Error(what + ": string outside the file");
    size_t end = bytes.find('\0', offset);
    if (end == std::string::npos)
        throw Error(what + ": unterminated string");
    return bytes.substr(offset, end - offset);
}

} // namespace

ElfDependencies elf_dependencies(const std::string& bytes, const std::string& what)
{
    Elf64_Ehdr ehdr = header(bytes, what);
    std::vector<Elf64_Phdr> phdrs;
    for (unsigned i = 0; i < ehdr.e_phnum; ++i)
        phdrs.push_back(read_at<Elf64_Phdr>(bytes, ehdr.e_phoff + uint64_t(i) * ehdr.e_phentsize, what));

    // Virtual address -> file offset through the PT_LOAD segments.
    auto file_offset = [&](uint64_t vaddr) -> uint64_t {
        for (const auto& ph : phdrs)
            if (ph.p_type == PT_LOAD && vaddr >= ph.p_vaddr && vaddr < ph.p_vaddr + ph.p_filesz)
                return vaddr - ph.p_vaddr + ph.p_offset;
        throw Error(what + ": address outside the loaded segments");
    };

    ElfDependencies deps;
    for (const auto& ph : phdrs) {
        if (ph.p_type == PT_INTERP)
            deps.interpreter = c_string_at(bytes, ph.p_offset, what);
        if (ph.p_type != PT_DYNAMIC)
            continue;
        std::vector<uint64_t> needed_offsets;
        uint64_t strtab = 0;
        for (uint64_t off = ph.p_offset; off + sizeof(Elf64_Dyn) <= ph.p_offset + ph.p_filesz; off += sizeof(Elf64_Dyn)) {
            auto dyn = read_at<Elf64_Dyn>(bytes, off, what);
            if (dyn.d_tag == DT_NULL)
                break;
            if (dyn.d_tag == DT_NEEDED)
                needed_offsets.push_back(dyn.d_un.d_val);
            if (dyn.d_tag == DT_STRTAB)
                strtab = dyn.d_un.d_ptr;
        }
        if (!needed_offsets.empty() && !strtab)
            throw Error(what + ": DT_NEEDED without DT_STRTAB");
        for (uint64_t name : needed_offsets)
            deps.needed.push_back(c_string_at(bytes, file_offset(strtab) + name, what));
    }
    return deps;
}

std::vector<std::string> elf_modinfo(const std::string& bytes, const std::string& what)
{
    Elf64_Ehdr ehdr = header(bytes, what);
    if (ehdr.e_shoff == 0 || ehdr.e_shstrndx == SHN_UNDEF)
        throw Error(what + ": no section headers");
    auto section = [&](unsigned i) {
        return read_at<Elf64_Shdr>(bytes, ehdr.e_shoff + uint64_t(i) * ehdr.e_shentsize, what);
    };
    Elf64_Shdr names = section(ehdr.e_shstrndx);
    for (unsigned i = 0; i < ehdr.e_shnum; ++i) {
        Elf64_Shdr sh = section(i);
        if (c_string_at(bytes, names.sh_offset + sh.sh_name, what) != ".modinfo")
            continue;
        if (sh.sh_offset + sh.sh_size > bytes.size())
            throw Error(what + ": truncated .modinfo");
        std::vector<std::string> entries;
        std::string data = bytes.substr(sh.sh_offset, sh.sh_size);
        for (size_t pos = 0; pos < data.size();) {
            size_t end = data.find('\0', pos);
            if (end == std::string::npos)
                end = data.size();
            if (end > pos)
                entries.push_back(data.substr(pos, end - pos));
            pos = end + 1;
        }
        return entries;
    }
    throw Error(what + ": no .modinfo section (not a kernel module?)");
}

bool read_in_root(int root, const std::string& path, std::string& bytes)
{
    struct open_how how {};
    how.flags = O_RDONLY | O_CLOEXEC;
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
    UniqueFd fd(static_cast<int>(::syscall(SYS_openat2, root, path.c_str(), &how, sizeof how)));
    if (!fd) {
        if (errno == ENOENT || errno == ENOTDIR)
            return false;
        throw_errno("open " + path);
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0)
        throw_errno("stat " + path);
    if (!S_ISREG(st.st_mode))
        throw Error(path + " is not a regular file");
    bytes = fs::read_all(fd.get(), path);
    return true;
}

RuntimeResolver::RuntimeResolver(const std::filesystem::path& userland) : m_userland(userland)
{
    m_root.reset(::open(userland.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!m_root)
        throw_errno("open " + userland.string());
    std::error_code ec;
    for (const char* base : {"lib", "usr/lib"})
        for (const auto& entry : std::filesystem::directory_iterator(userland / base, ec))
            if (entry.is_directory() && entry.path().filename().string().find("-linux-") != std::string::npos)
                m_search.push_back(std::string(base) + "/" + entry.path().filename().string());
    for (const char* dir : {"lib", "usr/lib", "lib64", "usr/lib64"})
        m_search.emplace_back(dir);
}

std::vector<RuntimeFile> RuntimeResolver::resolve(const std::string& program, const Provided& provided)
{
    std::vector<RuntimeFile> out;
    RuntimeFile file;
    file.role = RuntimeFile::Role::Program;
    file.name = program;
    file.found = program;
    if (!read_in_root(m_root.get(), program, file.bytes))
        throw Error(program + " is not in " + m_userland.string());
    std::string bytes = file.bytes;
    out.push_back(std::move(file));
    add_dependencies(bytes, program, provided, out);
    return out;
}

void RuntimeResolver::add_dependencies(const std::string& bytes, const std::string& what, const Provided& provided,
                                       std::vector<RuntimeFile>& out)
{
    ElfDependencies deps = elf_dependencies(bytes, what);
    if (!deps.interpreter.empty() && !m_done.count(deps.interpreter)) {
        // The loader may be named as a library too (libc names it).
        m_done.insert(deps.interpreter);
        m_done.insert(deps.interpreter.substr(deps.interpreter.rfind('/') + 1));
        RuntimeFile loader;
        loader.role = RuntimeFile::Role::Loader;
        loader.name = deps.interpreter;
        if (!provided || !provided(loader)) {
            loader.found = deps.interpreter.substr(1);
            if (!read_in_root(m_root.get(), loader.found, loader.bytes))
                throw Error(what + ": its loader " + deps.interpreter + " is not in " + m_userland.string());
            out.push_back(std::move(loader));
        }
    }
    for (const auto& soname : deps.needed) {
        if (m_done.count(soname))
            continue;
        m_done.insert(soname);
        RuntimeFile library;
        library.role = RuntimeFile::Role::Library;
        library.name = soname;
        if (provided && provided(library))
            continue;
        for (const auto& dir : m_search)
            if (read_in_root(m_root.get(), dir + "/" + soname, library.bytes)) {
                library.found = dir + "/" + soname;
                break;
            }
        if (library.found.empty())
            throw Error(what + " needs " + soname + ", which is not in " + m_userland.string());
        std::string lib_bytes = library.bytes;
        std::string found = library.found;
        out.push_back(std::move(library));
        add_dependencies(lib_bytes, found, provided, out);
    }
}

} // namespace treeflash::builder
