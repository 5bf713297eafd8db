#include "flasher/write/publish.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "flasher/write/bmap.hpp"

#include <archive.h>
#include <archive_entry.h>
#include <cerrno>
#include <fcntl.h>
#include <sys/file.h>
#include <gio/gio.h>
#include <map>
#include <memory>
#include <sstream>
#include <stdio.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

namespace treeflash::flasher {

namespace {

struct ArchiveWriteFree {
    void operator()(struct archive* a) const { archive_write_free(a); }
};
struct EntryFree {
    void operator()(struct archive_entry* e) const { archive_entry_free(e); }
};

std::string archive_error(struct archive* a)
{
    const char* text = archive_error_string(a);
    return text ? text : "unknown libarchive error";
}

} // namespace

void check_compression_name(const std::string& name)
{
    for (const char* known : compressions)
        if (name == known)
            return;
    throw Error("--compress '" + name + "': choose zst, xz or gz");
}

std::filesystem::path compress_image(const std::filesystem::path& image, const std::string& compression, bool overwrite,
                                     GCancellable* cancellable)
{
    check_compression_name(compression);
    std::filesystem::path output = image;
    output += "." + compression;
    std::error_code ec;
    if (std::filesystem::exists(std::filesystem::symlink_status(output, ec)) && !overwrite)
        throw Error(output.string() + " exists; pass --overwrite to replace it");

    UniqueFd input(::open(image.c_str(), O_RDONLY | O_CLOEXEC));
    if (!input)
        throw_errno("open " + image.string());
    struct stat st {};
    if (::fstat(input.get(), &st) != 0)
        throw_errno("stat " + image.string());

    std::filesystem::path dir = output.parent_path().empty() ? "." : output.parent_path();
    std::string temp = (dir / ("." + output.filename().string() + ".partial-XXXXXX")).string();
    UniqueFd out(::mkostemp(temp.data(), O_CLOEXEC));
    if (!out)
        throw_errno("create a file in " + dir.string());
    struct Unlink {
        std::string path;
        bool keep = false;
        ~Unlink()
        {
            if (!keep)
                ::unlink(path.c_str());
        }
    } cleanup{temp};
    ::fchmod(out.get(), 0644);
    // Held while this process lives: a later flash knows the file is not
    // stale (Target::create_image removes what a killed one left).
    ::flock(out.get(), LOCK_EX | LOCK_NB);

    std::unique_ptr<struct archive, ArchiveWriteFree> writer(archive_write_new());
    std::string threads = std::to_string(std::max(1u, std::thread::hardware_concurrency()));
    int rc = compression == "zst" ? archive_write_add_filter_zstd(writer.get())
             : compression == "xz" ? archive_write_add_filter_xz(writer.get())
                                   : archive_write_add_filter_gzip(writer.get());
    if (rc != ARCHIVE_OK)
        throw Error(std::string("libarchive cannot write ") + compression + ": " + archive_error(writer.get()));
    if (compression == "zst")
        archive_write_set_filter_option(writer.get(), "zstd", "threads", threads.c_str());
    if (compression == "xz")
        archive_write_set_filter_option(writer.get(), "xz", "threads", threads.c_str());
    archive_write_set_format_raw(writer.get());
    archive_write_set_bytes_in_last_block(writer.get(), 1);
    if (archive_write_open_fd(writer.get(), out.get()) != ARCHIVE_OK)
        throw Error("compress into " + temp + ": " + archive_error(writer.get()));
    std::unique_ptr<struct archive_entry, EntryFree> entry(archive_entry_new());
    archive_entry_set_pathname(entry.get(), image.filename().c_str());
    archive_entry_set_filetype(entry.get(), AE_IFREG);
    archive_entry_set_size(entry.get(), st.st_size);
    if (archive_write_header(writer.get(), entry.get()) != ARCHIVE_OK)
        throw Error("compress " + image.string() + ": " + archive_error(writer.get()));

    std::string buffer(4 << 20, '\0');
    for (;;) {
        if (g_cancellable_is_cancelled(cancellable))
            throw Cancelled();
        ssize_t n = ::read(input.get(), buffer.data(), buffer.size());
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            throw_errno("read " + image.string());
        if (n == 0)
            break;
        if (archive_write_data(writer.get(), buffer.data(), static_cast<size_t>(n)) != n)
            throw Error("compress into " + temp + ": " + archive_error(writer.get()));
    }
    if (archive_write_close(writer.get()) != ARCHIVE_OK)
        throw Error("compress into " + temp + ": " + archive_error(writer.get()));
    if (::fsync(out.get()) != 0)
        throw_errno("sync " + temp);
    unsigned flags = overwrite ? 0 : RENAME_NOREPLACE;
    if (::renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, output.c_str(), flags) != 0) {
        if (errno == EEXIST)
            throw Error(output.string() + " appeared meanwhile; it was left alone (pass --overwrite to replace it)");
        throw_errno("move " + temp + " to " + output.string());
    }
    cleanup.keep = true;
    return output;
}

std::filesystem::path update_sha256sums(const std::vector<std::filesystem::path>& files, GCancellable* cancellable)
{
    if (files.empty())
        throw Error("no files to list in SHA256SUMS");
    std::filesystem::path dir = files.front().parent_path();
    std::filesystem::path sums = (dir.empty() ? std::filesystem::path(".") : dir) / "SHA256SUMS";
    std::map<std::string, std::string> lines; // name -> line, sorted by name
    std::error_code ec;
    if (std::filesystem::is_regular_file(sums, ec)) {
        std::istringstream in(fs::read_file(sums));
        for (std::string line; std::getline(in, line);)
            if (line.size() > 66)
                lines[line.substr(66)] = line;
    }
    for (const auto& file : files) {
        UniqueFd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
        if (!fd)
            throw_errno("open " + file.string());
        struct stat st {};
        if (::fstat(fd.get(), &st) != 0)
            throw_errno("stat " + file.string());
        std::string name = file.filename().string();
        if (name.find('\n') != std::string::npos || name.find('\\') != std::string::npos)
            throw Error(file.string() + ": a name sha256sum would escape; rename it");
        lines[name] = sha256_of_range(fd.get(), 0, static_cast<uint64_t>(st.st_size), file.string(), cancellable) + "  " + name;
    }
    std::string text;
    for (const auto& [name, line] : lines)
        text += line + "\n";
    fs::write_file_atomic(sums, text);
    return sums;
}

} // namespace treeflash::flasher
