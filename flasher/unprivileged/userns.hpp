// Work done as root of a user namespace of its own: the caller (root or not)
// becomes uid and gid 0 there, mapped to its own ids and nothing else, so
// files it creates are root's as far as anything in that namespace sees,
// and it holds no privilege over the host (a freeze of the host's file
// system, say, gets EPERM).
//
// The work runs in treeflash's own executable, started afresh with an
// internal command (`treeflash __image-trees JOB`): the parent never runs
// code in a fork of itself. The helper gets a mount namespace of its own
// too, so what it mounts goes with it.
#pragma once

#include <functional>
#include <string>
#include <vector>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

using NamespaceNotice = std::function<void(const std::string&)>;

// Parent side. Starts `treeflash COMMAND ARGS...` as root of a new user
// namespace and waits for it; it dies with this process and, on a cancel,
// is killed with every program it runs. Its notices reach `notice`; the
// data lines it sends are returned. An error it reports is thrown here
// with its message. `meanwhile`, when given, runs here about every 25 ms.
std::vector<std::string> run_as_namespace_root(const std::string& command, const std::vector<std::string>& args,
                                               const NamespaceNotice& notice, GCancellable* cancellable,
                                               const std::function<void()>& meanwhile = {});

// Helper side: what an internal command started by run_as_namespace_root
// calls first. Becomes root of the user namespace (and of a mount namespace
// of its own), runs `work`, and reports an exception it throws as the
// error. Returns the exit status.
class NamespaceChannel {
public:
    void notice(const std::string& text) const;
    void data(const std::string& text) const;
};
int run_namespace_helper(const std::function<void(const NamespaceChannel&)>& work);

// Whether this process can create a user namespace (the kernel or a
// container may forbid it) and is root there.
bool user_namespaces_available();

// `treeflash __namespace-check`: the helper user_namespaces_available starts.
constexpr const char* namespace_check_command = "__namespace-check";
int run_namespace_check();

} // namespace treeflash::flasher
