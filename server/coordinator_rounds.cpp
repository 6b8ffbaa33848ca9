#include "server/coordinator.h"

// The round loop: open a round (configure), let requests collect its tasks and uploads (coordinator.cpp),
// then aggregate, checkpoint, commit and publish it, or abort it. Tick drives it on the clock.

#include <algorithm>
#include <nlohmann/json.hpp>

#include "base/status.h"
#include "base/strings.h"
#include "model/weights.h"
#include "spdlog/spdlog.h"

namespace seedling::server {

// ---- the round state machine ----------------------------------------------------------------------------

absl::Status Coordinator::OpenRoundLocked(int64_t now) {
  RoundRecord fields;
  fields.method = config_.method;
  fields.base_version = global_.version;
  fields.target = config_.clients_per_round;
  fields.min_reports = config_.EffectiveMinReports();
  fields.opened_ms = now;
  fields.deadline_ms = now + config_.round_deadline_s * 1000;
  if (config_.FedBuff()) {
    // A buffer: it commits at buffer_size accepted updates, and has no deadline (each task has its own).
    fields.target = fields.min_reports = config_.fedbuff.buffer_size;
    fields.deadline_ms = 0;
  }
  nlohmann::json cfg = {{"method", config_.method},
                        {"mode", config_.mode},
                        {"steps", config_.steps},
                        {"codec", std::string(comms::CodecName(config_.codec.codec))},
                        {"strategy", config_.strategy.name},
                        {"weights", model::WeightPrecisionName(config_.weights)}};
  fields.config_json = cfg.dump();
  SEEDLING_ASSIGN_OR_RETURN(RoundRecord round, store_->CreateRound(fields));
  SEEDLING_RETURN_IF_ERROR(strategy_->BeginRound(global_));
  round_ = round;
  round_closing_ = false;
  *stats_ = RoundStats{};
  if (config_.FedBuff()) {
    spdlog::debug("buffer {} open: commits at {} updates, {} tasks out", round.round_id, round.target,
                  outstanding_.size());
  } else {
    spdlog::info("round {} open: target {}, up to {} tasks, deadline in {} s", round.round_id, round.target,
                 config_.SelectionQuota(), config_.round_deadline_s);
  }
  return absl::OkStatus();
}

void Coordinator::AbortRoundLocked(int64_t now, const std::string& reason) {
  if (!round_.has_value()) return;
  if (absl::Status st = store_->AbortRound(round_->round_id, now, reason); !st.ok()) {
    spdlog::error("cannot mark round {} aborted: {}", round_->round_id, std::string(st.message()));
    health_ = st;
  }
  spdlog::warn("round {} aborted: {}", round_->round_id, reason);
  if (rounds_total_ != nullptr) rounds_total_->WithLabels({"aborted"}).Increment();
  // Worthless now; fedbuff uploads belong to tasks, not buffers, and join the next buffer.
  if (!config_.FedBuff()) uploads_.DropRound(round_->round_id);
  secagg_.reset();  // nothing of a SecAgg session outlives its round
  secagg_participants_.clear();
  round_.reset();
  ++finished_rounds_;
}

void Coordinator::FinishRoundLocked(int64_t now) {
  if (!round_.has_value() || finishing_) return;
  finishing_ = true;
  round_closing_ = true;
  PendingCommit p;
  p.was_open = round_->state == RoundState::kOpen;
  round_->state = RoundState::kAggregating;  // requests see the round as it is in the store from now on
  const uint64_t round_id = round_->round_id;
  if (!config_.FedBuff()) uploads_.DropRound(round_id);  // worthless now (fedbuff: they join the next buffer)
  WaitForLedgerLocked();  // the round's count is final once the entries in flight are durable (or failed)
  if (!round_.has_value() || round_->round_id != round_id) {  // a failed ledger write aborted it meanwhile
    finishing_ = false;
    io_done_.SignalAll();
    return;
  }
  absl::Status st;
  if (dp_budget_.has_value()) {
    // This round's cost, recorded in the commit's transaction; the budget moves on only once it is durable.
    absl::StatusOr<DpBudget::Price> price = dp_budget_->PriceRound(round_id);
    if (price.ok()) {
      p.dp_price = std::move(price).value();
    } else {
      st = Annotate(price.status(), "privacy accounting failed");
    }
  }
  if (st.ok()) {
    p.round = *round_;
    p.stats = *stats_;
    p.next = global_;  // a copy: the served model stays as it is until the commit
    Strategy& strategy = *strategy_;
    mu_.Unlock();
    st = MarkAggregating(p, now);
    if (st.ok()) st = Aggregate(strategy, p);
    if (st.ok()) st = Commit(p, now);
    mu_.Lock();
  }
  finishing_ = false;
  if (st.ok()) {
    PublishLocked(std::move(p));
  } else {
    AbortRoundLocked(now, std::string(st.message()));
  }
  io_done_.SignalAll();
}

absl::Status Coordinator::MarkAggregating(const PendingCommit& p, int64_t now) {
  const uint64_t round_id = p.round.round_id;
  if (p.was_open) {  // the store only moves Open → Collecting → Aggregating
    SEEDLING_RETURN_IF_ERROR(
        Annotate(store_->SetRoundState(round_id, RoundState::kCollecting, now), "cannot close selection"));
  }
  return Annotate(store_->SetRoundState(round_id, RoundState::kAggregating, now), "cannot start aggregating");
}

absl::Status Coordinator::Aggregate(Strategy& strategy, PendingCommit& p) {
  absl::StatusOr<RoundOutcome> outcome = strategy.FinishRound(p.next);
  if (!outcome.ok()) return Annotate(outcome.status(), "aggregation failed");
  p.outcome = std::move(outcome).value();
  // Finite updates can still sum past float's range (3e38 twice): such an aggregate is never committed.
  if (std::optional<std::string> bad = FindNonFinite(p.next); bad.has_value()) {
    return absl::FailedPreconditionError(
        StrCat("the aggregate is not finite (", *bad, "); the global model is unchanged"));
  }
  p.next.version += 1;
  std::vector<NamedVector> vectors = {{"params", p.next.params}};
  for (const auto& [name, values] : p.next.buffers) vectors.push_back({name, values});
  SEEDLING_RETURN_IF_ERROR(Annotate(store_->WriteCheckpoint(p.next.version, vectors).status(), "checkpoint failed"));
  p.seed_blob = p.outcome.seed_sums_blob;
  if (!p.seed_blob.empty()) {
    // The strategy does not know the round id: stamp it into the stored sums.
    auto sums = ParseSeedSums(p.seed_blob);
    if (sums.ok()) {
      sums->set_round_id(p.round.round_id);
      sums->set_version(p.next.version);
      p.seed_blob = sums->SerializeAsString();
    }
  }
  return absl::OkStatus();
}

absl::Status Coordinator::Commit(const PendingCommit& p, int64_t now) {
  nlohmann::json result = {{"accepted", p.round.accepted},
                           {"selected", p.round.selected},
                           {"rejected", p.stats.rejected},
                           {"bytes_up", p.stats.bytes_up},
                           {"bytes_down", p.stats.bytes_down}};
  std::optional<DpSpend> dp_spend;
  if (p.dp_price.has_value()) {
    dp_spend = p.dp_price->spend;
    result["dp_epsilon"] = p.dp_price->epsilon_after;
    result["dp_sampling_rate"] = p.dp_price->spend.sampling_rate;
    if (config_.privacy.dp_ftrl()) {  // zCDP ρ and ε at δ = 1e-10 (server/dp_budget.h)
      result["dp_rho"] = p.dp_price->rho_after;
      result["dp_epsilon_delta_1e-10"] = p.dp_price->epsilon_report_delta_after;
    }
  }
  if (p.stats.loss_count > 0) {
    result["loss_start"] = p.stats.loss_start_sum / static_cast<double>(p.stats.loss_count);
    result["loss_end"] = p.stats.loss_end_sum / static_cast<double>(p.stats.loss_count);
  }
  if (p.stats.processed_tokens > 0) result["processed_tokens"] = p.stats.processed_tokens;
  if (config_.FedBuff() && p.round.accepted > 0) {
    result["mean_staleness"] = static_cast<double>(p.stats.staleness_sum) / static_cast<double>(p.round.accepted);
    result["max_staleness"] = p.stats.staleness_max;
  }
  for (const auto& [k, v] : p.outcome.metrics) result[k] = v;
  return Annotate(store_->CommitRound(p.round.round_id, p.next.version, now, result.dump(), p.seed_blob, dp_spend),
                  "commit failed");
}

void Coordinator::PublishLocked(PendingCommit p) {
  if (p.dp_price.has_value()) {
    dp_budget_->Commit(std::move(*p.dp_price));
    SetDpGaugesLocked();
  }
  if (tree_participation_.has_value()) {
    tree_participation_->RecordCommit(p.next.version, store_->LedgerForRound(round_->round_id));
  }
  if (config_.FedBuff()) BeforeFedBuffPublishLocked();
  global_ = std::move(p.next);
  ServeGlobalLocked();
  const uint64_t round_id = round_->round_id;
  if (config_.FedBuff()) {
    spdlog::debug("buffer {} committed: {} updates, global version {}", round_id, round_->accepted, global_.version);
  } else {
    spdlog::info("round {} committed: {} updates, global version {}", round_id, round_->accepted, global_.version);
  }
  if (rounds_total_ != nullptr) rounds_total_->WithLabels({"committed"}).Increment();
  if (global_version_gauge_ != nullptr) global_version_gauge_->Set(static_cast<double>(global_.version));
  if (!config_.FedBuff()) uploads_.DropRound(round_id);
  secagg_.reset();
  secagg_participants_.clear();
  round_.reset();
  ++finished_rounds_;
  if (config_.FedBuff()) AfterFedBuffPublishLocked();
}

void Coordinator::Tick() {
  absl::MutexLock lock(&mu_);
  const int64_t now = clock_->NowMs();
  if (config_.FedBuff()) {
    if (!finishing_) TickFedBuffLocked(now);
  } else if (!round_.has_value()) {
    OpenRoundIfAllowedLocked(now);
  } else if (finishing_) {
    return;  // another thread is committing the round
  } else if (config_.secagg.enabled) {
    TickSecAggRoundLocked(now);
  } else {
    TickRoundLocked(now);
  }
}

void Coordinator::OpenRoundIfAllowedLocked(int64_t now) {
  if (config_.rounds > 0 && finished_rounds_ >= config_.rounds) return;
  if (dp_budget_.has_value() && !dp_budget_->AllowsNextRound(DpSamplingRateLocked())) return;
  if (health_.code() == absl::StatusCode::kDataLoss) return;  // a non-finite global model is never served
  if (absl::Status st = OpenRoundLocked(now); !st.ok()) {
    spdlog::error("cannot open a round: {}", std::string(st.message()));
    health_ = st;
  }
}

bool Coordinator::SelectionDueLocked(int64_t now) const {
  const RoundRecord& r = *round_;
  return r.state == RoundState::kOpen && now >= r.opened_ms + config_.selection_window_s * 1000 &&
         r.selected >= r.min_reports;
}

void Coordinator::TickSecAggRoundLocked(int64_t now) {
  // Selection closes as usual, then the session's stages run to their own deadlines (the masked-input stage
  // ends at the round's deadline; the unmask stage may run past it).
  RoundRecord& r = *round_;
  if (r.state != RoundState::kOpen) {
    if (secagg_ != nullptr && now >= secagg_->stage_deadline_ms()) CloseSecAggStageLocked(now);
  } else if (SelectionDueLocked(now)) {
    if (store_->SetRoundState(r.round_id, RoundState::kCollecting, now).ok()) {
      r.state = RoundState::kCollecting;
      StartSecAggLocked(now);
    }
  } else if (now >= r.deadline_ms) {
    AbortRoundLocked(now, StrCat("only ", r.selected, " of the ", r.min_reports, " devices needed checked in"));
  }
}

void Coordinator::TickRoundLocked(int64_t now) {
  RoundRecord& r = *round_;
  if (SelectionDueLocked(now) && store_->SetRoundState(r.round_id, RoundState::kCollecting, now).ok()) {
    r.state = RoundState::kCollecting;
  }
  if (now < r.deadline_ms) {
    // Drop uploads that went silent for longer than a device could need to resume.
    uploads_.DropSilent(now, 2 * config_.idle_timeout_ms);
    return;
  }
  // No upload joins any more; the count is final once the ledger writes in flight are done.
  const uint64_t round_id = r.round_id;
  round_closing_ = true;
  WaitForLedgerLocked();
  if (!round_.has_value() || round_->round_id != round_id || finishing_) return;  // ended or ending meanwhile
  if (round_->accepted >= round_->min_reports) {
    FinishRoundLocked(now);
  } else {
    AbortRoundLocked(
        now, StrCat("only ", round_->accepted, " of the ", round_->min_reports, " reports needed by the deadline"));
  }
}

void Coordinator::Shutdown() {
  absl::MutexLock lock(&mu_);
  // A round being committed finishes first (its commit cannot be taken back half-way); uploads in flight
  // are recorded or refused first.
  while (true) {
    if (round_.has_value()) round_closing_ = true;
    if (!finishing_ && ledger_queue_.empty()) break;
    io_done_.Wait(&mu_);
  }
  if (round_.has_value()) AbortRoundLocked(clock_->NowMs(), "server shut down during the round");
}

bool Coordinator::NoMoreRoundsLocked() const {
  const bool limit = config_.rounds > 0 && finished_rounds_ >= config_.rounds;
  return limit || (dp_budget_.has_value() && !dp_budget_->refusal().empty());
}

bool Coordinator::Finished() {
  absl::MutexLock lock(&mu_);
  return NoMoreRoundsLocked() && !round_.has_value();
}

bool Coordinator::Selecting() {
  absl::MutexLock lock(&mu_);
  if (!round_.has_value()) return !NoMoreRoundsLocked();
  if (config_.FedBuff()) {
    return !round_closing_ && static_cast<int64_t>(outstanding_.size()) < config_.fedbuff.concurrency;
  }
  return round_->state == RoundState::kOpen && round_->selected < config_.SelectionQuota();
}

absl::StatusOr<double> Coordinator::DpSamplingRateLocked() {
  // A round aggregates at most clients_per_round reports (the larger of that and expected_clients is used,
  // to stay conservative). The real selection takes the first eligible devices that check in, which is not
  // Poisson; README "Differential privacy" says so.
  SEEDLING_ASSIGN_OR_RETURN(std::vector<DeviceRecord> devices, store_->ListDevices());
  const double per_round = static_cast<double>(
      std::max(config_.clients_per_round, config_.privacy.EffectiveExpectedClients(config_.clients_per_round)));
  return DpSamplingRate(per_round, devices.size());
}

}  // namespace seedling::server
