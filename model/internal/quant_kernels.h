#pragma once

// Row decoders for the frozen weight formats (model/quant.h), in a portable version and SIMD versions
// chosen at run time: AVX2 + F16C on x86-64 (compiled with a per-function target attribute, so the
// build itself stays baseline x86-64), NEON on ARM64 (every ARMv8-A core has it). Every version gives
// bit-identical fp32 output: the decodes are exact conversions and one multiply by the block scale.
//
// No LibTorch here (so the file also builds alone for a cross-compile check). Thread-safe: no state.

#include <cstdint>

namespace seedling::model::internal {

struct QuantKernels {
  const char* name;  // "portable", "avx2+f16c" or "neon"
  // out[i] = float(src[i]) for n binary16 / bfloat16 values.
  void (*f16_to_f32)(const uint16_t* src, int64_t n, float* out);
  void (*bf16_to_f32)(const uint16_t* src, int64_t n, float* out);
  // Decode `blocks` consecutive GGUF blocks (34-byte Q8_0, 18-byte Q4_0) into 32 * blocks floats.
  void (*q8_0_to_f32)(const uint8_t* src, int64_t blocks, float* out);
  void (*q4_0_to_f32)(const uint8_t* src, int64_t blocks, float* out);
};

const QuantKernels& PortableQuantKernels();
// The SIMD version for this CPU, or nullptr when the CPU lacks it (tests compare it with the portable one).
const QuantKernels* SimdQuantKernels();
// The SIMD version when available, else the portable one.
const QuantKernels& BestQuantKernels();

}  // namespace seedling::model::internal
