#include "client/client.h"

#include <toml++/toml.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "base/file.h"
#include "base/json.h"
#include "base/philox.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "base/toml.h"
#include "base/version.h"
#include "client/internal/secagg_participant.h"
#include "client/internal/state_dir.h"
#include "client/local_data.h"
#include "client/local_training.h"
#include "client/memory_planner.h"
#include "client/task_spec.h"
#include "comms/codec.h"
#include "comms/tls.h"
#include "lora/adapter.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "optim/kseed.h"
#include "optim/parameters.h"
#include "privacy/dp.h"
#include "spdlog/spdlog.h"

namespace seedling::client {
namespace {

using Json = nlohmann::json;

// Errors worth retrying on a new connection.
bool Transient(const absl::Status& s) {
  return s.code() == absl::StatusCode::kUnavailable || s.code() == absl::StatusCode::kDeadlineExceeded;
}

absl::Status RejectStatus(const v1::Reject& r) {
  const std::string msg = StrCat(v1::RejectCode_Name(r.code()), ": ", r.message());
  switch (r.code()) {
    case v1::UNAUTHENTICATED:
      return absl::UnauthenticatedError(msg);
    case v1::RESOURCE_EXHAUSTED:
      return absl::ResourceExhaustedError(msg);
    case v1::STALE:
    case v1::ABORTED:
      return absl::AbortedError(msg);
    case v1::INTERNAL:
      return absl::UnavailableError(msg);
    default:
      return absl::FailedPreconditionError(msg);
  }
}

// The global adapter this round starts from: its flat parameters as synced and an adapter holding them.
struct GlobalAdapter {
  std::vector<float> params;
  std::unique_ptr<lora::LoraAdapter> adapter;
};

absl::StatusOr<GlobalAdapter> LoadGlobalAdapter(const internal::StateDir& state, const model::ModelConfig& model_config,
                                                const lora::LoraConfig& lora) {
  SEEDLING_ASSIGN_OR_RETURN(auto vectors, internal::ReadVectors(state.Path("adapter.safetensors")));
  GlobalAdapter global;
  global.params = std::move(vectors["params"]);
  SEEDLING_ASSIGN_OR_RETURN(global.adapter, lora::LoraAdapter::Create(model_config, lora));
  if (global.adapter->numel() != static_cast<int64_t>(global.params.size())) {
    return absl::FailedPreconditionError("the task's adapter does not match the synced global adapter");
  }
  std::memcpy(global.adapter->flat().data_ptr<float>(), global.params.data(), global.params.size() * sizeof(float));
  return global;
}

// The dense update, clipped to the task's L2 bound: FwdLLM uploads the summed forward gradient, the other
// methods Δ = θ_local − θ_global.
absl::StatusOr<std::vector<float>> ClippedDenseUpdate(const v1::Task& task, const TaskSpec& spec,
                                                      const TrainingResult& trained, const GlobalAdapter& global) {
  std::vector<float> update;
  if (spec.training.method == optim::Method::kFwdGrad) {
    update = trained.fwdgrad_sum;
  } else {
    const float* flat = global.adapter->flat().data_ptr<float>();
    update.resize(global.params.size());
    for (size_t i = 0; i < update.size(); ++i) update[i] = flat[i] - global.params[i];
  }
  if (task.clip_norm() > 0) {
    // Flat L2 clipping to C (DP-FedAvg); privacy::ClipToL2Norm guarantees ‖update‖ ≤ C after fp32 rounding.
    SEEDLING_RETURN_IF_ERROR(privacy::ClipToL2Norm(update, task.clip_norm()).status());
  }
  return update;
}

// kseed: the (seed index, scalar) pairs of the applied steps, each scalar clipped to |ĝ| ≤ C under DP (the
// server clips again, scalars then the per-seed vector's L2 norm, whatever arrives).
absl::StatusOr<std::string> EncodeKSeedUpdate(const v1::Task& task, const TrainingResult& trained) {
  std::vector<comms::SeedIndexScalar> pairs;
  for (const optim::SeedScalar& p : trained.kseed_pairs) pairs.push_back({p.index, p.value});
  if (task.clip_norm() > 0) {
    std::vector<float> values;
    for (const comms::SeedIndexScalar& p : pairs) values.push_back(p.value);
    SEEDLING_RETURN_IF_ERROR(privacy::ClipScalars(values, task.clip_norm()).status());
    for (size_t k = 0; k < pairs.size(); ++k) pairs[k].value = values[k];
  }
  return comms::EncodeSeedIndexScalars(pairs);
}

// A dense update with the task's codec; top-k carries its error feedback across rounds in feedback.bin.
absl::StatusOr<std::string> EncodeDenseUpdate(const v1::Task& task, const std::vector<float>& update,
                                              const internal::StateDir& state) {
  comms::CodecOptions co;
  co.codec = task.codec().codec();
  co.block_size = task.codec().block_size() > 0 ? task.codec().block_size() : 64;
  co.topk_fraction = task.codec().topk_fraction() > 0 ? task.codec().topk_fraction() : 0.01f;
  comms::ErrorFeedback feedback(update.size());
  const std::string feedback_path = state.Path("feedback.bin");
  if (co.codec == v1::CODEC_TOPK && FileExists(feedback_path)) {
    absl::StatusOr<std::string> bytes = ReadFile(feedback_path);
    if (bytes.ok()) {
      auto loaded = comms::ErrorFeedback::Deserialize(*bytes);
      if (loaded.ok() && loaded->residual().size() == update.size()) feedback = std::move(loaded).value();
    }
  }
  SEEDLING_ASSIGN_OR_RETURN(std::string payload, comms::EncodeDense(update, co, task.seed(), &feedback));
  if (co.codec == v1::CODEC_TOPK) SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(feedback_path, feedback.Serialize()));
  return payload;
}

// The update as it will be uploaded (plaintext rounds): seeds and scalars for kseed and for fwdgrad with the
// seed-scalar codec, otherwise the clipped dense update with the task's codec. ResourceExhausted above the
// task's cap.
absl::StatusOr<std::string> EncodeUpdate(const v1::Task& task, const TaskSpec& spec, const TrainingResult& trained,
                                         const GlobalAdapter& global, const internal::StateDir& state) {
  std::string payload;
  if (spec.training.method == optim::Method::kKSeed) {
    SEEDLING_ASSIGN_OR_RETURN(payload, EncodeKSeedUpdate(task, trained));
  } else if (spec.training.method == optim::Method::kFwdGrad && task.codec().codec() == v1::CODEC_SEED_SCALARS) {
    std::vector<comms::SeedValueScalar> pairs;
    for (const auto& [seed, value] : trained.fwdgrad_pairs) pairs.push_back({seed, value});
    payload = comms::EncodeSeedValueScalars(pairs);
  } else {
    SEEDLING_ASSIGN_OR_RETURN(const std::vector<float> update, ClippedDenseUpdate(task, spec, trained, global));
    SEEDLING_ASSIGN_OR_RETURN(payload, EncodeDenseUpdate(task, update, state));
  }
  if (payload.size() > task.max_update_bytes()) {
    return absl::ResourceExhaustedError(
        StrCat("the encoded update (", payload.size(), " bytes) exceeds the task's cap"));
  }
  return payload;
}

// What training measured, for the caller's RunResult.
void SetTrainingFigures(const TrainingResult& trained, RunResult& r) {
  r.loss_start = trained.loss_start;
  r.loss_end = trained.loss_end;
  r.processed_tokens = static_cast<uint64_t>(trained.processed_tokens);
  r.scored_tokens = static_cast<uint64_t>(trained.scored_tokens);
  r.tokens_per_second = trained.seconds > 0 ? static_cast<double>(trained.processed_tokens) / trained.seconds : 0.0;
}

}  // namespace

