#include "model/kernels.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <numbers>
#include <optional>

#include "model/memory_tracker.h"

namespace seedling::model {
namespace {

// cap · tanh(z / cap), Gemma 2's soft-capping, as its modeling code writes it; z itself without a cap.
at::Tensor SoftCapRef(const at::Tensor& z, double cap) { return cap > 0 ? at::tanh(z / cap) * cap : z; }

// Naive cross-entropy of each row over full logits (with a bias, soft-capped), 0 on ignored rows.
at::Tensor FullCrossEntropyRows(const at::Tensor& h, const at::Tensor& w, const at::Tensor& targets,
                                double softcap = 0.0, const at::Tensor& bias = {}) {
  const at::Tensor z = at::matmul(h, w.t());
  const at::Tensor logits = SoftCapRef(bias.defined() ? z + bias : z, softcap);
  const at::Tensor logp = at::log_softmax(logits, 1);
  const at::Tensor valid = targets.ne(kIgnoreIndex);
  const at::Tensor picked = logp.gather(1, targets.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1);
  return -(picked * valid.to(h.scalar_type()));
}

// Their sum over the non-ignored rows.
at::Tensor FullCrossEntropySum(const at::Tensor& h, const at::Tensor& w, const at::Tensor& targets,
                               double softcap = 0.0, const at::Tensor& bias = {}) {
  return FullCrossEntropyRows(h, w, targets, softcap, bias).sum();
}

double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

TEST_CASE("Chunked cross-entropy equals full cross-entropy in loss and gradients", "[model][kernels]") {
  at::manual_seed(1);
  const int64_t n = 37, h = 16, v = 53;
  const at::Tensor hidden0 = at::randn({n, h});
  const at::Tensor weight0 = at::randn({v, h}) * 0.5;
  at::Tensor targets = at::randint(0, v, {n}, at::kLong);
  targets.index_put_({at::arange(0, n, 4)}, kIgnoreIndex);  // every 4th row ignored

  at::Tensor h_ref = hidden0.clone().requires_grad_(true);
  at::Tensor w_ref = weight0.clone().requires_grad_(true);
  const at::Tensor loss_ref = FullCrossEntropySum(h_ref, w_ref, targets);
  loss_ref.backward();

  for (int64_t chunk : {1, 5, 36, 37, 100}) {
    INFO("chunk " << chunk);
    at::Tensor hc = hidden0.clone().requires_grad_(true);
    at::Tensor wc = weight0.clone().requires_grad_(true);
    const at::Tensor loss = ChunkedCrossEntropy(hc, {wc}, targets, chunk);
    CHECK(std::abs(loss.item<double>() - loss_ref.item<double>()) < 1e-4 * std::abs(loss_ref.item<double>()));
    (loss * 3.0).backward();  // upstream gradient other than 1 must scale both gradients
    CHECK(MaxAbsDiff(hc.grad(), 3.0 * h_ref.grad()) < 1e-4);
    CHECK(MaxAbsDiff(wc.grad(), 3.0 * w_ref.grad()) < 1e-4);
  }
}

TEST_CASE("Chunked cross-entropy never allocates the whole (tokens x vocab) logits", "[model][kernels]") {
  at::manual_seed(9);
  const int64_t n = 512, h = 64, v = 4096, chunk = 32;
  const int64_t full_logits_bytes = n * v * 4;  // 8 MiB
  const at::Tensor targets = at::randint(0, v, {n}, at::kLong);
  at::Tensor hidden = at::randn({n, h}).requires_grad_(true);
  at::Tensor weight = at::randn({v, h}).requires_grad_(true);
  int64_t chunked_peak = 0, full_peak = 0;
  {
    TensorMemoryTracker tracker;
    ChunkedCrossEntropy(hidden, {weight}, targets, chunk).backward();
    chunked_peak = tracker.peak_bytes();
  }
  {
    TensorMemoryTracker tracker;  // control: the naive loss does hold the logits, so the tracker sees them
    FullCrossEntropySum(hidden, weight, targets).backward();
    full_peak = tracker.peak_bytes();
  }
  INFO("chunked peak " << chunked_peak << " B, full peak " << full_peak << " B");
  CHECK(full_peak >= full_logits_bytes);
  // Chunk logits and their softmax (2 x 512 KiB) plus the gradients (1 MiB + 128 KiB) and small change.
  CHECK(chunked_peak < full_logits_bytes / 2);
}

TEST_CASE("The hand-written cross-entropy JVP equals a float64 finite difference", "[model][kernels]") {
  at::manual_seed(10);
  const at::Tensor h = at::randn({13, 8}, at::kDouble);
  const at::Tensor dh = at::randn({13, 8}, at::kDouble);
  const at::Tensor w = at::randn({21, 8}, at::kDouble);
  at::Tensor targets = at::randint(0, 21, {13}, at::kLong);
  targets[4] = kIgnoreIndex;
  auto [loss, jvp] = ChunkedCrossEntropyJvp(h, dh, {w}, targets, 5);
  CHECK(std::abs(loss.item<double>() - FullCrossEntropySum(h, w, targets).item<double>()) < 1e-10);
  const double eps = 1e-6;
  const double fd = (FullCrossEntropySum(h + eps * dh, w, targets).item<double>() -
                     FullCrossEntropySum(h - eps * dh, w, targets).item<double>()) /
                    (2 * eps);
  CHECK(std::abs(jvp.item<double>() - fd) < 1e-6 * std::max(1.0, std::abs(fd)));
}

TEST_CASE("Chunked cross-entropy without autograd equals the autograd path", "[model][kernels]") {
  at::manual_seed(2);
  const at::Tensor hidden = at::randn({20, 8});
  const at::Tensor weight = at::randn({30, 8});
  const at::Tensor targets = at::randint(0, 30, {20}, at::kLong);
  at::Tensor with_grad = ChunkedCrossEntropy(hidden.clone().requires_grad_(true), {weight}, targets, 7);
  at::Tensor plain;
  {
    at::NoGradGuard no_grad;
    plain = ChunkedCrossEntropy(hidden, {weight}, targets, 7);
  }
  CHECK(std::abs(with_grad.item<double>() - plain.item<double>()) < 1e-5);
  CHECK(std::abs(plain.item<double>() - FullCrossEntropySum(hidden, weight, targets).item<double>()) < 1e-3);
}

TEST_CASE("Chunked cross-entropy accepts a bf16 weight and upcasts it", "[model][kernels]") {
  at::manual_seed(3);
  const at::Tensor hidden = at::randn({9, 8});
  const at::Tensor weight = at::randn({12, 8}).to(at::kBFloat16);
  const at::Tensor targets = at::randint(0, 12, {9}, at::kLong);
  at::Tensor h = hidden.clone().requires_grad_(true);
  const at::Tensor loss = ChunkedCrossEntropy(h, {weight}, targets, 4);
  const at::Tensor ref = FullCrossEntropySum(hidden, weight.to(at::kFloat), targets);
  CHECK(std::abs(loss.item<double>() - ref.item<double>()) < 1e-4);
  loss.backward();
  CHECK(h.grad().defined());
}

// Reference attention: K/V heads repeated explicitly, full causal mask.
at::Tensor RepeatedKvAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_start,
                               std::optional<int64_t> window, double softcap = 0.0) {
  const int64_t groups = q.size(1) / k.size(1);
  const at::Tensor kr = k.repeat_interleave(groups, 1);
  const at::Tensor vr = v.repeat_interleave(groups, 1);
  at::Tensor scores =
      SoftCapRef(at::matmul(q, kr.transpose(-1, -2)) / std::sqrt(static_cast<double>(q.size(3))), softcap);
  const int64_t t = q.size(2), s = k.size(2);
  at::Tensor mask = at::zeros({t, s});
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < s; ++j) {
      const int64_t pos = q_start + i;
      const bool allowed = j <= pos && (!window || j > pos - *window);
      if (!allowed) mask[i][j] = -std::numeric_limits<float>::infinity();
    }
  }
  return at::matmul(at::softmax(scores + mask, -1), vr);
}

