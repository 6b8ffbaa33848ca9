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

}  // namespace seedling::server
