#include "model/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/check.h"
#include "base/half.h"
#include "base/strings.h"
#include "model/internal/quant_kernels.h"

namespace seedling::model {
namespace {

// The GGUF block byte sizes, as the trailing dimension of a quantized tensor.
constexpr int64_t kQ8Bytes = sizeof(BlockQ8_0);
constexpr int64_t kQ4Bytes = sizeof(BlockQ4_0);

// Stores the binary16 scale; `bad` is set when it overflows (inf) or is NaN.
uint16_t Scale(float d, uint32_t& bad) { return FloatToHalf(d, bad); }

}  // namespace

// ggml quantize_row_q8_0_ref.
void QuantizeRowQ8_0(const float* x, BlockQ8_0* y, int64_t n) {
  SEEDLING_CHECK(n % kQuantBlock == 0);
  uint32_t unused = 0;
  for (int64_t b = 0; b < n / kQuantBlock; ++b, x += kQuantBlock) {
    float amax = 0.0f;
    for (int64_t j = 0; j < kQuantBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = Scale(d, unused);
    for (int64_t j = 0; j < kQuantBlock; ++j) y[b].qs[j] = static_cast<int8_t>(std::round(x[j] * id));
  }
}

// ggml quantize_row_q4_0_ref.
void QuantizeRowQ4_0(const float* x, BlockQ4_0* y, int64_t n) {
  SEEDLING_CHECK(n % kQuantBlock == 0);
  uint32_t unused = 0;
  for (int64_t b = 0; b < n / kQuantBlock; ++b, x += kQuantBlock) {
    float amax = 0.0f, max = 0.0f;  // max keeps the sign of the largest magnitude
    for (int64_t j = 0; j < kQuantBlock; ++j) {
      if (amax < std::fabs(x[j])) {
        amax = std::fabs(x[j]);
        max = x[j];
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = Scale(d, unused);
    for (int64_t j = 0; j < kQuantBlock / 2; ++j) {
      const float x0 = x[j] * id;
      const float x1 = x[kQuantBlock / 2 + j] * id;
      const uint8_t q0 = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x0 + 8.5f)));
      const uint8_t q1 = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x1 + 8.5f)));
      y[b].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

void DequantizeRowQ8_0(const BlockQ8_0* x, float* y, int64_t n) {
  SEEDLING_CHECK(n % kQuantBlock == 0);
  internal::BestQuantKernels().q8_0_to_f32(reinterpret_cast<const uint8_t*>(x), n / kQuantBlock, y);
}

void DequantizeRowQ4_0(const BlockQ4_0* x, float* y, int64_t n) {
  SEEDLING_CHECK(n % kQuantBlock == 0);
  internal::BestQuantKernels().q4_0_to_f32(reinterpret_cast<const uint8_t*>(x), n / kQuantBlock, y);
}

WeightFormat FormatOf(const at::Tensor& w) {
  SEEDLING_CHECK(w.defined(), "undefined weight");
  switch (w.scalar_type()) {
    case at::kFloat:
      return WeightFormat::kF32;
    case at::kHalf:
      return WeightFormat::kF16;
    case at::kBFloat16:
      return WeightFormat::kBF16;
    case at::kByte:
      SEEDLING_CHECK(w.dim() == 3 && (w.size(2) == kQ8Bytes || w.size(2) == kQ4Bytes),
                     "a uint8 weight must be (rows, blocks, 34 or 18)");
      return w.size(2) == kQ8Bytes ? WeightFormat::kQ8_0 : WeightFormat::kQ4_0;
    default:
      SEEDLING_CHECK(false, "weights are f32, f16, bf16 or GGUF blocks");
  }
  return WeightFormat::kF32;
}

std::vector<int64_t> LogicalShape(const at::Tensor& w) {
  if (w.defined() && w.scalar_type() == at::kByte && w.dim() == 3) return {w.size(0), w.size(1) * kQuantBlock};
  return w.sizes().vec();
}

int64_t MatrixBytes(const at::Tensor& w) { return w.defined() ? static_cast<int64_t>(w.nbytes()) : 0; }

absl::StatusOr<at::Tensor> QuantizeMatrix(const at::Tensor& w, WeightFormat format, std::string_view name,
                                          const RowsDone& rows_done) {
  SEEDLING_CHECK(IsBlockFormat(format));
  const std::string label = name.empty() ? std::string("matrix") : StrCat("'", name, "'");
  if (w.dim() != 2) return absl::InvalidArgumentError(StrCat(label, " is not 2-D"));
  const int64_t rows = w.size(0), cols = w.size(1);
  if (cols % kQuantBlock != 0) {
    return absl::InvalidArgumentError(
        StrCat(label, " has ", cols, " columns; ", WeightFormatName(format), " needs a multiple of ", kQuantBlock));
  }
  const int64_t bytes = BlockBytes(format);
  at::Tensor out = at::empty({rows, cols / kQuantBlock, bytes}, at::kByte);
  std::vector<float> row(static_cast<size_t>(cols));
  uint8_t* dst = out.data_ptr<uint8_t>();
  // One row at a time in fp32, so a 16-bit source is never converted as a whole.
  const int64_t band_rows = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, cols * w.element_size()));
  int64_t band_start = 0;
  for (int64_t r = 0; r < rows; ++r, dst += cols / kQuantBlock * bytes) {
    const at::Tensor src = w[r];
    if (src.scalar_type() == at::kFloat && src.is_contiguous()) {
      std::memcpy(row.data(), src.data_ptr<float>(), sizeof(float) * static_cast<size_t>(cols));
    } else {
      at::from_blob(row.data(), {cols}, at::kFloat).copy_(src);
    }
    for (float v : row) {
      if (!std::isfinite(v)) return absl::InvalidArgumentError(StrCat(label, " row ", r, " holds ", v));
    }
    if (format == WeightFormat::kQ8_0) {
      QuantizeRowQ8_0(row.data(), reinterpret_cast<BlockQ8_0*>(dst), cols);
    } else {
      QuantizeRowQ4_0(row.data(), reinterpret_cast<BlockQ4_0*>(dst), cols);
    }
    // A finite scale that overflows binary16 (|weight| > 65504 * 127 for Q8_0) would decode to inf.
    for (int64_t b = 0; b < cols / kQuantBlock; ++b) {
      uint16_t d;
      std::memcpy(&d, dst + b * bytes, sizeof(d));
      if ((d & 0x7c00u) == 0x7c00u) {
        return absl::InvalidArgumentError(StrCat(label, " row ", r,
                                                 ": a block's scale does not fit binary16 (weights too large for ",
                                                 WeightFormatName(format), ")"));
      }
    }
    if (rows_done && (r + 1 - band_start == band_rows || r + 1 == rows)) {
      rows_done(band_start, r + 1 - band_start);
      band_start = r + 1;
    }
  }
  return out;
}

