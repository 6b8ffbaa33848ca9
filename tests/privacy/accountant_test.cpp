#include "privacy/accountant.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace sp = seedling::privacy;

namespace {

// A_α = E_{x∼μ0}[(μ(x)/μ0(x))^α] with μ0 = N(0, σ²), μ = (1−q) N(0, σ²) + q N(1, σ²) (Mironov et al. 2019,
// the definition the closed forms are derived from), by the trapezoid rule on a wide grid. Slow and
// simple: the reference for both code paths of the accountant.
double RdpByIntegration(double q, double sigma, double alpha) {
  const double lo = -40.0 * sigma - 20.0, hi = 40.0 * sigma + 20.0;
  const int n = 400000;
  const double h = (hi - lo) / n;
  double sum = 0.0;
  for (int k = 0; k <= n; ++k) {
    const double x = lo + h * k;
    // log μ0 (without 1/(σ√(2π)), applied at the end) and log(μ/μ0) = log((1−q) + q e^t), in log space so
    // the far tail neither overflows nor underflows into NaN.
    const double log_mu0 = -x * x / (2 * sigma * sigma);
    const double t = (2 * x - 1) / (2 * sigma * sigma);
    const double log_ratio = t > 0 ? t + std::log(q + (1 - q) * std::exp(-t)) : std::log((1 - q) + q * std::exp(t));
    const double f = std::exp(log_mu0 + alpha * log_ratio);
    sum += (k == 0 || k == n) ? f / 2 : f;
  }
  const double a = sum * h / (sigma * std::sqrt(2 * M_PI));
  return std::log(a) / (alpha - 1);
}

}  // namespace

TEST_CASE("Accountant reproduces Opacus' reference epsilon (q=0.04, sigma=1.5, 2250 steps)", "[privacy][accountant]") {
  // Opacus tests/accountants_test.py: sample_rate 0.04, noise 1.5, 2250 steps, δ = 1e-5 → ε = 7.32911117143
  // (Balle et al. 2020 conversion, Opacus' order grid; ours adds 128, 256, 512 which do not win here).
  auto spent = sp::ComputeEpsilon(0.04, 1.5, 2250, 1e-5);
  REQUIRE(spent.ok());
  CHECK(spent->epsilon == Approx(7.32911117143).epsilon(0.01));
  CHECK(spent->order < 64);
}

TEST_CASE("Accountant reproduces TF-Privacy's reference epsilon (q=0.0025, sigma=1.3, 6000 steps)",
          "[privacy][accountant]") {
  // TF-Privacy compute_dp_sgd_privacy_test: n = 60000, batch 150, σ = 1.3, 15 epochs, δ = 1e-5 →
  // ε = 0.7242234026109595 at order 19, with compute_dp_sgd_privacy's grid and dp_accounting's RdpAccountant
  // (Balle et al. 2020 conversion). The classic conversion gives a clearly larger value at that grid.
  const std::vector<double> orders = sp::TfPrivacyRdpOrders();
  auto spent = sp::ComputeEpsilon(0.0025, 1.3, 6000, 1e-5, sp::EpsilonConversion::kBalle2020, orders);
  REQUIRE(spent.ok());
  CHECK(spent->epsilon == Approx(0.7242234026).epsilon(0.01));
  CHECK(spent->order == 19.0);
  auto classic = sp::ComputeEpsilon(0.0025, 1.3, 6000, 1e-5, sp::EpsilonConversion::kClassic, orders);
  REQUIRE(classic.ok());
  CHECK(classic->epsilon > 1.1 * spent->epsilon);
}

TEST_CASE("RDP at order 2 matches the closed form log(1 + q^2 (e^(1/sigma^2) - 1))", "[privacy][accountant]") {
  auto r = sp::SubsampledGaussianRdp(0.01, 1.0, 2.0);
  REQUIRE(r.ok());
  CHECK(*r == Approx(1.71813e-4).epsilon(1e-5));
  for (double q : {0.001, 0.1, 0.5, 0.9}) {
    for (double sigma : {0.5, 1.0, 4.0}) {
      auto v = sp::SubsampledGaussianRdp(q, sigma, 2.0);
      REQUIRE(v.ok());
      CHECK(*v == Approx(std::log1p(q * q * std::expm1(1 / (sigma * sigma)))).epsilon(1e-10));
    }
  }
}

TEST_CASE("Integer and fractional orders agree with direct numerical integration", "[privacy][accountant]") {
  for (double q : {0.01, 0.2}) {
    for (double sigma : {0.8, 2.0}) {
      for (double alpha : {1.5, 2.0, 3.0, 4.7, 8.0, 10.5}) {
        auto r = sp::SubsampledGaussianRdp(q, sigma, alpha);
        REQUIRE(r.ok());
        INFO("q=" << q << " sigma=" << sigma << " alpha=" << alpha);
        CHECK(*r == Approx(RdpByIntegration(q, sigma, alpha)).epsilon(1e-6).margin(1e-12));
      }
    }
  }
}

