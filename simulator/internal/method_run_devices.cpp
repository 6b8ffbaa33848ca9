// The device threads' side of a method run (simulator/internal/method_run.h): a device's request at the
// gate and what its answer means for the device's clock and the round's figures, the device's simulated
// clock, and the threads that run a device's client here or serve it for another rank.

#include <algorithm>
#include <string>

#include "base/bytes.h"
#include "base/strings.h"
#include "simulator/internal/method_run.h"
#include "simulator/internal/mpi_protocol.h"
#include "simulator/internal/sim_transport.h"

namespace seedling::simulator::internal {

bool MethodRun::DeviceDropped(int64_t device) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = active_.find(device);
  return it != active_.end() && it->second->dropped;
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
    std::lock_guard<std::mutex> lock(mu_);
    Activation& a = *active_.at(device);
    if (a.dropped) return absl::UnavailableError("the device dropped out (simulated)");
    const DeviceTime time = gate_.Time(device);
    double send = std::max(time.vt, time.bound);
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
      gate_.Reach(device, a.drop_t);
      return absl::UnavailableError("the device dropped out (simulated)");
    }
  }
  // Outside mu_: until the request is granted the device is running with a bound no later than `arrive`,
  // so the loop cannot pass it meanwhile.
  if (!gate_.Wait(device, arrive)) return absl::UnavailableError("the simulation is over");
  // Granted: the coordinator handles the request at the device's arrival time, alone.
  absl::StatusOr<v1::Envelope> reply = inner.Call(request, timeout);
  bool acquire = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Activation& a = *active_.at(device);
    gate_.Resume(device, AfterReply(a, request, reply, arrive));
    const bool starts = std::exchange(a.training_starts, false);
    if (training_starts != nullptr) {
      *training_starts = starts;
    } else if (starts) {
      a.holds_slot = acquire = true;
    }
  }
  // Outside mu_: the loop goes on while this device waits for a slot (its next request is not before
  // its bound, whenever its training runs).
  if (acquire) compute_slots_->Acquire();
  return reply;
}

DeviceTime MethodRun::AfterReply(Activation& a, const v1::Envelope& request, const absl::StatusOr<v1::Envelope>& reply,
                                 double arrive) {
  const Population& pop = *world_.population;
  const int64_t device = a.device;
  const uint64_t bytes = reply.ok() ? reply->ByteSizeLong() : 0;
  const double rtt = pop.DownloadSeconds(device, 0);
  const double down_s = pop.DownloadSeconds(device, bytes) - rtt;
  DeviceTime time;
  time.vt = arrive + rtt / 2 + down_s;
  time.bound = time.vt;
  if (a.has_task) {
    const double up_s = pop.UploadSeconds(device, request.ByteSizeLong()) - pop.UploadSeconds(device, 0);
    RoundStats& s = stats_[a.round_id];
    s.energy_j += (up_s + down_s) * options_.radio_watts;
    if (a.compute_energy_pending) {
      s.energy_j += pop.TrainingJoules(device, a.compute_s);
      s.device_flops += a.flops;
    }
    a.compute_energy_pending = false;
  }
  if (!reply.ok()) return time;
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
    time.bound = time.vt + a.compute_s;
    a.training_starts = true;
    stats_[a.round_id].energy_j += pop.TrainingJoules(device, a.compute_s);
    stats_[a.round_id].device_flops += a.flops;
  };
  if (reply->has_check_in_reply() && reply->check_in_reply().has_task()) {
    const v1::Task& task = reply->check_in_reply().task();
    if (!std::exchange(a.counted, true)) ++trainers_by_rank_[static_cast<size_t>(a.rank)];
    a.has_task = true;
    a.secagg = task.has_secagg();
    a.round_id = task.round_id();
    a.global_version = task.global_version();
    // The task's own perturbations: fwdgrad pacing raises K, and with it the device's time and FLOPs.
    const int64_t perturbations = TaskPerturbations(task);
    a.flops = perturbations == perturbations_ ? flops_ : TaskFlops(perturbations);
    a.compute_s = pop.ComputeSeconds(device, a.flops);
    if (method_ == "fwdgrad") stats_[a.round_id].perturbations = perturbations;
    a.compute_accounted = false;
    const uint32_t k = tasks_[static_cast<size_t>(device)]++;
    a.drops = pop.DropsOut(device, k);
    if (a.drops) {
      // Where in the task it happens: a fraction of its expected duration (sync, compute, upload).
      const double adapter_bytes = static_cast<double>(task.num_parameters()) * 4;
      const double expected = options_.plan_seconds +
                              pop.DownloadSeconds(device, static_cast<uint64_t>(adapter_bytes)) + a.compute_s +
                              pop.UploadSeconds(device, static_cast<uint64_t>(adapter_bytes / 4));
      a.drop_t = time.vt + pop.DropoutPoint(device, k) * expected;
      stats_[a.round_id].drops[device] = a.drop_t;
    }
    time.bound = time.vt + options_.plan_seconds;
    return time;
  }
  if (request.has_decline() && a.has_task) {
    RoundStats& s = stats_[a.round_id];
    ++s.declined;
    if (request.decline().reason() == v1::Decline::MEMORY) ++s.declined_memory;
    if (request.decline().reason() == v1::Decline::UNSUPPORTED) ++s.declined_unsupported;
    return time;
  }
  if (a.secagg && a.has_task && !a.compute_accounted && reply->has_secagg_reply() &&
      reply->secagg_reply().stage() == v1::SECAGG_SHARE_KEYS &&
      reply->secagg_reply().outcome_case() == v1::SecAggReply::kMessage) {
    start_training();  // the key shares are relayed: the device trains, then masks its input
    return time;
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
  return time;
}

