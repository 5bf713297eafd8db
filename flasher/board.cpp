#include "flasher/board.hpp"

#include "common/error.hpp"
#include "common/validate.hpp"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <map>
#include <set>
#include <fstream>
#include <sstream>

namespace treeflash::flasher {

namespace {

std::string trim(const std::string& text)
{
    size_t begin = text.find_first_not_of(" \t\r");
    if (begin == std::string::npos)
        return "";
    size_t end = text.find_last_not_of(" \t\r");
    return text.substr(begin, end - begin + 1);
}

std::vector<std::string> words(const std::string& text)
{
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string word; in >> word;)
        out.push_back(word);
    return out;
}

uint64_t parse_number(const std::string& text)
{
    // stoull would take "-65536" and wrap it around.
    if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0])))
        throw Error("'" + text + "' is not a number");
    size_t used = 0;
    uint64_t value = 0;
    try {
        value = std::stoull(text, &used, 0);
    } catch (const std::exception&) {
        used = 0;
    }
    if (used == 0 || used != text.size())
        throw Error("'" + text + "' is not a number");
    return value;
}

unsigned parse_partition_number(const std::string& text)
{
    uint64_t n = parse_number(text);
    if (n < 1 || n > 4)
        throw Error("partition " + text + ": an MBR holds partitions 1 to 4");
    return static_cast<unsigned>(n);
}

// A file named by the board, which must stay inside the board folder: a
// relative path without "..", whose real location (symlinks resolved) is
// below the folder's.
std::filesystem::path board_file(const BoardProfile& board, const std::string& key, const std::string& value)
{
    std::filesystem::path relative(value);
    if (value.empty() || relative.is_absolute())
        throw Error(key + " '" + value + "': name a file inside the board folder");
    for (const auto& part : relative)
        if (part == "..")
            throw Error(key + " '" + value + "': name a file inside the board folder (no '..')");
    std::error_code ec;
    std::filesystem::path real = std::filesystem::weakly_canonical(board.dir / relative, ec);
    std::filesystem::path dir = std::filesystem::weakly_canonical(board.dir, ec);
    auto mismatch = std::mismatch(dir.begin(), dir.end(), real.begin(), real.end());
    if (ec || mismatch.first != dir.end())
        throw Error(key + " '" + value + "': leads outside the board folder");
    return board.dir / relative;
}

