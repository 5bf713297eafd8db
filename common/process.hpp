// Running an external program: argv only (never a shell string), output
// captured, failures reported with the program's stderr.
#pragma once

#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash {

struct ProcessResult {
    int exit_code = -1; // -1 when killed by a signal
    int signal = 0;
    std::string out;
    std::string err;
    bool ok() const { return exit_code == 0; }
};

struct ProcessOptions {
    // When cancelled, the child gets SIGTERM (SIGKILL a second later), is
    // waited for, and run_process throws Cancelled.
    GCancellable* cancellable = nullptr;
    // "KEY=VALUE": the child gets the caller's environment with each KEY set
    // to VALUE (a KEY the caller already has is replaced, not repeated).
    std::vector<std::string> extra_environment;
};

// The caller's environment with `overrides` ("KEY=VALUE") set.
std::vector<std::string> child_environment(const std::vector<std::string>& overrides);

// Runs argv[0] (looked up in PATH) with stdin from /dev/null and waits for it.
ProcessResult run_process(const std::vector<std::string>& argv, const ProcessOptions& options = {});

// Runs argv and throws Error "argv[0]: <its stderr>" unless it exits 0.
std::string run_checked(const std::vector<std::string>& argv, const ProcessOptions& options = {});

} // namespace treeflash
