#pragma once

// kseed: FedKSeed (Qin et al., ICML'24). The server fixes a pool of K candidate seeds for the whole run.
// Every local step picks one seed from the pool (uniformly, or by importance: FedKSeed-Pro) and runs one
// SPSA probe along z(seed), giving one scalar ĝ; the step applies θ −= lr · ĝ · z(seed). The local result
// is the list of (seed index, ĝ) pairs: a few kilobytes for any model size.
//
// The model of a round is defined by per-seed scalar sums: θ ← θ − lr · Σ_i G_i z(pool[i]), applied by
// ApplySeedSums in ascending seed index with one AddNormal per seed. Replaying a history of rounds
// (ReplaySeedHistory) is that same function applied round after round, so a client that replays the
// history from θ0 holds exactly the bits of a client that applied each round as it came; with
// exact_restore the device's own local trajectory also equals the replay of its pairs. Constant learning
// rate (replay needs it). Published defaults: K = 4096, ε = 5e-4, 200 local steps at batch 1.

#include <cstdint>
#include <memory>
#include <vector>

#include "lora/adapter.h"
#include "optim/mezo.h"
#include "optim/parameters.h"
#include "optim/trainer.h"

namespace seedling::optim {

// The K candidate seeds of a run, a fixed function of (pool_seed, K).
std::vector<uint64_t> CandidateSeeds(uint64_t pool_seed, int64_t k);

struct SeedScalar {
  uint32_t index = 0;  // into the candidate pool
  float value = 0;     // projected gradient ĝ (or a sum of them)
};

// Per-seed sums of `pairs`, each scaled by `weight`, sorted by index; zero sums are dropped.
std::vector<SeedScalar> SumPerSeed(const std::vector<SeedScalar>& pairs, double weight = 1.0);

// θ −= lr · Σ_i G_i z(pool[i]) for the given per-seed sums (any order: applied in ascending index).
// InvalidArgument for an index outside the pool or a non-finite sum; θ is untouched on error.
absl::Status ApplySeedSums(const ParameterSet& params, const std::vector<uint64_t>& pool, std::vector<SeedScalar> sums,
                           double lr);

// Applies rounds of per-seed sums in order (a client syncing from an older model).
absl::Status ReplaySeedHistory(const ParameterSet& params, const std::vector<uint64_t>& pool,
                               const std::vector<std::vector<SeedScalar>>& rounds, double lr);

// FedKSeed-Pro sampling probabilities from each seed's history of scalars:
// p = softmax(minmax_normalize(mean_i |clip(g_i, ±clip)|)); seeds without history count as 0.
std::vector<double> SeedProbabilities(const std::vector<std::vector<float>>& history, double clip = 1000.0);

struct KSeedOptions {
  int64_t pool_size = 4096;  // K
  uint64_t pool_seed = 0;    // the server's pool seed
  double lr = 3e-7;          // constant (FedKSeed's published value for full parameters)
  double epsilon = 5e-4;     // SPSA ε
  // Restore θ after each probe from a copy, so the local trajectory equals ReplaySeedHistory of pairs()
  // bit for bit (one copy of the parameters: cheap for an adapter). Off: MeZO's in-place restore.
  bool exact_restore = true;
  // q seeds per step, each probed (SPSA) and applied with ĝ_i / q, recorded as q pairs (index, ĝ_i / q).
  int64_t perturbations = 1;
  bool batched = false;               // the 2q probes in one batched forward (mezo.h, BatchedSpsa; LoRA only)
  std::vector<double> probabilities;  // FedKSeed-Pro sampling weights over the pool; empty = uniform
  int64_t ce_chunk_tokens = 0;        // cross-entropy rows per chunk; 0 = all (tiles bound the memory)
  int64_t mlp_chunk_tokens = 0;       // MLP tokens per chunk (ForwardOptions); 0 = all
  uint64_t seed = 0;                  // the device's sampling seed
};

class KSeedTrainer : public LocalTrainer {
 public:
  static absl::StatusOr<std::unique_ptr<KSeedTrainer>> Create(const model::LlamaModel& model,
                                                              lora::LoraAdapter* adapter, ParameterSet params,
                                                              const KSeedOptions& options);
  Method method() const override { return Method::kKSeed; }
  absl::StatusOr<StepResult> Step(const model::Batch& batch) override;

  const std::vector<uint64_t>& pool() const { return pool_; }
  // (seed index, ĝ) of every applied step, in step order.
  const std::vector<SeedScalar>& pairs() const { return pairs_; }
  const ParameterSet& parameters() const { return params_; }
  TrainerState SaveState() const override;  // + the pairs so far
  absl::Status RestoreState(const TrainerState& state) override;

 private:
  KSeedTrainer(const model::LlamaModel& model, lora::LoraAdapter* adapter, ParameterSet params,
               const KSeedOptions& options, std::vector<uint64_t> pool, std::vector<double> cdf)
      : model_(model),
        adapter_(adapter),
        params_(std::move(params)),
        options_(options),
        pool_(std::move(pool)),
        cdf_(std::move(cdf)) {}
  // The q pool indices of step `step` (q = options.perturbations), drawn in order from the step's seed.
  std::vector<uint32_t> PickIndices(uint64_t step) const;

  const model::LlamaModel& model_;
  lora::LoraAdapter* adapter_;
  ParameterSet params_;
  const KSeedOptions options_;
  const std::vector<uint64_t> pool_;
  const std::vector<double> cdf_;  // cumulative probabilities; empty = uniform
  std::vector<SeedScalar> pairs_;
};

}  // namespace seedling::optim
