#include "server/coordinator.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "base/file.h"
#include "base/philox.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "base/version.h"
#include "lora/adapter.h"
#include "model/config.h"
#include "model/weights.h"
#include "server/devices.h"
#include "server/strategy_stack.h"
#include "spdlog/spdlog.h"

namespace seedling::server {
namespace {

v1::Envelope Response(uint64_t request_id) {
  v1::Envelope e;
  e.set_protocol_version(1);
  e.set_request_id(request_id);
  return e;
}

std::string ParamsBytes(const std::vector<float>& params) {
  std::string bytes(params.size() * sizeof(float), '\0');
  std::memcpy(bytes.data(), params.data(), bytes.size());  // little-endian hosts only (checked elsewhere)
  return bytes;
}

// The key a device must use for an upload: one per (device, round, task).
std::string ExpectedKey(const std::string& device_id, uint64_t round_id, const std::string& task_id) {
  return StrCat(device_id, "/", round_id, "/", task_id);
}

}  // namespace

// ---- construction ---------------------------------------------------------------------------------------

Coordinator::Coordinator(const ServerConfig& config, const Clock* clock, Metrics* metrics, std::unique_ptr<Store> store)
    : config_(config),
      clock_(clock),
      metrics_(metrics),
      store_(std::move(store)),
      stats_(std::make_unique<RoundStats>()),
      uploads_(config.max_inflight_uploads) {
  if (metrics_ != nullptr) {
    requests_total_ = &metrics_->AddCounter("seedling_requests_total", "Requests from devices, by kind.", {"kind"});
    rejections_total_ = &metrics_->AddCounter("seedling_rejections_total", "Requests refused, by reason.", {"reason"});
    rounds_total_ = &metrics_->AddCounter("seedling_rounds_total", "Finished rounds, by outcome.", {"outcome"});
    declines_total_ = &metrics_->AddCounter("seedling_declines_total", "Tasks declined by devices.", {"reason"});
    accepted_total_ = &metrics_->AddCounter("seedling_updates_accepted_total", "Updates accepted.").Get();
    tasks_total_ = &metrics_->AddCounter("seedling_tasks_assigned_total", "Tasks handed out.").Get();
    global_version_gauge_ = &metrics_->AddGauge("seedling_global_version", "Committed global version.").Get();
    connections_gauge_ = &metrics_->AddGauge("seedling_connections", "Open device connections.").Get();
    if (config_.privacy.dp) {
      dp_epsilon_gauge_ = &metrics_
                               ->AddGauge("seedling_dp_epsilon",
                                          "Differential privacy spent by the committed rounds (epsilon at the "
                                          "configured delta).")
                               .Get();
      // Info-style: one series, value 1, labelled with the mechanism the epsilon above is accounted for.
      metrics_
          ->AddGauge("seedling_dp_mechanism",
                     "Differential privacy mechanism of the run (value 1): gaussian (RDP accountant, Poisson "
                     "sampling assumed) or dp-ftrl (tree aggregation, zCDP).",
                     {"mechanism"})
          .WithLabels({config_.privacy.mechanism})
          .Set(1);
    }
    if (config_.privacy.dp_ftrl()) {
      dp_rho_gauge_ = &metrics_->AddGauge("seedling_dp_rho", "DP-FTRL: zCDP rho spent by the committed rounds.").Get();
      dp_epsilon_1e10_gauge_ = &metrics_
                                    ->AddGauge("seedling_dp_epsilon_delta_1e_10",
                                               "DP-FTRL: epsilon of the committed rounds at delta = 1e-10, whatever "
                                               "the configured delta.")
                                    .Get();
    }
    if (config_.secagg.enabled) {
      secagg_aborts_total_ = &metrics_->AddCounter(
          "seedling_secagg_aborts_total", "Secure-aggregation rounds aborted, by the stage that failed.", {"stage"});
    }
  }
}

Coordinator::~Coordinator() = default;

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(const ServerConfig& config, const Clock* clock,
                                                                 Metrics* metrics, const StoreOptions& store_options) {
  SEEDLING_RETURN_IF_ERROR(config.Validate());
  SEEDLING_RETURN_IF_ERROR(MakeDirs(config.state_dir));
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<Store> store, Store::Open(config.state_dir, store_options));
  const int64_t now = clock->NowMs();
  SEEDLING_ASSIGN_OR_RETURN(std::vector<RoundRecord> aborted,
                            store->RecoverAfterCrash(now, "server restarted during the round"));
  for (const RoundRecord& r : aborted) {
    spdlog::warn("round {} was interrupted by a restart and is aborted; its devices will be asked to retry",
                 r.round_id);
  }
  std::unique_ptr<Coordinator> c(new Coordinator(config, clock, metrics, std::move(store)));
  // Nobody else can see `c` yet; the lock keeps the guarded members' contract (and the thread annotations)
  // simple.
  absl::MutexLock lock(&c->mu_);
  // Round ids are consecutive from 1 and every round is final after recovery: the latest id is the number
  // of rounds run so far (so `rounds` in the config counts across restarts).
  SEEDLING_ASSIGN_OR_RETURN(std::optional<RoundRecord> latest, c->store_->LatestRound());
  c->finished_rounds_ = latest.has_value() ? static_cast<int64_t>(latest->round_id) : 0;

