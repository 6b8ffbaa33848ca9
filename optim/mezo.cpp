#include "optim/mezo.h"

#include <algorithm>
#include <cmath>

#include "base/check.h"
#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/torch_status.h"

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

absl::StatusOr<std::vector<SpsaProbe>> BatchedSpsa(const model::LlamaModel& model, const model::Batch& batch,
                                                   const model::ForwardOptions& forward, lora::LoraAdapter& adapter,
                                                   const std::vector<uint64_t>& seeds, double epsilon) {
  SEEDLING_CHECK(forward.adapter == &adapter);
  const int64_t copies = 2 * static_cast<int64_t>(seeds.size());
  std::vector<uint64_t> slice_seeds;
  std::vector<float> scales;
  for (uint64_t seed : seeds) {
    slice_seeds.insert(slice_seeds.end(), {seed, seed});
    scales.insert(scales.end(), {static_cast<float>(epsilon), static_cast<float>(-epsilon)});
  }
  absl::StatusOr<std::vector<model::LossOutput>> losses = model::CatchTorch("batched probes", [&] {
    adapter.SetPerturbations(std::move(slice_seeds), std::move(scales));
    return model.GroupLosses(batch.tokens.repeat({copies, 1}), batch.labels.repeat({copies, 1}), copies, forward);
  });
  adapter.SetPerturbations({}, {});
  SEEDLING_RETURN_IF_ERROR(losses.status());
  std::vector<SpsaProbe> probes(seeds.size());
  for (size_t i = 0; i < seeds.size(); ++i) {
    probes[i].loss_plus = (*losses)[2 * i].mean().item<double>();
    probes[i].loss_minus = (*losses)[2 * i + 1].mean().item<double>();
    probes[i].projected_gradient = (probes[i].loss_plus - probes[i].loss_minus) / (2.0 * epsilon);
  }
  return probes;
}

std::vector<uint64_t> ProbeSeeds(uint64_t step_seed, int64_t q) {
  if (q <= 1) return {step_seed};
  Rng rng(step_seed, rng_stream::kStepSeeds);
  std::vector<uint64_t> seeds(static_cast<size_t>(q));
  for (uint64_t& s : seeds) s = rng.NextU64();
  return seeds;
}

absl::StatusOr<std::unique_ptr<MezoTrainer>> MezoTrainer::Create(const model::LlamaModel& model,
                                                                 lora::LoraAdapter* adapter, ParameterSet params,
                                                                 const MezoOptions& options) {
  if (!(options.lr > 0)) return absl::InvalidArgumentError(StrCat("lr must be > 0, got ", options.lr));
  if (!(options.epsilon > 0)) return absl::InvalidArgumentError(StrCat("epsilon must be > 0, got ", options.epsilon));
  if (params.numel() == 0) return absl::InvalidArgumentError("nothing to train: the parameter set is empty");
  if (options.perturbations < 1) {
    return absl::InvalidArgumentError(StrCat("perturbations must be >= 1, got ", options.perturbations));
  }
  if (options.batched && adapter == nullptr) {
    return absl::InvalidArgumentError(
        "batched probes perturb an adapter's copies; full-parameter mezo probes in place");
  }
  return std::unique_ptr<MezoTrainer>(new MezoTrainer(model, adapter, std::move(params), options));
}

double MeanProbeLoss(const std::vector<SpsaProbe>& probes) {
  double sum = 0;
  for (const SpsaProbe& p : probes) sum += 0.5 * (p.loss_plus + p.loss_minus);
  return probes.empty() ? 0.0 : sum / static_cast<double>(probes.size());
}

bool AllFinite(const std::vector<SpsaProbe>& probes) {
  return std::all_of(probes.begin(), probes.end(), [](const SpsaProbe& p) { return p.finite(); });
}

absl::StatusOr<std::vector<SpsaProbe>> RunProbes(const model::LlamaModel& model, const model::Batch& batch,
                                                 const model::ForwardOptions& forward, lora::LoraAdapter* adapter,
                                                 const ParameterSet& params, const std::vector<uint64_t>& seeds,
                                                 double epsilon, bool batched, bool exact_restore) {
  if (batched) return BatchedSpsa(model, batch, forward, *adapter, seeds, epsilon);
  // The layers below an upper-layer adapter compute the same in every probe: once per step.
  model::ForwardOptions probe_forward = forward;
  if (adapter != nullptr) {
    SEEDLING_ASSIGN_OR_RETURN(probe_forward.base_prefix, model.BaseLayers(batch.tokens, forward));
  }
  std::vector<SpsaProbe> probes;
  for (uint64_t seed : seeds) {
    SEEDLING_ASSIGN_OR_RETURN(SpsaProbe p, Spsa(model, batch, probe_forward, params, seed, epsilon, exact_restore));
    probes.push_back(p);
  }
  return probes;
}

absl::StatusOr<std::vector<SpsaProbe>> MezoTrainer::Probe(const model::Batch& batch, const model::ForwardOptions& fo,
                                                          const std::vector<uint64_t>& seeds) const {
  return RunProbes(model_, batch, fo, adapter_, params_, seeds, options_.epsilon, options_.batched,
                   options_.exact_restore);
}

absl::StatusOr<StepResult> MezoTrainer::Step(const model::Batch& batch) {
  model::ForwardOptions fo;
  fo.adapter = adapter_;
  fo.ce_chunk_tokens = options_.ce_chunk_tokens;
  fo.mlp_chunk_tokens = options_.mlp_chunk_tokens;
  const std::vector<uint64_t> seeds =
      ProbeSeeds(StepSeed(options_.seed, static_cast<uint64_t>(steps())), options_.perturbations);
  SEEDLING_ASSIGN_OR_RETURN(std::vector<SpsaProbe> probes, Probe(batch, fo, seeds));
  StepResult result;
  result.loss = MeanProbeLoss(probes);
  result.tokens = batch.labels.narrow(1, 1, batch.labels.size(1) - 1).ne(model::kIgnoreIndex).sum().item<int64_t>();
  if (!AllFinite(probes)) {
    result.skipped = true;
    return Count(result);
  }
  // MeZO Alg. 1, update: regenerate each z from its seed; θ −= lr ((1/q) Σ ĝ_i z_i + wd θ).
  if (options_.weight_decay > 0) {
    at::NoGradGuard no_grad;
    for (const ParameterSet::Slice& s : params_.slices()) s.tensor.mul_(1.0 - options_.lr * options_.weight_decay);
  }
  const double q = static_cast<double>(seeds.size());
  for (size_t i = 0; i < seeds.size(); ++i) {
    params_.AddNormal(seeds[i], static_cast<float>(-options_.lr * probes[i].projected_gradient / q));
  }
  return Count(result);
}

}  // namespace seedling::optim
