// Whether a compressed image checks itself: every zstd or lz4 frame and
// every xz stream declares a checksum of its content that the decoder
// verifies. A stream that does not could decompress to wrong bytes that
// nothing notices, so write refuses it unless a bmap or SHA256SUMS vouches
// for the image. The frames are walked by their headers, without
// decompressing anything.
#pragma once

#include <cstdint>
#include <string>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

// "" when every frame (stream) of the `compression` ("zstd", "xz", "lz4",
// "bzip2": its last stream must be complete;
// others check themselves or are checked elsewhere) file `fd` of `size`
// bytes declares a content checksum; otherwise why not, naming the byte
// offset ("the frame at byte 1048581 has no checksum").
std::string unchecked_part(int fd, uint64_t size, const std::string& compression, GCancellable* cancellable);

} // namespace treeflash::flasher
