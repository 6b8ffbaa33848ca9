#include "model/memory_tracker.h"

#include <c10/core/Allocator.h>

#include <algorithm>

namespace seedling::model {

struct TensorMemoryTracker::Reporter : public c10::MemoryReportingInfoBase {
  int64_t current = 0;
  int64_t peak = 0;

  void reportMemoryUsage(void* /*ptr*/, int64_t alloc_size, int64_t /*total_allocated*/, int64_t /*total_reserved*/,
                         c10::Device /*device*/) override {
    current += alloc_size;  // negative for frees
    peak = std::max(peak, current);
  }
  bool memoryProfilingEnabled() const override { return true; }
};

TensorMemoryTracker::TensorMemoryTracker()
    : reporter_(std::make_shared<Reporter>()),
      guard_(std::make_unique<c10::DebugInfoGuard>(c10::DebugInfoKind::PROFILER_STATE, reporter_)) {}

TensorMemoryTracker::~TensorMemoryTracker() = default;

int64_t TensorMemoryTracker::current_bytes() const { return reporter_->current; }
int64_t TensorMemoryTracker::peak_bytes() const { return reporter_->peak; }
void TensorMemoryTracker::ResetPeak() { reporter_->peak = reporter_->current; }

}  // namespace seedling::model
