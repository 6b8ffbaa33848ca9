#include "server/strategy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"
#include "comms/codec.h"
#include "optim/kseed.h"
#include "optim/server_optimizer.h"
#include "server/internal/update_checks.h"

namespace seedling::server {

using internal::InvalidUpdate;
using internal::IsDenseCodec;

namespace {

constexpr const char* kMomentumBuffer = "momentum";  // fedavgm
constexpr const char* kFirstMomentBuffer = "m";      // fedadam, fedyogi, fedadagrad
constexpr const char* kSecondMomentBuffer = "v";
// fwdgrad pacing (server/fwdgrad_pacing.h): the held estimate's Σ g_c and Σ g_c² / n_c, and
// [K of the next round's tasks, pooled Σ n_c, pooled clients, pooled rounds].
constexpr const char* kPacingSumBuffer = "fwdgrad_cache_sum";
constexpr const char* kPacingSquareBuffer = "fwdgrad_cache_sq";
constexpr const char* kPacingStateBuffer = "fwdgrad_pacing";
constexpr size_t kPacingStateSize = 4;

// "CODEC_FP32", "CODEC_SEED_SCALARS (seed index, scalar) pairs", ...
std::string PayloadKind(const comms::PayloadInfo& info) {
  const std::string& name = v1::Codec_Name(info.codec);
  std::string kind = name.empty() ? StrCat("codec ", static_cast<int>(info.codec)) : name;
  if (info.codec == v1::CODEC_SEED_SCALARS) {
    kind += info.seed_kind == comms::SeedScalarKind::kIndex ? " (seed index, scalar) pairs" : " (seed, scalar) pairs";
  }
  return kind;
}

absl::Status CodecNotAccepted(const std::string& strategy, const comms::PayloadInfo& info) {
  return absl::InvalidArgumentError(StrCat("strategy ", strategy, " does not accept codec ", PayloadKind(info)));
}

// A codec error is a malformed payload: InvalidArgument whatever code the codec chose, with its
// reason.
absl::Status InvalidPayload(const UpdateView& update, const absl::Status& status) {
  return InvalidUpdate(update, FromAbsl(status.message()));
}

// Bookkeeping shared by the built-in strategies: the round's counters, failures and the mutex that
// serializes Accumulate.
class RoundStrategy : public Strategy {
 public:
  explicit RoundStrategy(StrategyOptions options) : options_(std::move(options)) {}

  std::string name() const override { return options_.name; }

  void RecordFailure(const std::string& device_id, const std::string& reason) override {
    (void)device_id, (void)reason;
    absl::MutexLock lock(&mu_);
    ++failures_;
  }

  int64_t accumulated() const override {
    absl::MutexLock lock(&mu_);
    return clients_;
  }

 protected:
  // Starts a round over a vector of `numel` values. Requires mu_.
  void ResetRoundLocked(size_t numel) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    open_ = true;
    numel_ = numel;
    clients_ = 0;
    examples_ = 0;
    client_norm_sum_ = 0;
    failures_ = 0;
  }

  // Checks what every update needs before its payload is looked at. Requires mu_.
  absl::Status CheckUpdateLocked(const UpdateView& update) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return internal::CheckUpdateHeader(name(), open_, update, examples_);
  }

  // Counts an accepted update. Requires mu_.
  void CountLocked(const UpdateView& update, double client_norm) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ++clients_;
    examples_ += update.num_examples;
    client_norm_sum_ += client_norm;
  }

  absl::Status CheckFinishLocked(const GlobalModel& global) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!open_ || clients_ == 0) {
      return absl::FailedPreconditionError(StrCat("strategy ", name(), ": nothing accumulated in this round"));
    }
    if (global.params.size() != numel_) {
      return absl::FailedPreconditionError(
          StrCat("the global model has ", global.params.size(), " parameters; the round began with ", numel_));
    }
    return absl::OkStatus();
  }

  std::map<std::string, double> MetricsLocked(double update_norm) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return {{"clients", static_cast<double>(clients_)},
            {"examples", static_cast<double>(examples_)},
            {"update_norm", update_norm},
            {"mean_client_norm", client_norm_sum_ / static_cast<double>(clients_)},
            {"failures", static_cast<double>(failures_)}};
  }

  // Constant after construction.
  const StrategyOptions options_;

  mutable absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = false;      // between BeginRound and FinishRound
  size_t numel_ ABSL_GUARDED_BY(mu_) = 0;       // length of the global vector of this round
  int64_t clients_ ABSL_GUARDED_BY(mu_) = 0;    // accepted updates
  uint64_t examples_ ABSL_GUARDED_BY(mu_) = 0;  // Σ n_c
  double client_norm_sum_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t failures_ ABSL_GUARDED_BY(mu_) = 0;
};

