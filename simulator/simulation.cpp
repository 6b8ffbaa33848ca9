// RunSimulation (simulator/simulation.h): each rank's part of a simulation, and rank 0's report. The pieces
// are in simulator/internal/: the shared world (world.h), one method's event loop (method_run.h), the
// devices' transports (sim_transport.h) and the MPI protocol (mpi_protocol.h).

#include "simulator/simulation.h"

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
  absl::StatusOr<WorkDir> wd =
      ranks != nullptr ? internal::AgreeWorkDir(options, *ranks) : internal::RankZeroWorkDir(options);
  if (!wd.ok() && ranks != nullptr && ranks->rank() > 0) ranks->Abort(std::string(wd.status().message()));
  SEEDLING_RETURN_IF_ERROR(wd.status());
  absl::StatusOr<World> made = internal::MakeWorld(options, ranks, *wd);
  if (!made.ok() && ranks != nullptr && ranks->rank() > 0) ranks->Abort(std::string(made.status().message()));
  SEEDLING_RETURN_IF_ERROR(made.status());
  World world = *std::move(made);
  if (ranks != nullptr && ranks->rank() > 0) {
    absl::Status st = internal::RunDeviceRank(world);
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
  report.title = StrCat("Seedling simulation: ", world.population->size(), " phones, ", world.model_config.architecture,
                        " (", options.model_dir, ")");
  std::string methods;
  for (const std::string& m : options.methods) methods += (methods.empty() ? "" : ", ") + m;
  report.settings = {
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
      {"bytes per idle device", StrCat(result.bytes_per_idle_device)},
      {"simulated start (Unix s)", StrCat(static_cast<int64_t>(options.start_time_s))},
      {"transport", options.loopback ? "TLS 1.3 over loopback" : "in-memory"},
      {"MPI ranks", result.ranks == 1
                        ? std::string("1")
                        : StrCat(result.ranks, world.shared_work_dir
                                                   ? " (shared work directory: each activation on the least busy rank)"
                                                   : " (devices dealt round-robin: no shared work directory)")},
  };
  if (options.server.privacy.dp) {
    const server::PrivacyConfig& p = options.server.privacy;
    report.settings.push_back(
        {"differential privacy",
         StrCat("clip ", p.clip_norm, ", noise multiplier ", p.noise_multiplier, ", target ε ", p.target_epsilon,
                " at δ ", p.delta, ", noise ", p.noise, p.noise == "seeded" ? " (simulation only)" : "")});
  }
  if (options.server.secagg.enabled) {
    const server::SecAggConfig& sa = options.server.secagg;
    report.settings.push_back(
        {"secure aggregation",
         StrCat("SecAgg+, ",
                sa.neighbors > 0            ? StrCat(sa.neighbors, " neighbours")
                : sa.neighbors_fraction > 0 ? StrCat("neighbours ", sa.neighbors_fraction, " of the cohort")
                                            : std::string("complete graph"),
                ", up to ", sa.max_dropout_fraction, " dropouts, Q = ", sa.quantization_levels, ", clipping ±",
                sa.clipping_range, ", max weight ", sa.max_weight, " (stochastic rounding seeded: simulation only)")});
  }
  report.notes = {StrCat("Population: ", result.population_summary), StrCat("Data: ", result.partition_summary)};
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
  return result;
}

}  // namespace seedling::simulator