// Shared pieces: child process environments and the templates compiled
// into the binary.
#include "common/process.hpp"
#include "common/templates.hpp"
#include "tests/support/fixtures.hpp"

#include <cstdlib>
#include <doctest/doctest.h>

using namespace treeflash;
using namespace treeflash::test;

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

}
