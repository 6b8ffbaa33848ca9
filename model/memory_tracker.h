#pragma once

// Counts the bytes of LibTorch CPU tensor storage allocated and freed on the current thread while a
// tracker is alive, through c10's memory-reporting hook. Exact and deterministic (unlike RSS), so tests
// can check memory bounds and benchmarks can report the tensor high-water mark of a step.
//
// Only allocations on the installing thread are seen (Seedling runs ATen single-threaded; see runtime.h).
// Not nestable: installing a second tracker on the same thread replaces the first until it is destroyed.

#include <c10/util/ThreadLocalDebugInfo.h>

#include <cstdint>
#include <memory>

namespace seedling::model {

class TensorMemoryTracker {
 public:
  TensorMemoryTracker();
  ~TensorMemoryTracker();
  TensorMemoryTracker(const TensorMemoryTracker&) = delete;
  TensorMemoryTracker& operator=(const TensorMemoryTracker&) = delete;

  // Net bytes allocated since construction (negative if more was freed than allocated).
  int64_t current_bytes() const;
  // Highest value current_bytes() reached.
  int64_t peak_bytes() const;
  // Restarts the peak at the current value.
  void ResetPeak();

 private:
  struct Reporter;
  std::shared_ptr<Reporter> reporter_;
  std::unique_ptr<c10::DebugInfoGuard> guard_;
};

}  // namespace seedling::model
