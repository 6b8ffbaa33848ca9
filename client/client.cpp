#include "client/client.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>
#include <toml++/toml.h>

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
#include "client/local_data.h"
#include "client/local_training.h"
#include "client/memory_planner.h"
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

std::string B64(std::string_view raw) { return absl::Base64Escape(ToAbsl(raw)); }
absl::StatusOr<std::string> UnB64(const std::string& text) {
  std::string out;
  if (!absl::Base64Unescape(text, &out)) return absl::DataLossError("corrupt base64 in the client state");
  return out;
}

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

absl::Status WriteVectors(const std::string& path, const std::vector<std::pair<std::string, std::vector<float>>>& vs) {
  std::vector<model::TensorToWrite> tensors;
  for (const auto& [name, values] : vs) {
    tensors.push_back({name, model::DType::kF32, {static_cast<int64_t>(values.size())},
                       std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(values.data()), values.size() * 4)});
  }
  return model::WriteSafetensors(path, tensors);
}

absl::StatusOr<std::map<std::string, std::vector<float>>> ReadVectors(const std::string& path) {
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::SafetensorsFile> file, model::SafetensorsFile::Open(path));
  std::map<std::string, std::vector<float>> out;
  for (const auto& [name, view] : file->tensors()) {
    if (view.dtype != model::DType::kF32 || view.shape.size() != 1) {
      return absl::DataLossError(StrCat(path, ": tensor '", name, "' is not a 1-D F32 vector"));
    }
    std::vector<float> v(static_cast<size_t>(view.shape[0]));
    std::memcpy(v.data(), view.data, view.nbytes);
    out[name] = std::move(v);
  }
  return out;
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

// ---- the state directory --------------------------------------------------------------------------------

struct Client::State {
  std::string dir;
  uint64_t synced_version = 0;
  std::string phase = "idle";  // idle, training, trained
  v1::Task task;
  std::string idempotency_key;
  uint64_t num_examples = 0;
  v1::UpdateMetrics metrics;
  std::string update_sha256;  // raw

  std::string Path(const char* name) const { return JoinPath(dir, name); }

  absl::Status Load() {
    const std::string path = Path("state.json");
    if (!FileExists(path)) return absl::OkStatus();
    SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
    try {
      const Json j = Json::parse(text);
      synced_version = j.at("synced_version").get<uint64_t>();
      phase = j.at("phase").get<std::string>();
      idempotency_key = j.value("idempotency_key", "");
      num_examples = j.value("num_examples", uint64_t{0});
      SEEDLING_ASSIGN_OR_RETURN(std::string task_bytes, UnB64(j.value("task", "")));
      SEEDLING_ASSIGN_OR_RETURN(std::string metric_bytes, UnB64(j.value("metrics", "")));
      SEEDLING_ASSIGN_OR_RETURN(update_sha256, UnB64(j.value("update_sha256", "")));
      if (!task.ParseFromString(task_bytes) || !metrics.ParseFromString(metric_bytes)) {
        return absl::DataLossError(StrCat(path, ": corrupt task"));
      }
    } catch (const Json::exception&) {
      return absl::DataLossError(StrCat(path, " is corrupt"));
    }
    if (phase != "idle" && phase != "training" && phase != "trained") {
      return absl::DataLossError(StrCat(path, ": unknown phase '", phase, "'"));
    }
    return absl::OkStatus();
  }

  absl::Status Save() const {
    Json j = {{"synced_version", synced_version},  {"phase", phase},
              {"idempotency_key", idempotency_key}, {"num_examples", num_examples},
              {"task", B64(task.SerializeAsString())}, {"metrics", B64(metrics.SerializeAsString())},
              {"update_sha256", B64(update_sha256)}};
    return WriteFileAtomic(Path("state.json"), j.dump(2) + "\n");
  }

