// treeflash bmap: flasher::write_bmap -> IMAGE.bmap (or -o FILE).
#include "cli/command.hpp"
#include "common/error.hpp"
#include "flasher/write/bmap.hpp"

#include <boost/program_options.hpp>
#include <iostream>

namespace po = boost::program_options;

namespace treeflash::cli {

namespace {

const char* bmap_usage = R"(Usage: treeflash bmap IMAGE [-o FILE] [--json]

Writes the block map of a raw image (bmap 2.0, as bmap-tools reads and
writes it): which 4 KiB blocks hold data, with a sha256 per range, so a
writer copies only those and can check them. Make it before compressing the
image. flash --image leaves one beside every image it makes.

Examples:
  treeflash bmap card.img                  # writes card.img.bmap
  bmaptool copy --bmap card.img.bmap card.img /dev/sdb

Options)";

} // namespace

int run_bmap(const std::vector<std::string>& args, GCancellable* cancellable)
{
    std::string image, output;
    bool json = false;
    po::options_description desc(bmap_usage);
    desc.add_options()
        ("help,h", "show this help")
        ("image", po::value(&image)->value_name("IMAGE"), "the raw image")
        ("output,o", po::value(&output)->value_name("FILE"), "where to write the bmap (default: IMAGE.bmap)")
        ("json", po::bool_switch(&json), "print a summary as JSON on stdout");
    po::positional_options_description positional;
    positional.add("image", 1);
    if (!parse_options(args, desc, &positional))
        return 0;
    if (image.empty())
        throw UsageError("name an IMAGE");
    if (output.empty())
        output = image + ".bmap";

    flasher::Bmap map = in_step("bmap " + image, [&] { return flasher::write_bmap(image, output, cancellable); });
    uint64_t mapped = map.mapped_blocks * map.block_size;
    if (json)
        print_json({{"image", image}, {"bmap", output}, {"image_size", map.image_size}, {"block_size", map.block_size},
                    {"mapped_bytes", mapped}, {"ranges", map.ranges.size()}});
    else
        std::cout << output << ": " << mib(mapped) << " of " << mib(map.image_size) << " mapped in " << map.ranges.size()
                  << " ranges\n";
    return 0;
}

} // namespace treeflash::cli
