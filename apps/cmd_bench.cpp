// bench forward.

#include <unistd.h>

#include <climits>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_split.h"
#include "apps/commands.h"
#include "base/status.h"
#include "bench/finetune_bench.h"
#include "bench/forward_bench.h"
#include "client/memory_planner.h"

namespace seedling::apps {

void RegisterFinetuneBench(CLI::App* bench, Action& action);

void RegisterBenchCommands(CLI::App& app, Action& action) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks that print their figures");
  bench->require_subcommand(1);
  auto options = std::make_shared<bench::ForwardBenchOptions>();
  auto json = std::make_shared<bool>(false);
  CLI::App* fwd =
      bench->add_subcommand("forward", "Forward and forward+backward tokens/s, GFLOP/s vs an in-run sgemm, peak RSS");
  fwd->add_option("--presets", options->presets, "Model presets to measure")->delimiter(',')->capture_default_str();
  fwd->add_option("--seq", options->seq_len, "Tokens per sequence")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 16));
  fwd->add_option("--batch", options->batch, "Sequences per step")->capture_default_str()->check(CLI::PositiveNumber);
  fwd->add_option("--min-seconds", options->min_seconds, "Time each phase at least this long")->capture_default_str();
  fwd->add_flag("!--no-backward", options->backward, "Skip the forward+backward phases");
  fwd->add_flag("--json", *json, "Also print one JSON line per row");
  RegisterFinetuneBench(bench, action);
  fwd->callback([options, json, &action] {
    action = [options, json]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(std::vector<bench::ForwardBenchRow> rows, bench::RunForwardBench(*options, std::cout));
      if (*json) {
        for (const auto& r : rows) {
          std::cout << nlohmann::json{{"preset", r.preset},
                                      {"parameters", r.parameters},
                                      {"phase", r.phase},
                                      {"tokens", r.tokens},
                                      {"seconds", r.seconds},
                                      {"tokens_per_second", r.tokens_per_second},
                                      {"gflops", r.gflops},
                                      {"sgemm_gflops", r.sgemm_gflops},
                                      {"peak_rss_bytes", r.peak_rss_bytes},
                                      {"peak_tensor_bytes", r.peak_tensor_bytes}}
                           .dump()
                    << "\n";
        }
      }
      return absl::OkStatus();
    };
  });
}

void RegisterFinetuneBench(CLI::App* bench, Action& action) {
  auto options = std::make_shared<bench::FinetuneBenchOptions>();
  CLI::App* cmd = bench->add_subcommand(
      "finetune", "Every local method in its own process: tokens/s, peak RSS, planned peak, vs plain inference");
  cmd->add_option("--preset", options->preset, "Model preset (a random model is written once)")->capture_default_str();
  cmd->add_option("--seq", options->seq_len, "Tokens per sequence")->capture_default_str();
  cmd->add_option("--steps", options->steps, "Timed steps per method at least (after one untimed warm-up step)")
      ->capture_default_str();
  cmd->add_option("--seconds", options->seconds, "Timed work per method at least")->capture_default_str();
  cmd->add_option("--perturbations", options->perturbations, "fwdgrad perturbations")->capture_default_str();
  cmd->add_option("--data", options->data, "JSONL data (default: data/sample/instructions.jsonl)");
  cmd->add_option("--work-dir", options->work_dir, "Keep the model and outputs here (default: a temporary directory)");
  cmd->add_flag("--bf16", options->bf16, "Write the model file in BF16 (default F32)");
  cmd->add_option("--weights", options->weights, "Frozen weights of every run: fp32, stored, q8_0 or q4_0")
      ->capture_default_str();
  cmd->add_option("--memory-budget", options->memory_budget,
                  "The lora-bp row's budget, e.g. 900M: the planner recomputes as few layers as fit (default: "
                  "recompute every layer)");
  auto json = std::make_shared<bool>(false);
  cmd->add_flag("--json", *json, "Also print one JSON line per row");
  cmd->callback([options, json, &action] {
    action = [options, json]() -> absl::Status {
      char exe[PATH_MAX];
      const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
      if (n <= 0) return absl::InternalError("cannot find the seedling binary");
      exe[n] = '\0';
      if (!options->memory_budget.empty()) {
        SEEDLING_RETURN_IF_ERROR(ParseByteSize(options->memory_budget).status());  // before any row runs
      }
      SEEDLING_ASSIGN_OR_RETURN(std::vector<bench::FinetuneBenchRow> rows,
                                bench::RunFinetuneBench(*options, exe, std::cout));
      if (*json) {
        for (const auto& r : rows) {
          std::cout << nlohmann::json{{"name", r.name},
                                      {"method", r.method},
                                      {"tokens_per_second", r.tokens_per_second},
                                      {"mfu", r.mfu},
                                      {"peak_rss_bytes", r.peak_rss_bytes},
                                      {"peak_rss_anon_bytes", r.peak_rss_anon_bytes},
                                      {"peak_rss_file_bytes", r.peak_rss_file_bytes},
                                      {"planned_peak_bytes", r.planned_peak_bytes},
                                      {"step_tensor_peak_bytes", r.step_tensor_peak_bytes},
                                      {"plan", r.plan.empty() ? nlohmann::json() : nlohmann::json::parse(r.plan)}}
                           .dump()
                    << "\n";
        }
      }
      return absl::OkStatus();
    };
  });
}

}  // namespace seedling::apps
