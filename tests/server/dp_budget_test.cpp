// The DP budget on its own (server/dp_budget.h): composition of the store's ledger, the gate on
// target_epsilon, and pricing a round before its commit, against privacy::RdpAccountant directly.

#include "server/dp_budget.h"

#include <catch2/catch.hpp>
#include <cmath>

#include "server/devices.h"
#include "server/store.h"
#include "tests/test_util.h"

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

PrivacyConfig Ftrl(double target_epsilon, int64_t restart, int64_t k = 1) {
  PrivacyConfig p = Privacy(target_epsilon);
  p.mechanism = "dp-ftrl";
  p.noise_multiplier = 2.0;
  p.tree_restart_rounds = restart;
  p.max_participations_per_tree = k;
  return p;
}

std::vector<DpSpend> FtrlLedger(int rounds, int64_t k = 1) {
  std::vector<DpSpend> ledger;
  for (int r = 1; r <= rounds; ++r) ledger.push_back({static_cast<uint64_t>(r), 1.0, 2.0, k * k});
  return ledger;
}

TEST_CASE("The DP-FTRL budget prices rounds in zCDP and records them as unamplified steps", "[server][dp][ftrl]") {
  // R = 4, z = 2: after 9 committed rounds (trees of 4, 4, 1 rounds: 3 + 3 + 1 levels) ρ = 7/8; the 10th
  // round opens level 1 of the third tree: ρ = 8/8 = 1 (hand-computed, privacy/accountant.h).
  auto budget = DpBudget::Create(Ftrl(100, 4), FtrlLedger(9), 9);
  REQUIRE(budget.ok());
  CHECK(budget->rho() == Approx(7.0 / 8.0));
  CHECK(budget->epsilon() == Approx(7.0 / 8.0 + 2 * std::sqrt(7.0 / 8.0 * std::log(1e5))));
  CHECK(budget->epsilon_at_report_delta() == Approx(7.0 / 8.0 + 2 * std::sqrt(7.0 / 8.0 * std::log(1e10))));
  // q plays no part (no sampling assumption), not even an error counting devices.
  REQUIRE(budget->AllowsNextRound(absl::UnavailableError("no store")));
  auto price = budget->PriceRound(10);
  REQUIRE(price.ok());
  CHECK(price->rho_after == Approx(1.0));
  CHECK(price->epsilon_after == Approx(1.0 + 2 * std::sqrt(std::log(1e5))));
  CHECK(price->epsilon_report_delta_after == Approx(1.0 + 2 * std::sqrt(std::log(1e10))));
  CHECK(price->spend.sampling_rate == 1.0);
  CHECK(price->spend.noise_multiplier == 2.0);
  CHECK(price->spend.steps == 1);
  budget->Commit(*price);
  CHECK(budget->rho() == Approx(1.0));
  // The Gaussian budget reports no ρ.
  CHECK(std::isnan(DpBudget::Create(Privacy(10), {})->rho()));
}

TEST_CASE("The DP-FTRL budget refuses the round that would exceed target_epsilon", "[server][dp][ftrl]") {
  // R = 4, z = 2, k = 1: ρ after 3 rounds = 2/8, after 4 = 3/8. A target between their ε at δ = 1e-5.
  auto eps = [](double rho) { return rho + 2 * std::sqrt(rho * std::log(1e5)); };
  const double target = 0.5 * (eps(2.0 / 8) + eps(3.0 / 8));
  auto budget = DpBudget::Create(Ftrl(target, 4), FtrlLedger(2), 2);
  REQUIRE(budget.ok());
  REQUIRE(budget->AllowsNextRound(1.0));  // round 3 keeps ρ at 2/8
  budget->Commit(*budget->PriceRound(3));
  CHECK_FALSE(budget->AllowsNextRound(1.0));  // round 4 would open level 2
  CHECK(budget->refusal().find("privacy budget exhausted: the next DP-FTRL round (4") != std::string::npos);
  CHECK(budget->PriceRound(4).status().code() == absl::StatusCode::kFailedPrecondition);
  // With k = 2 participations per tree the same rounds cost 4 times as much.
  auto k2 = DpBudget::Create(Ftrl(100, 4, 2), FtrlLedger(3, 2), 3);
  REQUIRE(k2.ok());
  CHECK(k2->rho() == Approx(4 * 2.0 / 8));
}

