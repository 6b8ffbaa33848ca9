// RunSimulation (simulator/simulation.h): each rank's part of a simulation, and rank 0's report. The pieces
// are in simulator/internal/: the shared world (world.h), one method's event loop (method_run.h), the
// devices' transports (sim_transport.h) and the MPI protocol (mpi_protocol.h).

#include "simulator/simulation.h"

#include <cmath>
#include <filesystem>

#include "base/file.h"
#include "base/memory.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/runtime.h"
#include "simulator/internal/method_run.h"
#include "simulator/internal/mpi_protocol.h"
#include "simulator/internal/world.h"

namespace seedling::simulator {

using internal::kQuit;
using internal::MethodRun;
using internal::WorkDir;
using internal::World;

namespace {

// A rank other than 0 that fails aborts the whole job (rank 0 would wait for it forever); rank 0 returns the
// error.
absl::Status AbortJobIfDeviceRank(MpiRanks* ranks, absl::Status status) {
  if (!status.ok() && ranks != nullptr && ranks->rank() > 0) ranks->Abort(std::string(status.message()));
  return status;
}

// Every rank: validates the options and builds the world in the work directory the ranks agree on.
absl::StatusOr<World> PrepareWorld(const SimulationOptions& options, MpiRanks* ranks) {
  SEEDLING_RETURN_IF_ERROR(AbortJobIfDeviceRank(ranks, options.Validate()));
  // Many devices train at once in this process: one BLAS thread each (model/runtime.h), which also makes
  // every device's arithmetic independent of the thread count.
  model::ConfigureCompute({1});
  absl::StatusOr<WorkDir> wd =
      ranks != nullptr ? internal::AgreeWorkDir(options, *ranks) : internal::RankZeroWorkDir(options);
  SEEDLING_RETURN_IF_ERROR(AbortJobIfDeviceRank(ranks, wd.status()));
  absl::StatusOr<World> made = internal::MakeWorld(options, ranks, *wd);
  SEEDLING_RETURN_IF_ERROR(AbortJobIfDeviceRank(ranks, made.status()));
  return made;
}

// A rank other than 0: serves its devices until rank 0 says quit, and returns an empty result.
SimulationResult RunAsDeviceRank(const World& world, MpiRanks& ranks) {
  absl::Status st = internal::RunDeviceRank(world);
  std::error_code ec;
  if (world.remove_work_dir) std::filesystem::remove_all(world.work_dir, ec);
  if (!st.ok()) ranks.Abort(std::string(st.message()));
  SimulationResult result;
  result.rank = ranks.rank();
  result.ranks = ranks.size();
  return result;
}

// The round log in `out_dir`, emptied: a simulation starts from scratch, so its log does too (RoundLog
// appends, for runs that resume).
absl::StatusOr<RoundLog> OpenFreshRoundLog(const std::string& out_dir) {
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(StrCat("cannot create ", out_dir, ": ", ec.message()));
  for (const char* name : {"rounds.jsonl", "rounds.csv"}) std::filesystem::remove(JoinPath(out_dir, name), ec);
  return RoundLog::Open(out_dir);
}

// The report's table of settings.
std::vector<std::pair<std::string, std::string>> ReportSettings(const SimulationOptions& options, const World& world,
                                                                int ranks) {
  std::string methods;
  for (const std::string& m : options.methods) methods += (methods.empty() ? "" : ", ") + m;
  std::vector<std::pair<std::string, std::string>> settings = {
      {"devices", StrCat(world.population->size(), " (+", options.heldout_devices, " held out for evaluation)")},
      {"methods", methods},
      {"rounds", StrCat(options.server.rounds)},
      {"clients per round",
       StrCat(options.server.clients_per_round, " (over-selection ×", options.server.over_selection, ")")},
      {"local steps × batch × seq_len",
       StrCat(options.server.steps, " × ", options.server.batch, " × ", options.server.seq_len)},
      {"round deadline", StrCat(options.server.round_deadline_s, " s")},
      {"LoRA", StrCat("rank ", options.server.lora_rank, ", alpha ", options.server.lora_alpha)},
      {"base weights", StrCat(model::WeightPrecisionName(options.server.weights), ": ", FormatBytes(world.weight_bytes),
                              " resident per device (one copy shared by the simulated devices)")},
      {"device runtime", StrCat(FormatBytes(world.device_runtime_bytes),
                                " planned per device besides its model and training (code, LibTorch, BLAS)")},
      {"seed", StrCat(options.seed)},
      {"bytes per idle device", StrCat(world.population->bytes_per_device())},
      {"simulated start (Unix s)", StrCat(static_cast<int64_t>(options.start_time_s))},
      {"transport", options.loopback ? "TLS 1.3 over loopback" : "in-memory"},
      {"MPI ranks", ranks == 1 ? std::string("1")
                               : StrCat(ranks, world.shared_work_dir
                                                   ? " (shared work directory: each activation on the least busy rank)"
                                                   : " (devices dealt round-robin: no shared work directory)")},
  };
  for (const std::string& label : options.methods) {
    if (options.method_settings.count(label) > 0)
      settings.push_back({StrCat("run ", label), options.DescribeRun(label)});
  }
  if (options.server.privacy.dp) {
    const server::PrivacyConfig& p = options.server.privacy;
    settings.push_back({"differential privacy", StrCat("clip ", p.clip_norm, ", noise multiplier ", p.noise_multiplier,
                                                       ", target ε ", p.target_epsilon, " at δ ", p.delta, ", noise ",
                                                       p.noise, p.noise == "seeded" ? " (simulation only)" : "")});
    if (p.dp_ftrl()) {
      settings.push_back(
          {"DP mechanism", StrCat("DP-FTRL (tree aggregation, zCDP): trees of ", p.tree_restart_rounds,
                                  " rounds, at most ", p.max_participations_per_tree, " per device and tree")});
    }
  }
  if (options.server.secagg.enabled) {
    const server::SecAggConfig& sa = options.server.secagg;
    settings.push_back(
        {"secure aggregation",
         StrCat("SecAgg+, ",
                sa.neighbors > 0            ? StrCat(sa.neighbors, " neighbours")
                : sa.neighbors_fraction > 0 ? StrCat("neighbours ", sa.neighbors_fraction, " of the cohort")
                                            : std::string("complete graph"),
                ", up to ", sa.max_dropout_fraction, " dropouts, Q = ", sa.quantization_levels, ", clipping ±",
                sa.clipping_range, ", max weight ", sa.max_weight, " (stochastic rounding seeded: simulation only)")});
  }
  return settings;
}

// How the rows were split across devices: a phrase for the report's opening paragraph.
std::string DescribePartition(const SimulationOptions& options) {
  if (options.data_path.empty()) return "one topic and one writing persona per device";
  const PartitionOptions& p = options.partition;
  switch (p.kind) {
    case PartitionKind::kIid:
      return "split IID (shuffled into equal shares)";
    case PartitionKind::kDirichlet:
      return StrCat("split by label with Dirichlet skew (alpha ", p.alpha, ")");
    case PartitionKind::kPowerLaw:
      return StrCat("split IID with power-law shard sizes (exponent ", p.exponent, ")");
    case PartitionKind::kUser:
      return "split one device per user";
  }
  return std::string(PartitionKindName(p.kind));
}

// The report's opening paragraph, before the methods' outcomes.
RunDescription DescribeRun(const SimulationOptions& options, const World& world) {
  RunDescription run;
  run.model = StrCat(world.model_config.architecture, " (", options.model_dir, ")");
  run.devices = world.population->size();
  run.heldout_devices = options.heldout_devices;
  run.rounds = options.server.rounds;
  run.clients_per_round = options.server.clients_per_round;
  run.data = options.data_path.empty() ? std::string("the built-in synthetic corpus") : options.data_path;
  run.partition = DescribePartition(options);
  if (world.partition_stats.labels > 0) run.label_tv_distance = world.partition_stats.mean_label_tv_distance;
  return run;
}

// report.html and summary.txt in out_dir, from the methods' results.
absl::Status WriteReports(const SimulationOptions& options, const World& world, SimulationResult& result,
                          ReportInput& report) {
  result.summary_table = SummaryTable(report.summaries);
  // The cost of each run to reach one held-out loss: the configured one, or the default rule's.
  const double target = options.target_loss > 0 ? options.target_loss : DefaultTargetLoss(report.summaries);
  if (std::isfinite(target)) {
    for (const MethodSummary& s : report.summaries) {
      result.targets.push_back(CostToTarget(s.method, target, report.rounds));
    }
    report.targets = result.targets;
    result.summary_table += "\n" + TargetTable(result.targets);
  }
  report.title = StrCat("Seedling simulation: ", world.population->size(), " phones, ", world.model_config.architecture,
                        " (", options.model_dir, ")");
  report.run = DescribeRun(options, world);
  report.settings = ReportSettings(options, world, result.ranks);
  report.population = world.population->ClassStatistics(options.start_time_s);
  report.notes = {StrCat("Data: ", result.partition_summary)};
  for (const MethodResult& r : result.methods) {
    if (r.client_errors > 0) {
      report.notes.push_back(StrCat(r.method, ": ", r.client_errors,
                                    " client runs failed for reasons other than "
                                    "simulated dropouts (see the log)"));
    }
  }
  result.report_path = JoinPath(options.out_dir, "report.html");
  SEEDLING_RETURN_IF_ERROR(WriteReport(result.report_path, report));
  SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(options.out_dir, "summary.txt"), result.summary_table));
  return absl::OkStatus();
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
  SEEDLING_ASSIGN_OR_RETURN(World world, PrepareWorld(options, ranks));
  if (ranks != nullptr && ranks->rank() > 0) return RunAsDeviceRank(world, *ranks);
  SEEDLING_ASSIGN_OR_RETURN(RoundLog log, OpenFreshRoundLog(options.out_dir));

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
    if (std::isfinite(r.initial_accuracy)) report.initial_accuracy[method] = r.initial_accuracy;
    report.summaries.push_back(r.summary);
    report.rounds.insert(report.rounds.end(), r.rounds.begin(), r.rounds.end());
    result.methods.push_back(std::move(r));
  }
  std::error_code ec;
  if (world.remove_work_dir) std::filesystem::remove_all(world.work_dir, ec);
  SEEDLING_RETURN_IF_ERROR(WriteReports(options, world, result, report));
  return result;
}

}  // namespace seedling::simulator