const char* RunOutcomeName(RunOutcome o) {
  switch (o) {
    case RunOutcome::kUploaded:
      return "uploaded";
    case RunOutcome::kRetryLater:
      return "retry_later";
    case RunOutcome::kDeclined:
      return "declined";
    case RunOutcome::kCancelled:
      return "cancelled";
    case RunOutcome::kDropped:
      return "dropped";
  }
  return "?";
}

// ---- Client ---------------------------------------------------------------------------------------------

Client::Client(ClientConfig config, std::unique_ptr<comms::Transport> transport, SharedModel shared)
    : config_(std::move(config)), transport_(std::move(transport)), model_(std::move(shared)) {
  data_path_ = config_.data_path.empty() ? JoinPath(config_.state_dir, "examples.jsonl") : config_.data_path;
}

Client::~Client() = default;

absl::StatusOr<std::unique_ptr<Client>> Client::Create(ClientConfig config, std::unique_ptr<comms::Transport> transport,
                                                       SharedModel shared) {
  SEEDLING_RETURN_IF_ERROR(config.Validate());
  SEEDLING_RETURN_IF_ERROR(MakeDirs(config.state_dir));
  if (transport == nullptr) {
    if (config.ca_file.empty()) return absl::InvalidArgumentError("ca_file is required to talk TLS to the server");
    comms::TlsClientOptions o;
    o.host = config.host;
    o.port = config.port;
    o.ca_file = config.ca_file;
    o.pinned_public_key_sha256 = config.pinned_public_key_sha256;
    o.server_name = config.server_name;
    o.client_cert_file = config.client_cert_file;
    o.client_key_file = config.client_key_file;
    SEEDLING_ASSIGN_OR_RETURN(transport, comms::MakeTlsTransport(o));
  }
  std::unique_ptr<Client> c(new Client(std::move(config), std::move(transport), std::move(shared)));
  // The model id the server sends with each task (model::ModelId).
  SEEDLING_ASSIGN_OR_RETURN(const model::ModelConfig model_config, model::LoadModelConfig(c->config_.model_dir));
  c->model_id_ = model::ModelId(model_config);
  return c;
}

void Client::SetConditions(const Conditions& conditions) {
  std::lock_guard<std::mutex> lock(mu_);
  conditions_ = conditions;
}

absl::Status Client::SetDataPath(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  data_path_ = path;
  return absl::OkStatus();
}

absl::Status Client::AddExample(std::string_view json_row) {
  if (static_cast<int64_t>(json_row.size()) > config_.max_row_bytes) {
    return absl::InvalidArgumentError(
        StrCat("the example is ", json_row.size(), " bytes; max_row_bytes is ", config_.max_row_bytes));
  }
  SEEDLING_ASSIGN_OR_RETURN(const Json row, ParseJson(json_row, "the example"));
  if (!row.is_object()) return absl::InvalidArgumentError("an example must be a JSON object");
  std::lock_guard<std::mutex> lock(mu_);
  std::ofstream out(JoinPath(config_.state_dir, "examples.jsonl"), std::ios::app);
  out << row.dump() << "\n";
  if (!out.flush()) return absl::InternalError("cannot append to the example store");
  return absl::OkStatus();
}

