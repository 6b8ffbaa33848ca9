// Dense-payload kernels (see dense_kernels.h). This file is compiled with -ffp-contract=off (see
// comms/CMakeLists.txt): a fused multiply-add would round differently from the separate multiply and
// add the contract promises, and differently on an ARM phone than on the server.

#include "comms/internal/dense_kernels.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace seedling::comms::internal {
namespace {

// Payloads are little-endian; so is every host we build for (checked once here rather than per load).
static_assert(std::endian::native == std::endian::little, "dense kernels assume a little-endian host");

inline float LoadF32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

constexpr float kInt8Levels = 127.0f;

// Codes per run whose Σ q² is kept in 32 bits: 2^16 · 127² < 2^31.
constexpr uint64_t kInt8Run = uint64_t{1} << 16;

// ---- Portable ----

template <typename Load>
double LaneSumSquares(uint64_t n, Load load) {
  double lanes[kNormLanes] = {};
  uint64_t i = 0;
  for (; i + kNormLanes <= n; i += kNormLanes) {
    for (int j = 0; j < kNormLanes; ++j) {
      const double v = load(i + j);
      lanes[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = load(i);
    lanes[0] += v * v;
  }
  double total = 0;
  for (double lane : lanes) total += lane;
  return total;
}

double Fp32SumSquaresPortable(const uint8_t* d, uint64_t n) {
  return LaneSumSquares(n, [d](uint64_t i) { return double{LoadF32(d + 4 * i)}; });
}

void Fp32AddPortable(const uint8_t* d, uint64_t n, double weight, double* acc) {
  for (uint64_t i = 0; i < n; ++i) acc[i] += weight * static_cast<double>(LoadF32(d + 4 * i));
}

double Fp16SumSquaresPortable(const uint8_t* d, uint64_t n, uint16_t* max_magnitude) {
  uint16_t max_bits = 0;
  const double sum = LaneSumSquares(n, [d, &max_bits](uint64_t i) {
    const uint16_t h = LoadU16(d + 2 * i);
    max_bits = std::max<uint16_t>(max_bits, h & 0x7fffu);
    return double{HalfToFloat(h)};
  });
  *max_magnitude = max_bits;
  return sum;
}

void Fp16DecodePortable(const uint8_t* d, uint64_t n, float* out) {
  for (uint64_t i = 0; i < n; ++i) out[i] = HalfToFloat(LoadU16(d + 2 * i));
}

void Fp16AddPortable(const uint8_t* d, uint64_t n, double weight, double* acc) {
  for (uint64_t i = 0; i < n; ++i) acc[i] += weight * static_cast<double>(HalfToFloat(LoadU16(d + 2 * i)));
}

// Checks one block's scale; returns its step (scale / 127 in fp32) through `step`.
inline bool Int8Scale(const uint8_t* scales, uint64_t b, float* step) {
  const float scale = LoadF32(scales + 4 * b);
  // NaN fails the comparison; a negative scale is never written (it is a max of magnitudes).
  if (!(scale >= 0.0f) || !std::isfinite(scale)) return false;
  *step = scale / kInt8Levels;
  return true;
}

bool Int8ValidateNormPortable(const uint8_t* scales, const int8_t* q, uint64_t n, uint64_t block, uint64_t num_blocks,
                              double* norm2) {
  double total = 0;
  for (uint64_t b = 0; b < num_blocks; ++b) {
    float step;
    if (!Int8Scale(scales, b, &step)) return false;
    const uint64_t begin = b * block, end = std::min(n, begin + block);
    int64_t codes2 = 0;
    uint32_t min_code = 0;
    for (uint64_t run = begin; run < end; run += kInt8Run) {
      const uint64_t run_end = std::min(end, run + kInt8Run);
      int32_t run2 = 0;
      for (uint64_t i = run; i < run_end; ++i) {
        run2 += int32_t{q[i]} * int32_t{q[i]};
        min_code |= static_cast<uint32_t>(q[i] == -128);
      }
      codes2 += run2;
    }
    if (min_code != 0 || (step == 0.0f && codes2 != 0)) return false;
    const double step_d = step;
    total += step_d * step_d * static_cast<double>(codes2);
  }
  *norm2 = total;
  return true;
}

void Int8AddPortable(const uint8_t* scales, const int8_t* q, uint64_t n, uint64_t block, uint64_t num_blocks,
                     double weight, double* acc) {
  for (uint64_t b = 0; b < num_blocks; ++b) {
    const float step = LoadF32(scales + 4 * b) / kInt8Levels;
    const uint64_t begin = b * block, end = std::min(n, begin + block);
    for (uint64_t i = begin; i < end; ++i) {
      acc[i] += weight * static_cast<double>(static_cast<float>(q[i]) * step);
    }
  }
}

constexpr DenseKernels kPortable = {
    "portable",         Fp32SumSquaresPortable, Fp32AddPortable,          Fp16SumSquaresPortable,
    Fp16DecodePortable, Fp16AddPortable,        Int8ValidateNormPortable, Int8AddPortable,
};

// ---- AVX2 + F16C ----
// Explicit intrinsics rather than target clones of the portable loops: GCC does not turn the bit
// arithmetic of HalfToFloat into vcvtph2ps, and the int8 norm wants vpmaddubsw. No "fma" in the target,
// so no multiply-add can be fused even by accident.

#if defined(__x86_64__)
#define SEEDLING_AVX2 __attribute__((target("avx2,f16c")))

static_assert(kNormLanes == 16, "the AVX2 norms keep 16 lanes in four 4-double registers");

// The 16 lanes added in order, as the portable LaneSumSquares does (the callers have already added
// the scalar tail into lane 0).
SEEDLING_AVX2 inline double FinishLanes(const __m256d acc[4]) {
  alignas(32) double lanes[kNormLanes];
  for (int k = 0; k < 4; ++k) _mm256_store_pd(lanes + 4 * k, acc[k]);
  double total = 0;
  for (double lane : lanes) total += lane;
  return total;
}

// The float -> double conversions read 4 floats straight from memory (vcvtps2pd ymm, m128): the
// register form of that instruction, and the 128-bit extracts it would need, all compete for one
// shuffle port, which bounded the first version of these loops well below the cache's bandwidth. So
// fp16 and int8 first decode a short tile into an L1 buffer of floats and convert from there.

constexpr uint64_t kTile = 256;  // floats per decoded tile: 1 KiB, a multiple of the 16 lanes

SEEDLING_AVX2 inline __m256d Widen(const float* f) { return _mm256_cvtps_pd(_mm_loadu_ps(f)); }

// acc[k] += f[16j + 4k .. 16j + 4k + 3]² for the `groups` groups of 16 floats.
SEEDLING_AVX2 inline void AccumulateSquares(const float* f, uint64_t groups, __m256d acc[4]) {
  for (uint64_t j = 0; j < groups; ++j, f += 16) {
    for (int k = 0; k < 4; ++k) {
      const __m256d v = Widen(f + 4 * k);
      acc[k] = _mm256_add_pd(acc[k], _mm256_mul_pd(v, v));
    }
  }
}

// acc[i] = acc[i] + weight * double(f[i]) for i < n; n a multiple of 8. Runs from the end down: the
// validation pass has just read the payload front to back, so its last part is what the cache still
// holds (each element's result does not depend on the order). That helps fp32 (1.8 MB payload with a
// 3.7 MB sum, more than L2); the smaller fp16 and int8 payloads measured the same either way.
SEEDLING_AVX2 inline void AddWidened(const float* f, uint64_t n, __m256d weight, double* acc) {
  for (uint64_t i = n; i-- > 0;) {
    i -= 7;
    const __m256d a = Widen(f + i), b = Widen(f + i + 4);
    _mm256_storeu_pd(acc + i, _mm256_add_pd(_mm256_loadu_pd(acc + i), _mm256_mul_pd(weight, a)));
    _mm256_storeu_pd(acc + i + 4, _mm256_add_pd(_mm256_loadu_pd(acc + i + 4), _mm256_mul_pd(weight, b)));
  }
}

SEEDLING_AVX2 double Fp32SumSquaresAvx2(const uint8_t* d, uint64_t n) {
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  const uint64_t groups = n / 16;
  AccumulateSquares(reinterpret_cast<const float*>(d), groups, acc);
  // The portable tail adds into lane 0 one element at a time, after the vector part.
  alignas(32) double lane0[4];
  _mm256_store_pd(lane0, acc[0]);
  for (uint64_t i = 16 * groups; i < n; ++i) {
    const double v = LoadF32(d + 4 * i);
    lane0[0] += v * v;
  }
  acc[0] = _mm256_load_pd(lane0);
  return FinishLanes(acc);
}

SEEDLING_AVX2 void Fp32AddAvx2(const uint8_t* d, uint64_t n, double weight, double* acc) {
  const uint64_t body = n / 8 * 8;
  AddWidened(reinterpret_cast<const float*>(d), body, _mm256_set1_pd(weight), acc);
  for (uint64_t i = body; i < n; ++i) acc[i] += weight * static_cast<double>(LoadF32(d + 4 * i));
}

// Decodes halves [0, n) (n a multiple of 8) into `out`.
SEEDLING_AVX2 inline void DecodeHalves(const uint8_t* d, uint64_t n, float* out) {
  for (uint64_t i = 0; i < n; i += 8) {
    _mm256_store_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 2 * i))));
  }
}

