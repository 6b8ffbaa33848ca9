#include "server/dp_budget.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_format.h"
#include "base/status.h"
#include "base/strings.h"
#include "spdlog/spdlog.h"

namespace seedling::server {

double DpSamplingRate(double per_round, size_t registered) {
  if (registered == 0) return 1.0;
  return std::min(1.0, per_round / static_cast<double>(registered));
}

namespace {

int64_t FtrlSteps(const PrivacyConfig& config) {
  return config.max_participations_per_tree * config.max_participations_per_tree;
}

}  // namespace

absl::StatusOr<DpBudget> DpBudget::Create(const PrivacyConfig& config, const std::vector<DpSpend>& ledger,
                                          uint64_t committed_version) {
  if (config.dp_ftrl()) {
    // Every committed version must be a DP-FTRL round of these settings: the trees are laid out by version.
    if (ledger.size() != committed_version) {
      return absl::FailedPreconditionError(StrCat(
          "[privacy] mechanism = \"dp-ftrl\": the store records ", ledger.size(), " DP rounds but ", committed_version,
          " committed versions; DP-FTRL accounts every round from version 0 (start a ", "fresh state_dir)"));
    }
    for (const DpSpend& s : ledger) {
      if (s.sampling_rate != 1.0 || s.noise_multiplier != config.noise_multiplier || s.steps != FtrlSteps(config)) {
        return absl::FailedPreconditionError(StrCat(
            "[privacy] mechanism = \"dp-ftrl\": round ", s.round_id, " was recorded with sampling rate ",
            s.sampling_rate, ", noise multiplier ", s.noise_multiplier, " and ", s.steps,
            " steps, not as a DP-FTRL round of noise multiplier ", config.noise_multiplier,
            " and k = ", config.max_participations_per_tree, "; the mechanism and its settings cannot change mid-run"));
      }
    }
    DpBudget budget(config, privacy::RdpAccountant(), 0);
    budget.ftrl_rounds_ = static_cast<int64_t>(ledger.size());
    SEEDLING_ASSIGN_OR_RETURN(
        budget.rho_, privacy::TreeAggregationZcdp(budget.ftrl_rounds_, config.tree_restart_rounds,
                                                  config.noise_multiplier, config.max_participations_per_tree));
    SEEDLING_ASSIGN_OR_RETURN(budget.epsilon_, privacy::EpsilonFromZcdp(budget.rho_, config.delta));
    return budget;
  }
  privacy::RdpAccountant accountant;
  for (const DpSpend& s : ledger) {
    SEEDLING_RETURN_IF_ERROR(accountant.Compose(s.sampling_rate, s.noise_multiplier, s.steps));
  }
  SEEDLING_ASSIGN_OR_RETURN(privacy::PrivacySpent eps, accountant.GetEpsilon(config.delta));
  return DpBudget(config, std::move(accountant), eps.epsilon);
}

absl::StatusOr<DpBudget::Price> DpBudget::PriceAt(uint64_t round_id, double q) const {
  Price price{DpSpend{round_id, q, config_.noise_multiplier, 1}, accountant_, 0};
  SEEDLING_RETURN_IF_ERROR(price.after.Compose(q, config_.noise_multiplier, 1));
  SEEDLING_ASSIGN_OR_RETURN(privacy::PrivacySpent eps, price.after.GetEpsilon(config_.delta));
  price.epsilon_after = eps.epsilon;
  return price;
}

double DpBudget::rho() const { return config_.dp_ftrl() ? rho_ : NAN; }

double DpBudget::epsilon_at_report_delta() const {
  if (!config_.dp_ftrl()) return NAN;
  absl::StatusOr<double> eps = privacy::EpsilonFromZcdp(rho_, kReportDelta);
  return eps.ok() ? *eps : NAN;
}

absl::StatusOr<DpBudget::Price> DpBudget::PriceFtrl(uint64_t round_id) const {
  Price price{DpSpend{round_id, 1.0, config_.noise_multiplier, FtrlSteps(config_)}, accountant_, 0, 0, 0};
  SEEDLING_ASSIGN_OR_RETURN(
      price.rho_after, privacy::TreeAggregationZcdp(ftrl_rounds_ + 1, config_.tree_restart_rounds,
                                                    config_.noise_multiplier, config_.max_participations_per_tree));
  SEEDLING_ASSIGN_OR_RETURN(price.epsilon_after, privacy::EpsilonFromZcdp(price.rho_after, config_.delta));
  SEEDLING_ASSIGN_OR_RETURN(price.epsilon_report_delta_after, privacy::EpsilonFromZcdp(price.rho_after, kReportDelta));
  return price;
}

bool DpBudget::AllowsNextRound(const absl::StatusOr<double>& q) {
  std::string refusal;
  absl::StatusOr<Price> price = absl::FailedPreconditionError("no sampling rate");
  if (config_.dp_ftrl()) {
    // No sampling assumption: q plays no part.
    if (price = PriceFtrl(0); !price.ok()) {
      refusal = StrCat("no round opens: privacy accounting failed: ", price.status().message());
    } else if (price->epsilon_after > config_.target_epsilon) {
      refusal = StrCat("privacy budget exhausted: the next DP-FTRL round (", ftrl_rounds_ + 1, ", trees of ",
                       config_.tree_restart_rounds, " rounds, noise multiplier ", config_.noise_multiplier,
                       ") would bring rho from ", absl::StrFormat("%.4g", rho_), " to ",
                       absl::StrFormat("%.4g", price->rho_after), ", epsilon from ", absl::StrFormat("%.4g", epsilon_),
                       " to ", absl::StrFormat("%.4g", price->epsilon_after), " at delta ", config_.delta,
                       ", over target_epsilon ", config_.target_epsilon, "; no round is opened");
    }
  } else if (!q.ok()) {
    refusal = StrCat("no round opens: cannot count registered devices for privacy accounting: ", q.status().message());
  } else if (price = PriceAt(0, *q); !price.ok()) {
    refusal = StrCat("no round opens: privacy accounting failed: ", price.status().message());
  } else if (price->epsilon_after > config_.target_epsilon) {
    refusal = StrCat("privacy budget exhausted: the next round (sampling rate ", *q, ", noise multiplier ",
                     config_.noise_multiplier, ") would bring epsilon from ", absl::StrFormat("%.4g", epsilon_), " to ",
                     absl::StrFormat("%.4g", price->epsilon_after), " at delta ", config_.delta,
                     ", over target_epsilon ", config_.target_epsilon, "; no round is opened");
  }
  if (!refusal.empty()) {
    if (refusal != refusal_) spdlog::warn("{}", refusal);  // once, not every tick
    refusal_ = std::move(refusal);
    next_price_.reset();
    return false;
  }
  refusal_.clear();
  next_price_ = std::move(price).value();
  return true;
}

absl::StatusOr<DpBudget::Price> DpBudget::PriceRound(uint64_t round_id) const {
  if (!next_price_.has_value()) {
    return absl::FailedPreconditionError("no round was priced: AllowsNextRound must accept it first");
  }
  Price price = *next_price_;
  price.spend.round_id = round_id;
  return price;
}

void DpBudget::Commit(Price price) {
  accountant_ = std::move(price.after);
  epsilon_ = price.epsilon_after;
  if (config_.dp_ftrl()) {
    ++ftrl_rounds_;
    rho_ = price.rho_after;
  }
  next_price_.reset();  // priced against the accountant before this round
}

absl::StatusOr<TreeParticipation> TreeParticipation::Load(Store& store, const PrivacyConfig& config,
                                                          uint64_t committed_version) {
  const uint64_t per_tree = static_cast<uint64_t>(config.tree_restart_rounds);
  if (per_tree == 0) return absl::InvalidArgumentError("DP-FTRL needs tree_restart_rounds >= 1");
  TreeParticipation participation(per_tree, config.max_participations_per_tree, committed_version / per_tree);
  const uint64_t tree_start = participation.tree_ * per_tree;  // versions tree_start + 1 .. are this tree's
  SEEDLING_ASSIGN_OR_RETURN(std::optional<RoundRecord> latest, store.LatestRound());
  for (uint64_t id = latest.has_value() ? latest->round_id : 0; id >= 1; --id) {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<RoundRecord> round, store.FindRound(id));
    if (!round.has_value() || round->state != RoundState::kCommitted) continue;
    if (round->result_version <= tree_start) break;  // committed versions grow with round ids
    SEEDLING_ASSIGN_OR_RETURN(std::vector<LedgerEntry> entries, store.LedgerForRound(id));
    for (const LedgerEntry& e : entries) ++participation.counts_[e.device_id];
  }
  return participation;
}

bool TreeParticipation::MayJoin(const std::string& device_id) const {
  if (blocked_) return false;
  auto it = counts_.find(device_id);
  return it == counts_.end() || it->second < limit_;
}

void TreeParticipation::RecordCommit(uint64_t new_version, const absl::StatusOr<std::vector<LedgerEntry>>& devices) {
  if (!devices.ok()) {
    spdlog::error("DP-FTRL: cannot read the committed round's updates ({}); no device is selected until a restart",
                  std::string(devices.status().message()));
    blocked_ = true;
    return;
  }
  for (const LedgerEntry& e : *devices) ++counts_[e.device_id];
  const uint64_t next_tree = new_version / rounds_per_tree_;
  if (next_tree != tree_) {
    tree_ = next_tree;
    counts_.clear();
  }
}

}  // namespace seedling::server
