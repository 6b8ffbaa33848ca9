// The DP budget on its own (server/dp_budget.h): composition of the store's ledger, the gate on
// target_epsilon, and pricing a round before its commit, against privacy::RdpAccountant directly.

#include "server/dp_budget.h"

#include <catch2/catch.hpp>
#include <cmath>

namespace seedling::server {
namespace {

PrivacyConfig Privacy(double target_epsilon) {
  PrivacyConfig p;
  p.dp = true;
  p.clip_norm = 1;
  p.noise_multiplier = 1.1;
  p.target_epsilon = target_epsilon;
  p.delta = 1e-5;
  return p;
}

double EpsilonAfter(int rounds, double q) {
  privacy::RdpAccountant a;
  REQUIRE(a.Compose(q, 1.1, rounds).ok());
  return a.GetEpsilon(1e-5)->epsilon;
}

}  // namespace

TEST_CASE("The DP sampling rate is clients per round over registered devices, at most 1", "[server][dp]") {
  CHECK(DpSamplingRate(10, 1000) == Approx(0.01));
  CHECK(DpSamplingRate(10, 5) == 1.0);
  CHECK(DpSamplingRate(10, 0) == 1.0);
}

TEST_CASE("The DP budget composes the ledger and moves on only when a priced round is committed", "[server][dp]") {
  std::vector<DpSpend> ledger = {{1, 0.01, 1.1, 1}, {2, 0.01, 1.1, 1}};
  auto budget = DpBudget::Create(Privacy(100), ledger);
  REQUIRE(budget.ok());
  CHECK(budget->epsilon() == Approx(EpsilonAfter(2, 0.01)));

  REQUIRE(budget->AllowsNextRound(0.01));
  auto price = budget->PriceRound(3);
  REQUIRE(price.ok());
  CHECK(price->spend.round_id == 3);
  CHECK(price->spend.sampling_rate == 0.01);
  CHECK(price->epsilon_after == Approx(EpsilonAfter(3, 0.01)));
  CHECK(budget->epsilon() == Approx(EpsilonAfter(2, 0.01)));  // not committed yet
  budget->Commit(*price);
  CHECK(budget->epsilon() == Approx(EpsilonAfter(3, 0.01)));
}

TEST_CASE("A round is priced once, at the gate, and only a round the gate accepted has a price", "[server][dp]") {
  auto budget = DpBudget::Create(Privacy(100), {});
  REQUIRE(budget.ok());
  CHECK(budget->PriceRound(1).status().code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(budget->AllowsNextRound(0.02));
  auto price = budget->PriceRound(1);
  REQUIRE(price.ok());
  CHECK(price->spend.round_id == 1);
  CHECK(price->spend.sampling_rate == 0.02);
  CHECK(price->epsilon_after == Approx(EpsilonAfter(1, 0.02)));
  // A refused gate leaves no price behind, and neither does a commit (the next round is priced afresh).
  CHECK_FALSE(budget->AllowsNextRound(absl::UnavailableError("no store")));
  CHECK(budget->PriceRound(1).status().code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(budget->AllowsNextRound(0.02));
  budget->Commit(*budget->PriceRound(1));
  CHECK(budget->PriceRound(2).status().code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(budget->AllowsNextRound(0.02));
  CHECK(budget->PriceRound(2)->epsilon_after == Approx(EpsilonAfter(2, 0.02)));
}

TEST_CASE("The DP budget refuses a round that would exceed target_epsilon, and says why", "[server][dp]") {
  const double target = (EpsilonAfter(1, 0.5) + EpsilonAfter(2, 0.5)) / 2;  // room for one round, not two
  auto budget = DpBudget::Create(Privacy(target), {{1, 0.5, 1.1, 1}});
  REQUIRE(budget.ok());
  CHECK_FALSE(budget->AllowsNextRound(0.5));
  CHECK(budget->refusal().find("privacy budget exhausted") != std::string::npos);
  // A lower sampling rate fits, and clears the refusal.
  CHECK(budget->AllowsNextRound(0.001));
  CHECK(budget->refusal().empty());
  // Devices that cannot be counted refuse too.
  CHECK_FALSE(budget->AllowsNextRound(absl::UnavailableError("no store")));
  CHECK(budget->refusal().find("no store") != std::string::npos);
}

TEST_CASE("A DP ledger entry the accountant refuses is an error", "[server][dp]") {
  CHECK_FALSE(DpBudget::Create(Privacy(10), {{1, 1.5, 1.1, 1}}).ok());  // q > 1
}

}  // namespace seedling::server
