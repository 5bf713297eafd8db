// Helpers the end-to-end tests share: the example rootfs, initramfs and
// commits, booting an image under QEMU and reading its console.
#include "tests/e2e/e2e.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <fstream>
#include <regex>
#include <sstream>

using nlohmann::json;

namespace treeflash::test::e2e {

const bool not_root = !is_root();
const fs::path example = TREEFLASH_E2E_EXAMPLE_DIR;
const fs::path source_dir = TREEFLASH_SOURCE_DIR;


std::string kver()
{
    std::string text = read_text(example / "kernel/kver");
    return text.substr(0, text.find('\n'));
}

// The example rootfs, with an rcS that reports what the test checks, and an
// inittab line that waits for boot-health's verdict (treeflash build adds
// that script), shows it and powers off.
void make_e2e_rootfs(const fs::path& dir, const std::string& version, const std::string& motd)
{
    fs::copy(example / "rootfs", dir, fs::copy_options::recursive | fs::copy_options::copy_symlinks);
    write_file(dir / "etc/init.d/rcS", R"RCS(#!/bin/sh
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
echo "E2E-CMDLINE: $(cat /proc/cmdline)"
echo "E2E-MODEL: $(cat /sys/firmware/devicetree/base/model)"
if touch /usr/e2e-probe 2>/dev/null; then echo "E2E-USR: writable"; else echo "E2E-USR: read-only"; fi
if [ -e /run/ostree-booted ]; then echo "E2E-OSTREE-BOOTED: yes"; else echo "E2E-OSTREE-BOOTED: no"; fi
echo "E2E-VERSION: $(/usr/bin/e2e-version)"
echo "E2E-HOSTNAME: $(cat /etc/hostname)"
echo "E2E-MOTD: $(cat /etc/motd)"
/etc/init.d/network
)RCS", 0755);
    write_file(dir / "usr/bin/e2e-finish", R"SH(#!/bin/sh
i=0
while [ ! -f /run/treeflash/boot-state ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
state=$(sed -n 's/^state=//p' /run/treeflash/boot-state 2>/dev/null)
echo "E2E-BOOT-STATE: ${state:-none}"
sed 's/^/E2E-STATE-FILE: /' /run/treeflash/boot-state 2>/dev/null
# A failed health check on a trial boot reboots the board by itself.
[ "$state" = trial-failed ] && exec sleep 1000
# With /etc/e2e-update-checks, the board's updater makes that many checks
# first (a deployed update reboots the board by itself).
if [ -f /etc/e2e-update-checks ]; then
    want=$(cat /etc/e2e-update-checks)
    i=0
    while [ $i -lt 1800 ]; do
        n=$(sed -n 's/^checks=//p' /run/treeflash/auto-update 2>/dev/null)
        [ "${n:-0}" -ge "$want" ] && break
        sleep 0.1
        i=$((i + 1))
    done
    outcome=$(sed -n 's/^outcome=//p' /run/treeflash/auto-update 2>/dev/null)
    echo "E2E-UPDATE: ${outcome:-none}"
    sed 's/^/E2E-UPDATE-FILE: /' /run/treeflash/auto-update 2>/dev/null
    [ "$outcome" = deployed ] && exec sleep 1000
fi
echo "E2E-DONE"
poweroff -f
)SH", 0755);
    write_file(dir / "etc/inittab", "::sysinit:/etc/init.d/rcS\n::once:/usr/bin/e2e-finish\n::shutdown:/bin/umount -a -r\n");
    write_file(dir / "usr/bin/e2e-version", "#!/bin/sh\necho " + version + "\n", 0755);
    write_file(dir / "etc/motd", motd + "\n");
}

fs::path initramfs_for(const fs::path& dir, const std::string& board, const std::vector<std::string>& extra,
                       const fs::path& modules)
{
    fs::path out = dir / ("initramfs-" + fs::path(board).filename().string() + ".img");
    std::vector<std::string> args{"initramfs", "--board", board, "--busybox", (example / "rootfs/usr/bin/busybox").string(),
                                  "--userland", (example / "userland").string(), "--modules",
                                  (modules.empty() ? example / "kernel/modules" / kver() : modules).string(),
                                  "--output", out.string()};
    args.insert(args.end(), extra.begin(), extra.end());
    args.push_back("--json");
    auto r = run_treeflash(args);
    REQUIRE_MESSAGE(r.ok(), r.err);
    // Modules come after their dependencies; the loader and libc are in.
    json info = json::parse(r.out);
    auto position = [&](const std::string& name) {
        const auto& modules = info["modules"];
        for (size_t i = 0; i < modules.size(); ++i)
            if (modules[i] == name)
                return static_cast<int>(i);
        return -1;
    };
    CHECK(position("ext4") > position("jbd2"));
    CHECK(position("jbd2") >= 0);
    std::string binaries = info["binaries"].dump();
    CHECK(binaries.find("lib/ld-linux-aarch64.so.1") != std::string::npos);
    CHECK(binaries.find("lib/libc.so.6") != std::string::npos);
    return out;
}

std::string commit(const fs::path& rootfs, const fs::path& repo, const fs::path& initramfs, const std::string& version,
                   const std::vector<std::string>& extra)
{
    std::vector<std::string> args{"build", "--rootfs", rootfs.string(), "--repo", repo.string(), "--kernel",
                                  (example / "kernel/vmlinuz").string(), "--initramfs", initramfs.string(),
                                  "--version", version};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = run_treeflash(args);
    REQUIRE_MESSAGE(r.ok(), r.err);
    return r.out.substr(0, 64);
}

// QEMU's own devicetree for the virt machine with its model renamed, so the
// console shows which devicetree the kernel got.
fs::path marked_devicetree(const fs::path& dir, const std::string& name, const std::string& model)
{
    fs::path qemu = dir / "qemu-dumped.dtb";
    if (!fs::exists(qemu)) {
        auto r = run_process({(source_dir / "scripts/qemu-boot").string(), "--dump-dtb", qemu.string()});
        REQUIRE_MESSAGE(r.ok(), r.err);
    }
    auto dts = run_process({"dtc", "-q", "-I", "dtb", "-O", "dts", qemu.string()});
    REQUIRE_MESSAGE(dts.ok(), dts.err);
    std::string text = dts.out;
    const std::string original = "model = \"linux,dummy-virt\";";
    REQUIRE(text.find(original) != std::string::npos);
    text.replace(text.find(original), original.size(), "model = \"" + model + "\";");
    write_file(dir / (name + ".dts"), text);
    fs::path out = dir / name;
    auto r = run_process({"dtc", "-q", "-I", "dts", "-O", "dtb", "-o", out.string(), (dir / (name + ".dts")).string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    return out;
}

// A copy of the kernel's modules tree (symlinks) plus refused.ko: a real
// module whose vermagic was changed, so the kernel refuses to load it.
fs::path modules_with_refused_module(const fs::path& dir)
{
    fs::path modules = dir / "modules";
    auto r = run_process({"cp", "-as", (example / "kernel/modules" / kver()).string() + "/.", modules.string()});
    REQUIRE_MESSAGE(r.ok(), r.err);
    fs::path crc16;
    for (const auto& entry : fs::recursive_directory_iterator(modules / "kernel"))
        if (entry.path().filename() == "crc16.ko")
            crc16 = entry.path();
    REQUIRE(!crc16.empty());
    std::string bytes = read_text(crc16);
    auto pos = bytes.find("vermagic=");
    REQUIRE(pos != std::string::npos);
    bytes[pos + 9] = 'X';
    write_file(modules / "kernel/refused.ko", bytes);
    return modules;
}


// Boots an image file or a card; the console goes to IMAGE.console, or to
// `console` (a card's name is under /dev).
Boot boot(const fs::path& image, const std::vector<std::string>& extra, fs::path log)
{
    if (log.empty()) {
        log = image;
        log += ".console";
    }
    std::vector<std::string> argv{(source_dir / "scripts/qemu-boot").string(), image.string(), "--marker", "E2E-DONE",
                                  "--timeout", "60", "--quiet", "--console", log.string()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto r = run_process(argv);
    Boot result;
    result.status = r.exit_code;
    result.console = read_text(log);
    return result;
}

// The deployment directory of the default deployment on a mounted card.
fs::path default_deployment(const fs::path& sysroot, const std::string& commit)
{
    for (const auto& entry : fs::directory_iterator(sysroot / "ostree/deploy/tcu/deploy"))
        if (entry.is_directory() && entry.path().filename().string().rfind(commit, 0) == 0)
            return entry.path();
    FAIL("no deployment of " << commit);
    return {};
}


std::string board_url(const std::string& host_url)
{
    const std::string local = "http://127.0.0.1:";
    REQUIRE(host_url.rfind(local, 0) == 0);
    return "http://10.0.2.2:" + host_url.substr(local.size());
}

json inspect(const fs::path& image)
{
    auto r = run_treeflash({"inspect", image.string(), "--json"});
    REQUIRE_MESSAGE(r.ok(), r.err);
    return json::parse(r.out);
}

size_t count(const std::string& text, const std::string& what)
{
    size_t n = 0;
    for (size_t pos = text.find(what); pos != std::string::npos; pos = text.find(what, pos + what.size()))
        ++n;
    return n;
}

std::string tries_block(const fs::path& image)
{
    std::ifstream in(image, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(0x5ff000));
    std::string block(512, '\0');
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    REQUIRE(in.good());
    return block;
}

// The error itself is one line (after any progress notices).
bool one_line(const std::string& err)
{
    std::istringstream in(err);
    int errors = 0;
    for (std::string line; std::getline(in, line);)
        errors += line.rfind("treeflash upgrade:", 0) == 0;
    return errors == 1 && err.find("treeflash upgrade:") != std::string::npos
           && err.substr(err.find("treeflash upgrade:")).find('\n') == err.size() - err.find("treeflash upgrade:") - 1;
}

std::string gpg_key(const fs::path& home, const std::string& name)
{
    fs::create_directories(home);
    fs::permissions(home, fs::perms::owner_all);
    REQUIRE(run_process({"gpg", "--homedir", home.string(), "--batch", "--passphrase", "", "--quick-gen-key",
                         name + " <" + name + "@example.invalid>", "ed25519", "sign", "never"}).ok());
    auto list = run_process({"gpg", "--homedir", home.string(), "--with-colons", "--list-secret-keys"});
    std::smatch m;
    std::string out = list.out;
    REQUIRE(std::regex_search(out, m, std::regex("fpr:+([0-9A-F]{40}):")));
    return m[1];
}

GpgAgents::~GpgAgents()
{
    for (const auto& home : homes)
        run_process({"gpgconf", "--homedir", home.string(), "--kill", "all"});
}

} // namespace treeflash::test::e2e
