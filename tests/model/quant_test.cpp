#include "model/quant.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <vector>

#include "base/file.h"
#include "base/half.h"
#include "base/memory.h"
#include "model/frozen_linear.h"
#include "model/internal/quant_kernels.h"
#include "model/kernels.h"
#include "model/memory_tracker.h"
#include "tests/test_util.h"

namespace seedling::model {
namespace {

double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

// Weights with real-looking scale and a few outliers, as quantizers meet them.
at::Tensor TestMatrix(int64_t rows, int64_t cols, uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor w = at::randn({rows, cols}) * 0.02;
  w.index_put_({at::randint(0, rows, {rows / 4 + 1}, at::kLong), at::randint(0, cols, {rows / 4 + 1}, at::kLong)},
               at::randn({rows / 4 + 1}) * 0.2);
  return w;
}

// The formats a frozen matrix can be held in, built from one fp32 source.
std::vector<at::Tensor> AllFormats(const at::Tensor& w) {
  return {w, w.to(at::kHalf), w.to(at::kBFloat16), *QuantizeMatrix(w, WeightFormat::kQ8_0),
          *QuantizeMatrix(w, WeightFormat::kQ4_0)};
}

TEST_CASE("Q8_0 blocks follow GGUF's formula on a known block", "[model][quant]") {
  float x[32];
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16) * 0.5f;  // -8 .. 7.5, max |x| = 8
  BlockQ8_0 b;
  QuantizeRowQ8_0(x, &b, 32);
  const float d = 8.0f / 127.0f;
  uint32_t bad = 0;
  CHECK(b.d == FloatToHalf(d, bad));
  for (int j = 0; j < 32; ++j) CHECK(b.qs[j] == static_cast<int8_t>(std::round(x[j] / d)));
  CHECK(b.qs[0] == -127);
  float y[32];
  DequantizeRowQ8_0(&b, y, 32);
  for (int j = 0; j < 32; ++j) CHECK(y[j] == static_cast<float>(b.qs[j]) * HalfToFloat(b.d));
}

TEST_CASE("Q4_0 blocks follow GGUF's formula: scale from the signed extreme, nibbles offset by 8", "[model][quant]") {
  float x[32];
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j) * 0.25f - 2.0f;  // -2 .. 5.75
  BlockQ4_0 b;
  QuantizeRowQ4_0(x, &b, 32);
  const float d = 5.75f / -8.0f;  // the largest magnitude is +5.75
  uint32_t bad = 0;
  CHECK(b.d == FloatToHalf(d, bad));
  for (int j = 0; j < 16; ++j) {
    const int lo = std::min(15, static_cast<int>(x[j] / d + 8.5f));
    const int hi = std::min(15, static_cast<int>(x[j + 16] / d + 8.5f));
    CHECK((b.qs[j] & 0x0f) == lo);
    CHECK((b.qs[j] >> 4) == hi);
  }
  CHECK((b.qs[15] >> 4) == 0);  // x[31] = 5.75 = -8 d
  float y[32];
  DequantizeRowQ4_0(&b, y, 32);
  for (int j = 0; j < 16; ++j) {
    CHECK(y[j] == static_cast<float>((b.qs[j] & 0x0f) - 8) * HalfToFloat(b.d));
    CHECK(y[j + 16] == static_cast<float>((b.qs[j] >> 4) - 8) * HalfToFloat(b.d));
  }
}

TEST_CASE("Quantizing keeps every weight within half a step of its block", "[model][quant]") {
  const at::Tensor w = TestMatrix(7, 96, 1);
  for (WeightFormat f : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    INFO(WeightFormatName(f));
    const at::Tensor q = *QuantizeMatrix(w, f);
    CHECK(FormatOf(q) == f);
    CHECK(LogicalShape(q) == std::vector<int64_t>{7, 96});
    const at::Tensor back = DequantizeMatrix(q);
    // Per block the step is max|x| / 127 (Q8_0, rounding: half a step) or max|x| / 8 (Q4_0: codes -8..7
    // from the signed extreme, so the opposite extreme is clamped to 7 steps: one step).
    const at::Tensor blocks = w.view({7, 3, 32}).abs().amax(2, true);
    const double bound = f == WeightFormat::kQ8_0 ? 0.5 / 127.0 : 1.0 / 8.0;
    const at::Tensor err = (back - w).view({7, 3, 32}).abs();
    CHECK((err <= blocks * bound * 1.01 + 1e-6).all().item<bool>());
    CHECK(MaxAbsDiff(back, w) > 0);  // lossy: the check above is not vacuous
  }
}