  SEEDLING_ASSIGN_OR_RETURN(BaseAdapter base, MakeBaseAdapter(config));
  c->model_id_ = std::move(base.model_id);
  const std::unique_ptr<lora::LoraAdapter>& adapter = base.adapter;
  c->num_parameters_ = adapter->numel();
  c->lora_layers_ = adapter->config().layers;

  SEEDLING_ASSIGN_OR_RETURN(const uint64_t version, c->store_->GlobalVersion());
  SEEDLING_ASSIGN_OR_RETURN(c->strategy_, MakeServerStrategy(config, c->num_parameters_, version));
  if (config.privacy.dp) {
    // The budget spent so far, from the rounds the store committed.
    SEEDLING_ASSIGN_OR_RETURN(std::vector<DpSpend> spent, c->store_->DpLedger());
    SEEDLING_ASSIGN_OR_RETURN(c->dp_budget_, DpBudget::Create(config.privacy, spent, version));
    if (config.privacy.dp_ftrl()) {
      SEEDLING_ASSIGN_OR_RETURN(c->tree_participation_, TreeParticipation::Load(*c->store_, config.privacy, version));
    }
    c->SetDpGaugesLocked();
    spdlog::info("differential privacy: clip {} noise multiplier {}, {} rounds spent epsilon {:.4g} of {} (delta {})",
                 config.privacy.clip_norm, config.privacy.noise_multiplier, spent.size(), c->dp_budget_->epsilon(),
                 config.privacy.target_epsilon, config.privacy.delta);
  }
  c->global_.version = version;
  if (version == 0) {
    // Version 0 is the adapter's deterministic initialization: the same bits every device computes.
    const float* p = adapter->flat().data_ptr<float>();
    c->global_.params.assign(p, p + adapter->numel());
  } else {
    SEEDLING_ASSIGN_OR_RETURN(std::vector<NamedVector> vectors, c->store_->ReadCheckpoint(version));
    for (NamedVector& v : vectors) {
      if (v.name == "params") {
        c->global_.params = std::move(v.values);
      } else {
        c->global_.buffers[v.name] = std::move(v.values);
      }
    }
    if (static_cast<int64_t>(c->global_.params.size()) != c->num_parameters_) {
      return absl::FailedPreconditionError(StrCat("checkpoint of version ", version, " holds ",
                                                  c->global_.params.size(), " parameters; the configured adapter has ",
                                                  c->num_parameters_));
    }
  }
  if (std::optional<std::string> bad = FindNonFinite(c->global_); bad.has_value()) {
    // Written by a version before commits were checked: serve nothing until an operator rolls back.
    c->health_ = absl::DataLossError(StrCat("global model version ", version, " is not finite (", *bad,
                                            "); no rounds open until the state directory holds a finite checkpoint"));
    spdlog::error("coordinator: {}", std::string(c->health_.message()));
  }
  c->ServeGlobalLocked();
  if (c->global_version_gauge_ != nullptr)
    c->global_version_gauge_->Set(static_cast<double>(version));  // after a restart too
  spdlog::info("coordinator: model {} ({} weights on devices), adapter of {} parameters, global version {}",
               c->model_id_.substr(0, 12), model::WeightPrecisionName(config.weights), c->num_parameters_, version);
  return c;
}

void Coordinator::ServeGlobalLocked() {
  global_bytes_ = ParamsBytes(global_.params);
  global_sha256_ = Sha256(global_bytes_);
}

void Coordinator::CountRequest(const char* kind) {
  if (requests_total_ != nullptr) requests_total_->WithLabels({kind}).Increment();
}

v1::Envelope Coordinator::RejectLocked(v1::RejectCode code, std::string message, const char* reason) {
  v1::Envelope e = Response(0);
  v1::Reject* r = e.mutable_reject();
  r->set_code(code);
  r->set_message(std::move(message));
  if (code == v1::STALE || code == v1::ABORTED || code == v1::NOT_SELECTED || code == v1::RESOURCE_EXHAUSTED) {
    r->set_retry_after_seconds(RetrySecondsLocked());
  }
  ++rejected_by_reason_[reason];
  ++stats_->rejected;
  if (rejections_total_ != nullptr) rejections_total_->WithLabels({reason}).Increment();
  return e;
}

uint32_t Coordinator::RetrySecondsLocked() {
  // base ± jitter, from a deterministic stream (reproducible in tests and the simulator).
  Rng rng(config_.seed, 0x7265747279ULL /* "retry" */ + retry_counter_++);
  const double f = 1.0 + config_.retry_jitter * (2.0 * rng.Uniform() - 1.0);
  return static_cast<uint32_t>(std::max(1.0, std::round(static_cast<double>(config_.retry_base_s) * f)));
}

// ---- Hello ----------------------------------------------------------------------------------------------

