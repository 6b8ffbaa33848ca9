#pragma once

// Deterministic, counter-based random numbers (Philox4x32-10, Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11). Every random draw in Seedling that must be reproduced elsewhere (a perturbation z(seed)
// regenerated on the server, on every client and in the simulator) comes from here.
//
// The stream layout below is a wire contract: changing it breaks seed replay between versions.
//
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(block), hi32(block), lo32(stream), hi32(stream))
//   block b yields four 32-bit words (w0, w1, w2, w3) = Philox4x32-10(counter, key)
//
// Element i of a stream lives in block i / 4, lane i % 4:
//   * Normal:     (w0, w1) give elements 4b and 4b+1, (w2, w3) give 4b+2 and 4b+3, by Box-Muller:
//                 u = (w_even + 0.5) * 2^-32, r = sqrt(-2 ln u), theta = 2 pi (w_odd * 2^-32),
//                 first = r cos(theta), second = r sin(theta). ln, cos and sin are computed here with fixed
//                 polynomials in IEEE double arithmetic (no libm, no FMA contraction), so the float results
//                 are bit-identical on every conforming platform.
//   * Uniform:    element i = (w_lane >> 8) * 2^-24, in [0, 1).
//   * Rademacher: element i = +1 if the top bit of w_lane is 0, else -1.
//
// Because element i depends only on (seed, stream, i), any slice of a stream can be generated from any offset
// without generating what comes before it, and a flat parameter buffer can be perturbed in parallel chunks.

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

namespace seedling {

// The Philox4x32-10 block function (10 rounds), exactly as in the Random123 reference.
std::array<uint32_t, 4> Philox4x32(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// Named streams keep draws for different purposes independent even when they share a seed.
namespace rng_stream {
inline constexpr uint64_t kPerturbation = 0;  // zeroth-order / forward-gradient perturbations z(seed)
inline constexpr uint64_t kSampling = 1;      // token sampling in generation
inline constexpr uint64_t kInit = 2;          // random model initialization
inline constexpr uint64_t kData = 3;          // data shuffling and partitioning
inline constexpr uint64_t kDropout = 4;       // dropout masks
inline constexpr uint64_t kStepSeeds = 5;     // per-step seeds drawn by local trainers
inline constexpr uint64_t kFeedback = 6;      // fixed random feedback matrices (PEPITA's F, optim/pepita.h)
}  // namespace rng_stream

// Identifies one stream: (seed, stream id).
struct RngKey {
  uint64_t seed = 0;
  uint64_t stream = rng_stream::kPerturbation;
};

// out[j] = N(0,1) element (offset + j) of the stream. Thread-safe (pure function).
void FillNormal(RngKey key, uint64_t offset, std::span<float> out);

// inout[j] += scale * (N(0,1) element (offset + j)), in place, without any temporary of the buffer's size.
// The result equals inout[j] + float(scale * z) computed in float with one rounding per operation.
void AddNormal(RngKey key, uint64_t offset, float scale, std::span<float> inout);

// out[j] = uniform [0, 1) element (offset + j), 24-bit resolution.
void FillUniform(RngKey key, uint64_t offset, std::span<float> out);

// out[j] = +1 or -1 (element offset + j).
void FillRademacher(RngKey key, uint64_t offset, std::span<float> out);

// A sequential generator over one stream, for draws that are not a flat buffer (sampling a token, choosing
// devices, shuffling). Deterministic: the same key gives the same sequence everywhere. Not thread-safe.
class Rng {
 public:
  explicit Rng(RngKey key) : key_(key) {}
  Rng(uint64_t seed, uint64_t stream) : key_{seed, stream} {}

  uint32_t NextU32();
  uint64_t NextU64();
  // Uniform in [0, 1) with 53 bits of resolution.
  double Uniform();
  // Uniform integer in [0, n), unbiased (rejection sampling). n must be > 0.
  uint64_t UniformInt(uint64_t n);
  // Standard normal (Box-Muller on two 32-bit words, same math as FillNormal).
  double Normal();

 private:
  RngKey key_;
  uint64_t block_ = 0;
  std::array<uint32_t, 4> words_{};
  int next_lane_ = 4;  // 4 = words_ exhausted
};

}  // namespace seedling