// fedavg, fedavgm, fedadam, fedyogi, fedadagrad (a server optimizer step on the example-weighted
// mean change) and fwdgrad (server SGD on the example-weighted mean forward gradient).
class DenseStrategy final : public RoundStrategy {
 public:
  // `fwdgrad`: FwdLLM's rule (and seed-pair payloads) instead of `optimizer`.
  DenseStrategy(StrategyOptions options, optim::ServerOptimizerOptions optimizer, bool fwdgrad)
      : RoundStrategy(std::move(options)),
        optimizer_(optimizer),
        fwdgrad_(fwdgrad),
        paced_(fwdgrad && options_.fwdgrad_pacing.enabled) {}

  void ConfigureTask(uint64_t round_index, v1::Task& task) const override {
    (void)round_index;
    // FwdLLM clients only estimate: the server applies the averaged gradient.
    if (fwdgrad_) (*task.mutable_hyperparameters())["apply_locally"] = 0.0;
    if (paced_) {
      absl::MutexLock lock(&mu_);
      (*task.mutable_hyperparameters())["perturbations"] = static_cast<double>(round_perturbations_);
    }
  }

  absl::Status BeginRound(const GlobalModel& global) override {
    const size_t n = global.params.size();
    if (n == 0) return absl::FailedPreconditionError("the global model has no parameters");
    SEEDLING_RETURN_IF_ERROR(CheckBuffers(global));
    absl::MutexLock lock(&mu_);
    ResetRoundLocked(n);
    sum_.assign(n, 0.0);
    scratch_.assign(n, 0.0f);
    if (paced_) {
      // K of this round's tasks: the schedule's, as checkpointed (a restarted server continues it).
      const auto state = global.buffers.find(kPacingStateBuffer);
      round_perturbations_ = state == global.buffers.end() ? options_.fwdgrad_pacing.base_perturbations
                                                           : static_cast<int64_t>(state->second[0]);
      square_sum_.assign(n, 0.0);
      row_.assign(n, 0.0);
    }
    return absl::OkStatus();
  }

