#include "bench/finetune_bench.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <ostream>

#include "absl/strings/str_format.h"
#include "base/file.h"
#include "base/memory.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/init.h"
#include "model/llama.h"
#include "model/weights.h"

extern char** environ;

namespace seedling::bench {
namespace {

// Runs argv, returns its stdout; stderr goes to /dev/null. Internal error if it exits non-zero.
absl::StatusOr<std::string> RunChild(const std::vector<std::string>& args) {
  int pipefd[2];
  if (::pipe(pipefd) != 0) return absl::InternalError("pipe failed");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, pipefd[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, pipefd[0]);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(pipefd[1]);
  if (rc != 0) {
    ::close(pipefd[0]);
    return absl::InternalError(StrCat("cannot run ", args[0]));
  }
  std::string output;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(pipefd[0], buf, sizeof(buf))) > 0) output.append(buf, static_cast<size_t>(n));
  ::close(pipefd[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::string cmd;
    for (const std::string& a : args) cmd += a + " ";
    return absl::InternalError(StrCat("child failed: ", cmd));
  }
  return output;
}

}  // namespace

absl::StatusOr<std::vector<FinetuneBenchRow>> RunFinetuneBench(const FinetuneBenchOptions& o,
                                                               const std::string& seedling, std::ostream& out) {
  std::string work = o.work_dir;
  if (work.empty()) work = (std::filesystem::temp_directory_path() / StrCat("seedling_bench_", ::getpid())).string();
  SEEDLING_RETURN_IF_ERROR(MakeDirs(work));
  const std::string model_dir = JoinPath(work, o.preset);
  model::InitModelOptions init;
  init.preset = o.preset;
  init.seed = 1;
  init.overwrite = true;
  if (o.bf16) init.dtype = model::DType::kBF16;
  SEEDLING_RETURN_IF_ERROR(model::InitModel(model_dir, init));
  SEEDLING_ASSIGN_OR_RETURN(const model::WeightPrecision precision, model::ParseWeightPrecision(o.weights));
  if (precision == model::WeightPrecision::kQ8_0 || precision == model::WeightPrecision::kQ4_0) {
    model::LoadOptions load;
    load.precision = precision;
    SEEDLING_RETURN_IF_ERROR(model::LlamaModel::Load(model_dir, load).status());  // builds the weight cache
  }
  std::string data = o.data;
  if (data.empty()) {
    // The repository's sample, found from the binary's location (build/bin/seedling).
    data = (std::filesystem::path(seedling).parent_path() / ".." / ".." / "data" / "sample" / "instructions.jsonl")
               .lexically_normal()
               .string();
  }
  if (!FileExists(data)) return absl::NotFoundError(StrCat("no data file at '", data, "' (pass --data)"));

  struct Config {
    std::string name;
    std::string label;
    std::string method;
    std::vector<std::string> extra;
  };
  // One untimed warm-up step, then at least o.steps timed steps and o.seconds of timed work.
  const std::string steps = std::to_string(o.steps + 1);
  const std::string seconds = absl::StrFormat("%g", o.seconds);
  const std::string forward_seconds = absl::StrFormat("%g", std::max(o.seconds, 1e-3));  // at least one forward
  const std::vector<std::string> timing = {"--untimed-steps", "1", "--min-seconds", seconds};
  const std::vector<Config> configs = {
      {"inference",
       "inference (forward)",
       "mezo",
       {"--steps", "0", "--variant", "in-place-restore", "--forward-seconds", forward_seconds}},
      o.memory_budget.empty()
          ? Config{"lora-bp", "lora-bp (recompute every layer)", "lora-bp", {"--steps", steps, "--recompute", "on"}}
          : Config{"lora-bp",
                   StrCat("lora-bp (planned, budget ", o.memory_budget, ")"),
                   "lora-bp",
                   {"--steps", steps, "--memory-budget", o.memory_budget}},
      {"lora-bp-no-recompute",
       "lora-bp, no recompute, 1 CE chunk",
       "lora-bp",
       {"--steps", steps, "--recompute", "off", "--ce-chunk", std::to_string(o.seq_len)}},
      {"fwdgrad",
       absl::StrFormat("fwdgrad (batched JVP, K = %d)", o.perturbations),
       "fwdgrad",
       {"--steps", steps, "--perturbations", std::to_string(o.perturbations)}},
      {"mezo", "mezo (batched probes)", "mezo", {"--steps", steps}},
      {"mezo-in-place", "mezo (in-place probes)", "mezo", {"--steps", steps, "--variant", "in-place-restore"}},
      {"mezo-q4", "mezo, q = 4 batched probes", "mezo", {"--steps", steps, "--perturbations", "4"}},
      {"kseed", "kseed (batched probes)", "kseed", {"--steps", steps}},
      {"kseed-q4", "kseed, q = 4 batched probes", "kseed", {"--steps", steps, "--perturbations", "4"}},
      {"pepita", "pepita (2 forwards, outputs kept)", "pepita", {"--steps", steps, "--pepita-variant", "pepita"}},
      {"mempepita", "mempepita (3 forwards, recomputed)", "pepita", {"--steps", steps, "--pepita-variant", "mem"}},
  };
  out << absl::StrFormat("%s (%s file, --weights %s), sequence 1 x %d, %s\n", o.preset, o.bf16 ? "BF16" : "F32",
                         o.weights, o.seq_len, data);
  out << absl::StrFormat("%-36s %9s %6s %11s %11s %11s %11s %9s %13s %12s\n", "configuration", "tokens/s", "MFU",
                         "peak RSS", "anonymous", "file", "planned", "x infer.", "above infer.", "step tensors");
  out.flush();
  std::vector<FinetuneBenchRow> rows;
  int64_t inference_peak = 0;
  for (const Config& c : configs) {
    std::vector<std::string> args = {seedling,    "finetune",
                                     "--model",   model_dir,
                                     "--data",    data,
                                     "--seq-len", std::to_string(o.seq_len),
                                     "--batch",   "1",
                                     "--heldout", "0.02",
                                     "--out",     JoinPath(work, "out"),
                                     "--weights", o.weights};
    args.insert(args.end(), {"--method", c.method});
    args.insert(args.end(), c.extra.begin(), c.extra.end());
    if (c.name != "inference") args.insert(args.end(), timing.begin(), timing.end());
    SEEDLING_ASSIGN_OR_RETURN(std::string stdout_text, RunChild(args));
    nlohmann::json j;
    const size_t brace = stdout_text.find('{');
    try {
      if (brace == std::string::npos) throw std::runtime_error("no JSON");
      j = nlohmann::json::parse(std::string_view(stdout_text).substr(brace));
    } catch (const std::exception&) {
      return absl::InternalError(StrCat("unexpected output from ", c.name, ": ", stdout_text));
    }
    FinetuneBenchRow r;
    r.name = c.name;
    r.label = c.label;
    r.method = c.method;
    // The inference row trains nothing: its figure is plain forwards on the same training batches.
    r.tokens_per_second = j.value(c.name == "inference" ? "forward_tokens_per_second" : "tokens_per_second", 0.0);
    r.mfu = j.value(c.name == "inference" ? "forward_mfu" : "mfu", 0.0);
    r.peak_rss_bytes = j.value("peak_rss_bytes", int64_t{0});
    r.peak_rss_anon_bytes = j.value("peak_rss_anon_bytes", int64_t{0});
    r.peak_rss_file_bytes = j.value("peak_rss_file_bytes", int64_t{0});
    r.planned_peak_bytes = j.value("planned_peak_bytes", int64_t{0});
    r.plan = j.contains("plan") ? j["plan"].dump() : "";
    r.step_tensor_peak_bytes = j.value("step_tensor_peak_bytes", int64_t{0});
    if (rows.empty()) inference_peak = r.peak_rss_bytes;
    out << absl::StrFormat(
        "%-36s %9.0f %5.1f%% %11s %11s %11s %11s %8.2fx %13s %12s\n", r.label, r.tokens_per_second, 100.0 * r.mfu,
        FormatBytes(r.peak_rss_bytes), FormatBytes(r.peak_rss_anon_bytes), FormatBytes(r.peak_rss_file_bytes),
        FormatBytes(r.planned_peak_bytes),
        static_cast<double>(r.peak_rss_bytes) / static_cast<double>(std::max<int64_t>(inference_peak, 1)),
        FormatBytes(std::max<int64_t>(0, r.peak_rss_bytes - inference_peak)),
        rows.empty() ? std::string("-") : FormatBytes(r.step_tensor_peak_bytes));
    out.flush();
    rows.push_back(r);
  }
  if (o.work_dir.empty()) std::filesystem::remove_all(work);
  return rows;
}

}  // namespace seedling::bench
