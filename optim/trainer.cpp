#include "optim/trainer.h"

#include "base/strings.h"

namespace seedling::optim {

TrainerState LocalTrainer::SaveState() const {
  TrainerState s;
  s.steps = steps_;
  s.skipped = skipped_;
  return s;
}

absl::Status LocalTrainer::RestoreState(const TrainerState& state) {
  if (state.steps < 0 || state.skipped < 0 || state.skipped > state.steps) {
    return absl::InvalidArgumentError("trainer state has inconsistent step counts");
  }
  steps_ = state.steps;
  skipped_ = state.skipped;
  return absl::OkStatus();
}

absl::StatusOr<model::LossOutput> ProbeLoss(const model::LlamaModel& model, const model::Batch& batch,
                                            const model::ForwardOptions& options) {
  at::NoGradGuard no_grad;
  return model.Loss(batch.tokens, batch.labels, options);
}

}  // namespace seedling::optim