  absl::Status Accumulate(const UpdateView& update) override {
    absl::MutexLock lock(&mu_);
    SEEDLING_RETURN_IF_ERROR(CheckUpdateLocked(update));

    // Step 1: validate the whole update and measure its L2 norm (the aggregate is not touched until
    // step 3). Dense codecs are read in place from the payload; FwdLLM seed pairs are expanded into the
    // scratch buffer.
    absl::StatusOr<comms::PayloadInfo> info = comms::InspectPayload(update.payload);
    if (!info.ok()) return InvalidPayload(update, info.status());
    std::optional<comms::ValidatedDense> dense;
    double norm2 = 0.0;
    if (IsDenseCodec(info->codec)) {
      if (info->numel != numel_) {
        return InvalidUpdate(update, StrCat("the update has ", info->numel, " elements, the global model ", numel_));
      }
      absl::StatusOr<comms::ValidatedDense> validated = comms::ValidateDensePayload(update.payload);
      if (!validated.ok()) return InvalidPayload(update, validated.status());
      dense = *validated;
      norm2 = dense->squared_norm();
    } else if (fwdgrad_ && info->codec == v1::CODEC_SEED_SCALARS && info->seed_kind == comms::SeedScalarKind::kSeed) {
      // FwdLLM upload as pairs: g = Σ_k value_k z(seed_k) over the whole vector, offset 0, in pair
      // order (the same arithmetic as optim::AddSeededNormal / RebuildEstimate).
      absl::StatusOr<std::vector<comms::SeedValueScalar>> pairs = comms::DecodeSeedValueScalars(update.payload);
      if (!pairs.ok()) return InvalidPayload(update, pairs.status());
      std::fill(scratch_.begin(), scratch_.end(), 0.0f);
      for (const comms::SeedValueScalar& p : *pairs) {
        seedling::AddNormal({p.seed, rng_stream::kPerturbation}, 0, p.value, scratch_);
      }
      for (size_t i = 0; i < numel_; ++i) {
        const double v = scratch_[i];
        if (!std::isfinite(v)) return InvalidUpdate(update, StrCat("element ", i, " is not finite"));
        norm2 += v * v;
      }
    } else {
      return CodecNotAccepted(name(), *info);
    }

    // Step 2: the L2 norm under the cap.
    const double norm = std::sqrt(norm2);
    if (options_.max_update_norm > 0 && norm > options_.max_update_norm) {
      return InvalidUpdate(update, StrCat("L2 norm ", norm, " exceeds max_update_norm ", options_.max_update_norm));
    }

    // Step 3: add to the running sum: Σ n_c Δ_c for the fedavg family; Σ g_c for fwdgrad, whose g_c
    // is already a sum over the client's n_c examples' steps (FwdLLM divides the total by Σ n_c).
    // FedBuff: a stale update counts w(τ) of itself (the total stays Σ n_c).
    const double weight = (fwdgrad_ ? 1.0 : static_cast<double>(update.num_examples)) *
                          StalenessWeight(update.staleness, options_.staleness_exponent);
    if (paced_) {
      // Pacing also needs Σ g_c² / n_c: the update is decoded into a row first.
      if (dense) {
        std::fill(row_.begin(), row_.end(), 0.0);
        const absl::Status added = dense->AddTo(row_, weight);
        if (!added.ok()) return absl::InternalError(StrCat("adding a validated update: ", added.message()));
      } else {
        for (size_t i = 0; i < numel_; ++i) row_[i] = weight * static_cast<double>(scratch_[i]);
      }
      const double n = static_cast<double>(update.num_examples);
      for (size_t i = 0; i < numel_; ++i) {
        sum_[i] += row_[i];
        square_sum_[i] += row_[i] * row_[i] / n;
      }
    } else if (dense) {
      const absl::Status added = dense->AddTo(sum_, weight);
      if (!added.ok()) return absl::InternalError(StrCat("adding a validated update: ", added.message()));
    } else {
      for (size_t i = 0; i < numel_; ++i) sum_[i] += weight * static_cast<double>(scratch_[i]);
    }
    CountLocked(update, norm);
    return absl::OkStatus();
  }

  absl::Status AccumulateSum(const SummedUpdate& sum) override {
    // fwdgrad divides Σ g_c (unweighted) by Σ n_c: a weighted sum is not what it averages.
    if (fwdgrad_) return absl::UnimplementedError(StrategyCannotTakeSums(name()));
    absl::MutexLock lock(&mu_);
    if (!open_) return absl::FailedPreconditionError(StrCat("strategy ", name(), ": no round begun"));
    if (sum.weighted_sum.size() != numel_) {
      return absl::InvalidArgumentError(
          StrCat("the summed update has ", sum.weighted_sum.size(), " elements, the global model ", numel_));
    }
    if (sum.total_weight == 0 || sum.clients <= 0) {
      return absl::InvalidArgumentError("a summed update needs total_weight > 0 and clients > 0");
    }
    if (sum.total_weight > std::numeric_limits<uint64_t>::max() - examples_) {
      return absl::InvalidArgumentError(StrCat("total_weight ", sum.total_weight, " overflows the round's total"));
    }
    for (size_t i = 0; i < numel_; ++i) {
      if (!std::isfinite(sum.weighted_sum[i])) {
        return absl::InvalidArgumentError(StrCat("element ", i, " of the summed update is not finite"));
      }
    }
    for (size_t i = 0; i < numel_; ++i) sum_[i] += static_cast<double>(sum.weighted_sum[i]);
    clients_ += sum.clients;
    examples_ += sum.total_weight;
    return absl::OkStatus();
  }