TEST_CASE("Quantizing reports its rows in order, in bands of about 1 MiB of source, each row once", "[model][quant]") {
  // 4,096 bf16 columns are 8 KiB a row: bands of 128 rows, and a short last band.
  const at::Tensor w = at::randn({300, 4096}).to(at::kBFloat16);
  std::vector<std::pair<int64_t, int64_t>> bands;
  auto done = [&](int64_t first, int64_t rows) { bands.emplace_back(first, rows); };
  const at::Tensor q = *QuantizeMatrix(w, WeightFormat::kQ4_0, "embed", done);
  const std::vector<std::pair<int64_t, int64_t>> expected = {{0, 128}, {128, 128}, {256, 44}};
  CHECK(bands == expected);
  CHECK(DequantizeMatrix(q).equal(DequantizeMatrix(*QuantizeMatrix(w, WeightFormat::kQ4_0))));
}

TEST_CASE("Quantizing refuses columns that are not a multiple of 32 and non-finite weights", "[model][quant]") {
  auto odd = QuantizeMatrix(at::zeros({2, 40}), WeightFormat::kQ4_0, "mlp.down_proj");
  REQUIRE_FALSE(odd.ok());
  CHECK(odd.status().message().find("'mlp.down_proj' has 40 columns") != std::string::npos);
  at::Tensor nan = at::zeros({2, 32});
  nan[1][3] = std::nanf("");
  auto bad = QuantizeMatrix(nan, WeightFormat::kQ8_0);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().message().find("row 1") != std::string::npos);
  CHECK(MatrixFormatFor(WeightFormat::kQ4_0, 688) == WeightFormat::kF16);
  CHECK(MatrixFormatFor(WeightFormat::kQ4_0, 704) == WeightFormat::kQ4_0);
}

TEST_CASE("SIMD row decoders equal the portable ones bit for bit", "[model][quant]") {
  const internal::QuantKernels* simd = internal::SimdQuantKernels();
  if (simd == nullptr) {
    WARN("this CPU has no SIMD decoder; only the portable one runs here");
    return;
  }
  const internal::QuantKernels& portable = internal::PortableQuantKernels();
  // Every binary16 / bfloat16 pattern, in a length with a tail.
  std::vector<uint16_t> all(65536 + 5);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i * 40503u);
  std::vector<float> a(all.size()), b(all.size());
  portable.f16_to_f32(all.data(), static_cast<int64_t>(all.size()), a.data());
  simd->f16_to_f32(all.data(), static_cast<int64_t>(all.size()), b.data());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  portable.bf16_to_f32(all.data(), static_cast<int64_t>(all.size()), a.data());
  simd->bf16_to_f32(all.data(), static_cast<int64_t>(all.size()), b.data());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  // Blocks with arbitrary bytes (any code, any scale but inf/NaN).
  at::manual_seed(4);
  const int64_t blocks = 257;
  at::Tensor raw = at::randint(0, 256, {blocks * 34}, at::kByte);
  uint8_t* p = raw.data_ptr<uint8_t>();
  for (int64_t i = 0; i < blocks; ++i) p[i * 34 + 1] &= 0x7b;  // exponent below 31
  std::vector<float> x(static_cast<size_t>(blocks * 32)), y(x.size());
  portable.q8_0_to_f32(p, blocks, x.data());
  simd->q8_0_to_f32(p, blocks, y.data());
  CHECK(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0);
  for (int64_t i = 0; i < blocks; ++i) p[i * 18 + 1] &= 0x7b;
  portable.q4_0_to_f32(p, blocks, x.data());
  simd->q4_0_to_f32(p, blocks, y.data());
  CHECK(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0);
}

