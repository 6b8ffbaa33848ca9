#pragma once

// One method's run in a simulation (simulator/simulation.h, "How time works"): the coordinator on a
// ManualClock, the event loop that moves it, the devices' activations and the gate where their requests
// wait, and what the simulator records of each round. Internal to the simulator.

#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <queue>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "base/clock.h"
#include "client/client.h"
#include "comms/tls.h"
#include "comms/transport.h"
#include "lora/adapter.h"
#include "server/config.h"
#include "server/coordinator.h"
#include "simulator/internal/attack.h"
#include "simulator/internal/compute_slots.h"
#include "simulator/internal/gate.h"
#include "simulator/internal/world.h"
#include "simulator/report.h"
#include "simulator/simulation.h"

namespace seedling::simulator::internal {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// One active device: where it stands in the protocol (its clock is the gate's). Guarded by MethodRun::mu_.
struct Activation {
  int64_t device = 0;
  int rank = 0;  // where its client runs
  // The task of this activation, if the server assigned one.
  bool has_task = false;
  bool secagg = false;   // the task is a secure-aggregation round's: training starts after SHARE_KEYS
  bool counted = false;  // in MethodRun::trainers_by_rank_
  uint64_t round_id = 0;
  uint64_t global_version = 0;
  double compute_s = 0;
  double flops = 0;  // of the task's local run (the compute model at the task's perturbations)
  bool compute_accounted = false;
  bool compute_energy_pending = false;  // compute time passed before this request (no download)
  bool drops = false;
  double drop_t = kInf;
  bool dropped = false;
  bool training_starts = false;      // set by AfterReply: the reply just answered starts the training
  bool holds_slot = false;           // a local device holding one of compute_slots_
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
  double device_flops = 0;          // Σ flops of the activations that trained (counted with their compute energy)
  int64_t perturbations = 0;        // fwdgrad: K of the round's tasks
  double accepted_compute_s = 0;    // simulated training time of the devices whose update was accepted
  std::map<int64_t, double> drops;  // device → when it drops out; erased when its update is accepted
};

class MethodRun {
 public:
  // The run named `label` in world.options (SimulationOptions::MethodOf gives its method).
  MethodRun(const World& world, std::string label, RoundLog* log)
      : world_(world), options_(*world.options), label_(label), method_(options_.MethodOf(label)), log_(log) {}

  absl::StatusOr<MethodResult> Run();

  // Called on the device's thread by SimChannel (local device: `training_starts` null, the call takes a
  // compute slot itself when the reply starts the training, and gives it back with the next call) or by
  // RemoteDeviceMain (device on another rank: *training_starts tells that rank to take one of its own).
  absl::StatusOr<v1::Envelope> DeviceCall(int64_t device, comms::Channel& inner, const v1::Envelope& request,
                                          comms::Duration timeout, bool* training_starts = nullptr);
  bool DeviceDropped(int64_t device);

 private:
  absl::Status Setup();
  void Loop();
  void Activate(int64_t device, double t);  // with mu_ held
  void DeviceMain(Activation* a, client::Conditions conditions);
  void RemoteDeviceMain(Activation* a, client::Conditions conditions);
  int PlaceActivation(int64_t device, bool may_get_task);  // with mu_ held
  void Finish(Activation* a, absl::StatusOr<client::RunResult> result);
  void Reap(int64_t device, double end_s);  // with mu_ held
  void CheckRounds();
  absl::StatusOr<double> EvalLoss(const std::vector<float>& params);
  // K of a task (hyperparameters["perturbations"], fwdgrad only; else the run's perturbations_) and the
  // FLOPs of one local run at K perturbations.
  int64_t TaskPerturbations(const v1::Task& task) const;
  double TaskFlops(int64_t perturbations) const;
  // Held-out accuracy of the parameters the last EvalLoss loaded; NaN without labelled rows, or (logged,
  // the run goes on) when scoring fails. `when` names the moment in the log ("before round 1").
  double Accuracy(const std::string& when);
  // With mu_ held, after a granted request: the device's clock after the reply, and what the reply means
  // for the activation and the round's figures.
  DeviceTime AfterReply(Activation& a, const v1::Envelope& request, const absl::StatusOr<v1::Envelope>& reply,
                        double arrive);

  // Constant after Setup().
  const World& world_;
  const SimulationOptions& options_;
  const std::string label_;   // the run's name: its directory, records and report lines
  const std::string method_;  // what its devices train with
  RoundLog* const log_;
  server::ServerConfig config_;
  std::string dir_;
  ManualClock clock_;
  std::unique_ptr<server::Coordinator> coordinator_;
  std::unique_ptr<comms::TlsServer> tls_server_;  // loopback mode; stopped before the coordinator goes
  std::unique_ptr<comms::Transport> inner_;
  std::vector<std::string> tokens_;
  std::unique_ptr<lora::LoraAdapter> eval_adapter_;
  std::unique_ptr<RunAttackers> attackers_;  // the run's hostile devices ([attack])
  int threads_ = 1;
  int64_t steps_ = 0, batch_ = 0, seq_len_ = 0, perturbations_ = 0;
  int64_t first_adapted_layer_ = 0;  // [lora] layers: below it no backward, tangents or per-copy probes
  double flops_ = 0;                 // one local run

  Gate gate_;  // the devices' clocks; taken inside mu_, never the other way round

  std::mutex mu_;
  // Guarded by mu_.
  std::map<int64_t, std::unique_ptr<Activation>> active_;
  std::vector<uint32_t> tasks_;  // tasks each device has received (the dropout stream's counter)
  std::priority_queue<std::pair<double, int64_t>, std::vector<std::pair<double, int64_t>>, std::greater<>> wakes_;
  std::vector<int> trainers_by_rank_;            // activations per rank that hold a task or were placed to get one
  std::unique_ptr<ComputeSlots> compute_slots_;  // this rank's trainings (threads_)
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

}  // namespace seedling::simulator::internal
