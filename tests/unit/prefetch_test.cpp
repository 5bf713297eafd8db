// Objects fetched before the card's repository exists (StartedPrefetch):
// written whole once it does, and nothing left when the flash stops first.
#include "common/glib.hpp"
#include "flasher/deploy/prefetch.hpp"
#include "tests/support/fixtures.hpp"
#include "tests/support/system.hpp"

#include <chrono>
#include <doctest/doctest.h>
#include <ostree.h>
#include <thread>

using namespace treeflash;
using namespace treeflash::test;

namespace {

glib::Object<OstreeRepo> new_bare_repo(const fs::path& path)
{
    glib::Object<GFile> file(g_file_new_for_path(path.c_str()));
    glib::Object<OstreeRepo> repo(ostree_repo_new(file.get()));
    GError* error = nullptr;
    REQUIRE(ostree_repo_create(repo.get(), OSTREE_REPO_MODE_BARE_USER, nullptr, &error));
    return repo;
}

} // namespace

TEST_SUITE("prefetch") {

TEST_CASE("objects fetched before the repository exists are all written once it does, and check out as committed")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    for (int i = 0; i < 8; ++i) // files of several MiB: held in memory until the repository is named
        write_file(tmp / ("rootfs/usr/share/blob/" + std::to_string(i)), random_bytes((3 << 20) + i, static_cast<unsigned>(i)));
    std::string commit = build_commit(tmp.path(), tmp / "repo");
    flasher::StartedPrefetch started("file://" + (tmp / "repo").string(), commit, 30, nullptr);
    // The card is partitioned and formatted meanwhile: the workers hold
    // what they fetch.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    glib::Object<OstreeRepo> card = new_bare_repo(tmp / "card");
    flasher::PrefetchResult result = started.finish_into(card.get(), false);
    CHECK(result.attempted);
    CHECK_MESSAGE(result.complete, result.stopped);
    CHECK(result.objects > 8);
    REQUIRE(flasher::record_prefetched_commit(card.get(), "origin", "master", commit, result));
    // libostree's own check of every object, and a checkout equal to the tree.
    auto fsck = ostree(tmp / "card", {"fsck"});
    CHECK_MESSAGE(fsck.ok(), fsck.err);
    auto checkout = ostree(tmp / "card", {"checkout", "-U", commit, (tmp / "out").string()});
    REQUIRE_MESSAGE(checkout.ok(), checkout.err);
    for (int i = 0; i < 8; ++i)
        CHECK(read_text(tmp / ("out/usr/share/blob/" + std::to_string(i)))
              == read_text(tmp / ("rootfs/usr/share/blob/" + std::to_string(i))));
}

TEST_CASE("a prefetch dropped before the repository exists stops at once, whatever it holds")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    for (int i = 0; i < 8; ++i)
        write_file(tmp / ("rootfs/usr/share/blob/" + std::to_string(i)), random_bytes((3 << 20) + i, static_cast<unsigned>(i)));
    std::string commit = build_commit(tmp.path(), tmp / "repo");
    auto begun = std::chrono::steady_clock::now();
    {
        flasher::StartedPrefetch started("file://" + (tmp / "repo").string(), commit, 30, nullptr);
        std::this_thread::sleep_for(std::chrono::milliseconds(100)); // some held, some under way
    }
    // Its transfers stopped and its threads joined; what it held is freed
    // with it. (Not a timing test: the bound only catches a hang.)
    CHECK(std::chrono::steady_clock::now() - begun < std::chrono::seconds(60));
    CHECK(ostree(tmp / "repo", {"fsck"}).ok());
}

} // TEST_SUITE
