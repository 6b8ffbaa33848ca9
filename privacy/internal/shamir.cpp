#include "privacy/internal/shamir.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <set>

#include "base/status.h"
#include "base/strings.h"

namespace seedling::privacy::internal {
namespace {

constexpr uint64_t kP = kShamirPrime;

uint64_t Reduce(unsigned __int128 z) {
  // z = hi·2^61 + lo ≡ hi + lo (mod 2^61 − 1).
  uint64_t r = (static_cast<uint64_t>(z) & kP) + static_cast<uint64_t>(z >> 61);
  r = (r & kP) + (r >> 61);
  return r >= kP ? r - kP : r;
}

uint64_t FieldAdd(uint64_t a, uint64_t b) {
  const uint64_t r = a + b;
  return r >= kP ? r - kP : r;
}

uint64_t FieldSub(uint64_t a, uint64_t b) { return a >= b ? a - b : a + kP - b; }

// A uniform field element by rejection sampling on 61-bit draws.
absl::StatusOr<uint64_t> RandomElement(RandomSource& random) {
  for (;;) {
    std::array<uint8_t, 8> bytes;
    SEEDLING_RETURN_IF_ERROR(random.Fill(bytes));
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | bytes[i];
    v &= kP;
    if (v < kP) return v;
  }
}

}  // namespace

uint64_t FieldMul(uint64_t a, uint64_t b) { return Reduce(static_cast<unsigned __int128>(a) * b); }

uint64_t FieldInverse(uint64_t a) {
  // Fermat: a^(p−2).
  uint64_t result = 1, base = a, e = kP - 2;
  while (e) {
    if (e & 1) result = FieldMul(result, base);
    base = FieldMul(base, base);
    e >>= 1;
  }
  return result;
}

absl::StatusOr<std::vector<ShamirShare>> ShamirSplit(std::span<const uint8_t> secret, int threshold,
                                                     std::span<const uint64_t> xs, RandomSource& random) {
  if (threshold < 1 || static_cast<size_t>(threshold) > xs.size()) {
    return absl::InvalidArgumentError(
        StrCat("Shamir threshold ", threshold, " must be in [1, ", xs.size(), "] (the holders)"));
  }
  std::set<uint64_t> seen;
  for (uint64_t x : xs) {
    if (x == 0 || x >= kP || !seen.insert(x).second) {
      return absl::InvalidArgumentError(
          StrCat("Shamir evaluation point ", x, " is zero, out of the field or repeated"));
    }
  }
  const size_t elements = ShamirElementCount(secret.size());
  std::vector<ShamirShare> shares(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    shares[i].x = xs[i];
    shares[i].y.resize(elements);
  }
  std::vector<uint64_t> coeffs(static_cast<size_t>(threshold));
  for (size_t e = 0; e < elements; ++e) {
    uint64_t chunk = 0;
    const size_t begin = e * kShamirChunkBytes;
    const size_t end = std::min(secret.size(), begin + kShamirChunkBytes);
    for (size_t b = end; b > begin; --b) chunk = (chunk << 8) | secret[b - 1];
    coeffs[0] = chunk;
    for (size_t c = 1; c < coeffs.size(); ++c) {
      SEEDLING_ASSIGN_OR_RETURN(coeffs[c], RandomElement(random));
    }
    for (ShamirShare& share : shares) {
      uint64_t acc = 0;  // Horner
      for (size_t c = coeffs.size(); c > 0; --c) acc = FieldAdd(FieldMul(acc, share.x), coeffs[c - 1]);
      share.y[e] = acc;
    }
  }
  std::fill(coeffs.begin(), coeffs.end(), 0);
  return shares;
}

absl::StatusOr<std::vector<uint64_t>> ShamirInterpolateAtZero(std::span<const ShamirShare> shares) {
  if (shares.empty()) return absl::InvalidArgumentError("Shamir interpolation needs at least one share");
  const size_t elements = shares[0].y.size();
  std::set<uint64_t> seen;
  for (const ShamirShare& s : shares) {
    if (s.x == 0 || s.x >= kP || !seen.insert(s.x).second) {
      return absl::InvalidArgumentError(StrCat("Shamir share point ", s.x, " is zero, out of the field or repeated"));
    }
    if (s.y.size() != elements) {
      return absl::InvalidArgumentError(StrCat("Shamir share has ", s.y.size(), " values, expected ", elements));
    }
    for (uint64_t v : s.y) {
      if (v >= kP) return absl::InvalidArgumentError("Shamir share value is not a field element");
    }
  }
  // Lagrange basis at 0: λ_i = Π_{j≠i} x_j / (x_j − x_i).
  std::vector<uint64_t> result(elements, 0);
  for (size_t i = 0; i < shares.size(); ++i) {
    uint64_t num = 1, den = 1;
    for (size_t j = 0; j < shares.size(); ++j) {
      if (j == i) continue;
      num = FieldMul(num, shares[j].x);
      den = FieldMul(den, FieldSub(shares[j].x, shares[i].x));
    }
    const uint64_t lambda = FieldMul(num, FieldInverse(den));
    for (size_t e = 0; e < elements; ++e) {
      result[e] = FieldAdd(result[e], FieldMul(lambda, shares[i].y[e]));
    }
  }
  return result;
}

absl::StatusOr<std::vector<uint8_t>> ShamirReconstruct(std::span<const ShamirShare> shares, int threshold,
                                                       size_t secret_bytes) {
  if (threshold < 1 || shares.size() < static_cast<size_t>(threshold)) {
    return absl::InvalidArgumentError(
        StrCat("Shamir reconstruction needs ", threshold, " shares, got ", shares.size()));
  }
  const size_t elements = ShamirElementCount(secret_bytes);
  SEEDLING_ASSIGN_OR_RETURN(std::vector<uint64_t> chunks,
                            ShamirInterpolateAtZero(shares.first(static_cast<size_t>(threshold))));
  if (chunks.size() != elements) {
    return absl::InvalidArgumentError(
        StrCat("Shamir shares hold ", chunks.size(), " elements, a ", secret_bytes, "-byte secret needs ", elements));
  }
  std::vector<uint8_t> secret(secret_bytes);
  for (size_t e = 0; e < elements; ++e) {
    uint64_t chunk = chunks[e];
    const size_t begin = e * kShamirChunkBytes;
    const size_t end = std::min(secret_bytes, begin + kShamirChunkBytes);
    for (size_t b = begin; b < end; ++b) {
      secret[b] = static_cast<uint8_t>(chunk & 0xff);
      chunk >>= 8;
    }
    if (chunk != 0) {
      return absl::InvalidArgumentError(
          "Shamir reconstruction gave a chunk wider than the secret (inconsistent shares)");
    }
  }
  return secret;
}

}  // namespace seedling::privacy::internal