  absl::Status AppendAck(uint64_t round_id, int64_t now_ms) const {
    // Append with a full line per acknowledgement, then fsync through an atomic rewrite: a crash leaves
    // the old or the new log.
    std::string log;
    if (FileExists(Path("acks.jsonl"))) {
      SEEDLING_ASSIGN_OR_RETURN(log, ReadFile(Path("acks.jsonl")));
    }
    log += Json({{"key", idempotency_key}, {"round", round_id}, {"time_ms", now_ms},
                 {"sha256", HexOf(update_sha256)}}).dump() + "\n";
    return WriteFileAtomic(Path("acks.jsonl"), log);
  }
};

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
    return absl::InvalidArgumentError(StrCat("the example is ", json_row.size(), " bytes; max_row_bytes is ",
                                             config_.max_row_bytes));
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
  return absl::UnavailableError(StrCat("server unreachable after ", config_.max_attempts, " attempts: ", last.message()));
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
      cancelled_ ? absl::StatusOr<RunResult>(absl::CancelledError("cancelled before the run started")) : RunOnceLocked();
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
  if (state.phase == "trained") {
    absl::StatusOr<RunResult> r = Upload(channel, state);
    if (!r.ok() || r->outcome != RunOutcome::kDropped) return r;
    spdlog::info("the pending update is no longer wanted ({}); checking in", r->detail);
  }

  // 2. Check in.
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
  if (reply.check_in_reply().has_retry_after()) {
    RunResult r;
    r.outcome = RunOutcome::kRetryLater;
    r.retry_after_seconds = reply.check_in_reply().retry_after().seconds();
    r.detail = reply.check_in_reply().retry_after().reason();
    return r;
  }
  const v1::Task& task = reply.check_in_reply().task();

  // 3. Tasks the device cannot run are declined with a reason the server counts.
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
                                const model::ModelConfig& model_config, State& state) {
  Report("syncing", 0, 1);
  const std::string adapter_path = state.Path("adapter.safetensors");
  std::vector<float> params;
  bool have_local = false;
  if (FileExists(adapter_path)) {
    auto vectors = ReadVectors(adapter_path);
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
      lora::LoraConfig lc;
      lc.rank = task.lora().rank();
      lc.alpha = task.lora().alpha();
      lc.init_seed = task.lora().init_seed();
      std::string targets;
      for (const std::string& t : task.lora().targets()) targets += (targets.empty() ? "" : ",") + t;
      SEEDLING_ASSIGN_OR_RETURN(lc.targets, lora::ParseTargets(targets));
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<lora::LoraAdapter> a, lora::LoraAdapter::Create(model_config, lc));
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
      SEEDLING_RETURN_IF_ERROR(WriteVectors(adapter_path, {{"params", params}}));
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
  SEEDLING_RETURN_IF_ERROR(WriteVectors(adapter_path, {{"params", params}}));
  return state.Save();
}