TEST_CASE("Frozen linear equals decode-then-matmul for every format, odd shapes and tails", "[model][quant]") {
  // 300 output rows: several tiles of 16-row multiples plus a short last tile.
  const at::Tensor w = TestMatrix(300, 96, 2);
  const at::Tensor bias = at::randn({300});
  const at::Tensor x = at::randn({3, 7, 96});
  for (const at::Tensor& wf : AllFormats(w)) {
    INFO(WeightFormatName(FormatOf(wf)));
    const at::Tensor dense = DequantizeMatrix(wf);
    const at::Tensor expected = at::linear(x, dense, bias);
    const at::Tensor y = FrozenLinear(x, wf, bias);
    CHECK(y.sizes() == expected.sizes());
    CHECK(MaxAbsDiff(y, expected) < 1e-5);
  }
}

TEST_CASE("Frozen linear's input gradient equals decode-then-matmul's", "[model][quant]") {
  const at::Tensor w = TestMatrix(130, 64, 3);
  const at::Tensor x0 = at::randn({2, 5, 64});
  const at::Tensor dy = at::randn({2, 5, 130});
  for (const at::Tensor& wf : AllFormats(w)) {
    INFO(WeightFormatName(FormatOf(wf)));
    at::Tensor x = x0.clone().requires_grad_(true);
    FrozenLinear(x, wf, at::Tensor()).backward(dy);
    at::Tensor x_ref = x0.clone().requires_grad_(true);
    at::linear(x_ref, DequantizeMatrix(wf)).backward(dy);
    CHECK(MaxAbsDiff(x.grad(), x_ref.grad()) < 1e-5);
  }
}

TEST_CASE("Frozen linear's graph-only form skips the product and keeps the input gradient", "[model][quant]") {
  const at::Tensor w = TestMatrix(130, 64, 4);
  const at::Tensor bias = at::randn({130});
  const at::Tensor x0 = at::randn({2, 5, 64});
  const at::Tensor dy = at::randn({2, 5, 130});
  for (const at::Tensor& wf : AllFormats(w)) {
    INFO(WeightFormatName(FormatOf(wf)));
    at::Tensor x = x0.clone().requires_grad_(true);
    const at::Tensor y = FrozenLinearGraph(x, wf, bias);
    CHECK(y.sizes() == at::IntArrayRef({2, 5, 130}));
    CHECK(y.abs().max().item<double>() == 0);  // no product, no bias
    y.backward(dy);
    at::Tensor x_ref = x0.clone().requires_grad_(true);
    FrozenLinear(x_ref, wf, bias).backward(dy);
    CHECK(MaxAbsDiff(x.grad(), x_ref.grad()) < 1e-6);
    // Where no graph is recorded the values are needed: it is FrozenLinear itself.
    at::NoGradGuard no_grad;
    CHECK(MaxAbsDiff(FrozenLinearGraph(x0, wf, bias), FrozenLinear(x0, wf, bias)) < 1e-6);
  }
}

TEST_CASE("Frozen linear keeps neither the input nor a decoded copy of the weight for backward", "[model][quant]") {
  const at::Tensor w = *QuantizeMatrix(TestMatrix(2048, 512, 5), WeightFormat::kQ4_0);
  const int64_t dense_bytes = 2048 * 512 * 4;  // 4 MiB
  at::Tensor x = at::randn({8, 512}).requires_grad_(true);
  int64_t held = 0;
  {
    TensorMemoryTracker tracker;
    at::Tensor y = FrozenLinear(x, w, at::Tensor());
    held = tracker.current_bytes() - y.nbytes();  // what the graph keeps besides the output
    y.sum().backward();
  }
  INFO("held " << held << " bytes after forward");
  CHECK(held < dense_bytes / 16);
  CHECK(x.grad().defined());
}

TEST_CASE("Frozen linear propagates a forward-mode tangent", "[model][quant]") {
  const at::Tensor wq = *QuantizeMatrix(TestMatrix(40, 32, 6), WeightFormat::kQ8_0);
  const at::Tensor x = at::randn({4, 32});
  const at::Tensor dx = at::randn({4, 32});
  const uint64_t level_index = torch::autograd::ForwardADLevel::get_next_idx();
  const auto level = static_cast<int64_t>(level_index);
  const at::Tensor dual = at::_make_dual(x, dx, level);
  const at::Tensor bias = at::randn({40});
  const at::Tensor y = FrozenLinear(dual, wq, bias, level);
  auto [primal, tangent] = at::_unpack_dual(y, level);
  const at::Tensor dense = DequantizeMatrix(wq);
  REQUIRE(tangent.defined());
  CHECK(MaxAbsDiff(tangent, at::linear(dx, dense)) < 1e-5);
  CHECK(MaxAbsDiff(primal, at::linear(x, dense, bias)) < 1e-5);
  torch::autograd::ForwardADLevel::release_idx(level_index);
}

