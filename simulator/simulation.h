#pragma once

// The simulator (docs/architecture.md, "The simulator"): thousands of emulated phones running the real client SDK
// against the real coordinator over the in-memory transport, on a simulated clock.
//
// How time works. The coordinator reads a ManualClock that only the event loop moves. Each active device
// runs the real client::Client::RunOnce on its own thread, behind a transport that gives the device its own
// clock: a request leaves at the device's time, arrives half a round trip plus its bytes over the device's
// uplink later, and its response comes back over the downlink; after the task's last download the device
// spends the compute time of its training run (the run's FLOPs at the device's sustained GFLOP/s) before it
// can upload. Every request waits at a gate until the event loop grants it, and the loop grants events in
// simulated-time order (ties: ticks, then requests by device and sequence, then device wake-ups) and only
// when no running device could still produce an earlier one: a device that is training is known not to
// call before its compute time is over. So the coordinator sees exactly the sequence it would see in
// deployment, stragglers miss deadlines, and the result is the same for any number of host threads
// (training itself is deterministic per device and task).
//
// Idle devices cost a profile and a few words of scheduling state (RunResult reports the bytes); a device's
// adapter, checkpoints and data shard live in its state directory on disk, as on a phone.

#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "server/config.h"
#include "simulator/data.h"
#include "simulator/mpi.h"
#include "simulator/population.h"
#include "simulator/report.h"

namespace seedling::simulator {

// The simulator's defaults for rounds (a small model, phones polling every few minutes): 20 rounds of 10
// clients, 10 local steps at seq_len 64, LoRA rank 8 on q/v, retry-after 300 s ± 50%, a 60 s selection
// window and a 600 s deadline. Everything else as ServerConfig.
server::ServerConfig DefaultSimulationServerConfig();

// What differs between the runs of one comparison (sim.toml [methods.<label>]). A run is named by its label,
// which is a method's name or any other name with `method` set, so one report can compare variants of one
// method (fixed K against paced K, with and without a defence, ...).
// The attack model (sim.toml [attack], or [methods.<label>.attack] for one run): a share of the population's
// devices is hostile. They train honestly, then upload a transformed update instead of their own:
//   scale      update ← s · update          (s = scale, default 10: a boosted update)
//   sign-flip  update ← −s · update         (s = scale, default 1)
//   noise      update ← N(0, s²) per entry  (s = scale, default 0.01)
// The upload is rewritten on the simulated device's transport (simulator/internal/attack.h): the client SDK
// holds no attack code. Seed methods (kseed, fwdgrad pairs) have their scalars transformed the same way. For
// studies of [strategy] robust (docs/operations.md, "Robust aggregation").
struct AttackOptions {
  double fraction = 0;         // share of the population's devices that attack, in [0, 1]: round(fraction ·
                               // devices) of them, chosen by the simulation's seed; 0 = no attack
  std::string kind = "scale";  // scale, sign-flip, noise
  double scale = 0;            // the factor (scale, sign-flip) or the per-entry std (noise); 0 = the kind's default

  bool enabled() const { return fraction > 0; }
  double EffectiveScale() const;
  // "10% of devices, scale x10"; "" when off.
  std::string Describe() const;
  // InvalidArgument naming the key ("[attack] fraction: ...") for a value out of range.
  absl::Status Validate() const;
};

struct MethodSettings {
  std::string method;  // the run's method (lora-bp, fwdgrad, mezo, kseed, ...); "" = the label is the method
  std::string codec;   // "" = the method's default: int8 (lora-bp, mezo), fp16 (fwdgrad), seed-scalars (kseed)
  double lr = 0;       // client learning rate; 0 = the method's default (kseed: the strategy's kseed_lr)
  double epsilon = 0;  // perturbation scale; 0 = the method's default
  // server.toml sections ([methods.<label>.training], [methods.<label>.strategy], ...) as TOML text, applied
  // on top of the simulation's round settings for this run only; "" = none. [training] method is the run's
  // `method` and cannot be overridden here.
  std::string server_overrides;
  std::optional<AttackOptions> attack;  // [methods.<label>.attack]; nullopt = SimulationOptions::attack
};

struct SimulationOptions {
  std::string model_dir;            // required: the base model (Hugging Face directory or GGUF file)
  std::string out_dir = "sim-out";  // rounds.jsonl, rounds.csv, report.html, summary.txt (replaced)
  std::string work_dir;             // server and device state; "" = a fresh temporary directory
                                    // (in /dev/shm when available), removed at the end
  std::vector<std::string> methods = {"lora-bp", "kseed"};  // runs' labels, one after the other on the same
                                                            // population (a method's name, or a label with
                                                            // [methods.<label>] method set)
  uint64_t seed = 0;              // population, data, availability, dropouts and the server's seeds
  int threads = 0;                // devices training at once (per MPI rank); 0 = the hardware threads
  std::string phone_classes;      // CSV of phone classes; "" = data/phones/phone_classes.csv
  PopulationOptions population;   // devices (default 1,000), dropout, variation, availability
  std::string data_path;          // JSONL; "" = the built-in synthetic corpus
  PartitionOptions partition;     // how data_path is split across devices
  SyntheticCorpusOptions corpus;  // the built-in corpus (devices and seed are set from the above)
  int64_t heldout_devices = 50;   // devices whose data only evaluates the global model
  int64_t eval_examples = 256;    // at most this many held-out examples per evaluation
  // Share of the training devices' labelled rows (classification rows, "output" equal to the label) that keep
  // their output, in [0, 1]; the others are written as unlabelled rows ("output": null, no label field) for
  // pseudo-labelling ([training] pseudo_labels). Seeded per row. Held-out evaluation is unchanged. Default 1.
  double labelled_fraction = 1.0;
  AttackOptions attack;  // [attack]: hostile devices in every run (a run's [methods.<label>.attack] replaces it)
  server::ServerConfig server =
      DefaultSimulationServerConfig();  // round settings: rounds, clients_per_round, over_selection,
                                        // deadlines, steps, seq_len, lora, retry, weights (the shared base
                                        // model is loaded that way, and tasks carry it); state and model
                                        // dirs, method, codec and strategy are set per method
  std::string weight_cache_dir;         // q8_0 / q4_0 weight cache of the base model (built once, reused by
                                        // later runs); "" = <model_dir>/.seedling-cache
  int64_t device_runtime_bytes = -1;    // what each device's planner counts besides the model, data and
                                        // training (code, LibTorch, BLAS); -1 = measured in this process
                                        // before the shared model loads (sim.toml: device_runtime)
  std::map<std::string, MethodSettings> method_settings;  // by run label
  double start_time_s = 1767643200;                       // simulated start, Unix seconds: Mon 2026-01-05 20:00 UTC
  double tick_s = 1.0;                                    // how often the coordinator's Tick runs, simulated seconds
  double max_hours = 72;                                  // give up on a method after this much simulated time
  double plan_seconds = 0.05;                             // a device's planning and data loading before it syncs
  double radio_watts = 1.0;                               // power while transferring (energy accounting)
  // Held-out loss of the report's "cost to reach the target" table (rounds, device FLOPs, energy and simulated
  // hours each run spent to first reach it); 0 = DefaultTargetLoss (simulator/report.h): the largest final
  // loss among the runs that learned.
  double target_loss = 0;
  bool progress = true;                // a status line per round on stderr
  std::string mpi_placement = "auto";  // with MPI ranks: "auto" = each activation on the least busy rank
                                       // when every rank sees rank 0's work_dir (one machine or a shared
                                       // file system), else "static"; "static" = device d on rank d % R
  bool loopback = false;               // devices reach the coordinator through a real TLS server on
                                       // 127.0.0.1 (certificates made for the run) instead of the
                                       // in-memory transport: same rounds, bit for bit, slower

