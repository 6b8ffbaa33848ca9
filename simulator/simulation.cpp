#include "simulator/simulation.h"

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <mutex>
#include <queue>
#include <set>
#include <thread>
#include <tuple>

#include <spdlog/spdlog.h>

#include "base/bytes.h"
#include "base/file.h"
#include "base/memory.h"
#include "base/philox.h"
#include "base/progress.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "client/client.h"
#include "client/compute_model.h"
#include "client/local_training.h"
#include "comms/in_memory.h"
#include "comms/tls.h"
#include "lora/adapter.h"
#include "model/dataset.h"
#include "model/eval.h"
#include "model/llama.h"
#include "model/runtime.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "server/coordinator.h"
#include "nlohmann/json.hpp"

namespace seedling::simulator {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Philox stream of the devices' first check-in offsets (ASCII "firstwak").
constexpr uint64_t kFirstWakeStream = 0x6669727374776b61ULL;

// How long a rank waits for the next message of a device on another rank (its training, or the gate).
constexpr std::chrono::milliseconds kRankTimeout{3'600'000};

int64_t ToMs(double seconds) { return static_cast<int64_t>(std::llround(seconds * 1000.0)); }

std::string DeviceId(int64_t device) {
  std::string digits = std::to_string(device);
  if (digits.size() < 5) digits.insert(0, 5 - digits.size(), '0');
  return "phone-" + digits;
}

std::string DefaultCodec(const std::string& method) {
  if (method == "kseed") return "seed-scalars";
  if (method == "fwdgrad") return "fp16";
  return "int8";
}

std::string DefaultStrategy(const std::string& method) {
  if (method == "kseed") return "kseed";
  if (method == "fwdgrad") return "fwdgrad";
  return "fedavg";
}

// The trainings one process runs at once (--threads). A device takes a slot when a reply starts its
// training (the last download's, or SHARE_KEYS' in a SecAgg round) and gives it back with its next request: only training is counted,
// because the protocol steps between are short and the event loop runs them one at a time anyway. A
// device never waits at the gate while holding a slot, so slots cannot deadlock with the loop.
class ComputeSlots {
 public:
  explicit ComputeSlots(int n) : free_(n) {}
  void Acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return free_ > 0; });
    --free_;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++free_;
    }
    cv_.notify_one();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int free_;
};

struct WorkDir {
  std::string path;
  bool remove = false;  // made for this run: removed at the end
  bool shared = false;  // every rank sees it
};

// Everything the methods share: the population, the data on disk, the model and the evaluation set.
struct World {
  const SimulationOptions* options = nullptr;
  std::string work_dir;
  bool remove_work_dir = false;
  std::unique_ptr<Population> population;
  std::vector<std::string> data_paths;  // per device
  std::string partition_summary;
  client::SharedModel shared;   // loaded with options->server.weights
  std::string weight_cache_dir;  // of the shared model's weight cache, and of any device that needs another
  int64_t weight_bytes = 0;      // resident bytes of the shared model's weights (what each device plans for)
  int64_t device_runtime_bytes = 0;  // each device's planned runtime baseline (SimulationOptions)
  model::ModelConfig model_config;
  std::vector<model::Example> eval_examples;
  std::vector<model::ChoiceItem> choice_items;  // labelled held-out rows (accuracy); empty: no labels
  double end_time_s = 0;
  MpiRanks* ranks = nullptr;  // nullptr: one process
  // Every rank sees work_dir (one machine, or a shared file system): a device's state can be used from
  // any rank, so each activation runs on the least busy rank. Otherwise device d lives on rank d % R.
  bool shared_work_dir = false;

  int rank() const { return ranks == nullptr ? 0 : ranks->rank(); }
  // Static placement (no shared work_dir): the rank that keeps device d's state.
  int Owner(int64_t device) const { return ranks == nullptr ? 0 : static_cast<int>(device % ranks->size()); }
};

// The client settings of simulated device `d` for the method whose state lives in `method_dir`.
client::ClientConfig DeviceClientConfig(const World& world, const std::string& method_dir, int64_t d,
                                        const std::string& token) {
  client::ClientConfig cc;
  cc.device_id = DeviceId(d);
  cc.token = token;
  cc.state_dir = JoinPath(JoinPath(method_dir, "devices"), DeviceId(d));
  cc.model_dir = world.options->model_dir;
  cc.weight_cache_dir = world.weight_cache_dir;
  cc.data_path = world.data_paths[static_cast<size_t>(d)];
  cc.memory_budget_bytes = world.population->memory_budget_bytes(d);
  cc.runtime_bytes = world.device_runtime_bytes;
  cc.max_attempts = 1;  // a failed request ends the activation; the simulator reschedules the device
  cc.checkpoint_every = 0;
  cc.seed = world.options->seed ^ static_cast<uint64_t>(d);
  return cc;
}

// Messages between rank 0 and the rank of a forwarded device (simulator/mpi.h). The first byte is the
// kind; statuses and small records are JSON, envelopes their protobuf bytes.
enum MsgKind : char {
  kStart = 'S',         // rank 0 → owner (control mailbox): run device {method, device, token, conditions}
  kQuit = 'Q',          // rank 0 → all (control mailbox): the simulation is over
  kWorkDir = 'W',       // rank 0 → all (control mailbox): {work_dir, token} of its work directory
  kSeesWorkDir = 'w',   // rank r → rank 0 (control mailbox): {rank, sees}: whether it found the token
  kConnect = 'c',       // owner → rank 0: open a connection; payload: timeout ms
  kConnected = 'C',     // rank 0 → owner: status
  kCall = 'q',          // owner → rank 0: 8-byte timeout ms, 8-byte seconds the device slept since its
                        // last call (a double), then the request envelope
  kReply = 'R',         // rank 0 → owner: 'T' (take a compute slot: training starts) or '-', the
                        // device's clock after the reply (8-byte double), then '1' + reply envelope, or
                        // '0' + status
  kClose = 'x',         // owner → rank 0: close the connection
  kDone = 'd',          // owner → rank 0: the RunOnce result
};

nlohmann::json StatusJson(const absl::Status& st) {
  return {{"code", static_cast<int>(st.code())}, {"message", std::string(st.message())}};
}

absl::Status StatusFromJson(const nlohmann::json& j) {
  if (!j.is_object() || !j.contains("code") || !j["code"].is_number_integer()) {
    return absl::InternalError("malformed status from another rank");
  }
  return absl::Status(static_cast<absl::StatusCode>(j["code"].get<int>()),
                      ToAbsl(j.value("message", std::string())));
}

std::string EncodeResult(const absl::StatusOr<client::RunResult>& r) {
  nlohmann::json j;
  if (!r.ok()) {
    j["status"] = StatusJson(r.status());
  } else {
    j = {{"outcome", static_cast<int>(r->outcome)}, {"retry_after", r->retry_after_seconds},
         {"round_id", r->round_id},                 {"detail", r->detail},
         {"loss_start", r->loss_start},             {"loss_end", r->loss_end},
         {"update_bytes", r->update_bytes},         {"weights", r->weights}};
  }
  return std::string(1, kDone) + j.dump();
}

absl::StatusOr<client::RunResult> DecodeResult(std::string_view body) {
  const nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InternalError("malformed run result from another rank");
  if (j.contains("status")) return StatusFromJson(j["status"]);
  client::RunResult r;
  r.outcome = static_cast<client::RunOutcome>(j.value("outcome", 0));
  r.retry_after_seconds = j.value("retry_after", 0u);
  r.round_id = j.value("round_id", uint64_t{0});
  r.detail = j.value("detail", std::string());
  r.loss_start = j.value("loss_start", 0.0);
  r.loss_end = j.value("loss_end", 0.0);
  r.update_bytes = j.value("update_bytes", uint64_t{0});
  r.weights = j.value("weights", std::string());
  return r;
}

void PutDouble(std::string& out, double v) { AppendU64Le(out, std::bit_cast<uint64_t>(v)); }
double GetDouble(std::string_view in) { return std::bit_cast<double>(LoadU64Le(in)); }

// A device on a rank other than 0: where its requests go, the compute slot it may hold there, and its
// clock (client::SimulationHooks): its time after the last reply, plus what it slept since, which the
// next call carries to rank 0.
struct ForwardedDevice {
  MpiRanks* ranks = nullptr;
  int64_t device = 0;
  ComputeSlots* slots = nullptr;  // the rank's
  // The device thread only.
  bool holds_slot = false;
  double vt = 0;
  double slept = 0;

  void ReleaseSlot() {
    if (std::exchange(holds_slot, false)) slots->Release();
  }
};

// A device's connection to rank 0's coordinator, from another rank: each call is forwarded and answered
// there at the gate (MethodRun::RemoteDeviceMain).
class ForwardedChannel : public comms::Channel {
 public:
  explicit ForwardedChannel(std::shared_ptr<ForwardedDevice> dev) : dev_(std::move(dev)) {}
  ~ForwardedChannel() override { Close(); }

