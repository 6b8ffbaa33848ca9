#include "base/philox.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace seedling {
namespace {

TEST_CASE("Philox4x32-10 matches the Random123 known-answer vectors", "[base][philox]") {
  // Random123 tests/kat_vectors, philox4x32 with 10 rounds.
  CHECK(Philox4x32({0, 0, 0, 0}, {0, 0}) ==
        std::array<uint32_t, 4>{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  CHECK(Philox4x32({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu}) ==
        std::array<uint32_t, 4>{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  CHECK(Philox4x32({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}) ==
        std::array<uint32_t, 4>{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
}

// Box-Muller with libm, for checking the deterministic polynomials (not bit-exact, only close).
void ReferenceNormals(uint64_t seed, uint64_t stream, uint64_t block, double out[4]) {
  auto w = Philox4x32({static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), static_cast<uint32_t>(stream),
                       static_cast<uint32_t>(stream >> 32)},
                      {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
  for (int pair = 0; pair < 2; ++pair) {
    const double u = (static_cast<double>(w[2 * pair]) + 0.5) / 4294967296.0;
    const double theta = 2.0 * M_PI * (static_cast<double>(w[2 * pair + 1]) / 4294967296.0);
    const double r = std::sqrt(-2.0 * std::log(u));
    out[2 * pair] = r * std::cos(theta);
    out[2 * pair + 1] = r * std::sin(theta);
  }
}

TEST_CASE("FillNormal agrees with libm Box-Muller to float precision", "[base][philox]") {
  const RngKey key{12345, rng_stream::kPerturbation};
  std::vector<float> z(4096);
  FillNormal(key, 0, z);
  for (uint64_t b = 0; b < z.size() / 4; ++b) {
    double ref[4];
    ReferenceNormals(key.seed, key.stream, b, ref);
    for (int lane = 0; lane < 4; ++lane) {
      INFO("element " << 4 * b + lane);
      CHECK(std::abs(z[4 * b + lane] - ref[lane]) <= 2e-6 * (1.0 + std::abs(ref[lane])));
    }
  }
}

TEST_CASE("FillNormal gives fixed known values (the cross-platform contract)", "[base][philox]") {
  // These exact floats are what every client, server and simulator must produce for seed 42. If this test
  // fails after a change, the change broke seed replay against every deployed version.
  std::vector<float> z(8);
  FillNormal({42, rng_stream::kPerturbation}, 1000, z);
  const uint32_t expected_bits[8] = {0xbe93d534u, 0xbfa28429u, 0xbf1af534u, 0xbea98645u,
                                     0x3f9c77d4u, 0x3e9c683au, 0x3f62d2d0u, 0xbc7a030eu};
  for (int i = 0; i < 8; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &z[i], 4);
    INFO("element " << 1000 + i << " = " << z[i]);
    CHECK(bits == expected_bits[i]);
  }
}

TEST_CASE("Any slice of a normal stream equals the same slice of the whole stream", "[base][philox]") {
  const RngKey key{987654321987ull, 7};
  std::vector<float> whole(1003);
  FillNormal(key, 0, whole);
  for (uint64_t off : {0, 1, 2, 3, 4, 5, 517, 998}) {
    for (size_t len : {0, 1, 2, 3, 5, 8, 13}) {
      if (off + len > whole.size()) continue;
      std::vector<float> part(len);
      FillNormal(key, off, part);
      for (size_t j = 0; j < len; ++j) {
        INFO("offset " << off << " len " << len << " j " << j);
        REQUIRE(std::memcmp(&part[j], &whole[off + j], 4) == 0);
      }
    }
  }
}

TEST_CASE("AddNormal perturbs in place exactly as x + scale * z", "[base][philox]") {
  const RngKey key{5, rng_stream::kPerturbation};
  std::vector<float> x(777), z(777);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.001f * static_cast<float>(i);
  std::vector<float> y = x;
  AddNormal(key, 3, 0.25f, y);
  FillNormal(key, 3, z);
  for (size_t i = 0; i < x.size(); ++i) REQUIRE(y[i] == x[i] + 0.25f * z[i]);
  // +eps then -eps restores up to rounding (MeZO's restore step relies on this being tiny).
  AddNormal(key, 3, -0.25f, y);
  for (size_t i = 0; i < x.size(); ++i) REQUIRE(std::abs(y[i] - x[i]) <= 1e-6f * (1.0f + std::abs(x[i])));
}

TEST_CASE("Normal stream has zero mean and unit variance, and seeds and streams differ", "[base][philox]") {
  std::vector<float> z(1 << 18);
  FillNormal({1, 0}, 0, z);
  double sum = 0, sq = 0;
  for (float v : z) {
    sum += v;
    sq += static_cast<double>(v) * v;
  }
  const double mean = sum / z.size();
  const double var = sq / z.size() - mean * mean;
  CHECK(std::abs(mean) < 0.01);
  CHECK(std::abs(var - 1.0) < 0.01);
  std::vector<float> other_seed(16), other_stream(16);
  FillNormal({2, 0}, 0, other_seed);
  FillNormal({1, 1}, 0, other_stream);
  CHECK(std::memcmp(other_seed.data(), z.data(), 64) != 0);
  CHECK(std::memcmp(other_stream.data(), z.data(), 64) != 0);
}

TEST_CASE("Uniform and Rademacher streams have the right range and balance", "[base][philox]") {
  std::vector<float> u(100000), r(100000);
  FillUniform({3, 0}, 0, u);
  FillRademacher({3, 0}, 0, r);
  double usum = 0, rsum = 0;
  for (float v : u) {
    REQUIRE(v >= 0.0f);
    REQUIRE(v < 1.0f);
    usum += v;
  }
  for (float v : r) {
    REQUIRE((v == 1.0f || v == -1.0f));
    rsum += v;
  }
  CHECK(std::abs(usum / u.size() - 0.5) < 0.01);
  CHECK(std::abs(rsum / r.size()) < 0.02);
}

TEST_CASE("Rng is deterministic and UniformInt stays in range", "[base][philox]") {
  Rng a(99, rng_stream::kSampling), b(99, rng_stream::kSampling);
  std::vector<int> counts(7, 0);
  for (int i = 0; i < 7000; ++i) {
    const uint64_t x = a.UniformInt(7);
    REQUIRE(x == b.UniformInt(7));
    REQUIRE(x < 7);
    counts[x]++;
  }
  for (int c : counts) CHECK(std::abs(c - 1000) < 150);
  const double u = a.Uniform();
  CHECK(u >= 0.0);
  CHECK(u < 1.0);
}

}  // namespace
}  // namespace seedling
