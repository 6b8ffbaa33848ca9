#include "server/fwdgrad_pacing.h"

#include <algorithm>
#include <cmath>

#include "base/strings.h"
#include "comms/transport.h"

namespace seedling::server {

absl::Status ValidatePacing(const FwdGradPacingOptions& options) {
  if (!options.enabled) return absl::OkStatus();
  if (!(options.variance_threshold > 0) || !std::isfinite(options.variance_threshold)) {
    return absl::InvalidArgumentError(
        StrCat("[training] fwdgrad_variance_threshold must be finite and > 0 with fwdgrad_pacing, got ",
               options.variance_threshold, " (read the per-round gradient_variance of a run without pacing to ",
               "choose it)"));
  }
  if (options.base_perturbations < 1) {
    return absl::InvalidArgumentError(
        StrCat("[training] perturbations must be >= 1, got ", options.base_perturbations));
  }
  if (options.max_perturbations < options.base_perturbations ||
      options.max_perturbations > comms::kMaxTaskPerturbations) {
    return absl::InvalidArgumentError(
        StrCat("[training] max_perturbations must be in [perturbations = ", options.base_perturbations, ", ",
               comms::kMaxTaskPerturbations, "], got ", options.max_perturbations));
  }
  return absl::OkStatus();
}

PacingDecision DecidePacing(const FwdGradPacingOptions& options, int64_t perturbations, double variance) {
  PacingDecision d;
  const int64_t k = std::clamp<int64_t>(perturbations, 1, std::max<int64_t>(1, options.max_perturbations));
  // NaN compares false: an unmeasured variance applies.
  if (variance > options.variance_threshold && k < options.max_perturbations) {
    d.apply = false;
    d.next_perturbations = std::min(2 * k, options.max_perturbations);
  } else {
    d.apply = true;
    d.next_perturbations = options.base_perturbations;
  }
  return d;
}

std::vector<PacingStep> PacingSchedule(const FwdGradPacingOptions& options, std::span<const double> variances) {
  std::vector<PacingStep> steps;
  int64_t k = options.base_perturbations;
  for (double v : variances) {
    const PacingDecision d = DecidePacing(options, k, v);
    steps.push_back({k, d.apply});
    k = d.next_perturbations;
  }
  return steps;
}

double EstimateGlobalVariance(std::span<const double> sum, std::span<const double> sum_sq, double examples,
                              int64_t clients) {
  if (clients < 2 || !(examples > 0) || sum.empty() || sum.size() != sum_sq.size()) return NAN;
  double total = 0;
  for (size_t i = 0; i < sum.size(); ++i) {
    // Σ_c n_c (x_c − ḡ)²; rounding can leave it slightly negative when all x_c agree.
    total += std::max(0.0, sum_sq[i] - sum[i] * sum[i] / examples);
  }
  return total / (static_cast<double>(clients - 1) * examples) / static_cast<double>(sum.size());
}

}  // namespace seedling::server
