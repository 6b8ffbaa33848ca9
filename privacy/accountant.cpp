#include "privacy/accountant.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <utility>

#include "base/status.h"
#include "base/strings.h"
#include "privacy/tree_aggregation.h"

namespace seedling::privacy {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// log(e^a + e^b), exact for -∞ operands.
double LogAdd(double a, double b) {
  if (a < b) std::swap(a, b);
  if (b == kNegInf) return a;
  return a + std::log1p(std::exp(b - a));
}

// log(e^a − e^b) for a ≥ b. The fractional series' partial sums are positive (Mironov et al. 2019 §3.3);
// rounding can make a term equal its sum, which gives -∞ (the sum is 0 to double precision).
double LogSub(double a, double b) {
  if (b == kNegInf) return a;
  if (b >= a) return kNegInf;
  return a + std::log1p(-std::exp(b - a));
}

// log(erfc(x)), stable for large x where erfc underflows: the asymptotic expansion
// erfc(x) = e^{−x²} / (x √π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶) + 105/(16x⁸) − …)  (Abramowitz–Stegun 7.1.23).
// At x ≥ 20 the truncation error is below 945/(32 x¹⁰) ≈ 3e-12 relative.
double LogErfc(double x) {
  if (x < 20.0) return std::log(std::erfc(x));
  const double r = 1.0 / (x * x);
  const double series = 1.0 - r / 2.0 + 3.0 * r * r / 4.0 - 15.0 * r * r * r / 8.0 + 105.0 * r * r * r * r / 16.0;
  return -x * x - std::log(x) - 0.5 * std::log(std::numbers::pi) + std::log(series);
}

// log |C(α, k)| for real α ≥ 0 and integer k ≥ 0 (lgamma returns log|Γ| for negative arguments too; Γ has
// poles only at non-positive integers, reached by α − k + 1 only when α is an integer and k > α, where the
// binomial is 0 and the caller never asks).
double LogAbsBinomial(double alpha, double k) {
  return std::lgamma(alpha + 1.0) - std::lgamma(k + 1.0) - std::lgamma(alpha - k + 1.0);
}

// log A_α for integer α (Mironov et al. 2019 §3.3): Σ_{k=0..α} C(α,k) (1−q)^{α−k} q^k exp((k² − k)/(2σ²)),
// every term positive, summed in log space.
double LogAIntegerOrder(double q, double sigma, int64_t alpha) {
  const double log_q = std::log(q);
  const double log_1mq = std::log1p(-q);
  const double a = static_cast<double>(alpha);
  double log_a = kNegInf;
  for (int64_t k = 0; k <= alpha; ++k) {
    const double kd = static_cast<double>(k);
    const double term =
        LogAbsBinomial(a, kd) + kd * log_q + (a - kd) * log_1mq + (kd * kd - kd) / (2.0 * sigma * sigma);
    log_a = LogAdd(log_a, term);
  }
  return log_a;
}

// log A_α for fractional α (Mironov et al. 2019 §3.3): A_α = A_α,0 + A_α,1 with z0 = σ² log(1/q − 1) + 1/2,
//   A_α,0 = Σ_{i≥0} C(α,i) q^i (1−q)^{α−i} exp((i² − i)/(2σ²)) · ½ erfc((i − z0)/(√2 σ))
//   A_α,1 = Σ_{i≥0} C(α,i) q^{α−i} (1−q)^i exp(((α−i)² − (α−i))/(2σ²)) · ½ erfc((z0 − (α−i))/(√2 σ))
// C(α,i) is a generalized binomial whose sign alternates once i > ⌊α⌋ + 1; terms are added or subtracted in
// log space by that sign. Stops when both terms fall below e^−30 (relative to A_α ≥ 1 that is negligible;
// the terms decrease geometrically once i exceeds z0 and α).
double LogAFractionalOrder(double q, double sigma, double alpha) {
  const double log_q = std::log(q);
  const double log_1mq = std::log1p(-q);
  const double z0 = sigma * sigma * (std::log(1.0 / q - 1.0)) + 0.5;
  const double floor_alpha = std::floor(alpha);
  const double two_sigma2 = 2.0 * sigma * sigma;
  const double sqrt2_sigma = std::sqrt(2.0) * sigma;
  double log_a0 = kNegInf;
  double log_a1 = kNegInf;
  // A hard cap keeps a pathological input from looping forever; the series converges long before.
  constexpr int64_t kMaxTerms = 1'000'000;
  for (int64_t ii = 0; ii < kMaxTerms; ++ii) {
    const double i = static_cast<double>(ii);
    const double j = alpha - i;
    // Sign of C(α, i): the product Π_{m<i} (α − m) has one negative factor per m > α.
    const double negatives = std::max(0.0, i - floor_alpha - 1.0);
    const bool positive = std::fmod(negatives, 2.0) == 0.0;
    const double log_coef = LogAbsBinomial(alpha, i);
    const double log_t0 = log_coef + i * log_q + j * log_1mq;
    const double log_t1 = log_coef + j * log_q + i * log_1mq;
    const double log_e0 = std::log(0.5) + LogErfc((i - z0) / sqrt2_sigma);
    const double log_e1 = std::log(0.5) + LogErfc((z0 - j) / sqrt2_sigma);
    const double log_s0 = log_t0 + (i * i - i) / two_sigma2 + log_e0;
    const double log_s1 = log_t1 + (j * j - j) / two_sigma2 + log_e1;
    if (positive) {
      log_a0 = LogAdd(log_a0, log_s0);
      log_a1 = LogAdd(log_a1, log_s1);
    } else {
      log_a0 = LogSub(log_a0, log_s0);
      log_a1 = LogSub(log_a1, log_s1);
    }
    if (ii > floor_alpha + 1.0 && std::max(log_s0, log_s1) < -30.0) break;
  }
  return LogAdd(log_a0, log_a1);
}

absl::Status CheckMechanism(double q, double noise_multiplier) {
  if (!(q >= 0.0 && q <= 1.0)) {
    return absl::InvalidArgumentError(StrCat("sampling rate must be in [0, 1], got ", q));
  }
  if (!(noise_multiplier >= 0.0) || !std::isfinite(noise_multiplier)) {
    return absl::InvalidArgumentError(StrCat("noise multiplier must be finite and >= 0, got ", noise_multiplier));
  }
  return absl::OkStatus();
}

absl::Status CheckOrder(double order) {
  if (!(order > 1.0) || !std::isfinite(order)) {
    return absl::InvalidArgumentError(StrCat("RDP order must be finite and > 1, got ", order));
  }
  return absl::OkStatus();
}

absl::Status CheckSteps(int64_t steps) {
  if (steps < 0) return absl::InvalidArgumentError(StrCat("steps must be >= 0, got ", steps));
  return absl::OkStatus();
}

absl::Status CheckDelta(double delta) {
  if (!(delta > 0.0 && delta < 1.0)) {
    return absl::InvalidArgumentError(StrCat("delta must be in (0, 1), got ", delta));
  }
  return absl::OkStatus();
}

// RDP of one step, inputs already checked.
double RdpOneStep(double q, double sigma, double order) {
  if (q == 0.0) return 0.0;
  if (sigma == 0.0) return kInf;
  if (q == 1.0) return order / (2.0 * sigma * sigma);
  const double log_a = order == std::floor(order) ? LogAIntegerOrder(q, sigma, static_cast<int64_t>(order))
                                                  : LogAFractionalOrder(q, sigma, order);
  // log A_α ≥ 0 mathematically (A_α ≥ 1); clamp rounding noise.
  return std::max(0.0, log_a) / (order - 1.0);
}

}  // namespace