TEST_CASE("Grouped-query attention equals attention with K/V heads repeated", "[model][kernels]") {
  at::manual_seed(4);
  const at::Tensor q = at::randn({2, 6, 5, 8});
  const at::Tensor k = at::randn({2, 2, 5, 8});
  const at::Tensor v = at::randn({2, 2, 5, 8});
  CHECK(MaxAbsDiff(GroupedQueryAttention(q, k, v, 0), RepeatedKvAttention(q, k, v, 0, std::nullopt)) < 1e-5);
}

TEST_CASE("Grouped-query attention handles a query offset and a sliding window", "[model][kernels]") {
  at::manual_seed(5);
  // Two new queries at positions 5 and 6 over 7 cached keys (the KV-cache decoding shape).
  const at::Tensor q = at::randn({1, 4, 2, 8});
  const at::Tensor k = at::randn({1, 1, 7, 8});
  const at::Tensor v = at::randn({1, 1, 7, 8});
  CHECK(MaxAbsDiff(GroupedQueryAttention(q, k, v, 5), RepeatedKvAttention(q, k, v, 5, std::nullopt)) < 1e-5);
  CHECK(MaxAbsDiff(GroupedQueryAttention(q, k, v, 5, 3), RepeatedKvAttention(q, k, v, 5, 3)) < 1e-5);
  // The window really changes the result.
  CHECK(MaxAbsDiff(GroupedQueryAttention(q, k, v, 5, 3), GroupedQueryAttention(q, k, v, 5)) > 1e-3);
}

