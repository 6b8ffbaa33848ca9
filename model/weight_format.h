#pragma once

// How frozen weights are stored (WeightFormat) and how a device holds its base model (WeightPrecision):
// names, byte sizes and the block layouts, without LibTorch, so configuration parsers and the memory planner
// can use them anywhere.
//
// The formats: fp32, the two 16-bit float types, and GGUF's block formats Q8_0 and Q4_0.
//
// Block formats (ggml-common.h, bit for bit, so a quantized base model and a quantized GGUF export
// hold the same numbers): a row of `cols` weights (cols % 32 == 0) is cols / 32 blocks of 32 weights,
// each with a binary16 scale d:
//   Q8_0 (34 bytes): d, then 32 int8 codes q;            weight j = q[j] * d.
//   Q4_0 (18 bytes): d, then 16 bytes of packed nibbles;  weight j     = ((qs[j] & 0xF) - 8) * d,
//                                                          weight j+16 = ((qs[j] >> 4)  - 8) * d.

#include <cstdint>
#include <optional>
#include <string_view>

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

// How the frozen matrices (projections, embedding, LM head) are held; norms and biases are always fp32.
enum class WeightPrecision {
  kFloat32,  // convert every matrix to fp32 at load (default for safetensors: fastest, largest)
  kStored,   // keep each matrix in its stored format (F32, F16, BF16, or a GGUF file's Q8_0 / Q4_0)
  kQ8_0,     // GGUF Q8_0 blocks (model/quant.h), from a weight cache file
  kQ4_0,     // GGUF Q4_0 blocks (model/quant.h), from a weight cache file
};

// "fp32", "stored", "q8_0", "q4_0".
const char* WeightPrecisionName(WeightPrecision precision);
// The block format of kQ8_0 / kQ4_0; nullopt for the others.
std::optional<WeightFormat> BlockFormatOf(WeightPrecision precision);
// Parses the names above; InvalidArgument lists them.
absl::StatusOr<WeightPrecision> ParseWeightPrecision(std::string_view name);

}  // namespace seedling::model