absl::StatusOr<EpsilonConversion> ParseEpsilonConversion(std::string_view name) {
  if (name == "balle2020") return EpsilonConversion::kBalle2020;
  if (name == "classic") return EpsilonConversion::kClassic;
  return absl::InvalidArgumentError(StrCat("unknown epsilon conversion '", name, "' (expected balle2020 or classic)"));
}

const char* EpsilonConversionName(EpsilonConversion conversion) {
  return conversion == EpsilonConversion::kClassic ? "classic" : "balle2020";
}

std::vector<double> DefaultRdpOrders() {
  std::vector<double> orders;
  for (int x = 1; x < 100; ++x) orders.push_back(1.0 + x / 10.0);
  for (int a = 12; a < 64; ++a) orders.push_back(a);
  for (double a : {128.0, 256.0, 512.0}) orders.push_back(a);
  return orders;
}

std::vector<double> TfPrivacyRdpOrders() {
  std::vector<double> orders = {1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5};
  for (int a = 5; a < 64; ++a) orders.push_back(a);
  for (double a : {128.0, 256.0, 512.0}) orders.push_back(a);
  return orders;
}

absl::StatusOr<double> SubsampledGaussianRdp(double q, double noise_multiplier, double order) {
  SEEDLING_RETURN_IF_ERROR(CheckMechanism(q, noise_multiplier));
  SEEDLING_RETURN_IF_ERROR(CheckOrder(order));
  return RdpOneStep(q, noise_multiplier, order);
}