TEST_CASE("The DP-FTRL budget accepts only a ledger of its own rounds covering every version", "[server][dp][ftrl]") {
  CHECK(DpBudget::Create(Ftrl(100, 4), FtrlLedger(3), 3).ok());
  // Committed versions without a DP-FTRL spend (DP was off, or another mechanism ran).
  auto missing = DpBudget::Create(Ftrl(100, 4), FtrlLedger(3), 5);
  CHECK(missing.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(missing.status().message()).find("3 DP rounds but 5 committed versions") != std::string::npos);
  // A Gaussian round (q < 1), another noise multiplier, another k.
  std::vector<DpSpend> gaussian = FtrlLedger(3);
  gaussian[1].sampling_rate = 0.1;
  CHECK(DpBudget::Create(Ftrl(100, 4), gaussian, 3).status().code() == absl::StatusCode::kFailedPrecondition);
  std::vector<DpSpend> other_z = FtrlLedger(3);
  other_z[2].noise_multiplier = 1.0;
  CHECK(DpBudget::Create(Ftrl(100, 4), other_z, 3).status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(DpBudget::Create(Ftrl(100, 4, 2), FtrlLedger(3, 1), 3).status().code() ==
        absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("DP-FTRL ledger entries bound the tree's cost for the RDP accountant too", "[server][dp][ftrl]") {
  // A reader composing the ledger as Gaussian steps (q = 1, z, k² steps) never gets less than the tree's ρ:
  // RDP(α) of those steps is α·(rounds·k²)/(2z²) ≥ α·ρ.
  for (int64_t k : {1, 2, 3}) {
    for (int rounds : {1, 4, 7, 30}) {
      privacy::RdpAccountant accountant({2.0, 8.0, 32.0});
      for (const DpSpend& s : FtrlLedger(rounds, k)) {
        REQUIRE(accountant.Compose(s.sampling_rate, s.noise_multiplier, s.steps).ok());
      }
      const double rho = *privacy::TreeAggregationZcdp(rounds, 4, 2.0, k);
      for (size_t i = 0; i < accountant.orders().size(); ++i) {
        CHECK(accountant.rdp()[i] >= accountant.orders()[i] * rho * (1 - 1e-12));
      }
    }
  }
}

// A store with rounds 1 (committed, v1: dev-0, dev-1), 2 (aborted: dev-2) and 3 (committed, v2: dev-0).
void FillParticipationStore(Store& store) {
  for (int d = 0; d < 4; ++d) REQUIRE(AddDevice(store, "dev-" + std::to_string(d), 1).ok());
  auto round = [&](const std::vector<std::string>& devices, bool commit, uint64_t version) {
    RoundRecord f;
    f.method = "lora-bp";
    f.config_json = "{}";
    f.target = 2;
    f.min_reports = 1;
    const uint64_t id = store.CreateRound(f)->round_id;
    for (const std::string& d : devices) {
      TaskRecord task;
      task.task_id = "r" + std::to_string(id) + "-" + d;
      task.round_id = id;
      task.device_id = d;
      REQUIRE(store.AddTask(task).ok());
      LedgerEntry e;
      e.idempotency_key = task.task_id;
      e.round_id = id;
      e.task_id = task.task_id;
      e.device_id = d;
      e.num_examples = 1;
      REQUIRE(store.RecordAcceptedUpdate(e).ok());
    }
    if (!commit) {
      REQUIRE(store.AbortRound(id, 2, "test").ok());
      return;
    }
    REQUIRE(store.SetRoundState(id, RoundState::kCollecting, 1).ok());
    REQUIRE(store.SetRoundState(id, RoundState::kAggregating, 2).ok());
    REQUIRE(store.WriteCheckpoint(version, {{"params", {0.0f}}}).ok());
    REQUIRE(store.CommitRound(id, version, 3, "{}", "", DpSpend{id, 1.0, 2.0, 1}).ok());
  };
  REQUIRE(store.WriteCheckpoint(0, {{"params", {0.0f}}}).ok());
  round({"dev-0", "dev-1"}, true, 1);
  round({"dev-2"}, false, 0);
  round({"dev-0"}, true, 2);
}

TEST_CASE("DP-FTRL selection admits a device only below k contributions to the current tree", "[server][dp][ftrl]") {
  seedling::testing::TempDir dir;
  auto store = Store::Open(dir.path);
  REQUIRE(store.ok());
  FillParticipationStore(**store);
  // R = 4: versions 1..4 are tree 0. dev-0 contributed twice, dev-1 once, dev-2 only to an aborted round.
  auto one = TreeParticipation::Load(**store, Ftrl(10, 4, 1), 2);
  REQUIRE(one.ok());
  CHECK(one->tree() == 0);
  CHECK(!one->MayJoin("dev-0"));
  CHECK(!one->MayJoin("dev-1"));
  CHECK(one->MayJoin("dev-2"));
  CHECK(one->MayJoin("dev-3"));
  auto two = TreeParticipation::Load(**store, Ftrl(10, 4, 2), 2);
  REQUIRE(two.ok());
  CHECK(!two->MayJoin("dev-0"));
  CHECK(two->MayJoin("dev-1"));
  // R = 2: the next round (version 3) starts tree 1, where nobody has contributed yet.
  auto fresh = TreeParticipation::Load(**store, Ftrl(10, 2, 1), 2);
  REQUIRE(fresh.ok());
  CHECK(fresh->tree() == 1);
  CHECK(fresh->MayJoin("dev-0"));
  // Commits move the counts on; the round producing version 4 ends tree 0 (R = 4).
  LedgerEntry dev2;
  dev2.device_id = "dev-2";
  one->RecordCommit(3, std::vector<LedgerEntry>{dev2});
  CHECK(!one->MayJoin("dev-2"));
  one->RecordCommit(4, std::vector<LedgerEntry>{});
  CHECK(one->tree() == 1);
  CHECK(one->MayJoin("dev-0"));
  CHECK(one->MayJoin("dev-2"));
  // A ledger that cannot be read blocks selection rather than guess.
  one->RecordCommit(5, absl::UnavailableError("disk"));
  CHECK(!one->MayJoin("dev-3"));
}

}  // namespace seedling::server
