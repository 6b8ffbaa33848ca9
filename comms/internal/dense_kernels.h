#pragma once

// The server's hot loops over dense payloads (comms/codec.cpp's ValidateDensePayload and
// ValidatedDense::AddTo), in a portable version and, on x86-64, an AVX2 + F16C version chosen at run
// time. The build targets baseline x86-64 (SSE2) and ARM phones, so the wide version is compiled with a
// per-function target attribute and only called when the CPU reports the features.
//
// Both versions give bit-identical results: the same number of double lanes in the same order for the
// norms, separate multiply and add (no FMA contraction) for the weighted adds, and exact conversions.
// So a server's aggregate does not depend on which machine computed it.
//
// Every kernel reads data that ParseLayout already bounded (the pointers cover the stated lengths);
// values are unaligned little-endian, as in the payload. Thread-safe: no state.

#include <bit>
#include <cstdint>

#include "base/half.h"

namespace seedling::comms::internal {

using seedling::HalfToFloat;  // base/half.h

// One implementation of the kernels. `n` counts elements; `d` points at the first data byte.
struct DenseKernels {
  const char* name;  // "portable" or "avx2+f16c"

  // Σ x[i]² over fp32 values, in double, in kNormLanes lanes (element i in lane i % kNormLanes, the
  // tail in lane 0, lanes added in order). Non-finite input gives a non-finite result.
  double (*fp32_sum_squares)(const uint8_t* d, uint64_t n);
  // acc[i] = acc[i] + weight * double(x[i]).
  void (*fp32_add)(const uint8_t* d, uint64_t n, double weight, double* acc);

  // Σ HalfToFloat(h[i])² as above; *max_magnitude receives max(h[i] & 0x7fff), so a result >= 0x7c00
  // means some half is inf or NaN (and the sum is then meaningless).
  double (*fp16_sum_squares)(const uint8_t* d, uint64_t n, uint16_t* max_magnitude);
  // out[i] = HalfToFloat(h[i]).
  void (*fp16_decode)(const uint8_t* d, uint64_t n, float* out);
  // acc[i] = acc[i] + weight * double(HalfToFloat(h[i])).
  void (*fp16_add)(const uint8_t* d, uint64_t n, double weight, double* acc);

  // int8 blockwise data (the layout of comms/codec.h): `scales` holds num_blocks f32 scales, `q` the n
  // codes, `block` >= 1 codes per scale. Returns false if anything is invalid (a scale that is not
  // finite and non-negative, a code -128, a nonzero code in a zero-scale block); then *norm2 is
  // unspecified and the caller finds the culprit. Otherwise *norm2 = Σ_b double(scale_b / 127f)² Σ q²
  // with the blocks added in order (the codes' sum is exact in integers).
  bool (*int8_validate_norm)(const uint8_t* scales, const int8_t* q, uint64_t n, uint64_t block, uint64_t num_blocks,
                             double* norm2);
  // acc[i] = acc[i] + weight * double(float(q[i]) * (scale_b / 127f)) for i in block b. Valid data only.
  void (*int8_add)(const uint8_t* scales, const int8_t* q, uint64_t n, uint64_t block, uint64_t num_blocks,
                   double weight, double* acc);
};

inline constexpr int kNormLanes = 16;

// The portable kernels (plain C++ the compiler vectorizes for the baseline ISA).
const DenseKernels& PortableKernels();
// The AVX2 + F16C kernels, or null when this build has none (not x86-64) or the CPU lacks the features.
const DenseKernels* Avx2Kernels();
// The fastest kernels this CPU supports; decided once.
const DenseKernels& BestKernels();

}  // namespace seedling::comms::internal
