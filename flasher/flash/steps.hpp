// What the files of flash share: plan.cpp decides, through_mounts.cpp
// (loop devices or a card) and from_trees.cpp (an image without
// privileges) write, flash.cpp chains them and publishes the image.
#pragma once

#include "flasher/flash/flash.hpp"

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <thread>

typedef struct _GCancellable GCancellable;

namespace treeflash::flasher {

class Target;

constexpr uint64_t MiB = 1 << 20;

// What is on the card when a step fails, for the error message.
enum class Progress { Untouched, Partitioned, Formatted, Deployed };

// Throws Cancelled once `cancellable` is cancelled.
void check_cancelled(GCancellable* cancellable);

// The directory an image is written in.
std::filesystem::path image_dir(const std::filesystem::path& image);

// Bytes free for an unprivileged writer in `dir`; nothing when unknown.
std::optional<uint64_t> free_bytes(const std::filesystem::path& dir);

// "uboot-env at 0x500000 (8192 bytes)", a line per blob written.
void describe_firmware(const FlashPlan& plan, FlashResult& result);

// Runs `work` on a thread of its own, joined when the returned handle goes;
// where no thread can be started (a container's limit), runs it here.
std::jthread start_beside(const std::function<void()>& work);

// /dev/shm when this user may write there and it has more than `bytes` and
// `entries` free; empty otherwise.
std::filesystem::path memory_with_room(uint64_t bytes, uint64_t entries);

// The loop-device and card path (through_mounts.cpp): partition, mkfs,
// mount, deploy, boot script; `progress` says how far it got. The caller
// syncs the target.
void write_card(const FlashPlan& plan, Target& target, FlashResult& result, Progress& progress,
                const std::function<void(const std::string&)>& notice, GCancellable* cancellable);

// The path without privileges (from_trees.cpp): the same card, made from
// directories by mkfs.ext4 -d in a user namespace. Returns the thread that
// removes the trees, still at work. The caller syncs the target.
std::jthread write_image_from_directories(const FlashPlan& plan, Target& target, FlashResult& result,
                                          const std::function<void(const std::string&)>& notice,
                                          GCancellable* cancellable);

} // namespace treeflash::flasher