  absl::StatusOr<RoundOutcome> FinishRound(GlobalModel& global) override {
    absl::MutexLock lock(&mu_);
    SEEDLING_RETURN_IF_ERROR(CheckFinishLocked(global));
    SEEDLING_RETURN_IF_ERROR(CheckBuffers(global));
    if (paced_) return FinishPacedRoundLocked(global);

    // The round's mean, rounded once to fp32 (into the scratch buffer, no longer needed for
    // decoding): fedavg family Δ̄ = Σ n_c Δ_c / Σ n_c; fwdgrad ḡ = Σ g_c / Σ n_c.
    const double total = static_cast<double>(examples_);
    for (size_t i = 0; i < numel_; ++i) scratch_[i] = static_cast<float>(sum_[i] / total);

    RoundOutcome outcome;
    double change2 = 0.0;
    if (fwdgrad_) {
      // FwdLLM server: θ ← θ − η_t ḡ, i.e. a kSgd step of rate −η_t on ḡ.
      const double eta = FwdGradLearningRate(options_, global.version);
      optim::ServerOptimizerOptions sgd;
      sgd.kind = optim::ServerOptimizerKind::kSgd;
      sgd.lr = -eta;
      change2 = optim::ServerOptimizerStep(sgd, scratch_, global.params, {});
      outcome.metrics = MetricsLocked(std::sqrt(change2));
      outcome.metrics["lr"] = eta;
    } else {
      // Server optimizer state from the checkpointed buffers, created on first use (m = 0, v = τ²).
      optim::ServerOptimizerState state;
      if (optim::UsesFirstMoment(optimizer_.kind)) {
        const char* m_name =
            optimizer_.kind == optim::ServerOptimizerKind::kMomentum ? kMomentumBuffer : kFirstMomentBuffer;
        state.m = Buffer(global, m_name, 0.0f);
      }
      if (optim::UsesSecondMoment(optimizer_.kind)) {
        state.v = Buffer(global, kSecondMomentBuffer, optim::InitialSecondMoment(optimizer_));
      }
      change2 = optim::ServerOptimizerStep(optimizer_, scratch_, global.params, state);
      outcome.metrics = MetricsLocked(std::sqrt(change2));
    }
    open_ = false;
    return outcome;
  }

