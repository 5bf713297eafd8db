// End to end: the board updates itself. QEMU gives the board a network card
// (scripts/qemu-boot --net); it reaches the tests' nginx on the host's
// 127.0.0.1 as 10.0.2.2. The commits carry Debian's ostree and gpg (build
// --program) and the updater treeflash build adds; the console, the card
// (`treeflash inspect`) and nginx's access log must tell the same story.
#include "tests/e2e/e2e.hpp"

#include <arpa/inet.h>
#include <cstdio>
#include <ctime>
#include <doctest/doctest.h>
#include <functional>
#include <netinet/in.h>
#include <nlohmann/json.hpp>
#include <regex>
#include <sys/socket.h>
#include <unistd.h>

using namespace treeflash;
using namespace treeflash::test;
using namespace treeflash::test::e2e;
using nlohmann::json;

namespace {

// A port on 127.0.0.1 that accepts connections and never answers.
class SilentServer {
public:
    SilentServer()
    {
        m_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        REQUIRE(m_fd >= 0);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        REQUIRE(::bind(m_fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
        REQUIRE(::listen(m_fd, 64) == 0);
        socklen_t len = sizeof addr;
        REQUIRE(::getsockname(m_fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
        m_url = "http://127.0.0.1:" + std::to_string(ntohs(addr.sin_port)) + "/";
    }
    ~SilentServer() { ::close(m_fd); }
    SilentServer(const SilentServer&) = delete;
    SilentServer& operator=(const SilentServer&) = delete;
    const std::string& url() const { return m_url; }

private:
    int m_fd = -1;
    std::string m_url;
};

// What libostree fetched, from nginx's access log.
struct Fetched {
    uint64_t bytes = 0;
    size_t requests = 0, delta_parts = 0, content_objects = 0;
};

Fetched fetched(const std::string& log)
{
    Fetched f;
    static const std::regex line(R"re("GET ([^ ]+) HTTP/[0-9.]+" ([0-9]+) ([0-9]+) "libostree)re");
    for (auto it = std::sregex_iterator(log.begin(), log.end(), line); it != std::sregex_iterator(); ++it) {
        const std::smatch& m = *it;
        if (m[2] != "200")
            continue;
        ++f.requests;
        f.bytes += std::stoull(m[3]);
        std::string path = m[1];
        f.delta_parts += path.rfind("/deltas/", 0) == 0;
        f.content_objects += path.find(".filez") != std::string::npos;
    }
    return f;
}

// A release line of commits that can update a board: the e2e rootfs with
// Debian's ostree and gpg, the updater's settings, and how many of its
// checks a boot waits for before it powers off.
struct Releases {
    Scratch tmp;
    fs::path repo = tmp / "repo";
    fs::path initramfs = initramfs_for(tmp.path(), "qemu-arm64");

    std::string release(const std::string& version, const std::string& settings, int checks,
                        const std::vector<std::string>& extra = {},
                        const std::function<void(const fs::path&)>& change = {})
    {
        fs::path rootfs = tmp / ("rootfs-" + version);
        fs::remove_all(rootfs);
        // One file differs between releases: the motd.
        make_e2e_rootfs(rootfs, "v" + version, "motd v" + version);
        write_file(rootfs / "etc/treeflash/auto-update.conf", settings);
        write_file(rootfs / "etc/e2e-update-checks", std::to_string(checks) + "\n");
        if (change)
            change(rootfs);
        std::vector<std::string> args{"--userland", (example / "userland").string(), "--program", "usr/bin/ostree",
                                      "--program", "usr/bin/gpg"};
        args.insert(args.end(), extra.begin(), extra.end());
        return commit(rootfs, repo, initramfs, version, args);
    }

    fs::path flash(const std::string& origin, const std::vector<std::string>& extra = {"--no-gpg-verify"})
    {
        fs::path image = tmp / "disk.img";
        std::vector<std::string> args{"flash", "--board", "qemu-arm64", "--image", image.string(), "--overwrite",
                                      "--repo", repo.string(), "--remote-url", board_url(origin)};
        args.insert(args.end(), extra.begin(), extra.end());
        auto r = run_treeflash(args);
        REQUIRE_MESSAGE(r.ok(), r.err);
        return image;
    }
};

// Boots with a network card until the system shows E2E-DONE, through any
// reboots the updater or boot counting make.
Boot boot_online(const fs::path& image, const std::vector<std::string>& extra = {})
{
    std::vector<std::string> args{"--net", "--reboots", "--timeout", "240"};
    args.insert(args.end(), extra.begin(), extra.end());
    Boot b = boot(image, args);
    REQUIRE_MESSAGE(b.status == 0, b.console);
    return b;
}

std::string short_commit(const std::string& commit) { return commit.substr(0, 12); }

// `bytes` of deterministic noise (it does not compress).
std::string noise(size_t bytes)
{
    std::string out(bytes, '\0');
    uint32_t x = 2463534242u;
    for (auto& c : out) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        c = static_cast<char>(x);
    }
    return out;
}

} // namespace

TEST_SUITE("update") {

TEST_CASE("the board finds v2 on the server, deploys it, reboots, and v2 becomes known good; then v3 comes as a delta"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Releases line;
    // Each release changes 16 bytes of a 2 MiB data file (and its version
    // and motd files): the bytes a board fetches for it, with and without a
    // delta, are the figures README gives.
    std::string data = noise(2u << 20);
    auto patch = [&](size_t at, const std::string& version) {
        return [&data, at, version](const fs::path& rootfs) {
            data.replace(at, 16, std::string(16, version[0]));
            write_file(rootfs / "usr/share/e2e-data", data);
        };
    };
    line.release("1", quick_updates, 1, {}, patch(0, "1"));
    RepoServer server(line.repo);
    fs::path image = line.flash(server.url());
    std::string v2 = line.release("2", quick_updates, 1, {}, patch(1u << 20, "2"));

    Boot b = boot_online(image);
    CHECK(b.line("E2E-VERSION") == "v1");
    CHECK(b.console.find("network: eth0 is 10.0.2.15 (DHCP)") != std::string::npos);
    CHECK(b.console.find("treeflash-update: pulling " + short_commit(v2) + " from origin:master") != std::string::npos);
    CHECK(b.console.find("treeflash-update: deployed: " + short_commit(v2)) != std::string::npos);
    CHECK(b.console.find("treeflash: trial boot 1 of 3 of the current deployment") != std::string::npos);
    CHECK(b.console.find("passed its health checks on trial boot 1 of 3: it is now known good") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v2");
    CHECK(b.last_line("E2E-UPDATE") == "up-to-date");

    json state = inspect(image);
    CHECK(state["deployments"][0]["commit"] == v2);
    CHECK(state["deployments"][0]["boot_state"] == "known good");
    CHECK(state["auto_update"]["outcome"] == "up-to-date");
    CHECK(state["auto_update"]["booted"] == v2);
    Fetched plain = fetched(server.access_log());
    CHECK(plain.content_objects > 0);
    CHECK(plain.delta_parts == 0);

    // v3 changes the data file as v2 did, and the server has a delta to it
    // from v2: the board fetches the delta, not the objects.
    size_t log_before = server.access_log().size();
    std::string v3 = line.release("3", quick_updates, 1, {"--static-deltas", "1"}, patch(3u << 19, "3"));
    b = boot_online(image);
    CHECK(b.line("E2E-VERSION") == "v2");
    CHECK(b.last_line("E2E-VERSION") == "v3");
    CHECK(b.last_line("E2E-UPDATE") == "up-to-date");
    Fetched delta = fetched(server.access_log().substr(log_before));
    CHECK(delta.delta_parts > 0);
    CHECK(delta.content_objects == 0);
    CHECK(inspect(image)["deployments"][0]["commit"] == v3);
    CHECK(delta.bytes < plain.bytes / 10);
    MESSAGE("16 bytes of a 2 MiB file changed: " << plain.bytes << " bytes in " << plain.requests
                                                << " requests as objects, " << delta.bytes << " bytes in "
                                                << delta.requests << " requests as a static delta");
}

TEST_CASE("a GPG-signed line: a commit signed by another key is refused on the board, one signed by the key is taken"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Releases line;
    GpgAgents agents{{line.tmp / "gpg-release", line.tmp / "gpg-other"}};
    std::string release_key = gpg_key(line.tmp / "gpg-release", "release");
    std::string other_key = gpg_key(line.tmp / "gpg-other", "other");
    auto signed_by = [&](const std::string& key, const fs::path& home) {
        return std::vector<std::string>{"--gpg-sign", key, "--gpg-homedir", home.string()};
    };
    std::string v1 = line.release("1", quick_updates, 1, signed_by(release_key, line.tmp / "gpg-release"));
    auto exported = run_process({"gpg", "--homedir", (line.tmp / "gpg-release").string(), "--export", "--output",
                                 (line.tmp / "release.gpg").string(), release_key});
    REQUIRE_MESSAGE(exported.ok(), exported.err);
    RepoServer server(line.repo);
    fs::path image = line.flash(server.url(), {"--gpg-import", (line.tmp / "release.gpg").string()});
    CHECK(inspect(image)["origin_gpg_verify"] != "false");

    std::string forged = line.release("2", quick_updates, 1, signed_by(other_key, line.tmp / "gpg-other"));
    Boot b = boot_online(image);
    CHECK(b.last_line("E2E-VERSION") == "v1");
    CHECK(b.last_line("E2E-UPDATE") == "failed");
    CHECK(b.console.find("treeflash-update: failed: cannot check origin:master, staying on " + short_commit(v1))
          != std::string::npos);
    CHECK(b.console.find("public key not found") != std::string::npos);
    CHECK(b.console.find("treeflash-update: deploying") == std::string::npos);
    json state = inspect(image);
    CHECK(state["deployments"].size() == 1);
    CHECK(state["auto_update"]["outcome"] == "failed");

    std::string v3 = line.release("3", quick_updates, 1, signed_by(release_key, line.tmp / "gpg-release"));
    b = boot_online(image);
    CHECK(b.line("E2E-VERSION") == "v1");
    CHECK(b.last_line("E2E-VERSION") == "v3");
    CHECK(b.last_line("E2E-UPDATE") == "up-to-date");
    CHECK(inspect(image)["deployments"][0]["commit"] == v3);
}

TEST_CASE("the server is silent or down: the board stays on v1, says why, and tries again" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Releases line;
    std::string settings = "interval=3600\nretry=2\ntimeout=4\n";
    std::string v1 = line.release("1", settings, 2);
    SilentServer silent;
    fs::path image = line.flash(silent.url());
    Boot b = boot_online(image);
    CHECK(b.last_line("E2E-VERSION") == "v1");
    CHECK(count(b.console, "treeflash-update: failed: cannot check origin:master, staying on " + short_commit(v1)
                               + ": no answer within 4s")
          == 2);
    CHECK(b.console.find("E2E-UPDATE-FILE: checks=2") != std::string::npos);

    // Nothing listens on the port any more: refused at once, and again.
    std::string closed = silent.url();
    { SilentServer gone; closed = gone.url(); }
    auto set = run_treeflash({"flash", "--board", "qemu-arm64", "--image", image.string(), "--overwrite", "--repo",
                              line.repo.string(), "--remote-url", board_url(closed), "--no-gpg-verify"});
    REQUIRE_MESSAGE(set.ok(), set.err);
    b = boot_online(image);
    CHECK(b.last_line("E2E-VERSION") == "v1");
    CHECK(count(b.console, "treeflash-update: failed: cannot check origin:master") == 2);
    CHECK(b.console.find("no answer within") == std::string::npos);
    CHECK(b.console.find("Couldn't connect to server") != std::string::npos);
    json state = inspect(image);
    CHECK(state["auto_update"]["outcome"] == "failed");
    CHECK(state["auto_update"]["checks"] == "2");
}

TEST_CASE("v2 fails its health check and rolls back; the board does not take v2 again, and takes v3"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Releases line;
    std::string v1 = line.release("1", quick_updates, 1);
    RepoServer server(line.repo);
    fs::path image = line.flash(server.url());
    std::string v2 = line.release("2", quick_updates, 1, {}, [](const fs::path& rootfs) {
        write_file(rootfs / "etc/treeflash/health.d/10-fails", "#!/bin/sh\necho E2E-HEALTH-FAILS\nexit 1\n", 0755);
    });

    Boot b = boot_online(image);
    CHECK(b.console.find("treeflash-update: deployed: " + short_commit(v2)) != std::string::npos);
    CHECK(count(b.console, "E2E-HEALTH-FAILS") == 3);
    CHECK(b.console.find("treeflash: the current deployment failed 3 tries; rolling back") != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v1");
    CHECK(b.last_line("E2E-BOOT-STATE") == "rolled-back");
    CHECK(b.console.find("treeflash-update: " + short_commit(v2) + " rolled back on this board: it is not deployed again")
          != std::string::npos);
    CHECK(b.last_line("E2E-UPDATE") == "refused");
    CHECK(count(b.console, "treeflash-update: pulling") == 1);
    json state = inspect(image);
    CHECK(state["auto_update"]["refused"] == v2);
    CHECK(state["deployments"][1]["commit"] == v1);

    // Booted again, the board still refuses v2 (remembered on the card).
    b = boot_online(image);
    CHECK(b.last_line("E2E-UPDATE") == "refused");
    CHECK(b.console.find("treeflash-update: pulling") == std::string::npos);

    // v3 moves the branch on: taken, and known good.
    std::string v3 = line.release("3", quick_updates, 1);
    b = boot_online(image);
    CHECK(b.console.find("treeflash-update: origin:master moved on from " + short_commit(v2)) != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v3");
    CHECK(b.last_line("E2E-UPDATE") == "up-to-date");
    state = inspect(image);
    CHECK(state["deployments"][0]["commit"] == v3);
    CHECK(state["deployments"][0]["boot_state"] == "known good");
    CHECK(state["auto_update"]["refused"] == "");
}

TEST_CASE("power cut while the board pulls, then while it deploys: v1 runs on, and a later update succeeds"
          * doctest::skip(not_root))
{
    NoLeftovers guard;
    Releases line;
    // The pull of 24 MB under emulation on a busy machine may take longer
    // than the quick settings' 20 s (the last line of a setting wins).
    const std::string settings = quick_updates + "timeout=120\n";
    std::string v1 = line.release("1", settings, 1);
    RepoServer server(line.repo);
    fs::path image = line.flash(server.url());
    // A release with 24 MB of new content, so the pull takes a while.
    std::string v2 = line.release("2", settings, 1, {}, [](const fs::path& rootfs) {
        write_file(rootfs / "usr/share/e2e-blob", noise(24u << 20));
    });

    Boot b = boot_online(image, {"--kill-at", "treeflash-update: pulling"});
    CHECK(b.console.find("treeflash-update: deploying") == std::string::npos);
    b = boot_online(image, {"--kill-at", "treeflash-update: deploying"});
    CHECK(b.line("E2E-VERSION") == "v1");
    CHECK(b.console.find("treeflash-update: deployed") == std::string::npos);
    json state = inspect(image);
    CHECK(state["deployments"][0]["commit"] == v1);

    b = boot_online(image);
    CHECK(b.line("E2E-VERSION") == "v1");
    auto updater_said = b.console.find("E2E-UPDATE-FILE: message=");
    CHECK_MESSAGE(b.console.find("treeflash-update: deployed: " + short_commit(v2)) != std::string::npos,
                  (updater_said == std::string::npos ? std::string("no updater state")
                                                     : b.console.substr(updater_said, b.console.find('\n', updater_said) - updater_said)));
    CHECK(b.last_line("E2E-VERSION") == "v2");
    CHECK(b.last_line("E2E-UPDATE") == "up-to-date");
    state = inspect(image);
    CHECK(state["deployments"][0]["commit"] == v2);
    CHECK(state["deployments"][0]["boot_state"] == "known good");
    CHECK(state["deployments"][1]["commit"] == v1);
}

TEST_CASE("reboot policies: never waits for someone else's reboot, window waits for its hours" * doctest::skip(not_root))
{
    NoLeftovers guard;
    Releases line;
    line.release("1", quick_updates + "reboot=never\n", 1);
    RepoServer server(line.repo);
    fs::path image = line.flash(server.url());

    // The board's clock is the host's (UTC): a window that opens in two hours
    // and one that is open now.
    auto window_from = [](int minutes_from_now, int length) {
        std::time_t now = std::time(nullptr) + minutes_from_now * 60;
        std::tm start{}, end{};
        gmtime_r(&now, &start);
        std::time_t later = now + length * 60;
        gmtime_r(&later, &end);
        char text[32];
        std::snprintf(text, sizeof text, "%02d:%02d-%02d:%02d", start.tm_hour, start.tm_min, end.tm_hour, end.tm_min);
        return std::string(text);
    };
    std::string later = window_from(120, 60);
    std::string v2 = line.release("2", quick_updates + "reboot=window\nreboot_window=" + later + "\n", 1);

    // reboot=never (v1's setting): deployed, and the board keeps running v1.
    Boot b = boot_online(image, {"--marker", "reboot=never: it runs from the next reboot"});
    CHECK(b.console.find("treeflash-update: deployed: " + short_commit(v2)) != std::string::npos);
    CHECK(b.console.find("treeflash-update: rebooting") == std::string::npos);
    json state = inspect(image);
    CHECK(state["deployments"][0]["commit"] == v2);
    CHECK(state["deployments"][0]["boot_state"] == "trial");
    CHECK(state["auto_update"]["outcome"] == "deployed");

    // The next reboot, whoever makes it, runs v2's trial; v2's own setting
    // (window, two hours away) then holds v3 until the window opens.
    std::string v3 = line.release("3", quick_updates + "reboot=window\nreboot_window=" + window_from(-1, 10) + "\n", 1);
    b = boot_online(image, {"--marker", "rebooting in the window " + later});
    CHECK(b.line("E2E-VERSION") == "v2");
    CHECK(b.console.find("treeflash-update: deployed: " + short_commit(v3)) != std::string::npos);
    CHECK(b.console.find("treeflash-update: rebooting into") == std::string::npos);

    // v3's window is open now: v4 is deployed and rebooted into at once.
    std::string v4 = line.release("4", quick_updates, 1);
    b = boot_online(image);
    CHECK(b.line("E2E-VERSION") == "v3");
    CHECK(b.console.find("treeflash-update: rebooting into " + short_commit(v4)) != std::string::npos);
    CHECK(b.last_line("E2E-VERSION") == "v4");
    CHECK(b.last_line("E2E-UPDATE") == "up-to-date");
}

} // TEST_SUITE
