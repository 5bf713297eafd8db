// Running an external program: argv only (never a shell string), output
// captured, failures reported with the program's stderr.
#pragma once

#include "common/fd.hpp"

#include <string>
#include <sys/types.h>
#include <utility>
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
    // A process group of its own, so a Ctrl-C at the terminal does not reach
    // it: for a step that would damage what it works on if cut short.
    bool new_process_group = false;
    // Descriptors the child gets besides its output pipes: {descriptor
    // here, number in the child (3 or more)}.
    std::vector<std::pair<int, int>> descriptors;
};

// The caller's environment with `overrides` ("KEY=VALUE") set.
std::vector<std::string> child_environment(const std::vector<std::string>& overrides);

// A pipe whose ends close on exec (a child gets one only through
// ChildSetup::descriptors) and when they go out of scope.
struct Pipe {
    Pipe();
    UniqueFd read_end;
    UniqueFd write_end;
};

// How spawn_child starts a program.
struct ChildSetup {
    // Descriptors the child gets: {descriptor here, number in the child}.
    // Standard input is /dev/null unless 0 is named.
    std::vector<std::pair<int, int>> descriptors;
    std::vector<std::string> extra_environment; // as in ProcessOptions
    // A process group of its own: a Ctrl-C at the terminal does not reach
    // it, and the caller can kill it with everything it runs.
    bool new_process_group = false;
    // The file to execute when it is not argv[0] (which then only names it).
    std::string program;
};

// Starts argv[0] (a path, or looked up in PATH) in a child that is killed
// (SIGKILL) when the calling thread's process dies, even by SIGKILL: no
// program treeflash starts outlives it. The child execs at once; it runs
// none of this process's code but a few system calls. Throws when the
// program cannot be started. The caller waits for the returned pid.
pid_t spawn_child(const std::vector<std::string>& argv, const ChildSetup& setup);

// What internal steps re-execute (`treeflash __pull ...`): the running
// executable itself (/proc/self/exe, even when its file was replaced
// meanwhile), unless set (test runners set it to the treeflash binary).
// Returns the argv of the command, ready for spawn_child with `setup`.
std::vector<std::string> treeflash_command(const std::string& command, ChildSetup& setup);
void set_treeflash_executable(const std::string& path);

// The file run_process runs for `name`: itself when it holds a slash, else
// the first executable of that name in PATH, then in the system's folders.
// Throws when there is none.
std::string program_path(const std::string& name);

// Runs argv[0] (looked up in PATH) with stdin from /dev/null and waits for it.
ProcessResult run_process(const std::vector<std::string>& argv, const ProcessOptions& options = {});

// Runs argv and throws Error "argv[0]: <its stderr>" unless it exits 0.
std::string run_checked(const std::vector<std::string>& argv, const ProcessOptions& options = {});

} // namespace treeflash
