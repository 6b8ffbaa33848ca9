#pragma once

// Memory accounting: resident set size of this process, for reports next to every speed figure.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace seedling {

// Peak resident set size of this process so far (Linux VmHWM), in bytes; 0 if unknown.
int64_t PeakRssBytes();

// Current resident set size (Linux VmRSS), in bytes; 0 if unknown.
int64_t CurrentRssBytes();

// The parts of the resident set (Linux /proc/self/status RssAnon, RssFile, RssShmem), in bytes; 0 if
// unknown. Anonymous pages are dirty memory (heap, tensors, copies of weights): what mobile memory killers
// count. File pages are clean views of files (memory-mapped weights, code) that the OS can drop and read
// again.
struct RssParts {
  int64_t anon = 0;
  int64_t file = 0;
  int64_t shmem = 0;
  int64_t total() const { return anon + file + shmem; }
};
RssParts CurrentRssParts();

// Samples RssParts on a background thread from construction to destruction and keeps each part's peak
// (the kernel keeps only VmHWM, the peak of the sum). A peak shorter than the interval can be missed, so
// report VmHWM (PeakRssBytes) as the total. Thread-safe.
class RssPeakSampler {
 public:
  explicit RssPeakSampler(int interval_ms = 2);
  ~RssPeakSampler();
  RssPeakSampler(const RssPeakSampler&) = delete;
  RssPeakSampler& operator=(const RssPeakSampler&) = delete;

  // The largest value each part reached so far (not necessarily at the same moment).
  RssParts Peak() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Resets the peak RSS counter to the current RSS where the kernel allows it (Linux: writes "5" to
// /proc/self/clear_refs). Returns false if it could not.
bool ResetPeakRss();

// The heap allocator this process runs under. How much memory a training step's freed tensors leave
// resident depends on it, so the memory planner sizes its slack to match (client/memory_planner.cpp).
// The programs link tcmalloc (CMake option SEEDLING_TCMALLOC); an app embedding the SDK keeps its own.
enum class HeapAllocator { kSystem, kTcmalloc };
HeapAllocator CurrentHeapAllocator();                    // kTcmalloc when tcmalloc is linked in or preloaded
const char* HeapAllocatorName(HeapAllocator allocator);  // "system", "tcmalloc"

// Hands the heap's free pages back to the OS (tcmalloc: MallocExtension_ReleaseFreeMemory; glibc:
// malloc_trim). For the end of a one-off phase whose large buffers the next phase does not reuse, such as
// building a weight cache: neither heap returns such memory promptly by itself.
void ReleaseFreeHeapMemory();

// "1.50 GiB", "12.0 MiB", "512 B".
std::string FormatBytes(int64_t bytes);

inline constexpr int64_t kMaxByteSize = int64_t{1} << 50;  // ParseByteSize refuses more: 1 PiB
// Parses "512M", "1.5G", "2GiB", "800MB", "1048576" (bytes) into bytes; powers of 1024. InvalidArgument
// for anything else, a negative or non-finite number, or more than kMaxByteSize.
absl::StatusOr<int64_t> ParseByteSize(std::string_view text);

}  // namespace seedling