void apply_key(BoardProfile& board, const std::string& key, const std::string& value)
{
    auto starts = [&](const char* prefix) { return key.rfind(prefix, 0) == 0; };
    if (key == "name")
        board.name = value;
    else if (key == "description")
        board.description = value;
    else if (key == "arch")
        board.arch = value;
    else if (key == "partition_table")
        board.partition_table = board_file(board, key, value);
    else if (starts("partition.")) {
        auto parts = words(value);
        if (parts.empty() || parts.size() > 2)
            throw Error("expected 'partition.N = LABEL [ext4]'");
        PartitionRole role;
        role.number = parse_partition_number(key.substr(10));
        role.label = parts[0];
        if (parts.size() == 2)
            role.fstype = parts[1];
        if (role.fstype != "ext4")
            throw Error("filesystem '" + role.fstype + "': only ext4 is supported (U-Boot reads it, OSTree's /boot needs symlinks)");
        if (role.label.size() > 16)
            throw Error("label '" + role.label + "' is longer than ext4's 16 characters");
        for (const auto& other : board.partitions)
            if (other.number == role.number)
                throw Error("partition " + std::to_string(role.number) + " is described twice");
        board.partitions.push_back(role);
    } else if (key == "boot_partition")
        board.boot_partition = parse_partition_number(value);
    else if (key == "rootfs_partition")
        board.rootfs_partition = parse_partition_number(value);
    else if (key == "mkfs.ext4") {
        // Only options that shape the file system: never one that copies
        // host files in (-d), reads a list from a host file (-l) or sets
        // what treeflash sets itself (-L).
        static const std::set<std::string> with_value = {"-b", "-O", "-i", "-I", "-m", "-N", "-T", "-g", "-G", "-J", "-E", "-e", "-C"};
        static const std::set<std::string> alone = {"-j", "-F", "-q", "-n"};
        board.mkfs_ext4_options = words(value);
        const auto& opts = board.mkfs_ext4_options;
        for (size_t i = 0; i < opts.size(); ++i) {
            if (alone.count(opts[i]) && opts[i] != "-n")
                continue;
            if (!with_value.count(opts[i]))
                throw Error("mkfs.ext4 option '" + opts[i] + "' is not allowed (allowed: -b -O -i -I -m -N -T -g -G -J -E -e -C -j)");
            if (++i == opts.size())
                throw Error("mkfs.ext4 option " + opts[i - 1] + " needs a value");
            for (char c : opts[i])
                if (!(std::isalnum(static_cast<unsigned char>(c)) || std::string("^,=_.-").find(c) != std::string::npos))
                    throw Error("mkfs.ext4 " + opts[i - 1] + " '" + opts[i] + "': unexpected character '" + c + "'");
            // Where the file system starts and what is random in it are
            // treeflash's to set: an offset= would put it over the table or
            // the firmware of an image.
            if (opts[i - 1] == "-E")
                for (const char* own : {"offset=", "hash_seed=", "root_owner"})
                    if (("," + opts[i]).find(std::string(",") + own) != std::string::npos)
                        throw Error("mkfs.ext4 -E '" + opts[i] + "': " + own + " is set by treeflash, not by a board");
        }
    }
    else if (starts("firmware.")) {
        auto parts = words(value);
        if (parts.size() != 2)
            throw Error("expected 'firmware.NAME = OFFSET MAX_SIZE'");
        FirmwareSlot slot{key.substr(9), parse_number(parts[0]), parse_number(parts[1])};
        if (slot.name.empty())
            throw Error("firmware slot without a name");
        if (slot.offset < 512)
            throw Error("firmware slot " + slot.name + " overlaps the partition table (offset < 512)");
        if (slot.max_size == 0)
            throw Error("firmware slot " + slot.name + " holds nothing (MAX_SIZE 0)");
        if (slot.offset + slot.max_size < slot.offset)
            throw Error("firmware slot " + slot.name + " ends past the largest disk");
        board.firmware.push_back(slot);
    } else if (key == "kernel_args") {
        board.kernel_args = words(value);
        for (const auto& arg : board.kernel_args)
            validate::kernel_arg(arg, "kernel_args");
    } else if (key == "boot_script") {
        // A file of the board folder, or the name of a bundled template.
        if (std::filesystem::path(value).is_absolute() || value.find("..") != std::string::npos)
            throw Error("boot_script '" + value + "': name a file inside the board folder or a template");
        if (std::filesystem::exists(std::filesystem::symlink_status(board.dir / value)))
            board_file(board, key, value);
        board.boot_script = value;
    } else if (key == "uboot.devtype") {
        validate::uboot_word(value, key);
        board.uboot_devtype = value;
    } else if (key == "uboot.devnum") {
        validate::uboot_word(value, key);
        board.uboot_devnum = value;
    } else if (key == "uboot.fdt_fallback") {
        validate::uboot_word(value, key);
        board.uboot_fdt_fallback = value;
    } else if (key == "image_size") {
        if (value != "any" && value != "power-of-two")
            throw Error("image_size '" + value + "': any or power-of-two");
        board.image_size_power_of_two = value == "power-of-two";
    } else if (key == "devicetree") {
        if (value != "optional" && value != "required")
            throw Error("devicetree '" + value + "': optional or required");
        board.devicetree_required = value == "required";
    } else if (starts("uboot.default.")) {
        std::string name = key.substr(14);
        validate::uboot_word(name, key);
        if (name.find_first_of("${}:/") != std::string::npos)
            throw Error("'" + name + "' is not a U-Boot variable name");
        validate::uboot_word(value, key);
        board.uboot_defaults[name] = value;
    }
    else if (key == "initramfs.modules")
        board.initramfs_modules = words(value);
    else if (key == "initramfs.on_failure") {
        if (value != "shell" && value != "poweroff" && value != "reboot")
            throw Error("initramfs.on_failure '" + value + "': shell, poweroff or reboot");
        board.initramfs_on_failure = value;
    } else if (key == "initramfs.root_wait") {
        uint64_t seconds = parse_number(value);
        if (seconds < 1 || seconds > 3600)
            throw Error("initramfs.root_wait " + value + ": 1 to 3600 seconds");
        board.initramfs_root_wait = static_cast<unsigned>(seconds);
    }
    else if (key == "boot_count.limit") {
        uint64_t limit = parse_number(value);
        // U-Boot's setexpr counts in hex and its test compares in decimal:
        // they agree on single digits, and the tries reach limit + 1.
        if (limit > 8)
            throw Error("boot_count.limit " + value + ": 0 (no counting) to 8 tries");
        board.boot_count.limit = static_cast<unsigned>(limit);
    } else if (key == "boot_count.state") {
        uint64_t offset = parse_number(value);
        if (offset < 512 || offset % 512)
            throw Error("boot_count.state " + value + ": a 512-byte block past the partition table (a multiple of 512)");
        board.boot_count.state_offset = offset;
    } else if (key == "boot_count.mark") {
        if (value != "rootfs-file")
            throw Error("boot_count.mark '" + value + "': only rootfs-file (a file on the rootfs partition U-Boot loads)");
        board.boot_count.mark = value;
    } else if (key == "uboot.env") {
        auto parts = words(value);
        if (parts.size() != 2)
            throw Error("expected 'uboot.env = SLOT FILE' (the firmware slot U-Boot keeps its environment in)");
        board.uboot_env = UbootEnvironment{parts[0], board_file(board, key, parts[1])};
    }
    else
        throw Error("unknown key '" + key + "'");
}

