#include "optim/fwdgrad.h"

#include <torch/csrc/autograd/forward_grad.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/torch_status.h"

namespace seedling::optim {
namespace {

// Enters a fresh forward-AD level for the scope (LibTorch's equivalent of Python's fwAD.dual_level()).
class DualLevel {
 public:
  DualLevel() : level_(torch::autograd::ForwardADLevel::get_next_idx()) {}
  ~DualLevel() { torch::autograd::ForwardADLevel::release_idx(level_); }
  uint64_t level() const { return level_; }

 private:
  uint64_t level_;
};

}  // namespace

at::Tensor RebuildEstimate(const ForwardGradient& g) {
  at::Tensor out = at::zeros({g.numel}, at::kFloat);
  const float inv_k = g.seeds.empty() ? 0.0f : 1.0f / static_cast<float>(g.seeds.size());
  for (size_t k = 0; k < g.seeds.size(); ++k) AddSeededNormal(out, g.seeds[k], g.derivatives[k] * inv_k);
  return out;
}

FwdGradTrainer::FwdGradTrainer(const model::LlamaModel& model, lora::LoraAdapter& adapter,
                               const FwdGradOptions& options)
    : model_(model), adapter_(adapter), options_(options), params_(ParameterSet::Adapter(adapter)) {
  accumulated_ = at::zeros({params_.numel()}, at::kFloat);
}

absl::StatusOr<std::unique_ptr<FwdGradTrainer>> FwdGradTrainer::Create(const model::LlamaModel& model,
                                                                       lora::LoraAdapter& adapter,
                                                                       const FwdGradOptions& options) {
  if (options.perturbations < 1) return absl::InvalidArgumentError("perturbations must be >= 1");
  if (!(options.lr > 0)) return absl::InvalidArgumentError(StrCat("lr must be > 0, got ", options.lr));
  if (!(options.fd_epsilon > 0)) return absl::InvalidArgumentError("fd_epsilon must be > 0");
  if (options.candidates_factor < 1) return absl::InvalidArgumentError("candidates_factor must be >= 1");
  if (options.tangents_per_pass < 0) return absl::InvalidArgumentError("tangents_per_pass must be >= 0");
  if (options.mlp_chunk_tokens < 0) return absl::InvalidArgumentError("mlp_chunk_tokens must be >= 0");
  return std::unique_ptr<FwdGradTrainer>(new FwdGradTrainer(model, adapter, options));
}

absl::Status FwdGradTrainer::SetReference(at::Tensor reference) {
  if (reference.defined() &&
      (reference.dim() != 1 || reference.numel() != params_.numel() || reference.scalar_type() != at::kFloat)) {
    return absl::InvalidArgumentError(
        StrCat("the reference gradient must be a 1-D fp32 tensor of ", params_.numel(), " elements"));
  }
  reference_ = reference.defined() ? reference.contiguous() : at::Tensor();
  return absl::OkStatus();
}

std::vector<uint64_t> FwdGradTrainer::PickSeeds(uint64_t step_seed) const {
  const int64_t k = options_.perturbations;
  Rng rng(step_seed, rng_stream::kStepSeeds);
  const bool discriminative = reference_.defined() && options_.candidates_factor > 1;
  const int64_t n = discriminative ? k * options_.candidates_factor : k;
  std::vector<uint64_t> candidates(static_cast<size_t>(n));
  for (uint64_t& s : candidates) s = rng.NextU64();
  if (!discriminative) return candidates;
  // FwdLLM's discriminative sampling: keep the candidates best aligned with the reference (cosine).
  const double ref_norm = reference_.norm().item<double>();
  std::vector<double> cosine(candidates.size());
  at::Tensor z = at::empty({params_.numel()}, at::kFloat);
  for (size_t i = 0; i < candidates.size(); ++i) {
    z.zero_();
    AddSeededNormal(z, candidates[i], 1.0f);
    cosine[i] = (z.dot(reference_).item<double>()) / (z.norm().item<double>() * ref_norm + 1e-30);
  }
  std::vector<size_t> order(candidates.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cosine[a] > cosine[b]; });
  std::vector<uint64_t> kept;
  for (int64_t i = 0; i < k; ++i) kept.push_back(candidates[order[static_cast<size_t>(i)]]);
  return kept;
}

absl::StatusOr<double> FwdGradTrainer::DirectionalDerivative(const model::Batch& batch, uint64_t seed, double* loss) {
  model::ForwardOptions fo;
  fo.adapter = &adapter_;
  fo.ce_chunk_tokens = options_.ce_chunk_tokens;
  if (options_.mode == FwdGradOptions::Mode::kCentralDifference) {
    const float h = static_cast<float>(options_.fd_epsilon);
    params_.AddNormal(seed, h);
    absl::StatusOr<model::LossOutput> plus = ProbeLoss(model_, batch, fo);
    params_.AddNormal(seed, -2.0f * h);
    absl::StatusOr<model::LossOutput> minus = ProbeLoss(model_, batch, fo);
    params_.AddNormal(seed, h);  // restore θ
    SEEDLING_RETURN_IF_ERROR(plus.status());
    SEEDLING_RETURN_IF_ERROR(minus.status());
    const double lp = plus->mean().item<double>(), lm = minus->mean().item<double>();
    if (loss != nullptr) *loss = 0.5 * (lp + lm);
    return (lp - lm) / (2.0 * options_.fd_epsilon);
  }
  // Forward-mode AD: the flat buffer becomes a dual tensor whose tangent is z(seed); the decoder carries
  // tangents to the final hidden states, and the LM head and loss are differentiated by hand (see
  // LlamaModel::LossDirectionalDerivative). No graph is recorded (no reverse-mode gradients).
  return model::CatchTorch("forward-mode AD", [&]() -> absl::StatusOr<double> {
    at::NoGradGuard no_grad;
    DualLevel level;
    at::Tensor tangent = at::zeros({params_.numel()}, at::kFloat);
    AddSeededNormal(tangent, seed, 1.0f);
    adapter_.SetFlatOverride(at::_make_dual(adapter_.flat().detach(), tangent.to(adapter_.flat().scalar_type()),
                                            static_cast<int64_t>(level.level())));
    absl::StatusOr<model::LlamaModel::LossJvp> out =
        model_.LossDirectionalDerivative(batch.tokens, batch.labels, fo, level.level());
    adapter_.SetFlatOverride(at::Tensor());
    SEEDLING_RETURN_IF_ERROR(out.status());
    if (loss != nullptr) *loss = out->loss;
    return out->derivative;
  });
}

