#pragma once

// IEEE binary16 and bfloat16 <-> binary32 conversions, exact and branch-free so loops over them
// vectorize, and independent of the FPU's rounding mode. One home for the model's 16-bit weights, the
// quantized blocks' fp16 scales (model/quant.h) and the update codecs (comms/).

#include <bit>
#include <cstdint>

namespace seedling {

// binary16 bits -> float, exactly, for every pattern: finite values (subnormals included) exactly;
// ±inf to ±inf; a NaN keeps its sign and payload and is made quiet (the F16C instruction's rule, so
// scalar and SIMD versions agree on all 65,536 inputs).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Normal: rebias the exponent (15 -> 127). Subnormal: the mantissa times 2^-24 (exact).
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  const uint32_t subnormal = std::bit_cast<uint32_t>(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  // Exponent 31: float exponent 255, the mantissa shifted up, the quiet bit set for a NaN.
  const uint32_t special = 0x7f800000u | ((em & 0x3ffu) << 13) | ((em & 0x3ffu) != 0 ? 0x00400000u : 0u);
  const uint32_t is_normal = 0u - static_cast<uint32_t>(em >= 0x400u);
  const uint32_t is_special = 0u - static_cast<uint32_t>(em >= 0x7c00u);
  const uint32_t finite = (normal & is_normal) | (subnormal & ~is_normal);
  const uint32_t bits = (special & is_special) | (finite & ~is_special) | sign;
  return std::bit_cast<float>(bits);
}

// Rounds x to binary16 with round-to-nearest-even and returns the bits (with x's sign). Sets `bad`
// when x is not finite or rounds to infinity, so callers reject such input rather than store inf.
// Branch-free (both paths computed, one selected) and integer arithmetic plus exact float scalings
// only.
inline uint16_t FloatToHalf(float x, uint32_t& bad) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t a = bits & 0x7fffffffu;
  // 65520 is the midpoint between 65504 (the largest half) and 2^16; the tie goes to the even
  // mantissa, which is 2^16 = inf. So everything from there up (inf and NaN too) has no finite
  // half.
  bad |= static_cast<uint32_t>(a >= 0x477ff000u);
  // Normal half (|x| >= 2^-14): rebias the exponent (127 -> 15) and keep 10 of the 23 mantissa
  // bits. Adding 0xfff plus the kept lsb before dropping 13 bits rounds to nearest even; a carry
  // out of the mantissa correctly bumps the exponent.
  const uint32_t normal = ((a + 0x0fffu + ((a >> 13) & 1u)) >> 13) - ((127u - 15u) << 10);
  // Subnormal half: a multiple of 2^-24. For |x| < 2^-14, |x| * 2^24 < 2^10 is exact, as are its
  // integer part and remainder. Rounding up from 1023.5+ gives 0x400, the smallest normal: also the
  // right bits. Larger inputs are replaced by 0 here so the float-to-int conversion stays in range.
  const uint32_t normal_mask = 0u - static_cast<uint32_t>(a >= 0x38800000u);
  const float m = std::bit_cast<float>(a & ~normal_mask) * 0x1p24f;
  const int32_t whole = static_cast<int32_t>(m);
  const float rest = m - static_cast<float>(whole);
  // Half to even on the remainder, with all-ones masks: GCC leaves a loop with bool arithmetic
  // on float compares unvectorized.
  const int32_t above_half = -static_cast<int32_t>(rest > 0.5f);
  const int32_t at_half = -static_cast<int32_t>(rest == 0.5f);
  const int32_t up = (above_half | (at_half & whole)) & 1;
  const uint32_t subnormal = static_cast<uint32_t>(whole + up);
  return static_cast<uint16_t>(sign | (normal & normal_mask) | (subnormal & ~normal_mask));
}

// bfloat16 bits -> float: the upper half of the float's bits, exactly.
inline float BFloat16ToFloat(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

}  // namespace seedling