void Client::SetProgressCallback(std::function<void(const RunProgress&)> callback) {
  std::lock_guard<std::mutex> lock(mu_);
  progress_ = std::move(callback);
}

void Client::SetUploadObserver(std::function<void(const v1::Task&, const std::string&, uint64_t)> f) {
  std::lock_guard<std::mutex> lock(mu_);
  upload_observer_ = std::move(f);
}

void Client::Cancel() {
  cancelled_ = true;
  std::lock_guard<std::mutex> lock(sleep_mu_);
  sleep_cv_.notify_all();
}

void Client::Report(const std::string& phase, int64_t done, int64_t total) {
  std::function<void(const RunProgress&)> f;
  {
    std::lock_guard<std::mutex> lock(mu_);
    f = progress_;
  }
  if (f) f({phase, done, total});
}

void Client::SetSimulationHooks(SimulationHooks hooks) {
  std::lock_guard<std::mutex> lock(run_mu_);
  hooks_ = std::move(hooks);
}

bool Client::Sleep(double seconds) {
  if (hooks_.clock != nullptr) {
    if (cancelled_) return false;
    hooks_.clock->Sleep(seconds);
    return !cancelled_;
  }
  std::unique_lock<std::mutex> lock(sleep_mu_);
  return !sleep_cv_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return cancelled_.load(); });
}

int64_t Client::NowMs() { return hooks_.clock != nullptr ? hooks_.clock->NowMs() : SteadyClock().NowMs(); }

int64_t Client::TimeOfDayMs() { return hooks_.clock != nullptr ? hooks_.clock->NowMs() : SystemClock().NowMs(); }

absl::StatusOr<std::unique_ptr<comms::Channel>> Client::Connect() {
  absl::Status last;
  for (int attempt = 0; attempt < config_.max_attempts; ++attempt) {
    if (cancelled_) return absl::CancelledError("cancelled");
    if (attempt > 0) {
      // Full jitter (Brooker, "Exponential Backoff And Jitter"): U(0, min(max, base × 2^attempt)).
      Rng rng(config_.seed, 0x6261636b6f6666ULL /* "backoff" */ + attempt_counter_++);
      const double cap = std::min(config_.backoff_max_s, config_.backoff_base_s * std::pow(2.0, attempt));
      if (!Sleep(rng.Uniform() * cap)) return absl::CancelledError("cancelled");
    }
    Report("connecting", attempt, config_.max_attempts);
    auto channel = transport_->Connect(comms::Duration(config_.connect_timeout_ms));
    if (!channel.ok()) {
      last = channel.status();
      if (!Transient(last)) return last;
      continue;
    }
    v1::Envelope hello;
    hello.set_protocol_version(1);
    hello.set_request_id(++request_id_);
    hello.mutable_hello()->set_device_id(config_.device_id);
    hello.mutable_hello()->set_token(config_.token);
    hello.mutable_hello()->set_sdk_version(kVersionString);
    for (const std::string& m : config_.methods) hello.mutable_hello()->add_methods(m);
    auto reply = (*channel)->Call(hello, comms::Duration(config_.call_timeout_ms));
    if (!reply.ok()) {
      last = reply.status();
      if (!Transient(last)) return last;
      continue;
    }
    if (reply->has_reject()) return RejectStatus(reply->reject());
    if (!reply->has_hello_reply()) return absl::InternalError("the server did not answer Hello");
    return std::move(channel).value();
  }
  return absl::UnavailableError(
      StrCat("server unreachable after ", config_.max_attempts, " attempts: ", last.message()));
}

absl::StatusOr<v1::Envelope> Client::Call(std::unique_ptr<comms::Channel>& channel, v1::Envelope request) {
  request.set_protocol_version(1);
  for (int attempt = 0;; ++attempt) {
    if (cancelled_) return absl::CancelledError("cancelled");
    if (channel == nullptr) {
      SEEDLING_ASSIGN_OR_RETURN(channel, Connect());
    }
    request.set_request_id(++request_id_);
    auto reply = channel->Call(request, comms::Duration(config_.call_timeout_ms));
    if (reply.ok()) return reply;
    channel.reset();
    if (!Transient(reply.status()) || attempt + 1 >= config_.max_attempts) return reply.status();
  }
}

absl::StatusOr<RunResult> Client::RunOnce() {
  std::lock_guard<std::mutex> lock(run_mu_);
  // A Cancel() that came while no run was going (e.g. just before this one started on another thread)
  // applies to this run: it is not lost.
  absl::StatusOr<RunResult> r =
      cancelled_ ? absl::StatusOr<RunResult>(absl::CancelledError("cancelled before the run started"))
                 : RunOnceLocked();
  const bool was_cancelled = cancelled_.exchange(false);  // one Cancel() stops one run
  // Cancel() outside training (connecting, backing off, syncing, uploading) stops the run where it is; the
  // state directory is consistent as after any error, and the caller sees kCancelled as documented.
  if (!r.ok() && r.status().code() == absl::StatusCode::kCancelled && was_cancelled) {
    RunResult cancelled;
    cancelled.outcome = RunOutcome::kCancelled;
    cancelled.detail = std::string(r.status().message());
    return cancelled;
  }
  // Aborted is the round going away under the device (an over-selected straggler's upload after the round
  // closed, an aborted round, a refused update): routine in federated learning, so an outcome, not an error.
  // The state directory is already back to idle.
  if (!r.ok() && r.status().code() == absl::StatusCode::kAborted) {
    RunResult dropped;
    dropped.outcome = RunOutcome::kDropped;
    dropped.detail = std::string(r.status().message());
    return dropped;
  }
  return r;
}

