#include "server/secagg_strategy.h"

#include <cmath>

#include "base/status.h"
#include "base/strings.h"

namespace seedling::server {

absl::Status SecAggStrategy::Accumulate(const UpdateView& update) {
  return absl::FailedPreconditionError(StrCat("update from device '", update.device_id,
                                              "': this round uses secure aggregation and takes no plaintext update"));
}

absl::Status SecAggStrategy::AccumulateSum(const SummedUpdate& sum) { return inner_->AccumulateSum(sum); }

absl::StatusOr<RoundOutcome> SecAggStrategy::FinishRound(GlobalModel& global) {
  SEEDLING_ASSIGN_OR_RETURN(RoundOutcome outcome, inner_->FinishRound(global));
  outcome.metrics.erase("mean_client_norm");
  return outcome;
}

absl::StatusOr<privacy::SecAggParams> SecAggParamsFor(const SecAggConfig& config, uint32_t cohort,
                                                      uint32_t vector_length) {
  privacy::SecAggParams p;
  p.num_clients = cohort;
  const uint32_t complete = cohort > 0 ? cohort - 1 : 0;
  if (config.neighbors > 0) {
    p.num_neighbors = std::min<uint32_t>(static_cast<uint32_t>(config.neighbors), complete);
  } else if (config.neighbors_fraction > 0) {
    uint32_t k = static_cast<uint32_t>(std::ceil(config.neighbors_fraction * static_cast<double>(complete) - 1e-9));
    k += k % 2;  // the ring construction needs an even degree below n − 1
    p.num_neighbors = std::min(k, complete);
  } else {
    p.num_neighbors = complete;
  }
  p.threshold = config.threshold > 0 ? static_cast<uint32_t>(config.threshold) : p.num_neighbors / 2 + 1;
  p.max_dropout_fraction = config.max_dropout_fraction;
  p.vector_length = vector_length;
  p.quantization_levels = static_cast<uint32_t>(config.quantization_levels);
  p.max_weight = static_cast<uint32_t>(config.max_weight);
  p.clipping_range = static_cast<float>(config.clipping_range);
  if (absl::Status st = privacy::ValidateParams(p); !st.ok()) {
    return absl::InvalidArgumentError(StrCat("secure aggregation with a cohort of ", cohort, " (k = ", p.num_neighbors,
                                             ", t = ", p.threshold, "): ", st.message()));
  }
  return p;
}

}  // namespace seedling::server