v1::Envelope Coordinator::OnHello(const v1::Hello& hello, std::string* device_id) {
  // Only the (thread-safe) store is involved until a rejection: other requests need not wait for it.
  const DeviceAuth auth = AuthenticateDevice(*store_, hello.device_id(), hello.token());
  if (auth != DeviceAuth::kAuthenticated) {
    absl::MutexLock lock(&mu_);
    switch (auth) {
      case DeviceAuth::kUnavailable:
        return RejectLocked(v1::INTERNAL, "device registry unavailable", "internal");
      case DeviceAuth::kRevoked:
        return RejectLocked(v1::UNAUTHENTICATED, "this device was revoked by the operator", "revoked");
      default:
        return RejectLocked(v1::UNAUTHENTICATED, "unknown device or wrong token", "unauthenticated");
    }
  }
  (void)store_->TouchDevice(hello.device_id(), clock_->NowMs());
  *device_id = hello.device_id();
  v1::Envelope e = Response(0);
  e.mutable_hello_reply()->set_server_time_ms(static_cast<uint64_t>(clock_->NowMs()));
  e.mutable_hello_reply()->set_server_version(kVersionString);
  return e;
}

// ---- Check-in -------------------------------------------------------------------------------------------

v1::Task Coordinator::MakeTaskLocked(const RoundRecord& round, const TaskRecord& task) {
  v1::Task t;
  t.set_round_id(round.round_id);
  t.set_task_id(task.task_id);
  t.set_method(config_.method);
  auto& hp = *t.mutable_hyperparameters();
  hp["steps"] = static_cast<double>(config_.steps);
  hp["batch"] = static_cast<double>(config_.batch);
  hp["seq_len"] = static_cast<double>(config_.seq_len);
  if (config_.lr > 0) hp["lr"] = config_.lr;
  if (config_.epsilon > 0) hp["epsilon"] = config_.epsilon;
  hp["perturbations"] = static_cast<double>(config_.perturbations);
  if (config_.pseudo_labels && !config_.pseudo_label_choices.empty()) {
    // The curriculum lives here: devices label at most this share of their unlabelled rows this round.
    hp["pseudo_label_share"] = config_.PseudoLabelShare(round.round_id);
    hp["pseudo_label_threshold"] = config_.pseudo_label_threshold;
    for (const std::string& label : config_.pseudo_label_choices) t.add_pseudo_label_choices(label);
  }
  t.set_global_version(round.base_version);
  t.set_global_sha256(global_sha256_);
  // Each task's seed: a fixed function of (run seed, round, task) so a re-sent task is the same task.
  Rng rng(config_.seed ^ (round.round_id * 0x9E3779B97F4A7C15ULL), std::hash<std::string>{}(task.task_id));
  t.set_seed(rng.NextU64());
  t.mutable_codec()->set_codec(config_.codec.codec);
  t.mutable_codec()->set_block_size(config_.codec.block_size);
  t.mutable_codec()->set_topk_fraction(config_.codec.topk_fraction);
  t.set_clip_norm(static_cast<float>(config_.EffectiveClipNorm()));
  t.set_deadline_ms(static_cast<uint64_t>(round.deadline_ms));
  t.set_num_parameters(static_cast<uint64_t>(num_parameters_));
  t.set_max_update_bytes(config_.max_update_bytes);
  t.mutable_lora()->set_rank(static_cast<uint32_t>(config_.lora_rank));
  t.mutable_lora()->set_alpha(static_cast<float>(config_.lora_alpha));
  for (const std::string& target : config_.lora_targets) t.mutable_lora()->add_targets(target);
  t.mutable_lora()->set_init_seed(config_.lora_init_seed);
  for (const int64_t layer : lora_layers_) t.mutable_lora()->add_layers(static_cast<uint32_t>(layer));
  t.mutable_lora()->set_kind(config_.lora_kind);
  t.set_model_id(model_id_);
  t.set_weights(model::WeightPrecisionName(config_.weights));
  if (auto p = secagg_participants_.find(task.device_id); config_.secagg.enabled && p != secagg_participants_.end()) {
    t.mutable_secagg()->set_participant_id(p->second);
  }
  strategy_->ConfigureTask(global_.version, t);
  return t;
}

v1::Envelope Coordinator::RetryLocked(const std::string& reason) {
  v1::Envelope e = Response(0);
  e.mutable_check_in_reply()->mutable_retry_after()->set_seconds(RetrySecondsLocked());
  e.mutable_check_in_reply()->mutable_retry_after()->set_reason(reason);
  return e;
}

