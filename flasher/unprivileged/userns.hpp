// Work done as root of a user namespace of its own: the caller (root or not)
// becomes uid and gid 0 there, mapped to its own ids and nothing else, so
// files it creates are root's as far as anything in that namespace sees,
// and it holds no privilege over the host (a freeze of the host's file
// system, say, gets EPERM).
#pragma once

#include <functional>
#include <string>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

using NamespaceNotice = std::function<void(const std::string&)>;

// Runs `work` in a forked child inside a new user namespace and waits for
// it. `work` gets a notice function whose lines reach `notice` here. An
// Error the child throws is thrown here with the same message; Ctrl-C
// (the cancellable) kills the child and throws Cancelled. `meanwhile`, when
// given, runs here about every 25 ms while the child works.
void run_as_namespace_root(const std::function<void(const NamespaceNotice&)>& work, const NamespaceNotice& notice,
                           GCancellable* cancellable, const std::function<void()>& meanwhile = {});

// Whether this process can create a user namespace (the kernel or a
// container may forbid it).
bool user_namespaces_available();

} // namespace treeflash::flasher
