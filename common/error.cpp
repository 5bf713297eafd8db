#include "common/error.hpp"
#include "common/glib.hpp"

#include <cstring>
#include <cerrno>
#include <gio/gio.h>

namespace treeflash {

void throw_errno(std::string_view what, int err)
{
    throw Error(std::string(what) + ": " + std::strerror(err));
}

void throw_errno(std::string_view what)
{
    throw_errno(what, errno);
}

void throw_gerror(GError*& err, std::string_view what)
{
    glib::ErrorPtr owned(std::exchange(err, nullptr));
    std::string message = owned ? owned->message : "unknown error";
    bool cancelled = owned && g_error_matches(owned.get(), G_IO_ERROR, G_IO_ERROR_CANCELLED);
    owned.reset();
    if (cancelled)
        throw Cancelled();
    // Errors are one line: multi-line GError texts are joined.
    while (!message.empty() && message.back() == '\n')
        message.pop_back();
    for (size_t pos = 0; (pos = message.find('\n', pos)) != std::string::npos;)
        message.replace(pos, 1, "; ");
    if (!what.empty())
        message = std::string(what) + ": " + message;
    throw Error(message);
}

} // namespace treeflash
