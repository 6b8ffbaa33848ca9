// Causal grouped-query attention (model/kernels.h GroupedQueryAttention): one layer's forward without
// autograd (what inference, mezo and kseed run) and its forward plus backward under autograd (lora-bp),
// best of R repetitions, with GFLOP/s of the useful multiplies next to an sgemm figure from the same run.
//
//   seedling_bench_attention [--heads 9] [--kv-heads 3] [--seq 256] [--head-dim 64] [--reps 20]
//
// Defaults are SmolLM2-135M's attention at a training length of 256. Useful FLOPs count the causal
// lower triangle only: forward 2 multiplies (q kᵀ, p v), backward 5 (the rebuilt scores, dV, dP, dQ, dK),
// each 2 · Hq · T(T+1)/2 · D.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "model/kernels.h"
#include "model/runtime.h"

namespace {

struct Options {
  int64_t heads = 9, kv_heads = 3, seq = 256, head_dim = 64;
  int reps = 20;
};

bool ParseFlag(const char* name, int argc, char** argv, int& i, int64_t& out) {
  if (std::strcmp(argv[i], name) != 0 || i + 1 >= argc) return false;
  out = std::atoll(argv[++i]);
  return true;
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    int64_t reps = o.reps;
    if (ParseFlag("--heads", argc, argv, i, o.heads) || ParseFlag("--kv-heads", argc, argv, i, o.kv_heads) ||
        ParseFlag("--seq", argc, argv, i, o.seq) || ParseFlag("--head-dim", argc, argv, i, o.head_dim)) {
      continue;
    }
    if (ParseFlag("--reps", argc, argv, i, reps)) {
      o.reps = static_cast<int>(reps);
      continue;
    }
    std::fprintf(stderr, "usage: %s [--heads N] [--kv-heads N] [--seq N] [--head-dim N] [--reps N]\n", argv[0]);
    std::exit(2);
  }
  if (o.heads < 1 || o.kv_heads < 1 || o.heads % o.kv_heads != 0 || o.seq < 1 || o.head_dim < 1 || o.reps < 1 ||
      o.heads * o.seq * o.head_dim > (int64_t{1} << 28)) {
    std::fprintf(stderr, "bad sizes: heads must be a multiple of kv-heads, everything positive and not absurd\n");
    std::exit(2);
  }
  return o;
}

// Best-of-`reps` wall time of fn() in seconds, after one untimed call.
template <typename Fn>
double BestSeconds(int reps, Fn fn) {
  fn();
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  std::printf("%s\n", seedling::model::ConfigureCompute({}).c_str());
  const double sgemm = seedling::model::MeasureSgemmGflops(1024, 0.5);
  at::manual_seed(1);
  const at::Tensor q = at::randn({1, o.heads, o.seq, o.head_dim});
  const at::Tensor k = at::randn({1, o.kv_heads, o.seq, o.head_dim});
  const at::Tensor v = at::randn({1, o.kv_heads, o.seq, o.head_dim});
  const at::Tensor grad = at::randn({1, o.heads, o.seq, o.head_dim});
  const double multiply = 2.0 * static_cast<double>(o.heads) * static_cast<double>(o.seq * (o.seq + 1) / 2) *
                          static_cast<double>(o.head_dim);

  const double forward = BestSeconds(o.reps, [&] {
    at::NoGradGuard no_grad;
    seedling::model::GroupedQueryAttention(q, k, v, 0);
  });
  const double train = BestSeconds(o.reps, [&] {
    const at::Tensor qg = q.detach().requires_grad_(), kg = k.detach().requires_grad_(),
                     vg = v.detach().requires_grad_();
    const at::Tensor out = seedling::model::GroupedQueryAttention(qg, kg, vg, 0);
    torch::autograd::grad({out}, {qg, kg, vg}, {grad});
  });
  std::printf("attention: %lld heads (%lld KV), seq %lld, head dim %lld; sgemm 1024^3 %.0f GFLOP/s\n",
              static_cast<long long>(o.heads), static_cast<long long>(o.kv_heads), static_cast<long long>(o.seq),
              static_cast<long long>(o.head_dim), sgemm);
  std::printf("%-28s %10s %10s\n", "pass", "ms", "GFLOP/s");
  std::printf("%-28s %10.3f %10.1f\n", "forward (no autograd)", 1e3 * forward, 2 * multiply / forward / 1e9);
  std::printf("%-28s %10.3f %10.1f\n", "forward + backward", 1e3 * train, 7 * multiply / train / 1e9);
  return 0;
}