absl::StatusOr<std::vector<double>> ComputeRdp(double q, double noise_multiplier, int64_t steps,
                                               std::span<const double> orders) {
  SEEDLING_RETURN_IF_ERROR(CheckMechanism(q, noise_multiplier));
  SEEDLING_RETURN_IF_ERROR(CheckSteps(steps));
  std::vector<double> rdp;
  rdp.reserve(orders.size());
  for (double order : orders) {
    SEEDLING_RETURN_IF_ERROR(CheckOrder(order));
    const double one = RdpOneStep(q, noise_multiplier, order);
    // 0 × ∞ (no steps of a non-private mechanism) is 0: nothing was released.
    rdp.push_back(steps == 0 ? 0.0 : one * static_cast<double>(steps));
  }
  return rdp;
}

absl::StatusOr<PrivacySpent> EpsilonFromRdp(std::span<const double> orders, std::span<const double> rdp, double delta,
                                            EpsilonConversion conversion) {
  SEEDLING_RETURN_IF_ERROR(CheckDelta(delta));
  if (orders.empty() || orders.size() != rdp.size()) {
    return absl::InvalidArgumentError(StrCat("expected one RDP value per order and at least one order, got ",
                                             orders.size(), " orders and ", rdp.size(), " RDP values"));
  }
  const double log_delta = std::log(delta);
  PrivacySpent best{kInf, orders.front()};
  for (size_t k = 0; k < orders.size(); ++k) {
    const double a = orders[k];
    const double r = rdp[k];
    SEEDLING_RETURN_IF_ERROR(CheckOrder(a));
    if (!(r >= 0.0)) {
      return absl::InvalidArgumentError(StrCat("RDP at order ", a, " must be >= 0, got ", r));
    }
    double eps = kInf;
    if (r == kInf) {
      eps = kInf;
    } else if (delta * delta + std::expm1(-r) >= 0.0) {
      eps = 0.0;  // Bretagnolle–Huber: TV ≤ √(1 − e^{−KL}) ≤ δ (see accountant.h)
    } else if (conversion == EpsilonConversion::kClassic) {
      eps = r - log_delta / (a - 1.0);
    } else {
      eps = r + std::log1p(-1.0 / a) - (log_delta + std::log(a)) / (a - 1.0);
    }
    eps = std::max(0.0, eps);
    if (eps < best.epsilon) best = {eps, a};
  }
  return best;
}

absl::StatusOr<PrivacySpent> ComputeEpsilon(double q, double noise_multiplier, int64_t steps, double delta,
                                            EpsilonConversion conversion, std::span<const double> orders) {
  std::vector<double> grid;
  if (orders.empty()) {
    grid = DefaultRdpOrders();
    orders = grid;
  }
  SEEDLING_RETURN_IF_ERROR(CheckDelta(delta));
  SEEDLING_ASSIGN_OR_RETURN(std::vector<double> rdp, ComputeRdp(q, noise_multiplier, steps, orders));
  return EpsilonFromRdp(orders, rdp, delta, conversion);
}