  absl::StatusOr<v1::Envelope> Call(const v1::Envelope& request, comms::Duration timeout) override {
    if (closed_) return absl::FailedPreconditionError("the connection is closed");
    dev_->ReleaseSlot();  // a request after training: the training is over
    std::string msg(1, kCall);
    AppendU64Le(msg, static_cast<uint64_t>(timeout.count()));
    PutDouble(msg, std::exchange(dev_->slept, 0.0));
    request.AppendToString(&msg);
    const uint64_t key = static_cast<uint64_t>(dev_->device);
    dev_->ranks->Send(0, key, std::move(msg));
    SEEDLING_ASSIGN_OR_RETURN(MpiRanks::Message m, dev_->ranks->Receive(key, kRankTimeout));
    const std::string& p = m.payload;
    if (p.size() < 11 || p[0] != kReply) return absl::InternalError("unexpected message from rank 0");
    if (p[1] == 'T') {
      dev_->slots->Acquire();  // the reply starts this device's training
      dev_->holds_slot = true;
    }
    dev_->vt = GetDouble(std::string_view(p).substr(2));
    if (p[10] == '1') {
      v1::Envelope reply;
      if (!reply.ParseFromArray(p.data() + 11, static_cast<int>(p.size() - 11))) {
        return absl::InternalError("malformed reply envelope from rank 0");
      }
      return reply;
    }
    return StatusFromJson(nlohmann::json::parse(p.substr(11), nullptr, false));
  }

  void Close() override {
    if (closed_) return;
    closed_ = true;
    dev_->ranks->Send(0, static_cast<uint64_t>(dev_->device), std::string(1, kClose));
  }

 private:
  const std::shared_ptr<ForwardedDevice> dev_;
  bool closed_ = false;
};

class ForwardedTransport : public comms::Transport {
 public:
  explicit ForwardedTransport(std::shared_ptr<ForwardedDevice> dev) : dev_(std::move(dev)) {}
  absl::StatusOr<std::unique_ptr<comms::Channel>> Connect(comms::Duration timeout) override {
    std::string msg(1, kConnect);
    AppendU64Le(msg, static_cast<uint64_t>(timeout.count()));
    const uint64_t key = static_cast<uint64_t>(dev_->device);
    dev_->ranks->Send(0, key, std::move(msg));
    SEEDLING_ASSIGN_OR_RETURN(MpiRanks::Message m, dev_->ranks->Receive(key, kRankTimeout));
    if (m.payload.empty() || m.payload[0] != kConnected) return absl::InternalError("unexpected message from rank 0");
    SEEDLING_RETURN_IF_ERROR(StatusFromJson(nlohmann::json::parse(m.payload.substr(1), nullptr, false)));
    return std::unique_ptr<comms::Channel>(new ForwardedChannel(dev_));
  }

 private:
  const std::shared_ptr<ForwardedDevice> dev_;
};

// One active device: its own clock and where it stands in the protocol. Guarded by MethodRun::mu_.
struct Activation {
  enum class State { kRunning, kWaiting, kGranted, kDone };
  int64_t device = 0;
  int rank = 0;      // where its client runs
  double vt = 0;     // the device's clock (Unix seconds)
  double bound = 0;  // no request of this device can arrive before this time
  State state = State::kRunning;
  double wait_t = 0;  // kWaiting / kGranted: arrival time of the request at the gate
  uint64_t seq = 0;
  // The task of this activation, if the server assigned one.
  bool has_task = false;
  bool secagg = false;   // the task is a secure-aggregation round's: training starts after SHARE_KEYS
  bool counted = false;  // in MethodRun::trainers_by_rank_
  uint64_t round_id = 0;
  uint64_t global_version = 0;
  double compute_s = 0;
  bool compute_accounted = false;
  bool compute_energy_pending = false;  // compute time passed before this request (no download)
  bool drops = false;
  double drop_t = kInf;
  bool dropped = false;
  bool training_starts = false;  // set by AfterReply: the reply just answered starts the training
  bool holds_slot = false;       // a local device holding one of compute_slots_
  client::Client* client = nullptr;  // while RunOnce runs (for Cancel)
  std::thread thread;
  absl::StatusOr<client::RunResult> result = absl::UnknownError("still running");
};

// What the simulator observes of a round beyond the coordinator's own record. Updated only in event order
// (when a request is granted and answered), so a round's figures do not depend on host timing.
struct RoundStats {
  bool opened = false;
  int64_t available = 0;
  int64_t declined = 0;
  int64_t declined_memory = 0;       // of which for want of memory (Decline MEMORY)
  int64_t declined_unsupported = 0;  // ... and because the device cannot run the task (UNSUPPORTED)
  double energy_j = 0;
  double accepted_compute_s = 0;    // simulated training time of the devices whose update was accepted
  std::map<int64_t, double> drops;  // device → when it drops out; erased when its update is accepted
};

class MethodRun {
 public:
  MethodRun(const World& world, std::string method, RoundLog* log)
      : world_(world), options_(*world.options), method_(std::move(method)), log_(log) {}

  absl::StatusOr<MethodResult> Run();

  // Called on the device's thread by SimChannel (local device: `training_starts` null, the call takes a
  // compute slot itself when the reply starts the training, and gives it back with the next call) or by
  // RemoteDeviceMain (device on another rank: *training_starts tells that rank to take one of its own).
  absl::StatusOr<v1::Envelope> DeviceCall(int64_t device, comms::Channel& inner, const v1::Envelope& request,
                                          comms::Duration timeout, bool* training_starts = nullptr);
  bool DeviceDropped(int64_t device);
  // The device's clock (client::SimulationHooks): a wait of `seconds` moves it (and the earliest time of
  // its next request) on, costing no host time.
  void DeviceSleep(int64_t device, double seconds);
  int64_t DeviceNowMs(int64_t device);

 private:
  absl::Status Setup();
  void Loop();
  void DeviceMain(Activation* a, client::Conditions conditions);
  void RemoteDeviceMain(Activation* a, client::Conditions conditions);
  int PlaceActivation(int64_t device, bool may_get_task);  // with mu_ held
  void Finish(Activation* a, absl::StatusOr<client::RunResult> result);
  void Reap(Activation& a);
  void CheckRounds();
  absl::StatusOr<double> EvalLoss(const std::vector<float>& params);
  void AfterReply(Activation& a, const v1::Envelope& request, const absl::StatusOr<v1::Envelope>& reply,
                  double arrive);

  // Constant after Setup().
  const World& world_;
  const SimulationOptions& options_;
  const std::string method_;
  RoundLog* const log_;
  server::ServerConfig config_;
  std::string dir_;
  ManualClock clock_;
  std::unique_ptr<server::Coordinator> coordinator_;
  std::unique_ptr<comms::TlsServer> tls_server_;  // loopback mode; stopped before the coordinator goes
  std::unique_ptr<comms::Transport> inner_;
  std::vector<std::string> tokens_;
  std::unique_ptr<lora::LoraAdapter> eval_adapter_;
  int threads_ = 1;
  int64_t steps_ = 0, batch_ = 0, seq_len_ = 0, perturbations_ = 0;
  double flops_ = 0;  // one local run

  std::mutex mu_;
  std::condition_variable loop_cv_;    // the loop waits for devices to reach a gate or finish
  std::condition_variable device_cv_;  // devices wait for their request to be granted
  // Guarded by mu_.
  std::map<int64_t, std::unique_ptr<Activation>> active_;
  std::vector<uint32_t> tasks_;  // tasks each device has received (the dropout stream's counter)
  std::priority_queue<std::pair<double, int64_t>, std::vector<std::pair<double, int64_t>>, std::greater<>> wakes_;
  std::vector<int> trainers_by_rank_;  // activations per rank that hold a task or were placed to get one
  std::unique_ptr<ComputeSlots> compute_slots_;  // this rank's trainings (threads_)
  uint64_t seq_ = 0;
  bool stopping_ = false;
  bool check_rounds_ = false;
  std::map<uint64_t, RoundStats> stats_;
  int64_t client_errors_ = 0;

  // Loop thread only.
  double next_tick_ = 0;
  uint64_t last_recorded_ = 0;
  std::vector<RoundRecord> records_;
  std::chrono::steady_clock::time_point wall_start_, last_round_wall_;
};

// A device's connection: every request goes through the method run's gate.
class SimChannel : public comms::Channel {
 public:
  SimChannel(MethodRun* run, int64_t device, std::unique_ptr<comms::Channel> inner)
      : run_(run), device_(device), inner_(std::move(inner)) {}
  absl::StatusOr<v1::Envelope> Call(const v1::Envelope& request, comms::Duration timeout) override {
    return run_->DeviceCall(device_, *inner_, request, timeout);
  }
  void Close() override { inner_->Close(); }

 private:
  MethodRun* const run_;
  const int64_t device_;
  std::unique_ptr<comms::Channel> inner_;
};

