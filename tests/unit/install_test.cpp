// treeflash as an installed tool: its version names the commit built, an
// installed tree (bin/ and share/treeflash/board) finds its boards wherever
// it is unpacked, the man pages are made from --help, and bash completion
// offers commands, options and boards. No root needed.
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>
#include <regex>

using namespace treeflash;
using namespace treeflash::test;

namespace {

// The words bash completion offers for `line` (the last word is completed).
std::string complete(const std::vector<std::string>& words)
{
    std::string array;
    for (const auto& word : words)
        array += " '" + word + "'";
    std::string script = "PATH='" + fs::path(TREEFLASH_BINARY).parent_path().string() + "':$PATH; source '"
                         + TREEFLASH_SOURCE_DIR + "/cli/completion.bash'; COMP_WORDS=(" + array
                         + "); COMP_CWORD=" + std::to_string(words.size() - 1)
                         + "; _treeflash; printf '%s\\n' \"${COMPREPLY[@]}\"";
    auto r = run_process({"bash", "-c", script});
    REQUIRE_MESSAGE(r.ok(), r.err);
    return r.out;
}

} // namespace

TEST_SUITE("install") {

TEST_CASE("--version names the version and the commit built")
{
    auto r = run_treeflash({"--version"});
    REQUIRE(r.ok());
    std::smatch match;
    REQUIRE_MESSAGE(std::regex_match(r.out, match, std::regex(R"(treeflash [0-9]+\.[0-9]+\.[0-9]+ \(commit ([0-9a-f]{12}(-dirty)?|unknown)\)\n)")),
                    r.out);
    // Built from a git checkout, where git is installed: that commit.
    if (!fs::exists(fs::path(TREEFLASH_SOURCE_DIR) / ".git") || !fs::exists("/usr/bin/git"))
        return;
    auto head = run_process({"git", "-C", TREEFLASH_SOURCE_DIR, "rev-parse", "--short=12", "HEAD"});
    REQUIRE_MESSAGE(head.ok(), head.err);
    CHECK(match[1].str().rfind(head.out.substr(0, 12), 0) == 0);
}

TEST_CASE("an installed tree finds its boards beside its binary, wherever it is unpacked")
{
    Scratch tmp;
    fs::path prefix = tmp / "unpacked/usr";
    fs::create_directories(prefix / "bin");
    fs::create_directories(prefix / "share/treeflash/board");
    fs::copy_file(TREEFLASH_BINARY, prefix / "bin/treeflash");
    fs::copy(fs::path(TREEFLASH_SOURCE_DIR) / "board/qemu-arm64", prefix / "share/treeflash/board/relocated",
             fs::copy_options::recursive);
    auto run = [&](const std::string& board) {
        return run_process({(prefix / "bin/treeflash").string(), "flash", "--board", board, "--image",
                            (tmp / "card.img").string(), "--repo", (tmp / "no-repo").string(), "--no-gpg-verify"});
    };
    // A board only the unpacked tree has is found...
    auto found = run("relocated");
    CHECK(!found.ok());
    CHECK_MESSAGE(found.err.find("unknown board") == std::string::npos, found.err);
    // ...and an unknown one is looked for there first, not in the checkout
    // the binary was built in.
    auto unknown = run("no-such-board");
    CHECK_MESSAGE(unknown.err.find("(looked in " + (prefix / "share/treeflash/board").string() + ", ") != std::string::npos,
                  unknown.err);
    CHECK(unknown.err.find(std::string(TREEFLASH_SOURCE_DIR) + "/board") == std::string::npos);
    // The build tree's binary uses the checkout's boards first.
    auto checkout = run_treeflash({"flash", "--board", "no-such-board", "--image", (tmp / "card.img").string(),
                                   "--repo", (tmp / "no-repo").string(), "--no-gpg-verify"});
    CHECK_MESSAGE(checkout.err.find("(looked in " + std::string(TREEFLASH_SOURCE_DIR) + "/board, ") != std::string::npos,
                  checkout.err);
}

TEST_CASE("a man page per command, made from its --help")
{
    fs::path man = fs::path(TREEFLASH_BINARY).parent_path().parent_path() / "man";
    REQUIRE_MESSAGE(fs::exists(man / "treeflash.1.gz"), "no man pages in " << man << " (help2man missing?)");
    for (const char* command : {"build", "initramfs", "flash", "upgrade", "inspect", "write", "station", "line", "bmap"}) {
        auto page = run_process({"zcat", (man / ("treeflash-" + std::string(command) + ".1.gz")).string()});
        REQUIRE_MESSAGE(page.ok(), command);
        CHECK(page.out.find(".SH NAME\ntreeflash\\-" + std::string(command) + " \\- ") != std::string::npos);
        // Every option of the command's help is in its page.
        auto help = run_treeflash({command, "--help"});
        std::regex option("--[a-z][a-z0-9-]*");
        for (auto it = std::sregex_iterator(help.out.begin(), help.out.end(), option); it != std::sregex_iterator(); ++it) {
            std::string escaped;
            for (char c : it->str().substr(2))
                escaped += c == '-' ? std::string("\\-") : std::string(1, c);
            CHECK_MESSAGE(page.out.find("\\-\\-" + escaped) != std::string::npos, command << " " << it->str());
        }
    }
}

TEST_CASE("bash completion: commands, a command's options, boards")
{
    CHECK(complete({"treeflash", "st"}) == "station\n");
    CHECK(complete({"treeflash", "i"}) == "initramfs\ninspect\n");
    std::string write_options = complete({"treeflash", "write", "--b"});
    CHECK(write_options == "--bmap\n");
    std::string boards = complete({"treeflash", "flash", "--board", "qemu-"});
    CHECK(boards == "qemu-arm64\nqemu-raspi3b\n");
    std::string station = complete({"treeflash", "station", "--"});
    for (const char* option : {"--slot", "--manifest", "--log", "--http", "--cards", "--db", "--station"})
        CHECK_MESSAGE(station.find(std::string(option) + "\n") != std::string::npos, option);
    CHECK(complete({"treeflash", "line", ""}) == "import\nstatus\nexport\n");
    CHECK(complete({"treeflash", "line", "--db", "postgresql:///x", "st"}) == "status\n");
}

}