TEST_CASE("Grouped-query attention's gradients, from rebuilt probabilities, equal autograd's", "[model][kernels]") {
  at::manual_seed(6);
  // float64, so the two differ only by rounding; a query offset with a sliding window covers the masks.
  struct Case {
    int64_t t, s, q_start;
    std::optional<int64_t> window;
  };
  // Short inputs run as one query block; the long ones in blocks of 64 queries (the last one partial),
  // each over the keys up to its last position.
  for (const Case& c : {Case{7, 7, 0, std::nullopt}, Case{7, 7, 0, 3}, Case{3, 9, 6, 4},
                        Case{150, 150, 0, std::nullopt}, Case{150, 150, 0, 40}, Case{70, 100, 30, std::nullopt}}) {
    INFO("t " << c.t << ", s " << c.s << ", q_start " << c.q_start);
    const auto opts = at::TensorOptions().dtype(at::kDouble);
    const at::Tensor q0 = at::randn({2, 6, c.t, 8}, opts), k0 = at::randn({2, 2, c.s, 8}, opts);
    const at::Tensor v0 = at::randn({2, 2, c.s, 8}, opts), upstream = at::randn({2, 6, c.t, 8}, opts);
    auto grads = [&](bool reference) {
      const at::Tensor q = q0.clone().requires_grad_(true), k = k0.clone().requires_grad_(true);
      const at::Tensor v = v0.clone().requires_grad_(true);
      const at::Tensor out = reference ? RepeatedKvAttention(q, k, v, c.q_start, c.window)
                                       : GroupedQueryAttention(q, k, v, c.q_start, c.window);
      return torch::autograd::grad({(out * upstream).sum()}, {q, k, v});
    };
    // The inference path (no autograd: q0, k0, v0 do not require grad) blocks queries too.
    CHECK(MaxAbsDiff(GroupedQueryAttention(q0, k0, v0, c.q_start, c.window),
                     RepeatedKvAttention(q0, k0, v0, c.q_start, c.window)) < 1e-12);
    const auto got = grads(false), want = grads(true);
    for (size_t i = 0; i < 3; ++i) {
      INFO("gradient " << i);
      CHECK(want[i].abs().max().item<double>() > 1e-3);
      CHECK(MaxAbsDiff(got[i], want[i]) < 1e-10);
    }
  }
}

TEST_CASE("RmsNorm's and SwiGLU's lean backward equal autograd through the plain expressions", "[model][kernels]") {
  at::manual_seed(7);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x0 = at::randn({2, 5, 12}, opts), w0 = at::randn({12}, opts), dy = at::randn({2, 5, 12}, opts);
  SECTION("RmsNorm, with and without a trained weight") {
    for (bool train_weight : {false, true}) {
      INFO("weight trained: " << train_weight);
      auto grads = [&](bool reference) {
        const at::Tensor x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(train_weight);
        const at::Tensor y = reference ? x * at::rsqrt(x.pow(2).mean({-1}, true) + 1e-5) * w : RmsNorm(x, w, 1e-5);
        std::vector<at::Tensor> wrt = {x};
        if (train_weight) wrt.push_back(w);
        return torch::autograd::grad({(y * dy).sum()}, wrt);
      };
      const auto got = grads(false), want = grads(true);
      REQUIRE(got.size() == want.size());
      for (size_t i = 0; i < got.size(); ++i) CHECK(MaxAbsDiff(got[i], want[i]) < 1e-12);
    }
  }
  SECTION("SwiGLU") {
    const at::Tensor g0 = at::randn({2, 5, 12}, opts) * 3, u0 = at::randn({2, 5, 12}, opts);
    auto grads = [&](bool reference) {
      const at::Tensor g = g0.clone().requires_grad_(true), u = u0.clone().requires_grad_(true);
      const at::Tensor y = reference ? g * at::sigmoid(g) * u : SwiGlu(g, u);
      return torch::autograd::grad({(y * dy).sum()}, {g, u});
    };
    const auto got = grads(false), want = grads(true);
    for (size_t i = 0; i < 2; ++i) CHECK(MaxAbsDiff(got[i], want[i]) < 1e-12);
  }
}