absl::StatusOr<RunResult> Client::RunOnceLocked() {
  State state;
  state.dir = config_.state_dir;
  SEEDLING_RETURN_IF_ERROR(state.Load());
  std::unique_ptr<comms::Channel> channel;
  SEEDLING_ASSIGN_OR_RETURN(channel, Connect());

  // 1. An update trained before the app was killed: upload it first.
  if (state.phase == internal::Phase::kTrained) {
    absl::StatusOr<RunResult> r = Upload(channel, state);
    if (!r.ok() || r->outcome != RunOutcome::kDropped) return r;
    spdlog::info("the pending update is no longer wanted ({}); checking in", r->detail);
  }

  // 2. Check in: a task, or when to come back.
  SEEDLING_ASSIGN_OR_RETURN(v1::CheckInReply reply, CheckIn(channel, state));
  if (reply.has_retry_after()) {
    RunResult r;
    r.outcome = RunOutcome::kRetryLater;
    r.retry_after_seconds = reply.retry_after().seconds();
    r.detail = reply.retry_after().reason();
    return r;
  }
  return RunTask(channel, reply.task(), state);
}

absl::StatusOr<v1::CheckInReply> Client::CheckIn(std::unique_ptr<comms::Channel>& channel, const State& state) {
  v1::Envelope check_in;
  {
    std::lock_guard<std::mutex> lock(mu_);
    v1::DeviceConditions* c = check_in.mutable_check_in()->mutable_conditions();
    c->set_charging(conditions_.charging);
    c->set_unmetered(conditions_.unmetered);
    c->set_idle(conditions_.idle);
    c->set_battery(conditions_.battery);
  }
  check_in.mutable_check_in()->set_memory_budget_bytes(static_cast<uint64_t>(config_.memory_budget_bytes));
  check_in.mutable_check_in()->set_synced_version(state.synced_version);
  check_in.mutable_check_in()->set_pending_idempotency_key(state.idempotency_key);
  SEEDLING_ASSIGN_OR_RETURN(v1::Envelope reply, Call(channel, check_in));
  if (reply.has_reject()) return RejectStatus(reply.reject());
  if (!reply.has_check_in_reply()) return absl::InternalError("unexpected answer to CheckIn");
  return std::move(*reply.mutable_check_in_reply());
}

absl::StatusOr<RunResult> Client::RunTask(std::unique_ptr<comms::Channel>& channel, const v1::Task& task,
                                          State& state) {
  // Tasks the device cannot run are declined with a reason the server counts.
  if (task.model_id() != model_id_) return Decline(channel, task, v1::Decline::UNSUPPORTED, "a different base model");
  if (std::find(config_.methods.begin(), config_.methods.end(), task.method()) == config_.methods.end()) {
    return Decline(channel, task, v1::Decline::UNSUPPORTED, StrCat("method ", task.method(), " is not enabled here"));
  }
  // The frozen weights: this device's own choice, else the task's (a server that predates the field sends
  // none: fp32).
  const std::string weights_name = !config_.weights.empty() ? config_.weights
                                   : task.weights().empty() ? std::string("fp32")
                                                            : task.weights();
  absl::StatusOr<model::WeightPrecision> weights = model::ParseWeightPrecision(weights_name);
  if (!weights.ok()) {
    return Decline(channel, task, v1::Decline::UNSUPPORTED,
                   StrCat("weights '", weights_name, "' are not supported by this SDK"));
  }
  return Train(channel, task, *weights, state);
}

absl::StatusOr<RunResult> Client::Decline(std::unique_ptr<comms::Channel>& channel, const v1::Task& task,
                                          v1::Decline::Reason reason, std::string detail) {
  v1::Envelope d;
  d.mutable_decline()->set_round_id(task.round_id());
  d.mutable_decline()->set_task_id(task.task_id());
  d.mutable_decline()->set_reason(reason);
  d.mutable_decline()->set_detail(detail);
  SEEDLING_ASSIGN_OR_RETURN(v1::Envelope ack, Call(channel, d));
  (void)ack;
  RunResult r;
  r.outcome = RunOutcome::kDeclined;
  r.round_id = task.round_id();
  r.detail = std::move(detail);
  return r;
}

absl::Status Client::EnsureModel(model::WeightPrecision weights) {
  if (model_.tokenizer == nullptr) {
    SEEDLING_ASSIGN_OR_RETURN(model_.tokenizer, model::LoadTokenizer(config_.model_dir));
  }
  if (model_.model != nullptr && model_.precision == weights) return absl::OkStatus();
  if (model_.model != nullptr) {
    spdlog::info("reloading the base model with {} weights (it was held as {})", model::WeightPrecisionName(weights),
                 model::WeightPrecisionName(model_.precision));
  }
  model_.model.reset();  // one copy at a time (a shared one stays with its other users)
  model::LoadOptions options;
  options.precision = weights;
  options.cache_dir =
      config_.weight_cache_dir.empty() ? JoinPath(config_.state_dir, "model-cache") : config_.weight_cache_dir;
  SEEDLING_ASSIGN_OR_RETURN(model_.model, model::LlamaModel::Load(config_.model_dir, options));
  model_.precision = weights;
  return absl::OkStatus();
}