TEST_CASE("Fractional orders are continuous with the integer path", "[privacy][accountant]") {
  for (double alpha : {2.0, 5.0, 32.0}) {
    auto at = sp::SubsampledGaussianRdp(0.05, 1.1, alpha);
    auto near = sp::SubsampledGaussianRdp(0.05, 1.1, alpha + 1e-7);
    REQUIRE(at.ok());
    REQUIRE(near.ok());
    CHECK(*near == Approx(*at).epsilon(1e-5));
  }
}

TEST_CASE("Edge cases: q = 1 is the plain Gaussian, q = 0 and zero steps cost nothing, sigma = 0 is infinite",
          "[privacy][accountant]") {
  auto full = sp::SubsampledGaussianRdp(1.0, 2.0, 7.5);
  REQUIRE(full.ok());
  CHECK(*full == Approx(7.5 / 8.0));
  auto none = sp::ComputeEpsilon(0.0, 1.0, 1000, 1e-5);
  REQUIRE(none.ok());
  CHECK(none->epsilon == 0.0);
  auto no_steps = sp::ComputeEpsilon(0.3, 0.0, 0, 1e-5);
  REQUIRE(no_steps.ok());
  CHECK(no_steps->epsilon == 0.0);
  auto exposed = sp::ComputeEpsilon(0.01, 0.0, 1, 1e-5);
  REQUIRE(exposed.ok());
  CHECK(std::isinf(exposed->epsilon));
}

TEST_CASE("Epsilon is non-decreasing in steps and non-increasing in noise", "[privacy][accountant]") {
  double previous = 0.0;
  for (int64_t steps : {1, 10, 100, 1000, 10000}) {
    auto s = sp::ComputeEpsilon(0.01, 1.0, steps, 1e-6);
    REQUIRE(s.ok());
    CHECK(s->epsilon >= previous);
    previous = s->epsilon;
  }
  CHECK(previous > 1.0);
  previous = std::numeric_limits<double>::infinity();
  for (double sigma : {0.3, 0.6, 1.0, 2.0, 5.0, 20.0}) {
    auto s = sp::ComputeEpsilon(0.02, sigma, 500, 1e-5);
    REQUIRE(s.ok());
    CHECK(s->epsilon <= previous);
    previous = s->epsilon;
  }
  CHECK(previous < 0.1);
}

TEST_CASE("Balle 2020 conversion is never above the classic one", "[privacy][accountant]") {
  for (double sigma : {0.7, 1.0, 3.0}) {
    auto b = sp::ComputeEpsilon(0.05, sigma, 300, 1e-5, sp::EpsilonConversion::kBalle2020);
    auto c = sp::ComputeEpsilon(0.05, sigma, 300, 1e-5, sp::EpsilonConversion::kClassic);
    REQUIRE(b.ok());
    REQUIRE(c.ok());
    CHECK(b->epsilon < c->epsilon);
  }
}

TEST_CASE("RdpAccountant composes heterogeneous steps additively", "[privacy][accountant]") {
  sp::RdpAccountant acc;
  REQUIRE(acc.Compose(0.01, 1.2, 100).ok());
  REQUIRE(acc.Compose(0.01, 1.2, 50).ok());
  auto split = acc.GetEpsilon(1e-5);
  auto whole = sp::ComputeEpsilon(0.01, 1.2, 150, 1e-5);
  REQUIRE(split.ok());
  REQUIRE(whole.ok());
  CHECK(split->epsilon == Approx(whole->epsilon).epsilon(1e-12));
  REQUIRE(acc.Compose(0.05, 1.2, 10).ok());
  auto more = acc.GetEpsilon(1e-5);
  REQUIRE(more.ok());
  CHECK(more->epsilon > split->epsilon);
  // A rejected step changes nothing.
  CHECK(!acc.Compose(1.5, 1.0, 1).ok());
  auto same = acc.GetEpsilon(1e-5);
  REQUIRE(same.ok());
  CHECK(same->epsilon == more->epsilon);
}

TEST_CASE("NoiseForEpsilon round-trips through ComputeEpsilon", "[privacy][accountant]") {
  for (double target : {0.5, 2.0, 8.0}) {
    auto sigma = sp::NoiseForEpsilon(target, 0.01, 1000, 1e-5);
    REQUIRE(sigma.ok());
    auto at = sp::ComputeEpsilon(0.01, *sigma, 1000, 1e-5);
    auto below = sp::ComputeEpsilon(0.01, *sigma * 0.999, 1000, 1e-5);
    REQUIRE(at.ok());
    REQUIRE(below.ok());
    INFO("target " << target << " sigma " << *sigma);
    CHECK(at->epsilon <= target);
    CHECK(at->epsilon == Approx(target).epsilon(1e-3));
    CHECK(below->epsilon > target);
  }
  auto nothing = sp::NoiseForEpsilon(1.0, 0.0, 1000, 1e-5);
  REQUIRE(nothing.ok());
  CHECK(*nothing == 0.0);
}