SEEDLING_AVX2 double Fp16SumSquaresAvx2(const uint8_t* d, uint64_t n, uint16_t* max_magnitude) {
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  const __m256i magnitude = _mm256_set1_epi16(0x7fff);
  __m256i max_bits = _mm256_setzero_si256();
  alignas(32) float tile[kTile];
  const uint64_t body = n / 16 * 16;
  for (uint64_t off = 0; off < body; off += kTile) {
    const uint64_t len = std::min(kTile, body - off);
    for (uint64_t i = 0; i < len; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 2 * (off + i)));
      max_bits = _mm256_max_epu16(max_bits, _mm256_and_si256(h, magnitude));
    }
    DecodeHalves(d + 2 * off, len, tile);
    AccumulateSquares(tile, len / 16, acc);
  }
  alignas(32) uint16_t maxes[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(maxes), max_bits);
  uint16_t max_all = 0;
  for (uint16_t m : maxes) max_all = std::max(max_all, m);
  alignas(32) double lane0[4];
  _mm256_store_pd(lane0, acc[0]);
  for (uint64_t i = body; i < n; ++i) {
    const uint16_t h = LoadU16(d + 2 * i);
    max_all = std::max<uint16_t>(max_all, h & 0x7fffu);
    const double v = HalfToFloat(h);
    lane0[0] += v * v;
  }
  acc[0] = _mm256_load_pd(lane0);
  *max_magnitude = max_all;
  return FinishLanes(acc);
}