void DequantizeRows(const at::Tensor& w, int64_t row0, int64_t count, float* out) {
  const std::vector<int64_t> shape = LogicalShape(w);
  SEEDLING_CHECK(shape.size() == 2 && row0 >= 0 && count >= 0 && row0 + count <= shape[0]);
  SEEDLING_CHECK(w.is_contiguous());
  const int64_t cols = shape[1];
  const internal::QuantKernels& k = internal::BestQuantKernels();
  switch (FormatOf(w)) {
    case WeightFormat::kF32:
      std::memcpy(out, w.data_ptr<float>() + row0 * cols, sizeof(float) * static_cast<size_t>(count * cols));
      return;
    case WeightFormat::kF16:
      k.f16_to_f32(reinterpret_cast<const uint16_t*>(w.data_ptr()) + row0 * cols, count * cols, out);
      return;
    case WeightFormat::kBF16:
      k.bf16_to_f32(reinterpret_cast<const uint16_t*>(w.data_ptr()) + row0 * cols, count * cols, out);
      return;
    case WeightFormat::kQ8_0:
      k.q8_0_to_f32(w.data_ptr<uint8_t>() + row0 * RowBytes(WeightFormat::kQ8_0, cols), count * cols / kQuantBlock,
                    out);
      return;
    case WeightFormat::kQ4_0:
      k.q4_0_to_f32(w.data_ptr<uint8_t>() + row0 * RowBytes(WeightFormat::kQ4_0, cols), count * cols / kQuantBlock,
                    out);
      return;
  }
}

at::Tensor DequantizeMatrix(const at::Tensor& w) {
  if (w.scalar_type() == at::kFloat) return w;
  const std::vector<int64_t> shape = LogicalShape(w);
  at::Tensor out = at::empty(shape, at::kFloat);
  DequantizeRows(w.contiguous(), 0, shape[0], out.data_ptr<float>());
  return out;
}

}  // namespace seedling::model