v1::Envelope Coordinator::OnCheckIn(const std::string& device_id, const v1::CheckIn& check_in) {
  absl::MutexLock lock(&mu_);
  auto retry = [&](const std::string& reason) { return RetryLocked(reason); };
  const v1::DeviceConditions& cond = check_in.conditions();
  if ((config_.require_charging && !cond.charging()) || (config_.require_unmetered && !cond.unmetered()) ||
      (config_.require_idle && !cond.idle())) {
    return retry("run conditions not met");
  }
  if (tree_participation_.has_value() && !tree_participation_->MayJoin(device_id)) {
    return retry("reached max_participations_per_tree in this DP-FTRL tree");
  }
  if (config_.FedBuff()) return FedBuffCheckInLocked(device_id, clock_->NowMs());
  if (!round_.has_value() || (round_->state != RoundState::kOpen && round_->state != RoundState::kCollecting)) {
    return retry("no open round");
  }
  // A device already selected in this round gets its task again (e.g. after a restart of the app).
  auto existing = store_->FindTaskFor(round_->round_id, device_id);
  if (!existing.ok()) return RejectLocked(v1::INTERNAL, "task registry unavailable", "internal");
  if (existing->has_value()) {
    const TaskRecord& task = **existing;
    if (task.state == "assigned") {
      v1::Envelope e = Response(0);
      *e.mutable_check_in_reply()->mutable_task() = MakeTaskLocked(*round_, task);
      return e;
    }
    return retry(task.state == "uploaded" ? "already reported this round" : "declined this round");
  }
  if (round_->state != RoundState::kOpen || round_->selected >= config_.SelectionQuota()) {
    return retry("not selected");
  }
  TaskRecord task;
  task.task_id = StrCat("r", round_->round_id, "-", round_->selected + 1);
  task.round_id = round_->round_id;
  task.device_id = device_id;
  task.assigned_ms = clock_->NowMs();
  if (absl::Status st = store_->AddTask(task); !st.ok()) {
    spdlog::error("cannot record task: {}", std::string(st.message()));
    return RejectLocked(v1::INTERNAL, "cannot record the task", "internal");
  }
  ++round_->selected;
  // SecAgg participant ids: the task's ordinal in the round (1, 2, ...), distinct by construction.
  if (config_.secagg.enabled) secagg_participants_[device_id] = static_cast<uint32_t>(round_->selected);
  if (tasks_total_ != nullptr) tasks_total_->Increment();
  v1::Envelope e = Response(0);
  *e.mutable_check_in_reply()->mutable_task() = MakeTaskLocked(*round_, task);
  if (round_->selected >= config_.SelectionQuota()) {
    if (store_->SetRoundState(round_->round_id, RoundState::kCollecting, clock_->NowMs()).ok()) {
      round_->state = RoundState::kCollecting;
      if (config_.secagg.enabled) StartSecAggLocked(clock_->NowMs());
    }
  }
  return e;
}

// ---- Download -------------------------------------------------------------------------------------------

v1::Envelope Coordinator::OnDownload(const std::string& device_id, const v1::Download& download) {
  absl::MutexLock lock(&mu_);
  v1::Envelope e = Response(0);
  v1::DownloadReply* r = e.mutable_download_reply();
  r->set_version(global_.version);
  if (download.what() == v1::Download::ADAPTER) {
    // The current version, or (fedbuff) an older one that tasks out still train from.
    const std::optional<ServedRef> served = ServedVersionLocked(download.version());
    if (!served.has_value()) {
      return RejectLocked(
          v1::STALE, StrCat("version ", download.version(), " is not the current global version ", global_.version),
          "stale_version");
    }
    const std::string& bytes = *served->bytes;
    const uint64_t total = bytes.size();
    if (download.offset() > total) return RejectLocked(v1::MALFORMED_MESSAGE, "offset beyond the adapter", "malformed");
    const uint64_t want = std::min<uint64_t>(download.max_bytes() == 0 ? comms::kMaxChunkBytes : download.max_bytes(),
                                             comms::kMaxChunkBytes);
    const uint64_t len = std::min<uint64_t>(want, total - download.offset());
    r->set_total_bytes(total);
    r->set_offset(download.offset());
    r->set_version(download.version());
    r->set_data(bytes.substr(download.offset(), len));
    r->set_sha256(*served->sha256);
    stats_->bytes_down += len;
    return e;
  }
  if (download.what() == v1::Download::SEED_SUMS) {
    auto blobs = store_->SeedSumsSince(download.since_version());
    if (!blobs.ok()) return RejectLocked(v1::INTERNAL, "seed history unavailable", "internal");
    size_t bytes = 0;
    for (const auto& [version, blob] : *blobs) {
      // Stay well inside one control frame; the device asks again from the last version it got.
      if (bytes + blob.size() > (3u << 20) && r->rounds_size() > 0) break;
      auto sums = ParseSeedSums(blob);
      if (!sums.ok()) return RejectLocked(v1::INTERNAL, "corrupt seed history", "internal");
      *r->add_rounds() = *sums;
      bytes += blob.size();
    }
    stats_->bytes_down += bytes;
    return e;
  }
  (void)device_id;
  return RejectLocked(v1::MALFORMED_MESSAGE, "Download.what must be ADAPTER or SEED_SUMS", "malformed");
}

// ---- Upload ---------------------------------------------------------------------------------------------

