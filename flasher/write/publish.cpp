#include "flasher/write/publish.hpp"

#include "common/error.hpp"
#include "common/fd.hpp"
#include "common/fs.hpp"
#include "common/named_file.hpp"
#include "flasher/write/bmap.hpp"

#include <archive.h>
#include <archive_entry.h>
#include <cerrno>
#include <fcntl.h>
#include <sys/file.h>
#include <gio/gio.h>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <stdio.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <zstd.h>

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

struct ZstdFree {
    void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};

// Reads `input` to its end in 4 MiB chunks, handing each to `consume`.
void for_each_chunk(int input, const std::string& what, GCancellable* cancellable,
                    const std::function<void(const char*, size_t)>& consume)
{
    std::string buffer(4 << 20, '\0');
    for (;;) {
        if (g_cancellable_is_cancelled(cancellable))
            throw Cancelled();
        ssize_t n = ::read(input, buffer.data(), buffer.size());
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            throw_errno("read " + what);
        if (n == 0)
            return;
        consume(buffer.data(), static_cast<size_t>(n));
    }
}

// zstd straight from libzstd, on every core: libarchive's writer leaves out
// the content checksum, and without it a corrupted .zst decompresses to
// wrong bytes that nothing notices.
void compress_zstd(int input, uint64_t size, int output, const std::string& what, const std::string& temp,
                   GCancellable* cancellable)
{
    std::unique_ptr<ZSTD_CCtx, ZstdFree> cctx(ZSTD_createCCtx());
    if (!cctx)
        throw Error("zstd: out of memory");
    auto check = [&](size_t rc) {
        if (ZSTD_isError(rc))
            throw Error("compress " + what + " with zstd: " + ZSTD_getErrorName(rc));
        return rc;
    };
    check(ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_compressionLevel, 3));
    check(ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_checksumFlag, 1));
    // Without multithreading built in, zstd refuses workers: one thread then.
    ZSTD_CCtx_setParameter(cctx.get(), ZSTD_c_nbWorkers, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    check(ZSTD_CCtx_setPledgedSrcSize(cctx.get(), size));
    std::string out(ZSTD_CStreamOutSize(), '\0');
    auto drain = [&](ZSTD_inBuffer& in, ZSTD_EndDirective mode) {
        for (;;) {
            ZSTD_outBuffer buf{out.data(), out.size(), 0};
            size_t left = check(ZSTD_compressStream2(cctx.get(), &buf, &in, mode));
            if (buf.pos && ::write(output, out.data(), buf.pos) != static_cast<ssize_t>(buf.pos))
                throw_errno("write " + temp);
            bool done = mode == ZSTD_e_end ? left == 0 : in.pos == in.size;
            if (done)
                return;
        }
    };
    for_each_chunk(input, what, cancellable, [&](const char* data, size_t n) {
        ZSTD_inBuffer in{data, n, 0};
        drain(in, ZSTD_e_continue);
    });
    ZSTD_inBuffer end{nullptr, 0, 0};
    drain(end, ZSTD_e_end);
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
    named::check_output(output, "the compressed image");
    std::error_code ec;
    if (std::filesystem::exists(std::filesystem::symlink_status(output, ec)) && !overwrite)
        throw Error(output.string() + " exists; pass --overwrite to replace it");

    named::OpenFile opened = named::open_input(image, "the image");
    UniqueFd input = std::move(opened.fd);
    const struct stat& st = opened.st;

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

    if (compression == "zst") {
        compress_zstd(input.get(), static_cast<uint64_t>(st.st_size), out.get(), image.string(), temp, cancellable);
    } else {
        std::unique_ptr<struct archive, ArchiveWriteFree> writer(archive_write_new());
        std::string threads = std::to_string(std::max(1u, std::thread::hardware_concurrency()));
        int rc = compression == "xz" ? archive_write_add_filter_xz(writer.get()) : archive_write_add_filter_gzip(writer.get());
        if (rc != ARCHIVE_OK)
            throw Error(std::string("libarchive cannot write ") + compression + ": " + archive_error(writer.get()));
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
        for_each_chunk(input.get(), image.string(), cancellable, [&](const char* data, size_t n) {
            if (archive_write_data(writer.get(), data, n) != static_cast<la_ssize_t>(n))
                throw Error("compress into " + temp + ": " + archive_error(writer.get()));
        });
        if (archive_write_close(writer.get()) != ARCHIVE_OK)
            throw Error("compress into " + temp + ": " + archive_error(writer.get()));
    }
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

std::optional<SumsLine> parse_sums_line(std::string_view line)
{
    if (!line.empty() && line.back() == '\r')
        line.remove_suffix(1);
    SumsLine entry;
    if (line.starts_with("SHA256 (")) {
        auto close = line.rfind(") = ");
        if (close == std::string_view::npos || close < 8)
            return std::nullopt;
        entry.name = line.substr(8, close - 8);
        entry.sha256 = line.substr(close + 4);
    } else {
        auto space = line.find(' ');
        if (space == std::string_view::npos || space + 2 > line.size() || (line[space + 1] != ' ' && line[space + 1] != '*'))
            return std::nullopt;
        entry.sha256 = line.substr(0, space);
        entry.name = line.substr(space + 2);
    }
    if (entry.name.starts_with("./"))
        entry.name.erase(0, 2);
    for (char& c : entry.sha256)
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (entry.name.empty() || entry.sha256.empty())
        return std::nullopt;
    return entry;
}

std::filesystem::path update_sha256sums(const std::vector<std::filesystem::path>& files, GCancellable* cancellable)
{
    if (files.empty())
        throw Error("no files to list in SHA256SUMS");
    std::filesystem::path dir = files.front().parent_path();
    std::filesystem::path sums = (dir.empty() ? std::filesystem::path(".") : dir) / "SHA256SUMS";
    std::map<std::string, std::string> lines; // name -> line, sorted by name
    named::check_output(sums, "SHA256SUMS");
    struct stat existing {};
    if (::lstat(sums.c_str(), &existing) == 0) {
        std::istringstream in(named::read_input(sums, "SHA256SUMS", 16 << 20));
        // One line per name, in sha256sum's own form: a file listed as
        // "./NAME", with CRLF or tagged is the same file, listed once.
        for (std::string line; std::getline(in, line);) {
            auto entry = parse_sums_line(line);
            if (entry)
                lines[entry->name] = entry->sha256 + "  " + entry->name;
        }
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
    named::write_output(sums, "SHA256SUMS", text);
    return sums;
}

} // namespace treeflash::flasher