absl::StatusOr<RunResult> Client::Train(std::unique_ptr<comms::Channel>& channel, const v1::Task& task,
                                        model::WeightPrecision weights, State& state) {
  const auto hp = [&](const char* key, double fallback) {
    auto it = task.hyperparameters().find(key);
    return it == task.hyperparameters().end() ? fallback : it->second;
  };
  SEEDLING_ASSIGN_OR_RETURN(const optim::Method method, optim::ParseMethod(task.method()));
  lora::LoraConfig lc;
  lc.rank = task.lora().rank();
  lc.alpha = task.lora().alpha();
  lc.init_seed = task.lora().init_seed();
  std::string targets;
  for (const std::string& t : task.lora().targets()) targets += (targets.empty() ? "" : ",") + t;
  SEEDLING_ASSIGN_OR_RETURN(lc.targets, lora::ParseTargets(targets));

  // Plan memory before loading anything big: a task that cannot fit is declined.
  SEEDLING_ASSIGN_OR_RETURN(const model::ModelConfig model_config, model::LoadModelConfig(config_.model_dir));
  // The runtime baseline is measured once, before this client loads a model (measured later it would count
  // the model twice), unless the embedder gives it (the simulator measures it once for all its devices).
  if (runtime_bytes_ < 0) {
    runtime_bytes_ = config_.runtime_bytes >= 0 ? config_.runtime_bytes
                     : model_.model != nullptr  ? 0
                                                : MeasureRuntimeBytes();
  }
  PlanRequest request;
  request.model = model_config;
  request.method = method;
  request.lora = lc;
  request.seq_len = static_cast<int64_t>(hp("seq_len", 256));
  request.batch = static_cast<int64_t>(hp("batch", 1));
  request.budget_bytes = config_.memory_budget_bytes;
  request.runtime_bytes = runtime_bytes_;
  // The data as loading will hold it, bounded by one streaming pass before anything is parsed.
  std::string data_path;
  {
    std::lock_guard<std::mutex> lock(mu_);
    data_path = data_path_;
  }
  LocalDataOptions data_options;
  data_options.seq_len = request.seq_len;
  data_options.batch_size = request.batch;
  data_options.seed = task.seed();
  data_options.max_row_bytes = config_.max_row_bytes;
  if (!model_config.eos_token_ids.empty()) data_options.eos_id = static_cast<int32_t>(model_config.eos_token_ids[0]);
  SEEDLING_ASSIGN_OR_RETURN(const DataFootprint footprint, ScanDataFootprint(data_path, data_options));
  request.data_bytes = footprint.total_bytes();
  // The weights as this task will hold them, whether or not a model is loaded yet: the budget is for the
  // whole process.
  SEEDLING_ASSIGN_OR_RETURN(request.weight_bytes, model::ResidentWeightBytes(config_.model_dir, model_config, weights));
  request.weights_decoded_per_tile = weights != model::WeightPrecision::kFloat32;
  SEEDLING_ASSIGN_OR_RETURN(request.streamed_weight_bytes,
                            model::StreamedWeightBytes(config_.model_dir, model_config, weights, request.weight_bytes));
  // The server's `perturbations` is fwdgrad's K; federated mezo / kseed probe one seed per step.
  request.perturbations = method == optim::Method::kFwdGrad ? static_cast<int64_t>(hp("perturbations", 8)) : 1;
  const std::string weights_name = model::WeightPrecisionName(weights);
  absl::StatusOr<MemoryPlan> plan = PlanMemory(request);
  if (!plan.ok()) {
    if (plan.status().code() != absl::StatusCode::kResourceExhausted) return plan.status();
    SEEDLING_ASSIGN_OR_RETURN(RunResult r, Decline(channel, task, v1::Decline::MEMORY,
                                                   StrCat(weights_name, " weights: ", plan.status().message())));
    r.weights = weights_name;
    return r;
  }
  SEEDLING_RETURN_IF_ERROR(EnsureModel(weights));
  SEEDLING_RETURN_IF_ERROR(SyncGlobal(channel, task, model_config, state));

  // A different task than the one we were training: drop its checkpoint.
  const std::string key = StrCat(config_.device_id, "/", task.round_id(), "/", task.task_id());
  if (state.idempotency_key != key) {
    std::filesystem::remove(state.Path("checkpoint.safetensors"));
    std::filesystem::remove(state.Path("checkpoint.json"));
  }
  state.task = task;
  state.phase = "training";
  state.idempotency_key = key;
  SEEDLING_RETURN_IF_ERROR(state.Save());

  SEEDLING_ASSIGN_OR_RETURN(LocalDataset data, LocalDataset::Load(data_path, *model_.tokenizer, data_options));

  SEEDLING_ASSIGN_OR_RETURN(auto global, ReadVectors(state.Path("adapter.safetensors")));
  const std::vector<float>& global_params = global.at("params");
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<lora::LoraAdapter> adapter, lora::LoraAdapter::Create(model_config, lc));
  if (adapter->numel() != static_cast<int64_t>(global_params.size())) {
    return absl::FailedPreconditionError("the task's adapter does not match the synced global adapter");
  }
  std::memcpy(adapter->flat().data_ptr<float>(), global_params.data(), global_params.size() * sizeof(float));

  // Secure aggregation: join the session (setup, keys, shares) before training, bound to the adapter this
  // device verified; the masked input follows training. The session lives in memory only: if the app is
  // killed, the device is one of the session's dropouts.
  std::unique_ptr<internal::SecAggParticipant> secagg;
  if (task.has_secagg()) {
    if (method != optim::Method::kLoraBp && method != optim::Method::kMezo) {
      return absl::FailedPreconditionError(StrCat("secure aggregation needs a dense delta; method ", task.method(),
                                                  " does not produce one"));
    }
    internal::SecAggIo io;
    io.call = [this, &channel](v1::Envelope request) { return Call(channel, std::move(request)); };
    io.sleep = [this](double seconds) { return Sleep(seconds); };
    io.clock = hooks_.clock;  // null: the participant reads the host's steady clock, as NowMs does
    io.rounding_seed = hooks_.secagg_rounding_seed;
    io.call_timeout_ms = config_.call_timeout_ms;
    io.max_piece_bytes = static_cast<size_t>(config_.upload_chunk_bytes);
    Report("secagg", 0, 1);
    SEEDLING_ASSIGN_OR_RETURN(
        secagg, internal::SecAggParticipant::Join(
                    task, Sha256(std::string_view(reinterpret_cast<const char*>(global_params.data()),
                                                  global_params.size() * sizeof(float))),
                    std::move(io)));
  }

  TrainingConfig tc;
  tc.method = method;
  tc.steps = static_cast<int64_t>(hp("steps", 20));
  tc.lr = hp("lr", 0);
  tc.epsilon = hp("epsilon", 0);
  tc.seed = task.seed();
  tc.perturbations = request.perturbations;
  tc.kseed_pool_size = task.kseed_pool_size();
  tc.kseed_pool_seed = task.kseed_pool_seed();
  tc.fwdgrad_apply_locally = hp("apply_locally", 1) != 0;

  // Resume from the task's latest checkpoint, if any.
  TrainingCheckpoint resume;
  bool resuming = false;
  if (FileExists(state.Path("checkpoint.json")) && FileExists(state.Path("checkpoint.safetensors"))) {
    auto text = ReadFile(state.Path("checkpoint.json"));
    auto vectors = ReadVectors(state.Path("checkpoint.safetensors"));
    if (text.ok() && vectors.ok()) {
      try {
        const Json j = Json::parse(*text);
        if (j.at("key").get<std::string>() == key) {
          resume.trainer.steps = j.at("steps").get<int64_t>();
          resume.trainer.skipped = j.at("skipped").get<int64_t>();
          resume.trainer.counter = j.at("counter").get<int64_t>();
          for (const Json& p : j.at("pairs")) resume.trainer.pairs.emplace_back(p[0].get<uint32_t>(), p[1].get<float>());
          for (const Json& p : j.at("seed_pairs")) {
            resume.trainer.seed_pairs.emplace_back(p[0].get<uint64_t>(), p[1].get<float>());
          }
          resume.data.epoch = j.at("epoch").get<uint64_t>();
          resume.data.offset = j.at("offset").get<uint64_t>();
          resume.data.fingerprint = j.at("fingerprint").get<uint64_t>();
          resume.loss_start = j.at("loss_start").get<double>();
          resume.scored_tokens = j.at("tokens").get<int64_t>();
          resume.processed_tokens = j.value("processed_tokens", int64_t{0});  // absent before it was counted
          resume.seconds = j.at("seconds").get<double>();
          for (auto& [name, values] : *vectors) {
            if (name == "params") {
              resume.params = std::move(values);
            } else {
              resume.trainer.buffers[name] = std::move(values);
            }
          }
          resuming = !resume.params.empty();
        }
      } catch (const Json::exception&) {
        spdlog::warn("ignoring a corrupt training checkpoint");
      }
    }
  }
  TrainingControl control;
  control.checkpoint_every = config_.checkpoint_every;
  control.resume = resuming ? &resume : nullptr;
  control.cancelled = [this] { return cancelled_.load(); };
  control.on_checkpoint = [&](const TrainingCheckpoint& cp) -> absl::Status {
    std::vector<std::pair<std::string, std::vector<float>>> vs = {{"params", cp.params}};
    for (const auto& [name, values] : cp.trainer.buffers) vs.emplace_back(name, values);
    SEEDLING_RETURN_IF_ERROR(WriteVectors(state.Path("checkpoint.safetensors"), vs));
    Json pairs = Json::array(), seed_pairs = Json::array();
    for (const auto& [i, v] : cp.trainer.pairs) pairs.push_back({i, v});
    for (const auto& [s, v] : cp.trainer.seed_pairs) seed_pairs.push_back({s, v});
    Json j = {{"key", key}, {"steps", cp.trainer.steps}, {"skipped", cp.trainer.skipped},
              {"counter", cp.trainer.counter}, {"pairs", pairs}, {"seed_pairs", seed_pairs},
              {"epoch", cp.data.epoch}, {"offset", cp.data.offset}, {"fingerprint", cp.data.fingerprint},
              {"loss_start", cp.loss_start}, {"tokens", cp.scored_tokens}, {"processed_tokens", cp.processed_tokens}, {"seconds", cp.seconds}};
    return WriteFileAtomic(state.Path("checkpoint.json"), j.dump() + "\n");
  };
  model::LlamaModel& model = const_cast<model::LlamaModel&>(*model_.model);  // adapter runs never write the base
  absl::StatusOr<TrainingResult> trained = RunLocalTraining(
      model, adapter.get(), data, tc, *plan,
      [this](int64_t done, int64_t total, double) { Report("training", done, total); }, control);
  if (!trained.ok()) {
    if (trained.status().code() == absl::StatusCode::kCancelled) {
      RunResult r;
      r.outcome = RunOutcome::kCancelled;
      r.round_id = task.round_id();
      r.detail = std::string(trained.status().message());
      return r;
    }
    return trained.status();
  }

  // Encode the update with the task's codec.
  std::string payload;
  const float* flat = adapter->flat().data_ptr<float>();
  const size_t n = global_params.size();
  if (method == optim::Method::kKSeed) {
    std::vector<comms::SeedIndexScalar> pairs;
    for (const optim::SeedScalar& p : trained->kseed_pairs) pairs.push_back({p.index, p.value});
    if (task.clip_norm() > 0) {
      // DP (server/dp_strategy.h): each scalar to |ĝ| ≤ C before upload; the server clips again (scalars,
      // then the per-seed vector's L2 norm) whatever arrives.
      std::vector<float> values;
      for (const comms::SeedIndexScalar& p : pairs) values.push_back(p.value);
      SEEDLING_RETURN_IF_ERROR(privacy::ClipScalars(values, task.clip_norm()).status());
      for (size_t k = 0; k < pairs.size(); ++k) pairs[k].value = values[k];
    }
    payload = comms::EncodeSeedIndexScalars(pairs);
  } else if (method == optim::Method::kFwdGrad && task.codec().codec() == v1::CODEC_SEED_SCALARS) {
    std::vector<comms::SeedValueScalar> pairs;
    for (const auto& [seed, value] : trained->fwdgrad_pairs) pairs.push_back({seed, value});
    payload = comms::EncodeSeedValueScalars(pairs);
  } else {
    std::vector<float> update(n);
    if (method == optim::Method::kFwdGrad) {
      update = trained->fwdgrad_sum;  // FwdLLM uploads the summed forward gradient
    } else {
      for (size_t i = 0; i < n; ++i) update[i] = flat[i] - global_params[i];  // Δ = θ_local − θ_global
    }
    if (task.clip_norm() > 0) {
      // Flat L2 clipping to C (DP-FedAvg); privacy::ClipToL2Norm guarantees ‖update‖ ≤ C after fp32 rounding.
      SEEDLING_RETURN_IF_ERROR(privacy::ClipToL2Norm(update, task.clip_norm()).status());
    }
    if (secagg != nullptr) {
      // Quantize (weight = examples, capped at W), mask, send: only the masked vector leaves the device.
      const uint64_t examples = std::max<uint64_t>(1, data.train().size());
      SEEDLING_ASSIGN_OR_RETURN(std::vector<uint32_t> input, secagg->Encode(update, examples));
      {
        std::function<void(const v1::Task&, const std::string&, uint64_t)> observer;
        {
          std::lock_guard<std::mutex> lock(mu_);
          observer = upload_observer_;
        }
        if (observer) {
          observer(task, std::string(reinterpret_cast<const char*>(input.data()), input.size() * sizeof(uint32_t)),
                   input[0]);
        }
      }
      Report("uploading", 0, 1);
      SEEDLING_RETURN_IF_ERROR(secagg->Submit(input));
      state.phase = "idle";
      SEEDLING_RETURN_IF_ERROR(state.Save());
      std::filesystem::remove(state.Path("checkpoint.safetensors"));
      std::filesystem::remove(state.Path("checkpoint.json"));
      RunResult r;
      r.outcome = RunOutcome::kUploaded;
      r.round_id = task.round_id();
      r.loss_start = trained->loss_start;
      r.loss_end = trained->loss_end;
      r.update_bytes = input.size() * sizeof(uint32_t);
      r.weights = weights_name;
      r.processed_tokens = static_cast<uint64_t>(trained->processed_tokens);
      r.scored_tokens = static_cast<uint64_t>(trained->scored_tokens);
      r.tokens_per_second = trained->seconds > 0 ? static_cast<double>(trained->processed_tokens) / trained->seconds : 0.0;
      return r;
    }
    comms::CodecOptions co;
    co.codec = task.codec().codec();
    co.block_size = task.codec().block_size() > 0 ? task.codec().block_size() : 64;
    co.topk_fraction = task.codec().topk_fraction() > 0 ? task.codec().topk_fraction() : 0.01f;
    comms::ErrorFeedback feedback(n);
    const std::string feedback_path = state.Path("feedback.bin");
    if (co.codec == v1::CODEC_TOPK && FileExists(feedback_path)) {
      auto bytes = ReadFile(feedback_path);
      if (bytes.ok()) {
        auto loaded = comms::ErrorFeedback::Deserialize(*bytes);
        if (loaded.ok() && loaded->residual().size() == n) feedback = std::move(loaded).value();
      }
    }
    SEEDLING_ASSIGN_OR_RETURN(payload, comms::EncodeDense(update, co, task.seed(), &feedback));
    if (co.codec == v1::CODEC_TOPK) SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(feedback_path, feedback.Serialize()));
  }
  if (payload.size() > task.max_update_bytes()) {
    return absl::ResourceExhaustedError(StrCat("the encoded update (", payload.size(), " bytes) exceeds the task's cap"));
  }
  {
    std::function<void(const v1::Task&, const std::string&, uint64_t)> observer;
    {
      std::lock_guard<std::mutex> lock(mu_);
      observer = upload_observer_;
    }
    if (observer) observer(task, payload, static_cast<uint64_t>(data.train().size()));
  }
  // Durable before the upload starts: a kill from here on resumes with the upload.
  SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(state.Path("update.bin"), payload));
  state.phase = "trained";
  state.num_examples = std::max<uint64_t>(1, data.train().size());
  state.update_sha256 = Sha256(payload);
  state.metrics.set_loss_start(static_cast<float>(trained->loss_start));
  state.metrics.set_loss_end(static_cast<float>(trained->loss_end));
  state.metrics.set_steps(static_cast<uint32_t>(trained->steps));
  state.metrics.set_skipped_steps(static_cast<uint32_t>(trained->skipped_steps));
  state.metrics.set_train_seconds(static_cast<float>(trained->seconds));
  state.metrics.set_processed_tokens(static_cast<uint64_t>(trained->processed_tokens));
  state.metrics.set_scored_tokens(static_cast<uint64_t>(trained->scored_tokens));
  SEEDLING_RETURN_IF_ERROR(state.Save());
  std::filesystem::remove(state.Path("checkpoint.safetensors"));
  std::filesystem::remove(state.Path("checkpoint.json"));
  absl::StatusOr<RunResult> uploaded = Upload(channel, state);
  if (uploaded.ok()) uploaded->weights = weights_name;
  return uploaded;
}