v1::Envelope Coordinator::OnUploadBegin(const std::string& device_id, const v1::UploadBegin& begin) {
  absl::MutexLock lock(&mu_);
  if (config_.secagg.enabled) {
    return RejectLocked(v1::INVALID_UPDATE, "this server runs secure aggregation: updates go through the SecAgg stages",
                        "secagg_plaintext");
  }
  const int64_t now = clock_->NowMs();
  // An exact retry of an update already in the ledger gets the same acknowledgement.
  auto ledger = store_->FindLedgerEntry(begin.idempotency_key());
  if (!ledger.ok()) return RejectLocked(v1::INTERNAL, "ledger unavailable", "internal");
  if (ledger->has_value()) {
    const LedgerEntry& entry = **ledger;
    if (entry.device_id != device_id || entry.sha256 != HexOf(begin.sha256())) {
      return RejectLocked(v1::DUPLICATE, "this idempotency key was used for a different update", "duplicate");
    }
    auto round = store_->FindRound(entry.round_id);
    if (round.ok() && round->has_value() && (*round)->state == RoundState::kAborted) {
      return RejectLocked(v1::ABORTED, StrCat("round ", entry.round_id, " was aborted; check in for a new task"),
                          "aborted");
    }
    v1::Envelope e = Response(0);
    e.mutable_upload_ack()->set_received_bytes(entry.bytes);
    e.mutable_upload_ack()->set_accepted(true);
    e.mutable_upload_ack()->set_round_id(entry.round_id);
    return e;
  }
  if (config_.FedBuff()) {
    // A task of an earlier buffer is still good: its update joins the buffer open now.
    if (std::optional<v1::Envelope> refusal =
            FedBuffUploadRefusalLocked(device_id, begin.round_id(), begin.task_id(), now, nullptr);
        refusal.has_value()) {
      return *std::move(refusal);
    }
  } else {
    auto round_record = store_->FindRound(begin.round_id());
    if (!round_record.ok()) return RejectLocked(v1::INTERNAL, "round registry unavailable", "internal");
    if (!round_record->has_value()) return RejectLocked(v1::NOT_SELECTED, "no such round", "not_selected");
    if ((*round_record)->state == RoundState::kAborted) {
      return RejectLocked(v1::ABORTED, StrCat("round ", begin.round_id(), " was aborted; check in for a new task"),
                          "aborted");
    }
    if (!round_.has_value() || round_->round_id != begin.round_id() || round_closing_ ||
        (round_->state != RoundState::kOpen && round_->state != RoundState::kCollecting)) {
      return RejectLocked(v1::STALE, StrCat("round ", begin.round_id(), " is closed"), "stale");
    }
    if (now > round_->deadline_ms) return RejectLocked(v1::STALE, "the round's deadline has passed", "stale");
    auto task = store_->FindTaskFor(begin.round_id(), device_id);
    if (!task.ok()) return RejectLocked(v1::INTERNAL, "task registry unavailable", "internal");
    if (!task->has_value() || (*task)->task_id != begin.task_id()) {
      return RejectLocked(v1::NOT_SELECTED, "this device has no such task in the round", "not_selected");
    }
    if ((*task)->state == "declined") return RejectLocked(v1::STALE, "the task was declined", "stale");
  }
  if (begin.idempotency_key() != ExpectedKey(device_id, begin.round_id(), begin.task_id())) {
    return RejectLocked(v1::MALFORMED_MESSAGE, "idempotency_key must be <device>/<round>/<task>", "malformed");
  }
  if (begin.total_bytes() == 0 || begin.total_bytes() > config_.max_update_bytes) {
    return RejectLocked(v1::RESOURCE_EXHAUSTED,
                        StrCat("update of ", begin.total_bytes(), " bytes; the cap is ", config_.max_update_bytes),
                        "too_large");
  }
  if (begin.codec() != config_.codec.codec) {
    return RejectLocked(
        v1::INVALID_UPDATE,
        StrCat("codec ", comms::CodecName(begin.codec()), " is not the task's ", comms::CodecName(config_.codec.codec)),
        "wrong_codec");
  }
  if (begin.num_examples() == 0) return RejectLocked(v1::INVALID_UPDATE, "num_examples must be > 0", "invalid");
  if (begin.sha256().size() != 32) return RejectLocked(v1::MALFORMED_MESSAGE, "sha256 must be 32 bytes", "malformed");

  absl::StatusOr<uint64_t> held = uploads_.Begin(device_id, begin, now);
  if (!held.ok()) return RejectLocked(v1::RESOURCE_EXHAUSTED, std::string(held.status().message()), "busy");
  v1::Envelope e = Response(0);
  e.mutable_upload_ack()->set_received_bytes(*held);
  e.mutable_upload_ack()->set_round_id(begin.round_id());
  return e;
}

// A chunk or commit under a key the server does not hold. In-flight uploads are dropped when their round
// closes, so for a key of another round (the SDK's keys are "<device>/<round>/<task>") the answer is
// Stale, which tells the device to stop and check in again; otherwise the device skipped UploadBegin.
v1::Envelope Coordinator::NoUploadLocked(const std::string& key, const char* message) {
  const size_t b = key.rfind('/');
  const size_t a = b == std::string::npos || b == 0 ? std::string::npos : key.rfind('/', b - 1);
  uint64_t round_id = 0;
  if (a != std::string::npos && absl::SimpleAtoi(key.substr(a + 1, b - a - 1), &round_id) &&
      (!round_.has_value() || round_id != round_->round_id || round_closing_)) {
    return RejectLocked(v1::STALE, StrCat("round ", round_id, " is closed"), "stale");
  }
  return RejectLocked(v1::MALFORMED_MESSAGE, message, "malformed");
}

