#include "flasher/bootscript.hpp"

#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/process.hpp"
#include "common/templates.hpp"

namespace treeflash::flasher {

namespace {

void replace_all(std::string& text, const std::string& from, const std::string& to)
{
    for (size_t pos = 0; (pos = text.find(from, pos)) != std::string::npos; pos += to.size())
        text.replace(pos, from.size(), to);
}

} // namespace

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
    return text;
}

void write_boot_script(const BoardProfile& board, const std::filesystem::path& dir)
{
    std::filesystem::path cmd = dir / "boot.cmd";
    fs::write_file_atomic(cmd, render_boot_script(board));
    std::string arch = board.arch.empty() ? "arm64" : board.arch;
    run_checked({"mkimage", "-A", arch, "-O", "linux", "-T", "script", "-C", "none", "-n",
                 "treeflash " + board.name + " OSTree boot", "-d", cmd.string(), (dir / "boot.scr").string()});
}

} // namespace treeflash::flasher