TEST_CASE("RoPE rotates each pair (i, i + D/2) by position times frequency", "[model][kernels]") {
  ModelConfig c;
  c.head_dim = 8;
  c.rope_theta = 10000.0;
  const at::Tensor inv = RopeInverseFrequencies(c);
  const RopeTables rope = MakeRopeTables(inv, 3, 2);  // positions 3 and 4
  at::manual_seed(6);
  const at::Tensor x = at::randn({1, 1, 2, 8});
  const at::Tensor y = ApplyRope(x, rope);
  for (int t = 0; t < 2; ++t) {
    for (int i = 0; i < 4; ++i) {
      const double angle = (3 + t) / std::pow(10000.0, 2.0 * i / 8.0);
      const double a = x[0][0][t][i].item<double>(), b = x[0][0][t][i + 4].item<double>();
      CHECK(std::abs(y[0][0][t][i].item<double>() - (a * std::cos(angle) - b * std::sin(angle))) < 1e-5);
      CHECK(std::abs(y[0][0][t][i + 4].item<double>() - (b * std::cos(angle) + a * std::sin(angle))) < 1e-5);
    }
  }
}

TEST_CASE("RoPE's backward rotates the gradient back, as autograd through the plain expression does",
          "[model][kernels]") {
  ModelConfig c;
  c.head_dim = 8;
  const RopeTables rope = MakeRopeTables(RopeInverseFrequencies(c), 2, 5);  // positions 2..6, fp64
  at::manual_seed(8);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  // (B, T, heads, D) viewed as (B, heads, T, D), the strided layout the decoder hands over.
  const at::Tensor x0 = at::randn({2, 5, 3, 8}, opts).transpose(1, 2), dy = at::randn({2, 3, 5, 8}, opts);
  auto plain = [&](const at::Tensor& x) {
    const at::Tensor x1 = x.narrow(-1, 0, 4), x2 = x.narrow(-1, 4, 4);
    return at::cat({x1 * rope.cos - x2 * rope.sin, x2 * rope.cos + x1 * rope.sin}, -1);
  };
  const at::Tensor x = x0.clone().requires_grad_(true), x_ref = x0.clone().requires_grad_(true);
  const at::Tensor y = ApplyRope(x, rope), y_ref = plain(x_ref);
  CHECK(MaxAbsDiff(y, y_ref) < 1e-12);
  const at::Tensor got = torch::autograd::grad({(y * dy).sum()}, {x})[0];
  const at::Tensor want = torch::autograd::grad({(y_ref * dy).sum()}, {x_ref})[0];
  CHECK(MaxAbsDiff(got, want) < 1e-12);
  CHECK(MaxAbsDiff(got, dy) > 0.1);  // the rotation is not the identity at these positions
  at::NoGradGuard no_grad;
  CHECK(MaxAbsDiff(ApplyRope(x0, rope), plain(x0)) < 1e-12);
}

TEST_CASE("RoPE scaling: linear divides every frequency, llama3 only the long wavelengths", "[model][kernels]") {
  ModelConfig c;
  c.head_dim = 64;
  c.rope_theta = 500000.0;
  const at::Tensor base = RopeInverseFrequencies(c);
  c.rope_scaling.type = RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 4.0;
  CHECK(MaxAbsDiff(RopeInverseFrequencies(c), base / 4.0) < 1e-15);

  c.rope_scaling = RopeScaling{RopeScaling::Type::kLlama3, 8.0, 1.0, 4.0, 8192};
  const at::Tensor scaled = RopeInverseFrequencies(c);
  const double high_wavelen = 8192.0 / 4.0, low_wavelen = 8192.0 / 1.0;
  int kept = 0, divided = 0, blended = 0;
  for (int64_t i = 0; i < 32; ++i) {
    const double f = base[i].item<double>(), g = scaled[i].item<double>();
    const double wavelen = 2 * M_PI / f;
    if (wavelen < high_wavelen) {
      CHECK(g == f);
      ++kept;
    } else if (wavelen > low_wavelen) {
      CHECK(std::abs(g - f / 8.0) < 1e-15);
      ++divided;
    } else {
      CHECK(g < f);
      CHECK(g > f / 8.0);
      ++blended;
    }
  }
  CHECK(kept > 0);
  CHECK(divided > 0);
  CHECK(blended > 0);
}

TEST_CASE("Checkpoint gives the same gradients as plain autograd", "[model][kernels]") {
  at::manual_seed(7);
  const at::Tensor x0 = at::randn({4, 6});
  const at::Tensor w0 = at::randn({6, 6});
  const at::Tensor frozen = at::randn({6});
  auto f = [&](const at::Tensor& x, const at::Tensor& w) { return at::tanh(at::matmul(x, w) + frozen) * x; };

  at::Tensor x1 = x0.clone().requires_grad_(true), w1 = w0.clone().requires_grad_(true);
  (f(x1 * 2.0, w1).pow(2).sum()).backward();

  at::Tensor x2 = x0.clone().requires_grad_(true), w2 = w0.clone().requires_grad_(true);
  const at::Tensor inner = x2 * 2.0;
  at::Tensor y = Checkpoint([&](const at::Tensor& in) { return f(in, w2); }, inner, {w2});
  CHECK_FALSE(y.grad_fn() == nullptr);
  y.pow(2).sum().backward();
  CHECK(MaxAbsDiff(x1.grad(), x2.grad()) < 1e-5);
  CHECK(MaxAbsDiff(w1.grad(), w2.grad()) < 1e-5);
}