absl::StatusOr<RunResult> Client::Upload(std::unique_ptr<comms::Channel>& channel, State& state) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string payload, ReadFile(state.Path("update.bin")));
  if (Sha256(payload) != state.update_sha256) return absl::DataLossError("the pending update file is corrupt");
  const v1::Task& task = state.task;
  // The server will not take this update (its round closed or aborted, or it refused it): drop it.
  auto discard = [&](const std::string& why) -> absl::StatusOr<RunResult> {
    state.phase = "idle";
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
  SEEDLING_RETURN_IF_ERROR(state.AppendAck(round_id, std::chrono::duration_cast<std::chrono::milliseconds>(
                                                         std::chrono::system_clock::now().time_since_epoch())
                                                         .count()));
  RunResult r;
  r.outcome = RunOutcome::kUploaded;
  r.round_id = round_id;
  r.loss_start = state.metrics.loss_start();
  r.processed_tokens = state.metrics.processed_tokens();
  r.scored_tokens = state.metrics.scored_tokens();
  r.tokens_per_second = state.metrics.train_seconds() > 0
                            ? static_cast<double>(r.processed_tokens) / state.metrics.train_seconds()
                            : 0.0;
  r.loss_end = state.metrics.loss_end();
  r.update_bytes = payload.size();
  state.phase = "idle";
  SEEDLING_RETURN_IF_ERROR(state.Save());
  std::filesystem::remove(state.Path("update.bin"));
  return r;
}

}  // namespace seedling::client
