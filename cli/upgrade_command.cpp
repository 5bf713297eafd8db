// treeflash upgrade: flasher::upgrade on a card or image -> report.
#include "cli/command.hpp"
#include "common/error.hpp"
#include "flasher/deploy/upgrade.hpp"

#include <boost/program_options.hpp>
#include <iostream>

namespace po = boost::program_options;

namespace treeflash::cli {

namespace {

const char* upgrade_usage = R"(Usage: treeflash upgrade DEVICE|IMAGE [--repo PATH|URL] [--ref REF] [--karg ARG]... [--json]

Does on a flashed card what `ostree admin upgrade` does on the board: pulls
the newer commit of the default deployment's origin (over HTTP from the
origin remote's URL unless --repo says otherwise; the remote's GPG settings
apply), deploys it with local /etc changes merged and /var kept, keeps the
previous deployment for rollback, and leaves uEnv.txt pointing at the new
one. On a board that counts boots the deployment kept for rollback is the
known-good one: after a rollback the failed default is dropped. A card in
use (mounted, held, or under a loop device that is), or whose sysroot links
lead off the card, is refused. A local --repo that another user owns or may
write is pulled with every object checked. Needs root.

Examples:
  treeflash upgrade /dev/sdb
  treeflash upgrade card.img --repo http://10.0.0.2:8000/ --ref stable

Options)";

} // namespace

int run_upgrade(const std::vector<std::string>& args, GCancellable* cancellable)
{
    flasher::UpgradeOptions options;
    std::string repo, ref, network_timeout;
    bool json = false;
    po::options_description desc(upgrade_usage);
    desc.add_options()
        ("help,h", "show this help")
        ("target", po::value(&options.target)->value_name("DEVICE|IMAGE"), "the flashed card or image")
        ("repo", po::value(&repo)->value_name("PATH|URL"), "pull from here instead of the origin remote's URL")
        ("ref", po::value(&ref)->value_name("REF"), "switch to this ref of the same remote")
        ("network-timeout", po::value(&network_timeout)->value_name("SECONDS"),
         "give up the pull after this long without any data (default 30)")
        ("karg", po::value(&options.kernel_args_append)->value_name("ARG")->composing(),
         "add a kernel argument to the inherited ones for the new deployment; repeatable")
        ("json", po::bool_switch(&json), "print the result as JSON on stdout");
    po::positional_options_description positional;
    positional.add("target", 1);
    if (!parse_options(args, desc, &positional))
        return 0;
    if (options.target.empty())
        throw UsageError("name a DEVICE or IMAGE");
    if (!repo.empty())
        options.repo = repo;
    if (!ref.empty())
        options.ref = ref;
    if (!network_timeout.empty())
        options.network_timeout = static_cast<unsigned>(parse_count(network_timeout, "--network-timeout", 1, 86400));
    options.notice = print_notice;

    flasher::UpgradeResult result =
        in_step("upgrade " + options.target, [&] { return flasher::upgrade(options, cancellable); });
    if (json) {
        nlohmann::json deployments = nlohmann::json::array();
        for (const auto& d : result.deployments)
            deployments.push_back(deployment_json(d));
        print_json({{"target", options.target}, {"changed", result.changed}, {"previous", deployment_json(result.previous)},
                    {"current", deployment_json(result.current)}, {"fallback", deployment_json(result.fallback)},
                    {"fallback_reason", result.fallback_reason}, {"deployments", deployments}});
    } else if (!result.changed) {
        std::cout << options.target << ": already at " << result.current.commit << "\n";
    } else {
        std::cout << options.target << ": upgraded " << result.previous.commit.substr(0, 12) << " -> "
                  << result.current.commit << (result.current.version.empty() ? "" : " (version " + result.current.version + ")")
                  << "\n  ostree=" << result.current.ostree_path << "\n  rollback: " << result.fallback.commit
                  << (result.fallback_reason.empty() ? "" : "\n  (" + result.fallback_reason + ")") << "\n";
    }
    return 0;
}

} // namespace treeflash::cli
