// treeflash initramfs: a board's initramfs from busybox, ostree-prepare-root
// and a kernel's modules.
#include "builder/initramfs.hpp"
#include "cli/command.hpp"
#include "common/error.hpp"
#include "flasher/board.hpp"

#include <boost/program_options.hpp>
#include <iostream>

namespace po = boost::program_options;

namespace treeflash::cli {

namespace {

const char* initramfs_usage = R"(Usage: treeflash initramfs --board NAME|DIR --busybox FILE --userland DIR --modules DIR --output FILE

Packs a gzip'd newc cpio initramfs for the board: a static busybox,
ostree-prepare-root with exactly the shared libraries and loader its ELF
headers name (looked up in --userland as the loader would), the board's
kernel modules (initramfs.modules in board.conf, plus --module) with their
dependencies in load order, and an /init that mounts ostree_root= (or
root=), runs ostree-prepare-root and switches to the deployment.

Example (Debian's arm64 packages unpacked by scripts/fetch-example):
  treeflash initramfs --board qemu-arm64 --busybox rootfs/usr/bin/busybox \
      --userland prepare-root --modules kernel/modules/6.1.0-56-arm64 --output initramfs.img

Options)";

} // namespace

int run_initramfs(const std::vector<std::string>& args, GCancellable*)
{
    builder::InitramfsOptions options;
    std::string board_name, busybox, userland, modules, output, on_failure;
    std::vector<std::string> extra_modules;
    bool json = false;
    po::options_description desc(initramfs_usage);
    desc.add_options()
        ("help,h", "show this help")
        ("board", po::value(&board_name)->value_name("NAME|DIR"), "board profile whose initramfs settings apply (required)")
        ("busybox", po::value(&busybox)->value_name("FILE"), "a static busybox for the board's architecture (required)")
        ("userland", po::value(&userland)->value_name("DIR"),
         "a tree holding ostree-prepare-root and its libraries, e.g. unpacked ostree-boot, libc6, ... (required)")
        ("prepare-root", po::value(&options.prepare_root)->value_name("PATH")->default_value(options.prepare_root),
         "ostree-prepare-root inside --userland")
        ("modules", po::value(&modules)->value_name("DIR"), "the kernel's lib/modules/KVER directory")
        ("module", po::value(&extra_modules)->value_name("NAME")->composing(), "another module to load; repeatable")
        ("on-failure", po::value(&on_failure)->value_name("shell|poweroff|reboot"),
         "what /init does after a failed step (default: the board's)")
        ("output", po::value(&output)->value_name("FILE"), "where to write the initramfs (required)")
        ("json", po::bool_switch(&json), "print the result as JSON on stdout");
    if (!parse_options(args, desc))
        return 0;
    for (const auto& [value, name] : {std::pair{&board_name, "--board"}, {&busybox, "--busybox"},
                                      {&userland, "--userland"}, {&output, "--output"}})
        if (value->empty())
            throw UsageError(std::string(name) + " is required");

    flasher::BoardProfile board = in_step("board", [&] { return flasher::load_board(board_name); });
    options.board = board.name;
    options.busybox = busybox;
    options.userland = userland;
    options.modules_dir = modules;
    options.modules = board.initramfs_modules;
    options.modules.insert(options.modules.end(), extra_modules.begin(), extra_modules.end());
    if (!options.modules.empty() && modules.empty())
        throw UsageError("board " + board.name + " loads modules: pass --modules DIR");
    options.on_failure = on_failure.empty() ? board.initramfs_on_failure : on_failure;
    if (board.boot_count.enabled() && options.on_failure != "reboot")
        throw UsageError("board " + board.name + " counts boots: a failed step must reboot to count as a failed try, "
                         "not --on-failure " + options.on_failure);
    options.root_wait = board.initramfs_root_wait;
    options.output = output;

    builder::InitramfsResult result = in_step("initramfs", [&] { return builder::build_initramfs(options); });
    if (json) {
        print_json({{"output", output}, {"bytes", result.bytes}, {"modules", result.modules}, {"binaries", result.files}});
    } else {
        std::cout << output << ": " << result.bytes << " bytes\n";
        std::string list;
        for (const auto& m : result.modules)
            list += (list.empty() ? "" : " ") + m;
        std::cout << "modules (load order): " << (list.empty() ? "none" : list) << "\n";
        std::cout << "binaries: " << result.files.size() << " (ostree-prepare-root, its loader and libraries, busybox)\n";
    }
    return 0;
}

} // namespace treeflash::cli