TEST_CASE("RmsNorm normalizes by the root mean square", "[model][kernels]") {
  const at::Tensor x = at::tensor({3.0f, 4.0f}).view({1, 2});
  const at::Tensor w = at::tensor({1.0f, 2.0f});
  const at::Tensor y = RmsNorm(x, w, 0.0);
  const double rms = std::sqrt((9.0 + 16.0) / 2.0);
  CHECK(std::abs(y[0][0].item<double>() - 3.0 / rms) < 1e-6);
  CHECK(std::abs(y[0][1].item<double>() - 2.0 * 4.0 / rms) < 1e-6);
}

// The stacked-tangent rules against LibTorch's own forward-mode AD: for each direction i, the inputs
// become dual tensors (slice 0, slice i) and the output's tangent is unpacked. Float64, so the two
// computations agree to rounding (1e-10 relative), far below any error in a rule (a dropped term is O(1)).
at::Tensor DualReference(const std::function<at::Tensor(const std::vector<at::Tensor>&)>& fn,
                         const std::vector<at::Tensor>& stacked) {
  const int64_t slices = stacked[0].size(0);
  std::vector<at::Tensor> primal;
  for (const at::Tensor& s : stacked) primal.push_back(s.select(0, 0));
  std::vector<at::Tensor> out = {fn(primal)};
  for (int64_t i = 1; i < slices; ++i) {
    const uint64_t level = torch::autograd::ForwardADLevel::get_next_idx();
    std::vector<at::Tensor> duals;
    for (const at::Tensor& s : stacked) {
      duals.push_back(at::_make_dual(s.select(0, 0), s.select(0, i), static_cast<int64_t>(level)));
    }
    out.push_back(std::get<1>(at::_unpack_dual(fn(duals), static_cast<int64_t>(level))).clone());
    torch::autograd::ForwardADLevel::release_idx(level);
  }
  return at::stack(out, 0);
}

void CheckTangents(const at::Tensor& got, const at::Tensor& want) {
  REQUIRE(got.sizes() == want.sizes());
  const double scale = want.abs().max().item<double>();
  INFO("max |difference| " << MaxAbsDiff(got, want) << " at scale " << scale);
  CHECK(scale > 1e-3);
  CHECK(MaxAbsDiff(got, want) <= 1e-10 * scale);
}

TEST_CASE("Stacked-tangent RmsNorm and SwiGLU equal LibTorch's forward-mode AD", "[model][kernels][tangents]") {
  at::manual_seed(4);
  const at::Tensor x = at::randn({4, 2, 5, 16}, at::kDouble);  // primal + 3 directions
  const at::Tensor w = at::randn({16}, at::kDouble);
  CheckTangents(RmsNormTangents(x, w, 1e-5),
                DualReference([&](const std::vector<at::Tensor>& in) { return RmsNorm(in[0], w, 1e-5); }, {x}));
  CHECK(MaxAbsDiff(RmsNormTangents(x, w, 1e-5).select(0, 0), RmsNorm(x.select(0, 0), w, 1e-5)) == 0.0);
  const at::Tensor gate = at::randn({4, 7, 24}, at::kDouble), up = at::randn({4, 7, 24}, at::kDouble);
  CheckTangents(SwiGluTangents(gate, up),
                DualReference([](const std::vector<at::Tensor>& in) { return at::silu(in[0]) * in[1]; }, {gate, up}));
}

// LayerNorm written out: (x − mean) / sqrt(var + eps) · w + b with the biased variance.
at::Tensor PlainLayerNorm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps) {
  const at::Tensor centered = x - x.mean({-1}, /*keepdim=*/true);
  return centered / at::sqrt(centered.pow(2).mean({-1}, /*keepdim=*/true) + eps) * w + b;
}