class SimTransport : public comms::Transport {
 public:
  SimTransport(MethodRun* run, int64_t device, comms::Transport* inner) : run_(run), device_(device), inner_(inner) {}
  absl::StatusOr<std::unique_ptr<comms::Channel>> Connect(comms::Duration timeout) override {
    if (run_->DeviceDropped(device_)) return absl::UnavailableError("the device dropped out (simulated)");
    SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<comms::Channel> channel, inner_->Connect(timeout));
    return std::unique_ptr<comms::Channel>(new SimChannel(run_, device_, std::move(channel)));
  }

 private:
  MethodRun* const run_;
  const int64_t device_;
  comms::Transport* const inner_;
};

absl::Status MethodRun::Setup() {
  config_ = options_.server;
  dir_ = JoinPath(world_.work_dir, method_);
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
  std::filesystem::create_directories(JoinPath(dir_, "devices"), ec);
  if (ec) return absl::InternalError(StrCat("cannot create ", dir_, ": ", ec.message()));
  config_.state_dir = JoinPath(dir_, "server");
  config_.model_dir = options_.model_dir;
  config_.http_port = 0;
  config_.method = method_;
  config_.seed = options_.seed;
  config_.strategy.name = DefaultStrategy(method_);
  const auto it = options_.method_settings.find(method_);
  const MethodSettings settings = it == options_.method_settings.end() ? MethodSettings{} : it->second;
  SEEDLING_ASSIGN_OR_RETURN(config_.codec.codec,
                            comms::ParseCodecName(settings.codec.empty() ? DefaultCodec(method_) : settings.codec));
  if (settings.lr > 0) {
    config_.lr = settings.lr;
    if (method_ == "kseed") config_.strategy.kseed_lr = settings.lr;
  }
  if (settings.epsilon > 0) config_.epsilon = settings.epsilon;
  if (method_ == "fwdgrad") config_.strategy.total_rounds = config_.rounds;
  SEEDLING_RETURN_IF_ERROR(config_.Validate());

  clock_.Set(ToMs(options_.start_time_s));
  SEEDLING_ASSIGN_OR_RETURN(coordinator_, server::Coordinator::Create(config_, &clock_, nullptr));
  if (options_.loopback) {
    // The same coordinator behind a real TLS 1.3 server on 127.0.0.1, with certificates made for this run.
    comms::CertificateOptions certs;
    certs.dir = JoinPath(dir_, "certs");
    SEEDLING_RETURN_IF_ERROR(comms::CreateCertificates(certs));
    comms::TlsServerOptions so;
    so.cert_file = JoinPath(certs.dir, "server.crt");
    so.key_file = JoinPath(certs.dir, "server.key");
    // A connection waits at the gate while other devices train (host time): do not close it as idle.
    so.idle_timeout = comms::Duration(kRankTimeout);
    SEEDLING_ASSIGN_OR_RETURN(tls_server_, comms::TlsServer::Start(so, coordinator_->handler_factory()));
    comms::TlsClientOptions tc;
    tc.port = tls_server_->port();
    tc.ca_file = JoinPath(certs.dir, "ca.crt");
    SEEDLING_ASSIGN_OR_RETURN(inner_, comms::MakeTlsTransport(tc));
  } else {
    inner_ = comms::MakeInMemoryTransport(coordinator_->handler_factory());
  }
  const int64_t n = world_.population->size();
  tokens_.resize(static_cast<size_t>(n));
  for (int64_t d = 0; d < n; ++d) {
    SEEDLING_ASSIGN_OR_RETURN(tokens_[static_cast<size_t>(d)], coordinator_->RegisterDevice(DeviceId(d)));
  }
  tasks_.assign(static_cast<size_t>(n), 0);

  lora::LoraConfig lc;
  lc.rank = config_.lora_rank;
  lc.alpha = config_.lora_alpha;
  lc.init_seed = config_.lora_init_seed;
  std::string targets;
  for (const std::string& t : config_.lora_targets) targets += (targets.empty() ? "" : ",") + t;
  SEEDLING_ASSIGN_OR_RETURN(lc.targets, lora::ParseTargets(targets));
  SEEDLING_ASSIGN_OR_RETURN(eval_adapter_, lora::LoraAdapter::Create(world_.model_config, lc));

  threads_ = options_.threads > 0 ? options_.threads : std::max(1u, std::thread::hardware_concurrency());
  compute_slots_ = std::make_unique<ComputeSlots>(threads_);
  const size_t ranks = world_.ranks == nullptr ? 1 : static_cast<size_t>(world_.ranks->size());
  trainers_by_rank_.assign(ranks, 0);
  steps_ = config_.steps;
  batch_ = config_.batch;
  seq_len_ = config_.seq_len;
  perturbations_ = method_ == "fwdgrad" ? config_.perturbations : 1;  // mezo / kseed: one z per step
  flops_ = client::LocalTrainingFlops(world_.model_config, method_, steps_, batch_, seq_len_, perturbations_);

  // First check-ins: when each device is first available, spread over one retry period.
  const double spread = static_cast<double>(std::max<int64_t>(config_.retry_base_s, 1));
  for (int64_t d = 0; d < n; ++d) {
    Rng rng(options_.seed, kFirstWakeStream + static_cast<uint64_t>(d));
    const double t = world_.population->NextAvailable(d, options_.start_time_s + rng.Uniform() * spread);
    if (t < world_.end_time_s) wakes_.push({t, d});
  }
  next_tick_ = options_.start_time_s;
  return absl::OkStatus();
}

bool MethodRun::DeviceDropped(int64_t device) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = active_.find(device);
  return it != active_.end() && it->second->dropped;
}

void MethodRun::DeviceSleep(int64_t device, double seconds) {
  if (!(seconds > 0)) return;
  std::lock_guard<std::mutex> lock(mu_);
  Activation& a = *active_.at(device);
  a.vt = std::max(a.vt, a.bound) + seconds;
  a.bound = a.vt;
  loop_cv_.notify_one();
}

int64_t MethodRun::DeviceNowMs(int64_t device) {
  std::lock_guard<std::mutex> lock(mu_);
  return ToMs(active_.at(device)->vt);
}

absl::StatusOr<v1::Envelope> MethodRun::DeviceCall(int64_t device, comms::Channel& inner, const v1::Envelope& request,
                                                   comms::Duration timeout, bool* training_starts) {
  const Population& pop = *world_.population;
  double arrive = 0;
  bool release = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Activation& a = *active_.at(device);
    release = std::exchange(a.holds_slot, false);  // its training is over: it is calling again
  }
  if (release) compute_slots_->Release();
  {
    std::unique_lock<std::mutex> lock(mu_);
    Activation& a = *active_.at(device);
    if (a.dropped) return absl::UnavailableError("the device dropped out (simulated)");
    double send = std::max(a.vt, a.bound);
    if (request.has_upload_begin() && a.has_task && !a.compute_accounted) {
      // No download before training (already synced): the compute time passes here.
      send += a.compute_s;
      a.compute_accounted = true;
      a.compute_energy_pending = true;
    }
    const uint64_t bytes = request.ByteSizeLong();
    const double rtt = pop.UploadSeconds(device, 0);
    arrive = send + rtt / 2 + (pop.UploadSeconds(device, bytes) - rtt);
    if (a.drops && arrive >= a.drop_t) {
      // Gone from here on. The bound stays (the loop may already be past drop_t), so the device's next
      // check-in, scheduled from max(vt, bound), is never in the loop's past.
      a.dropped = true;
      a.vt = std::max(a.vt, a.drop_t);
      return absl::UnavailableError("the device dropped out (simulated)");
    }
    a.state = Activation::State::kWaiting;
    a.wait_t = arrive;
    a.seq = ++seq_;
    loop_cv_.notify_one();
    device_cv_.wait(lock, [&] { return a.state == Activation::State::kGranted || stopping_; });
    if (a.state != Activation::State::kGranted) {
      a.state = Activation::State::kRunning;
      return absl::UnavailableError("the simulation is over");
    }
  }
  // Granted: the coordinator handles the request at the device's arrival time, alone.
  absl::StatusOr<v1::Envelope> reply = inner.Call(request, timeout);
  bool acquire = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Activation& a = *active_.at(device);
    AfterReply(a, request, reply, arrive);
    a.state = Activation::State::kRunning;
    const bool starts = std::exchange(a.training_starts, false);
    if (training_starts != nullptr) {
      *training_starts = starts;
    } else if (starts) {
      a.holds_slot = acquire = true;
    }
    loop_cv_.notify_one();
  }
  // Outside mu_: the loop goes on while this device waits for a slot (its next request is not before
  // its bound, whenever its training runs).
  if (acquire) compute_slots_->Acquire();
  return reply;
}

