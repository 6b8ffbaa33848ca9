#pragma once

// Client-level differential privacy primitives (docs/methods.md, "Differential privacy (DP-FedAvg and the
// accountant)"): flat L2 clipping of an update, clipping of seed-method scalars, and Gaussian noise sources.
//
// Noise sources (one small interface, NoiseSource):
//   * CsprngGaussianNoise — for deployment. 64-bit words from OpenSSL RAND_bytes (the OS-seeded DRBG), turned
//     into uniform doubles u1 = (w1 >> 11 + 1)·2^−53 ∈ (0, 1] and u2 = (w2 >> 11)·2^−53 ∈ [0, 1), then the
//     Box–Muller transform r = √(−2 ln u1), z = (r cos 2πu2, r sin 2πu2) gives two independent N(0, 1) draws.
//     The 53-bit uniforms bound |z| ≤ √(−2 ln 2^−53) ≈ 8.57, a tail cut at probability ~1e−17 per draw.
//     Caveat: like every textbook floating-point sampler it is not hardened against the floating-point
//     side channels of Mironov 2012 / Jin et al. 2022 (the low bits of a noised value can carry information);
//     the released aggregate here is rounded to fp32 afterwards, which blurs but does not provably remove it.
//   * SeededNoiseForSimulation — NOT FOR DEPLOYMENT: anyone who knows the seed can subtract the noise. The
//     simulator uses it so that a run is reproducible (docs/contributing.md, "Memory and numbers"). Draws N(0, 1) from
//     the Philox stream (seed, kDpNoiseStream) with base/philox.h's Box–Muller (seedling::Rng::Normal).
//
// Thread safety: the functions are pure; a NoiseSource instance is not thread-safe (one per aggregator).

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/philox.h"

namespace seedling::privacy {

// The Philox stream id of SeededNoiseForSimulation ("DPNOISE" in ASCII, far from base/philox.h's small ids).
inline constexpr uint64_t kDpNoiseStream = 0x0044504E4F495345ull;

struct ClipResult {
  double norm = 0;   // L2 norm before clipping (computed in double)
  double scale = 1;  // factor applied to every element: 1 when norm ≤ clip_norm, else < clip_norm / norm
  bool clipped() const { return scale < 1.0; }
};

// Flat L2 clipping: values ← values · min(1, C / ‖values‖₂) (McMahan et al. 2018, Alg. 1). Guarantees
// ‖values‖₂ ≤ C afterwards as computed in double over the fp32 results (fp32 rounding of v·scale can push a
// norm just above C; the scale is then lowered by a few ulps until it holds). InvalidArgument, values
// unchanged, unless C is finite and > 0 and every value is finite.
absl::StatusOr<ClipResult> ClipToL2Norm(std::span<float> values, double clip_norm);

// Clamps each value to [−bound, bound] (seed methods: each scalar ĝ is one coordinate). Returns how many
// were changed. InvalidArgument, values unchanged, unless bound is finite and > 0 and every value is finite.
absl::StatusOr<int64_t> ClipScalars(std::span<float> values, double bound);

// The CSPRNG conversion above: Box–Muller on pairs of uniformly random 64-bit words, out[2p] and out[2p + 1]
// from words[2p] and words[2p + 1]. `words` must hold at least out.size() rounded up to even (checked).
void StandardNormalsFromWords(std::span<const uint64_t> words, std::span<double> out);

// A source of i.i.d. N(0, 1) draws.
class NoiseSource {
 public:
  virtual ~NoiseSource() = default;
  // "csprng" or "seeded".
  virtual std::string_view kind() const = 0;
  // True only for a source fit for deployment.
  virtual bool cryptographically_secure() const = 0;
  // Fills `out` with standard normal draws. Internal if the underlying generator fails (OpenSSL).
  virtual absl::Status FillStandardNormal(std::span<double> out) = 0;

  // inout[i] += stddev · N(0, 1), in chunks (no temporary of the buffer's size). InvalidArgument unless
  // stddev is finite and ≥ 0 (0 adds nothing and draws nothing).
  absl::Status AddGaussian(double stddev, std::span<double> inout);
};

// Gaussian noise from OpenSSL's CSPRNG (see above). Each instance draws an independent stream.
class CsprngGaussianNoise final : public NoiseSource {
 public:
  std::string_view kind() const override { return "csprng"; }
  bool cryptographically_secure() const override { return true; }
  absl::Status FillStandardNormal(std::span<double> out) override;
};

// NOT FOR DEPLOYMENT: reproducible noise for the simulator and tests (see above). Two instances with the
// same seed produce the same draws.
class SeededNoiseForSimulation final : public NoiseSource {
 public:
  explicit SeededNoiseForSimulation(uint64_t seed) : rng_(seed, kDpNoiseStream) {}
  std::string_view kind() const override { return "seeded"; }
  bool cryptographically_secure() const override { return false; }
  absl::Status FillStandardNormal(std::span<double> out) override;

 private:
  seedling::Rng rng_;
};

// "csprng" → CsprngGaussianNoise; "seeded" → SeededNoiseForSimulation(seed). InvalidArgument otherwise.
absl::StatusOr<std::unique_ptr<NoiseSource>> MakeNoiseSource(std::string_view kind, uint64_t seed);

}  // namespace seedling::privacy