TEST_CASE("LayerNorm equals the written-out formula, and its stacked tangents LibTorch's forward-mode AD",
          "[model][kernels][tangents]") {
  at::manual_seed(6);
  const at::Tensor x = at::randn({4, 2, 5, 16}, at::kDouble) * 3 + 1;  // primal + 3 directions
  const at::Tensor w = at::randn({16}, at::kDouble), b = at::randn({16}, at::kDouble);
  CHECK(MaxAbsDiff(LayerNorm(x, w, b, 1e-5), PlainLayerNorm(x, w, b, 1e-5)) < 1e-12);
  CHECK(MaxAbsDiff(Norm(NormKind::kLayerNorm, x, w, b, 1e-5), LayerNorm(x, w, b, 1e-5)) == 0.0);
  CHECK(MaxAbsDiff(Norm(NormKind::kRms, x, w, b, 1e-5), RmsNorm(x, w, 1e-5)) == 0.0);  // RMSNorm has no bias
  const at::Tensor got = LayerNormTangents(x, w, b, 1e-5);
  CheckTangents(
      got, DualReference([&](const std::vector<at::Tensor>& in) { return PlainLayerNorm(in[0], w, b, 1e-5); }, {x}));
  CHECK(MaxAbsDiff(got.select(0, 0), LayerNorm(x.select(0, 0), w, b, 1e-5)) == 0.0);
}

TEST_CASE("The plain MLP's activations and their stacked tangents equal the written-out functions",
          "[model][kernels][tangents]") {
  at::manual_seed(7);
  const at::Tensor x = at::randn({3, 7, 24}, at::kDouble) * 2;
  const auto gelu = [](const at::Tensor& v) { return 0.5 * v * (1 + at::erf(v / std::sqrt(2.0))); };
  const auto gelu_tanh = [](const at::Tensor& v) {
    return 0.5 * v * (1 + at::tanh(std::sqrt(2.0 / std::numbers::pi) * (v + 0.044715 * v.pow(3))));
  };
  const auto relu = [](const at::Tensor& v) { return at::where(v > 0, v, at::zeros_like(v)); };
  const std::vector<std::pair<MlpActivation, std::function<at::Tensor(const at::Tensor&)>>> cases = {
      {MlpActivation::kGelu, gelu}, {MlpActivation::kGeluTanh, gelu_tanh}, {MlpActivation::kRelu, relu}};
  for (const auto& [activation, plain] : cases) {
    INFO("activation " << static_cast<int>(activation));
    CHECK(MaxAbsDiff(Activation(x, activation), plain(x)) < 1e-12);
    CheckTangents(ActivationTangents(x, activation),
                  DualReference([&](const std::vector<at::Tensor>& in) { return plain(in[0]); }, {x}));
    // Gated, as a GeGLU-style MLP with this activation would use it.
    const at::Tensor up = at::randn({3, 7, 24}, at::kDouble);
    CHECK(MaxAbsDiff(GatedActivation(x, up, activation), plain(x) * up) < 1e-12);
    CheckTangents(GatedActivationTangents(x, up, activation),
                  DualReference([&](const std::vector<at::Tensor>& in) { return plain(in[0]) * in[1]; }, {x, up}));
  }
}

TEST_CASE("Partial RoPE rotates the first dimensions of each head and passes the rest through", "[model][kernels]") {
  at::manual_seed(8);
  const at::Tensor x = at::randn({2, 3, 5, 16});
  const at::Tensor inv_freq = at::tensor({1.0, 0.1}, at::kDouble);  // 4 of 16 dimensions rotated
  const RopeTables rope = MakeRopeTables(inv_freq, 2, 5);
  const at::Tensor out = ApplyRope(x, rope);
  CHECK(MaxAbsDiff(out.narrow(-1, 4, 12), x.narrow(-1, 4, 12)) == 0.0);
  CHECK(MaxAbsDiff(out.narrow(-1, 0, 4), ApplyRope(x.narrow(-1, 0, 4).contiguous(), rope)) == 0.0);
  CHECK(MaxAbsDiff(out.narrow(-1, 0, 4), x.narrow(-1, 0, 4)) > 0.1);  // the first four do turn
}

TEST_CASE("Stacked-tangent attention equals LibTorch's forward-mode AD, with GQA and a sliding window",
          "[model][kernels][tangents]") {
  at::manual_seed(5);
  const at::Tensor q = at::randn({4, 2, 6, 9, 8}, at::kDouble);  // (1+K, B, Hq, T, D)
  const at::Tensor k = at::randn({4, 2, 3, 9, 8}, at::kDouble);  // (1+K, B, Hkv, T, D)
  const at::Tensor v = at::randn({4, 2, 3, 9, 8}, at::kDouble);
  for (std::optional<int64_t> window : {std::optional<int64_t>(), std::optional<int64_t>(4)}) {
    INFO("sliding window " << (window ? *window : 0));
    const at::Tensor got = GroupedQueryAttentionTangents(q, k, v, window);
    CheckTangents(got, DualReference(
                           [&](const std::vector<at::Tensor>& in) {
                             return GroupedQueryAttention(in[0], in[1], in[2], 0, window);
                           },
                           {q, k, v}));
    CHECK(MaxAbsDiff(got.select(0, 0),
                     GroupedQueryAttention(q.select(0, 0), k.select(0, 0), v.select(0, 0), 0, window)) == 0.0);
  }
}