void MethodRun::AfterReply(Activation& a, const v1::Envelope& request, const absl::StatusOr<v1::Envelope>& reply,
                           double arrive) {
  const Population& pop = *world_.population;
  const int64_t device = a.device;
  const uint64_t bytes = reply.ok() ? reply->ByteSizeLong() : 0;
  const double rtt = pop.DownloadSeconds(device, 0);
  const double down_s = pop.DownloadSeconds(device, bytes) - rtt;
  a.vt = arrive + rtt / 2 + down_s;
  a.bound = a.vt;
  if (a.has_task) {
    const double up_s = pop.UploadSeconds(device, request.ByteSizeLong()) - pop.UploadSeconds(device, 0);
    RoundStats& s = stats_[a.round_id];
    s.energy_j += (up_s + down_s) * options_.radio_watts;
    if (a.compute_energy_pending) s.energy_j += pop.TrainingJoules(device, a.compute_s);
    a.compute_energy_pending = false;
  }
  if (!reply.ok()) return;
  if (request.has_upload_commit()) check_rounds_ = true;
  if (reply->has_upload_ack() && reply->upload_ack().accepted()) {
    RoundStats& s = stats_[reply->upload_ack().round_id()];
    s.drops.erase(device);
    s.accepted_compute_s += a.compute_s;
  }
  const bool secagg_answer = request.has_secagg() && reply->has_secagg_reply() && !request.secagg().message().empty();
  if (secagg_answer && request.secagg().stage() == v1::SECAGG_MASKED_INPUT) {
    stats_[request.secagg().round_id()].drops.erase(device);  // its input is in the session's sum
  }
  // Synced (and, in a SecAgg round, keys shared): the device trains now, so its next request cannot come
  // before the compute time is over.
  auto start_training = [&] {
    a.compute_accounted = true;
    a.bound = a.vt + a.compute_s;
    a.training_starts = true;
    stats_[a.round_id].energy_j += pop.TrainingJoules(device, a.compute_s);
  };
  if (reply->has_check_in_reply() && reply->check_in_reply().has_task()) {
    const v1::Task& task = reply->check_in_reply().task();
    if (!std::exchange(a.counted, true)) ++trainers_by_rank_[static_cast<size_t>(a.rank)];
    a.has_task = true;
    a.secagg = task.has_secagg();
    a.round_id = task.round_id();
    a.global_version = task.global_version();
    a.compute_s = pop.ComputeSeconds(device, flops_);
    a.compute_accounted = false;
    const uint32_t k = tasks_[static_cast<size_t>(device)]++;
    a.drops = pop.DropsOut(device, k);
    if (a.drops) {
      // Where in the task it happens: a fraction of its expected duration (sync, compute, upload).
      const double adapter_bytes = static_cast<double>(task.num_parameters()) * 4;
      const double expected = options_.plan_seconds + pop.DownloadSeconds(device, static_cast<uint64_t>(adapter_bytes)) +
                              a.compute_s + pop.UploadSeconds(device, static_cast<uint64_t>(adapter_bytes / 4));
      a.drop_t = a.vt + pop.DropoutPoint(device, k) * expected;
      stats_[a.round_id].drops[device] = a.drop_t;
    }
    a.bound = a.vt + options_.plan_seconds;
    return;
  }
  if (request.has_decline() && a.has_task) {
    RoundStats& s = stats_[a.round_id];
    ++s.declined;
    if (request.decline().reason() == v1::Decline::MEMORY) ++s.declined_memory;
    if (request.decline().reason() == v1::Decline::UNSUPPORTED) ++s.declined_unsupported;
    return;
  }
  if (a.secagg && a.has_task && !a.compute_accounted && reply->has_secagg_reply() &&
      reply->secagg_reply().stage() == v1::SECAGG_SHARE_KEYS &&
      reply->secagg_reply().outcome_case() == v1::SecAggReply::kMessage) {
    start_training();  // the key shares are relayed: the device trains, then masks its input
    return;
  }
  if (reply->has_download_reply() && a.has_task && !a.secagg && !a.compute_accounted) {
    const v1::DownloadReply& d = reply->download_reply();
    bool last = false;
    if (request.download().what() == v1::Download::SEED_SUMS) {
      uint64_t newest = 0;
      for (const v1::RoundSeedSums& r : d.rounds()) newest = std::max<uint64_t>(newest, r.version());
      last = d.rounds_size() == 0 || newest >= a.global_version;
    } else {
      last = d.offset() + d.data().size() >= d.total_bytes();
    }
    if (last) start_training();
  }
}

void MethodRun::DeviceMain(Activation* a, client::Conditions conditions) {
  const int64_t d = a->device;
  const client::ClientConfig cc = DeviceClientConfig(world_, dir_, d, tokens_[static_cast<size_t>(d)]);
  absl::StatusOr<client::RunResult> result = absl::UnknownError("not run");
  {
    absl::StatusOr<std::unique_ptr<client::Client>> c =
        client::Client::Create(cc, std::make_unique<SimTransport>(this, d, inner_.get()), world_.shared);
    if (!c.ok()) {
      result = c.status();
    } else {
      {
        std::lock_guard<std::mutex> lock(mu_);
        a->client = c->get();
      }
      (*c)->SetConditions(conditions);
      client::SimulationHooks hooks;
      hooks.now_ms = [this, d] { return DeviceNowMs(d); };
      hooks.sleep = [this, d](double seconds) { DeviceSleep(d, seconds); };
      hooks.secagg_rounding_seed = cc.seed;
      (*c)->SetSimulationHooks(std::move(hooks));
      result = (*c)->RunOnce();
      std::lock_guard<std::mutex> lock(mu_);
      a->client = nullptr;
    }
  }  // the client and its connections are gone before the loop reaps the activation
  Finish(a, std::move(result));
}

void MethodRun::Finish(Activation* a, absl::StatusOr<client::RunResult> result) {
  bool release = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    release = std::exchange(a->holds_slot, false);  // it failed while training
  }
  if (release) compute_slots_->Release();
  std::lock_guard<std::mutex> lock(mu_);
  a->result = std::move(result);
  a->state = Activation::State::kDone;
  loop_cv_.notify_one();
}

// Rank 0's side of a device that runs on another rank: starts it there, then serves its connection
// requests exactly as SimTransport / SimChannel do for a local device, until it reports its result.
void MethodRun::RemoteDeviceMain(Activation* a, client::Conditions conditions) {
  const int64_t d = a->device;
  const uint64_t key = static_cast<uint64_t>(d);
  MpiRanks& ranks = *world_.ranks;
  const int owner = a->rank;
  double vt = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    vt = a->vt;
  }
  const nlohmann::json start = {{"method", method_},          {"device", d},
                                {"token", tokens_[static_cast<size_t>(d)]}, {"vt", vt},
                                {"charging", conditions.charging}, {"unmetered", conditions.unmetered},
                                {"idle", conditions.idle},         {"battery", conditions.battery}};
  ranks.Send(owner, MpiRanks::kControlKey, std::string(1, kStart) + start.dump());
  std::unique_ptr<comms::Channel> channel;
  absl::StatusOr<client::RunResult> result = absl::UnknownError("not run");
  while (true) {
    absl::StatusOr<MpiRanks::Message> m = ranks.Receive(key, kRankTimeout);
    if (!m.ok()) {
      result = m.status();
      break;
    }
    const std::string& p = m->payload;
    const char kind = p.empty() ? '\0' : p[0];
    if (kind == kConnect && p.size() == 9) {
      absl::Status st = absl::OkStatus();
      if (DeviceDropped(d)) {
        st = absl::UnavailableError("the device dropped out (simulated)");
      } else {
        absl::StatusOr<std::unique_ptr<comms::Channel>> c = inner_->Connect(comms::Duration(LoadU64Le(p.substr(1))));
        if (c.ok()) {
          if (channel) channel->Close();
          channel = *std::move(c);
        } else {
          st = c.status();
        }
      }
      ranks.Send(owner, key, std::string(1, kConnected) + StatusJson(st).dump());
    } else if (kind == kCall && p.size() >= 17) {
      v1::Envelope request;
      absl::StatusOr<v1::Envelope> reply = absl::FailedPreconditionError("no open connection");
      bool training_starts = false;
      if (!request.ParseFromArray(p.data() + 17, static_cast<int>(p.size() - 17))) {
        reply = absl::InternalError("malformed request envelope from another rank");
      } else if (channel) {
        DeviceSleep(d, GetDouble(std::string_view(p).substr(9)));
        reply = DeviceCall(d, *channel, request, comms::Duration(LoadU64Le(p.substr(1))), &training_starts);
      }
      std::string out(1, kReply);
      out += training_starts ? 'T' : '-';  // the device's rank takes a compute slot before it trains
      {
        std::lock_guard<std::mutex> lock(mu_);
        PutDouble(out, a->vt);
      }
      if (reply.ok()) {
        out += '1';
        reply->AppendToString(&out);
      } else {
        out += '0';
        out += StatusJson(reply.status()).dump();
      }
      ranks.Send(owner, key, std::move(out));
    } else if (kind == kClose) {
      if (channel) channel->Close();
      channel.reset();
    } else if (kind == kDone) {
      result = DecodeResult(std::string_view(p).substr(1));
      break;
    } else {
      result = absl::InternalError(StrCat("unexpected message kind '", std::string(1, kind), "' from rank ", owner));
      break;
    }
  }
  if (channel) channel->Close();
  Finish(a, std::move(result));
}