v1::Envelope Coordinator::OnUploadChunk(const std::string& device_id, const v1::UploadChunk& chunk) {
  absl::MutexLock lock(&mu_);
  Upload* up = uploads_.Find(chunk.idempotency_key(), device_id);
  if (up == nullptr) {
    return NoUploadLocked(chunk.idempotency_key(), "no upload in progress under this key (send UploadBegin)");
  }
  if (chunk.data().size() > comms::kMaxChunkBytes) {
    return RejectLocked(v1::RESOURCE_EXHAUSTED, "chunks carry at most 1 MiB", "too_large");
  }
  v1::Envelope e = Response(0);
  e.mutable_upload_ack()->set_round_id(up->round_id);
  if (chunk.offset() != up->data.size()) {
    // Out of order (e.g. a retry of a chunk we already have): tell the device where we are.
    e.mutable_upload_ack()->set_received_bytes(up->data.size());
    return e;
  }
  if (up->data.size() + chunk.data().size() > up->total_bytes) {
    uploads_.Take(chunk.idempotency_key());
    return RejectLocked(v1::INVALID_UPDATE, "more bytes than announced", "invalid");
  }
  up->data.append(chunk.data());
  up->last_activity_ms = clock_->NowMs();
  stats_->bytes_up += chunk.data().size();
  e.mutable_upload_ack()->set_received_bytes(up->data.size());
  return e;
}

v1::Envelope Coordinator::OnUploadCommit(const std::string& device_id, const v1::UploadCommit& commit) {
  absl::MutexLock lock(&mu_);
  const int64_t now = clock_->NowMs();
  if (uploads_.Find(commit.idempotency_key(), device_id) == nullptr) {
    // A retry on a new connection may overtake the first attempt's ledger write, which runs outside mu_:
    // let the writes in flight finish, so the retry gets the acknowledgement the entry now warrants.
    WaitForLedgerLocked();
    auto ledger = store_->FindLedgerEntry(commit.idempotency_key());
    if (ledger.ok() && ledger->has_value() && (*ledger)->device_id == device_id) {
      v1::Envelope e = Response(0);  // a retried commit of an accepted update
      e.mutable_upload_ack()->set_received_bytes((*ledger)->bytes);
      e.mutable_upload_ack()->set_accepted(true);
      e.mutable_upload_ack()->set_round_id((*ledger)->round_id);
      return e;
    }
    return NoUploadLocked(commit.idempotency_key(), "no upload in progress under this key");
  }
  std::unique_ptr<Upload> up = uploads_.Take(commit.idempotency_key());
  if (!up->Complete()) {
    uploads_.Put(std::move(up));  // keep it: the device may still send the rest
    return RejectLocked(v1::MALFORMED_MESSAGE, "commit before all bytes arrived", "malformed");
  }
  if (Sha256(up->data) != up->sha256) {
    return RejectLocked(v1::INVALID_UPDATE, "SHA-256 of the received bytes does not match", "checksum");
  }
  uint64_t staleness = 0;
  if (config_.FedBuff()) {
    if (std::optional<v1::Envelope> refusal =
            FedBuffUploadRefusalLocked(device_id, up->round_id, up->task_id, now, &staleness);
        refusal.has_value()) {
      return *std::move(refusal);
    }
  } else if (!round_.has_value() || round_->round_id != up->round_id || round_closing_ ||
             (round_->state != RoundState::kOpen && round_->state != RoundState::kCollecting) ||
             now > round_->deadline_ms) {
    return RejectLocked(v1::STALE, StrCat("round ", up->round_id, " is closed"), "stale");
  }
  // The round the update counts in: its task's, or (fedbuff) the buffer open now.
  const uint64_t counted_in = round_->round_id;
  const int64_t target = config_.FedBuff() ? config_.fedbuff.buffer_size : config_.clients_per_round;
  // Validate and accumulate (the strategy leaves the aggregate unchanged when it refuses).
  UpdateView view{device_id, up->num_examples, up->data, staleness};
  if (absl::Status st = strategy_->Accumulate(view); !st.ok()) {
    strategy_->RecordFailure(device_id, std::string(st.message()));
    if (config_.FedBuff()) ForgetTaskLocked(up->task_id);  // the device drops an update refused as invalid
    return RejectLocked(v1::INVALID_UPDATE, std::string(st.message()), "invalid_update");
  }
  if (config_.FedBuff()) ForgetTaskLocked(up->task_id);
  // Acknowledged only once its ledger entry is durable.
  LedgerWrite w;
  w.entry = LedgerEntryFor(*up, now);
  w.entry.round_id = counted_in;
  w.metrics = up->metrics;
  w.staleness = staleness;
  WriteLedgerLocked(&w, now);
  if (!w.status.ok()) return RejectLocked(v1::INTERNAL, "the update could not be recorded; check in again", "internal");
  v1::Envelope e = Response(0);
  e.mutable_upload_ack()->set_received_bytes(up->total_bytes);
  e.mutable_upload_ack()->set_accepted(true);
  e.mutable_upload_ack()->set_round_id(counted_in);
  if (round_.has_value() && round_->round_id == counted_in && round_->accepted >= target) FinishRoundLocked(now);
  return e;
}