SEEDLING_AVX2 void Fp16DecodeAvx2(const uint8_t* d, uint64_t n, float* out) {
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 2 * i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = HalfToFloat(LoadU16(d + 2 * i));
}

SEEDLING_AVX2 void Fp16AddAvx2(const uint8_t* d, uint64_t n, double weight, double* acc) {
  const __m256d w = _mm256_set1_pd(weight);
  alignas(32) float tile[kTile];
  const uint64_t body = n / 8 * 8;
  for (uint64_t off = 0; off < body; off += kTile) {
    const uint64_t len = std::min(kTile, body - off);
    DecodeHalves(d + 2 * off, len, tile);
    AddWidened(tile, len, w, acc + off);
  }
  for (uint64_t i = body; i < n; ++i) acc[i] += weight * static_cast<double>(HalfToFloat(LoadU16(d + 2 * i)));
}

// Σ q² of a run of at most kInt8Run codes, and whether any is -128.
SEEDLING_AVX2 inline int32_t Int8RunSquares(const int8_t* q, uint64_t len, bool* has_min) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i min_code = _mm256_set1_epi8(-128);
  __m256i sum = _mm256_setzero_si256();
  __m256i mins = _mm256_setzero_si256();
  uint64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i));
    mins = _mm256_or_si256(mins, _mm256_cmpeq_epi8(v, min_code));
    // |q| <= 127 as unsigned times |q| as signed: pairs of products <= 2 · 127² fit in int16.
    const __m256i a = _mm256_abs_epi8(v);
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(a, a), ones));
  }
  // Horizontal sum of 8 int32 (exact: the run bound keeps it below 2^31).
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  int32_t total = _mm_cvtsi128_si32(s);
  bool any_min = !_mm256_testz_si256(mins, mins);
  for (; i < len; ++i) {
    total += int32_t{q[i]} * int32_t{q[i]};
    any_min |= q[i] == -128;
  }
  *has_min = any_min;
  return total;
}

