#include "optim/mezo.h"

#include <cmath>

#include "base/status.h"
#include "base/strings.h"

namespace seedling::optim {

bool SpsaProbe::finite() const {
  return std::isfinite(loss_plus) && std::isfinite(loss_minus) && std::isfinite(projected_gradient);
}

absl::StatusOr<SpsaProbe> Spsa(const model::LlamaModel& model, const model::Batch& batch,
                               const model::ForwardOptions& forward, const ParameterSet& params, uint64_t seed,
                               double epsilon, bool exact_restore) {
  const float eps = static_cast<float>(epsilon);
  const at::Tensor backup = exact_restore ? params.Flatten() : at::Tensor();
  // MeZO Alg. 1: perturb +εz, measure; −2εz, measure; +εz restores θ (up to float rounding).
  params.AddNormal(seed, eps);
  absl::StatusOr<model::LossOutput> plus = ProbeLoss(model, batch, forward);
  params.AddNormal(seed, -2.0f * eps);
  absl::StatusOr<model::LossOutput> minus = ProbeLoss(model, batch, forward);
  if (exact_restore) {
    params.Assign(backup);
  } else {
    params.AddNormal(seed, eps);
  }
  SEEDLING_RETURN_IF_ERROR(plus.status());
  SEEDLING_RETURN_IF_ERROR(minus.status());
  SpsaProbe p;
  p.loss_plus = plus->mean().item<double>();
  p.loss_minus = minus->mean().item<double>();
  p.projected_gradient = (p.loss_plus - p.loss_minus) / (2.0 * epsilon);
  return p;
}

absl::StatusOr<std::unique_ptr<MezoTrainer>> MezoTrainer::Create(const model::LlamaModel& model,
                                                                 lora::LoraAdapter* adapter, ParameterSet params,
                                                                 const MezoOptions& options) {
  if (!(options.lr > 0)) return absl::InvalidArgumentError(StrCat("lr must be > 0, got ", options.lr));
  if (!(options.epsilon > 0)) return absl::InvalidArgumentError(StrCat("epsilon must be > 0, got ", options.epsilon));
  if (params.numel() == 0) return absl::InvalidArgumentError("nothing to train: the parameter set is empty");
  return std::unique_ptr<MezoTrainer>(new MezoTrainer(model, adapter, std::move(params), options));
}

absl::StatusOr<StepResult> MezoTrainer::Step(const model::Batch& batch) {
  model::ForwardOptions fo;
  fo.adapter = adapter_;
  fo.ce_chunk_tokens = options_.ce_chunk_tokens;
  fo.mlp_chunk_tokens = options_.mlp_chunk_tokens;
  const uint64_t seed = StepSeed(options_.seed, static_cast<uint64_t>(steps()));
  SEEDLING_ASSIGN_OR_RETURN(SpsaProbe probe,
                            Spsa(model_, batch, fo, params_, seed, options_.epsilon, options_.exact_restore));
  StepResult result;
  result.loss = 0.5 * (probe.loss_plus + probe.loss_minus);
  result.tokens = batch.labels.narrow(1, 1, batch.labels.size(1) - 1).ne(model::kIgnoreIndex).sum().item<int64_t>();
  if (!probe.finite()) {
    result.skipped = true;
    return Count(result);
  }
  // MeZO Alg. 1, update: regenerate z from the seed; θ −= lr (ĝ z + wd θ).
  if (options_.weight_decay > 0) {
    at::NoGradGuard no_grad;
    for (const ParameterSet::Slice& s : params_.slices()) s.tensor.mul_(1.0 - options_.lr * options_.weight_decay);
  }
  params_.AddNormal(seed, static_cast<float>(-options_.lr * probe.projected_gradient));
  return Count(result);
}

}  // namespace seedling::optim