void Coordinator::WriteLedgerLocked(LedgerWrite* w, int64_t now) {
  ledger_queue_.push_back(w);
  while (!w->done && ledger_queue_.front() != w) io_done_.Wait(&mu_);
  if (w->done) return;  // an earlier writer's batch took it
  // `w` leads: its batch is every write queued now. It stays at the front while mu_ is released, so writes
  // arriving meanwhile wait for the next batch.
  const std::vector<LedgerWrite*> batch(ledger_queue_.begin(), ledger_queue_.end());
  std::vector<LedgerEntry> entries;
  entries.reserve(batch.size());
  for (const LedgerWrite* b : batch) entries.push_back(b->entry);
  mu_.Unlock();
  std::vector<absl::Status> results = store_->RecordAcceptedUpdates(entries);
  mu_.Lock();
  std::optional<absl::Status> failure;
  for (size_t i = 0; i < batch.size(); ++i) {
    LedgerWrite& b = *batch[i];
    b.status = std::move(results[i]);
    b.done = true;
    // No round ends while its ledger writes are queued (FinishRoundLocked, Tick and Shutdown wait for
    // them), so a durable entry belongs to the active round, unless a failure below aborted it already.
    if (!b.status.ok()) {
      if (!failure.has_value()) failure = b.status;
      continue;
    }
    if (!round_.has_value() || round_->round_id != b.entry.round_id) continue;
    ++round_->accepted;
    stats_->staleness_sum += b.staleness;
    stats_->staleness_max = std::max(stats_->staleness_max, b.staleness);
    stats_->processed_tokens += static_cast<int64_t>(b.metrics.processed_tokens());  // capped at UploadBegin
    if (std::isfinite(b.metrics.loss_start()) && std::isfinite(b.metrics.loss_end())) {
      stats_->loss_start_sum += b.metrics.loss_start();
      stats_->loss_end_sum += b.metrics.loss_end();
      ++stats_->loss_count;
    }
    if (accepted_total_ != nullptr) accepted_total_->Increment();
  }
  ledger_queue_.erase(ledger_queue_.begin(), ledger_queue_.begin() + static_cast<ptrdiff_t>(batch.size()));
  if (failure.has_value() && round_.has_value() && round_->round_id == w->entry.round_id) {
    // The aggregate already holds these updates but the ledger does not: this round cannot be trusted.
    spdlog::error("cannot record an accepted update, aborting round {}: {}", round_->round_id,
                  std::string(failure->message()));
    AbortRoundLocked(now, "the ledger could not be written");
  }
  io_done_.SignalAll();
}

void Coordinator::WaitForLedgerLocked() {
  while (!ledger_queue_.empty()) io_done_.Wait(&mu_);
}

v1::Envelope Coordinator::OnDecline(const std::string& device_id, const v1::Decline& decline) {
  absl::MutexLock lock(&mu_);
  auto task = store_->FindTask(decline.task_id());
  if (!task.ok()) return RejectLocked(v1::INTERNAL, "task registry unavailable", "internal");
  if (!task->has_value() || (*task)->device_id != device_id || (*task)->round_id != decline.round_id()) {
    return RejectLocked(v1::NOT_SELECTED, "no such task for this device", "not_selected");
  }
  if ((*task)->state == "assigned") {
    const std::string reason = v1::Decline::Reason_Name(decline.reason());
    (void)store_->SetTaskState(decline.task_id(), "declined", StrCat(reason, ": ", decline.detail()));
    if (declines_total_ != nullptr) declines_total_->WithLabels({reason}).Increment();
    if (config_.FedBuff()) ForgetTaskLocked(decline.task_id());
    // While a round finishes, its strategy is in the finishing thread's hands; a decline then is too late
    // for the round, as it was before a finish left the lock (the next BeginRound clears the failures).
    if (!finishing_) strategy_->RecordFailure(device_id, StrCat("declined: ", reason));
    // Before the session starts a declined device leaves the cohort; after, it is one of the dropouts.
    if (secagg_ == nullptr) secagg_participants_.erase(device_id);
  }
  v1::Envelope e = Response(0);
  e.mutable_ack();
  return e;
}

// ---- secure aggregation (SecAgg+) -----------------------------------------------------------------------

void Coordinator::StartSecAggLocked(int64_t now) {
  if (!round_.has_value() || secagg_ != nullptr) return;
  std::vector<uint32_t> cohort;
  for (const auto& [device, id] : secagg_participants_) cohort.push_back(id);
  absl::StatusOr<std::unique_ptr<SecAggSession>> session =
      SecAggSession::Start(config_.secagg, round_->round_id, std::move(cohort),
                           static_cast<uint32_t>(num_parameters_ + 1), global_sha256_, now, round_->deadline_ms);
  if (!session.ok()) return AbortSecAggLocked(now, v1::SECAGG_SETUP, session.status());
  secagg_ = std::move(session).value();
}

void Coordinator::AbortSecAggLocked(int64_t now, v1::SecAggStage stage, const absl::Status& why) {
  if (secagg_aborts_total_ != nullptr) secagg_aborts_total_->WithLabels({SecAggStageName(stage)}).Increment();
  AbortRoundLocked(now, StrCat("secure aggregation aborted at stage ", SecAggStageName(stage),
                               ", nothing released: ", why.message()));
}

