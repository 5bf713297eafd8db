// The doctest runner of every tier. CTest treats exit status 77 as
// "skipped" (SKIP_RETURN_CODE), so a tier that cannot run here, or a run
// whose every selected case is skipped, shows as skipped, not as passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include "common/process.hpp"
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>

#include <cstdlib>
#include <iostream>
#include <unistd.h>

namespace {

constexpr int skipped_exit_code = 77;

unsigned cases_run = 0;

// Counts the cases that passed the filters and were not skipped.
struct RunCounter : doctest::IReporter {
    explicit RunCounter(const doctest::ContextOptions&) {}
    void report_query(const doctest::QueryData&) override {}
    void test_run_start() override {}
    void test_run_end(const doctest::TestRunStats& stats) override { cases_run = stats.numTestCasesPassingFilters; }
    void test_case_start(const doctest::TestCaseData&) override {}
    void test_case_reenter(const doctest::TestCaseData&) override {}
    void test_case_end(const doctest::CurrentTestCaseStats&) override {}
    void test_case_exception(const doctest::TestCaseException&) override {}
    void subcase_start(const doctest::SubcaseSignature&) override {}
    void subcase_end() override {}
    void log_assert(const doctest::AssertData&) override {}
    void log_message(const doctest::MessageData&) override {}
    void test_case_skipped(const doctest::TestCaseData&) override {}
};

REGISTER_LISTENER("run-counter", 1, RunCounter);

} // namespace

int main(int argc, char** argv)
{
#ifdef TREEFLASH_TESTS_NEED_ROOT
    if (::geteuid() != 0) {
        std::cout << "skipped: this tier needs root (loop devices, mounts)\n";
        return skipped_exit_code;
    }
#endif
    // Steps treeflash runs in a process of their own re-execute the
    // treeflash executable, not this test runner.
    treeflash::set_treeflash_executable(TREEFLASH_BINARY);
    // The blank file systems flashes keep (flasher/disk/blank_ext4.hpp) go
    // to a folder of this run's, not to the user's cache.
    treeflash::test::Scratch cache;
    ::setenv("XDG_CACHE_HOME", cache.path().c_str(), 1);
    doctest::Context context(argc, argv);
    int result = context.run();
    if (context.shouldExit())
        return result;
    if (result == 0 && cases_run == 0) {
        std::cout << "skipped: every selected test case is skipped here\n";
        return skipped_exit_code;
    }
    return result;
}
