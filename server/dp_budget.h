#pragma once

// The privacy budget of a run with [privacy] dp (docs/architecture.md, "Privacy"; the accounting in
// docs/methods.md, "Differential privacy (DP-FedAvg and the accountant)"). The noise itself is DpStrategy's
// job (server/dp_strategy.h); this is the ledger's side: the RDP accountant composed from the rounds the store
// committed, the gate that opens no round whose ε after it would exceed target_epsilon, and the price of a
// round, which the coordinator records in the round's commit and applies only once that commit is durable.
//
// Selection is approximated as Poisson sampling with rate q = (clients a round can aggregate) / (registered
// devices), one step per round. Not thread-safe (the coordinator holds its lock).

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "privacy/accountant.h"
#include "server/config.h"
#include "server/store.h"

namespace seedling::server {

// q for a round that aggregates up to `per_round` clients out of `registered` devices: min(1, per_round /
// registered), 1 with no device registered.
double DpSamplingRate(double per_round, size_t registered);

class DpBudget {
 public:
  // A round's cost, priced before its commit: the spend to record and the accountant after it.
  struct Price {
    DpSpend spend;
    privacy::RdpAccountant after;
    double epsilon_after = 0;
  };

  // Composes the committed rounds (Store::DpLedger). InvalidArgument for a spend the accountant refuses.
  static absl::StatusOr<DpBudget> Create(const PrivacyConfig& config, const std::vector<DpSpend>& ledger);

  // ε spent by the committed rounds at the configured δ.
  double epsilon() const { return epsilon_; }
  // Why no round opens; empty when one may (after the last AllowsNextRound).
  const std::string& refusal() const { return refusal_; }

  // Whether a round at sampling rate `q` keeps ε within target_epsilon (an error in `q`, e.g. the devices
  // could not be counted, refuses too). Keeps the price it computed for PriceRound; the refusal is logged
  // once per change.
  bool AllowsNextRound(const absl::StatusOr<double>& q);
  // The cost of round `round_id`: the price the last accepting AllowsNextRound computed (the accountant
  // only moves in Commit, and one round runs at a time, so pricing it again would give the same numbers).
  // FailedPrecondition if AllowsNextRound has not accepted a round since the last Commit.
  absl::StatusOr<Price> PriceRound(uint64_t round_id) const;
  // The priced round is committed: ε moves on.
  void Commit(Price price);

 private:
  DpBudget(const PrivacyConfig& config, privacy::RdpAccountant accountant, double epsilon)
      : config_(config), accountant_(std::move(accountant)), epsilon_(epsilon) {}

  // ε after one more round at rate q.
  absl::StatusOr<Price> PriceAt(uint64_t round_id, double q) const;

  PrivacyConfig config_;
  privacy::RdpAccountant accountant_;
  double epsilon_ = 0;
  std::optional<Price> next_price_;  // of the round the last AllowsNextRound accepted (round_id 0)
  std::string refusal_;
};

}  // namespace seedling::server
