#include "common/validate.hpp"

#include "common/error.hpp"

#include <string>

namespace treeflash::validate {

namespace {

bool is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

[[noreturn]] void refuse(std::string_view option, std::string_view value, std::string_view why)
{
    std::string shown;
    for (char c : value)
        shown += (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) ? '?' : c;
    throw Error(std::string(option) + " '" + shown + "': " + std::string(why));
}

bool has_control(std::string_view value)
{
    for (char c : value)
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
            return true;
    return false;
}

} // namespace

void os_name(std::string_view name, std::string_view option)
{
    if (name.empty() || name.size() > 64)
        refuse(option, name, "an OS name has 1 to 64 characters");
    for (char c : name)
        if (!is_name_char(c))
            refuse(option, name, "an OS name holds only letters, digits, '.', '_' and '-'");
    if (name[0] == '.' || name[0] == '-')
        refuse(option, name, "an OS name does not start with '.' or '-'");
}

void ref(std::string_view value, std::string_view option)
{
    if (value.empty() || value.size() > 255)
        refuse(option, value, "a ref has 1 to 255 characters");
    if (value[0] == '-')
        refuse(option, value, "a ref does not start with '-'");
    // OSTree reads 64 hex digits as a commit, not as a ref's name.
    if (value.size() == 64 && value.find_first_not_of("0123456789abcdef") == std::string_view::npos)
        refuse(option, value, "a ref names a branch; this is a commit checksum");
    size_t start = 0;
    for (;;) {
        size_t end = value.find('/', start);
        std::string_view part = value.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start);
        if (part.empty() || part == "." || part == "..")
            refuse(option, value, "a ref is names separated by single '/', none of them '.' or '..'");
        for (char c : part)
            if (!is_name_char(c))
                refuse(option, value, "a ref holds only letters, digits, '.', '_', '-' and '/'");
        if (end == std::string_view::npos)
            break;
        start = end + 1;
    }
}

void kernel_arg(std::string_view arg, std::string_view option)
{
    if (arg.empty())
        refuse(option, arg, "an empty kernel argument");
    for (char c : arg) {
        if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) >= 0x7f)
            refuse(option, arg, "a kernel argument is one word of printable ASCII (no space, newline or control character)");
        if (c == '"' || c == '\'' || c == '\\' || c == '$' || c == ';')
            refuse(option, arg, std::string("a kernel argument may not hold ") + c
                                    + " (it is copied into uEnv.txt and U-Boot commands)");
    }
}

void kernel_command_line(const std::vector<std::string>& args, std::string_view option)
{
    size_t length = 0;
    for (const auto& arg : args)
        length += arg.size() + 1;
    size_t room = kernel_command_line_size - 1 - kernel_command_line_reserve;
    if (length > room)
        throw Error(std::string(option) + ": the kernel command line would be " + std::to_string(length)
                    + " bytes; arm64 takes " + std::to_string(kernel_command_line_size - 1) + ", of which "
                    + std::to_string(kernel_command_line_reserve) + " stay for ostree= and boot counting, so at most "
                    + std::to_string(room) + " for these arguments: this would not boot");
}

void url(std::string_view value, std::string_view option)
{
    if (!(value.rfind("http://", 0) == 0 || value.rfind("https://", 0) == 0 || value.rfind("file://", 0) == 0))
        refuse(option, value, "expected an http://, https:// or file:// URL");
    for (char c : value)
        if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f)
            refuse(option, value, "a URL holds no spaces or control characters");
    size_t host = value.find("://") + 3;
    if (value.rfind("file://", 0) != 0 && (host >= value.size() || value[host] == '/'))
        refuse(option, value, "the URL names no host");
}

void single_line(std::string_view value, std::string_view option)
{
    if (has_control(value))
        refuse(option, value, "a newline or control character would start another line");
}

void uboot_word(std::string_view word, std::string_view option)
{
    if (word.empty())
        refuse(option, word, "empty");
    for (char c : word)
        if (!(is_name_char(c) || c == ':' || c == '/' || c == '$' || c == '{' || c == '}'))
            refuse(option, word, "a U-Boot script word holds only letters, digits and _.:/-${}");
}

} // namespace treeflash::validate
