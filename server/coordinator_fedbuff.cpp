#include "server/coordinator.h"

// [strategy] mode = "fedbuff": buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS'22;
// docs/architecture.md, "Buffered asynchronous rounds"). The round machinery is the synchronous one's
// (coordinator.cpp, coordinator_rounds.cpp): a buffer is a round that stays Open, fills from whichever tasks
// finish, and is aggregated, checkpointed and committed with its ledger exactly as a round is. What differs
// lives here: tasks out are tracked one by one (each with its own deadline and the version it trains from),
// an upload's staleness is known when it arrives, and the versions tasks out still train from stay served.

#include <algorithm>

#include "base/status.h"
#include "base/strings.h"
#include "spdlog/spdlog.h"

namespace seedling::server {

v1::Envelope Coordinator::FedBuffCheckInLocked(const std::string& device_id, int64_t now) {
  // A device holding a task out gets it again (e.g. after a restart of the app).
  if (auto held = task_of_device_.find(device_id); held != task_of_device_.end()) {
    const OutstandingTask& out = outstanding_.at(held->second);
    auto task = store_->FindTask(held->second);
    auto round = store_->FindRound(out.round_id);
    const std::optional<ServedRef> served = ServedVersionLocked(out.base_version);
    if (!task.ok() || !round.ok() || !task->has_value() || !round->has_value() || !served.has_value()) {
      return RejectLocked(v1::INTERNAL, "task registry unavailable", "internal");
    }
    v1::Envelope e;  // the handler stamps protocol version and request id
    v1::Task& t = *e.mutable_check_in_reply()->mutable_task();
    t = MakeTaskLocked(**round, **task);
    t.set_global_version(out.base_version);
    t.set_global_sha256(*served->sha256);
    t.set_deadline_ms(static_cast<uint64_t>(out.deadline_ms));
    return e;
  }
  if (!round_.has_value() || round_closing_ || finishing_) return RetryLocked("no open buffer");
  if (static_cast<int64_t>(outstanding_.size()) >= config_.fedbuff.concurrency) {
    return RetryLocked("not selected: enough tasks are out");
  }
  // One task per device and buffer (the store's rule): a device does not fill a buffer alone.
  auto existing = store_->FindTaskFor(round_->round_id, device_id);
  if (!existing.ok()) return RejectLocked(v1::INTERNAL, "task registry unavailable", "internal");
  if (existing->has_value()) return RetryLocked("already had a task while this buffer is open");
  TaskRecord task;
  task.task_id = StrCat("r", round_->round_id, "-", round_->selected + 1);
  task.round_id = round_->round_id;
  task.device_id = device_id;
  task.assigned_ms = now;
  if (absl::Status st = store_->AddTask(task); !st.ok()) {
    spdlog::error("cannot record task: {}", std::string(st.message()));
    return RejectLocked(v1::INTERNAL, "cannot record the task", "internal");
  }
  ++round_->selected;
  if (tasks_total_ != nullptr) tasks_total_->Increment();
  OutstandingTask out;
  out.device_id = device_id;
  out.round_id = round_->round_id;
  out.base_version = global_.version;  // no flush happens while a buffer is open: its base is current
  out.deadline_ms = now + config_.round_deadline_s * 1000;
  outstanding_[task.task_id] = out;
  task_of_device_[device_id] = task.task_id;
  v1::Envelope e;  // the handler stamps protocol version and request id
  v1::Task& t = *e.mutable_check_in_reply()->mutable_task();
  t = MakeTaskLocked(*round_, task);
  t.set_deadline_ms(static_cast<uint64_t>(out.deadline_ms));
  return e;
}

std::optional<v1::Envelope> Coordinator::FedBuffUploadRefusalLocked(const std::string& device_id, uint64_t round_id,
                                                                    const std::string& task_id, int64_t now,
                                                                    uint64_t* staleness) {
  // A flush in progress holds the strategy: the update joins the buffer it opens next.
  while (finishing_) io_done_.Wait(&mu_);
  auto it = outstanding_.find(task_id);
  if (it == outstanding_.end() || it->second.device_id != device_id || it->second.round_id != round_id) {
    auto task = store_->FindTask(task_id);
    if (!task.ok()) return RejectLocked(v1::INTERNAL, "task registry unavailable", "internal");
    if (!task->has_value() || (*task)->device_id != device_id || (*task)->round_id != round_id) {
      return RejectLocked(v1::NOT_SELECTED, "this device has no such task", "not_selected");
    }
    return RejectLocked(v1::STALE,
                        StrCat("task ", task_id,
                               " is no longer out (uploaded, declined, expired or issued before a server restart); "
                               "check in again"),
                        "stale");
  }
  const OutstandingTask& out = it->second;
  if (now > out.deadline_ms) {
    ForgetTaskLocked(task_id);
    return RejectLocked(v1::STALE, StrCat("task ", task_id, "'s deadline has passed"), "stale");
  }
  const uint64_t tau = global_.version - out.base_version;
  if (config_.fedbuff.max_staleness > 0 && tau > static_cast<uint64_t>(config_.fedbuff.max_staleness)) {
    const uint64_t base = out.base_version;
    ForgetTaskLocked(task_id);
    return RejectLocked(v1::STALE,
                        StrCat("task ", task_id, " trained from version ", base, ", ", tau,
                               " server updates ago; max_staleness is ", config_.fedbuff.max_staleness),
                        "too_stale");
  }
  if (!round_.has_value() || round_closing_) return RejectLocked(v1::STALE, "no buffer is open", "stale");
  if (staleness != nullptr) *staleness = tau;
  return std::nullopt;
}

void Coordinator::ForgetTaskLocked(const std::string& task_id) {
  auto it = outstanding_.find(task_id);
  if (it == outstanding_.end()) return;
  task_of_device_.erase(it->second.device_id);
  outstanding_.erase(it);
}

void Coordinator::TickFedBuffLocked(int64_t now) {
  std::vector<std::string> expired;
  for (const auto& [task_id, out] : outstanding_) {
    if (now > out.deadline_ms) expired.push_back(task_id);
  }
  for (const std::string& task_id : expired) ForgetTaskLocked(task_id);
  uploads_.DropSilent(now, 2 * config_.idle_timeout_ms);
  if (!round_.has_value()) OpenRoundIfAllowedLocked(now);
}

void Coordinator::BeforeFedBuffPublishLocked() {
  const uint64_t outgoing = global_.version;
  const bool needed = std::any_of(outstanding_.begin(), outstanding_.end(),
                                  [&](const auto& entry) { return entry.second.base_version == outgoing; });
  if (needed) older_versions_[outgoing] = ServedVersion{global_bytes_, global_sha256_};
}

void Coordinator::AfterFedBuffPublishLocked() {
  // Tasks whose updates would now be refused free their places at once.
  if (config_.fedbuff.max_staleness > 0) {
    std::vector<std::string> too_stale;
    for (const auto& [task_id, out] : outstanding_) {
      if (global_.version - out.base_version > static_cast<uint64_t>(config_.fedbuff.max_staleness)) {
        too_stale.push_back(task_id);
      }
    }
    for (const std::string& task_id : too_stale) ForgetTaskLocked(task_id);
  }
  for (auto it = older_versions_.begin(); it != older_versions_.end();) {
    const uint64_t version = it->first;
    const bool needed = std::any_of(outstanding_.begin(), outstanding_.end(),
                                    [&](const auto& entry) { return entry.second.base_version == version; });
    it = needed ? std::next(it) : older_versions_.erase(it);
  }
  OpenRoundIfAllowedLocked(clock_->NowMs());
}

std::optional<Coordinator::ServedRef> Coordinator::ServedVersionLocked(uint64_t version) {
  if (version == global_.version) return ServedRef{&global_bytes_, &global_sha256_};
  auto it = older_versions_.find(version);
  if (it == older_versions_.end()) return std::nullopt;
  return ServedRef{&it->second.bytes, &it->second.sha256};
}

}  // namespace seedling::server
