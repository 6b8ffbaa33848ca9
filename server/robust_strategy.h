#pragma once

// Robust aggregation as a Strategy wrapper (docs/operations.md, "[strategy] robust"): defences against devices
// that upload hostile updates (scaled, sign-flipped, noise) in plaintext rounds of the fedavg family. The
// wrapper decodes and validates each update itself, combines the round's updates by a robust rule, and hands
// the result to the inner fedavg-family strategy as one SummedUpdate whose mean is the robust aggregate, so the
// server optimizer (fedavgm, fedadam, ...) and its checkpointed buffers work unchanged:
//
//   norm          each update scaled to L2 norm ≤ B (norm bounding; Sun et al., "Can You Really Backdoor
//                 Federated Learning?", 2019), then averaged. B = norm_bound when set: streams, O(P) memory.
//                 norm_bound = 0: B = the median of the round's update norms (holds the round's updates).
//   median        coordinate-wise median (Yin et al. 2018)
//   trimmed-mean  coordinate-wise mean after dropping b = ⌈β·n⌉ values at each end (Yin et al. 2018)
//   krum          multi-Krum: the mean of the m updates of the lowest Krum scores, with f attackers assumed
//                 (Blanchard et al. 2017; m = 1 is Krum); rounds need n ≥ 2f + 3 updates
//
// (formulas: server/internal/robust_aggregation.h). Every rule counts each client once: example counts are
// reported by the devices themselves, and an attacker would claim a huge one. Δ̄ = the robust aggregate, then
// the inner server optimizer step.
//
// Memory. median, trimmed-mean, krum and norm with norm_bound = 0 are not streamable: they hold every update
// of the round, decoded, until it ends: max_updates × P × 4 bytes (max_updates = clients_per_round, the most a
// round accepts), plus O(P) for the result (krum also O(n²) distances). MakeRobustStrategy refuses a setting
// above kMaxRobustHeldBytes. norm with a fixed bound holds one fp32 scratch vector.
//
// Where it does not apply (refused by MakeRobustStrategy and the config): fwdgrad and kseed (their uploads are
// gradient estimates and seed scalars, not parameter deltas the rules compare); secure aggregation (the
// server sees only the sum, never an update to compare or bound); client-level DP (DP-FedAvg's clipping
// already bounds every update's norm, and the Gaussian noise is calibrated to a sum's sensitivity C: a median,
// a trimmed mean or a Krum selection has another sensitivity, which needs its own analysis).
//
// Thread-safe: one mutex serializes Accumulate.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/robust_options.h"
#include "server/strategy.h"

namespace seedling::server {

// The most a holding rule may keep per round: 1 GiB of decoded updates.
inline constexpr uint64_t kMaxRobustHeldBytes = uint64_t{1} << 30;

class RobustStrategy final : public Strategy {
 public:
  // Use MakeRobustStrategy, which validates.
  RobustStrategy(std::unique_ptr<Strategy> inner, RobustOptions options, double max_update_norm, int64_t max_updates);

  std::string name() const override { return options_.rule + "-" + inner_->name(); }
  void ConfigureTask(uint64_t round_index, v1::Task& task) const override { inner_->ConfigureTask(round_index, task); }
  absl::Status BeginRound(const GlobalModel& global) override;
  // Decodes and validates (dense codec, length P, finite values, num_examples > 0, L2 norm ≤ max_update_norm
  // when set): InvalidArgument with the reason, nothing kept. ResourceExhausted beyond max_updates updates
  // in a round. A fixed norm bound streams the bounded update into the inner strategy; the other rules keep it.
  absl::Status Accumulate(const UpdateView& update) override;
  // Unimplemented: a pre-summed aggregate (secure aggregation) cannot be inspected update by update.
  absl::Status AccumulateSum(const SummedUpdate& sum) override;
  void RecordFailure(const std::string& device_id, const std::string& reason) override;
  int64_t accumulated() const override;
  // The robust aggregate, then the inner strategy's step. FailedPrecondition (nothing applied) when nothing
  // was accumulated, the global model's length changed, or krum has fewer than 2f + 3 updates.
  // Metrics: the inner strategy's "update_norm"; "clients", "examples" (Σ n_c, not used as weights),
  // "mean_client_norm" (before the rule) and "failures" of the real updates; "robust_bounded" and
  // "robust_norm_bound" (norm: updates scaled down, and B), "robust_trimmed" (trimmed-mean: b per side),
  // "robust_selected" (krum: m).
  absl::StatusOr<RoundOutcome> FinishRound(GlobalModel& global) override;

 private:
  // The robust mean Δ̄ of the held updates into `out` (P,), with the rule's metrics. Requires mu_.
  absl::Status AggregateHeldLocked(std::span<float> out, std::map<std::string, double>& metrics)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Constant after construction.
  const std::unique_ptr<Strategy> inner_;
  const RobustOptions options_;
  const double max_update_norm_;  // 0 = no cap
  const int64_t max_updates_;     // updates held per round (holding rules)

  mutable absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  size_t numel_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::vector<float>> held_ ABSL_GUARDED_BY(mu_);  // (n, P) the round's decoded updates
  std::vector<double> held_norms_ ABSL_GUARDED_BY(mu_);        // (n,) their L2 norms
  std::vector<float> scratch_ ABSL_GUARDED_BY(mu_);            // (P,) streaming norm bound: the bounded update
  int64_t clients_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t examples_ ABSL_GUARDED_BY(mu_) = 0;
  double client_norm_sum_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bounded_ ABSL_GUARDED_BY(mu_) = 0;  // streaming norm bound: updates scaled down
  int64_t failures_ ABSL_GUARDED_BY(mu_) = 0;
};

// Wraps `inner` (a fedavg-family strategy built with max_update_norm = 0: the wrapper enforces the cap)
// after validating: InvalidArgument for bad options, an inner strategy outside the fedavg family, n_max =
// max_updates < MinRobustUpdates, or a holding rule whose max_updates × num_parameters × 4 bytes exceed
// kMaxRobustHeldBytes. With rule "none", returns `inner` unchanged.
absl::StatusOr<std::unique_ptr<Strategy>> MakeRobustStrategy(std::unique_ptr<Strategy> inner,
                                                             const RobustOptions& options, double max_update_norm,
                                                             int64_t max_updates, int64_t num_parameters);

}  // namespace seedling::server
