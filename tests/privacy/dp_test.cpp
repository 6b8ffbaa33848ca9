#include "privacy/dp.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <vector>

#include "base/philox.h"

namespace sp = seedling::privacy;

namespace {

double Norm(const std::vector<float>& v) {
  double n2 = 0;
  for (float x : v) n2 += static_cast<double>(x) * x;
  return std::sqrt(n2);
}

struct Moments {
  double mean = 0, stddev = 0;
};

Moments MomentsOf(const std::vector<double>& v) {
  double s = 0, s2 = 0;
  for (double x : v) s += x;
  const double mean = s / v.size();
  for (double x : v) s2 += (x - mean) * (x - mean);
  return {mean, std::sqrt(s2 / (v.size() - 1))};
}

}  // namespace

TEST_CASE("Every clipped vector has L2 norm at most C", "[privacy][dp]") {
  seedling::Rng rng(7, 0);
  const float kMax = std::numeric_limits<float>::max();
  const float kDenorm = std::numeric_limits<float>::denorm_min();
  int clipped = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const size_t n = 1 + rng.UniformInt(300);
    // Magnitudes from subnormal to the largest float, and clip norms from 1e-30 to 1e30.
    const int kind = static_cast<int>(rng.UniformInt(5));
    std::vector<float> v(n);
    for (float& x : v) {
      const double g = rng.Normal();
      switch (kind) {
        case 0:
          x = static_cast<float>(g);
          break;
        case 1:
          x = static_cast<float>(g * 1e36);
          break;
        case 2:
          x = (g > 0 ? kMax : -kMax);
          break;
        case 3:
          x = static_cast<float>(g) * kDenorm * 7;
          break;
        default:
          x = static_cast<float>(g * std::exp(rng.Uniform() * 160 - 80));
          break;
      }
    }
    const double c = std::exp(rng.Uniform() * 138 - 69);
    const std::vector<float> before = v;
    auto r = sp::ClipToL2Norm(v, c);
    REQUIRE(r.ok());
    INFO("trial " << trial << " kind " << kind << " n " << n << " C " << c << " norm before " << r->norm);
    CHECK(Norm(v) <= c);
    CHECK(r->norm == Approx(Norm(before)).epsilon(1e-12));
    if (r->clipped()) {
      ++clipped;
      CHECK(r->scale <= c / r->norm);
    } else {
      CHECK(v == before);
    }
  }
  CHECK(clipped > 500);  // the generator above really exercises clipping
}

TEST_CASE("Clipping scales a vector over the bound to exactly C and leaves zero alone", "[privacy][dp]") {
  std::vector<float> v = {3.0f, 4.0f};
  auto r = sp::ClipToL2Norm(v, 1.0);
  REQUIRE(r.ok());
  CHECK(r->norm == 5.0);
  CHECK(v[0] == Approx(0.6).epsilon(1e-6));
  CHECK(v[1] == Approx(0.8).epsilon(1e-6));
  std::vector<float> zero(10, 0.0f);
  auto z = sp::ClipToL2Norm(zero, 1.0);
  REQUIRE(z.ok());
  CHECK(z->norm == 0.0);
  CHECK(!z->clipped());
}

TEST_CASE("Clipping refuses a bad bound or non-finite values and changes nothing", "[privacy][dp]") {
  std::vector<float> v = {1.0f, std::numeric_limits<float>::infinity()};
  CHECK(sp::ClipToL2Norm(v, 1.0).status().code() == absl::StatusCode::kInvalidArgument);
  std::vector<float> w = {1.0f, 2.0f};
  CHECK(sp::ClipToL2Norm(w, 0.0).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::ClipToL2Norm(w, std::nan("")).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(w == std::vector<float>{1.0f, 2.0f});
}

TEST_CASE("Seed scalars are clamped to the bound", "[privacy][dp]") {
  std::vector<float> s = {0.5f, -3.0f, 2.0f, -0.1f, 1e30f};
  auto n = sp::ClipScalars(s, 1.0);
  REQUIRE(n.ok());
  CHECK(*n == 3);
  CHECK(s == std::vector<float>{0.5f, -1.0f, 1.0f, -0.1f, 1.0f});
  // A bound that is not an fp32 value: the clamp stays at or below it.
  std::vector<float> t = {1.0f, -1.0f};
  REQUIRE(sp::ClipScalars(t, 0.1).ok());
  CHECK(static_cast<double>(t[0]) <= 0.1);
  CHECK(static_cast<double>(-t[1]) <= 0.1);
}

TEST_CASE("CSPRNG noise has mean 0 and the requested standard deviation within 1% over 10^6 draws", "[privacy][dp]") {
  sp::CsprngGaussianNoise noise;
  std::vector<double> v(1'000'000, 0.0);
  REQUIRE(noise.AddGaussian(2.5, v).ok());
  const Moments m = MomentsOf(v);
  CHECK(m.stddev == Approx(2.5).epsilon(0.01));
  CHECK(std::abs(m.mean) < 5 * 2.5 / 1000.0);  // 5 standard errors
  // Tails look Gaussian: P(|z| > 2σ) = 4.55%.
  size_t beyond = 0;
  for (double x : v) beyond += std::abs(x) > 5.0;
  CHECK(static_cast<double>(beyond) / v.size() == Approx(0.0455).epsilon(0.03));
}

TEST_CASE("Seeded simulation noise has the requested standard deviation within 1% over 10^6 draws", "[privacy][dp]") {
  sp::SeededNoiseForSimulation noise(11);
  std::vector<double> v(1'000'000, 1.0);
  REQUIRE(noise.AddGaussian(0.3, v).ok());
  const Moments m = MomentsOf(v);
  CHECK(m.stddev == Approx(0.3).epsilon(0.01));
  CHECK(std::abs(m.mean - 1.0) < 5 * 0.3 / 1000.0);
}

TEST_CASE("Two CSPRNG sources draw different streams, two seeded sources with one seed the same", "[privacy][dp]") {
  sp::CsprngGaussianNoise a, b;
  std::vector<double> x(1000), y(1000);
  REQUIRE(a.FillStandardNormal(x).ok());
  REQUIRE(b.FillStandardNormal(y).ok());
  CHECK(x != y);
  CHECK(a.cryptographically_secure());

  sp::SeededNoiseForSimulation s1(42), s2(42), s3(43);
  std::vector<double> p(1001), q(1001), r(1001);
  REQUIRE(s1.FillStandardNormal(p).ok());
  REQUIRE(s2.FillStandardNormal(q).ok());
  REQUIRE(s3.FillStandardNormal(r).ok());
  CHECK(p == q);
  CHECK(p != r);
  CHECK(!s1.cryptographically_secure());
}

TEST_CASE("MakeNoiseSource knows csprng and seeded only, a negative stddev is refused", "[privacy][dp]") {
  auto c = sp::MakeNoiseSource("csprng", 0);
  REQUIRE(c.ok());
  CHECK((*c)->kind() == "csprng");
  auto s = sp::MakeNoiseSource("seeded", 1);
  REQUIRE(s.ok());
  CHECK((*s)->kind() == "seeded");
  CHECK(sp::MakeNoiseSource("urandom", 0).status().code() == absl::StatusCode::kInvalidArgument);
  std::vector<double> v(3, 0.0);
  CHECK((*c)->AddGaussian(-1.0, v).code() == absl::StatusCode::kInvalidArgument);
  REQUIRE((*c)->AddGaussian(0.0, v).ok());
  CHECK(v == std::vector<double>(3, 0.0));
}
