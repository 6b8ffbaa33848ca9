#include "server/robust_strategy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <utility>

#include "base/memory.h"
#include "base/status.h"
#include "base/strings.h"
#include "comms/codec.h"
#include "server/internal/robust_aggregation.h"
#include "server/internal/update_checks.h"

namespace seedling::server {

using internal::InvalidUpdate;
using internal::IsDenseCodec;
using internal::IsFedAvgFamily;

namespace {

absl::Status KeyError(std::string_view key, std::string_view problem) {
  return absl::InvalidArgumentError(StrCat("[strategy] ", key, ": ", problem));
}

double L2Norm(std::span<const float> v) {
  double n2 = 0.0;
  for (const float x : v) n2 += static_cast<double>(x) * static_cast<double>(x);
  return std::sqrt(n2);
}

// The factor that brings a vector of L2 norm `norm` to at most `bound`.
double BoundFactor(double norm, double bound) { return norm > bound ? bound / norm : 1.0; }

}  // namespace

RobustStrategy::RobustStrategy(std::unique_ptr<Strategy> inner, RobustOptions options, double max_update_norm,
                               int64_t max_updates)
    : inner_(std::move(inner)),
      options_(std::move(options)),
      max_update_norm_(max_update_norm),
      max_updates_(max_updates) {}

absl::Status RobustStrategy::BeginRound(const GlobalModel& global) {
  SEEDLING_RETURN_IF_ERROR(inner_->BeginRound(global));
  absl::MutexLock lock(&mu_);
  open_ = true;
  numel_ = global.params.size();
  held_.clear();
  held_norms_.clear();
  if (!options_.holds_updates()) scratch_.assign(numel_, 0.0f);
  clients_ = 0;
  examples_ = 0;
  client_norm_sum_ = 0;
  bounded_ = 0;
  failures_ = 0;
  return absl::OkStatus();
}

absl::Status RobustStrategy::Accumulate(const UpdateView& update) {
  absl::MutexLock lock(&mu_);
  // Step 1: what every update needs before its payload is decoded.
  SEEDLING_RETURN_IF_ERROR(internal::CheckUpdateHeader(name(), open_, update, examples_));
  absl::StatusOr<comms::PayloadInfo> info = comms::InspectPayload(update.payload);
  if (!info.ok()) return InvalidUpdate(update, FromAbsl(info.status().message()));
  if (!IsDenseCodec(info->codec)) {
    return InvalidUpdate(update, StrCat("robust aggregation takes dense codecs, got ", comms::CodecName(info->codec)));
  }
  if (info->numel != numel_) {
    return InvalidUpdate(update, StrCat("the update has ", info->numel, " elements, the global model ", numel_));
  }
  const bool hold = options_.holds_updates();
  if (hold && static_cast<int64_t>(held_.size()) >= max_updates_) {
    return absl::ResourceExhaustedError(StrCat("update from device '", update.device_id, "': robust aggregation (",
                                               options_.rule, ") holds at most ", max_updates_, " updates per round"));
  }

  // Step 2: decode (fully validated first: finite values, well-formed blocks) into a zeroed vector, then
  // measure it. Nothing of the round changes until step 4.
  std::vector<float> decoded;
  std::span<float> target;
  if (hold) {
    decoded.assign(numel_, 0.0f);
    target = decoded;
  } else {
    std::fill(scratch_.begin(), scratch_.end(), 0.0f);
    target = scratch_;
  }
  if (absl::Status st = comms::DecodeDenseAdd(update.payload, 1.0f, target); !st.ok()) {
    return InvalidUpdate(update, FromAbsl(st.message()));
  }
  const double norm = L2Norm(target);

  // Step 3: the norm cap ([training] max_update_norm): refused, not bounded.
  if (max_update_norm_ > 0 && norm > max_update_norm_) {
    return InvalidUpdate(update, StrCat("L2 norm ", norm, " exceeds max_update_norm ", max_update_norm_));
  }

  // Step 4: keep it, or (fixed norm bound) bound it and stream it into the inner strategy.
  if (hold) {
    held_.push_back(std::move(decoded));
    held_norms_.push_back(norm);
  } else {
    const double factor = BoundFactor(norm, options_.norm_bound);
    if (factor < 1.0) {
      for (float& x : scratch_) x = static_cast<float>(static_cast<double>(x) * factor);
    }
    SEEDLING_RETURN_IF_ERROR(inner_->AccumulateSum({.weighted_sum = scratch_, .total_weight = 1, .clients = 1}));
    if (factor < 1.0) ++bounded_;
  }
  ++clients_;
  examples_ += update.num_examples;
  client_norm_sum_ += norm;
  return absl::OkStatus();
}

absl::Status RobustStrategy::AccumulateSum(const SummedUpdate& sum) {
  (void)sum;
  return absl::UnimplementedError(StrCat("strategy ", name(),
                                         ": robust aggregation needs every update, not a pre-summed aggregate "
                                         "(secure aggregation)"));
}

void RobustStrategy::RecordFailure(const std::string& device_id, const std::string& reason) {
  inner_->RecordFailure(device_id, reason);
  absl::MutexLock lock(&mu_);
  ++failures_;
}

int64_t RobustStrategy::accumulated() const {
  absl::MutexLock lock(&mu_);
  return clients_;
}

absl::Status RobustStrategy::AggregateHeldLocked(std::span<float> out, std::map<std::string, double>& metrics) {
  const std::vector<std::span<const float>> rows(held_.begin(), held_.end());
  const int64_t n = static_cast<int64_t>(rows.size());
  if (options_.rule == "median") {
    internal::CoordinateMedian(rows, out);
  } else if (options_.rule == "trimmed-mean") {
    const int64_t b = internal::TrimmedCount(n, options_.trim_fraction);
    internal::TrimmedMean(rows, b, out);
    metrics["robust_trimmed"] = static_cast<double>(b);
  } else if (options_.rule == "krum") {
    if (n < MinRobustUpdates(options_)) {
      return absl::FailedPreconditionError(StrCat("robust aggregation krum with f = ", options_.krum_f,
                                                  (options_.krum_m > 0 ? StrCat(", m = ", options_.krum_m) : ""),
                                                  " needs at least ", MinRobustUpdates(options_),
                                                  " updates, the round has ", n));
    }
    const int64_t m = options_.krum_m > 0 ? options_.krum_m : n - options_.krum_f;
    const std::vector<size_t> selected = internal::MultiKrumSelect(rows, options_.krum_f, m);
    internal::MeanOfRows(rows, selected, out);
    metrics["robust_selected"] = static_cast<double>(m);
  } else {
    // norm, B = the median of the round's norms: every update scaled to at most B, then the mean.
    std::vector<double> norms = held_norms_;
    const double bound = internal::MedianOf(norms);
    std::vector<double> sum(numel_, 0.0);
    int64_t bounded = 0;
    for (size_t i = 0; i < held_.size(); ++i) {
      const double factor = BoundFactor(held_norms_[i], bound);
      if (factor < 1.0) ++bounded;
      for (size_t j = 0; j < numel_; ++j) sum[j] += static_cast<double>(held_[i][j]) * factor;
    }
    for (size_t j = 0; j < numel_; ++j) out[j] = static_cast<float>(sum[j] / static_cast<double>(n));
    metrics["robust_bounded"] = static_cast<double>(bounded);
    metrics["robust_norm_bound"] = bound;
  }
  return absl::OkStatus();
}

absl::StatusOr<RoundOutcome> RobustStrategy::FinishRound(GlobalModel& global) {
  absl::MutexLock lock(&mu_);
  if (!open_ || clients_ == 0) {
    return absl::FailedPreconditionError(StrCat("strategy ", name(), ": nothing accumulated in this round"));
  }
  if (global.params.size() != numel_) {
    return absl::FailedPreconditionError(
        StrCat("the global model has ", global.params.size(), " parameters; the round began with ", numel_));
  }
  std::map<std::string, double> metrics;
  if (options_.holds_updates()) {
    // The robust mean Δ̄ as one summed update of weight 1 holding n clients: the inner mean is Δ̄ exactly.
    std::vector<float> aggregate(numel_);
    SEEDLING_RETURN_IF_ERROR(AggregateHeldLocked(aggregate, metrics));
    SEEDLING_RETURN_IF_ERROR(
        inner_->AccumulateSum({.weighted_sum = aggregate, .total_weight = 1, .clients = clients_}));
  } else {
    metrics["robust_bounded"] = static_cast<double>(bounded_);
    metrics["robust_norm_bound"] = options_.norm_bound;
  }
  SEEDLING_ASSIGN_OR_RETURN(RoundOutcome outcome, inner_->FinishRound(global));
  for (const auto& [key, value] : metrics) outcome.metrics[key] = value;
  outcome.metrics["clients"] = static_cast<double>(clients_);
  outcome.metrics["examples"] = static_cast<double>(examples_);
  outcome.metrics["mean_client_norm"] = client_norm_sum_ / static_cast<double>(clients_);
  outcome.metrics["failures"] = static_cast<double>(failures_);
  open_ = false;
  held_.clear();
  held_.shrink_to_fit();
  held_norms_.clear();
  return outcome;
}

absl::StatusOr<std::unique_ptr<Strategy>> MakeRobustStrategy(std::unique_ptr<Strategy> inner,
                                                             const RobustOptions& options, double max_update_norm,
                                                             int64_t max_updates, int64_t num_parameters) {
  SEEDLING_RETURN_IF_ERROR(ValidateRobustOptions(options));
  if (!options.enabled()) return inner;
  if (!IsFedAvgFamily(inner->name())) {
    return KeyError("robust", StrCat("robust aggregation compares parameter deltas and works with the fedavg family "
                                     "(fedavg, fedavgm, fedadam, fedyogi, fedadagrad), not strategy ",
                                     inner->name()));
  }
  if (!(std::isfinite(max_update_norm) && max_update_norm >= 0)) {
    return absl::InvalidArgumentError(StrCat("max_update_norm must be finite and >= 0, got ", max_update_norm));
  }
  if (max_updates < MinRobustUpdates(options)) {
    return KeyError("robust", StrCat(options.rule, " needs rounds of at least ", MinRobustUpdates(options),
                                     " updates, but a round takes at most ", max_updates));
  }
  if (options.holds_updates()) {
    const double bytes = static_cast<double>(max_updates) * static_cast<double>(num_parameters) * sizeof(float);
    if (bytes > static_cast<double>(kMaxRobustHeldBytes)) {
      return KeyError("robust", StrCat("\"", options.rule, "\" holds every update of a round until it ends: ",
                                       max_updates, " updates x ", num_parameters,
                                       " parameters x 4 bytes = ", FormatBytes(static_cast<int64_t>(bytes)),
                                       " exceeds the ", FormatBytes(static_cast<int64_t>(kMaxRobustHeldBytes)),
                                       " limit (fewer clients_per_round, or robust = \"norm\" with "
                                       "robust_norm_bound > 0, which streams)"));
    }
  }
  return std::unique_ptr<Strategy>(new RobustStrategy(std::move(inner), options, max_update_norm, max_updates));
}

}  // namespace seedling::server
