// What every subcommand file provides, and the helpers they share.
#pragma once

#include "flasher/deploy/sysroot.hpp"

#include <boost/program_options.hpp>
#include <gio/gio.h>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace treeflash::cli {

struct Command {
    const char* name;
    const char* summary;
    // args excludes the program and command names; returns the exit code.
    int (*run)(const std::vector<std::string>& args, GCancellable* cancellable);
};

int run_build(const std::vector<std::string>& args, GCancellable* cancellable);
int run_flash(const std::vector<std::string>& args, GCancellable* cancellable);
int run_initramfs(const std::vector<std::string>& args, GCancellable* cancellable);
int run_upgrade(const std::vector<std::string>& args, GCancellable* cancellable);
int run_inspect(const std::vector<std::string>& args, GCancellable* cancellable);
int run_bmap(const std::vector<std::string>& args, GCancellable* cancellable);
int run_write(const std::vector<std::string>& args, GCancellable* cancellable);
int run_station(const std::vector<std::string>& args, GCancellable* cancellable);
int run_line(const std::vector<std::string>& args, GCancellable* cancellable);

// Thrown for bad command lines: printed with a hint to --help, exit 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Parses a subcommand's arguments (with "help" among the options). Returns
// false after printing the help for --help; throws UsageError on mistakes.
bool parse_options(const std::vector<std::string>& args, const boost::program_options::options_description& options,
                   const boost::program_options::positional_options_description* positional = nullptr);

// A whole decimal number from `min` to `max` for `option`; UsageError otherwise
// ("-1", "1e3", "99999999999999999999" and the like).
uint64_t parse_count(const std::string& text, const std::string& option, uint64_t min, uint64_t max);

// "512 MiB": sizes as every command prints them.
std::string mib(uint64_t bytes);

// A deployment as every command's --json shows it.
nlohmann::json deployment_json(const flasher::Deployment& d);

void print_warning(const std::string& text);
// An error that does not stop the command (its exit status says it failed).
void print_error(const std::string& text);
void print_notice(const std::string& text);
void print_json(const nlohmann::json& value);

} // namespace treeflash::cli