// Closes the session's open stage; after the unmask stage, hands the sum to the strategy as one update and
// commits the round.
void Coordinator::CloseSecAggStageLocked(int64_t now) {
  const v1::SecAggStage stage = secagg_->stage();
  absl::StatusOr<std::optional<SecAggSum>> closed = secagg_->CloseStage(now);
  if (!closed.ok()) return AbortSecAggLocked(now, stage, closed.status());
  if (!closed->has_value()) return;  // the next stage is open
  const SecAggSum& result = **closed;
  SummedUpdate sum;
  sum.weighted_sum = result.aggregate.weighted_sum;
  sum.total_weight = result.aggregate.total_weight;
  sum.clients = result.clients;
  if (absl::Status st = strategy_->AccumulateSum(sum); !st.ok()) return AbortSecAggLocked(now, stage, st);
  round_->accepted = sum.clients;
  if (accepted_total_ != nullptr) accepted_total_->Increment(static_cast<uint64_t>(sum.clients));
  spdlog::info("round {}: secure aggregation unmasked the sum of {} of {} devices (total weight {})", round_->round_id,
               sum.clients, secagg_->cohort_size(), sum.total_weight);
  secagg_.reset();
  FinishRoundLocked(now);
}

v1::Envelope Coordinator::SecAggEnvelopeLocked(v1::SecAggStage stage, const SecAggAnswer& answer, int64_t now) {
  if (answer.kind == SecAggAnswer::Kind::kReject) return RejectLocked(answer.code, answer.message, answer.reason);
  v1::Envelope e = Response(0);
  v1::SecAggReply* r = e.mutable_secagg_reply();
  r->set_stage(stage);
  if (answer.kind == SecAggAnswer::Kind::kReply) {
    r->set_message(answer.message);
    return e;
  }
  r->mutable_not_ready()->set_retry_after_ms(static_cast<uint32_t>(config_.secagg.poll_ms));
  r->mutable_not_ready()->set_stage_deadline_ms(static_cast<uint64_t>(std::max<int64_t>(0, answer.deadline_ms)));
  r->mutable_not_ready()->set_server_time_ms(static_cast<uint64_t>(now));
  return e;
}

v1::Envelope Coordinator::OnSecAgg(const std::string& device_id, const v1::SecAggRequest& request) {
  absl::MutexLock lock(&mu_);
  const int64_t now = clock_->NowMs();
  if (!config_.secagg.enabled) {
    return RejectLocked(v1::MALFORMED_MESSAGE, "this server does not run secure aggregation", "malformed");
  }
  if (request.stage() < v1::SECAGG_SETUP || request.stage() > v1::SECAGG_UNMASK) {
    return RejectLocked(v1::MALFORMED_MESSAGE, "SecAggRequest.stage must be SETUP..UNMASK", "malformed");
  }
  // A round that is aggregating is over for its devices, as it is once committed.
  if (!round_.has_value() || round_->round_id != request.round_id() || round_->state == RoundState::kAggregating) {
    return RejectLocked(v1::ABORTED, StrCat("round ", request.round_id(), " is over; check in for a new task"),
                        "stale");
  }
  auto task = store_->FindTaskFor(request.round_id(), device_id);
  if (!task.ok()) return RejectLocked(v1::INTERNAL, "task registry unavailable", "internal");
  auto participant = secagg_participants_.find(device_id);
  if (!task->has_value() || (*task)->task_id != request.task_id() || participant == secagg_participants_.end()) {
    return RejectLocked(v1::NOT_SELECTED, "this device has no such task in the round", "not_selected");
  }
  if (secagg_ == nullptr) {
    // Selection is still open: the cohort is not fixed yet.
    if (request.stage() == v1::SECAGG_SETUP)
      return SecAggEnvelopeLocked(request.stage(), SecAggAnswer::NotReady(0), now);
    return RejectLocked(v1::MALFORMED_MESSAGE, "the session has not started: ask for SETUP first", "malformed");
  }
  const uint32_t id = participant->second;
  const SecAggAnswer answer = secagg_->Handle(id, request);
  if (!answer.invalid.empty()) {
    strategy_->RecordFailure(device_id, answer.invalid);
    v1::Envelope e = SecAggEnvelopeLocked(request.stage(), answer, now);
    if (secagg_->AllAnswered()) CloseSecAggStageLocked(now);
    return e;
  }
  if (answer.kind != SecAggAnswer::Kind::kAccepted) return SecAggEnvelopeLocked(request.stage(), answer, now);
  stats_->bytes_up += answer.bytes;  // keys, shares, the masked input and unmasking shares
  if (secagg_->ReadyToClose(config_.clients_per_round)) CloseSecAggStageLocked(now);  // may end the round
  if (secagg_ != nullptr) {
    return SecAggEnvelopeLocked(request.stage(), secagg_->AnswerAfterSubmit(id, request.stage()), now);
  }
  if (request.stage() == v1::SECAGG_UNMASK) return SecAggEnvelopeLocked(request.stage(), SecAggAnswer::Reply(""), now);
  return RejectLocked(v1::ABORTED, StrCat("round ", request.round_id(), " was aborted; check in for a new task"),
                      "aborted");
}

}  // namespace seedling::server
