#pragma once

// Aggregation strategies (docs/architecture.md, "The server"): objects that configure a round's tasks and
// aggregate its accepted updates into the global model. Aggregation streams: each update is decoded and
// added as it arrives, so server memory is O(model) whatever the number of clients. Failures (rejected or
// vanished devices) are passed in as data. DP and secure aggregation wrap a Strategy (server/dp_strategy.h,
// server/secagg_strategy.h); they are not flags in here.
//
//   fedavg      θ ← θ + η · Σ n_c Δ_c / Σ n_c                      (McMahan et al. 2017; η = server_lr, 1)
//   fedavgm     m ← μ m + Δ̄;  θ ← θ + η m                            (Hsu et al. 2019)
//   fedadam     m ← β1 m + (1−β1) Δ̄;  v ← β2 v + (1−β2) Δ̄²;  θ ← θ + η m / (√v + τ)   (Reddi et al. 2021,
//   fedyogi     v ← v − (1−β2) Δ̄² sign(v − Δ̄²)                        no bias correction)
//   fedadagrad  v ← v + Δ̄²
//   fwdgrad     θ ← θ − η_t Σ g_c / Σ n_c, η_t warmed up linearly over 6% of the rounds, then decayed
//               linearly to 0 (FwdLLM); g_c dense or as (seed, scalar) pairs rebuilt on the server.
//               With pacing (server/fwdgrad_pacing.h) a round whose pooled estimate is too noisy is held
//               (θ unchanged, Σ g_c and Σ g_c²/n_c kept in buffers "fwdgrad_cache_sum" / "fwdgrad_cache_sq",
//               K and the pool's counts in "fwdgrad_pacing") and pooled with the next round's, whose tasks
//               carry hyperparameters["perturbations"] = the raised K
//   kseed       per-seed sums G_i = Σ_c (n_c / Σ n) ĝ_c,i;  θ ← θ − lr Σ_i G_i z(pool[i]) in ascending i
//               (FedKSeed; the same arithmetic as optim::ApplySeedSums, so clients replaying agree bit for bit)
// Δ_c is the client's change of the trainable vector (θ_local − θ_global); Δ̄ the example-weighted mean.
// With staleness (fedbuff mode, UpdateView::staleness τ_c) the fedavg family and fwdgrad add w(τ_c) n_c Δ_c
// (w(τ_c) g_c) to the sum but n_c to the total, so Δ̄ = Σ w(τ_c) n_c Δ_c / Σ n_c: with equal n_c this is
// FedBuff's (1/K) Σ w(τ_i) Δ_i (stale updates shrink the step, they do not renormalize it). kseed refuses
// stale updates (its per-seed sums are replayed by clients; no staleness rule is defined for them).
//
// The fedavg family (the server optimizers live in optim/server_optimizer.h): m_{−1} = 0 and, for the
// adaptive three, v_{−1} = τ² (Reddi et al. Alg. 2 requires v_{−1} ≥ τ²); β1 applies to fedadagrad too
// (β1 = 0 gives plain Adagrad). State lives in global.buffers ("momentum" for fedavgm, "m" and "v" for
// fedadam / fedyogi / fedadagrad) so checkpoints carry it; a missing buffer is created on first use.
//
// Accepted payloads (comms/codec.h): the fedavg family takes dense codecs (fp32, fp16, int8, int4, top-k);
// fwdgrad takes dense codecs and CODEC_SEED_SCALARS (seed, value) pairs, g = Σ_k value_k z(seed_k) with z
// the perturbation stream over the whole vector from offset 0 (as optim::AddSeededNormal), rebuilt in pair
// order; kseed takes only CODEC_SEED_SCALARS (seed index, value) pairs. Dense and rebuilt updates must
// have the global vector's length, finite values and an L2 norm ≤ max_update_norm (when set); kseed
// scalars must index the pool and be finite (the norm cap does not apply to them: they are not a vector
// of parameters).
//
// kseed's lr travels as fp32 (v1::RoundSeedSums.lr), so the server applies, publishes and hands out in
// tasks (hyperparameters["lr"]) double(float(kseed_lr)): a client replaying the blob uses the same bits.
// The per-seed sums are accumulated in double per seed index and rounded to fp32 once; sums that round
// to 0 are dropped.
//
// Memory: a dense strategy holds a double accumulator and one fp32 scratch vector (12 bytes per
// parameter) from BeginRound on, whatever the number of clients; kseed holds K doubles.

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "comms/proto/seedling.pb.h"
#include "server/fwdgrad_pacing.h"

