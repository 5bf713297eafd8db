// Kernel placement: checksum names (legacy) or usr/lib/modules (modules),
// regular files only, and kernels the rootfs already carries.
#include "builder/stages.hpp"
#include "common/error.hpp"
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>

using namespace treeflash;
using namespace treeflash::builder;
using namespace treeflash::test;

TEST_SUITE("kernel") {

TEST_CASE("legacy layout: checksum-named regular files, even when given a symlink")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    FakeKernel k = make_kernel_files(tmp.path());
    fs::create_symlink(k.kernel, tmp / "vmlinuz-link");
    ImportResult imported = import_directory(tmp / "rootfs");
    KernelOptions options;
    options.kernel = tmp / "vmlinuz-link";
    options.initramfs = k.initramfs;
    options.devicetrees = {k.devicetree};
    KernelResult result = place_kernel(imported.tree, options);

    std::string csum = sha256sum_files({k.kernel, k.initramfs, k.devicetree});
    CHECK(result.bootcsum == csum);
    const Node* vmlinuz = imported.tree.find("usr/lib/ostree-boot/vmlinuz-" + csum);
    REQUIRE(vmlinuz);
    CHECK(vmlinuz->is_regular());
    CHECK(imported.tree.read_all(*vmlinuz) == k.kernel_bytes);
    CHECK(imported.tree.find("usr/lib/ostree-boot/initramfs-" + csum));
    CHECK(imported.tree.read_all(*imported.tree.find("usr/lib/ostree-boot/devicetree-" + csum)) == k.devicetree_bytes);
}

TEST_CASE("modules layout: several devicetrees go to dtb/ and count in name order")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    FakeKernel k = make_kernel_files(tmp.path());
    write_file(tmp / "a-first.dtb", "first dtb");
    ImportResult imported = import_directory(tmp / "rootfs");
    KernelOptions options;
    options.kernel = k.kernel;
    options.initramfs = k.initramfs;
    options.devicetrees = {k.devicetree, tmp / "a-first.dtb"};
    options.layout = KernelLayout::Modules;
    options.kver = "6.1.0-test";
    KernelResult result = place_kernel(imported.tree, options);
    CHECK(result.bootcsum == sha256sum_files({k.kernel, k.initramfs, tmp / "a-first.dtb", k.devicetree}));
    CHECK(imported.tree.find("usr/lib/modules/6.1.0-test/vmlinuz"));
    CHECK(imported.tree.find("usr/lib/modules/6.1.0-test/initramfs.img"));
    CHECK(imported.tree.find("usr/lib/modules/6.1.0-test/dtb/a-first.dtb"));
    CHECK(imported.tree.find("usr/lib/modules/6.1.0-test/dtb/" + k.devicetree.filename().string()));
}

TEST_CASE("a kernel the rootfs already carries is accepted in either layout")
{
    Scratch tmp;
    make_rootfs(tmp / "modules");
    write_file(tmp / "modules/usr/lib/modules/6.1.0-x/vmlinuz", "kernel");
    write_file(tmp / "modules/usr/lib/modules/6.1.0-x/devicetree", "dtb");
    ImportResult modules = import_directory(tmp / "modules");
    KernelResult found = place_kernel(modules.tree, {});
    CHECK(found.from_rootfs);
    CHECK(found.layout == KernelLayout::Modules);
    CHECK(found.bootcsum == sha256sum_files({tmp / "modules/usr/lib/modules/6.1.0-x/vmlinuz",
                                             tmp / "modules/usr/lib/modules/6.1.0-x/devicetree"}));

    make_rootfs(tmp / "legacy");
    std::string csum = sha256_hex("whatever");
    write_file(tmp / ("legacy/usr/lib/ostree-boot/vmlinuz-" + csum), "kernel");
    write_file(tmp / ("legacy/usr/lib/ostree-boot/devicetree-" + csum), "dtb");
    ImportResult legacy = import_directory(tmp / "legacy");
    found = place_kernel(legacy.tree, {});
    CHECK(found.layout == KernelLayout::Legacy);
    CHECK(found.bootcsum == csum);
}

TEST_CASE("a placed kernel replaces the one the rootfs carried, with a warning")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    write_file(tmp / "rootfs/boot/vmlinuz-6.1.0-old", "old kernel");
    FakeKernel k = make_kernel_files(tmp.path());
    ImportResult imported = import_directory(tmp / "rootfs");
    KernelOptions options;
    options.kernel = k.kernel;
    KernelResult result = place_kernel(imported.tree, options);
    CHECK_FALSE(imported.tree.find("boot/vmlinuz-6.1.0-old"));
    REQUIRE(result.warnings.size() == 1);
    CHECK(result.warnings[0].find("boot/vmlinuz-6.1.0-old") != std::string::npos);
}

TEST_CASE("no kernel anywhere is an error that names both layouts")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    ImportResult imported = import_directory(tmp / "rootfs");
    CHECK_THROWS_WITH_AS(place_kernel(imported.tree, {}),
                         doctest::Contains("usr/lib/modules/KVER/vmlinuz (modules layout) or "
                                           "usr/lib/ostree-boot/vmlinuz-SHA256 (legacy layout)"),
                         Error);
}

TEST_CASE("bad kernel inputs are named")
{
    Scratch tmp;
    make_rootfs(tmp / "rootfs");
    ImportResult imported = import_directory(tmp / "rootfs");
    KernelOptions options;
    options.kernel = tmp / "missing-Image";
    CHECK_THROWS_WITH_AS(place_kernel(imported.tree, options), doctest::Contains(("kernel " + (tmp / "missing-Image").string()).c_str()),
                         Error);
    FakeKernel k = make_kernel_files(tmp.path());
    options.kernel = k.kernel;
    options.devicetrees = {k.devicetree, k.initramfs};
    CHECK_THROWS_WITH_AS(place_kernel(imported.tree, options), doctest::Contains("legacy layout holds one devicetree"),
                         Error);
}

}
