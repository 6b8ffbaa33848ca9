#pragma once

// fwdgrad: the forward gradient of FwdLLM (Xu et al., ATC'24; Baydin et al. 2022). For perturbations
// v_k = z(seed_k) (base/philox.h), the directional derivative d_k = ∇L · v_k is computed
//   * by batched forward mode (the default): one forward in which every activation carries the K tangents
//     as extra slices (LlamaModel::LossTangents, rules written by hand in model/kernels.h), so each frozen
//     matrix is multiplied once for the primal and all tangents and the LM head once in all; exact;
//   * by forward-mode AD (LibTorch dual tensors on the LoRA flat buffer): exact, one forward with tangents
//     per perturbation; the reference the batched mode is tested against; or
//   * by a central difference (L(θ + h v) − L(θ − h v)) / 2h (FwdLLM's code, h = 0.01): two plain forwards.
// The estimate is g = (1/K) Σ_k d_k v_k. It can be reported densely or as the K (seed, d_k) pairs, from
// which RebuildEstimate() reproduces g bit for bit.
//
// Discriminative perturbation sampling (FwdLLM §4): with a reference gradient set, draw
// candidates_factor × K candidate seeds and keep the K whose perturbations have the highest cosine
// similarity with the reference.

#include <memory>
#include <vector>

#include "lora/adapter.h"
#include "optim/parameters.h"
#include "optim/trainer.h"

namespace seedling::optim {

struct FwdGradOptions {
  enum class Mode { kBatchedJvp, kForwardAD, kCentralDifference };
  Mode mode = Mode::kBatchedJvp;
  int64_t perturbations = 8;       // K per step
  int64_t tangents_per_pass = 0;   // kBatchedJvp: tangents carried by one forward (memory grows with it); 0 = K
  int64_t mlp_chunk_tokens = 0;    // kBatchedJvp: MLP tokens per chunk (ForwardOptions); 0 = all
  double lr = 1e-3;                // local SGD step θ -= lr · g (apply_locally)
  double fd_epsilon = 1e-2;        // h of the central difference
  int64_t candidates_factor = 10;  // candidates per kept perturbation when a reference gradient is set
  bool apply_locally = true;       // update θ after each step (off: only estimate, as a pure FwdLLM client)
  int64_t ce_chunk_tokens = 0;     // cross-entropy rows per chunk; 0 = all (tiles bound the memory)
  uint64_t seed = 0;               // perturbation seeds are StepSeed-derived from this
};

// One step's estimate as seeds and derivatives.
struct ForwardGradient {
  std::vector<uint64_t> seeds;
  std::vector<float> derivatives;  // d_k, same order as seeds
  int64_t numel = 0;               // length of the parameter vector
};

// g = (1/K) Σ_k d_k z(seed_k), accumulated in seed order with one rounding per element per term; the
// trainer builds its dense estimate with exactly this function, so the result is bit-identical.
at::Tensor RebuildEstimate(const ForwardGradient& g);

class FwdGradTrainer : public LocalTrainer {
 public:
  // Trains the adapter's flat buffer. `model` and `adapter` must outlive the trainer.
  static absl::StatusOr<std::unique_ptr<FwdGradTrainer>> Create(const model::LlamaModel& model,
                                                                lora::LoraAdapter& adapter,
                                                                const FwdGradOptions& options);
  Method method() const override { return Method::kFwdGrad; }
  absl::StatusOr<StepResult> Step(const model::Batch& batch) override;

  // The last step's estimate, as pairs and dense.
  const ForwardGradient& last_gradient() const { return last_; }
  const at::Tensor& last_estimate() const { return last_dense_; }
  // Sum of the dense estimates of all non-skipped steps (what a FwdLLM client uploads, with its count).
  const at::Tensor& accumulated_estimate() const { return accumulated_; }
  // The same sum as (seed, d_k / K) pairs of every perturbation of every non-skipped step, in order: the
  // compact upload (Σ value · z(seed) rebuilds the sum).
  const std::vector<std::pair<uint64_t, float>>& all_pairs() const { return all_pairs_; }

  TrainerState SaveState() const override;  // + the accumulated estimate "accumulated"
  absl::Status RestoreState(const TrainerState& state) override;

  // Reference direction for discriminative sampling (e.g. the previous round's global gradient), 1-D with
  // the adapter's numel(); an undefined tensor turns discriminative sampling off.
  absl::Status SetReference(at::Tensor reference);

  // Directional derivative of the batch loss along z(seed) at the current parameters (no update), by the
  // forward-AD or central-difference mode (kBatchedJvp uses forward AD here).
  absl::StatusOr<double> DirectionalDerivative(const model::Batch& batch, uint64_t seed, double* loss);
  // The derivatives along z(seeds[k]) for all k from batched forwards of at most tangents_per_pass tangents
  // each (no update); `loss` receives the batch loss.
  absl::StatusOr<std::vector<double>> DirectionalDerivatives(const model::Batch& batch,
                                                             const std::vector<uint64_t>& seeds, double* loss);

 private:
  FwdGradTrainer(const model::LlamaModel& model, lora::LoraAdapter& adapter, const FwdGradOptions& options);
  std::vector<uint64_t> PickSeeds(uint64_t step_seed) const;

  const model::LlamaModel& model_;
  lora::LoraAdapter& adapter_;
  const FwdGradOptions options_;
  ParameterSet params_;
  at::Tensor reference_;
  ForwardGradient last_;
  at::Tensor last_dense_;
  at::Tensor accumulated_;
  std::vector<std::pair<uint64_t, float>> all_pairs_;
};

}  // namespace seedling::optim
