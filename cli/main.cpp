// treeflash: turn a rootfs into an OSTree commit and put it on SD cards.
// This file only dispatches to the subcommands (one file each) and maps
// errors to exit codes; the work is done by the builder/ and flasher/ libraries.
#include "cli/command.hpp"
#include "common/error.hpp"
#include "common/glib.hpp"
#include "flasher/deploy/pull.hpp"
#include "flasher/deploy/sysroot.hpp"
#include "flasher/disk/mount.hpp"
#include "flasher/flash/flash.hpp"
#include "flasher/unprivileged/userns.hpp"
#include "treeflash_version.hpp"

#include <array>
#include <cerrno>
#include <csignal>
#include <fcntl.h>
#include <cstring>
#include <iostream>
#include <sys/stat.h>
#include <pthread.h>
#include <thread>
#include <unistd.h>

namespace treeflash::cli {

namespace {

constexpr std::array commands{
    Command{"build", "turn a rootfs directory or tarball into a commit in an OSTree repository", run_build},
    Command{"initramfs", "pack a board's initramfs (busybox, ostree-prepare-root, kernel modules)", run_initramfs},
    Command{"flash", "partition, format and deploy a commit onto a card or an image file", run_flash},
    Command{"upgrade", "pull and deploy the newer commit on a flashed card or image, keeping a rollback", run_upgrade},
    Command{"inspect", "show what is on a flashed card or image, without writing", run_inspect},
    Command{"write", "write one image to many cards at once, verified by reading them back", run_write},
    Command{"station", "a factory's card writer: slots watched for cards, each written, verified, given its unit, logged", run_station},
    Command{"line", "the stations of a line on one PostgreSQL database: units in, status, report out", run_line},
    Command{"bmap", "write the block map (bmap 2.0) of an image: its data blocks and their checksums", run_bmap},
};

void print_usage(std::ostream& out)
{
    out << "Usage: treeflash COMMAND [OPTIONS]\n\n"
           "Builds OSTree commits from busybox root filesystems and puts them on SD cards.\n\n"
           "Commands:\n";
    for (const auto& command : commands)
        out << "  " << command.name << std::string(10 - std::strlen(command.name), ' ') << command.summary << "\n";
    out << "\nGlobal options:\n"
           "  -h, --help     show this help (or COMMAND --help for a command's options)\n"
           "  --version      print the version\n\n"
           "Example:\n"
           "  treeflash build --rootfs rootfs/ --repo repo --kernel Image --devicetree board.dtb\n"
           "  treeflash flash --board ls104x --image card.img --repo repo\n"
           "  treeflash inspect card.img\n\n"
           "Exit status: 0 success, 1 failure, 2 bad command line, 130 interrupted.\n";
}

// SIGINT, SIGTERM and SIGHUP cancel the running command: libostree calls, child
// processes and the pipeline's own loops watch the cancellable, and every
// resource is released on the way out. Further signals do not cut that
// short (an exit then would leave mounts, loop devices and partial files):
// they only say that cleanup is under way. Leftovers of a process killed
// with SIGKILL are found and removed by the next run on the same target.
class InterruptHandler {
public:
    explicit InterruptHandler(GCancellable* cancellable)
    {
        sigset_t signals;
        sigemptyset(&signals);
        sigaddset(&signals, SIGINT);
        sigaddset(&signals, SIGTERM);
        sigaddset(&signals, SIGHUP); // the terminal or the CI runner went away
        pthread_sigmask(SIG_BLOCK, &signals, nullptr);
        // Lives until the process exits; it only ever waits for signals.
        std::thread([signals, cancellable] {
            int count = 0;
            for (;;) {
                int sig = 0;
                if (sigwait(&signals, &sig) != 0)
                    continue;
                if (++count > 1) {
                    const char message[] = "treeflash: interrupted; cleaning up (unmounting, detaching, removing partial files)\n";
                    [[maybe_unused]] auto ignored = ::write(2, message, sizeof message - 1);
                    continue;
                }
                g_cancellable_cancel(cancellable);
            }
        }).detach();
    }
};

} // namespace

bool parse_options(const std::vector<std::string>& args, const boost::program_options::options_description& options,
                   const boost::program_options::positional_options_description* positional)
{
    namespace po = boost::program_options;
    po::variables_map vm;
    try {
        po::command_line_parser parser(args);
        parser.options(options);
        if (positional)
            parser.positional(*positional);
        po::store(parser.run(), vm);
        po::notify(vm);
    } catch (const po::error& e) {
        throw UsageError(e.what());
    }
    if (vm.count("help")) {
        std::cout << options << "\n";
        return false;
    }
    return true;
}

uint64_t parse_count(const std::string& text, const std::string& option, uint64_t min, uint64_t max)
{
    std::string range = std::to_string(min) + " to " + std::to_string(max);
    if (text.empty() || text.size() > 19 || text.find_first_not_of("0123456789") != std::string::npos)
        throw UsageError(option + " '" + text + "': a whole number from " + range);
    uint64_t value = std::stoull(text);
    if (value < min || value > max)
        throw UsageError(option + " " + text + ": out of range (" + range + ")");
    return value;
}

std::string mib(uint64_t bytes)
{
    return std::to_string(bytes / (1 << 20)) + " MiB";
}

nlohmann::json deployment_json(const flasher::Deployment& d)
{
    return {{"os", d.os},
            {"commit", d.commit},
            {"version", d.version},
            {"serial", d.deploy_serial},
            {"bootcsum", d.bootcsum},
            {"ostree", d.ostree_path},
            {"origin", d.origin_refspec},
            {"kernel_args", d.kernel_args}};
}

void print_warning(const std::string& text)
{
    std::cerr << "treeflash: warning: " << text << "\n";
}

void print_error(const std::string& text)
{
    std::cerr << "treeflash: error: " << text << "\n";
}

void print_notice(const std::string& text)
{
    std::cerr << "treeflash: " << text << "\n";
}

void print_json(const nlohmann::json& value)
{
    // Strings read from a card or image need not be UTF-8: such bytes are
    // shown as U+FFFD rather than failing the whole report.
    std::cout << value.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
}

int main(int argc, char** argv)
{
    // Whoever started treeflash may have closed its standard descriptors:
    // the first files it opens would take their numbers, and a child's
    // stdin or stdout would be one of them. /dev/null takes them instead.
    for (int fd = 0; fd < 3; ++fd)
        if (::fcntl(fd, F_GETFD) < 0 && errno == EBADF && ::open("/dev/null", O_RDWR) != fd)
            return 1;
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
        print_usage(args.empty() ? std::cerr : std::cout);
        return args.empty() ? 2 : 0;
    }
    if (args[0] == "--version") {
        std::cout << "treeflash " TREEFLASH_VERSION " (commit " TREEFLASH_COMMIT ")\n";
        return 0;
    }
    // Steps that run in a process of their own re-execute treeflash with
    // an internal command; nobody types these.
    if (args[0] == flasher::pull_helper_command)
        return flasher::run_pull_helper({args.begin() + 1, args.end()});
    if (args[0] == flasher::image_trees_command)
        return flasher::run_image_trees_helper({args.begin() + 1, args.end()});
    if (args[0] == flasher::namespace_check_command)
        return flasher::run_namespace_check();
    const Command* command = nullptr;
    for (const auto& candidate : commands)
        if (args[0] == candidate.name)
            command = &candidate;
    if (!command) {
        std::cerr << "treeflash: unknown command '" << args[0] << "' (see treeflash --help)\n";
        return 2;
    }

