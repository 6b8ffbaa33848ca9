#pragma once

// Secure aggregation as a Strategy wrapper (docs/architecture.md, "The server" and "Privacy"). In a SecAgg+ round
// (privacy/secagg.h) the coordinator never sees a client's update: devices upload masked, quantized vectors
// and the server unmasks only their sum Σ_u [w_u, w_u·q(x_u)] mod 2^32. The coordinator decodes that sum
// (privacy::DecodeAggregate: Σ w_u x_u per entry and Σ w_u) and hands it to this wrapper once, as one
// SummedUpdate; the wrapper passes it to the inner strategy's AccumulateSum, which adds it exactly where a
// plaintext round would have added the clients one by one. FedAvg semantics are kept: the round's change
// is the w-weighted mean of the (clipped, quantized) deltas, followed by the inner server optimizer step.
//
// With DP the stack is SecAggStrategy → DpStrategy → fedavg: DpStrategy adds the noise to the unmasked sum
// (central DP on a sum the server only sees after unmasking). Clipping to C is then the honest clients'
// job (the server cannot clip what it cannot see), and every weight must be 1 ([secagg] max_weight = 1).
//
// The wrapper refuses plaintext updates (Accumulate → FailedPrecondition), so nothing outside the session
// can enter a SecAgg round's aggregate. Thread-safe as far as the inner strategy is.

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "privacy/secagg.h"
#include "server/config.h"
#include "server/strategy.h"

namespace seedling::server {

class SecAggStrategy final : public Strategy {
 public:
  // Takes ownership of `inner` (which must implement AccumulateSum: the fedavg family, or DpStrategy around
  // it).
  explicit SecAggStrategy(std::unique_ptr<Strategy> inner) : inner_(std::move(inner)) {}

  std::string name() const override { return "secagg-" + inner_->name(); }
  void ConfigureTask(uint64_t round_index, v1::Task& task) const override { inner_->ConfigureTask(round_index, task); }
  absl::Status BeginRound(const GlobalModel& global) override { return inner_->BeginRound(global); }
  // Always FailedPrecondition: a SecAgg round takes only the unmasked sum.
  absl::Status Accumulate(const UpdateView& update) override;
  absl::Status AccumulateSum(const SummedUpdate& sum) override;
  void RecordFailure(const std::string& device_id, const std::string& reason) override {
    inner_->RecordFailure(device_id, reason);
  }
  int64_t accumulated() const override { return inner_->accumulated(); }
  // The inner strategy's outcome, without "mean_client_norm" (unknown: no single update is seen).
  absl::StatusOr<RoundOutcome> FinishRound(GlobalModel& global) override;

 private:
  const std::unique_ptr<Strategy> inner_;
};

}  // namespace seedling::server
