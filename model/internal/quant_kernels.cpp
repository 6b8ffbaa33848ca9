#include "model/internal/quant_kernels.h"

#include <cstring>

#include "base/half.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace seedling::model::internal {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kQ8Bytes = 34;
constexpr int64_t kQ4Bytes = 18;

inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// ---- portable ----

void F16ToF32Portable(const uint16_t* src, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = HalfToFloat(src[i]);
}

void BF16ToF32Portable(const uint16_t* src, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = BFloat16ToFloat(src[i]);
}

void Q8ToF32Portable(const uint8_t* src, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, src += kQ8Bytes, out += kBlock) {
    const float d = HalfToFloat(LoadU16(src));
    const auto* q = reinterpret_cast<const int8_t*>(src + 2);
    for (int64_t j = 0; j < kBlock; ++j) out[j] = static_cast<float>(q[j]) * d;
  }
}

void Q4ToF32Portable(const uint8_t* src, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, src += kQ4Bytes, out += kBlock) {
    const float d = HalfToFloat(LoadU16(src));
    const uint8_t* qs = src + 2;
    for (int64_t j = 0; j < kBlock / 2; ++j) {
      out[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
      out[j + kBlock / 2] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  }
}

constexpr QuantKernels kPortable = {"portable", F16ToF32Portable, BF16ToF32Portable, Q8ToF32Portable, Q4ToF32Portable};

// ---- AVX2 + F16C ----
// No "fma" in the target: each weight is one exact int -> float conversion and one multiply, as in
// the portable loop, so the two agree bit for bit.

#if defined(__x86_64__)
#define SEEDLING_AVX2 __attribute__((target("avx2,f16c")))

SEEDLING_AVX2 void F16ToF32Avx2(const uint16_t* src, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = HalfToFloat(src[i]);
}

SEEDLING_AVX2 void BF16ToF32Avx2(const uint16_t* src, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16);
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(w));
  }
  for (; i < n; ++i) out[i] = BFloat16ToFloat(src[i]);
}

// 8 int8 codes -> 8 floats times d.
SEEDLING_AVX2 inline void StoreScaled8(const int8_t* q, __m256 d, float* out) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), d));
}

SEEDLING_AVX2 void Q8ToF32Avx2(const uint8_t* src, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, src += kQ8Bytes, out += kBlock) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(LoadU16(src)));
    const auto* q = reinterpret_cast<const int8_t*>(src + 2);
    for (int j = 0; j < kBlock; j += 8) StoreScaled8(q + j, d, out + j);
  }
}

SEEDLING_AVX2 void Q4ToF32Avx2(const uint8_t* src, int64_t blocks, float* out) {
  const __m128i low_mask = _mm_set1_epi8(0x0f);
  const __m128i eight = _mm_set1_epi8(8);
  for (int64_t b = 0; b < blocks; ++b, src += kQ4Bytes, out += kBlock) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(LoadU16(src)));
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2));
    // Nibbles minus 8 as int8: weights 0..15 from the low nibbles, 16..31 from the high ones.
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(packed, low_mask), eight);
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), low_mask), eight);
    alignas(16) int8_t codes[kBlock];
    _mm_store_si128(reinterpret_cast<__m128i*>(codes), lo);
    _mm_store_si128(reinterpret_cast<__m128i*>(codes + 16), hi);
    for (int j = 0; j < kBlock; j += 8) StoreScaled8(codes + j, d, out + j);
  }
}

constexpr QuantKernels kAvx2 = {"avx2+f16c", F16ToF32Avx2, BF16ToF32Avx2, Q8ToF32Avx2, Q4ToF32Avx2};
#endif  // __x86_64__

// ---- NEON ----

#if defined(__aarch64__)
void F16ToF32Neon(const uint16_t* src, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float16x4_t h = vreinterpret_f16_u16(vld1_u16(src + i));
    vst1q_f32(out + i, vcvt_f32_f16(h));
  }
  for (; i < n; ++i) out[i] = HalfToFloat(src[i]);
}

void BF16ToF32Neon(const uint16_t* src, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const uint32x4_t w = vshll_n_u16(vld1_u16(src + i), 16);
    vst1q_f32(out + i, vreinterpretq_f32_u32(w));
  }
  for (; i < n; ++i) out[i] = BFloat16ToFloat(src[i]);
}

// 16 int8 codes -> 16 floats times d.
inline void StoreScaled16(int8x16_t q, float32x4_t d, float* out) {
  const int16x8_t lo = vmovl_s8(vget_low_s8(q));
  const int16x8_t hi = vmovl_s8(vget_high_s8(q));
  vst1q_f32(out + 0, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), d));
  vst1q_f32(out + 4, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))), d));
  vst1q_f32(out + 8, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), d));
  vst1q_f32(out + 12, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))), d));
}

void Q8ToF32Neon(const uint8_t* src, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, src += kQ8Bytes, out += kBlock) {
    const float32x4_t d = vdupq_n_f32(HalfToFloat(LoadU16(src)));
    const auto* q = reinterpret_cast<const int8_t*>(src + 2);
    StoreScaled16(vld1q_s8(q), d, out);
    StoreScaled16(vld1q_s8(q + 16), d, out + 16);
  }
}

void Q4ToF32Neon(const uint8_t* src, int64_t blocks, float* out) {
  const uint8x16_t low_mask = vdupq_n_u8(0x0f);
  const int8x16_t eight = vdupq_n_s8(8);
  for (int64_t b = 0; b < blocks; ++b, src += kQ4Bytes, out += kBlock) {
    const float32x4_t d = vdupq_n_f32(HalfToFloat(LoadU16(src)));
    const uint8x16_t packed = vld1q_u8(src + 2);
    const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(packed, low_mask)), eight);
    const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(packed, 4)), eight);
    StoreScaled16(lo, d, out);
    StoreScaled16(hi, d, out + 16);
  }
}

constexpr QuantKernels kNeon = {"neon", F16ToF32Neon, BF16ToF32Neon, Q8ToF32Neon, Q4ToF32Neon};
#endif  // __aarch64__

}  // namespace

const QuantKernels& PortableQuantKernels() { return kPortable; }

const QuantKernels* SimdQuantKernels() {
#if defined(__x86_64__)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return supported ? &kAvx2 : nullptr;
#elif defined(__aarch64__)
  return &kNeon;
#else
  return nullptr;
#endif
}

const QuantKernels& BestQuantKernels() {
  static const QuantKernels& best = SimdQuantKernels() != nullptr ? *SimdQuantKernels() : kPortable;
  return best;
}

}  // namespace seedling::model::internal