SEEDLING_AVX2 bool Int8ValidateNormAvx2(const uint8_t* scales, const int8_t* q, uint64_t n, uint64_t block,
                                        uint64_t num_blocks, double* norm2) {
  double total = 0;
  for (uint64_t b = 0; b < num_blocks; ++b) {
    float step;
    if (!Int8Scale(scales, b, &step)) return false;
    const uint64_t begin = b * block, end = std::min(n, begin + block);
    int64_t codes2 = 0;
    for (uint64_t run = begin; run < end; run += kInt8Run) {
      bool has_min = false;
      codes2 += Int8RunSquares(q + run, std::min(end, run + kInt8Run) - run, &has_min);
      if (has_min) return false;
    }
    if (step == 0.0f && codes2 != 0) return false;
    const double step_d = step;
    total += step_d * step_d * static_cast<double>(codes2);
  }
  *norm2 = total;
  return true;
}

// Direct, not through a float tile: measured faster here, as the add pass is bound by the traffic of
// the double sum rather than by the conversions.
SEEDLING_AVX2 void Int8AddAvx2(const uint8_t* scales, const int8_t* q, uint64_t n, uint64_t block, uint64_t num_blocks,
                               double weight, double* acc) {
  const __m256d w = _mm256_set1_pd(weight);
  for (uint64_t b = 0; b < num_blocks; ++b) {
    const float step = LoadF32(scales + 4 * b) / kInt8Levels;
    const __m256 steps = _mm256_set1_ps(step);
    const uint64_t begin = b * block, end = std::min(n, begin + block);
    uint64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      int64_t eight;
      std::memcpy(&eight, q + i, 8);
      // fp32 products, as the format defines, then widened.
      const __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(eight))), steps);
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      _mm256_storeu_pd(acc + i, _mm256_add_pd(_mm256_loadu_pd(acc + i), _mm256_mul_pd(w, lo)));
      _mm256_storeu_pd(acc + i + 4, _mm256_add_pd(_mm256_loadu_pd(acc + i + 4), _mm256_mul_pd(w, hi)));
    }
    for (; i < end; ++i) acc[i] += weight * static_cast<double>(static_cast<float>(q[i]) * step);
  }
}

constexpr DenseKernels kAvx2 = {
    "avx2+f16c",    Fp32SumSquaresAvx2, Fp32AddAvx2,          Fp16SumSquaresAvx2,
    Fp16DecodeAvx2, Fp16AddAvx2,        Int8ValidateNormAvx2, Int8AddAvx2,
};
#endif  // defined(__x86_64__)

}  // namespace

const DenseKernels& PortableKernels() { return kPortable; }

const DenseKernels* Avx2Kernels() {
#if defined(__x86_64__)
  // F16C from CPUID leaf 1 (ECX bit 29) rather than __builtin_cpu_supports("f16c"), which clang (the
  // fuzzing build) does not know.
  static const bool supported = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
    return f16c && __builtin_cpu_supports("avx2");
  }();
  return supported ? &kAvx2 : nullptr;
#else
  return nullptr;
#endif
}

const DenseKernels& BestKernels() {
  static const DenseKernels& best = Avx2Kernels() != nullptr ? *Avx2Kernels() : kPortable;
  return best;
}

}  // namespace seedling::comms::internal
