#pragma once

// mezo: zeroth-order SPSA as in MeZO (Malladi et al., NeurIPS'23), on the LoRA flat buffer or on every
// weight. Per step, with z = z(seed) regenerated from the seed each time and never stored:
//   θ += εz → L+;  θ −= 2εz → L−;  θ += εz (restore);  ĝ = (L+ − L−) / 2ε;  θ −= lr · ĝ · z
// so memory is that of inference. Published defaults: ε = 1e-3 and lr 1e-6..1e-7 for full parameters,
// ε = 1e-2 and lr 1e-4..5e-5 for LoRA.

#include <memory>
#include <vector>

#include "lora/adapter.h"
#include "optim/parameters.h"
#include "optim/trainer.h"

namespace seedling::optim {

struct MezoOptions {
  double lr = 1e-4;  // SGD step on ĝ z
  // q SPSA probes per step, averaged (MeZO's n-SPSA): θ −= lr · (1/q) Σ_i ĝ_i z_i. q = 1 is MeZO's default.
  int64_t perturbations = 1;
  // Evaluate the 2q perturbed losses in one batched forward over 2q copies of the batch, each through its own
  // perturbed adapter (BatchedSpsa; LoRA only), instead of perturbing θ in place between forwards.
  bool batched = false;
  // Restore θ after the probes from a copy (bit-exact, costs one copy of the parameters) instead of by
  // adding +εz back (MeZO's way: memory-free, leaves float rounding of about 1e-7 relative).
  bool exact_restore = false;
  double epsilon = 1e-2;         // perturbation scale ε
  double weight_decay = 0.0;     // θ −= lr · wd · θ (MeZO exempts nothing here: the set is chosen by the caller)
  int64_t ce_chunk_tokens = 0;   // cross-entropy rows per chunk; 0 = all (tiles bound the memory)
  int64_t mlp_chunk_tokens = 0;  // MLP tokens per chunk (ForwardOptions); 0 = all
  uint64_t seed = 0;             // step seeds are StepSeed(seed, step)
};

// One SPSA probe along z(seed): perturbs, measures, restores. `projected_gradient` = (L+ − L−) / 2ε.
// With exact_restore, θ is copied first and restored bit for bit; otherwise restored by +εz.
struct SpsaProbe {
  double loss_plus = 0;
  double loss_minus = 0;
  double projected_gradient = 0;
  bool finite() const;
};
absl::StatusOr<SpsaProbe> Spsa(const model::LlamaModel& model, const model::Batch& batch,
                               const model::ForwardOptions& forward, const ParameterSet& params, uint64_t seed,
                               double epsilon, bool exact_restore = false);

// q SPSA probes along z(seeds[i]) from one forward over 2q copies of the batch: copy 2i sees the adapter
// at θ + εz_i, copy 2i + 1 at θ − εz_i (lora::LoraAdapter::SetPerturbations); θ is never written, so there
// is nothing to restore. `forward.adapter` must be `adapter`. Activations are 2q times a single forward's.
absl::StatusOr<std::vector<SpsaProbe>> BatchedSpsa(const model::LlamaModel& model, const model::Batch& batch,
                                                   const model::ForwardOptions& forward, lora::LoraAdapter& adapter,
                                                   const std::vector<uint64_t>& seeds, double epsilon);

// The q probe seeds of a step: the step seed itself for q = 1 (MeZO), else q draws from it.
std::vector<uint64_t> ProbeSeeds(uint64_t step_seed, int64_t q);

// The probes of one step, batched (BatchedSpsa; `adapter` required) or one after another (Spsa; with an
// adapter above the lowest layers, those layers run once for all the step's probes: LlamaModel::BaseLayers).
absl::StatusOr<std::vector<SpsaProbe>> RunProbes(const model::LlamaModel& model, const model::Batch& batch,
                                                 const model::ForwardOptions& forward, lora::LoraAdapter* adapter,
                                                 const ParameterSet& params, const std::vector<uint64_t>& seeds,
                                                 double epsilon, bool batched, bool exact_restore);
// Mean of (L+ + L−) / 2 over the probes; whether every probe is finite.
double MeanProbeLoss(const std::vector<SpsaProbe>& probes);
bool AllFinite(const std::vector<SpsaProbe>& probes);

class MezoTrainer : public LocalTrainer {
 public:
  // `model` (and the tensors of `params`) must outlive the trainer. `adapter` may be null when `params`
  // are the model's own weights.
  static absl::StatusOr<std::unique_ptr<MezoTrainer>> Create(const model::LlamaModel& model, lora::LoraAdapter* adapter,
                                                             ParameterSet params, const MezoOptions& options);
  Method method() const override { return Method::kMezo; }
  absl::StatusOr<StepResult> Step(const model::Batch& batch) override;
  const ParameterSet& parameters() const { return params_; }

 private:
  MezoTrainer(const model::LlamaModel& model, lora::LoraAdapter* adapter, ParameterSet params,
              const MezoOptions& options)
      : model_(model), adapter_(adapter), params_(std::move(params)), options_(options) {}

  absl::StatusOr<std::vector<SpsaProbe>> Probe(const model::Batch& batch, const model::ForwardOptions& fo,
                                               const std::vector<uint64_t>& seeds) const;

  const model::LlamaModel& model_;
  lora::LoraAdapter* adapter_;
  ParameterSet params_;
  const MezoOptions options_;
};

}  // namespace seedling::optim