absl::StatusOr<double> NoiseForEpsilon(double target_epsilon, double q, int64_t steps, double delta,
                                       EpsilonConversion conversion, std::span<const double> orders) {
  if (!(target_epsilon > 0.0) || !std::isfinite(target_epsilon)) {
    return absl::InvalidArgumentError(StrCat("target epsilon must be finite and > 0, got ", target_epsilon));
  }
  SEEDLING_RETURN_IF_ERROR(CheckMechanism(q, 0.0));
  SEEDLING_RETURN_IF_ERROR(CheckSteps(steps));
  SEEDLING_RETURN_IF_ERROR(CheckDelta(delta));
  std::vector<double> grid;
  if (orders.empty()) {
    grid = DefaultRdpOrders();
    orders = grid;
  }
  if (q == 0.0 || steps == 0) return 0.0;
  auto eps_at = [&](double sigma) -> absl::StatusOr<double> {
    SEEDLING_ASSIGN_OR_RETURN(PrivacySpent spent, ComputeEpsilon(q, sigma, steps, delta, conversion, orders));
    return spent.epsilon;
  };
  // Bracket: ε(lo) > target ≥ ε(hi). ε(0) = ∞ > target.
  constexpr double kMaxSigma = 1e6;
  double lo = 0.0;
  double hi = 1.0;
  for (;;) {
    SEEDLING_ASSIGN_OR_RETURN(double eps, eps_at(hi));
    if (eps <= target_epsilon) break;
    lo = hi;
    if (hi >= kMaxSigma) {
      return absl::OutOfRangeError(StrCat("target epsilon ", target_epsilon, " at delta ", delta,
                                          " with sampling rate ", q, " over ", steps,
                                          " steps is unreachable: even noise multiplier ", hi, " gives epsilon ", eps));
    }
    hi = std::min(kMaxSigma, hi * 2.0);
  }
  // Bisection on the bracket; ε is non-increasing in σ (each order's RDP is, and so is the minimum).
  while (hi - lo > 1e-6 * hi) {
    const double mid = 0.5 * (lo + hi);
    SEEDLING_ASSIGN_OR_RETURN(double eps, eps_at(mid));
    if (eps <= target_epsilon) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return hi;
}

RdpAccountant::RdpAccountant(std::vector<double> orders)
    : orders_(orders.empty() ? DefaultRdpOrders() : std::move(orders)), rdp_(orders_.size(), 0.0) {}

absl::Status RdpAccountant::Compose(double q, double noise_multiplier, int64_t steps) {
  SEEDLING_ASSIGN_OR_RETURN(std::vector<double> add, ComputeRdp(q, noise_multiplier, steps, orders_));
  for (size_t k = 0; k < rdp_.size(); ++k) rdp_[k] += add[k];
  return absl::OkStatus();
}

absl::StatusOr<PrivacySpent> RdpAccountant::GetEpsilon(double delta, EpsilonConversion conversion) const {
  return EpsilonFromRdp(orders_, rdp_, delta, conversion);
}

absl::StatusOr<double> TreeAggregationZcdp(int64_t rounds, int64_t rounds_per_tree, double noise_multiplier,
                                           int64_t participations_per_tree) {
  if (rounds < 0) return absl::InvalidArgumentError(StrCat("rounds must be >= 0, got ", rounds));
  if (rounds_per_tree < 1 || static_cast<uint64_t>(rounds_per_tree) > kMaxTreeLeaves) {
    return absl::InvalidArgumentError(
        StrCat("rounds per tree must be in [1, ", kMaxTreeLeaves, "], got ", rounds_per_tree));
  }
  if (!(noise_multiplier >= 0) || !std::isfinite(noise_multiplier)) {
    return absl::InvalidArgumentError(StrCat("noise multiplier must be finite and >= 0, got ", noise_multiplier));
  }
  if (participations_per_tree < 1) {
    return absl::InvalidArgumentError(StrCat("participations per tree must be >= 1, got ", participations_per_tree));
  }
  if (rounds == 0) return 0.0;
  if (noise_multiplier == 0) return std::numeric_limits<double>::infinity();
  const uint64_t r = static_cast<uint64_t>(rounds);
  const uint64_t per_tree = static_cast<uint64_t>(rounds_per_tree);
  // Levels a device can touch, summed over the trees so far: full trees, then the partial one.
  const double levels = static_cast<double>(r / per_tree) * TreeLevels(per_tree) + TreeLevels(r % per_tree);
  const double k = static_cast<double>(participations_per_tree);
  return k * k * levels / (2.0 * noise_multiplier * noise_multiplier);
}

absl::StatusOr<double> EpsilonFromZcdp(double rho, double delta) {
  if (!(rho >= 0)) return absl::InvalidArgumentError(StrCat("zCDP rho must be >= 0, got ", rho));
  if (!(delta > 0 && delta < 1)) return absl::InvalidArgumentError(StrCat("delta must be in (0, 1), got ", delta));
  if (std::isinf(rho)) return rho;
  return rho + 2.0 * std::sqrt(rho * std::log(1.0 / delta));  // Bun & Steinke 2016, Prop. 1.3
}

}  // namespace seedling::privacy
