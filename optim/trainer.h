#pragma once

// Local trainers: what a phone runs inside a round. Every method trains a ParameterSet (the LoRA flat
// buffer by default) of a frozen base model, one Step() per batch, deterministically for a fixed seed.
// A step whose loss (or gradient) is NaN or infinite is skipped and counted: the parameters are left as
// they were before the step.

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/dataset.h"
#include "model/llama.h"
#include "optim/method.h"

namespace seedling::optim {

struct StepResult {
  double loss = std::numeric_limits<double>::quiet_NaN();  // mean loss per scored token on the batch
  bool skipped = false;                                    // non-finite loss or gradient: nothing was applied
  int64_t tokens = 0;                                      // scored tokens in the batch
};

// What a trainer needs besides the trained parameters to continue a run after the process was killed:
// its step counters, optimizer buffers (AdamW moments, accumulated estimates) and seed-scalar pairs.
struct TrainerState {
  int64_t steps = 0;
  int64_t skipped = 0;
  int64_t counter = 0;  // a method-specific integer (lora-bp: AdamW's step count)
  std::map<std::string, std::vector<float>> buffers;
  std::vector<std::pair<uint32_t, float>> pairs;       // kseed: (seed index, scalar) of the applied steps
  std::vector<std::pair<uint64_t, float>> seed_pairs;  // fwdgrad: (seed, d_k / K) of every perturbation
};

class LocalTrainer {
 public:
  virtual ~LocalTrainer() = default;
  virtual Method method() const = 0;
  // One optimization step on `batch`. Errors come from the model (bad tokens) and leave the parameters as
  // they were.
  virtual absl::StatusOr<StepResult> Step(const model::Batch& batch) = 0;

  int64_t steps() const { return steps_; }
  int64_t skipped_steps() const { return skipped_; }

  // Resumable state (the parameters themselves are the caller's to save). RestoreState on a fresh trainer
  // built with the same options continues exactly where SaveState was taken: every method is deterministic
  // in (seed, step, data). InvalidArgument if the state does not fit this trainer.
  virtual TrainerState SaveState() const;
  virtual absl::Status RestoreState(const TrainerState& state);

 protected:
  // Counts a finished step.
  StepResult Count(StepResult r) {
    ++steps_;
    if (r.skipped) ++skipped_;
    return r;
  }

 private:
  int64_t steps_ = 0;
  int64_t skipped_ = 0;
};

// Mean next-token loss of `batch` without gradients (the zeroth-order methods' probe), or NaN-free error.
absl::StatusOr<model::LossOutput> ProbeLoss(const model::LlamaModel& model, const model::Batch& batch,
                                            const model::ForwardOptions& options);

}  // namespace seedling::optim
