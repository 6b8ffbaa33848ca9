// simulate: a federation of emulated phones running the real client and server code (simulator/).

#include <cstdio>
#include <memory>

#include "apps/commands.h"
#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "simulator/simulation.h"

namespace seedling::apps {
namespace {

std::vector<std::string> SplitComma(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = std::min(s.find(',', start), s.size());
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

}  // namespace

void RegisterSimulateCommands(CLI::App& app, Action& action) {
  struct Flags {
    std::string config, model, data, out, methods, partition, work_dir, phones, mpi_placement;
    int64_t devices = -1, rounds = -1, clients_per_round = -1, steps = -1, seq_len = -1, deadline = -1;
    int64_t heldout_devices = -1;
    int threads = -1;
    double alpha = -1, dropout = -1;
    uint64_t seed = 0;
    bool seed_given = false;
    bool loopback = false;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand(
      "simulate", "Simulate a federation of phones running the real client and server code, with a report");
  cmd->add_option("--config", f->config, "sim.toml ([simulation], [methods.<name>], server.toml round sections)");
  cmd->add_option("--model", f->model, "Base model: a directory (e.g. from `seedling init-model`) or a GGUF file");
  cmd->add_option("--data", f->data, "JSONL data to split across devices (default: built-in synthetic corpus)");
  cmd->add_option("--out", f->out, "Output directory (default sim-out)");
  cmd->add_option(
      "--methods", f->methods,
      "Comma-separated runs: lora-bp,fwdgrad,mezo,kseed or labels of [methods.<label>] (default lora-bp,kseed)");
  cmd->add_option("--devices", f->devices, "Phones in the population (default 1000)");
  cmd->add_option("--heldout-devices", f->heldout_devices, "Extra devices whose data evaluates (default 50)");
  cmd->add_option("--rounds", f->rounds, "Rounds per method (default 20)");
  cmd->add_option("--clients-per-round", f->clients_per_round, "Reports wanted per round (default 10)");
  cmd->add_option("--steps", f->steps, "Local steps per task (default 10)");
  cmd->add_option("--seq-len", f->seq_len, "Tokens per sequence (default 64)");
  cmd->add_option("--deadline", f->deadline, "Round deadline in simulated seconds (default 600)");
  cmd->add_option("--partition", f->partition, "iid, dirichlet, power-law or user (with --data)");
  cmd->add_option("--alpha", f->alpha, "Dirichlet concentration (default 0.5)");
  cmd->add_option("--dropout", f->dropout, "Mean per-task dropout probability (default 0.05)");
  cmd->add_option("--threads", f->threads, "Devices training at once (default: hardware threads)");
  cmd->add_option("--phones", f->phones, "CSV of phone classes (default data/phones/phone_classes.csv)");
  cmd->add_option("--work-dir", f->work_dir, "Keep server and device state here (default: a temporary directory)");
  cmd->add_option(
      "--mpi-placement", f->mpi_placement,
      "Under mpirun: auto (least busy rank when the work dir is shared) or static (device d on rank d % R)");
  cmd->add_flag("--loopback", f->loopback,
                "Devices connect through a real TLS server on 127.0.0.1 (same results, slower; small N)");
  cmd->add_option("--seed", f->seed, "Seed of everything random (default 0)")->each([f](const std::string&) {
    f->seed_given = true;
  });
  cmd->callback([f, &action] {
    action = [f]() -> absl::Status {
      simulator::SimulationOptions o;
      if (!f->config.empty()) {
        SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(f->config));
        absl::StatusOr<simulator::SimulationOptions> parsed = simulator::ParseSimulationConfig(text);
        if (!parsed.ok()) return absl::InvalidArgumentError(StrCat(f->config, ": ", parsed.status().message()));
        o = *std::move(parsed);
      }
      if (!f->model.empty()) o.model_dir = f->model;
      if (!f->data.empty()) o.data_path = f->data;
      if (!f->out.empty()) o.out_dir = f->out;
      if (!f->work_dir.empty()) o.work_dir = f->work_dir;
      if (!f->phones.empty()) o.phone_classes = f->phones;
      if (!f->methods.empty()) o.methods = SplitComma(f->methods);
      if (f->devices >= 0) o.population.devices = f->devices;
      if (f->heldout_devices >= 0) o.heldout_devices = f->heldout_devices;
      if (f->rounds >= 0) o.server.rounds = f->rounds;
      if (f->clients_per_round >= 0) o.server.clients_per_round = f->clients_per_round;
      if (f->steps >= 0) o.server.steps = f->steps;
      if (f->seq_len >= 0) o.server.seq_len = f->seq_len;
      if (f->deadline >= 0) o.server.round_deadline_s = f->deadline;
      if (!f->partition.empty()) {
        SEEDLING_ASSIGN_OR_RETURN(o.partition.kind, simulator::ParsePartitionKind(f->partition));
      }
      if (f->alpha >= 0) o.partition.alpha = f->alpha;
      if (f->dropout >= 0) o.population.dropout_mean = f->dropout;
      if (f->threads >= 0) o.threads = f->threads;
      if (f->seed_given) o.seed = f->seed;
      if (f->loopback) o.loopback = true;
      if (!f->mpi_placement.empty()) o.mpi_placement = f->mpi_placement;
      if (o.model_dir.empty()) return absl::InvalidArgumentError("--model (or [simulation] model) is required");
      o.server.model_dir = o.model_dir;
      SEEDLING_RETURN_IF_ERROR(o.server.Validate());
      // Under mpirun with several ranks: rank 0 runs the hub and reports, the others run devices.
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<simulator::MpiRanks> ranks, simulator::MpiRanks::FromEnvironment());
      SEEDLING_ASSIGN_OR_RETURN(simulator::SimulationResult r, simulator::RunSimulation(o, ranks.get()));
      if (r.rank != 0) return absl::OkStatus();
      if (r.ranks > 1) std::printf("ranks: %d (devices dealt round-robin)\n", r.ranks);
      std::printf("%s\n", r.summary_table.c_str());
      for (const simulator::MethodResult& m : r.methods) {
        if (m.client_errors > 0) {
          std::printf("%s: %lld client runs failed for reasons other than simulated dropouts\n", m.method.c_str(),
                      static_cast<long long>(m.client_errors));
        }
      }
      std::printf("bytes per idle device: %zu\n", r.bytes_per_idle_device);
      std::printf("per-round metrics: %s/rounds.jsonl, %s/rounds.csv\n", o.out_dir.c_str(), o.out_dir.c_str());
      std::printf("report: %s\n", r.report_path.c_str());
      return absl::OkStatus();
    };
  });
}

}  // namespace seedling::apps