void check_complete(const BoardProfile& board)
{
    if (board.name.empty())
        throw Error("no 'name'");
    if (board.partition_table.empty())
        throw Error("no 'partition_table'");
    if (!std::filesystem::is_regular_file(board.partition_table))
        throw Error("partition_table " + board.partition_table.string() + " does not exist");
    if (!board.rootfs_partition)
        throw Error("no 'rootfs_partition'");
    if (!board.boot_partition)
        throw Error("no 'boot_partition'");
    board.partition(board.rootfs_partition);
    board.partition(board.boot_partition);
    if (board.boot_partition == board.rootfs_partition)
        throw Error("boot_partition and rootfs_partition are both " + std::to_string(board.boot_partition)
                    + ": formatting one would erase the other's files");
    if (board.boot_script.empty())
        throw Error("no 'boot_script'");
    if (board.uboot_devtype.empty())
        throw Error("no 'uboot.devtype'");
    if (board.uboot_env) {
        if (!board.slot(board.uboot_env->slot))
            throw Error("uboot.env names slot '" + board.uboot_env->slot + "', which no firmware.NAME line describes");
        if (!std::filesystem::is_regular_file(board.uboot_env->file))
            throw Error("uboot.env " + board.uboot_env->file.string() + " does not exist");
    }
    if (board.boot_count.enabled()) {
        const auto& count = board.boot_count;
        if (!count.state_offset)
            throw Error("boot_count.limit needs boot_count.state (where U-Boot keeps the tries)");
        for (const auto& slot : board.firmware)
            if (count.state_offset < slot.offset + slot.max_size && slot.offset < count.state_offset + 512)
                throw Error("boot_count.state overlaps firmware slot " + slot.name);
        // A trial that fails in the initramfs or panics must come back to
        // U-Boot by itself to be counted.
        if (board.initramfs_on_failure != "reboot")
            throw Error("boot_count.limit needs initramfs.on_failure = reboot: a shell or a power-off would hold a "
                        "failed trial forever");
        bool panic_reboots = false;
        for (const auto& arg : board.kernel_args)
            panic_reboots |= arg.rfind("panic=", 0) == 0 && arg != "panic=0";
        if (!panic_reboots)
            throw Error("boot_count.limit needs panic=SECONDS in kernel_args, so a kernel panic reboots into U-Boot");
    }
    // Firmware slots must not overlap each other.
    for (size_t i = 0; i < board.firmware.size(); ++i)
        for (size_t j = i + 1; j < board.firmware.size(); ++j) {
            const auto& a = board.firmware[i];
            const auto& b = board.firmware[j];
            if (a.offset < b.offset + b.max_size && b.offset < a.offset + a.max_size)
                throw Error("firmware slots " + a.name + " and " + b.name + " overlap");
        }
}

} // namespace

