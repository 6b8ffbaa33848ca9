// Compiled with -ffp-contract=off (base/CMakeLists.txt): a fused multiply-add rounds once where a multiply
// and an add round twice, so letting the compiler contract would make results depend on the target CPU.

#include "base/philox.h"

#include <bit>
#include <cmath>

#include "base/check.h"

namespace seedling {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u;  // Philox4x32 multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kW1 = 0xBB67AE85u;

inline std::array<uint32_t, 4> PhiloxBlock(uint64_t block, RngKey key) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = static_cast<uint32_t>(key.stream), c3 = static_cast<uint32_t>(key.stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(key.seed), k1 = static_cast<uint32_t>(key.seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return {c0, c1, c2, c3};
}

// Natural log of u in (0, 1), IEEE double arithmetic only. u = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716, series through s^21 (error < 1e-17 relative).
inline double DeterministicLog(double u) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2 split in two (fdlibm) for accuracy
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kSqrt2 = 1.41421356237309504880;
  const uint64_t bits = std::bit_cast<uint64_t>(u);
  int64_t e = static_cast<int64_t>((bits >> 52) & 0x7ff) - 1023;
  double m = std::bit_cast<double>((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull);  // [1, 2)
  const bool big = m > kSqrt2;
  m = big ? m * 0.5 : m;  // exact
  e = big ? e + 1 : e;
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double p = 1.0 / 21.0;
  p = p * s2 + 1.0 / 19.0;
  p = p * s2 + 1.0 / 17.0;
  p = p * s2 + 1.0 / 15.0;
  p = p * s2 + 1.0 / 13.0;
  p = p * s2 + 1.0 / 11.0;
  p = p * s2 + 1.0 / 9.0;
  p = p * s2 + 1.0 / 7.0;
  p = p * s2 + 1.0 / 5.0;
  p = p * s2 + 1.0 / 3.0;
  p = p * s2 + 1.0;
  const double de = static_cast<double>(e);
  return de * kLn2Hi + (de * kLn2Lo + 2.0 * s * p);
}

// cos and sin of 2 pi x for x = w * 2^-32. The top two bits of w pick the quadrant; the remaining 30 bits
// give a in [0, pi/2), evaluated by Taylor series through a^22 (truncation error < 2e-18).
inline void DeterministicCosSin2Pi(uint32_t w, double* c_out, double* s_out) {
  constexpr double kHalfPi = 1.57079632679489661923;
  constexpr double kInv2_30 = 1.0 / 1073741824.0;
  const uint32_t quadrant = w >> 30;
  const double a = static_cast<double>(w & 0x3fffffffu) * kInv2_30 * kHalfPi;
  const double a2 = a * a;
  // sin a = a (1 - a2/3! + a2^2/5! - ...), cos a = 1 - a2/2! + a2^2/4! - ...
  double sp = -1.0 / 51090942171709440000.0;  // -1/21!
  sp = sp * a2 + 1.0 / 121645100408832000.0;  // 1/19!
  sp = sp * a2 - 1.0 / 355687428096000.0;     // 1/17!
  sp = sp * a2 + 1.0 / 1307674368000.0;       // 1/15!
  sp = sp * a2 - 1.0 / 6227020800.0;          // 1/13!
  sp = sp * a2 + 1.0 / 39916800.0;            // 1/11!
  sp = sp * a2 - 1.0 / 362880.0;              // 1/9!
  sp = sp * a2 + 1.0 / 5040.0;                // 1/7!
  sp = sp * a2 - 1.0 / 120.0;                 // 1/5!
  sp = sp * a2 + 1.0 / 6.0;                   // 1/3!, sign folded below
  const double sin_a = a - a * a2 * sp;
  double cp = 1.0 / 1124000727777607680000.0;  // 1/22!
  cp = cp * a2 - 1.0 / 2432902008176640000.0;  // 1/20!
  cp = cp * a2 + 1.0 / 6402373705728000.0;     // 1/18!
  cp = cp * a2 - 1.0 / 20922789888000.0;       // 1/16!
  cp = cp * a2 + 1.0 / 87178291200.0;          // 1/14!
  cp = cp * a2 - 1.0 / 479001600.0;            // 1/12!
  cp = cp * a2 + 1.0 / 3628800.0;              // 1/10!
  cp = cp * a2 - 1.0 / 40320.0;                // 1/8!
  cp = cp * a2 + 1.0 / 720.0;                  // 1/6!
  cp = cp * a2 - 1.0 / 24.0;                   // 1/4!
  cp = cp * a2 + 1.0 / 2.0;                    // 1/2!, sign folded below
  const double cos_a = 1.0 - a2 * cp;
  // theta = quadrant * pi/2 + a.
  const bool swap = (quadrant & 1u) != 0;
  const double c = swap ? sin_a : cos_a;
  const double s = swap ? cos_a : sin_a;
  *c_out = (quadrant == 1u || quadrant == 2u) ? -c : c;
  *s_out = (quadrant >= 2u) ? -s : s;
}

// Two standard normals from two 32-bit words (Box-Muller).
inline void BoxMuller(uint32_t w_u, uint32_t w_theta, float* z0, float* z1) {
  constexpr double kInv2_32 = 1.0 / 4294967296.0;
  const double u = (static_cast<double>(w_u) + 0.5) * kInv2_32;  // (0, 1), never 0
  const double r = std::sqrt(-2.0 * DeterministicLog(u));        // sqrt is correctly rounded (IEEE)
  double c, s;
  DeterministicCosSin2Pi(w_theta, &c, &s);
  *z0 = static_cast<float>(r * c);
  *z1 = static_cast<float>(r * s);
}

inline void NormalBlock(uint64_t block, RngKey key, float out[4]) {
  const std::array<uint32_t, 4> w = PhiloxBlock(block, key);
  BoxMuller(w[0], w[1], &out[0], &out[1]);
  BoxMuller(w[2], w[3], &out[2], &out[3]);
}

// Calls fn(index_in_span, value) for elements [offset, offset + n) of a stream whose block function is
// `block_fn(block, float[4])`. Whole blocks are computed in a tight loop; partial blocks at both ends go
// through a scratch block.
template <typename BlockFn, typename Fn>
inline void ForEachElement(uint64_t offset, size_t n, BlockFn block_fn, Fn fn) {
  if (n == 0) return;
  size_t j = 0;
  float tmp[4];
  // Leading partial block.
  if (offset % 4 != 0) {
    const uint64_t block = offset / 4;
    block_fn(block, tmp);
    for (uint64_t lane = offset % 4; lane < 4 && j < n; ++lane) fn(j++, tmp[lane]);
  }
  // Whole blocks.
  uint64_t block = (offset + j) / 4;
  while (n - j >= 4) {
    block_fn(block++, tmp);
    fn(j, tmp[0]);
    fn(j + 1, tmp[1]);
    fn(j + 2, tmp[2]);
    fn(j + 3, tmp[3]);
    j += 4;
  }
  // Trailing partial block.
  if (j < n) {
    block_fn(block, tmp);
    for (int lane = 0; j < n; ++lane) fn(j++, tmp[lane]);
  }
}

}  // namespace

std::array<uint32_t, 4> Philox4x32(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
  const uint64_t block = counter[0] | (static_cast<uint64_t>(counter[1]) << 32);
  const RngKey k{key[0] | (static_cast<uint64_t>(key[1]) << 32),
                 counter[2] | (static_cast<uint64_t>(counter[3]) << 32)};
  return PhiloxBlock(block, k);
}

void FillNormal(RngKey key, uint64_t offset, std::span<float> out) {
  float* p = out.data();
  ForEachElement(
      offset, out.size(), [key](uint64_t b, float* v) { NormalBlock(b, key, v); },
      [p](size_t j, float v) { p[j] = v; });
}

void AddNormal(RngKey key, uint64_t offset, float scale, std::span<float> inout) {
  float* p = inout.data();
  ForEachElement(
      offset, inout.size(), [key](uint64_t b, float* v) { NormalBlock(b, key, v); },
      [p, scale](size_t j, float v) { p[j] += scale * v; });
}

void FillUniform(RngKey key, uint64_t offset, std::span<float> out) {
  float* p = out.data();
  ForEachElement(
      offset, out.size(),
      [key](uint64_t b, float* v) {
        const std::array<uint32_t, 4> w = PhiloxBlock(b, key);
        for (int i = 0; i < 4; ++i) v[i] = static_cast<float>(w[i] >> 8) * (1.0f / 16777216.0f);
      },
      [p](size_t j, float v) { p[j] = v; });
}

void FillRademacher(RngKey key, uint64_t offset, std::span<float> out) {
  float* p = out.data();
  ForEachElement(
      offset, out.size(),
      [key](uint64_t b, float* v) {
        const std::array<uint32_t, 4> w = PhiloxBlock(b, key);
        for (int i = 0; i < 4; ++i) v[i] = (w[i] >> 31) ? -1.0f : 1.0f;
      },
      [p](size_t j, float v) { p[j] = v; });
}

uint32_t Rng::NextU32() {
  if (next_lane_ == 4) {
    words_ = PhiloxBlock(block_++, key_);
    next_lane_ = 0;
  }
  return words_[next_lane_++];
}

uint64_t Rng::NextU64() {
  const uint64_t lo = NextU32();
  const uint64_t hi = NextU32();
  return lo | (hi << 32);
}

double Rng::Uniform() { return static_cast<double>(NextU64() >> 11) * (1.0 / 9007199254740992.0); }

uint64_t Rng::UniformInt(uint64_t n) {
  SEEDLING_CHECK(n > 0, "UniformInt needs n > 0");
  // Reject the top partial copy of [0, n) so every value is equally likely.
  const uint64_t limit = UINT64_MAX - (UINT64_MAX % n);
  uint64_t x;
  do {
    x = NextU64();
  } while (x >= limit);
  return x % n;
}

double Rng::Normal() {
  const uint32_t a = NextU32();
  const uint32_t b = NextU32();
  float z0, z1;
  BoxMuller(a, b, &z0, &z1);
  return z0;
}

}  // namespace seedling
