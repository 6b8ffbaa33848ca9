// A method run's setup, event loop and round records (simulator/internal/method_run.h); the device threads'

#include "simulator/internal/method_run.h"

// side is in simulator/internal/method_run_devices.cpp.

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <tuple>

#include "base/file.h"
#include "base/philox.h"
#include "base/progress.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "client/compute_model.h"
#include "client/local_training.h"
#include "comms/in_memory.h"
#include "model/eval.h"
#include "simulator/internal/mpi_protocol.h"

namespace seedling::simulator::internal {
namespace {

// Philox stream of the devices' first check-in offsets (ASCII "firstwak").
constexpr uint64_t kFirstWakeStream = 0x6669727374776b61ULL;

}  // namespace

absl::Status MethodRun::Setup() {
  SEEDLING_ASSIGN_OR_RETURN(config_, options_.RunServerConfig(label_));
  dir_ = JoinPath(world_.work_dir, label_);
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
  std::filesystem::create_directories(JoinPath(dir_, "devices"), ec);
  if (ec) return absl::InternalError(StrCat("cannot create ", dir_, ": ", ec.message()));
  config_.state_dir = JoinPath(dir_, "server");
  attackers_ = std::make_unique<RunAttackers>(options_, label_, world_.population->size(), dir_);
  config_.model_dir = options_.model_dir;
  config_.http_port = 0;
  // Pseudo-labelling scores over the data's label set unless the run names its own.
  if (config_.pseudo_labels && config_.pseudo_label_choices.empty())
    config_.pseudo_label_choices = world_.choice_labels;
  SEEDLING_RETURN_IF_ERROR(config_.Validate());

  clock_.Set(SecondsToMs(options_.start_time_s));
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

  SEEDLING_ASSIGN_OR_RETURN(const lora::LoraConfig lc, server::ServerLoraConfig(config_, world_.model_config));
  SEEDLING_ASSIGN_OR_RETURN(eval_adapter_, lora::LoraAdapter::Create(world_.model_config, lc));

  threads_ = options_.threads > 0 ? options_.threads : std::max(1u, std::thread::hardware_concurrency());
  compute_slots_ = std::make_unique<ComputeSlots>(threads_);
  const size_t ranks = world_.ranks == nullptr ? 1 : static_cast<size_t>(world_.ranks->size());
  trainers_by_rank_.assign(ranks, 0);
  steps_ = config_.steps;
  batch_ = config_.batch;
  seq_len_ = config_.seq_len;
  perturbations_ = method_ == "fwdgrad" ? config_.perturbations : 1;  // mezo / kseed: one z per step
  first_adapted_layer_ = lora::FirstAdaptedLayer(lc);
  flops_ = client::LocalTrainingFlops(world_.model_config, method_, steps_, batch_, seq_len_, perturbations_,
                                      first_adapted_layer_);

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

int64_t MethodRun::TaskPerturbations(const v1::Task& task) const {
  if (method_ != "fwdgrad") return perturbations_;
  const auto it = task.hyperparameters().find("perturbations");
  return it == task.hyperparameters().end() ? perturbations_ : std::max<int64_t>(1, static_cast<int64_t>(it->second));
}

double MethodRun::TaskFlops(int64_t perturbations) const {
  return client::LocalTrainingFlops(world_.model_config, method_, steps_, batch_, seq_len_, perturbations,
                                    first_adapted_layer_);
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

// With mu_ held, for a device the gate reports finished at `end_s`: ends its activation and schedules its
// next check-in.
void MethodRun::Reap(int64_t device, double end_s) {
  const std::unique_ptr<Activation> owned = std::move(active_.at(device));
  active_.erase(device);
  Activation& a = *owned;
  if (a.thread.joinable()) a.thread.join();
  if (a.counted) --trainers_by_rank_[static_cast<size_t>(a.rank)];
  const double te = end_s;
  double next = te + static_cast<double>(config_.retry_base_s);
  if (a.dropped) {
    next = te + 1800;  // offline for a while after dropping out
  } else if (!a.result.ok()) {
    if (!stopping_) {
      if (++client_errors_ <= 5) {
        spdlog::warn("{} ({}): {}", DeviceId(a.device), label_, std::string(a.result.status().message()));
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
    return absl::InternalError(
        StrCat("global model has ", params.size(), " parameters, the adapter ", eval_adapter_->numel()));
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
    rec.method = label_;
    rec.round = static_cast<int64_t>(r->round_id);
    rec.committed = r->state == "committed";
    rec.start_time_s = static_cast<double>(r->opened_ms) / 1000.0 - options_.start_time_s;
    rec.end_time_s = static_cast<double>(r->closed_ms) / 1000.0 - options_.start_time_s;
    rec.selected = r->selected;
    rec.participants = r->accepted;
    rec.train_loss = r->loss_end;
    rec.gradient_variance = r->gradient_variance;
    rec.bytes_up_per_client = r->accepted > 0 ? static_cast<double>(r->bytes_up) / static_cast<double>(r->accepted) : 0;
    rec.bytes_down_per_client =
        r->selected > 0 ? static_cast<double>(r->bytes_down) / static_cast<double>(r->selected) : 0;
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
      rec.device_flops = s.device_flops;
      rec.perturbations = s.perturbations;
      rec.processed_tokens = r->processed_tokens;
      if (s.accepted_compute_s > 0 && r->processed_tokens > 0) {
        rec.device_tokens_per_second = static_cast<double>(r->processed_tokens) / s.accepted_compute_s;
      }
    }
    if (rec.committed) {
      rec.epsilon = snap.epsilon;  // DP spent after this round (NaN without DP); one commit per check
      rec.rho = snap.dp_rho;       // DP-FTRL only
      rec.epsilon_delta_1e10 = snap.dp_epsilon_delta_1e10;
      const std::vector<float> params = coordinator_->global_params();
      rec.global_sha256 =
          Sha256Hex(std::string_view(reinterpret_cast<const char*>(params.data()), params.size() * sizeof(float)));
      absl::StatusOr<double> loss = EvalLoss(params);
      if (loss.ok()) {
        rec.eval_loss = *loss;
      } else {
        spdlog::error("evaluation after round {} failed: {}", r->round_id, std::string(loss.status().message()));
      }
      rec.accuracy = Accuracy(StrCat("after round ", r->round_id));  // of `params` (EvalLoss)
    } else if (!records_.empty()) {
      rec.eval_loss = records_.back().eval_loss;  // the global model did not change
      rec.accuracy = records_.back().accuracy;
      rec.epsilon = records_.back().epsilon;
      rec.rho = records_.back().rho;
      rec.epsilon_delta_1e10 = records_.back().epsilon_delta_1e10;
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
                   label_.c_str(), static_cast<long long>(done), static_cast<long long>(config_.rounds),
                   rec.committed ? "committed" : "aborted", FormatDuration(rec.end_time_s).c_str(), rec.eval_loss,
                   static_cast<long long>(rec.participants), static_cast<long long>(rec.selected),
                   static_cast<long long>(rec.dropouts), static_cast<long long>(rec.stragglers),
                   static_cast<long long>(rec.declined), FormatDuration(eta).c_str());
    }
    records_.push_back(rec);
  }
}

// With mu_ held: a wake-up of `device` at `t`. An available device starts an activation, on its own
// thread here or served for another rank; an unavailable one is woken again when it is next available.
void MethodRun::Activate(int64_t device, double t) {
  if (active_.count(device) != 0) return;  // cannot happen: a device is rescheduled when reaped
  if (!world_.population->Available(device, t)) {
    const double next = world_.population->NextAvailable(device, t);
    if (next < world_.end_time_s) wakes_.push({next, device});
    return;
  }
  const DeviceConditions dc = world_.population->ConditionsAt(device, t);
  client::Conditions c;
  c.charging = dc.charging;
  c.unmetered = dc.unmetered;
  c.idle = dc.idle;
  c.battery = dc.battery;
  auto a = std::make_unique<Activation>();
  a->device = device;
  gate_.Add(device, t);
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

void MethodRun::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    for (const auto& [device, end_s] : gate_.TakeFinished()) Reap(device, end_s);
    if (stopping_) {
      if (active_.empty()) return;
      for (auto& [d, a] : active_) {
        if (a->client != nullptr) a->client->Cancel();
      }
      gate_.Close();
      lock.unlock();
      gate_.AwaitChange(std::chrono::milliseconds(50));
      lock.lock();
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
    // The loop's own next event, the next tick or the earliest wake-up, against the devices' requests.
    GateEvent own{next_tick_, GateEvent::Kind::kTick};
    if (!wakes_.empty()) {
      own = std::min(own, GateEvent{wakes_.top().first, GateEvent::Kind::kWake, wakes_.top().second});
    }
    lock.unlock();
    const std::optional<GateEvent> next = gate_.Next(own);
    lock.lock();
    // Nothing yet (a device changed state), or a device answered before Next committed an upload: its
    // round is recorded before any later event, as above.
    if (!next.has_value() || check_rounds_) continue;
    const double t = next->t;
    if (t >= world_.end_time_s) {
      spdlog::warn("{}: no more rounds within {} simulated hours", label_, options_.max_hours);
      stopping_ = true;
      continue;
    }
    clock_.Set(SecondsToMs(t));
    switch (next->kind) {
      case GateEvent::Kind::kTick:
        next_tick_ = t + options_.tick_s;
        lock.unlock();
        coordinator_->Tick();
        CheckRounds();
        lock.lock();
        if (coordinator_->Finished()) stopping_ = true;
        break;
      case GateEvent::Kind::kRequest:
        gate_.Grant(next->device);
        break;
      case GateEvent::Kind::kWake:
        wakes_.pop();
        Activate(next->device, t);
        break;
    }
  }
}

double MethodRun::Accuracy(const std::string& when) {
  if (world_.choice_items.empty()) return NAN;
  model::EvalOptions eo;
  eo.forward.adapter = eval_adapter_.get();  // holds the parameters EvalLoss loaded
  absl::StatusOr<double> acc = model::ChoiceAccuracy(*world_.shared.model, world_.choice_items, eo);
  if (!acc.ok()) {
    spdlog::error("accuracy {} failed: {}", when, std::string(acc.status().message()));
    return NAN;
  }
  return *acc;
}

absl::StatusOr<MethodResult> MethodRun::Run() {
  SEEDLING_RETURN_IF_ERROR(Setup());
  MethodResult result;
  result.method = label_;
  SEEDLING_ASSIGN_OR_RETURN(result.initial_eval_loss, EvalLoss(coordinator_->global_params()));
  result.initial_accuracy = Accuracy("before round 1");  // of the initial parameters (EvalLoss)
  if (options_.progress && world_.ranks != nullptr) {
    std::fprintf(stderr, "[%s] %d MPI ranks, %s\n", label_.c_str(), world_.ranks->size(),
                 world_.shared_work_dir ? "shared work directory: each activation runs on the least busy rank"
                                        : "no shared work directory: device d runs on rank d % ranks");
  }
  if (options_.progress) {
    std::fprintf(stderr, "[%s] %lld devices, %lld rounds of %lld clients; initial eval loss %.4f\n", label_.c_str(),
                 static_cast<long long>(world_.population->size()), static_cast<long long>(config_.rounds),
                 static_cast<long long>(config_.clients_per_round), result.initial_eval_loss);
  }
  wall_start_ = last_round_wall_ = std::chrono::steady_clock::now();
  Loop();
  if (tls_server_) tls_server_->Stop();
  coordinator_->Shutdown();
  result.rounds = records_;
  result.client_errors = client_errors_;
  result.summary = Summarize(label_, result.initial_eval_loss, result.rounds);
  return result;
}

}  // namespace seedling::simulator::internal