absl::Status Client::SyncGlobal(std::unique_ptr<comms::Channel>& channel, const v1::Task& task,
                                const lora::LoraConfig& lora, const model::ModelConfig& model_config, State& state) {
  Report("syncing", 0, 1);
  const std::string adapter_path = state.Path("adapter.safetensors");
  std::vector<float> params;
  bool have_local = false;
  if (FileExists(adapter_path)) {
    auto vectors = internal::ReadVectors(adapter_path);
    if (vectors.ok() && vectors->count("params") && vectors->at("params").size() == task.num_parameters()) {
      params = std::move(vectors->at("params"));
      have_local = true;
    }
  }
  auto sha_of = [](const std::vector<float>& v) {
    return Sha256(std::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)));
  };
  if (have_local && state.synced_version == task.global_version() && sha_of(params) == task.global_sha256()) {
    return absl::OkStatus();
  }
  // kseed: replay the per-seed sums since the version we hold (a few KiB per round) instead of downloading.
  if (task.method() == "kseed") {
    if (!have_local || state.synced_version == 0) {
      // Version 0 is the adapter's deterministic initialization: compute it.
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<lora::LoraAdapter> a, lora::LoraAdapter::Create(model_config, lora));
      params.assign(a->flat().data_ptr<float>(), a->flat().data_ptr<float>() + a->numel());
      state.synced_version = 0;
    }
    uint64_t since = state.synced_version;
    const std::vector<uint64_t> pool = optim::CandidateSeeds(task.kseed_pool_seed(), task.kseed_pool_size());
    while (since < task.global_version()) {
      v1::Envelope req;
      req.mutable_download()->set_what(v1::Download::SEED_SUMS);
      req.mutable_download()->set_since_version(since);
      SEEDLING_ASSIGN_OR_RETURN(v1::Envelope reply, Call(channel, req));
      if (reply.has_reject()) return RejectStatus(reply.reject());
      if (!reply.has_download_reply() || reply.download_reply().rounds_size() == 0) break;
      const uint64_t asked = since;
      for (const v1::RoundSeedSums& round : reply.download_reply().rounds()) {
        if (round.version() <= since) continue;
        // A later round may have committed since the task was handed out (this device is a straggler):
        // the task is for global_version, so stop there.
        if (round.version() > task.global_version()) break;
        std::vector<optim::SeedScalar> sums;
        for (const v1::SeedScalar& s : round.sums()) sums.push_back({s.index(), s.value()});
        for (const optim::SeedScalar& s : sums) {
          if (s.index >= pool.size() || !std::isfinite(s.value)) return absl::DataLossError("invalid seed sums");
        }
        // θ −= lr Σ_i G_i z(pool[i]) in ascending i: the arithmetic of optim::ApplySeedSums and the server.
        std::vector<optim::SeedScalar> sorted = sums;
        std::stable_sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) { return a.index < b.index; });
        for (const optim::SeedScalar& s : sorted) {
          AddNormal({pool[s.index], rng_stream::kPerturbation}, 0,
                    static_cast<float>(-round.lr() * static_cast<double>(s.value)),
                    std::span<float>(params.data(), params.size()));
        }
        since = round.version();
      }
      if (since == asked) break;  // no progress (a gap in the history): fall back to the download
    }
    if (since == task.global_version() && sha_of(params) == task.global_sha256()) {
      state.synced_version = since;
      SEEDLING_RETURN_IF_ERROR(internal::WriteVectors(adapter_path, {{"params", params}}));
      return state.Save();
    }
    spdlog::warn("seed replay did not reproduce global version {}; downloading the adapter", task.global_version());
  }
  // Download the adapter in chunks and check its SHA-256.
  std::string bytes;
  uint64_t total = 1;
  while (bytes.size() < total) {
    v1::Envelope req;
    req.mutable_download()->set_what(v1::Download::ADAPTER);
    req.mutable_download()->set_version(task.global_version());
    req.mutable_download()->set_offset(bytes.size());
    req.mutable_download()->set_max_bytes(static_cast<uint32_t>(comms::kMaxChunkBytes));
    SEEDLING_ASSIGN_OR_RETURN(v1::Envelope reply, Call(channel, req));
    if (reply.has_reject()) return RejectStatus(reply.reject());
    const v1::DownloadReply& d = reply.download_reply();
    if (d.offset() != bytes.size() || (d.data().empty() && bytes.size() < d.total_bytes())) {
      return absl::DataLossError("the adapter download went out of step");
    }
    total = d.total_bytes();
    bytes += d.data();
    Report("syncing", static_cast<int64_t>(bytes.size()), static_cast<int64_t>(total));
  }
  if (Sha256(bytes) != task.global_sha256() || bytes.size() != task.num_parameters() * sizeof(float)) {
    return absl::DataLossError("the downloaded adapter does not match the task's SHA-256");
  }
  params.resize(task.num_parameters());
  std::memcpy(params.data(), bytes.data(), bytes.size());
  state.synced_version = task.global_version();
  SEEDLING_RETURN_IF_ERROR(internal::WriteVectors(adapter_path, {{"params", params}}));
  return state.Save();
}

