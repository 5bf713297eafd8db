// Helpers the end-to-end tests share (tests/e2e/e2e.cpp). Needs root and
// the example packages (scripts/fetch-example).
#pragma once

#include "tests/support/system.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace treeflash::test::e2e {

extern const bool not_root;
extern const fs::path example;    // scripts/fetch-example's output
extern const fs::path source_dir; // the project's top folder

std::string kver();

// The example rootfs, with an rcS that reports what the tests check (E2E-*
// lines), and an inittab line that waits for boot-health's verdict, shows it
// (E2E-BOOT-STATE) and powers off.
void make_e2e_rootfs(const fs::path& dir, const std::string& version, const std::string& motd);

// `treeflash initramfs` for `board` (a name or a folder), checked.
fs::path initramfs_for(const fs::path& dir, const std::string& board, const std::vector<std::string>& extra = {},
                       const fs::path& modules = {});

// `treeflash build` of `rootfs` into `repo`; the commit checksum.
std::string commit(const fs::path& rootfs, const fs::path& repo, const fs::path& initramfs, const std::string& version,
                   const std::vector<std::string>& extra = {});

// QEMU's own devicetree for the virt machine with its model renamed, so the
// console shows which devicetree the kernel got.
fs::path marked_devicetree(const fs::path& dir, const std::string& name, const std::string& model);

// A copy of the kernel's modules tree plus refused.ko, a module the kernel refuses.
fs::path modules_with_refused_module(const fs::path& dir);

struct Boot {
    int status = -1;
    std::string console;
    // The value of the first "KEY: value" line on the console.
    std::string line(const std::string& key) const { return value_at(console.find(key + ": "), key); }
    // The same line as the last boot of a run that rebooted printed it.
    std::string last_line(const std::string& key) const { return value_at(console.rfind(key + ": "), key); }

private:
    std::string value_at(size_t pos, const std::string& key) const
    {
        if (pos == std::string::npos)
            return "";
        auto end = console.find_first_of("\r\n", pos);
        return console.substr(pos + key.size() + 2, end - pos - key.size() - 2);
    }
};

// Boots an image file or a card with scripts/qemu-boot (marker E2E-DONE);
// the console goes to IMAGE.console, or to `log`.
Boot boot(const fs::path& image, const std::vector<std::string>& extra = {}, fs::path log = {});

// The deployment directory of `commit` on a mounted card.
fs::path default_deployment(const fs::path& sysroot, const std::string& commit);

// mount(8) of the rootfs partition (p3) of a qemu-arm64 image, read-write.
struct MountedRootfs {
    Scratch dir;
    explicit MountedRootfs(const fs::path& image)
    {
        auto r = run_process({"mount", "-o", "loop,offset=" + std::to_string(160ull << 20), image.string(), dir.path().string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
    }
    ~MountedRootfs() { run_process({"umount", dir.path().string()}); }
};

// How a board booted with `qemu-boot --net` sees a server on the host's
// 127.0.0.1: http://127.0.0.1:PORT/ becomes http://10.0.2.2:PORT/.
std::string board_url(const std::string& host_url);

// The updater's settings (auto-update.conf) for tests: a failed check is
// retried after 2 s.
inline const std::string quick_updates = "interval=3600\nretry=2\ntimeout=20\n";

// `treeflash inspect --json` of an image or a card, checked.
nlohmann::json inspect(const fs::path& image);

// How often `what` occurs in `text`.
size_t count(const std::string& text, const std::string& what);

// The 512-byte tries block boot counting keeps at 0x5ff000 on both qemu
// boards (and ls104x), read from an image file or a card.
std::string tries_block(const fs::path& image);

// The error itself is one line (after any progress notices).
bool one_line(const std::string& err);

// A new ed25519 signing key in `home`; its fingerprint.
std::string gpg_key(const fs::path& home, const std::string& name);

// Stops the gpg-agents of these GnuPG homes when it goes away (gpg starts
// one per home and leaves it running). Declare it after the scratch
// folder holding the homes, so it runs first.
struct GpgAgents {
    std::vector<fs::path> homes;
    ~GpgAgents();
};

} // namespace treeflash::test::e2e
