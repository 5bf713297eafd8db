#include "common/pending_file.hpp"

#include "common/error.hpp"

#include <cerrno>
#include <fcntl.h>
#include <unistd.h>
#include <utility>

namespace treeflash {

PendingFile::PendingFile(int folder, std::string name, std::string_view content, std::string what)
    : m_folder(::fcntl(folder, F_DUPFD_CLOEXEC, 0)), m_name(std::move(name)), m_what(std::move(what))
{
    if (!m_folder)
        throw_errno("write " + m_what);
    // A new file, never through a symlink someone put under that name (the
    // folder may be shared): what a killed run left is removed first.
    std::string temp = m_name + ".tmp-" + std::to_string(::getpid());
    ::unlinkat(folder, temp.c_str(), 0);
    UniqueFd fd(::openat(folder, temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (!fd)
        throw_errno("write " + m_what);
    // A failure here is no object, whose destructor would remove the file.
    auto fail = [&](const std::string& step) {
        int err = errno;
        ::unlinkat(folder, temp.c_str(), 0);
        throw_errno(step + " " + m_what, err);
    };
    for (size_t done = 0; done < content.size();) {
        ssize_t n = ::write(fd.get(), content.data() + done, content.size() - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n == 0)
                errno = ENOSPC;
            fail("write");
        }
        done += static_cast<size_t>(n);
    }
    if (::fsync(fd.get()) != 0)
        fail("sync");
    m_temp = temp;
}

PendingFile::PendingFile(PendingFile&& other) noexcept
    : m_folder(std::move(other.m_folder)), m_name(std::move(other.m_name)), m_temp(std::exchange(other.m_temp, {})),
      m_what(std::move(other.m_what))
{
}

void PendingFile::publish()
{
    if (m_temp.empty())
        throw Error("move " + m_what + " into place: it was published already");
    if (::renameat(m_folder.get(), m_temp.c_str(), m_folder.get(), m_name.c_str()) != 0)
        throw_errno("move into place " + m_what);
    m_temp.clear();
}

PendingFile::~PendingFile()
{
    if (!m_temp.empty())
        ::unlinkat(m_folder.get(), m_temp.c_str(), 0);
}

} // namespace treeflash