// ---- Train: plan -> sync -> load data -> train -> clip -> encode -> upload ---------------------------------

absl::StatusOr<RunResult> Client::Train(std::unique_ptr<comms::Channel>& channel, const v1::Task& task,
                                        model::WeightPrecision weights, State& state) {
  SEEDLING_ASSIGN_OR_RETURN(const TaskSpec spec, TaskSpecFromTask(task));
  SEEDLING_ASSIGN_OR_RETURN(const model::ModelConfig model_config, model::LoadModelConfig(config_.model_dir));
  const std::string data_path = DataPath();
  const LocalDataOptions data_options = DataOptions(spec, model_config);
  const std::string weights_name = model::WeightPrecisionName(weights);

  // Plan memory before loading anything big: a task that cannot fit is declined.
  absl::StatusOr<MemoryPlan> plan = PlanTask(spec, model_config, weights, data_path, data_options);
  if (!plan.ok()) {
    if (plan.status().code() != absl::StatusCode::kResourceExhausted) return plan.status();
    SEEDLING_ASSIGN_OR_RETURN(RunResult r, Decline(channel, task, v1::Decline::MEMORY,
                                                   StrCat(weights_name, " weights: ", plan.status().message())));
    r.weights = weights_name;
    return r;
  }

  SEEDLING_RETURN_IF_ERROR(EnsureModel(weights));
  SEEDLING_RETURN_IF_ERROR(SyncGlobal(channel, task, spec.lora, model_config, state));
  SEEDLING_RETURN_IF_ERROR(BeginTask(task, state));
  SEEDLING_ASSIGN_OR_RETURN(const LocalDataset loaded, LocalDataset::Load(data_path, *model_.tokenizer, data_options));
  SEEDLING_ASSIGN_OR_RETURN(const GlobalAdapter global, LoadGlobalAdapter(state, model_config, spec.lora));
  // Pseudo-labelling (FeS): the global model just synced labels the confident share of the unlabelled rows.
  SEEDLING_ASSIGN_OR_RETURN(const PseudoLabelResult pseudo, PseudoLabelRows(*model_.model, global.adapter.get(), loaded,
                                                                            *model_.tokenizer, spec.pseudo_label));
  const LocalDataset data = pseudo.examples.empty() ? loaded : loaded.WithExtraTraining(pseudo.examples);
  if (data.train().empty()) {
    SEEDLING_ASSIGN_OR_RETURN(RunResult r, Decline(channel, task, v1::Decline::NO_EXAMPLES,
                                                   StrCat("no labelled row to train on (", loaded.unlabelled().size(),
                                                          " unlabelled, none pseudo-labelled)")));
    r.weights = weights_name;
    return r;
  }
  const uint64_t examples = std::max<uint64_t>(1, data.train().size());

  // Secure aggregation: join the session (setup, keys, shares) before training, bound to the adapter this
  // device verified; the masked input follows training. The session lives in memory only: if the app is
  // killed, the device is one of the session's dropouts.
  std::unique_ptr<internal::SecAggParticipant> secagg;
  if (task.has_secagg()) {
    SEEDLING_ASSIGN_OR_RETURN(secagg, JoinSecAgg(channel, task, spec.training.method, global.params));
  }

  const absl::StatusOr<TrainingResult> trained = TrainLocally(spec, *plan, data, *global.adapter, state);
  if (!trained.ok() && trained.status().code() == absl::StatusCode::kCancelled) {
    RunResult r;
    r.outcome = RunOutcome::kCancelled;
    r.round_id = task.round_id();
    r.detail = std::string(trained.status().message());
    return r;
  }
  SEEDLING_RETURN_IF_ERROR(trained.status());

  if (secagg != nullptr) {
    SEEDLING_ASSIGN_OR_RETURN(const std::vector<float> update, ClippedDenseUpdate(task, spec, *trained, global));
    SEEDLING_ASSIGN_OR_RETURN(RunResult r, SubmitSecAgg(*secagg, task, update, examples, state));
    SetTrainingFigures(*trained, r);
    r.weights = weights_name;
    return r;
  }
  SEEDLING_ASSIGN_OR_RETURN(const std::string payload, EncodeUpdate(task, spec, *trained, global, state));
  Observe(task, payload, static_cast<uint64_t>(data.train().size()));
  SEEDLING_RETURN_IF_ERROR(StageUpload(payload, examples, *trained, state));
  absl::StatusOr<RunResult> uploaded = Upload(channel, state);
  if (uploaded.ok()) uploaded->weights = weights_name;
  return uploaded;
}

std::string Client::DataPath() {
  std::lock_guard<std::mutex> lock(mu_);
  return data_path_;
}

LocalDataOptions Client::DataOptions(const TaskSpec& spec, const model::ModelConfig& model_config) const {
  LocalDataOptions options = DataOptionsFor(spec, model_config);
  options.max_row_bytes = config_.max_row_bytes;
  return options;
}