namespace seedling::server {

// The global state a strategy updates: the flat trainable vector and named optimizer buffers, all persisted
// in checkpoints.
struct GlobalModel {
  uint64_t version = 0;  // committed rounds so far; also the round index for schedules
  std::vector<float> params;
  std::map<std::string, std::vector<float>> buffers;
};

// Where `model` holds a NaN or an infinity ("params[12]", "buffers.adam_m[3]"), if anywhere. A model with
// one must never be committed or served: devices would train on it and every later round would be lost.
std::optional<std::string> FindNonFinite(const GlobalModel& model);

// One accepted update, as the strategy sees it.
struct UpdateView {
  std::string device_id;
  uint64_t num_examples = 0;  // weight (must be > 0)
  std::string_view payload;   // encoded with comms/codec.h
  // [strategy] mode = "fedbuff": how many server updates happened since the version the update was trained
  // from (τ); the fedavg family weighs it by StalenessWeight(τ). 0 in synchronous rounds (weight 1).
  uint64_t staleness = 0;
};

// FedBuff's polynomial staleness weight (Nguyen et al. 2022; FLSim PolynomialStalenessWeight):
// w(τ) = 1 / (1 + τ)^a with a = staleness_exponent in [0, 1]; a = 0.5 gives 1/√(1 + τ), a = 0 weighs every
// update 1.
double StalenessWeight(uint64_t staleness, double exponent);

// A pre-summed aggregate of several clients' updates (secure aggregation: the server only ever sees the
// sum). The same quantity the fedavg family accumulates update by update.
struct SummedUpdate {
  std::span<const float> weighted_sum;  // (P,) Σ_c w_c Δ_c
  uint64_t total_weight = 0;            // Σ_c w_c, > 0
  int64_t clients = 0;                  // how many clients the sum holds, > 0
};

struct RoundOutcome {
  std::string seed_sums_blob;  // kseed: serialized v1::RoundSeedSums of the round, else ""
  // Built-in strategies report: "clients" (updates accumulated), "examples" (Σ n_c), "update_norm"
  // (‖θ_new − θ_old‖₂ of the applied change), "mean_client_norm" (mean ‖Δ_c‖₂, ‖g_c‖₂ for fwdgrad, ‖ĝ_c‖₂
  // of the uploaded scalars for kseed), "failures" (RecordFailure calls this round); fwdgrad adds "lr"
  // (η_t), kseed "seeds" (non-zero per-seed sums). fwdgrad with pacing adds "perturbations" (K of the round's
  // tasks), "pacing_applied" (1 applied, 0 held), "pacing_pooled_rounds" (rounds in the pooled estimate) and,
  // when measured (two or more pooled clients), "gradient_variance" (EstimateGlobalVariance).
  std::map<std::string, double> metrics;
};

struct StrategyOptions {
  std::string name = "fedavg";  // fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fwdgrad, kseed
  double server_lr = 1.0;       // η for fedavg / fedavgm; fedadam family default 1e-2 in the config
  double momentum = 0.9;        // fedavgm μ
  double beta1 = 0.9;           // fedadam family
  double beta2 = 0.99;
  double tau = 1e-3;              // adaptivity ε, ≥ 1e-3 (Reddi et al.)
  double fwdgrad_lr = 0.01;       // fwdgrad peak η
  double warmup_fraction = 0.06;  // fwdgrad
  int64_t total_rounds = 100;     // fwdgrad schedule length
  double kseed_lr = 1e-4;         // kseed: the constant lr clients also use
  uint32_t kseed_pool_size = 4096;
  uint64_t kseed_pool_seed = 0;
  double max_update_norm = 0;       // reject dense updates whose L2 norm exceeds this; 0 = no cap
  double staleness_exponent = 0.5;  // a in StalenessWeight, [0, 1] (fedbuff mode; the paper's a = 0.5)
  // fwdgrad: variance-controlled pacing (server/fwdgrad_pacing.h; off by default).
  FwdGradPacingOptions fwdgrad_pacing;
};

// The message of AccumulateSum's Unimplemented error for strategy `name`.
std::string StrategyCannotTakeSums(std::string_view name);

class Strategy {
 public:
  virtual ~Strategy() = default;
  virtual std::string name() const = 0;
  // Adds what the strategy wants in a round's task (e.g. kseed's pool, fwdgrad's "apply_locally": 0).
  virtual void ConfigureTask(uint64_t round_index, v1::Task& task) const = 0;
  // Starts streaming aggregation for a round. Discards any unfinished previous round.
  virtual absl::Status BeginRound(const GlobalModel& global) = 0;
  // Decodes and validates (codec allowed for this strategy, length = params, finite, norm under the cap,
  // num_examples > 0) and accumulates. InvalidArgument with the reason leaves the aggregate unchanged;
  // FailedPrecondition before BeginRound. Thread-safe: concurrent calls are serialized (the built-in
  // strategies decode into one shared scratch buffer under a mutex).
  virtual absl::Status Accumulate(const UpdateView& update) = 0;
  // Adds a pre-summed aggregate (server/secagg_strategy.h) as if its clients' updates had been accumulated
  // one by one: the fedavg family adds Σ w_c Δ_c to its sum and Σ w_c to its weight, so the round's mean
  // is the same weighted mean of deltas. No norm cap applies (the server cannot see a single update).
  // InvalidArgument for a wrong length, a non-finite value or zero weight/clients (aggregate unchanged);
  // FailedPrecondition before BeginRound; Unimplemented for strategies whose aggregate is not a weighted
  // sum of what clients upload (fwdgrad, kseed: the default).
  virtual absl::Status AccumulateSum(const SummedUpdate& sum) {
    (void)sum;
    return absl::UnimplementedError(StrategyCannotTakeSums(name()));
  }
  // Rejected or vanished devices (for metrics; none of the built-in strategies changes its result).
  virtual void RecordFailure(const std::string& device_id, const std::string& reason) { (void)device_id, (void)reason; }
  // Number of updates accumulated in this round.
  virtual int64_t accumulated() const = 0;
  // Applies the round's aggregate to `global.params` / `global.buffers` (not `version`). FailedPrecondition
  // if nothing was accumulated.
  virtual absl::StatusOr<RoundOutcome> FinishRound(GlobalModel& global) = 0;
};

// InvalidArgument for an unknown name or bad options.
absl::StatusOr<std::unique_ptr<Strategy>> MakeStrategy(const StrategyOptions& options);

// Decodes a kseed round's seed_sums_blob (v1::RoundSeedSums). InvalidArgument if it does not parse, its lr
// is not finite and > 0, a value is not finite, or the indices are not strictly increasing. Indices are
// checked against the pool by optim::ApplySeedSums when the sums are applied.
absl::StatusOr<v1::RoundSeedSums> ParseSeedSums(std::string_view blob);

// fwdgrad's server learning rate for round t (= GlobalModel::version), FwdLLM's schedule
// (FedSgdAggregator.aggregate in github.com/UbiquitousLearning/FwdLLM), with T = total_rounds and
// W = ceil(T · warmup_fraction):
//   η_t = fwdgrad_lr · (t + 1) / max(1, W)                  for t < W   (linear warm-up, reaching η at t = W − 1)
//   η_t = fwdgrad_lr · max(0, (T − t) / max(1, T − W))      otherwise   (linear decay, 0 from t = T on)
double FwdGradLearningRate(const StrategyOptions& options, uint64_t round);

}  // namespace seedling::server
