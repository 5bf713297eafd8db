// The initramfs builder's ELF reading, on binaries this machine has.
#include "builder/elf.hpp"
#include "common/error.hpp"
#include "tests/support/fixtures.hpp"

#include <doctest/doctest.h>

using namespace treeflash;
using namespace treeflash::builder;
using namespace treeflash::test;

TEST_SUITE("initramfs") {

TEST_CASE("the loader and DT_NEEDED libraries of a dynamic executable")
{
    ElfDependencies deps = elf_dependencies(read_text(TREEFLASH_BINARY), "treeflash");
    CHECK(deps.interpreter.find("ld-linux") != std::string::npos);
    bool has_ostree = false, has_libc = false;
    for (const auto& lib : deps.needed) {
        has_ostree |= lib == "libostree-1.so.1";
        has_libc |= lib == "libc.so.6";
    }
    CHECK(has_ostree);
    CHECK(has_libc);
}

TEST_CASE("what is not a usable ELF file is named")
{
    CHECK_THROWS_WITH_AS(elf_dependencies("#!/bin/sh\n", "script"), "script: not an ELF file", Error);
    CHECK_THROWS_WITH_AS(elf_modinfo(read_text(TREEFLASH_BINARY), "treeflash"),
                         "treeflash: no .modinfo section (not a kernel module?)", Error);
    std::string truncated = read_text(TREEFLASH_BINARY).substr(0, 100);
    CHECK_THROWS_AS(elf_dependencies(truncated, "cut"), Error);
}

}