absl::StatusOr<std::vector<double>> FwdGradTrainer::DirectionalDerivatives(const model::Batch& batch,
                                                                           const std::vector<uint64_t>& seeds,
                                                                           double* loss) {
  model::ForwardOptions fo;
  fo.adapter = &adapter_;
  fo.ce_chunk_tokens = options_.ce_chunk_tokens;
  fo.mlp_chunk_tokens = options_.mlp_chunk_tokens;
  const size_t per_pass =
      options_.tangents_per_pass > 0 ? static_cast<size_t>(options_.tangents_per_pass) : seeds.size();
  std::vector<double> derivatives;
  for (size_t start = 0; start < seeds.size(); start += per_pass) {
    const size_t end = std::min(seeds.size(), start + per_pass);
    adapter_.SetTangentSeeds(std::vector<uint64_t>(seeds.begin() + static_cast<std::ptrdiff_t>(start),
                                                   seeds.begin() + static_cast<std::ptrdiff_t>(end)));
    absl::StatusOr<model::LlamaModel::LossJvps> out = model_.LossTangents(batch.tokens, batch.labels, fo);
    adapter_.SetTangentSeeds({});
    SEEDLING_RETURN_IF_ERROR(out.status());
    if (loss != nullptr) *loss = out->loss;
    derivatives.insert(derivatives.end(), out->derivatives.begin(), out->derivatives.end());
  }
  return derivatives;
}

TrainerState FwdGradTrainer::SaveState() const {
  TrainerState s = LocalTrainer::SaveState();
  const float* p = accumulated_.data_ptr<float>();
  s.buffers["accumulated"] = std::vector<float>(p, p + accumulated_.numel());
  s.seed_pairs = all_pairs_;
  return s;
}

absl::Status FwdGradTrainer::RestoreState(const TrainerState& state) {
  auto it = state.buffers.find("accumulated");
  if (it == state.buffers.end() || static_cast<int64_t>(it->second.size()) != accumulated_.numel()) {
    return absl::InvalidArgumentError("trainer state lacks the accumulated forward gradient");
  }
  SEEDLING_RETURN_IF_ERROR(LocalTrainer::RestoreState(state));
  std::memcpy(accumulated_.data_ptr<float>(), it->second.data(), it->second.size() * sizeof(float));
  all_pairs_ = state.seed_pairs;
  return absl::OkStatus();
}

absl::StatusOr<StepResult> FwdGradTrainer::Step(const model::Batch& batch) {
  const uint64_t step_seed = StepSeed(options_.seed, static_cast<uint64_t>(steps()));
  ForwardGradient g;
  g.numel = params_.numel();
  g.seeds = PickSeeds(step_seed);
  StepResult result;
  bool finite = true;
  if (options_.mode == FwdGradOptions::Mode::kBatchedJvp) {
    // One primal for all tangents: its loss is the step's loss.
    SEEDLING_ASSIGN_OR_RETURN(std::vector<double> d, DirectionalDerivatives(batch, g.seeds, &result.loss));
    finite = std::isfinite(result.loss);
    for (double v : d) {
      finite = finite && std::isfinite(v);
      g.derivatives.push_back(static_cast<float>(v));
    }
  } else {
    double loss_sum = 0;
    for (uint64_t seed : g.seeds) {
      double loss = 0;
      SEEDLING_ASSIGN_OR_RETURN(double d, DirectionalDerivative(batch, seed, &loss));
      finite = finite && std::isfinite(d) && std::isfinite(loss);
      g.derivatives.push_back(static_cast<float>(d));
      loss_sum += loss;
    }
    result.loss = loss_sum / static_cast<double>(g.seeds.size());
  }
  result.tokens = batch.labels.narrow(1, 1, batch.labels.size(1) - 1).ne(model::kIgnoreIndex).sum().item<int64_t>();
  if (!finite) {
    result.skipped = true;
    return Count(result);
  }
  last_ = std::move(g);
  const float inv_k = 1.0f / static_cast<float>(last_.seeds.size());
  for (size_t k = 0; k < last_.seeds.size(); ++k) all_pairs_.emplace_back(last_.seeds[k], last_.derivatives[k] * inv_k);
  last_dense_ = RebuildEstimate(last_);
  accumulated_.add_(last_dense_);
  if (options_.apply_locally) params_.AddDense(last_dense_, static_cast<float>(-options_.lr));
  return Count(result);
}

}  // namespace seedling::optim