 private:
  // fwdgrad with pacing: pools this round's sums with the held ones, then applies the pooled mean (and
  // clears the pool) or holds it for the next round, as DecidePacing says.
  absl::StatusOr<RoundOutcome> FinishPacedRoundLocked(GlobalModel& global) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Step 1: the pool = held sums (if any) + this round's.
    double pooled_examples = static_cast<double>(examples_);
    double pooled_clients = static_cast<double>(clients_);
    double pooled_rounds = 1;
    if (auto state = global.buffers.find(kPacingStateBuffer); state != global.buffers.end()) {
      pooled_examples += state->second[1];
      pooled_clients += state->second[2];
      pooled_rounds += state->second[3];
    }
    const auto held_sum = global.buffers.find(kPacingSumBuffer);
    const auto held_square = global.buffers.find(kPacingSquareBuffer);
    if (held_sum != global.buffers.end() && held_square != global.buffers.end()) {
      for (size_t i = 0; i < numel_; ++i) {
        sum_[i] += static_cast<double>(held_sum->second[i]);
        square_sum_[i] += static_cast<double>(held_square->second[i]);
      }
    }
    // Step 2: the pooled estimate's variance decides.
    const double variance =
        EstimateGlobalVariance(sum_, square_sum_, pooled_examples, static_cast<int64_t>(pooled_clients));
    const PacingDecision decision = DecidePacing(options_.fwdgrad_pacing, round_perturbations_, variance);
    const double eta = FwdGradLearningRate(options_, global.version);
    double change2 = 0.0;
    if (decision.apply) {
      // Step 3a: FwdLLM's server step on the pooled mean, θ ← θ − η_t Σ g_c / Σ n_c; the pool is emptied.
      for (size_t i = 0; i < numel_; ++i) scratch_[i] = static_cast<float>(sum_[i] / pooled_examples);
      optim::ServerOptimizerOptions sgd;
      sgd.kind = optim::ServerOptimizerKind::kSgd;
      sgd.lr = -eta;
      change2 = optim::ServerOptimizerStep(sgd, scratch_, global.params, {});
      global.buffers.erase(kPacingSumBuffer);
      global.buffers.erase(kPacingSquareBuffer);
      global.buffers[kPacingStateBuffer] = {static_cast<float>(decision.next_perturbations), 0.0f, 0.0f, 0.0f};
    } else {
      // Step 3b: θ unchanged; the pool waits for the next round's (raised-K) estimates.
      global.buffers[kPacingSumBuffer].assign(sum_.begin(), sum_.end());
      global.buffers[kPacingSquareBuffer].assign(square_sum_.begin(), square_sum_.end());
      global.buffers[kPacingStateBuffer] = {static_cast<float>(decision.next_perturbations),
                                            static_cast<float>(pooled_examples), static_cast<float>(pooled_clients),
                                            static_cast<float>(pooled_rounds)};
    }
    RoundOutcome outcome;
    outcome.metrics = MetricsLocked(std::sqrt(change2));
    outcome.metrics["lr"] = eta;
    outcome.metrics["perturbations"] = static_cast<double>(round_perturbations_);
    outcome.metrics["pacing_applied"] = decision.apply ? 1.0 : 0.0;
    outcome.metrics["pacing_pooled_rounds"] = pooled_rounds;
    if (std::isfinite(variance)) outcome.metrics["gradient_variance"] = variance;
    open_ = false;
    return outcome;
  }

  // FailedPrecondition if a buffer this strategy uses exists with the wrong length (a checkpoint of
  // another model).
  absl::Status CheckBuffers(const GlobalModel& global) const {
    if (paced_) {
      for (const char* name : {kPacingSumBuffer, kPacingSquareBuffer}) {
        const auto it = global.buffers.find(name);
        if (it != global.buffers.end() && it->second.size() != global.params.size()) {
          return absl::FailedPreconditionError(StrCat("pacing buffer '", name, "' has ", it->second.size(),
                                                      " values, the global model ", global.params.size()));
        }
      }
      const auto state = global.buffers.find(kPacingStateBuffer);
      if (state != global.buffers.end() && (state->second.size() != kPacingStateSize || !(state->second[0] >= 1))) {
        return absl::FailedPreconditionError(
            StrCat("pacing buffer '", kPacingStateBuffer, "' must hold ", kPacingStateSize, " values with K >= 1"));
      }
    }
    for (const char* name : {kMomentumBuffer, kFirstMomentBuffer, kSecondMomentBuffer}) {
      if (!Uses(name)) continue;
      const auto it = global.buffers.find(name);
      if (it != global.buffers.end() && it->second.size() != global.params.size()) {
        return absl::FailedPreconditionError(StrCat("optimizer buffer '", name, "' has ", it->second.size(),
                                                    " values, the global model ", global.params.size()));
      }
    }
    return absl::OkStatus();
  }

  bool Uses(std::string_view buffer) const {
    if (fwdgrad_) return false;
    if (buffer == kMomentumBuffer) return optimizer_.kind == optim::ServerOptimizerKind::kMomentum;
    if (buffer == kFirstMomentBuffer) return optim::UsesSecondMoment(optimizer_.kind);
    if (buffer == kSecondMomentBuffer) return optim::UsesSecondMoment(optimizer_.kind);
    return false;
  }

  // The named buffer, created with `initial` values if missing (sizes were checked by
  // CheckBuffers).
  static std::span<float> Buffer(GlobalModel& global, const char* name, float initial) {
    auto [it, inserted] = global.buffers.try_emplace(name);
    if (inserted) it->second.assign(global.params.size(), initial);
    return it->second;
  }

  // Constant after construction.
  const optim::ServerOptimizerOptions optimizer_;
  const bool fwdgrad_;
  const bool paced_;  // fwdgrad with variance-controlled pacing

  int64_t round_perturbations_ ABSL_GUARDED_BY(mu_) = 0;  // pacing: K of this round's tasks
  std::vector<double> square_sum_ ABSL_GUARDED_BY(mu_);   // pacing: (P,) Σ_c g_c² / n_c
  std::vector<double> row_ ABSL_GUARDED_BY(mu_);          // pacing: (P,) the update being added, decoded

  // Both are allocated by BeginRound: O(params), independent of the number of clients.
  std::vector<double> sum_ ABSL_GUARDED_BY(mu_);     // (P,) Σ_c n_c Δ_c (fwdgrad: Σ_c g_c), in double
  std::vector<float> scratch_ ABSL_GUARDED_BY(mu_);  // (P,) the update being validated; the round's mean
                                                     // in FinishRound
};