// With mu_ held: the rank where a new activation of `device` runs its client (`may_get_task`: the
// coordinator is selecting, Coordinator::Selecting()).
int MethodRun::PlaceActivation(int64_t device, bool may_get_task) {
  if (world_.ranks == nullptr) return 0;
  if (!world_.shared_work_dir) return world_.Owner(device);
  // A check-in that cannot get a task (no room in the round's selection) is a short exchange: rank 0
  // answers it without a round trip to another rank, during which the event loop could not pass the
  // device's clock. One that may get a task goes to the rank with the fewest devices that hold or may get
  // one (ties away from rank 0, which also runs the hub): where its training is likely to find a compute
  // slot soonest. Placement only moves host work: a device's state is in the shared work directory, and
  // the results do not depend on where it runs.
  if (!may_get_task) return 0;
  size_t best = trainers_by_rank_.size() - 1;
  for (size_t r = best; r-- > 0;) {
    if (trainers_by_rank_[r] < trainers_by_rank_[best]) best = r;
  }
  return static_cast<int>(best);
}

// With mu_ held, for an activation in kDone: schedule the device's next check-in.
void MethodRun::Reap(Activation& a) {
  if (a.thread.joinable()) a.thread.join();
  if (a.counted) --trainers_by_rank_[static_cast<size_t>(a.rank)];
  const double te = std::max(a.vt, a.bound);
  double next = te + static_cast<double>(config_.retry_base_s);
  if (a.dropped) {
    next = te + 1800;  // offline for a while after dropping out
  } else if (!a.result.ok()) {
    if (!stopping_) {
      if (++client_errors_ <= 5) {
        spdlog::warn("{} ({}): {}", DeviceId(a.device), method_, std::string(a.result.status().message()));
      }
    }
  } else {
    switch (a.result->outcome) {
      case client::RunOutcome::kRetryLater:
        if (a.result->retry_after_seconds > 0) next = te + a.result->retry_after_seconds;
        break;
      case client::RunOutcome::kDeclined:
        next = te + 6 * 3600;  // it will not fit soon either
        break;
      case client::RunOutcome::kUploaded:
      case client::RunOutcome::kCancelled:
      case client::RunOutcome::kDropped:  // a straggler: its update came after the round closed
        break;
    }
  }
  if (stopping_) return;
  next = world_.population->NextAvailable(a.device, next);
  if (next < world_.end_time_s) wakes_.push({next, a.device});
}

absl::StatusOr<double> MethodRun::EvalLoss(const std::vector<float>& params) {
  if (static_cast<int64_t>(params.size()) != eval_adapter_->numel()) {
    return absl::InternalError(StrCat("global model has ", params.size(), " parameters, the adapter ",
                                      eval_adapter_->numel()));
  }
  std::memcpy(eval_adapter_->flat().data_ptr<float>(), params.data(), params.size() * sizeof(float));
  model::EvalOptions eo;
  eo.batch_size = 16;
  eo.forward.adapter = eval_adapter_.get();
  SEEDLING_ASSIGN_OR_RETURN(const model::EvalResult r, model::Evaluate(*world_.shared.model, world_.eval_examples, eo));
  return r.loss;
}

// Loop thread, without mu_ held: records rounds that finished since the last call.
void MethodRun::CheckRounds() {
  const server::DashboardSnapshot snap = coordinator_->Snapshot();
  if (snap.current.has_value()) {
    std::lock_guard<std::mutex> lock(mu_);
    RoundStats& s = stats_[snap.current->round_id];
    if (!s.opened) {
      s.opened = true;
      const double t = static_cast<double>(snap.current->opened_ms) / 1000.0;
      for (int64_t d = 0; d < world_.population->size(); ++d) s.available += world_.population->Available(d, t);
    }
  }
  std::vector<const server::DashboardRound*> finished;
  for (const server::DashboardRound& r : snap.recent) {
    if (r.round_id > last_recorded_) finished.push_back(&r);
  }
  std::sort(finished.begin(), finished.end(), [](auto* x, auto* y) { return x->round_id < y->round_id; });
  for (const server::DashboardRound* r : finished) {
    RoundRecord rec;
    rec.method = method_;
    rec.round = static_cast<int64_t>(r->round_id);
    rec.committed = r->state == "committed";
    rec.start_time_s = static_cast<double>(r->opened_ms) / 1000.0 - options_.start_time_s;
    rec.end_time_s = static_cast<double>(r->closed_ms) / 1000.0 - options_.start_time_s;
    rec.selected = r->selected;
    rec.participants = r->accepted;
    rec.train_loss = r->loss_end;
    rec.bytes_up_per_client = r->accepted > 0 ? static_cast<double>(r->bytes_up) / static_cast<double>(r->accepted) : 0;
    rec.bytes_down_per_client = r->selected > 0 ? static_cast<double>(r->bytes_down) / static_cast<double>(r->selected) : 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const RoundStats& s = stats_[r->round_id];
      const double closed_s = static_cast<double>(r->closed_ms) / 1000.0;
      rec.available = s.available;
      rec.dropouts = std::count_if(s.drops.begin(), s.drops.end(), [&](auto& e) { return e.second <= closed_s; });
      rec.declined = s.declined;
      rec.declined_memory = s.declined_memory;
      rec.declined_unsupported = s.declined_unsupported;
      rec.stragglers = std::max<int64_t>(0, r->selected - r->accepted - rec.dropouts - s.declined);
      rec.energy_joules = s.energy_j;
      rec.processed_tokens = r->processed_tokens;
      if (s.accepted_compute_s > 0 && r->processed_tokens > 0) {
        rec.device_tokens_per_second = static_cast<double>(r->processed_tokens) / s.accepted_compute_s;
      }
    }
    if (rec.committed) {
      rec.epsilon = snap.epsilon;  // DP spent after this round (NaN without DP); one commit per check
      const std::vector<float> params = coordinator_->global_params();
      rec.global_sha256 = Sha256Hex(
          std::string_view(reinterpret_cast<const char*>(params.data()), params.size() * sizeof(float)));
      absl::StatusOr<double> loss = EvalLoss(params);
      if (loss.ok()) {
        rec.eval_loss = *loss;
      } else {
        spdlog::error("evaluation after round {} failed: {}", r->round_id, std::string(loss.status().message()));
      }
      if (!world_.choice_items.empty()) {
        model::EvalOptions eo;
        eo.forward.adapter = eval_adapter_.get();  // holds `params` (EvalLoss)
        absl::StatusOr<double> acc = model::ChoiceAccuracy(*world_.shared.model, world_.choice_items, eo);
        if (acc.ok()) {
          rec.accuracy = *acc;
        } else {
          spdlog::error("accuracy after round {} failed: {}", r->round_id, std::string(acc.status().message()));
        }
      }
    } else if (!records_.empty()) {
      rec.eval_loss = records_.back().eval_loss;  // the global model did not change
      rec.accuracy = records_.back().accuracy;
      rec.epsilon = records_.back().epsilon;
      rec.global_sha256 = records_.back().global_sha256;
    }
    const auto now = std::chrono::steady_clock::now();
    rec.wall_seconds = std::chrono::duration<double>(now - last_round_wall_).count();
    last_round_wall_ = now;
    last_recorded_ = r->round_id;
    if (absl::Status st = log_->Append(rec); !st.ok()) spdlog::error("{}", std::string(st.message()));
    if (options_.progress) {
      const double wall = std::chrono::duration<double>(now - wall_start_).count();
      const int64_t done = static_cast<int64_t>(records_.size()) + 1;
      const double eta = wall / static_cast<double>(done) * static_cast<double>(config_.rounds - done);
      std::fprintf(stderr,
                   "[%s] round %lld/%lld %s  sim %s  eval loss %.4f  %lld/%lld reports, %lld dropouts, %lld "
                   "stragglers, %lld declined  ETA %s\n",
                   method_.c_str(), static_cast<long long>(done), static_cast<long long>(config_.rounds),
                   rec.committed ? "committed" : "aborted", FormatDuration(rec.end_time_s).c_str(), rec.eval_loss,
                   static_cast<long long>(rec.participants), static_cast<long long>(rec.selected),
                   static_cast<long long>(rec.dropouts), static_cast<long long>(rec.stragglers),
                   static_cast<long long>(rec.declined), FormatDuration(eta).c_str());
    }
    records_.push_back(rec);
  }
}