TEST_CASE("Cross-entropy with its hidden-state gradient equals autograd's", "[model][kernels]") {
  at::manual_seed(6);
  const at::Tensor hidden = at::randn({21, 16}, at::kDouble);
  const at::Tensor weight = at::randn({40, 16}, at::kDouble);
  at::Tensor targets = at::randint(0, 40, {21}, at::kLong);
  targets.index_put_({at::arange(0, 21, 5)}, kIgnoreIndex);
  at::Tensor h = hidden.clone().requires_grad_(true);
  const at::Tensor ref = FullCrossEntropySum(h, weight, targets);
  ref.backward();
  for (int64_t chunk : {0, 4}) {
    auto [loss, grad] = ChunkedCrossEntropyWithGrad(hidden, {weight}, targets, chunk);
    CHECK(std::abs(loss.item<double>() - ref.item<double>()) < 1e-10 * std::abs(ref.item<double>()));
    CHECK(MaxAbsDiff(grad, h.grad()) < 1e-12);
    CHECK(grad.index({at::arange(0, 21, 5)}).abs().max().item<double>() == 0.0);  // ignored rows
  }
}

TEST_CASE("Soft-capped attention equals the capped reference in values, gradients and tangents",
          "[model][kernels][softcap]") {
  at::manual_seed(11);
  const double cap = 1.5;  // the scores of unit-variance q and k reach past it, so tanh bends them
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  struct Case {
    int64_t t, s, q_start;
    std::optional<int64_t> window;
  };
  // One query block, a cache offset with a window, and the blocked path (150 queries in blocks of 64).
  for (const Case& c : {Case{7, 7, 0, std::nullopt}, Case{3, 9, 6, 4}, Case{150, 150, 0, 40}}) {
    INFO("t " << c.t << ", s " << c.s << ", q_start " << c.q_start);
    const at::Tensor q0 = at::randn({2, 6, c.t, 8}, opts), k0 = at::randn({2, 2, c.s, 8}, opts);
    const at::Tensor v0 = at::randn({2, 2, c.s, 8}, opts), upstream = at::randn({2, 6, c.t, 8}, opts);
    const at::Tensor plain = GroupedQueryAttention(q0, k0, v0, c.q_start, c.window, cap);
    CHECK(MaxAbsDiff(plain, RepeatedKvAttention(q0, k0, v0, c.q_start, c.window, cap)) < 1e-12);
    CHECK(MaxAbsDiff(plain, GroupedQueryAttention(q0, k0, v0, c.q_start, c.window)) > 1e-2);  // the cap bites
    auto grads = [&](bool reference) {
      const at::Tensor q = q0.clone().requires_grad_(true), k = k0.clone().requires_grad_(true);
      const at::Tensor v = v0.clone().requires_grad_(true);
      const at::Tensor out = reference ? RepeatedKvAttention(q, k, v, c.q_start, c.window, cap)
                                       : GroupedQueryAttention(q, k, v, c.q_start, c.window, cap);
      return torch::autograd::grad({(out * upstream).sum()}, {q, k, v});
    };
    const auto got = grads(false), want = grads(true);
    for (size_t i = 0; i < 3; ++i) {
      INFO("gradient " << i);
      CHECK(want[i].abs().max().item<double>() > 1e-3);
      CHECK(MaxAbsDiff(got[i], want[i]) < 1e-10);
    }
  }
  const at::Tensor q = at::randn({4, 2, 6, 9, 8}, opts);  // (1+K, B, Hq, T, D)
  const at::Tensor k = at::randn({4, 2, 3, 9, 8}, opts);
  const at::Tensor v = at::randn({4, 2, 3, 9, 8}, opts);
  const at::Tensor got = GroupedQueryAttentionTangents(q, k, v, 4, cap);
  CheckTangents(
      got, DualReference(
               [&](const std::vector<at::Tensor>& in) { return RepeatedKvAttention(in[0], in[1], in[2], 0, 4, cap); },
               {q, k, v}));
}

