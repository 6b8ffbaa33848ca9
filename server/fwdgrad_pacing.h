#pragma once

// FwdLLM's variance-controlled global pacing (Xu et al., ATC'24, "adaptive global perturbation pacing"):
// the server holds back a round's aggregated forward gradient while its variance is high, asks the next
// round's devices for more perturbations per step, and applies the pooled estimate once its variance is
// low enough.
//
// What we follow. FwdLLM's code (FedSgdServerManager / FedSgdAggregator) has each client send the
// variance of the per-batch forward gradients of one "check" tensor; when it exceeds a threshold the
// server caches the uploaded gradients, leaves the model unchanged and asks the clients for more
// perturbations, then aggregates cache + new; once the variance is under the threshold it applies the
// pooled gradient and clears the cache. Two things change here, both for cross-device rounds, where next
// round's devices are not this round's and so cannot know the cache:
//   * the server measures the variance itself, from the uploads it already holds, as the variance of the
//     pooled global estimate (cache + this round), not a client's own statistic (EstimateGlobalVariance);
//     a device can neither fake it nor stall the run by reporting a large one;
//   * K doubles on each held round, capped at max_perturbations; a round whose K is at the cap applies
//     whatever its variance, so the server never holds gradients forever. After an applied round K
//     returns to the base value, as in FwdLLM's code, where the extra perturbations are asked only for
//     the estimate being held.
// The rule is DecidePacing below, a pure function; server/strategy.cpp keeps K and the cache in the
// global model's buffers (checkpointed), so a restarted server continues the schedule.

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace seedling::server {

struct FwdGradPacingOptions {
  bool enabled = false;            // [training] fwdgrad_pacing
  int64_t base_perturbations = 8;  // K after an applied round ([training] perturbations)
  int64_t max_perturbations = 64;  // [training] max_perturbations: cap on K, >= base_perturbations
  double variance_threshold = 0;   // [training] fwdgrad_variance_threshold: hold while the estimate's
                                   // variance exceeds it; must be set (> 0) when enabled
};

// InvalidArgument naming the key when enabled with bad settings (nothing is checked when disabled).
absl::Status ValidatePacing(const FwdGradPacingOptions& options);

struct PacingDecision {
  bool apply = true;               // false: hold the pooled estimate, the model stays as it is
  int64_t next_perturbations = 0;  // K of the next round's tasks
};

// The decision at the end of a round whose tasks used K = `perturbations`, given the variance of the
// pooled estimate (NaN = not measured, e.g. fewer than two clients in the pool: apply).
//   variance > threshold and K < max  →  hold, next K = min(2K, max)
//   otherwise                          →  apply, next K = base
PacingDecision DecidePacing(const FwdGradPacingOptions& options, int64_t perturbations, double variance);

// One round of a schedule driven by DecidePacing from K = base (for tests and documentation).
struct PacingStep {
  int64_t perturbations = 0;  // K of the round's tasks
  bool apply = true;
};
std::vector<PacingStep> PacingSchedule(const FwdGradPacingOptions& options, std::span<const double> variances);

// The variance of the pooled FwdLLM estimate ḡ = Σ_c g_c / W (W = Σ_c n_c), averaged over the P
// elements, from per-element sums over the C pooled clients: sum = Σ_c g_c, sum_sq = Σ_c g_c² / n_c.
// Each client's x_c = g_c / n_c is one draw of the per-example gradient estimate, weighted by n_c:
//   Var(ḡ_i) ≈ Σ_c n_c (x_c,i − ḡ_i)² / ((C − 1) W) = (sum_sq_i − sum_i² / W) / ((C − 1) W),
// which for equal n_c is the sample variance of the x_c divided by C. NaN when C < 2 or W = 0.
double EstimateGlobalVariance(std::span<const double> sum, std::span<const double> sum_sq, double examples,
                              int64_t clients);

}  // namespace seedling::server
