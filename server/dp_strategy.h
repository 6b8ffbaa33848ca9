#pragma once

// Client-level differential privacy as a Strategy wrapper (docs/architecture.md, "The server" and "Privacy"): DP-FedAvg
// (McMahan et al. 2018, docs/methods.md, "Differential privacy (DP-FedAvg and the accountant)") around any built-in
// strategy, which keeps doing the server optimizer step (fedavg family), FwdLLM's step (fwdgrad) or FedKSeed's seed-sum
// step (kseed).
//
// Per round, with clip norm C, noise multiplier z and expected clients m = q·N (the fixed denominator):
//   1. Accumulate: each update is decoded and validated (as the inner strategy would), rejected above
//      max_update_norm when that cap is set, then clipped: dense updates (Δ_c, or g_c for fwdgrad) flat in
//      L2 to C (Alg. 1 ClipFn, privacy::ClipToL2Norm); kseed uploads scalar by scalar to |ĝ| ≤ C
//      (privacy::ClipScalars) and then, summed per seed index, as a K-vector to L2 norm C, because a client
//      may upload many scalars and only the whole per-seed vector's norm bounds its sensitivity.
//      Clients clip before upload too (the task carries C); the server clips again because a codec's
//      rounding can push a clipped update a little above C and a client may not be honest.
//      Every client has weight 1 (uniform w_k): example-count weights would make the sensitivity
//      unbounded. S = Σ_c clip(Δ_c) is kept in double.
//   2. FinishRound: Δ = (S + N(0, z²C² I)) / m  (Alg. 1 lines 4–5 with w_k = 1, W = N: the noise is added to
//      the sum, whose sensitivity is C, and the result is divided by the fixed m, never by the number of
//      clients that actually reported, which is itself private). For kseed the noise goes on all K
//      per-seed sums, not only on seeds someone used (which seeds were used would otherwise leak).
//      Δ is then handed to the inner strategy as one update of weight 1 (fp32 for dense strategies, K
//      (index, value) pairs for kseed): the inner strategy's mean of one update is Δ itself, so its
//      optimizer, buffers, schedules and kseed's published sums work unchanged, through its interface.
//   Noise is added once per round to the aggregate, not per client (central DP: the server is trusted with
//   the sum; with SecAgg it only ever sees the sum).
//
// DP-FTRL (mechanism kTreeAggregation; Kairouz et al. 2021, privacy/tree_aggregation.h; docs/methods.md,
// "DP-FTRL (tree aggregation)"): step 2 adds, instead of fresh noise, the tree's noise increment. Round t of
// the run (global.version = t − 1 committed before it) is leaf τ = (t − 1) mod R + 1 of tree ⌊(t − 1) / R⌋
// (R = tree_restart_rounds), and
//      Δ_t = (s_t + Σ_{v ∈ cover(τ)} n_v − Σ_{v ∈ cover(τ−1)} n_v) / m = (S_τ − S_{τ−1}) / m,
// the difference of two consecutive noisy prefix sums. With the fedavg inner strategy (θ ← θ + η Δ) the model
// is θ_t = θ_start + η S_τ / m: FTRL on the noisy prefix sums, restarted at each tree's first round; fedavgm
// adds heavy-ball momentum on the increments, which equals momentum on the prefix sums (DP-FTRLM). Any other
// inner strategy is a post-processing of the released S_τ and keeps the guarantee. The node noise is a pure
// function of (key or seed, node), so a strategy re-created at version t (a server restart) adds exactly the
// noise the tree prescribes.
//
// Metrics: the inner strategy's ("update_norm", "lr", "seeds"), with "clients", "examples",
// "mean_client_norm" (before clipping) and "failures" of the real updates, plus "dp_clipped" (updates
// whose norm exceeded C), "dp_noise_stddev" (z·C/m, the noise's std on each coordinate of Δ) and
// "dp_expected_clients" (m); with DP-FTRL also "dp_tree", "dp_tree_round" (τ) and "dp_prefix_noise_stddev"
// (σ·√popcount(τ)/m, the noise's std in S_τ/m; "dp_noise_stddev" is then that of the increment in Δ).
//
// Memory: O(model): a double sum and an fp32 scratch vector (12 bytes per parameter; kseed K doubles), plus
// what the inner strategy holds. Thread-safe like the built-in strategies (one mutex).

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "privacy/dp.h"
#include "privacy/tree_aggregation.h"
#include "server/config.h"
#include "server/strategy.h"