void MethodRun::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    for (auto it = active_.begin(); it != active_.end();) {
      if (it->second->state == Activation::State::kDone) {
        Reap(*it->second);
        it = active_.erase(it);
      } else {
        ++it;
      }
    }
    if (stopping_) {
      if (active_.empty()) return;
      for (auto& [d, a] : active_) {
        if (a->client != nullptr) a->client->Cancel();
      }
      device_cv_.notify_all();
      loop_cv_.wait_for(lock, std::chrono::milliseconds(50));
      continue;
    }
    if (check_rounds_) {
      check_rounds_ = false;
      lock.unlock();
      CheckRounds();
      lock.lock();
      if (coordinator_->Finished()) stopping_ = true;
      continue;
    }
    // The earliest event: (time, kind, device, seq) with kinds 0 tick, 1 request, 2 wake-up.
    double horizon = kInf;
    std::tuple<double, int, int64_t, uint64_t> best{next_tick_, 0, -1, 0};
    for (const auto& [d, a] : active_) {
      if (a->state == Activation::State::kRunning || a->state == Activation::State::kGranted) {
        horizon = std::min(horizon, a->bound);
      } else if (a->state == Activation::State::kWaiting) {
        best = std::min(best, std::tuple<double, int, int64_t, uint64_t>{a->wait_t, 1, d, a->seq});
      }
    }
    if (!wakes_.empty()) {
      best = std::min(best, std::tuple<double, int, int64_t, uint64_t>{wakes_.top().first, 2, wakes_.top().second, 0});
    }
    const auto [t, kind, device, seq] = best;
    if (!(t < horizon)) {
      loop_cv_.wait(lock);
      continue;
    }
    if (t >= world_.end_time_s) {
      spdlog::warn("{}: no more rounds within {} simulated hours", method_, options_.max_hours);
      stopping_ = true;
      continue;
    }
    clock_.Set(ToMs(t));
    if (kind == 0) {
      next_tick_ = t + options_.tick_s;
      lock.unlock();
      coordinator_->Tick();
      CheckRounds();
      lock.lock();
      if (coordinator_->Finished()) stopping_ = true;
    } else if (kind == 1) {
      Activation& a = *active_.at(device);
      a.state = Activation::State::kGranted;
      a.bound = a.wait_t;
      device_cv_.notify_all();
    } else {
      wakes_.pop();
      if (active_.count(device) != 0) continue;  // cannot happen: a device is rescheduled when reaped
      if (!world_.population->Available(device, t)) {
        const double next = world_.population->NextAvailable(device, t);
        if (next < world_.end_time_s) wakes_.push({next, device});
        continue;
      }
      const DeviceConditions dc = world_.population->ConditionsAt(device, t);
      client::Conditions c;
      c.charging = dc.charging;
      c.unmetered = dc.unmetered;
      c.idle = dc.idle;
      c.battery = dc.battery;
      auto a = std::make_unique<Activation>();
      a->device = device;
      a->vt = a->bound = t;
      Activation* raw = a.get();
      active_[device] = std::move(a);
      // Placement is a choice only with ranks sharing the work directory (World::shared_work_dir).
      const bool may_get_task = world_.shared_work_dir && coordinator_->Selecting();
      raw->rank = PlaceActivation(device, may_get_task);
      if (may_get_task) {
        raw->counted = true;
        ++trainers_by_rank_[static_cast<size_t>(raw->rank)];
      }
      if (raw->rank == 0) {
        raw->thread = std::thread(&MethodRun::DeviceMain, this, raw, c);
      } else {
        raw->thread = std::thread(&MethodRun::RemoteDeviceMain, this, raw, c);
      }
    }
  }
}

absl::StatusOr<MethodResult> MethodRun::Run() {
  SEEDLING_RETURN_IF_ERROR(Setup());
  MethodResult result;
  result.method = method_;
  SEEDLING_ASSIGN_OR_RETURN(result.initial_eval_loss, EvalLoss(coordinator_->global_params()));
  if (options_.progress && world_.ranks != nullptr) {
    std::fprintf(stderr, "[%s] %d MPI ranks, %s\n", method_.c_str(), world_.ranks->size(),
                 world_.shared_work_dir ? "shared work directory: each activation runs on the least busy rank"
                                        : "no shared work directory: device d runs on rank d % ranks");
  }
  if (options_.progress) {
    std::fprintf(stderr, "[%s] %lld devices, %lld rounds of %lld clients; initial eval loss %.4f\n", method_.c_str(),
                 static_cast<long long>(world_.population->size()), static_cast<long long>(config_.rounds),
                 static_cast<long long>(config_.clients_per_round), result.initial_eval_loss);
  }
  wall_start_ = last_round_wall_ = std::chrono::steady_clock::now();
  Loop();
  if (tls_server_) tls_server_->Stop();
  coordinator_->Shutdown();
  result.rounds = records_;
  result.client_errors = client_errors_;
  result.summary = Summarize(method_, result.initial_eval_loss, result.rounds);
  return result;
}

std::string DefaultPhoneClassesPath() { return std::string(SEEDLING_DATA_DIR) + "/phones/phone_classes.csv"; }

// Accuracy where the task has labels: a row whose "output" equals its label (the classification form,
// {"instruction": ..., "output": "sports", "topic": "sports"}) is labelled. Each labelled held-out row
// becomes a multiple-choice item over the sorted label set (every candidate label as the output); none
// when fewer than 2 or more than kMaxChoiceLabels labels.
constexpr size_t kMaxChoiceLabels = 64;

absl::StatusOr<std::vector<model::ChoiceItem>> ChoiceItems(const std::vector<DataRow>& rows,
                                                           const std::vector<std::vector<uint32_t>>& heldout,
                                                           const model::Tokenizer& tokenizer,
                                                           const model::DatasetOptions& dso, int64_t limit) {
  auto labelled = [](const DataRow& r, nlohmann::json* parsed) {
    if (r.label.empty() || r.json.find("\"output\"") == std::string::npos) return false;  // most rows: no parse
    nlohmann::json j = nlohmann::json::parse(r.json, nullptr, false);
    if (!j.is_object() || !j.contains("output") || !j["output"].is_string() || j["output"] != r.label) return false;
    if (parsed != nullptr) *parsed = std::move(j);
    return true;
  };
  std::set<std::string> label_set;
  for (const DataRow& r : rows) {
    if (labelled(r, nullptr)) label_set.insert(r.label);
  }
  std::vector<model::ChoiceItem> items;
  if (label_set.size() < 2 || label_set.size() > kMaxChoiceLabels) return items;
  const std::vector<std::string> labels(label_set.begin(), label_set.end());
  for (const std::vector<uint32_t>& device : heldout) {
    for (uint32_t i : device) {
      if (static_cast<int64_t>(items.size()) >= limit) return items;
      nlohmann::json j;
      if (!labelled(rows[i], &j)) continue;
      model::ChoiceItem item;
      bool usable = true;
      for (size_t k = 0; k < labels.size() && usable; ++k) {
        j["output"] = labels[k];
        absl::StatusOr<model::Example> e = model::TokenizeRow(j.dump(), tokenizer, dso);
        usable = e.ok() && e->ScoredTokens() > 0;
        if (usable) item.candidates.push_back(*std::move(e));
        if (labels[k] == rows[i].label) item.answer = static_cast<int64_t>(k);
      }
      if (usable) items.push_back(std::move(item));
    }
  }
  return items;
}

// Where rank 0 keeps server and device state: tmpfs when available (fsync-heavy and thrown away).
WorkDir RankZeroWorkDir(const SimulationOptions& options) {
  WorkDir wd;
  if (options.work_dir.empty()) {
    std::string base = std::filesystem::temp_directory_path().string();
    if (std::filesystem::is_directory("/dev/shm") && access("/dev/shm", W_OK) == 0) base = "/dev/shm";
    wd.path = JoinPath(base, StrCat("seedling-sim-", getpid()));
    wd.remove = true;
  } else {
    wd.path = options.work_dir;
  }
  return wd;
}

// With several ranks: rank 0 announces its work directory and a token written there; every rank reports
// whether it sees the token. If all do, they share rank 0's directory (dynamic placement); otherwise each
// rank r > 0 works in <work_dir>/rank-<r> (static placement).
absl::StatusOr<WorkDir> AgreeWorkDir(const SimulationOptions& options, MpiRanks& ranks) {
  if (ranks.rank() == 0) {
    WorkDir wd = RankZeroWorkDir(options);
    SEEDLING_RETURN_IF_ERROR(MakeDirs(wd.path));
    const std::string token = StrCat(getpid(), "-", std::chrono::steady_clock::now().time_since_epoch().count());
    SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(wd.path, "rank0.token"), token));
    const nlohmann::json j = {{"work_dir", wd.path}, {"token", token}};
    for (int r = 1; r < ranks.size(); ++r) ranks.Send(r, MpiRanks::kControlKey, std::string(1, kWorkDir) + j.dump());
    wd.shared = true;
    for (int r = 1; r < ranks.size(); ++r) {
      SEEDLING_ASSIGN_OR_RETURN(MpiRanks::Message m, ranks.Receive(MpiRanks::kControlKey, kRankTimeout));
      const nlohmann::json a = nlohmann::json::parse(m.payload.substr(std::min<size_t>(1, m.payload.size())), nullptr, false);
      if (m.payload.empty() || m.payload[0] != kSeesWorkDir || !a.is_object()) {
        return absl::InternalError(StrCat("unexpected message from rank ", m.source, " while agreeing on a work directory"));
      }
      wd.shared = wd.shared && a.value("sees", false);
    }
    return wd;
  }
  SEEDLING_ASSIGN_OR_RETURN(MpiRanks::Message m, ranks.Receive(MpiRanks::kControlKey, kRankTimeout));
  const nlohmann::json j = nlohmann::json::parse(m.payload.substr(std::min<size_t>(1, m.payload.size())), nullptr, false);
  if (m.payload.empty() || m.payload[0] != kWorkDir || !j.is_object() || !j.contains("work_dir")) {
    return absl::InternalError("unexpected message from rank 0 while agreeing on a work directory");
  }
  WorkDir wd;
  wd.path = j["work_dir"].get<std::string>();
  absl::StatusOr<std::string> seen = ReadFile(JoinPath(wd.path, "rank0.token"));
  wd.shared = options.mpi_placement == "auto" && seen.ok() && *seen == j.value("token", std::string());
  ranks.Send(0, MpiRanks::kControlKey,
             std::string(1, kSeesWorkDir) + nlohmann::json({{"rank", ranks.rank()}, {"sees", wd.shared}}).dump());
  if (!wd.shared) {
    WorkDir own = RankZeroWorkDir(options);
    own.path = JoinPath(own.path, StrCat("rank-", ranks.rank()));
    return own;
  }
  return wd;  // rank 0's: it removes it
}

