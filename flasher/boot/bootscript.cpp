#include "flasher/boot/bootscript.hpp"

#include "common/error.hpp"
#include "common/text.hpp"
#include "common/fs.hpp"
#include "common/process.hpp"
#include "common/templates.hpp"

#include <regex>
#include <sstream>

namespace treeflash::flasher {

namespace {

// Set by U-Boot itself (load sets filesize; a U-Boot with a control
// devicetree sets fdtcontroladdr) or written by OSTree into uEnv.txt.
const std::set<std::string> provided_variables = {
    "filesize",      "fdtcontroladdr", "kernel_image", "ramdisk_image", "fdt_file", "fdtdir",
    "bootargs",      "kernel_image2",  "ramdisk_image2", "fdt_file2",   "fdtdir2",  "bootargs2",
};

std::string strip_comment(const std::string& line)
{
    size_t start = line.find_first_not_of(" \t");
    return start != std::string::npos && line[start] == '#' ? std::string() : line;
}

} // namespace

std::set<std::string> unset_boot_script_variables(const std::string& script)
{
    static const std::regex use(R"(\$\{([A-Za-z0-9_]+)\})");
    static const std::regex assignment(R"((?:^|[;\s])setenv\s+([A-Za-z0-9_]+)\s+\S)");
    // test "${NAME}" ... or test -n/-z "${NAME}": the script copes with an empty value.
    static const std::regex guarded(R"(test\s+(?:-[nz]\s+)?"\$\{([A-Za-z0-9_]+)\}")");
    std::set<std::string> used, set, tested;
    std::istringstream in(script);
    for (std::string line; std::getline(in, line);) {
        line = strip_comment(line);
        for (std::sregex_iterator it(line.begin(), line.end(), use), end; it != end; ++it)
            used.insert((*it)[1]);
        for (std::sregex_iterator it(line.begin(), line.end(), assignment), end; it != end; ++it)
            set.insert((*it)[1]);
        for (std::sregex_iterator it(line.begin(), line.end(), guarded), end; it != end; ++it)
            tested.insert((*it)[1]);
    }
    std::set<std::string> missing;
    for (const auto& name : used)
        if (!set.count(name) && !tested.count(name) && !provided_variables.count(name))
            missing.insert(name);
    return missing;
}

std::string render_boot_script(const BoardProfile& board)
{
    std::string script;
    std::filesystem::path own = board.dir / board.boot_script;
    if (std::filesystem::is_regular_file(own)) {
        script = fs::read_file(own);
    } else {
        try {
            script = std::string(templates::get(board.boot_script));
        } catch (const std::out_of_range&) {
            throw Error("board " + board.name + ": boot_script " + board.boot_script
                        + " is neither in the board folder nor a template");
        }
    }
    std::string defaults;
    for (const auto& [name, value] : board.uboot_defaults)
        defaults += "if test -z \"${" + name + "}\"; then setenv " + name + " " + value + "; fi\n";
    if (!defaults.empty())
        defaults.pop_back();
    std::string count, count_args;
    if (board.boot_count.enabled()) {
        count = std::string(templates::get("uboot/boot-count.cmd"));
        count_args = "setenv bootargs \"${bootargs} treeflash.state=${treeflash_state} treeflash.boot=${treeflash_serial} "
                     "treeflash.tries=${treeflash_tries} treeflash.bootlimit=${treeflash_bootlimit}\"";
        text::replace_all(count, "@STATE_BLOCK@", text::hex(board.boot_count.state_offset / 512));
        text::replace_all(count, "@BOOTLIMIT@", std::to_string(board.boot_count.limit));
    }
    text::replace_all(script, "@BOOT_COUNT@", count);
    text::replace_all(script, "@BOOT_COUNT_ARGS@", count_args);
    text::replace_all(script, "@BOARD@", board.name);
    text::replace_all(script, "@DEVTYPE@", board.uboot_devtype);
    text::replace_all(script, "@DEVNUM@", board.uboot_devnum);
    text::replace_all(script, "@ROOTFS_PART@", std::to_string(board.rootfs_partition));
    // A deployment without a devicetree boots on the board's fallback, or,
    // where the board has none that survives the kernel's load, not at all.
    std::string fallback = board.uboot_fdt_fallback.empty() ? "${fdtcontroladdr}" : board.uboot_fdt_fallback;
    text::replace_all(script, "@NO_DEVICETREE@",
                      board.devicetree_required
                          ? "  echo \"treeflash: no devicetree in the deployment; board " + board.name
                                + " boots only with one from the commit\"\n  exit"
                          : "  echo \"treeflash: no devicetree in the deployment, using " + fallback
                                + "\"\n  setenv fdt " + fallback);
    text::replace_all(script, "@DEFAULTS@", defaults);

    std::string missing;
    for (const auto& name : unset_boot_script_variables(script))
        missing += (missing.empty() ? "" : ", ") + name;
    if (!missing.empty())
        throw Error("board " + board.name + ": the boot script uses U-Boot variables that an environment may lack ("
                    + missing + "); give each a uboot.default.NAME in board.conf");
    return script;
}

void write_boot_script(const BoardProfile& board, const std::string& script, const std::filesystem::path& dir,
                       uint64_t source_date_epoch)
{
    std::filesystem::path cmd = dir / "boot.cmd";
    fs::write_file_atomic(cmd, script);
    std::string arch = board.arch.empty() ? "arm64" : board.arch;
    ProcessOptions process;
    if (source_date_epoch)
        process.extra_environment = {"SOURCE_DATE_EPOCH=" + std::to_string(source_date_epoch)};
    run_checked({"mkimage", "-A", arch, "-O", "linux", "-T", "script", "-C", "none", "-n",
                 "treeflash " + board.name + " OSTree boot", "-d", cmd.string(), (dir / "boot.scr").string()},
                process);
}

} // namespace treeflash::flasher