TEST_CASE("Streamed weights leave RSS after each tile and change no result, forward and backward", "[model][quant]") {
  testing::TempDir tmp;
  const at::Tensor q = *QuantizeMatrix(TestMatrix(4096, 1024, 9), WeightFormat::kQ8_0);  // 4.25 MiB of blocks
  const std::string path = JoinPath(tmp.path, "w.q8_0");
  REQUIRE(WriteFileAtomic(path, std::string_view(static_cast<const char*>(q.data_ptr()), q.nbytes())).ok());
  std::shared_ptr<MappedFile> file = *MappedFile::Open(path);
  const at::Tensor mapped = at::from_blob(const_cast<uint8_t*>(file->data()), q.sizes(), at::kByte);
  const WeightPages pages({file});
  at::manual_seed(4);
  const at::Tensor x0 = at::randn({8, 1024});
  auto run = [&](const at::Tensor& w, const WeightPages* stream) {
    const at::Tensor x = x0.clone().requires_grad_(true);
    const at::Tensor y = FrozenLinear(x, w, at::Tensor(), -1, stream);
    y.pow(2).sum().backward();
    return std::make_pair(y.detach(), x.grad());
  };
  const auto [y_ref, dx_ref] = run(q, nullptr);

  file->Release(file->data(), file->size());
  const int64_t before = CurrentRssParts().file;
  const auto [y, dx] = run(mapped, &pages);
  const int64_t streamed = CurrentRssParts().file - before;
  CHECK(y.equal(y_ref));
  CHECK(dx.equal(dx_ref));
  CHECK(streamed < (1 << 20));  // a page per tile boundary, of 4.25 MiB read twice
  // Without streaming the pages stay resident: the check above can fail.
  run(mapped, nullptr);
  CHECK(CurrentRssParts().file - before > (4 << 20));

  // Memory outside the mappings is never released: an anonymous matrix keeps its values.
  const at::Tensor copy = q.clone();
  const auto [y_anon, dx_anon] = run(q, &pages);
  CHECK(q.equal(copy));
  CHECK(y_anon.equal(y_ref));
  CHECK(dx_anon.equal(dx_ref));
}

TEST_CASE("Frozen embedding gathers decoded rows", "[model][quant]") {
  const at::Tensor w = TestMatrix(50, 64, 7);
  const at::Tensor tokens = at::tensor({3, 49, 0, 3}, at::kLong).view({2, 2});
  for (const at::Tensor& wf : AllFormats(w)) {
    INFO(WeightFormatName(FormatOf(wf)));
    const at::Tensor expected = at::embedding(DequantizeMatrix(wf), tokens);
    CHECK(at::equal(FrozenEmbedding(wf, tokens), expected));
  }
}

TEST_CASE("The cross-entropy over a quantized LM head equals the loss over its decoded copy", "[model][quant]") {
  const at::Tensor w = TestMatrix(1000, 64, 8) * 20;
  at::manual_seed(9);
  const at::Tensor hidden0 = at::randn({21, 64});
  at::Tensor targets = at::randint(0, 1000, {21}, at::kLong);
  targets[2] = kIgnoreIndex;
  for (const at::Tensor& wf : AllFormats(w)) {
    INFO(WeightFormatName(FormatOf(wf)));
    const at::Tensor dense = DequantizeMatrix(wf);
    at::Tensor h = hidden0.clone().requires_grad_(true);
    const at::Tensor loss = ChunkedCrossEntropy(h, {wf}, targets, 8);
    loss.backward();
    at::Tensor h_ref = hidden0.clone().requires_grad_(true);
    const at::Tensor logits = at::matmul(h_ref, dense.t());
    const at::Tensor ref = at::cross_entropy_loss(logits, targets, {}, at::Reduction::Sum, kIgnoreIndex);
    ref.backward();
    CHECK(std::abs(loss.item<double>() - ref.item<double>()) < 1e-4 * std::abs(ref.item<double>()));
    CHECK(MaxAbsDiff(h.grad(), h_ref.grad()) < 1e-4);
  }
}

}  // namespace
}  // namespace seedling::model