    // flash and upgrade mount cards as root: in a mount namespace of their
    // own, entered before the first thread starts, nothing stays mounted
    // (or attached under a mount) even after a SIGKILL.
    if (::geteuid() == 0 && (command->name == std::string_view("flash") || command->name == std::string_view("upgrade")))
        flasher::enter_own_mount_namespace();
    // A flash deploys onto a card nothing runs from yet (also in the helper
    // that makes an image without root, which inherits this).
    if (command->name == std::string_view("flash"))
        flasher::skip_global_sync_when_deploying();

    // libostree reports some things with g_print ("Freed objects: ..."):
    // keep stdout for the command's own output.
    g_set_print_handler([](const char* text) {
        std::cerr << "treeflash: " << text << (text[0] && text[std::strlen(text) - 1] == '\n' ? "" : "\n");
    });
    // What treeflash makes (repositories, images, the file systems in them
    // and the deployments a board runs) is read by servers, boards and other
    // users: its modes must not depend on the umask of whoever ran it
    // (umask 077 would make a deployment's /var 0700, and no image equal).
    ::umask(022);
    // Never freed: the signal thread may use it until the process exits.
    GCancellable* cancellable = g_cancellable_new();
    InterruptHandler interrupts(cancellable);
    std::vector<std::string> rest(args.begin() + 1, args.end());
    try {
        return command->run(rest, cancellable);
    } catch (const UsageError& e) {
        std::cerr << "treeflash " << command->name << ": " << e.what() << " (see treeflash " << command->name
                  << " --help)\n";
        return 2;
    } catch (const Cancelled& e) {
        std::cerr << "treeflash " << command->name << ": " << e.what() << "\n";
        return 130;
    } catch (const std::exception& e) {
        std::cerr << "treeflash " << command->name << ": " << e.what() << "\n";
        return 1;
    }
}

} // namespace treeflash::cli

int main(int argc, char** argv)
{
    return treeflash::cli::main(argc, argv);
}
