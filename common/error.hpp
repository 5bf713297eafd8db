// Errors with step context.
//
// Library code throws treeflash::Error; each layer adds the name of its step,
// so the CLI prints one line that reads like a short trace:
//   build: commit: write usr/bin/busybox: No space left on device
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

typedef struct _GError GError;

namespace treeflash {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Thrown when the user interrupted the work (SIGINT/SIGTERM).
class Cancelled : public Error {
public:
    Cancelled() : Error("interrupted") {}
    explicit Cancelled(const std::string& message) : Error(message) {}
};

// Throws an Error "what: <strerror(err)>".
[[noreturn]] void throw_errno(std::string_view what, int err);
[[noreturn]] void throw_errno(std::string_view what);

// Takes ownership of err, sets the caller's pointer to null (so a GError*
// shared by several steps never dangles), and throws it as Error
// ("what: message"), or as Cancelled when it is G_IO_ERROR_CANCELLED.
[[noreturn]] void throw_gerror(GError*& err, std::string_view what = {});

// With TREEFLASH_STEP_TIMES set in the environment, every step's wall
// time, and the CPU time of the thread running it, are printed on stderr
// when it ends (for benchmarks; nested steps print before the step holding
// them).
class StepTimer {
public:
    explicit StepTimer(std::string_view step);
    ~StepTimer();
    StepTimer(const StepTimer&) = delete;
    StepTimer& operator=(const StepTimer&) = delete;

private:
    std::string_view m_step;
    long long m_start_ns = -1;
    long long m_start_cpu_ns = 0;
};

// Runs fn; an Error escaping it gets "step: " in front of its message.
template <typename Fn>
decltype(auto) in_step(std::string_view step, Fn&& fn)
{
    StepTimer timer(step);
    try {
        return std::forward<Fn>(fn)();
    } catch (const Cancelled&) {
        throw;
    } catch (const Error& e) {
        throw Error(std::string(step) + ": " + e.what());
    }
}

} // namespace treeflash
