#include "server/coordinator.h"

// What the coordinator shows: the dashboard's snapshot, health, and the read-only views tests and tools use.
// Each takes the coordinator's lock for its own duration, except those that only read the (thread-safe) store.

#include <cmath>
#include <nlohmann/json.hpp>

#include "base/status.h"
#include "base/strings.h"
#include "base/version.h"
#include "server/devices.h"

namespace seedling::server {

DashboardRound Coordinator::ToDashboard(const RoundRecord& r) {
  DashboardRound d;
  d.round_id = r.round_id;
  d.state = RoundStateName(r.state);
  d.method = r.method;
  d.selected = r.selected;
  d.accepted = r.accepted;
  d.opened_ms = r.opened_ms;
  d.deadline_ms = r.deadline_ms;
  d.closed_ms = r.closed_ms;
  d.abort_reason = r.abort_reason;
  if (!r.result_json.empty()) {
    try {
      const nlohmann::json j = nlohmann::json::parse(r.result_json);
      d.rejected = j.value("rejected", int64_t{0});
      // A SecAgg round records no single update: its survivors are counted in the result only.
      d.accepted = j.value("accepted", d.accepted);
      d.bytes_up = j.value("bytes_up", uint64_t{0});
      d.bytes_down = j.value("bytes_down", uint64_t{0});
      if (j.contains("loss_start")) d.loss_start = j["loss_start"].get<double>();
      if (j.contains("loss_end")) d.loss_end = j["loss_end"].get<double>();
      d.processed_tokens = j.value("processed_tokens", int64_t{0});
      if (j.contains("gradient_variance")) d.gradient_variance = j["gradient_variance"].get<double>();
    } catch (const nlohmann::json::exception&) {
      // A result the dashboard cannot read is shown without its details.
    }
  }
  return d;
}

DashboardSnapshot Coordinator::Snapshot() {
  absl::MutexLock lock(&mu_);
  DashboardSnapshot s;
  s.server_version = kVersionString;
  s.global_version = global_.version;
  if (round_.has_value()) {
    DashboardRound d = ToDashboard(*round_);
    d.rejected = stats_->rejected;
    d.bytes_up = stats_->bytes_up;
    d.bytes_down = stats_->bytes_down;
    d.processed_tokens = stats_->processed_tokens;
    if (stats_->loss_count > 0) {
      d.loss_start = stats_->loss_start_sum / static_cast<double>(stats_->loss_count);
      d.loss_end = stats_->loss_end_sum / static_cast<double>(stats_->loss_count);
    }
    s.current = d;
  }
  if (auto recent = store_->RecentRounds(50); recent.ok()) {
    for (const RoundRecord& r : *recent) {
      if (r.state == RoundState::kCommitted || r.state == RoundState::kAborted) s.recent.push_back(ToDashboard(r));
    }
  }
  s.rejected_by_reason = rejected_by_reason_;
  s.epsilon = NAN;
  if (dp_budget_.has_value()) {
    s.epsilon = dp_budget_->epsilon();
    s.dp_target_epsilon = config_.privacy.target_epsilon;
    s.dp_delta = config_.privacy.delta;
    s.dp_refusal = dp_budget_->refusal();
    s.dp_mechanism = config_.privacy.mechanism;
    s.dp_rho = dp_budget_->rho();  // NaN for the Gaussian mechanism
    s.dp_epsilon_delta_1e10 = dp_budget_->epsilon_at_report_delta();
  }
  if (auto devices = store_->ListDevices(); devices.ok()) s.devices_registered = static_cast<int64_t>(devices->size());
  s.connections = connections_;
  return s;
}

absl::Status Coordinator::Health() {
  absl::MutexLock lock(&mu_);
  return health_;
}

uint64_t Coordinator::global_version() {
  absl::MutexLock lock(&mu_);
  return global_.version;
}

std::vector<float> Coordinator::global_params() {
  absl::MutexLock lock(&mu_);
  return global_.params;
}

absl::StatusOr<std::vector<float>> Coordinator::CheckpointParams(uint64_t version) {
  SEEDLING_ASSIGN_OR_RETURN(std::vector<NamedVector> vectors, store_->ReadCheckpoint(version));
  for (NamedVector& v : vectors) {
    if (v.name == "params") return std::move(v.values);
  }
  return absl::DataLossError(StrCat("checkpoint ", version, " has no params"));
}

absl::StatusOr<std::string> Coordinator::RegisterDevice(const std::string& device_id) {
  return AddDevice(*store_, device_id, clock_->NowMs());
}

absl::StatusOr<std::optional<RoundRecord>> Coordinator::FindRound(uint64_t round_id) {
  return store_->FindRound(round_id);
}

absl::StatusOr<std::string> Coordinator::StoreChecksum() { return store_->Checksum(); }

SecAggProgress Coordinator::secagg_progress() {
  absl::MutexLock lock(&mu_);
  return secagg_ != nullptr ? secagg_->progress() : SecAggProgress{};
}

void Coordinator::SetDpGaugesLocked() {
  if (!dp_budget_.has_value()) return;
  if (dp_epsilon_gauge_ != nullptr) dp_epsilon_gauge_->Set(dp_budget_->epsilon());
  if (dp_rho_gauge_ != nullptr) dp_rho_gauge_->Set(dp_budget_->rho());
  if (dp_epsilon_1e10_gauge_ != nullptr) dp_epsilon_1e10_gauge_->Set(dp_budget_->epsilon_at_report_delta());
}

double Coordinator::dp_epsilon() {
  absl::MutexLock lock(&mu_);
  return dp_budget_.has_value() ? dp_budget_->epsilon() : NAN;
}

}  // namespace seedling::server
