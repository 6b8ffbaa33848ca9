#pragma once

// Frozen weight formats: fp32, the two 16-bit float types, and GGUF's block formats Q8_0 and Q4_0.
//
// Block formats (ggml-common.h, bit for bit, so a quantized base model and a quantized GGUF export
// hold the same numbers): a row of `cols` weights (cols % 32 == 0) is cols / 32 blocks of 32 weights,
// each with a binary16 scale d:
//   Q8_0 (34 bytes): d, then 32 int8 codes q;            weight j = q[j] * d.
//   Q4_0 (18 bytes): d, then 16 bytes of packed nibbles;  weight j     = ((qs[j] & 0xF) - 8) * d,
//                                                          weight j+16 = ((qs[j] >> 4)  - 8) * d.
// Quantization follows ggml's reference (quantize_row_q8_0_ref / quantize_row_q4_0_ref):
//   Q8_0: d = max|x| / 127, q = round(x / d).
//   Q4_0: m = the x of largest magnitude (sign kept), d = m / -8, q = min(15, trunc(x / d + 8.5)).
//
// In memory a frozen matrix of logical shape (rows, cols) is an at::Tensor:
//   kF32 / kF16 / kBF16: a (rows, cols) tensor of that dtype;
//   kQ8_0 / kQ4_0:       a uint8 tensor (rows, cols / 32, 34 or 18): each row's blocks in file order,
//                        so it can be a view of a memory-mapped GGUF or weight-cache file.
// The representation describes itself (FormatOf), so every holder of model weights (ModelWeights,
// NamedWeights, the GGUF writer) passes quantized matrices around as plain tensors. Only
// model/frozen_linear.h and the functions below look inside.

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace seedling::model {

enum class WeightFormat : uint8_t { kF32, kF16, kBF16, kQ8_0, kQ4_0 };

// "f32", "f16", "bf16", "q8_0", "q4_0".
const char* WeightFormatName(WeightFormat format);

inline constexpr int64_t kQuantBlock = 32;  // weights per block (QK8_0 = QK4_0 = 32)

struct BlockQ8_0 {
  uint16_t d;  // binary16 scale
  int8_t qs[kQuantBlock];
};
struct BlockQ4_0 {
  uint16_t d;  // binary16 scale
  uint8_t qs[kQuantBlock / 2];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18, "GGUF block layouts");

inline bool IsBlockFormat(WeightFormat f) { return f == WeightFormat::kQ8_0 || f == WeightFormat::kQ4_0; }
// Bytes per block of 32 weights (34, 18); 0 for the float formats.
int64_t BlockBytes(WeightFormat format);
// Bytes of one row of `cols` weights (cols % 32 == 0 for block formats).
int64_t RowBytes(WeightFormat format, int64_t cols);

// The format a matrix of `cols` columns is stored in when `requested` is asked for: a block format
// needs cols % 32 == 0; other matrices fall back to F16 (llama.cpp cannot block such rows either).
// The weight cache and the GGUF export both follow this rule, so they hold the same numbers.
WeightFormat MatrixFormatFor(WeightFormat requested, int64_t cols);

// Reference codecs on raw blocks; n % 32 == 0. Pure functions of their input.
void QuantizeRowQ8_0(const float* x, BlockQ8_0* y, int64_t n);
void QuantizeRowQ4_0(const float* x, BlockQ4_0* y, int64_t n);
void DequantizeRowQ8_0(const BlockQ8_0* x, float* y, int64_t n);
void DequantizeRowQ4_0(const BlockQ4_0* x, float* y, int64_t n);

// The format of a frozen matrix's tensor (see the file comment). Aborts on a tensor that is none of
// them (a programming error: loaders validate what they build).
WeightFormat FormatOf(const at::Tensor& w);
inline bool IsQuantized(const at::Tensor& w) { return w.defined() && IsBlockFormat(FormatOf(w)); }
// The logical (rows, cols) of a frozen matrix; for other tensors their sizes.
std::vector<int64_t> LogicalShape(const at::Tensor& w);
// Bytes the matrix occupies (its storage slice).
int64_t MatrixBytes(const at::Tensor& w);

// Quantizes a 2-D float tensor (f32, f16, bf16 or f64) to `format` (kQ8_0 or kQ4_0), row by row.
// InvalidArgument if cols is not a multiple of 32, a value is not finite, or a block's scale does not
// fit binary16. `name` goes into the messages. `rows_done`, if set, is called after each band of rows
// (about 1 MiB of source) with the band's first row and row count, so a caller converting from a mapped
// file can drop the source pages it has finished with.
using RowsDone = std::function<void(int64_t first_row, int64_t rows)>;
absl::StatusOr<at::Tensor> QuantizeMatrix(const at::Tensor& w, WeightFormat format, std::string_view name = "",
                                          const RowsDone& rows_done = nullptr);

// The matrix in fp32, (rows, cols): a copy for 16-bit and block formats, `w` itself for fp32. For
// tests, export and merges; compute paths use model/frozen_linear.h, which never converts a whole
// matrix.
at::Tensor DequantizeMatrix(const at::Tensor& w);

// Rows [row0, row0 + count) of a frozen matrix into `out` (count × cols fp32, row-major), with the
// fastest kernel this CPU has (model/internal/quant_kernels.h).
void DequantizeRows(const at::Tensor& w, int64_t row0, int64_t count, float* out);

}  // namespace seedling::model