// FedKSeed (Qin et al., ICML'24): per-seed sums of scalar gradients, applied as perturbations.
class KSeedStrategy final : public RoundStrategy {
 public:
  explicit KSeedStrategy(StrategyOptions options)
      : RoundStrategy(std::move(options)),
        pool_(optim::CandidateSeeds(options_.kseed_pool_seed, options_.kseed_pool_size)),
        wire_lr_(static_cast<float>(options_.kseed_lr)) {}

  void ConfigureTask(uint64_t round_index, v1::Task& task) const override {
    (void)round_index;
    task.set_kseed_pool_seed(options_.kseed_pool_seed);
    task.set_kseed_pool_size(options_.kseed_pool_size);
    // The fp32 value the round's sums are published with, so local steps and replay use one lr.
    (*task.mutable_hyperparameters())["lr"] = static_cast<double>(wire_lr_);
  }

  absl::Status BeginRound(const GlobalModel& global) override {
    if (global.params.empty()) return absl::FailedPreconditionError("the global model has no parameters");
    absl::MutexLock lock(&mu_);
    ResetRoundLocked(global.params.size());
    sums_.assign(pool_.size(), 0.0);
    return absl::OkStatus();
  }

  absl::Status Accumulate(const UpdateView& update) override {
    absl::MutexLock lock(&mu_);
    SEEDLING_RETURN_IF_ERROR(CheckUpdateLocked(update));
    if (update.staleness != 0) {
      return InvalidUpdate(update, StrCat("kseed takes no stale updates (staleness ", update.staleness, ")"));
    }
    absl::StatusOr<comms::PayloadInfo> info = comms::InspectPayload(update.payload);
    if (!info.ok()) return InvalidPayload(update, info.status());
    if (info->codec != v1::CODEC_SEED_SCALARS || info->seed_kind != comms::SeedScalarKind::kIndex) {
      return CodecNotAccepted(name(), *info);
    }
    // Step 1: decode and validate (indices < K, finite values) before anything is added.
    absl::StatusOr<std::vector<comms::SeedIndexScalar>> pairs =
        comms::DecodeSeedIndexScalars(update.payload, static_cast<uint32_t>(pool_.size()));
    if (!pairs.ok()) return InvalidPayload(update, pairs.status());
    // Step 2: FedKSeed server aggregation, G_i += n_c ĝ_c,i in double (divided by Σ n at the end).
    const double weight = static_cast<double>(update.num_examples);
    double norm2 = 0.0;
    for (const comms::SeedIndexScalar& p : *pairs) {
      const double g = p.value;
      sums_[p.index] += weight * g;
      norm2 += g * g;
    }
    CountLocked(update, std::sqrt(norm2));
    return absl::OkStatus();
  }