  absl::Status Validate() const;

  // The method of run `label`: its [methods.<label>] method, else the label itself.
  std::string MethodOf(const std::string& label) const;
  // The round settings of run `label`: `server` with the run's method, its default strategy (kseed,
  // fwdgrad; the fedavg family keeps [strategy] name), codec, lr and epsilon from [methods.<label>], fwdgrad's
  // schedule over `server.rounds`, the simulation's seed, then the run's server_overrides. InvalidArgument
  // ("[methods.<label>] ...") when they do not fit.
  absl::StatusOr<server::ServerConfig> RunServerConfig(const std::string& label) const;
  // One line for reports: "fwdgrad; lr 0.01; training.fwdgrad_pacing = true".
  std::string DescribeRun(const std::string& label) const;
  // The attack of run `label`: its [methods.<label>.attack], else `attack`.
  const AttackOptions& RunAttack(const std::string& label) const;
};

struct MethodResult {
  std::string method;             // the run's label (simulator/simulation.h MethodSettings)
  double initial_eval_loss = 0;   // held-out loss of the initial global model
  double initial_accuracy = NAN;  // held-out accuracy of the initial global model; NaN without labelled rows
  std::vector<RoundRecord> rounds;
  MethodSummary summary;
  int64_t client_errors = 0;  // RunOnce errors other than injected dropouts (should be 0)
};

struct SimulationResult {
  std::vector<MethodResult> methods;
  std::string summary_table;        // SummaryTable of the methods, then TargetTable of `targets`
  std::vector<TargetCost> targets;  // per run, the cost to reach the target loss (empty when there is none)
  std::string report_path;          // <out_dir>/report.html
  size_t bytes_per_idle_device = 0;
  std::string population_summary;
  std::string partition_summary;
  int rank = 0;  // this process's MPI rank; only rank 0 has results and writes files
  int ranks = 1;
};

// Parses sim.toml: a [simulation] table (keys: model, out, work_dir, methods, seed, threads, devices,
// heldout_devices, eval_examples, labelled_fraction, phone_classes, data, partition, alpha, exponent, rows_per_device,
// dropout_mean, variation, start_time, tick_s, max_hours, plan_seconds, radio_watts, target_loss, loopback,
// mpi_placement,
// device_runtime: "auto" or a size such as "180M"), optional
// [methods.<label>] tables (method, codec, lr, epsilon, and server.toml sections as sub-tables overriding the round
// settings for that run: [methods.<label>.strategy] ...), [model] weights (server.toml's key) and weight_cache_dir, and
// the round settings in server.toml's own sections ([training], [lora], [strategy], [retry], [privacy], [secagg];
// README) on top of DefaultSimulationServerConfig(). InvalidArgument names the unknown or bad key.
absl::StatusOr<SimulationOptions> ParseSimulationConfig(std::string_view toml_text);

// Runs every method and writes <out_dir>/rounds.jsonl, rounds.csv and report.html. Errors: InvalidArgument
// for bad options, NotFound for a missing model or data file; a method whose rounds cannot finish within
// max_hours is reported with the rounds it completed (its summary says so).
//
// With `ranks` (MPI, simulator/mpi.h) every rank calls this with the same options: rank 0 runs the hub and
// returns the results; the other ranks run their devices' clients and return an empty result (rank set)
// when rank 0 is done. A rank's work directory is <work_dir>/rank-<r> for r > 0.
absl::StatusOr<SimulationResult> RunSimulation(const SimulationOptions& options, MpiRanks* ranks = nullptr);

}  // namespace seedling::simulator
