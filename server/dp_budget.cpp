#include "server/dp_budget.h"

#include <algorithm>
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

absl::StatusOr<DpBudget> DpBudget::Create(const PrivacyConfig& config, const std::vector<DpSpend>& ledger) {
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

bool DpBudget::AllowsNextRound(const absl::StatusOr<double>& q) {
  std::string refusal;
  absl::StatusOr<Price> price = absl::FailedPreconditionError("no sampling rate");
  if (!q.ok()) {
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
  next_price_.reset();  // priced against the accountant before this round
}

}  // namespace seedling::server
