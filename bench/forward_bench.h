#pragma once

// `seedling bench forward` / `seedling_bench_forward`: forward and forward+backward throughput of the
// decoder for model presets, next to an sgemm GFLOP/s figure measured in the same run (so the ratio says
// how close the engine gets to this CPU's matrix-multiply limit) and the peak RSS of each phase.

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace seedling::bench {

struct ForwardBenchOptions {
  std::vector<std::string> presets = {"tiny", "smollm2-135m"};
  int64_t seq_len = 256;      // tokens per sequence
  int64_t batch = 1;          // sequences per step
  double min_seconds = 3.0;   // time each phase for at least this long...
  int min_iters = 3;          // ...and at least this many iterations (after one warm-up)
  bool backward = true;       // also time forward+backward: all weights trainable, and frozen weights
                              // (activation gradients only, as with an adapter) with recompute off and on
  int64_t sgemm_size = 1024;  // square sgemm for the reference figure
};

struct ForwardBenchRow {
  std::string preset;
  int64_t parameters = 0;
  std::string phase;   // "forward", "fwd+bwd all weights", "fwd+bwd frozen", "fwd+bwd frozen, recompute"
  int64_t tokens = 0;  // per iteration
  double seconds = 0;  // per iteration
  double tokens_per_second = 0;
  double gflops = 0;        // model FLOPs per second (recomputation not counted as useful work)
  double sgemm_gflops = 0;  // in-run reference
  int64_t peak_rss_bytes = 0;
  int64_t peak_tensor_bytes = 0;  // high-water mark of tensor storage allocated during one step
};

// Runs the benchmark, printing a table to `out` as rows complete.
absl::StatusOr<std::vector<ForwardBenchRow>> RunForwardBench(const ForwardBenchOptions& options, std::ostream& out);

}  // namespace seedling::bench
