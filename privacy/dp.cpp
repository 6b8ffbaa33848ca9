#include "privacy/dp.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numbers>

#include "base/check.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::privacy {
namespace {

absl::Status CheckBound(double bound, std::string_view what) {
  if (!(bound > 0.0) || !std::isfinite(bound)) {
    return absl::InvalidArgumentError(StrCat(what, " must be finite and > 0, got ", bound));
  }
  return absl::OkStatus();
}

absl::Status CheckFinite(std::span<const float> values) {
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      return absl::InvalidArgumentError(StrCat("value ", i, " is not finite (", values[i], ")"));
    }
  }
  return absl::OkStatus();
}

// ‖float(v · scale)‖₂ in double: the norm the clipped vector will have.
double ScaledNorm(std::span<const float> values, double scale) {
  double n2 = 0.0;
  for (float v : values) {
    const double s = static_cast<double>(static_cast<float>(static_cast<double>(v) * scale));
    n2 += s * s;
  }
  return std::sqrt(n2);
}

}  // namespace

absl::StatusOr<ClipResult> ClipToL2Norm(std::span<float> values, double clip_norm) {
  SEEDLING_RETURN_IF_ERROR(CheckBound(clip_norm, "clip norm"));
  SEEDLING_RETURN_IF_ERROR(CheckFinite(values));
  double n2 = 0.0;  // a float squared is < 1.2e77: no overflow in double for any realistic length
  for (float v : values) n2 += static_cast<double>(v) * static_cast<double>(v);
  ClipResult result;
  result.norm = std::sqrt(n2);
  if (result.norm <= clip_norm) return result;

  // McMahan et al. 2018 Alg. 1 (ClipFn, flat): Δ · C / ‖Δ‖. Each element is rounded to fp32 once, which can
  // raise the norm by a relative ~2^−24 (more for subnormal results); lower the scale by 2^−20 steps until
  // the rounded vector is within C. A vector that never gets there (C below the smallest representable
  // non-zero step) is zeroed, which is within any C.
  double scale = clip_norm / result.norm;
  bool fits = false;
  for (int attempt = 0; attempt < 64 && !fits; ++attempt) {
    fits = ScaledNorm(values, scale) <= clip_norm;
    if (!fits) scale *= 1.0 - std::ldexp(1.0, -20);
  }
  if (!fits) scale = 0.0;
  for (float& v : values) v = static_cast<float>(static_cast<double>(v) * scale);
  result.scale = scale;
  return result;
}

absl::StatusOr<int64_t> ClipScalars(std::span<float> values, double bound) {
  SEEDLING_RETURN_IF_ERROR(CheckBound(bound, "scalar clip bound"));
  SEEDLING_RETURN_IF_ERROR(CheckFinite(values));
  // The largest float ≤ bound, so the clamped value never rounds above it.
  float b = static_cast<float>(bound);
  if (static_cast<double>(b) > bound) b = std::nextafter(b, 0.0f);
  int64_t changed = 0;
  for (float& v : values) {
    if (v > b || v < -b) {
      v = v > 0 ? b : -b;
      ++changed;
    }
  }
  return changed;
}

void StandardNormalsFromWords(std::span<const uint64_t> words, std::span<double> out) {
  SEEDLING_CHECK(words.size() >= out.size() + out.size() % 2);
  size_t i = 0;
  for (size_t p = 0; i < out.size(); ++p) {
    const double u1 = static_cast<double>((words[2 * p] >> 11) + 1) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(words[2 * p + 1] >> 11) * 0x1.0p-53;    // [0, 1)
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 2.0 * std::numbers::pi * u2;
    out[i++] = r * std::cos(theta);
    if (i < out.size()) out[i++] = r * std::sin(theta);
  }
}

absl::Status NoiseSource::AddGaussian(double stddev, std::span<double> inout) {
  if (!(stddev >= 0.0) || !std::isfinite(stddev)) {
    return absl::InvalidArgumentError(StrCat("noise standard deviation must be finite and >= 0, got ", stddev));
  }
  if (stddev == 0.0) return absl::OkStatus();
  std::array<double, 4096> chunk;
  for (size_t start = 0; start < inout.size(); start += chunk.size()) {
    const size_t n = std::min(chunk.size(), inout.size() - start);
    SEEDLING_RETURN_IF_ERROR(FillStandardNormal(std::span<double>(chunk.data(), n)));
    for (size_t i = 0; i < n; ++i) inout[start + i] += stddev * chunk[i];
  }
  return absl::OkStatus();
}

absl::Status CsprngGaussianNoise::FillStandardNormal(std::span<double> out) {
  // Two 64-bit words per Box–Muller pair; 256 pairs per RAND_bytes call.
  constexpr size_t kPairs = 256;
  std::array<uint64_t, 2 * kPairs> words;
  size_t i = 0;
  while (i < out.size()) {
    const size_t pairs = std::min(kPairs, (out.size() - i + 1) / 2);
    if (RAND_bytes(reinterpret_cast<unsigned char*>(words.data()), static_cast<int>(pairs * 2 * sizeof(uint64_t))) !=
        1) {
      return absl::InternalError("OpenSSL RAND_bytes failed: no cryptographically secure randomness available");
    }
    const size_t n = std::min(2 * pairs, out.size() - i);
    StandardNormalsFromWords(std::span<const uint64_t>(words.data(), 2 * pairs), out.subspan(i, n));
    i += n;
  }
  OPENSSL_cleanse(words.data(), sizeof(words));  // the noise must not be recoverable from the stack
  return absl::OkStatus();
}

absl::Status SeededNoiseForSimulation::FillStandardNormal(std::span<double> out) {
  for (double& v : out) v = rng_.Normal();
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<NoiseSource>> MakeNoiseSource(std::string_view kind, uint64_t seed) {
  if (kind == "csprng") return std::unique_ptr<NoiseSource>(new CsprngGaussianNoise());
  if (kind == "seeded") return std::unique_ptr<NoiseSource>(new SeededNoiseForSimulation(seed));
  return absl::InvalidArgumentError(StrCat("unknown noise source '", kind, "' (expected csprng or seeded)"));
}

}  // namespace seedling::privacy
