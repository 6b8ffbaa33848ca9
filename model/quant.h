#pragma once

// Frozen weight formats (model/weight_format.h) held as LibTorch tensors, and the block codecs.
//
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
#include "model/weight_format.h"

namespace seedling::model {

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