  absl::StatusOr<RoundOutcome> FinishRound(GlobalModel& global) override {
    absl::MutexLock lock(&mu_);
    SEEDLING_RETURN_IF_ERROR(CheckFinishLocked(global));

    // G_i = Σ_c (n_c / Σ n) ĝ_c,i, one rounding to fp32 per seed; zero sums dropped (as
    // optim::SumPerSeed).
    const double total = static_cast<double>(examples_);
    std::vector<optim::SeedScalar> sums;
    for (size_t i = 0; i < sums_.size(); ++i) {
      if (sums_[i] == 0.0) continue;
      const float g = static_cast<float>(sums_[i] / total);
      if (g != 0.0f) sums.push_back({static_cast<uint32_t>(i), g});
    }

    // θ ← θ − lr Σ_i G_i z(pool[i]), ascending i, with optim::ApplySeedSums's arithmetic: one
    // AddNormal per seed with scale float(−lr · G_i), lr = the fp32 published value. Applied chunk
    // by chunk (every seed on one chunk, then the next) to measure the change in O(chunk) memory;
    // an element's result does not depend on the chunking (AddNormal is element-wise), so the bits
    // equal a whole-vector replay.
    const double lr = static_cast<double>(wire_lr_);
    std::vector<float> scales(sums.size());
    for (size_t k = 0; k < sums.size(); ++k) scales[k] = static_cast<float>(-lr * static_cast<double>(sums[k].value));
    constexpr size_t kChunk = size_t{1} << 14;  // a multiple of 4: whole Philox blocks
    std::vector<float> before(std::min(kChunk, numel_));
    double change2 = 0.0;
    for (size_t start = 0; start < numel_; start += kChunk) {
      const std::span<float> chunk(global.params.data() + start, std::min(kChunk, numel_ - start));
      std::copy(chunk.begin(), chunk.end(), before.begin());
      for (size_t k = 0; k < sums.size(); ++k) {
        seedling::AddNormal({pool_[sums[k].index], rng_stream::kPerturbation}, start, scales[k], chunk);
      }
      for (size_t j = 0; j < chunk.size(); ++j) {
        const double c = static_cast<double>(chunk[j]) - static_cast<double>(before[j]);
        change2 += c * c;
      }
    }

    v1::RoundSeedSums published;
    published.set_round_id(0);  // the coordinator knows the round id
    published.set_version(global.version + 1);
    published.set_lr(wire_lr_);
    for (const optim::SeedScalar& s : sums) {
      v1::SeedScalar* out = published.add_sums();
      out->set_index(s.index);
      out->set_value(s.value);
    }
    RoundOutcome outcome;
    outcome.seed_sums_blob = published.SerializeAsString();
    outcome.metrics = MetricsLocked(std::sqrt(change2));
    outcome.metrics["seeds"] = static_cast<double>(sums.size());
    open_ = false;
    return outcome;
  }

 private:
  // Constant after construction.
  const std::vector<uint64_t> pool_;  // optim::CandidateSeeds(kseed_pool_seed, K)
  const float wire_lr_;               // float(kseed_lr), as published in RoundSeedSums.lr

  std::vector<double> sums_ ABSL_GUARDED_BY(mu_);  // (K,) Σ_c n_c ĝ_c,i
};

absl::Status ValidateCommon(const StrategyOptions& o) {
  if (!(o.max_update_norm >= 0) || !std::isfinite(o.max_update_norm)) {
    return absl::InvalidArgumentError(StrCat("max_update_norm must be finite and >= 0, got ", o.max_update_norm));
  }
  if (!(o.staleness_exponent >= 0 && o.staleness_exponent <= 1)) {
    return absl::InvalidArgumentError(StrCat("staleness_exponent must be in [0, 1], got ", o.staleness_exponent));
  }
  return absl::OkStatus();
}

}  // namespace

double FwdGradLearningRate(const StrategyOptions& options, uint64_t round) {
  const double total = static_cast<double>(options.total_rounds);
  const double warmup = std::ceil(total * options.warmup_fraction);
  const double t = static_cast<double>(round);
  double ratio = 0.0;
  if (t < warmup) {
    ratio = (t + 1.0) / std::max(1.0, warmup);
  } else {
    ratio = std::max(0.0, (total - t) / std::max(1.0, total - warmup));
  }
  return options.fwdgrad_lr * ratio;
}

double StalenessWeight(uint64_t staleness, double exponent) {
  return 1.0 / std::pow(1.0 + static_cast<double>(staleness), exponent);
}

std::string StrategyCannotTakeSums(std::string_view name) {
  return StrCat("strategy ", name, " cannot aggregate a pre-summed update (secure aggregation works with the fedavg ",
                "family: fedavg, fedavgm, fedadam, fedyogi, fedadagrad)");
}