namespace seedling::server {

enum class DpMechanism {
  kGaussian,         // fresh N(0, z²C² I) on each round's sum (DP-FedAvg; RDP accountant with sampling)
  kTreeAggregation,  // DP-FTRL: the tree's noisy prefix sums (zCDP, no sampling assumption)
};

struct DpStrategyOptions {
  DpMechanism mechanism = DpMechanism::kGaussian;
  int64_t tree_restart_rounds = 0;  // R, rounds per tree, in [1, 2^32] with kTreeAggregation
  double clip_norm = 0;             // C, > 0
  double noise_multiplier = 0;      // z, ≥ 0 (0 only in tests: no privacy)
  double expected_clients = 0;      // m = q·N, the fixed denominator, > 0
  double max_update_norm = 0;       // reject (not clip) updates above this L2 norm; 0 = no cap
  uint32_t kseed_pool_size = 4096;  // K, when the inner strategy is kseed
};

class DpStrategy final : public Strategy {
 public:
  // Takes ownership of `inner` (which must not cap update norms itself: the aggregate it is given is not
  // a client update) and of the noise: `noise` for kGaussian, `tree_noise` for kTreeAggregation (the other
  // null). Use MakeDpStrategy / MakeDpFtrlStrategy, which validate.
  DpStrategy(std::unique_ptr<Strategy> inner, DpStrategyOptions options, std::unique_ptr<privacy::NoiseSource> noise,
             std::unique_ptr<privacy::NodeNoise> tree_noise);

  std::string name() const override { return "dp-" + inner_->name(); }
  void ConfigureTask(uint64_t round_index, v1::Task& task) const override;
  absl::Status BeginRound(const GlobalModel& global) override;
  absl::Status Accumulate(const UpdateView& update) override;
  // Secure aggregation (server/secagg_strategy.h): S += the unmasked sum, which the server cannot clip
  // (the clients clipped to C before masking; the task carries C). Every weight must be 1: InvalidArgument
  // unless total_weight = clients. Dense inner strategies only (Unimplemented for kseed and fwdgrad).
  absl::Status AccumulateSum(const SummedUpdate& sum) override;
  void RecordFailure(const std::string& device_id, const std::string& reason) override;
  int64_t accumulated() const override;
  // Internal if the noise source fails (nothing is applied: a round is never released without noise).
  absl::StatusOr<RoundOutcome> FinishRound(GlobalModel& global) override;

 private:
  absl::Status AccumulateDenseLocked(const UpdateView& update) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status AccumulateSeedsLocked(const UpdateView& update) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const std::unique_ptr<Strategy> inner_;
  const DpStrategyOptions options_;
  const bool kseed_;    // inner is kseed: (seed index, scalar) uploads
  const bool fwdgrad_;  // inner is fwdgrad: also (seed, scalar) uploads, rebuilt as dense vectors

  mutable absl::Mutex mu_;
  std::unique_ptr<privacy::NoiseSource> noise_ ABSL_GUARDED_BY(mu_);     // kGaussian
  std::unique_ptr<privacy::NodeNoise> tree_noise_ ABSL_GUARDED_BY(mu_);  // kTreeAggregation
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  size_t numel_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<double> sum_ ABSL_GUARDED_BY(mu_);     // (P,) Σ_c clip(Δ_c); kseed: (K,) Σ_c clip(v_c)
  std::vector<float> scratch_ ABSL_GUARDED_BY(mu_);  // (P,) the update being clipped (dense only)
  int64_t clients_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t examples_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t clipped_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t failures_ ABSL_GUARDED_BY(mu_) = 0;
  double client_norm_sum_ ABSL_GUARDED_BY(mu_) = 0;
};

// Wraps `inner` (built with max_update_norm = 0) after validating the options: InvalidArgument unless
// clip_norm is finite and > 0, noise_multiplier finite and ≥ 0, expected_clients finite and > 0,
// max_update_norm finite and ≥ 0, and `noise` non-null.
absl::StatusOr<std::unique_ptr<Strategy>> MakeDpStrategy(std::unique_ptr<Strategy> inner,
                                                         const DpStrategyOptions& options,
                                                         std::unique_ptr<privacy::NoiseSource> noise);

// DP-FTRL: as MakeDpStrategy with options.mechanism = kTreeAggregation and the tree's node noise; also
// InvalidArgument unless tree_restart_rounds is in [1, privacy::kMaxTreeLeaves] and `tree_noise` non-null.
absl::StatusOr<std::unique_ptr<Strategy>> MakeDpFtrlStrategy(std::unique_ptr<Strategy> inner,
                                                             const DpStrategyOptions& options,
                                                             std::unique_ptr<privacy::NodeNoise> tree_noise);

// DP-FTRL's durable tree state, <state_dir>/dp-ftrl-tree (mode 0600, written atomically): the settings the
// accounting depends on (tree_restart_rounds, max_participations_per_tree, noise) and, with noise = "csprng",
// the 256-bit node-noise key (privacy::KeyedNodeNoise; as secret as the noise). Created when the strategy of
// a fresh run (committed version 0) is made, before any round can commit; every later start must find it
// with the same settings. Returns the node noise: keyed (csprng) or privacy::SeededNodeNoise(seed) (seeded).
// FailedPrecondition when the file is missing at a committed version > 0 (the key is lost or the rounds were
// not DP-FTRL: the tree cannot go on without releasing a node twice with different noise) or when its
// settings differ from `privacy` (the trees and their accounting would change under committed rounds);
// DataLoss for a malformed file; the file system's error when it cannot be read or written.
absl::StatusOr<std::unique_ptr<privacy::NodeNoise>> OpenTreeNoise(const std::string& state_dir,
                                                                  const PrivacyConfig& privacy, uint64_t seed,
                                                                  uint64_t committed_version);

}  // namespace seedling::server