TEST_CASE("Bad inputs are InvalidArgument naming expected and got", "[privacy][accountant]") {
  auto bad_q = sp::ComputeEpsilon(1.5, 1.0, 10, 1e-5);
  REQUIRE(bad_q.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad_q.status().message()).find("[0, 1], got 1.5") != std::string::npos);
  auto bad_delta = sp::ComputeEpsilon(0.1, 1.0, 10, 1.0);
  REQUIRE(bad_delta.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad_delta.status().message()).find("delta must be in (0, 1), got 1") != std::string::npos);
  auto bad_steps = sp::ComputeEpsilon(0.1, 1.0, -1, 1e-5);
  REQUIRE(bad_steps.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad_steps.status().message()).find("got -1") != std::string::npos);
  CHECK(sp::ComputeEpsilon(0.1, -1.0, 10, 1e-5).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::SubsampledGaussianRdp(0.1, 1.0, 1.0).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::NoiseForEpsilon(0.0, 0.1, 10, 1e-5).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(!sp::ParseEpsilonConversion("renyi").ok());
}

TEST_CASE("An unreachable target epsilon is OutOfRange, not a hang", "[privacy][accountant]") {
  // q = 1 over 1e9 steps: even σ = 1e6 leaves RDP(α) = 5e-4 α, so ε stays near 0.2 on the default grid.
  auto s = sp::NoiseForEpsilon(1e-9, 1.0, 1'000'000'000, 1e-10);
  REQUIRE(!s.ok());
  CHECK(s.status().code() == absl::StatusCode::kOutOfRange);
}

TEST_CASE("DP-FTRL zCDP counts the levels of every tree so far, times k^2 / (2 z^2)", "[privacy][accountant][ftrl]") {
  // Hand-computed: R = 4 rounds per tree, z = 2. 10 rounds = trees of 4, 4 and 2 rounds, using
  // L(4) = 3, L(4) = 3 and L(2) = 2 levels: 8 levels, ρ = 8 / (2·4) = 1.
  CHECK(*sp::TreeAggregationZcdp(10, 4, 2.0, 1) == Approx(1.0));
  CHECK(*sp::TreeAggregationZcdp(10, 4, 2.0, 2) == Approx(4.0));  // k = 2: k² = 4 times
  // z = 1: 3 rounds use 2 levels, the 4th round opens level 2, the 5th starts a new tree.
  CHECK(*sp::TreeAggregationZcdp(3, 4, 1.0, 1) == Approx(1.0));
  CHECK(*sp::TreeAggregationZcdp(4, 4, 1.0, 1) == Approx(1.5));
  CHECK(*sp::TreeAggregationZcdp(5, 4, 1.0, 1) == Approx(2.0));
  // One tree for the whole run: 1000 rounds use 10 levels.
  CHECK(*sp::TreeAggregationZcdp(1000, 1 << 20, 1.0, 1) == Approx(5.0));
  CHECK(*sp::TreeAggregationZcdp(0, 4, 1.0, 1) == 0.0);
  CHECK(std::isinf(*sp::TreeAggregationZcdp(1, 4, 0.0, 1)));
  // Non-decreasing in rounds.
  double previous = 0;
  for (int r = 0; r < 100; ++r) {
    const double rho = *sp::TreeAggregationZcdp(r, 7, 1.3, 1);
    CHECK(rho >= previous);
    previous = rho;
  }
}

TEST_CASE("zCDP converts to (epsilon, delta) by rho + 2 sqrt(rho ln(1/delta))", "[privacy][accountant][ftrl]") {
  CHECK(*sp::EpsilonFromZcdp(1.0, 1e-10) == Approx(10.5970518244).epsilon(1e-9));
  CHECK(*sp::EpsilonFromZcdp(0.5, 1e-5) == Approx(5.2985259122).epsilon(1e-9));
  CHECK(*sp::EpsilonFromZcdp(0.0, 1e-5) == 0.0);
  CHECK(std::isinf(*sp::EpsilonFromZcdp(std::numeric_limits<double>::infinity(), 1e-5)));
}

TEST_CASE("zCDP accounting refuses bad inputs", "[privacy][accountant][ftrl]") {
  CHECK(sp::TreeAggregationZcdp(-1, 4, 1.0, 1).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::TreeAggregationZcdp(1, 0, 1.0, 1).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::TreeAggregationZcdp(1, 4, -1.0, 1).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::TreeAggregationZcdp(1, 4, NAN, 1).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::TreeAggregationZcdp(1, 4, 1.0, 0).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::EpsilonFromZcdp(-0.1, 1e-5).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::EpsilonFromZcdp(NAN, 1e-5).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(sp::EpsilonFromZcdp(1.0, 0.0).status().code() == absl::StatusCode::kInvalidArgument);
}