absl::StatusOr<World> MakeWorld(const SimulationOptions& options, MpiRanks* ranks, const WorkDir& wd) {
  World w;
  w.options = &options;
  w.ranks = ranks;
  w.work_dir = wd.path;
  w.remove_work_dir = wd.remove;
  w.shared_work_dir = ranks != nullptr && wd.shared;
  std::error_code ec;
  std::filesystem::create_directories(JoinPath(w.work_dir, "data"), ec);
  if (ec) return absl::InternalError(StrCat("cannot create ", w.work_dir, ": ", ec.message()));

  // Model (shared read-only by every device, held as the rounds' tasks say) and its tokenizer.
  SEEDLING_ASSIGN_OR_RETURN(w.model_config, model::LoadModelConfig(options.model_dir));
  w.weight_cache_dir =
      options.weight_cache_dir.empty() ? JoinPath(options.model_dir, ".seedling-cache") : options.weight_cache_dir;
  model::LoadOptions load;
  load.precision = options.server.weights;
  load.cache_dir = w.weight_cache_dir;
  std::unique_ptr<Progress> cache_progress;
  if (options.progress && w.rank() == 0) {
    load.cache_progress = [&](int64_t done, int64_t total) {
      if (cache_progress == nullptr) {
        cache_progress = std::make_unique<Progress>(
            StrCat("building the ", model::WeightPrecisionName(load.precision), " weight cache"), total);
      }
      cache_progress->Update(done);
    };
  }
  // Before the shared model exists: what a device's process holds besides its model.
  w.device_runtime_bytes =
      options.device_runtime_bytes >= 0 ? options.device_runtime_bytes : client::MeasureRuntimeBytes();
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> m, model::LlamaModel::Load(options.model_dir, load));
  cache_progress.reset();
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::Tokenizer> tok, model::LoadTokenizer(options.model_dir));
  w.shared.model = std::shared_ptr<const model::LlamaModel>(std::move(m));
  w.shared.tokenizer = std::shared_ptr<const model::Tokenizer>(std::move(tok));
  w.shared.precision = load.precision;
  SEEDLING_ASSIGN_OR_RETURN(w.weight_bytes, model::ResidentWeightBytes(options.model_dir, w.model_config, load.precision));

  // Population.
  const std::string csv = options.phone_classes.empty() ? DefaultPhoneClassesPath() : options.phone_classes;
  SEEDLING_ASSIGN_OR_RETURN(std::vector<PhoneClass> classes, LoadPhoneClasses(csv));
  PopulationOptions po = options.population;
  po.seed = options.seed;
  SEEDLING_ASSIGN_OR_RETURN(Population pop, Population::Create(std::move(classes), po));
  w.population = std::make_unique<Population>(std::move(pop));
  const int64_t n = w.population->size();

  // Data: each training device's rows as a JSONL file its client loads; held-out devices' rows evaluate.
  std::vector<DataRow> rows;
  std::vector<std::vector<uint32_t>> device_rows, heldout_rows;
  if (options.data_path.empty()) {
    SyntheticCorpusOptions co = options.corpus;
    co.devices = n;
    co.heldout_devices = options.heldout_devices;
    co.seed = options.seed;
    FederatedCorpus corpus = MakeSyntheticCorpus(co);
    rows = std::move(corpus.rows);
    device_rows = std::move(corpus.train.device_rows);
    heldout_rows = std::move(corpus.heldout);
    w.partition_summary = StrCat("built-in synthetic corpus: ", corpus.train.stats.ToString());
  } else {
    SEEDLING_ASSIGN_OR_RETURN(ReadRowsResult read, ReadRows(options.data_path));
    if (read.skipped > 0) spdlog::warn("{}", read.message);
    rows = std::move(read.rows);
    PartitionOptions po2 = options.partition;
    po2.seed = options.seed;
    SEEDLING_ASSIGN_OR_RETURN(Partition p, PartitionRows(rows, n + options.heldout_devices, po2));
    device_rows.assign(p.device_rows.begin(), p.device_rows.begin() + n);
    heldout_rows.assign(p.device_rows.begin() + n, p.device_rows.end());
    w.partition_summary = StrCat(options.data_path, ": ", p.stats.ToString());
  }
  if (static_cast<int64_t>(device_rows.size()) != n) {
    return absl::InternalError(StrCat("the partition has ", device_rows.size(), " devices, expected ", n));
  }
  w.data_paths.resize(static_cast<size_t>(n));
  for (int64_t d = 0; d < n; ++d) {
    w.data_paths[static_cast<size_t>(d)] = JoinPath(JoinPath(w.work_dir, "data"), DeviceId(d) + ".jsonl");
    // Shared work directory: rank 0 writes every device's data; otherwise each rank its own devices'.
    if (w.shared_work_dir ? w.rank() != 0 : w.Owner(d) != w.rank()) continue;
    SEEDLING_RETURN_IF_ERROR(WriteRowsJsonl(w.data_paths[static_cast<size_t>(d)], rows, device_rows[static_cast<size_t>(d)]));
  }
  model::DatasetOptions dso;
  dso.max_seq_len = options.server.seq_len;
  if (!w.model_config.eos_token_ids.empty()) dso.eos_id = static_cast<int32_t>(w.model_config.eos_token_ids[0]);
  for (const std::vector<uint32_t>& device : heldout_rows) {
    for (uint32_t i : device) {
      if (static_cast<int64_t>(w.eval_examples.size()) >= options.eval_examples) break;
      absl::StatusOr<model::Example> e = model::TokenizeRow(rows[i].json, *w.shared.tokenizer, dso);
      if (e.ok() && e->ScoredTokens() > 0) w.eval_examples.push_back(*std::move(e));
    }
  }
  if (w.eval_examples.empty()) return absl::InvalidArgumentError("no usable held-out example to evaluate on");
  SEEDLING_ASSIGN_OR_RETURN(w.choice_items, ChoiceItems(rows, heldout_rows, *w.shared.tokenizer, dso, options.eval_examples));
  w.end_time_s = options.start_time_s + options.max_hours * 3600.0;
  return w;
}

