#include "flasher/bootscript.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/process.hpp"
#include "common/templates.hpp"

#include <regex>
#include <sstream>

namespace treeflash::flasher {

namespace {

void replace_all(std::string& text, const std::string& from, const std::string& to)
{
    for (size_t pos = 0; (pos = text.find(from, pos)) != std::string::npos; pos += to.size())
        text.replace(pos, from.size(), to);
}

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
    std::string text;
    std::filesystem::path own = board.dir / board.boot_script;
    if (std::filesystem::is_regular_file(own)) {
        text = fs::read_file(own);
    } else {
        try {
            text = std::string(templates::get(board.boot_script));
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
    replace_all(text, "@BOARD@", board.name);
    replace_all(text, "@DEVTYPE@", board.uboot_devtype);
    replace_all(text, "@DEVNUM@", board.uboot_devnum);
    replace_all(text, "@ROOTFS_PART@", std::to_string(board.rootfs_partition));
    replace_all(text, "@FDT_FALLBACK@", board.uboot_fdt_fallback.empty() ? "${fdtcontroladdr}" : board.uboot_fdt_fallback);
    replace_all(text, "@DEFAULTS@", defaults);

    std::string missing;
    for (const auto& name : unset_boot_script_variables(text))
        missing += (missing.empty() ? "" : ", ") + name;
    if (!missing.empty())
        throw Error("board " + board.name + ": the boot script uses U-Boot variables that an environment may lack ("
                    + missing + "); give each a uboot.default.NAME in board.conf");
    return text;
}

void write_boot_script(const BoardProfile& board, const std::string& script, const std::filesystem::path& dir)
{
    std::filesystem::path cmd = dir / "boot.cmd";
    fs::write_file_atomic(cmd, script);
    std::string arch = board.arch.empty() ? "arm64" : board.arch;
    run_checked({"mkimage", "-A", arch, "-O", "linux", "-T", "script", "-C", "none", "-n",
                 "treeflash " + board.name + " OSTree boot", "-d", cmd.string(), (dir / "boot.scr").string()});
}

} // namespace treeflash::flasher