const PartitionRole& BoardProfile::partition(unsigned number) const
{
    for (const auto& role : partitions)
        if (role.number == number)
            return role;
    throw Error("board " + name + " does not describe partition " + std::to_string(number));
}

const FirmwareSlot* BoardProfile::slot(const std::string& slot_name) const
{
    for (const auto& s : firmware)
        if (s.name == slot_name)
            return &s;
    return nullptr;
}

std::vector<std::filesystem::path> board_search_path()
{
    std::vector<std::filesystem::path> dirs;
    if (const char* env = std::getenv("TREEFLASH_BOARD_PATH"); env && *env) {
        std::istringstream in(env);
        for (std::string dir; std::getline(in, dir, ':');)
            if (!dir.empty())
                dirs.emplace_back(dir);
    }
    std::error_code error;
    std::filesystem::path binary = std::filesystem::read_symlink("/proc/self/exe", error);
    if (!error) {
        // Run from the build tree of a checkout: the checkout's boards.
        // /proc/self/exe is the real path: compare it with the build
        // folder's, whatever symlink the build was made through.
        std::string build_dir = std::filesystem::weakly_canonical(TREEFLASH_BUILD_DIR, error).string();
        if (!error && binary.string().rfind(build_dir + "/", 0) == 0)
            dirs.emplace_back(TREEFLASH_CHECKOUT_BOARD_DIR);
        // Installed: beside the binary (/usr/bin -> /usr/share/treeflash/board,
        // wherever the tree was unpacked), then where it was built to go.
        dirs.push_back((binary.parent_path() / TREEFLASH_BOARDS_FROM_BINARY).lexically_normal());
    }
    if (std::find(dirs.begin(), dirs.end(), TREEFLASH_INSTALLED_BOARD_DIR) == dirs.end())
        dirs.emplace_back(TREEFLASH_INSTALLED_BOARD_DIR);
    return dirs;
}

BoardProfile load_board(const std::string& name_or_dir)
{
    std::filesystem::path dir;
    bool looks_like_path = name_or_dir.find('/') != std::string::npos || name_or_dir == "." || name_or_dir == "..";
    if (looks_like_path) {
        dir = name_or_dir;
        if (!std::filesystem::is_directory(dir))
            throw Error("board " + name_or_dir + ": no such directory");
    } else {
        std::string searched;
        for (const auto& candidate : board_search_path()) {
            searched += (searched.empty() ? "" : ", ") + candidate.string();
            if (std::filesystem::is_regular_file(candidate / name_or_dir / "board.conf")) {
                dir = candidate / name_or_dir;
                break;
            }
        }
        if (dir.empty())
            throw Error("unknown board '" + name_or_dir + "' (looked in " + searched + "; --board DIR takes a folder)");
    }
    BoardProfile board;
    board.dir = std::filesystem::absolute(dir);
    std::filesystem::path conf = board.dir / "board.conf";
    std::ifstream in(conf);
    if (!in)
        throw Error("board " + name_or_dir + ": cannot read " + conf.string());
    std::string line;
    std::map<std::string, int> seen; // key -> line
    for (int number = 1; std::getline(in, line); ++number) {
        std::string text = trim(line);
        if (text.empty() || text[0] == '#')
            continue;
        auto eq = text.find('=');
        if (eq == std::string::npos)
            throw Error(conf.string() + ":" + std::to_string(number) + ": expected KEY = VALUE");
        std::string key = trim(text.substr(0, eq));
        if (auto [it, fresh] = seen.emplace(key, number); !fresh)
            throw Error(conf.string() + ":" + std::to_string(number) + ": " + key + " is already set on line "
                        + std::to_string(it->second));
        try {
            apply_key(board, key, trim(text.substr(eq + 1)));
        } catch (const Error& e) {
            throw Error(conf.string() + ":" + std::to_string(number) + ": " + e.what());
        }
    }
    try {
        check_complete(board);
    } catch (const Error& e) {
        throw Error(conf.string() + ": " + e.what());
    }
    return board;
}

} // namespace treeflash::flasher