TEST_CASE("A soft-capped or biased LM head's cross-entropy equals the reference in loss, gradients and derivatives",
          "[model][kernels][softcap]") {
  at::manual_seed(12);
  const at::Tensor hidden = at::randn({19, 8}, at::kDouble);
  const at::Tensor weight = at::randn({33, 8}, at::kDouble) * 0.7;
  const at::Tensor logit_bias = at::randn({33}, at::kDouble) * 3.0;
  at::Tensor targets = at::randint(0, 33, {19}, at::kLong);
  targets.index_put_({at::arange(0, 19, 6)}, kIgnoreIndex);
  struct Case {
    double cap;  // logits of N(0, 4) reach past a cap of 2
    bool bias;   // Phi's lm_head.bias
  };
  for (const Case& head : {Case{2.0, false}, Case{0.0, true}, Case{2.0, true}}) {
    const at::Tensor b = head.bias ? logit_bias : at::Tensor();
    at::Tensor h_ref = hidden.clone().requires_grad_(true), w_ref = weight.clone().requires_grad_(true);
    at::Tensor b_ref = head.bias ? logit_bias.clone().requires_grad_(true) : at::Tensor();
    const at::Tensor ref = FullCrossEntropySum(h_ref, w_ref, targets, head.cap, b_ref);
    ref.backward();
    // The cap and the bias each change the rows' losses: a kernel that ignored either would fail below.
    const at::Tensor rows = FullCrossEntropyRows(hidden, weight, targets, head.cap, b);
    if (head.cap > 0)
      CHECK((rows - FullCrossEntropyRows(hidden, weight, targets, 0.0, b)).abs().max().item<double>() > 0.5);
    if (head.bias)
      CHECK((rows - FullCrossEntropyRows(hidden, weight, targets, head.cap)).abs().max().item<double>() > 0.5);
    for (int64_t chunk : {0, 5}) {
      INFO("cap " << head.cap << ", bias " << head.bias << ", chunk " << chunk);
      // A trained head (logits recomputed in backward; its bias trained too) and a frozen one (the gradient
      // from the forward pass).
      at::Tensor h = hidden.clone().requires_grad_(true), w = weight.clone().requires_grad_(true);
      at::Tensor trained_b = head.bias ? logit_bias.clone().requires_grad_(true) : at::Tensor();
      const at::Tensor loss = ChunkedCrossEntropy(h, {w, trained_b, head.cap}, targets, chunk);
      CHECK(std::abs(loss.item<double>() - ref.item<double>()) < 1e-10 * std::abs(ref.item<double>()));
      (loss * 2.0).backward();
      CHECK(MaxAbsDiff(h.grad(), 2.0 * h_ref.grad()) < 1e-10);
      CHECK(MaxAbsDiff(w.grad(), 2.0 * w_ref.grad()) < 1e-10);
      if (head.bias) CHECK(MaxAbsDiff(trained_b.grad(), 2.0 * b_ref.grad()) < 1e-10);
      if (head.bias) {  // a bias trained alone, beside a frozen weight
        at::Tensor h_only = hidden.clone().requires_grad_(true);
        at::Tensor b_only = logit_bias.clone().requires_grad_(true);
        ChunkedCrossEntropy(h_only, {weight, b_only, head.cap}, targets, chunk).backward();
        CHECK(MaxAbsDiff(b_only.grad(), b_ref.grad()) < 1e-10);
        CHECK(MaxAbsDiff(h_only.grad(), h_ref.grad()) < 1e-10);
      }
      const LogitHead frozen{weight, b, head.cap};
      at::Tensor h_frozen = hidden.clone().requires_grad_(true);
      ChunkedCrossEntropy(h_frozen, frozen, targets, chunk).backward();
      CHECK(MaxAbsDiff(h_frozen.grad(), h_ref.grad()) < 1e-10);
      auto [with_grad_loss, grad] = ChunkedCrossEntropyWithGrad(hidden, frozen, targets, chunk);
      CHECK(std::abs(with_grad_loss.item<double>() - ref.item<double>()) < 1e-10 * std::abs(ref.item<double>()));
      CHECK(MaxAbsDiff(grad, h_ref.grad()) < 1e-10);
      // The directional derivative against a central finite difference of the reference.
      const at::Tensor dh = at::randn({19, 8}, at::kDouble);
      auto [jvp_loss, jvp] = ChunkedCrossEntropyJvp(hidden, dh, frozen, targets, chunk);
      const double eps = 1e-6;
      const double fd = (FullCrossEntropySum(hidden + eps * dh, weight, targets, head.cap, b).item<double>() -
                         FullCrossEntropySum(hidden - eps * dh, weight, targets, head.cap, b).item<double>()) /
                        (2 * eps);
      CHECK(std::abs(jvp_loss.item<double>() - ref.item<double>()) < 1e-10 * std::abs(ref.item<double>()));
      CHECK(std::abs(jvp.item<double>() - fd) < 1e-6 * std::max(1.0, std::abs(fd)));
    }
  }
}

}  // namespace
}  // namespace seedling::model
