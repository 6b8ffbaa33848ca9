#pragma once

// The privacy budget of a run with [privacy] dp (docs/architecture.md, "Privacy"; the accounting in
// docs/methods.md, "Differential privacy (DP-FedAvg and the accountant)"). The noise itself is DpStrategy's
// job (server/dp_strategy.h); this is the ledger's side: the RDP accountant composed from the rounds the store
// committed, the gate that opens no round whose ε after it would exceed target_epsilon, and the price of a
// round, which the coordinator records in the round's commit and applies only once that commit is durable.
//
// Gaussian mechanism: selection is approximated as Poisson sampling with rate q = (clients a round can
// aggregate) / (registered devices), one step per round.
// DP-FTRL ([privacy] mechanism = "dp-ftrl"): no sampling assumption. ρ-zCDP after r committed rounds is
// privacy::TreeAggregationZcdp(r, tree_restart_rounds, z, max_participations_per_tree), ε from ρ at the
// configured δ gates the rounds (and is also reported at δ = 1e-10). Each round is recorded in the ledger as
// (sampling rate 1, z, steps k²): one unamplified Gaussian step per unit of k², an upper bound on the round's
// true cost (a tree of τ rounds costs k²·L(τ)/(2z²) ≤ k²·τ/(2z²)), so the ledger stays conservative for any
// reader; the DP-FTRL budget accepts only a ledger of such rounds covering every committed version.
// Not thread-safe (the coordinator holds its lock).

#include <cstdint>
#include <map>
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
    double rho_after = 0;                   // DP-FTRL: zCDP ρ after the round (0 for the Gaussian mechanism)
    double epsilon_report_delta_after = 0;  // DP-FTRL: ε after the round at δ = kReportDelta
  };

  // The δ at which DP-FTRL's guarantee is also reported, whatever the configured δ.
  static constexpr double kReportDelta = 1e-10;

  // Composes the committed rounds (Store::DpLedger). InvalidArgument for a spend the accountant refuses.
  // DP-FTRL also needs the committed global version: FailedPrecondition unless the ledger holds one DP-FTRL
  // spend (see above) per committed version, with this config's noise multiplier and k.
  static absl::StatusOr<DpBudget> Create(const PrivacyConfig& config, const std::vector<DpSpend>& ledger,
                                         uint64_t committed_version = 0);

  // ε spent by the committed rounds at the configured δ.
  double epsilon() const { return epsilon_; }
  // DP-FTRL: the zCDP ρ of the committed rounds and its ε at δ = kReportDelta; NaN for the Gaussian mechanism.
  double rho() const;
  double epsilon_at_report_delta() const;
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

  // ε after one more round at rate q (Gaussian), or after one more tree round (DP-FTRL, q unused).
  absl::StatusOr<Price> PriceAt(uint64_t round_id, double q) const;
  absl::StatusOr<Price> PriceFtrl(uint64_t round_id) const;

  PrivacyConfig config_;
  privacy::RdpAccountant accountant_;  // Gaussian only
  double epsilon_ = 0;
  int64_t ftrl_rounds_ = 0;          // DP-FTRL: committed rounds
  double rho_ = 0;                   // DP-FTRL: their ρ
  std::optional<Price> next_price_;  // of the round the last AllowsNextRound accepted (round_id 0)
  std::string refusal_;
};

// DP-FTRL's participation bound: the accounting above holds only if each device contributes to at most
// k = max_participations_per_tree rounds of a tree, so selection asks this ledger before it hands a device a
// task. A device's contributions are its accepted updates in committed rounds of the current tree (an aborted
// round releases nothing; an update the strategy then refused still counts, which is conservative), plus the
// round in progress, in which it can hold at most one task. Rebuilt from the store at start, so a restart
// keeps the bound. Not thread-safe (the coordinator holds its lock).
class TreeParticipation {
 public:
  // The counts of the tree the next round belongs to (it produces version committed_version + 1): committed
  // rounds whose result version lies in that tree, read back from the newest round down. Store errors as they
  // come.
  static absl::StatusOr<TreeParticipation> Load(Store& store, const PrivacyConfig& config, uint64_t committed_version);

  // Whether `device_id` may take a task in the next round (fewer than k contributions to its tree).
  bool MayJoin(const std::string& device_id) const;
  // The round that produced `new_version` was committed with updates from `devices` (the store's ledger of
  // the round); a new tree starts with empty counts. An error reading that ledger is passed here instead:
  // then no device may join any more (privacy before liveness) until a restart rebuilds the counts.
  void RecordCommit(uint64_t new_version, const absl::StatusOr<std::vector<LedgerEntry>>& devices);

  uint64_t tree() const { return tree_; }
  size_t devices_in_tree() const { return counts_.size(); }

 private:
  TreeParticipation(uint64_t rounds_per_tree, int64_t limit, uint64_t tree)
      : rounds_per_tree_(rounds_per_tree), limit_(limit), tree_(tree) {}

  uint64_t rounds_per_tree_;
  int64_t limit_;
  uint64_t tree_;  // of the next round
  std::map<std::string, int64_t> counts_;
  bool blocked_ = false;
};

}  // namespace seedling::server
