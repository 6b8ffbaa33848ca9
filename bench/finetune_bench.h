#pragma once

// `seedling bench finetune`: one local training step configuration per child process (so each peak RSS is
// its own), on a random model of a preset written once: plain inference, lora-bp as planned, lora-bp
// without recomputation and with the cross-entropy in one chunk, fwdgrad, mezo, kseed, and the forward-only pepita
// and mempepita. Prints tokens/s,
// measured peak RSS (and its anonymous and file-backed parts), the planner's estimate and each peak relative
// to inference's. With q8_0 / q4_0 weights the weight cache is built before the first run, so no run pays
// for it.

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace seedling::bench {

struct FinetuneBenchOptions {
  std::string preset = "smollm2-135m";
  int64_t seq_len = 256;
  int64_t steps = 3;             // timed steps per method at least (fwdgrad: 1, it runs K perturbations per step),
                                 // after one untimed warm-up step
  double seconds = 10;           // and at least this much timed work per row
  int64_t perturbations = 4;     // fwdgrad K
  std::string work_dir;          // where the model and outputs go; empty = a temporary directory
  std::string data;              // JSONL; empty = data/sample/instructions.jsonl next to the repo's binary
  bool bf16 = false;             // write the model file in BF16 (as Hugging Face checkpoints are) instead of F32
  std::string weights = "fp32";  // --weights of every run: fp32, stored, q8_0 or q4_0
  std::string memory_budget;     // the lora-bp row's --memory-budget (the planner decides how many layers to
                                 // recompute); empty = recompute every layer (the lightest plan)
};

struct FinetuneBenchRow {
  std::string name;   // stable id: inference, lora-bp, lora-bp-no-recompute, fwdgrad, mezo, kseed
  std::string label;  // the table's description
  std::string method;
  double tokens_per_second = 0;  // processed tokens (prompts included), as `bench forward` counts
  double mfu = 0;                // model FLOP/s over the in-run sgemm GFLOP/s (client/compute_model.h)
  int64_t peak_rss_bytes = 0;
  int64_t peak_rss_anon_bytes = 0;  // anonymous (dirty) part, sampled
  int64_t peak_rss_file_bytes = 0;  // file-backed part (mapped weights, code), sampled
  int64_t planned_peak_bytes = 0;
  int64_t step_tensor_peak_bytes = 0;
  std::string plan;
};

// `seedling` is the path of the seedling binary to run the children with.
absl::StatusOr<std::vector<FinetuneBenchRow>> RunFinetuneBench(const FinetuneBenchOptions& options,
                                                               const std::string& seedling, std::ostream& out);

}  // namespace seedling::bench
