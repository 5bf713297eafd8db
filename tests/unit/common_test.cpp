// Shared pieces: child process environments, the templates compiled into
// the binary, and file writes.
#include "common/error.hpp"
#include "common/fs.hpp"
#include "common/pending_file.hpp"
#include "common/process.hpp"
#include "common/templates.hpp"
#include "common/text.hpp"
#include "tests/support/fixtures.hpp"

#include <cstdlib>
#include <fcntl.h>
#include <doctest/doctest.h>
#include <gio/gio.h>
#include <unistd.h>

using namespace treeflash::test; // its fs is std::filesystem; treeflash's own fs is named in full
using treeflash::ProcessOptions;
using treeflash::run_process;
using treeflash::throw_gerror;
using treeflash::Error;
using treeflash::Cancelled;
namespace templates = treeflash::templates;

TEST_SUITE("common") {

TEST_CASE("a child's environment variable replaces the caller's, it is not appended")
{
    ::setenv("TREEFLASH_TEST_VARIABLE", "from the caller", 1);
    ProcessOptions options;
    options.extra_environment = {"TREEFLASH_TEST_VARIABLE=for the child"};
    auto r = run_process({"sh", "-c", "echo \"$TREEFLASH_TEST_VARIABLE\"; env | grep -c '^TREEFLASH_TEST_VARIABLE='"}, options);
    ::unsetenv("TREEFLASH_TEST_VARIABLE");
    REQUIRE(r.ok());
    CHECK(r.out == "for the child\n1\n");
}

TEST_CASE("the binary carries the current text of every file under templates/")
{
    // Fails when a template was edited and the build did not pick it up.
    fs::path dir = fs::path(TREEFLASH_SOURCE_DIR) / "templates";
    int count = 0;
    for (const auto& entry : fs::recursive_directory_iterator(dir)) {
        if (!entry.is_regular_file())
            continue;
        std::string name = entry.path().lexically_relative(dir).string();
        CAPTURE(name);
        CHECK(std::string(templates::get(name)) == read_text(entry.path()));
        ++count;
    }
    CHECK(count >= 3);
    CHECK_THROWS_AS(templates::get("no/such/template"), std::out_of_range);
}

TEST_CASE("throw_gerror takes the GError and clears the caller's pointer")
{
    GError* error = g_error_new_literal(G_IO_ERROR, G_IO_ERROR_FAILED, "it broke\non two lines");
    CHECK_THROWS_WITH_AS(throw_gerror(error, "step"), "step: it broke; on two lines", Error);
    CHECK(error == nullptr); // a later step sharing it cannot reuse a freed error
    error = g_error_new_literal(G_IO_ERROR, G_IO_ERROR_CANCELLED, "cancelled");
    CHECK_THROWS_AS(throw_gerror(error), Cancelled);
    CHECK(error == nullptr);
}

TEST_CASE("no code releases a GLib handle by hand: common/glib.hpp owns them all")
{
    fs::path top = TREEFLASH_SOURCE_DIR;
    std::vector<std::string> found;
    for (const char* dir : {"builder", "flasher", "cli", "common"})
        for (const auto& entry : fs::recursive_directory_iterator(top / dir)) {
            if (entry.path().filename() == "glib.hpp" || !entry.is_regular_file())
                continue;
            std::string text = read_text(entry.path());
            for (const char* call : {"_unref(", "g_free(", "g_error_free("})
                if (text.find(call) != std::string::npos)
                    found.push_back(entry.path().lexically_relative(top).string() + " calls " + call);
        }
    CHECK_MESSAGE(found.empty(), [&] {
        std::string all;
        for (const auto& f : found)
            all += f + "\n";
        return all;
    }());
}

TEST_CASE("a file written atomically never goes through a symlink at its temporary name")
{
    Scratch tmp;
    write_file(tmp / "victim", "not yours");
    fs::path out = tmp / "card.img.bmap";
    fs::path temporary = out;
    temporary += ".tmp-" + std::to_string(::getpid());
    fs::create_symlink(tmp / "victim", temporary);
    treeflash::fs::write_file_atomic(out, "the map");
    CHECK(read_text(tmp / "victim") == "not yours");
    CHECK_FALSE(fs::is_symlink(out));
    CHECK(read_text(out) == "the map");
    CHECK_FALSE(fs::exists(fs::symlink_status(temporary)));
}

TEST_CASE("a pending file replaces its name only when published, and leaves nothing when dropped")
{
    Scratch tmp;
    write_file(tmp / "card.img.bmap", "the old map");
    auto temporaries = [&] {
        size_t n = 0;
        for (const auto& entry : fs::directory_iterator(tmp.path()))
            n += entry.path().filename().string().find(".tmp-") != std::string::npos;
        return n;
    };
    treeflash::UniqueFd folder(::open(tmp.path().c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    {
        treeflash::PendingFile dropped(folder.get(), "card.img.bmap", "a map never published", "the bmap");
        CHECK(temporaries() == 1);
    }
    CHECK(temporaries() == 0);
    CHECK(read_text(tmp / "card.img.bmap") == "the old map");
    treeflash::PendingFile pending(folder.get(), "card.img.bmap", "the new map", "the bmap");
    treeflash::PendingFile moved(std::move(pending)); // what a thread hands back
    CHECK(read_text(tmp / "card.img.bmap") == "the old map");
    moved.publish();
    CHECK(read_text(tmp / "card.img.bmap") == "the new map");
    CHECK(temporaries() == 0);
    CHECK_THROWS_AS(moved.publish(), Error);
}

TEST_CASE("printable: text from a card cannot drive the terminal, and readable text stays as it is")
{
    using treeflash::text::printable;
    CHECK(printable("tcu-0001 é — 名") == "tcu-0001 é — 名");
    CHECK(printable("a\x1b[2Jb\n") == "a\\x1b[2Jb\\x0a");
    CHECK(printable("\x7f") == "\\x7f");
    CHECK(printable("\xc2\x9b" "31m") == "\\u{009b}31m"); // C1 CSI, as UTF-8
    CHECK(printable("\x9b" "31m") == "\\x9b31m");         // C1 CSI, a raw byte
    CHECK(printable("abc\xe2\x80\xae" "gpj.exe") == "abc\\u{202e}gpj.exe"); // right-to-left override
    CHECK(printable("\xc0\xaf") == "\\xc0\\xaf");       // overlong '/'
    CHECK(printable("\xed\xa0\x80") == "\\xed\\xa0\\x80"); // a surrogate
    CHECK(printable("end\xe2\x82") == "end\\xe2\\x82");  // cut short
}

TEST_CASE("a program is found in the system's folders when PATH lacks them, never in the current folder")
{
    // A plain user's PATH has no /usr/sbin, where mkfs.ext4 lives.
    treeflash::ProcessOptions options;
    options.extra_environment = {"PATH=/usr/bin:/bin"};
    auto found = treeflash::run_process({"mkfs.ext4", "-V"}, options);
    CHECK_MESSAGE(found.ok(), found.err);
    // An empty or relative PATH entry does not run what the current folder holds.
    Scratch tmp;
    write_file(tmp / "treeflash-test-planted", "#!/bin/sh\nexit 0\n", 0755);
    options.extra_environment = {"PATH=:."};
    std::string error;
    auto here = fs::current_path();
    fs::current_path(tmp.path());
    try {
        treeflash::run_process({"treeflash-test-planted"}, options);
    } catch (const std::exception& e) {
        error = e.what();
    }
    fs::current_path(here);
    CHECK_MESSAGE(error.find("not found") != std::string::npos, error);
}

}