void MethodRun::DeviceMain(Activation* a, client::Conditions conditions) {
  const int64_t d = a->device;
  const client::ClientConfig cc = DeviceClientConfig(world_, dir_, d, tokens_[static_cast<size_t>(d)]);
  absl::StatusOr<client::RunResult> result = absl::UnknownError("not run");
  {
    GateClock clock(gate_, d);  // outlives the client
    absl::StatusOr<std::unique_ptr<client::Client>> c = client::Client::Create(
        cc, attackers_->Wrap(d, std::make_unique<SimTransport>(this, d, inner_.get())), world_.shared);
    if (!c.ok()) {
      result = c.status();
    } else {
      attackers_->Arm(d, **c);
      {
        std::lock_guard<std::mutex> lock(mu_);
        a->client = c->get();
      }
      (*c)->SetConditions(conditions);
      client::SimulationHooks hooks;
      hooks.clock = &clock;
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
  const int64_t device = a->device;
  {
    std::lock_guard<std::mutex> lock(mu_);
    a->result = std::move(result);
  }
  gate_.Finish(device);  // the loop may reap `a` from here on
}

// Rank 0's side of a device that runs on another rank: starts it there, then serves its connection
// requests exactly as SimTransport / SimChannel do for a local device, until it reports its result.
void MethodRun::RemoteDeviceMain(Activation* a, client::Conditions conditions) {
  const int64_t d = a->device;
  const uint64_t key = static_cast<uint64_t>(d);
  MpiRanks& ranks = *world_.ranks;
  const int owner = a->rank;
  const double vt = gate_.Now(d);
  const nlohmann::json start = {{"method", label_},
                                {"device", d},
                                {"token", tokens_[static_cast<size_t>(d)]},
                                {"vt", vt},
                                {"charging", conditions.charging},
                                {"unmetered", conditions.unmetered},
                                {"idle", conditions.idle},
                                {"battery", conditions.battery}};
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
        gate_.Sleep(d, GetDouble(std::string_view(p).substr(9)));  // what it slept on its rank since its last call
        reply = DeviceCall(d, *channel, request, comms::Duration(LoadU64Le(p.substr(1))), &training_starts);
      }
      std::string out(1, kReply);
      out += training_starts ? 'T' : '-';  // the device's rank takes a compute slot before it trains
      PutDouble(out, gate_.Now(d));
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

}  // namespace seedling::simulator::internal