absl::StatusOr<MemoryPlan> Client::PlanTask(const TaskSpec& spec, const model::ModelConfig& model_config,
                                            model::WeightPrecision weights, const std::string& data_path,
                                            const LocalDataOptions& data_options) {
  // The runtime baseline is measured once, before this client loads a model (measured later it would count
  // the model twice), unless the embedder gives it (the simulator measures it once for all its devices).
  if (runtime_bytes_ < 0) {
    runtime_bytes_ = config_.runtime_bytes >= 0 ? config_.runtime_bytes
                     : model_.model != nullptr  ? 0
                                                : MeasureRuntimeBytes();
  }
  SEEDLING_ASSIGN_OR_RETURN(PlanRequest request, PlanRequestFor(spec, config_.model_dir, model_config, weights));
  request.budget_bytes = config_.memory_budget_bytes;
  request.runtime_bytes = runtime_bytes_;
  // The data as loading will hold it, bounded by one streaming pass before anything is parsed.
  SEEDLING_ASSIGN_OR_RETURN(const DataFootprint footprint, ScanDataFootprint(data_path, data_options));
  request.data_bytes = footprint.total_bytes();
  return PlanMemory(request);
}

absl::Status Client::BeginTask(const v1::Task& task, State& state) {
  // A different task than the one we were training: drop its checkpoint.
  const std::string key = StrCat(config_.device_id, "/", task.round_id(), "/", task.task_id());
  if (state.idempotency_key != key) state.RemoveCheckpoint();
  state.task = task;
  state.phase = internal::Phase::kTraining;
  state.idempotency_key = key;
  return state.Save();
}

absl::StatusOr<std::unique_ptr<internal::SecAggParticipant>> Client::JoinSecAgg(
    std::unique_ptr<comms::Channel>& channel, const v1::Task& task, optim::Method method,
    const std::vector<float>& global) {
  if (method != optim::Method::kLoraBp && method != optim::Method::kMezo && method != optim::Method::kPepita) {
    return absl::FailedPreconditionError(
        StrCat("secure aggregation needs a dense delta; method ", task.method(), " does not produce one"));
  }
  internal::SecAggIo io;
  io.call = [this, &channel](v1::Envelope request) { return Call(channel, std::move(request)); };
  io.sleep = [this](double seconds) { return Sleep(seconds); };
  io.clock = hooks_.clock;  // null: the participant reads the host's steady clock, as NowMs does
  io.rounding_seed = hooks_.secagg_rounding_seed;
  io.call_timeout_ms = config_.call_timeout_ms;
  io.max_piece_bytes = static_cast<size_t>(config_.upload_chunk_bytes);
  Report("secagg", 0, 1);
  return internal::SecAggParticipant::Join(
      task, Sha256(std::string_view(reinterpret_cast<const char*>(global.data()), global.size() * sizeof(float))),
      std::move(io));
}

absl::StatusOr<TrainingResult> Client::TrainLocally(const TaskSpec& spec, const MemoryPlan& plan,
                                                    const LocalDataset& data, lora::LoraAdapter& adapter,
                                                    const State& state) {
  // Resume from the task's latest checkpoint, if any.
  const std::string& key = state.idempotency_key;
  const std::optional<TrainingCheckpoint> resume = state.ReadCheckpoint(key);
  TrainingControl control;
  control.checkpoint_every = config_.checkpoint_every;
  control.resume = resume.has_value() ? &*resume : nullptr;
  control.cancelled = [this] { return cancelled_.load(); };
  control.on_checkpoint = [&](const TrainingCheckpoint& cp) { return state.WriteCheckpoint(key, cp); };
  return RunAdapterTraining(
      *model_.model, adapter, data, spec.training, plan,
      [this](int64_t done, int64_t total, double) { Report("training", done, total); }, control);
}

absl::StatusOr<RunResult> Client::SubmitSecAgg(internal::SecAggParticipant& secagg, const v1::Task& task,
                                               const std::vector<float>& update, uint64_t examples, State& state) {
  // Quantize (weight = examples, capped at W), mask, send: only the masked vector leaves the device.
  SEEDLING_ASSIGN_OR_RETURN(std::vector<uint32_t> input, secagg.Encode(update, examples));
  Observe(task, std::string(reinterpret_cast<const char*>(input.data()), input.size() * sizeof(uint32_t)), input[0]);
  Report("uploading", 0, 1);
  SEEDLING_RETURN_IF_ERROR(secagg.Submit(input));
  state.phase = internal::Phase::kIdle;
  SEEDLING_RETURN_IF_ERROR(state.Save());
  state.RemoveCheckpoint();
  RunResult r;
  r.outcome = RunOutcome::kUploaded;
  r.round_id = task.round_id();
  r.update_bytes = input.size() * sizeof(uint32_t);
  return r;
}

void Client::Observe(const v1::Task& task, const std::string& payload, uint64_t weight) {
  std::function<void(const v1::Task&, const std::string&, uint64_t)> observer;
  {
    std::lock_guard<std::mutex> lock(mu_);
    observer = upload_observer_;
  }
  if (observer) observer(task, payload, weight);
}

absl::Status Client::StageUpload(const std::string& payload, uint64_t examples, const TrainingResult& trained,
                                 State& state) {
  // Durable before the upload starts: a kill from here on resumes with the upload.
  SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(state.Path("update.bin"), payload));
  state.phase = internal::Phase::kTrained;
  state.num_examples = examples;
  state.update_sha256 = Sha256(payload);
  state.metrics.set_loss_start(static_cast<float>(trained.loss_start));
  state.metrics.set_loss_end(static_cast<float>(trained.loss_end));
  state.metrics.set_steps(static_cast<uint32_t>(trained.steps));
  state.metrics.set_skipped_steps(static_cast<uint32_t>(trained.skipped_steps));
  state.metrics.set_train_seconds(static_cast<float>(trained.seconds));
  state.metrics.set_processed_tokens(static_cast<uint64_t>(trained.processed_tokens));
  state.metrics.set_scored_tokens(static_cast<uint64_t>(trained.scored_tokens));
  SEEDLING_RETURN_IF_ERROR(state.Save());
  state.RemoveCheckpoint();
  return absl::OkStatus();
}

