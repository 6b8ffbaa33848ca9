#pragma once

// Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism, and zCDP of DP-FTRL (docs/methods.md,
// "Differential privacy (DP-FedAvg and the accountant)").
//
// One step releases f(D_sampled) + N(0, σ² S²), where every record (here: every device) is in the sample
// independently with probability q and f has L2 sensitivity S; σ is the noise multiplier. Mironov, Talwar
// and Zhang 2019 ("Rényi Differential Privacy of the Sampled Gaussian Mechanism", arXiv 1908.10530) give
// its RDP ε(α) at order α:
//
//   integer α:     A_α = Σ_{k=0..α} C(α,k) (1−q)^{α−k} q^k exp((k² − k) / (2σ²)),  RDP(α) = log(A_α) / (α − 1)
//                  (§3.3, Eq. for integer α; summed here in log space with lgamma binomials)
//   fractional α:  the two-sided series of §3.3 (A_α = A_α,0 + A_α,1, each a sum over i ≥ 0 of generalized
//                  binomials times erfc tails, split at z0 = σ² log(1/q − 1) + 1/2), summed in log space
//                  with signed log-additions, stopped when both terms drop below e^−30
//   q = 0:         RDP = 0;   q = 1 (no subsampling): RDP = α / (2σ²);   σ = 0 and q > 0: RDP = ∞
//
// T steps compose additively: RDP_T(α) = Σ_t RDP_t(α). Conversion to (ε, δ), minimized over the order grid:
//
//   kClassic    ε = min_α RDP_T(α) + log(1/δ) / (α − 1)                         (Mironov 2017, Prop. 3)
//   kBalle2020  ε = min_α RDP_T(α) + log((α − 1)/α) − (log δ + log α) / (α − 1)  (Balle et al. 2020, Thm. 21;
//               what Opacus and current TF-Privacy / dp_accounting use; the default: at every order it
//               is below kClassic by log(α/(α−1)) + log(α)/(α−1))
//
// With both, an order whose RDP_T(α) satisfies δ² ≥ 1 − exp(−RDP_T(α)) gives ε = 0 (the KL divergence,
// bounded by RDP at any α ≥ 1, bounds the total variation by √(1 − e^{−KL}) (Bretagnolle–Huber), so the
// mechanism is (0, δ)-DP); in particular q = 0 or T = 0 gives ε = 0.
//
// Order grid (DefaultRdpOrders): Opacus' grid {1 + x/10 : x = 1..99} ∪ {12..63}, extended with
// {128, 256, 512} so that small-ε / many-step regimes (whose optimal order is large) are not cut off at 63.
// TF-Privacy's compute_dp_sgd_privacy grid is TfPrivacyRdpOrders(). An optimum at the grid's largest
// order means a larger grid could give a smaller ε.
//
// The zCDP accounting of DP-FTRL (tree aggregation) is at the end of this header.
//
// All functions are pure and thread-safe; RdpAccountant is a value type (not thread-safe to mutate).

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace seedling::privacy {

enum class EpsilonConversion {
  kBalle2020,  // default
  kClassic,
};

// "balle2020" or "classic"; InvalidArgument otherwise.
absl::StatusOr<EpsilonConversion> ParseEpsilonConversion(std::string_view name);
const char* EpsilonConversionName(EpsilonConversion conversion);

// Opacus' default orders plus 128, 256, 512 (see above), ascending.
std::vector<double> DefaultRdpOrders();
// TF-Privacy compute_dp_sgd_privacy's orders: 1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5..63, 128, 256,
// 512.
std::vector<double> TfPrivacyRdpOrders();

// RDP at `order` of ONE step of the Poisson-subsampled Gaussian with sampling rate q and noise multiplier
// σ. InvalidArgument unless q ∈ [0, 1], σ ≥ 0 and finite, order > 1 and finite. May be +∞ (σ = 0, q > 0).
absl::StatusOr<double> SubsampledGaussianRdp(double q, double noise_multiplier, double order);

// RDP_T at each order for `steps` identical steps (= steps × SubsampledGaussianRdp). InvalidArgument as
// above, or steps < 0.
absl::StatusOr<std::vector<double>> ComputeRdp(double q, double noise_multiplier, int64_t steps,
                                               std::span<const double> orders);

struct PrivacySpent {
  double epsilon = 0;  // +∞ if no order gives a finite bound
  double order = 0;    // the order attaining it (the first order of the grid when ε is ∞)
};

// (ε, δ) from RDP values at `orders` (same length, orders > 1, RDP ≥ 0 or +∞). InvalidArgument for
// δ ∉ (0, 1), mismatched or empty spans, bad orders or negative / NaN RDP values.
absl::StatusOr<PrivacySpent> EpsilonFromRdp(std::span<const double> orders, std::span<const double> rdp, double delta,
                                            EpsilonConversion conversion = EpsilonConversion::kBalle2020);

// ε after `steps` steps at sampling rate q and noise multiplier σ (ComputeRdp + EpsilonFromRdp). Empty
// `orders` means DefaultRdpOrders().
absl::StatusOr<PrivacySpent> ComputeEpsilon(double q, double noise_multiplier, int64_t steps, double delta,
                                            EpsilonConversion conversion = EpsilonConversion::kBalle2020,
                                            std::span<const double> orders = {});

// The smallest noise multiplier σ (to a relative 1e-6, rounded up: ComputeEpsilon(σ) ≤ target is
// guaranteed) such that `steps` steps at rate q give ε ≤ target_epsilon. ε is non-increasing in σ, so σ is
// found by bracketing (doubling) and bisection. Returns 0 when q = 0 or steps = 0 (nothing is released about
// anyone). InvalidArgument for bad inputs or target_epsilon ≤ 0 / not finite; OutOfRange when even σ = 1e6
// does not reach the target (the grid's orders bound how small ε can get).
absl::StatusOr<double> NoiseForEpsilon(double target_epsilon, double q, int64_t steps, double delta,
                                       EpsilonConversion conversion = EpsilonConversion::kBalle2020,
                                       std::span<const double> orders = {});

// Running composition of (possibly different) subsampled-Gaussian steps, e.g. federated rounds whose
// sampling rate changes as devices register. Holds one RDP value per order.
class RdpAccountant {
 public:
  // `orders` empty means DefaultRdpOrders(). Orders must be > 1 and finite (checked by Compose /
  // GetEpsilon, which return InvalidArgument otherwise).
  explicit RdpAccountant(std::vector<double> orders = {});

  // Adds `steps` steps at rate q and noise multiplier σ. InvalidArgument (and no change) for bad inputs.
  absl::Status Compose(double q, double noise_multiplier, int64_t steps);
  absl::StatusOr<PrivacySpent> GetEpsilon(double delta,
                                          EpsilonConversion conversion = EpsilonConversion::kBalle2020) const;

  const std::vector<double>& orders() const { return orders_; }
  const std::vector<double>& rdp() const { return rdp_; }  // RDP_T at each order so far

 private:
  std::vector<double> orders_;
  std::vector<double> rdp_;
};

// ---- zCDP of DP-FTRL's tree aggregation (privacy/tree_aggregation.h; docs/methods.md, "DP-FTRL") ----------
//
// Setting: every round adds one leaf s_t (the sum of the round's clipped updates, each of L2 norm ≤ C) to the
// current tree; the tree restarts every R rounds (tree_restart_rounds); each node carries N(0, z²C² I) noise;
// each device contributes to at most k leaves of a tree (k = max_participations_per_tree, enforced by the
// coordinator's selection). Neighbouring runs differ by one device's contributions (add/remove).
//
// Claim: the releases S_1..S_τ of one tree are ρ-zCDP with ρ = k²·L(τ) / (2z²), L(τ) = TreeLevels(τ).
// Proof. Every S_t is a sum of node values (Σ_{i ∈ v} s_i + n_v), so all releases of the tree are a
// post-processing of the vector of node values of the levels 0..L(τ)−1. At level l the device's ≤ k leaves
// fall into nodes v with k_v of them each, Σ_v k_v ≤ k, and node v's sum moves by ≤ k_v·C in L2 (triangle
// inequality), so that level's nodes move by Σ_v k_v² C² ≤ (Σ_v k_v)² C² ≤ k² C² in squared L2 norm; over
// the L(τ) levels the squared L2 sensitivity is ≤ k² L(τ) C². The Gaussian mechanism of std zC on a query of
// L2 sensitivity Δ is Δ² / (2 z² C²)-zCDP (Bun & Steinke 2016, Prop. 1.6), here k² L(τ) / (2z²). For k = 1
// this is the bound Kairouz et al. 2021 use (each leaf in one node per level). □
// Trees use independent node noise and zCDP composes additively (Bun & Steinke 2016, Lemma 1.7); every tree
// is charged as if the device were in it (worst case). After r rounds:
//   ρ(r) = k² / (2z²) · (⌊r / R⌋ · L(R) + L(r mod R)).
// Conversion (Bun & Steinke 2016, Prop. 1.3): ρ-zCDP implies (ρ + 2√(ρ ln(1/δ)), δ)-DP for every δ > 0.
// k² bounds the sensitivity for any placement of the k leaves; it is tight when they share nodes, loose
// otherwise (exact, not clever).

// ρ after `rounds` rounds (formula above). InvalidArgument unless rounds ≥ 0, rounds_per_tree in
// [1, kMaxTreeLeaves], noise_multiplier finite and ≥ 0, participations_per_tree ≥ 1. +∞ when z = 0 and
// rounds > 0; 0 when rounds = 0.
absl::StatusOr<double> TreeAggregationZcdp(int64_t rounds, int64_t rounds_per_tree, double noise_multiplier,
                                           int64_t participations_per_tree);

// ε of a ρ-zCDP mechanism at δ: ρ + 2√(ρ ln(1/δ)). InvalidArgument unless ρ ≥ 0 (+∞ allowed: gives +∞) and
// δ ∈ (0, 1).
absl::StatusOr<double> EpsilonFromZcdp(double rho, double delta);

}  // namespace seedling::privacy