// A rank other than 0: runs the clients of its devices when rank 0 starts them, until rank 0 says quit.
absl::Status RunDeviceRank(const World& world) {
  MpiRanks& ranks = *world.ranks;
  const SimulationOptions& options = *world.options;
  ComputeSlots slots(options.threads > 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency()));
  std::map<int64_t, std::thread> threads;  // by device: its latest activation
  std::set<std::string> methods_ready;
  absl::Status failure = absl::OkStatus();
  while (true) {
    absl::StatusOr<MpiRanks::Message> m = ranks.Receive(MpiRanks::kControlKey, kRankTimeout);
    if (!m.ok()) {
      if (m.status().code() == absl::StatusCode::kDeadlineExceeded) continue;  // rank 0 is busy (evaluating)
      failure = m.status();
      break;
    }
    const std::string& p = m->payload;
    if (!p.empty() && p[0] == kQuit) break;
    const nlohmann::json j = p.empty() || p[0] != kStart ? nlohmann::json() : nlohmann::json::parse(p.substr(1), nullptr, false);
    if (!j.is_object() || !j.contains("device") || !j.contains("method")) {
      failure = absl::InternalError("malformed control message from rank 0");
      break;
    }
    const int64_t d = j["device"].get<int64_t>();
    const std::string method = j["method"].get<std::string>();
    const std::string method_dir = JoinPath(world.work_dir, method);
    if (d < 0 || d >= world.population->size() || (!world.shared_work_dir && world.Owner(d) != ranks.rank())) {
      failure = absl::InternalError(StrCat("rank 0 started device ", d, ", which is not on rank ", ranks.rank()));
      break;
    }
    if (!world.shared_work_dir && methods_ready.insert(method).second) {  // shared: rank 0 made it
      std::error_code ec;
      std::filesystem::remove_all(method_dir, ec);
      std::filesystem::create_directories(JoinPath(method_dir, "devices"), ec);
      if (ec) {
        failure = absl::InternalError(StrCat("cannot create ", method_dir, ": ", ec.message()));
        break;
      }
    }
    client::Conditions c;
    c.charging = j.value("charging", false);
    c.unmetered = j.value("unmetered", false);
    c.idle = j.value("idle", false);
    c.battery = j.value("battery", 0.0);
    client::ClientConfig cc = DeviceClientConfig(world, method_dir, d, j.value("token", std::string()));
    if (auto it = threads.find(d); it != threads.end()) it->second.join();  // it reported its result already
    const double vt = j.value("vt", 0.0);
    threads[d] = std::thread([&world, &ranks, &slots, cc = std::move(cc), c, d, vt] {
      auto dev = std::make_shared<ForwardedDevice>();
      dev->ranks = &ranks;
      dev->device = d;
      dev->slots = &slots;
      dev->vt = vt;
      absl::StatusOr<client::RunResult> result = absl::UnknownError("not run");
      {
        absl::StatusOr<std::unique_ptr<client::Client>> client =
            client::Client::Create(cc, std::make_unique<ForwardedTransport>(dev), world.shared);
        if (!client.ok()) {
          result = client.status();
        } else {
          (*client)->SetConditions(c);
          client::SimulationHooks hooks;
          hooks.now_ms = [dev] { return ToMs(dev->vt + dev->slept); };
          hooks.sleep = [dev](double seconds) { dev->slept += seconds; };
          hooks.secagg_rounding_seed = cc.seed;
          (*client)->SetSimulationHooks(std::move(hooks));
          result = (*client)->RunOnce();
        }
      }  // its connection is closed (and rank 0 told) before the result goes
      dev->ReleaseSlot();  // it failed while training
      ranks.Send(0, static_cast<uint64_t>(d), EncodeResult(result));
    });
  }
  for (auto& [d, t] : threads) t.join();
  return failure;
}

}  // namespace

absl::StatusOr<SimulationResult> RunSimulation(const SimulationOptions& options, MpiRanks* ranks) {
  if (ranks != nullptr && ranks->size() == 1) ranks = nullptr;
  // Rank 0 tells the other ranks to stop however it leaves (an error there would otherwise leave them
  // waiting); a failing rank other than 0 aborts the whole job.
  struct QuitOthers {
    MpiRanks* ranks;
    ~QuitOthers() {
      if (ranks == nullptr || ranks->rank() != 0) return;
      for (int r = 1; r < ranks->size(); ++r) ranks->Send(r, MpiRanks::kControlKey, std::string(1, kQuit));
    }
  } quit_others{ranks};
  absl::Status valid = options.Validate();
  if (!valid.ok() && ranks != nullptr && ranks->rank() > 0) ranks->Abort(std::string(valid.message()));
  SEEDLING_RETURN_IF_ERROR(valid);
  // Many devices train at once in this process: one BLAS thread each (model/runtime.h), which also makes
  // every device's arithmetic independent of the thread count.
  model::ConfigureCompute({1});
  absl::StatusOr<WorkDir> wd = ranks != nullptr ? AgreeWorkDir(options, *ranks) : RankZeroWorkDir(options);
  if (!wd.ok() && ranks != nullptr && ranks->rank() > 0) ranks->Abort(std::string(wd.status().message()));
  SEEDLING_RETURN_IF_ERROR(wd.status());
  absl::StatusOr<World> made = MakeWorld(options, ranks, *wd);
  if (!made.ok() && ranks != nullptr && ranks->rank() > 0) ranks->Abort(std::string(made.status().message()));
  SEEDLING_RETURN_IF_ERROR(made.status());
  World world = *std::move(made);
  if (ranks != nullptr && ranks->rank() > 0) {
    absl::Status st = RunDeviceRank(world);
    std::error_code ec;
    if (world.remove_work_dir) std::filesystem::remove_all(world.work_dir, ec);
    if (!st.ok()) ranks->Abort(std::string(st.message()));
    SimulationResult result;
    result.rank = ranks->rank();
    result.ranks = ranks->size();
    return result;
  }
  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) return absl::InternalError(StrCat("cannot create ", options.out_dir, ": ", ec.message()));
  // A simulation starts from scratch, so its log does too (RoundLog appends, for runs that resume).
  for (const char* name : {"rounds.jsonl", "rounds.csv"}) std::filesystem::remove(JoinPath(options.out_dir, name), ec);
  SEEDLING_ASSIGN_OR_RETURN(RoundLog log, RoundLog::Open(options.out_dir));

  SimulationResult result;
  result.ranks = ranks == nullptr ? 1 : ranks->size();
  result.bytes_per_idle_device = world.population->bytes_per_device();
  result.population_summary = world.population->Summary();
  result.partition_summary = world.partition_summary;
  ReportInput report;
  for (const std::string& method : options.methods) {
    MethodRun run(world, method, &log);
    SEEDLING_ASSIGN_OR_RETURN(MethodResult r, run.Run());
    report.initial_eval_loss[method] = r.initial_eval_loss;
    report.summaries.push_back(r.summary);
    report.rounds.insert(report.rounds.end(), r.rounds.begin(), r.rounds.end());
    result.methods.push_back(std::move(r));
  }
  if (world.remove_work_dir) std::filesystem::remove_all(world.work_dir, ec);

  result.summary_table = SummaryTable(report.summaries);
  report.title = StrCat("Seedling simulation: ", world.population->size(), " phones, ",
                        world.model_config.architecture, " (", options.model_dir, ")");
  std::string methods;
  for (const std::string& m : options.methods) methods += (methods.empty() ? "" : ", ") + m;
  report.settings = {
      {"devices", StrCat(world.population->size(), " (+", options.heldout_devices, " held out for evaluation)")},
      {"methods", methods},
      {"rounds", StrCat(options.server.rounds)},
      {"clients per round", StrCat(options.server.clients_per_round, " (over-selection ×", options.server.over_selection, ")")},
      {"local steps × batch × seq_len", StrCat(options.server.steps, " × ", options.server.batch, " × ", options.server.seq_len)},
      {"round deadline", StrCat(options.server.round_deadline_s, " s")},
      {"LoRA", StrCat("rank ", options.server.lora_rank, ", alpha ", options.server.lora_alpha)},
      {"base weights", StrCat(model::WeightPrecisionName(options.server.weights), ": ", FormatBytes(world.weight_bytes),
                              " resident per device (one copy shared by the simulated devices)")},
      {"device runtime", StrCat(FormatBytes(world.device_runtime_bytes),
                                " planned per device besides its model and training (code, LibTorch, BLAS)")},
      {"seed", StrCat(options.seed)},
      {"bytes per idle device", StrCat(result.bytes_per_idle_device)},
      {"simulated start (Unix s)", StrCat(static_cast<int64_t>(options.start_time_s))},
      {"transport", options.loopback ? "TLS 1.3 over loopback" : "in-memory"},
      {"MPI ranks", result.ranks == 1 ? std::string("1")
                                       : StrCat(result.ranks, world.shared_work_dir
                                                                  ? " (shared work directory: each activation on the least busy rank)"
                                                                  : " (devices dealt round-robin: no shared work directory)")},
  };
  if (options.server.privacy.dp) {
    const server::PrivacyConfig& p = options.server.privacy;
    report.settings.push_back({"differential privacy",
                               StrCat("clip ", p.clip_norm, ", noise multiplier ", p.noise_multiplier, ", target ε ",
                                      p.target_epsilon, " at δ ", p.delta, ", noise ", p.noise,
                                      p.noise == "seeded" ? " (simulation only)" : "")});
  }
  if (options.server.secagg.enabled) {
    const server::SecAggConfig& sa = options.server.secagg;
    report.settings.push_back(
        {"secure aggregation",
         StrCat("SecAgg+, ", sa.neighbors > 0 ? StrCat(sa.neighbors, " neighbours")
                             : sa.neighbors_fraction > 0 ? StrCat("neighbours ", sa.neighbors_fraction, " of the cohort")
                                                         : std::string("complete graph"),
                ", up to ", sa.max_dropout_fraction, " dropouts, Q = ", sa.quantization_levels, ", clipping ±",
                sa.clipping_range, ", max weight ", sa.max_weight, " (stochastic rounding seeded: simulation only)")});
  }
  report.notes = {StrCat("Population: ", result.population_summary), StrCat("Data: ", result.partition_summary)};
  for (const MethodResult& r : result.methods) {
    if (r.client_errors > 0) {
      report.notes.push_back(StrCat(r.method, ": ", r.client_errors, " client runs failed for reasons other than "
                                    "simulated dropouts (see the log)"));
    }
  }
  result.report_path = JoinPath(options.out_dir, "report.html");
  SEEDLING_RETURN_IF_ERROR(WriteReport(result.report_path, report));
  SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(options.out_dir, "summary.txt"), result.summary_table));
  return result;
}

}  // namespace seedling::simulator