absl::StatusOr<std::unique_ptr<Strategy>> MakeStrategy(const StrategyOptions& options) {
  SEEDLING_RETURN_IF_ERROR(ValidateCommon(options));
  const std::string& name = options.name;
  optim::ServerOptimizerOptions optimizer;
  optimizer.lr = options.server_lr;
  optimizer.momentum = options.momentum;
  optimizer.beta1 = options.beta1;
  optimizer.beta2 = options.beta2;
  optimizer.tau = options.tau;
  if (internal::IsFedAvgFamily(name)) {
    if (name == "fedavg") optimizer.kind = optim::ServerOptimizerKind::kSgd;
    if (name == "fedavgm") optimizer.kind = optim::ServerOptimizerKind::kMomentum;
    if (name == "fedadam") optimizer.kind = optim::ServerOptimizerKind::kAdam;
    if (name == "fedyogi") optimizer.kind = optim::ServerOptimizerKind::kYogi;
    if (name == "fedadagrad") optimizer.kind = optim::ServerOptimizerKind::kAdagrad;
    const absl::Status valid = optim::ValidateServerOptimizerOptions(optimizer);
    if (!valid.ok()) return Annotate(valid, StrCat("strategy ", name));
    return std::unique_ptr<Strategy>(new DenseStrategy(options, optimizer, /*fwdgrad=*/false));
  }
  if (name == "fwdgrad") {
    if (!(options.fwdgrad_lr > 0) || !std::isfinite(options.fwdgrad_lr)) {
      return absl::InvalidArgumentError(StrCat("fwdgrad_lr must be finite and > 0, got ", options.fwdgrad_lr));
    }
    if (!(options.warmup_fraction >= 0 && options.warmup_fraction < 1)) {
      return absl::InvalidArgumentError(StrCat("warmup_fraction must be in [0, 1), got ", options.warmup_fraction));
    }
    if (options.total_rounds < 1) {
      return absl::InvalidArgumentError(StrCat("total_rounds must be >= 1, got ", options.total_rounds));
    }
    SEEDLING_RETURN_IF_ERROR(ValidatePacing(options.fwdgrad_pacing));
    return std::unique_ptr<Strategy>(new DenseStrategy(options, optimizer, /*fwdgrad=*/true));
  }
  if (name == "kseed") {
    const float wire_lr = static_cast<float>(options.kseed_lr);
    if (!(options.kseed_lr > 0) || !std::isfinite(wire_lr) || !(wire_lr > 0.0f)) {
      return absl::InvalidArgumentError(
          StrCat("kseed_lr must be > 0 and a positive finite fp32, got ", options.kseed_lr));
    }
    if (options.kseed_pool_size < 1) return absl::InvalidArgumentError("kseed_pool_size must be >= 1, got 0");
    return std::unique_ptr<Strategy>(new KSeedStrategy(options));
  }
  return absl::InvalidArgumentError(StrCat("unknown strategy '", name,
                                           "' (expected fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fwdgrad "
                                           "or kseed)"));
}

absl::StatusOr<v1::RoundSeedSums> ParseSeedSums(std::string_view blob) {
  v1::RoundSeedSums sums;
  if (blob.size() > static_cast<size_t>(std::numeric_limits<int>::max()) ||
      !sums.ParseFromArray(blob.data(), static_cast<int>(blob.size()))) {
    return absl::InvalidArgumentError(StrCat("seed sums of ", blob.size(), " bytes do not parse as RoundSeedSums"));
  }
  if (!(sums.lr() > 0.0f) || !std::isfinite(sums.lr())) {
    return absl::InvalidArgumentError(StrCat("seed sums have lr ", sums.lr(), ", expected a finite value > 0"));
  }
  for (int k = 0; k < sums.sums_size(); ++k) {
    const v1::SeedScalar& s = sums.sums(k);
    if (!std::isfinite(s.value())) {
      return absl::InvalidArgumentError(StrCat("seed sum ", k, " (index ", s.index(), ") is not finite"));
    }
    if (k > 0 && s.index() <= sums.sums(k - 1).index()) {
      return absl::InvalidArgumentError(StrCat("seed sum ", k, " has index ", s.index(), " after index ",
                                               sums.sums(k - 1).index(), ": indices must be strictly increasing"));
    }
  }
  return sums;
}

std::optional<std::string> FindNonFinite(const GlobalModel& model) {
  auto first_bad = [](const std::vector<float>& v) {
    return std::find_if(v.begin(), v.end(), [](float x) { return !std::isfinite(x); }) - v.begin();
  };
  if (const auto i = first_bad(model.params); i < static_cast<std::ptrdiff_t>(model.params.size())) {
    return StrCat("params[", i, "]");
  }
  for (const auto& [name, values] : model.buffers) {
    if (const auto i = first_bad(values); i < static_cast<std::ptrdiff_t>(values.size())) {
      return StrCat("buffers.", name, "[", i, "]");
    }
  }
  return std::nullopt;
}

}  // namespace seedling::server
