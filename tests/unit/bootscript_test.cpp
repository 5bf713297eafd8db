// The U-Boot boot script: on any environment, every variable it reads has
// a value, and it handles one devicetree, a folder of them, and none.
#include "common/error.hpp"
#include "flasher/board.hpp"
#include "flasher/boot/bootscript.hpp"
#include "flasher/deploy/sysroot.hpp"
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>
#include <regex>

using namespace treeflash;
using namespace treeflash::flasher;
using namespace treeflash::test;

namespace {

const fs::path boards = fs::path(TREEFLASH_SOURCE_DIR) / "board";

std::string joined(const std::set<std::string>& names)
{
    std::string out;
    for (const auto& n : names)
        out += n + " ";
    return out;
}

} // namespace

TEST_SUITE("boot") {

TEST_CASE("every bundled board's script gives each variable it reads a value")
{
    int count = 0;
    for (const auto& entry : fs::directory_iterator(boards)) {
        CAPTURE(entry.path());
        BoardProfile board = load_board(entry.path().string());
        std::string script = render_boot_script(board);
        CHECK_MESSAGE(unset_boot_script_variables(script).empty(), joined(unset_boot_script_variables(script)));
        // The addresses it loads to are defaulted from the board profile.
        for (const char* address : {"scriptaddr", "kernel_addr_r", "ramdisk_addr_r", "fdt_addr_r"})
            CHECK_MESSAGE(script.find(std::string("if test -z \"${") + address + "}\"; then setenv " + address + " 0x")
                              != std::string::npos,
                          address);
        // One devicetree, a folder picked by fdtfile, or the board's fallback.
        CHECK(script.find("${fdt_addr_r} ${fdt_file}") != std::string::npos);
        CHECK(script.find("${fdt_addr_r} ${fdtdir}/${fdtfile}") != std::string::npos);
        CHECK(script.find("setenv fdtdir ${fdtdir2}") != std::string::npos);
        CHECK(script.find("@") == std::string::npos); // every placeholder rendered
        ++count;
    }
    CHECK(count >= 2);
}

TEST_CASE("a board that leaves an address undefined is refused before anything is written")
{
    Scratch tmp;
    fs::copy(boards / "qemu-arm64", tmp / "board", fs::copy_options::recursive);
    std::string conf = read_text(tmp / "board/board.conf");
    conf = std::regex_replace(conf, std::regex("uboot.default.fdt_addr_r = .*\n"), "");
    write_file(tmp / "board/board.conf", conf);
    BoardProfile board = load_board((tmp / "board").string());
    CHECK_THROWS_WITH_AS(render_boot_script(board),
                         "board qemu-arm64: the boot script uses U-Boot variables that an environment may lack "
                         "(fdt_addr_r); give each a uboot.default.NAME in board.conf",
                         Error);
}

TEST_CASE("devicetree = required: a deployment without one stops the script; image_size and devicetree are checked")
{
    BoardProfile raspi = load_board((boards / "qemu-raspi3b").string());
    CHECK(raspi.devicetree_required);
    CHECK(raspi.image_size_power_of_two);
    std::string script = render_boot_script(raspi);
    CHECK(script.find("treeflash: no devicetree in the deployment; board qemu-raspi3b boots only with one from the "
                      "commit\"\n  exit\n")
          != std::string::npos);
    CHECK(script.find("setenv fdt ${fdtcontroladdr}") == std::string::npos);
    // A board with a fallback boots on it.
    BoardProfile virt = load_board((boards / "qemu-arm64").string());
    CHECK(!virt.devicetree_required);
    CHECK(render_boot_script(virt).find("using ${fdt_addr}\"\n  setenv fdt ${fdt_addr}\n") != std::string::npos);

    Scratch tmp;
    // Where OSTree finds a deployment's devicetree, in both kernel layouts.
    fs::create_directories(tmp / "legacy/usr/lib/ostree-boot");
    CHECK(!deployment_has_devicetree(tmp / "legacy"));
    write_file(tmp / "legacy/usr/lib/ostree-boot/devicetree-0123", "dtb");
    CHECK(deployment_has_devicetree(tmp / "legacy"));
    fs::create_directories(tmp / "modules/usr/lib/modules/6.1.0/dtb");
    CHECK(deployment_has_devicetree(tmp / "modules"));
    fs::remove(tmp / "modules/usr/lib/modules/6.1.0/dtb");
    fs::create_symlink("/etc/passwd", tmp / "modules/usr/lib/modules/6.1.0/devicetree"); // a link is not one
    CHECK(!deployment_has_devicetree(tmp / "modules"));
    for (const auto& [line, error] : std::vector<std::pair<std::string, std::string>>{
             {"image_size = 512M", "image_size '512M': any or power-of-two"},
             {"devicetree = yes", "devicetree 'yes': optional or required"}}) {
        fs::remove_all(tmp / "board");
        fs::copy(boards / "qemu-raspi3b", tmp / "board", fs::copy_options::recursive);
        std::string key = line.substr(0, line.find(' '));
        std::string conf = std::regex_replace(read_text(tmp / "board/board.conf"), std::regex(key + " = .*"), line);
        write_file(tmp / "board/board.conf", conf);
        try {
            load_board((tmp / "board").string());
            FAIL("accepted " << line);
        } catch (const Error& e) {
            CHECK_MESSAGE(std::string(e.what()).find(error) != std::string::npos, e.what());
        }
    }
}

TEST_CASE("what counts as a variable with a value")
{
    // Read unguarded and never set: reported.
    CHECK(unset_boot_script_variables("load mmc 0:1 ${loadaddr} /x\n") == std::set<std::string>{"loadaddr"});
    // Set by the script, tested before use, provided by uEnv.txt or U-Boot, or in a comment: fine.
    CHECK(unset_boot_script_variables("setenv a 1\nload mmc 0 ${a} ${kernel_image}\n"
                                      "if test -n \"${b}\"; then echo ${b}; fi\n"
                                      "env import -t ${a} ${filesize}\n"
                                      "# load ${commented}\n")
              .empty());
    // Clearing a variable does not give it a value.
    CHECK(unset_boot_script_variables("setenv c\nbooti ${c}\n") == std::set<std::string>{"c"});
}

}