absl::StatusOr<RunResult> Client::Upload(std::unique_ptr<comms::Channel>& channel, State& state) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string payload, ReadFile(state.Path("update.bin")));
  if (Sha256(payload) != state.update_sha256) return absl::DataLossError("the pending update file is corrupt");
  const v1::Task& task = state.task;
  // The server will not take this update (its round closed or aborted, or it refused it): drop it.
  auto discard = [&](const std::string& why) -> absl::StatusOr<RunResult> {
    state.phase = internal::Phase::kIdle;
    SEEDLING_RETURN_IF_ERROR(state.Save());
    std::filesystem::remove(state.Path("update.bin"));
    RunResult dropped;
    dropped.outcome = RunOutcome::kDropped;
    dropped.round_id = task.round_id();
    dropped.detail = why;
    return dropped;
  };
  v1::Envelope begin;
  v1::UploadBegin* b = begin.mutable_upload_begin();
  b->set_round_id(task.round_id());
  b->set_task_id(task.task_id());
  b->set_idempotency_key(state.idempotency_key);
  b->set_total_bytes(payload.size());
  b->set_codec(task.codec().codec());
  b->set_num_examples(state.num_examples);
  *b->mutable_metrics() = state.metrics;
  b->set_sha256(state.update_sha256);

  uint64_t offset = 0;
  bool accepted = false;
  uint64_t round_id = task.round_id();
  for (int attempt = 0; !accepted; ++attempt) {
    if (attempt >= config_.max_attempts) return absl::UnavailableError("the upload did not complete");
    SEEDLING_ASSIGN_OR_RETURN(v1::Envelope reply, Call(channel, begin));
    if (reply.has_reject()) {
      absl::Status st = RejectStatus(reply.reject());
      if (st.code() == absl::StatusCode::kAborted) return discard(std::string(st.message()));
      return st;
    }
    offset = reply.upload_ack().received_bytes();
    if (reply.upload_ack().accepted()) {
      accepted = true;  // an earlier attempt's commit got through
      break;
    }
    bool broken = false;
    while (offset < payload.size()) {
      Report("uploading", static_cast<int64_t>(offset), static_cast<int64_t>(payload.size()));
      // The update stays in update.bin (phase "trained"): the next run resumes where the server stands.
      if (cancelled_) return absl::CancelledError("cancelled while uploading; the next run resumes the upload");
      v1::Envelope chunk;
      chunk.mutable_upload_chunk()->set_idempotency_key(state.idempotency_key);
      chunk.mutable_upload_chunk()->set_offset(offset);
      chunk.mutable_upload_chunk()->set_data(payload.substr(offset, static_cast<size_t>(config_.upload_chunk_bytes)));
      chunk.set_protocol_version(1);
      chunk.set_request_id(++request_id_);
      // Chunks go straight to the channel: on a broken connection the outer loop reconnects and asks the
      // server (UploadBegin) how much it already holds.
      auto ack = channel != nullptr ? channel->Call(chunk, comms::Duration(config_.call_timeout_ms))
                                    : absl::StatusOr<v1::Envelope>(absl::UnavailableError("no connection"));
      if (!ack.ok()) {
        channel.reset();  // reconnect and resume from what the server holds
        broken = true;
        break;
      }
      if (ack->has_reject()) {
        absl::Status st = RejectStatus(ack->reject());
        if (st.code() == absl::StatusCode::kAborted) return discard(std::string(st.message()));
        return st;
      }
      offset = ack->upload_ack().received_bytes();
    }
    if (broken) continue;
    v1::Envelope commit;
    commit.mutable_upload_commit()->set_idempotency_key(state.idempotency_key);
    auto reply2 = Call(channel, commit);
    if (!reply2.ok()) {
      if (Transient(reply2.status())) continue;
      return reply2.status();
    }
    if (reply2->has_reject()) {
      absl::Status st = RejectStatus(reply2->reject());
      if (st.code() == absl::StatusCode::kAborted) return discard(std::string(st.message()));
      if (reply2->reject().code() == v1::INVALID_UPDATE) return discard(std::string(st.message()));
      return st;
    }
    accepted = reply2->upload_ack().accepted();
    round_id = reply2->upload_ack().round_id();
  }
  SEEDLING_RETURN_IF_ERROR(state.AppendAck(round_id, TimeOfDayMs()));
  RunResult r;
  r.outcome = RunOutcome::kUploaded;
  r.round_id = round_id;
  r.loss_start = state.metrics.loss_start();
  r.processed_tokens = state.metrics.processed_tokens();
  r.scored_tokens = state.metrics.scored_tokens();
  r.tokens_per_second =
      state.metrics.train_seconds() > 0 ? static_cast<double>(r.processed_tokens) / state.metrics.train_seconds() : 0.0;
  r.loss_end = state.metrics.loss_end();
  r.update_bytes = payload.size();
  state.phase = internal::Phase::kIdle;
  SEEDLING_RETURN_IF_ERROR(state.Save());
  std::filesystem::remove(state.Path("update.bin"));
  return r;
}

}  // namespace seedling::client
