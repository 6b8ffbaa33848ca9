#include "bench/forward_bench.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <ostream>

#include "absl/strings/str_format.h"
#include "base/memory.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/memory_tracker.h"
#include "model/runtime.h"
#include "model/weights.h"

namespace seedling::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// FLOPs of one forward over `batch` sequences of `seq` tokens: 2 per multiply-add of every projection and
// the LM head, plus the attention score and value products (computed for the full T x T square).
double ForwardFlops(const model::ModelConfig& c, int64_t batch, int64_t seq) {
  const double h = static_cast<double>(c.hidden_size);
  const double per_layer = static_cast<double>(model::LayerMatrixParameters(c));
  const double matmul_params =
      static_cast<double>(c.num_hidden_layers) * per_layer + static_cast<double>(c.vocab_size) * h;
  const double tokens = static_cast<double>(batch * seq);
  const double attention = 4.0 * static_cast<double>(batch) * static_cast<double>(seq) * static_cast<double>(seq) *
                           static_cast<double>(c.q_dim()) * static_cast<double>(c.num_hidden_layers);
  return 2.0 * matmul_params * tokens + attention;
}

struct Timing {
  double seconds = 0;             // per step
  int64_t peak_tensor_bytes = 0;  // of the warm-up step
};

// Runs `step` once to warm up (tracking its tensor memory), then repeatedly for at least min_seconds /
// min_iters.
template <typename Fn>
absl::StatusOr<Timing> TimeIt(const ForwardBenchOptions& o, Fn step) {
  Timing timing;
  {
    model::TensorMemoryTracker tracker;
    SEEDLING_RETURN_IF_ERROR(step());
    timing.peak_tensor_bytes = tracker.peak_bytes();
  }
  int iters = 0;
  const auto t0 = Clock::now();
  while (iters < o.min_iters || Seconds(t0) < o.min_seconds) {
    SEEDLING_RETURN_IF_ERROR(step());
    ++iters;
  }
  timing.seconds = Seconds(t0) / iters;
  return timing;
}

}  // namespace

absl::StatusOr<std::vector<ForwardBenchRow>> RunForwardBench(const ForwardBenchOptions& o, std::ostream& out) {
  if (o.seq_len < 2 || o.batch < 1) return absl::InvalidArgumentError("need seq_len >= 2 and batch >= 1");
  std::vector<ForwardBenchRow> rows;
  out << absl::StrFormat("compute: %s\nsequence: %d x %d tokens\n", model::DescribeCompute(), o.batch, o.seq_len);
  const double sgemm = model::MeasureSgemmGflops(o.sgemm_size, 1.0);
  out << absl::StrFormat("sgemm %dx%dx%d fp32: %.1f GFLOP/s (in-run reference)\n", o.sgemm_size, o.sgemm_size,
                         o.sgemm_size, sgemm);
  out << absl::StrFormat("%-14s %-28s %10s %10s %9s %8s %10s %12s\n", "preset", "phase", "tokens/s", "ms/iter",
                         "GFLOP/s", "%sgemm", "peak RSS", "step tensors");
  out.flush();
  for (const std::string& preset : o.presets) {
    SEEDLING_ASSIGN_OR_RETURN(model::ModelConfig config, model::PresetConfig(preset));
    SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> m,
                              model::LlamaModel::Create(config, model::RandomWeights(config, 1)));
    const at::Tensor tokens = at::randint(0, config.vocab_size, {o.batch, o.seq_len}, at::kLong);
    const double fwd_flops = ForwardFlops(config, o.batch, o.seq_len);
    auto report = [&](const std::string& phase, const Timing& timing, double flops) {
      const double seconds = timing.seconds;
      ForwardBenchRow r;
      r.preset = preset;
      r.parameters = config.NumParameters();
      r.phase = phase;
      r.tokens = o.batch * o.seq_len;
      r.seconds = seconds;
      r.tokens_per_second = static_cast<double>(r.tokens) / seconds;
      r.gflops = flops / seconds / 1e9;
      r.sgemm_gflops = sgemm;
      r.peak_rss_bytes = PeakRssBytes();
      r.peak_tensor_bytes = timing.peak_tensor_bytes;
      out << absl::StrFormat("%-14s %-28s %10.0f %10.1f %9.1f %7.0f%% %10s %12s\n", preset, phase, r.tokens_per_second,
                             seconds * 1e3, r.gflops, 100.0 * r.gflops / sgemm, FormatBytes(r.peak_rss_bytes),
                             FormatBytes(r.peak_tensor_bytes));
      out.flush();
      rows.push_back(r);
    };

    ResetPeakRss();
    SEEDLING_ASSIGN_OR_RETURN(Timing fwd, TimeIt(o, [&]() -> absl::Status {
                                at::NoGradGuard no_grad;
                                return m->Logits(tokens).status();
                              }));
    report("forward", fwd, fwd_flops);

    if (!o.backward) continue;
    // Backward phases. "all weights": every weight trainable (3 forwards' worth of FLOPs: output, input
    // and weight gradients). "frozen": only layer 0's input norm trains, so backward computes activation
    // gradients through every layer but no weight gradients, as with an adapter (2 forwards' worth).
    struct Phase {
      const char* name;
      bool all_weights;
      bool recompute;
      double flops_factor;
    };
    const Phase phases[] = {{"fwd+bwd all weights", true, false, 3.0},
                            {"fwd+bwd frozen", false, false, 2.0},
                            {"fwd+bwd frozen, recompute", false, true, 2.0}};
    std::vector<model::NamedWeight> weights = model::NamedWeights(m->weights(), config);
    for (const Phase& phase : phases) {
      for (model::NamedWeight& w : weights) {
        w.tensor.requires_grad_(phase.all_weights || w.name == "model.layers.0.input_layernorm.weight");
      }
      ResetPeakRss();
      model::ForwardOptions fo;
      fo.recompute = phase.recompute;
      SEEDLING_ASSIGN_OR_RETURN(Timing fb, TimeIt(o, [&]() -> absl::Status {
                                  SEEDLING_ASSIGN_OR_RETURN(model::LossOutput loss, m->Loss(tokens, tokens, fo));
                                  loss.mean().backward();
                                  for (model::NamedWeight& w : weights)
                                    w.tensor.mutable_grad() = at::Tensor();  // freed inside the step
                                  return absl::OkStatus();
                                }));
      report(phase.name, fb, phase.flops_factor * fwd_flops);
    }
  }
  return rows;
}

}  // namespace seedling::bench
