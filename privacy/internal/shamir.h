#pragma once

// Shamir t-of-k secret sharing of byte strings over the prime field GF(p), p = 2^61 − 1 (a Mersenne prime:
// reduction is a shift and an add, products fit unsigned __int128). Internal to privacy/ (SecAgg+).
//
// Encoding: the secret is cut into 7-byte little-endian chunks (the last one zero-padded), each < 2^56 < p,
// and every chunk is shared with its own random polynomial of degree t − 1 whose constant term is the chunk.
// A 32-byte secret is 5 field elements, so one share of it is 5 × 8 = 40 bytes. Holder i gets the
// evaluations at x_i (distinct, nonzero, < p). Any t shares give the chunks back by Lagrange interpolation
// at 0; t − 1 shares are independent of the secret. Shamir alone does not detect a tampered share (it yields
// a wrong secret); SecAgg authenticates shares with AES-GCM in transit instead.

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "privacy/secagg.h"

namespace seedling::privacy::internal {

inline constexpr uint64_t kShamirPrime = (uint64_t{1} << 61) - 1;
inline constexpr size_t kShamirChunkBytes = 7;

// Field elements needed for a secret of `secret_bytes` bytes.
constexpr size_t ShamirElementCount(size_t secret_bytes) {
  return (secret_bytes + kShamirChunkBytes - 1) / kShamirChunkBytes;
}

// One holder's share: the evaluation point and one value per chunk.
struct ShamirShare {
  uint64_t x = 0;
  std::vector<uint64_t> y;
};

// Field arithmetic mod kShamirPrime (inputs must be < kShamirPrime).
uint64_t FieldMul(uint64_t a, uint64_t b);
uint64_t FieldInverse(uint64_t a);  // a != 0

// Splits `secret` into one share per entry of `xs` with reconstruction threshold `threshold`.
// InvalidArgument if threshold < 1, threshold > xs.size(), or an x is 0, ≥ p, or repeated.
// Coefficients are drawn from `random`; Internal if it fails.
absl::StatusOr<std::vector<ShamirShare>> ShamirSplit(std::span<const uint8_t> secret, int threshold,
                                                     std::span<const uint64_t> xs, RandomSource& random);

// Lagrange interpolation at 0 through all of `shares` (no threshold check: with fewer than t shares the
// result is a wrong value, which is what the threshold guarantees). InvalidArgument if `shares` is empty,
// the x's are not distinct and nonzero, the values are not field elements, or the y lengths differ.
absl::StatusOr<std::vector<uint64_t>> ShamirInterpolateAtZero(std::span<const ShamirShare> shares);

// Reconstructs a secret of `secret_bytes` bytes from the first `threshold` of `shares`.
// InvalidArgument if fewer than `threshold` shares are given, or the interpolated chunks do not fit 7 bytes
// (inconsistent shares).
absl::StatusOr<std::vector<uint8_t>> ShamirReconstruct(std::span<const ShamirShare> shares, int threshold,
                                                       size_t secret_bytes);

}  // namespace seedling::privacy::internal
