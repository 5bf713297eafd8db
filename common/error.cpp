#include "common/error.hpp"
#include "common/glib.hpp"

#include <cstring>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <ctime>
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

namespace {

bool step_times_wanted()
{
    static const bool wanted = std::getenv("TREEFLASH_STEP_TIMES") != nullptr;
    return wanted;
}

long long clock_ns(clockid_t clock)
{
    struct timespec now {};
    ::clock_gettime(clock, &now);
    return now.tv_sec * 1000000000LL + now.tv_nsec;
}

} // namespace

StepTimer::StepTimer(std::string_view step) : m_step(step)
{
    if (step_times_wanted()) {
        m_start_ns = clock_ns(CLOCK_MONOTONIC);
        m_start_cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    }
}

StepTimer::~StepTimer()
{
    if (m_start_ns >= 0)
        std::fprintf(stderr, "treeflash: step %.*s: %.3f s (this thread's CPU %.3f s)\n", static_cast<int>(m_step.size()),
                     m_step.data(), static_cast<double>(clock_ns(CLOCK_MONOTONIC) - m_start_ns) / 1e9,
                     static_cast<double>(clock_ns(CLOCK_THREAD_CPUTIME_ID) - m_start_cpu_ns) / 1e9);
}

} // namespace treeflash
