// Differential privacy on the server: the DpStrategy wrapper (clipping, noise, fixed denominator), the
// [privacy] config, the durable budget and the refusal to open a round that would exceed it.

#include "privacy/dp.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "base/file.h"
#include "base/philox.h"
#include "comms/codec.h"
#include "lora/adapter.h"
#include "model/config.h"
#include "model/init.h"
#include "privacy/accountant.h"
#include "server/config.h"
#include "server/coordinator.h"
#include "server/devices.h"
#include "server/dp_strategy.h"
#include "server/store.h"
#include "tests/test_util.h"

namespace seedling::server {
namespace {

using seedling::testing::TempDir;

std::string Fp32(const std::vector<float>& v) {
  comms::CodecOptions o;
  o.codec = v1::CODEC_FP32;
  auto p = comms::EncodeDense(v, o, 0);
  REQUIRE(p.ok());
  return *p;
}

std::unique_ptr<Strategy> Wrapped(const std::string& inner_name, double clip, double z, double m,
                                  uint64_t noise_seed = 1, double max_update_norm = 0, uint32_t pool = 64) {
  StrategyOptions so;
  so.name = inner_name;
  so.kseed_pool_size = pool;
  auto inner = MakeStrategy(so);
  REQUIRE(inner.ok());
  DpStrategyOptions dp;
  dp.clip_norm = clip;
  dp.noise_multiplier = z;
  dp.expected_clients = m;
  dp.max_update_norm = max_update_norm;
  dp.kseed_pool_size = pool;
  auto s =
      MakeDpStrategy(std::move(inner).value(), dp, std::make_unique<privacy::SeededNoiseForSimulation>(noise_seed));
  REQUIRE(s.ok());
  return std::move(s).value();
}

double Norm(const std::vector<float>& v) {
  double n2 = 0;
  for (float x : v) n2 += static_cast<double>(x) * x;
  return std::sqrt(n2);
}

TEST_CASE("DpStrategy clips each update to C and divides the sum by the fixed expected count", "[server][dp]") {
  // z = 0: the result is exactly Σ clip(Δ_c) / m, computed here the naive way.
  auto s = Wrapped("fedavg", 1.0, 0.0, 4.0);
  GlobalModel g;
  g.params.assign(50, 0.0f);
  REQUIRE(s->BeginRound(g).ok());
  Rng rng(5, 0);
  std::vector<std::vector<float>> updates;
  for (double target_norm : {0.5, 3.0, 10.0}) {
    std::vector<float> u(50);
    for (float& x : u) x = static_cast<float>(rng.Normal());
    const double n = Norm(u);
    for (float& x : u) x = static_cast<float>(x * target_norm / n);
    updates.push_back(u);
  }
  for (size_t c = 0; c < updates.size(); ++c) {
    // Example counts do not weight a DP round (uniform w_k).
    REQUIRE(s->Accumulate({"dev" + std::to_string(c), 100 * (c + 1), Fp32(updates[c])}).ok());
  }
  auto out = s->FinishRound(g);
  REQUIRE(out.ok());
  std::vector<double> expected(50, 0.0);
  for (const auto& u : updates) {
    const double n = Norm(u);
    const double scale = std::min(1.0, 1.0 / n);
    for (size_t i = 0; i < 50; ++i) expected[i] += u[i] * scale;
  }
  for (size_t i = 0; i < 50; ++i) CHECK(g.params[i] == Approx(expected[i] / 4.0).margin(1e-6));
  CHECK(out->metrics.at("clients") == 3);
  CHECK(out->metrics.at("dp_clipped") == 2);
  CHECK(out->metrics.at("dp_expected_clients") == 4);
  CHECK(out->metrics.at("examples") == 600);
}

TEST_CASE("DpStrategy adds Gaussian noise of std z*C/m to every coordinate of the mean", "[server][dp]") {
  const double clip = 0.5, z = 1.3, m = 8.0;
  auto s = Wrapped("fedavg", clip, z, m, 77);
  GlobalModel g;
  g.params.assign(400000, 0.0f);
  REQUIRE(s->BeginRound(g).ok());
  REQUIRE(s->Accumulate({"dev", 1, Fp32(std::vector<float>(g.params.size(), 0.0f))}).ok());
  auto out = s->FinishRound(g);
  REQUIRE(out.ok());
  double sum = 0, sum2 = 0;
  for (float x : g.params) sum += x;
  const double mean = sum / g.params.size();
  for (float x : g.params) sum2 += (x - mean) * (x - mean);
  const double stddev = std::sqrt(sum2 / (g.params.size() - 1));
  const double want = z * clip / m;
  CHECK(stddev == Approx(want).epsilon(0.01));
  CHECK(std::abs(mean) < 5 * want / std::sqrt(static_cast<double>(g.params.size())));
  CHECK(out->metrics.at("dp_noise_stddev") == Approx(want));
}

TEST_CASE("DpStrategy rejects updates over max_update_norm and refuses to finish an empty round", "[server][dp]") {
  auto s = Wrapped("fedavg", 1.0, 1.0, 2.0, 1, /*max_update_norm=*/5.0);
  GlobalModel g;
  g.params.assign(4, 0.0f);
  REQUIRE(s->BeginRound(g).ok());
  const auto st = s->Accumulate({"dev", 1, Fp32({6.0f, 0.0f, 0.0f, 0.0f})});
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("exceeds max_update_norm") != std::string::npos);
  CHECK(s->Accumulate({"dev", 1, Fp32({1.0f, 2.0f})}).code() == absl::StatusCode::kInvalidArgument);
  CHECK(s->accumulated() == 0);
  CHECK(s->FinishRound(g).status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(g.params == std::vector<float>(4, 0.0f));
}

TEST_CASE("DpStrategy for kseed clips scalars and per-seed vectors and noises every seed's sum", "[server][dp]") {
  const uint32_t pool = 64;
  {
    // z = 0: G_i = Σ_c clip(v_c)_i / m, with each scalar clamped to C first.
    auto s = Wrapped("kseed", 1.0, 0.0, 2.0, 1, 0, pool);
    GlobalModel g;
    g.params.assign(32, 0.0f);
    REQUIRE(s->BeginRound(g).ok());
    // Client a: scalars 5 → 1 and 0.5 on seeds 3 and 7: per-seed norm √1.25 > 1 → scaled by 1/√1.25.
    REQUIRE(s->Accumulate(
                 {"a", 1, comms::EncodeSeedIndexScalars(std::vector<comms::SeedIndexScalar>{{3, 5.0f}, {7, 0.5f}})})
                .ok());
    // Client b: 0.25 twice on seed 3 → 0.5, within C.
    REQUIRE(s->Accumulate(
                 {"b", 1, comms::EncodeSeedIndexScalars(std::vector<comms::SeedIndexScalar>{{3, 0.25f}, {3, 0.25f}})})
                .ok());
    auto out = s->FinishRound(g);
    REQUIRE(out.ok());
    auto sums = ParseSeedSums(out->seed_sums_blob);
    REQUIRE(sums.ok());
    std::map<uint32_t, float> got;
    for (const auto& e : sums->sums()) got[e.index()] = e.value();
    const double k = 1.0 / std::sqrt(1.25);
    CHECK(got.size() == 2);
    CHECK(got[3] == Approx((1.0 * k + 0.5) / 2.0).epsilon(1e-6));
    CHECK(got[7] == Approx((0.5 * k) / 2.0).epsilon(1e-6));
    CHECK(out->metrics.at("dp_clipped") == 1);
  }
  {
    // z > 0: every one of the K sums is noised and published, used or not.
    auto s = Wrapped("kseed", 1.0, 1.0, 2.0, 3, 0, pool);
    GlobalModel g;
    g.params.assign(32, 0.0f);
    REQUIRE(s->BeginRound(g).ok());
    REQUIRE(
        s->Accumulate({"a", 1, comms::EncodeSeedIndexScalars(std::vector<comms::SeedIndexScalar>{{3, 0.5f}})}).ok());
    auto out = s->FinishRound(g);
    REQUIRE(out.ok());
    auto sums = ParseSeedSums(out->seed_sums_blob);
    REQUIRE(sums.ok());
    CHECK(sums->sums_size() == static_cast<int>(pool));
  }
}

TEST_CASE("MakeDpStrategy refuses bad options", "[server][dp]") {
  auto make = [](double clip, double z, double m) {
    StrategyOptions so;
    DpStrategyOptions dp;
    dp.clip_norm = clip;
    dp.noise_multiplier = z;
    dp.expected_clients = m;
    return MakeDpStrategy(MakeStrategy(so).value(), dp, std::make_unique<privacy::CsprngGaussianNoise>()).status();
  };
  CHECK(make(0.0, 1.0, 1.0).code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(make(-1.0, 1.0, 1.0).message()).find("clip_norm must be finite and > 0, got -1") !=
        std::string::npos);
  CHECK(make(1.0, -1.0, 1.0).code() == absl::StatusCode::kInvalidArgument);
  CHECK(make(1.0, 1.0, 0.0).code() == absl::StatusCode::kInvalidArgument);
  CHECK(make(1.0, 1.0, 1.0).ok());
}

TEST_CASE("[privacy] config is parsed and validated", "[server][dp][config]") {
  const std::string base = "[model]\ndir = \"m\"\n";
  auto ok = ParseServerConfig(base +
                              "[privacy]\ndp = true\nclip_norm = 0.5\nnoise_multiplier = 1.1\n"
                              "target_epsilon = 4\ndelta = 1e-6\nexpected_clients = 20\nnoise = \"seeded\"\n");
  REQUIRE(ok.ok());
  CHECK(ok->privacy.dp);
  CHECK(ok->privacy.clip_norm == 0.5);
  CHECK(ok->privacy.noise_multiplier == 1.1);
  CHECK(ok->privacy.target_epsilon == 4);
  CHECK(ok->privacy.delta == 1e-6);
  CHECK(ok->privacy.EffectiveExpectedClients(10) == 20);
  CHECK(ok->EffectiveClipNorm() == 0.5);
  auto defaults = ParseServerConfig(base);
  REQUIRE(defaults.ok());
  CHECK(!defaults->privacy.dp);
  CHECK(defaults->privacy.delta == 1e-5);
  CHECK(defaults->privacy.noise == "csprng");
  CHECK(defaults->privacy.EffectiveExpectedClients(10) == 10);

  auto error = [&](const std::string& privacy) {
    auto c = ParseServerConfig(base + "[privacy]\n" + privacy);
    REQUIRE(!c.ok());
    CHECK(c.status().code() == absl::StatusCode::kInvalidArgument);
    return std::string(c.status().message());
  };
  CHECK(error("dp = true\nnoise_multiplier = 1\ntarget_epsilon = 1\n")
            .find("[privacy] clip_norm: must be > 0 with dp = true, got 0") != std::string::npos);
  CHECK(error("dp = true\nclip_norm = 1\ntarget_epsilon = 1\n").find("[privacy] noise_multiplier") !=
        std::string::npos);
  CHECK(error("dp = true\nclip_norm = 1\nnoise_multiplier = 1\n").find("[privacy] target_epsilon") !=
        std::string::npos);
  CHECK(error("delta = 1\n").find("[privacy] delta: must be in (0, 1), got 1") != std::string::npos);
  CHECK(error("noise = \"urandom\"\n").find("[privacy] noise") != std::string::npos);
  CHECK(error("epsilon = 3\n").find("[privacy] epsilon: is not a known key") != std::string::npos);
  auto conflict = ParseServerConfig(base +
                                    "[training]\nclip_norm = 2\n[privacy]\ndp = true\nclip_norm = 1\n"
                                    "noise_multiplier = 1\ntarget_epsilon = 1\n");
  REQUIRE(!conflict.ok());
  CHECK(std::string(conflict.status().message()).find("[training] clip_norm") != std::string::npos);
}

TEST_CASE("The store records a round's DP spend with its commit and keeps it across reopening", "[server][dp][store]") {
  TempDir dir;
  {
    auto store = Store::Open(dir.path);
    REQUIRE(store.ok());
    RoundRecord f;
    f.method = "lora-bp";
    f.config_json = "{}";
    f.target = 1;
    f.min_reports = 1;
    const uint64_t id = (*store)->CreateRound(f)->round_id;
    REQUIRE((*store)->SetRoundState(id, RoundState::kCollecting, 1).ok());
    REQUIRE((*store)->SetRoundState(id, RoundState::kAggregating, 2).ok());
    REQUIRE((*store)->WriteCheckpoint(1, {{"params", {1.0f, 2.0f}}}).ok());
    // An out-of-range spend is refused and commits nothing.
    CHECK((*store)->CommitRound(id, 1, 3, "{}", "", DpSpend{id, 1.5, 1.0, 1}).code() ==
          absl::StatusCode::kInvalidArgument);
    CHECK((*store)->GlobalVersion().value() == 0);
    REQUIRE((*store)->CommitRound(id, 1, 3, "{}", "", DpSpend{id, 0.25, 1.5, 1}).ok());
  }
  auto store = Store::Open(dir.path);
  REQUIRE(store.ok());
  auto ledger = (*store)->DpLedger();
  REQUIRE(ledger.ok());
  REQUIRE(ledger->size() == 1);
  CHECK((*ledger)[0].round_id == 1);
  CHECK((*ledger)[0].sampling_rate == 0.25);
  CHECK((*ledger)[0].noise_multiplier == 1.5);
  CHECK((*ledger)[0].steps == 1);
}

// A tiny model and a DP config, with round 1 already committed (with its DP spend) in the state directory.
struct DpWorld {
  TempDir dir;
  std::string model_dir = JoinPath(dir.path, "model");
  ServerConfig config;
  static constexpr double kQ = 0.1, kZ = 1.0;

  DpWorld() {
    model::InitModelOptions init;
    init.preset = "tiny";
    init.seed = 3;
    REQUIRE(model::InitModel(model_dir, init).ok());
    config.state_dir = JoinPath(dir.path, "state");
    config.model_dir = model_dir;
    config.lora_rank = 4;
    config.clients_per_round = 1;
    config.min_reports = 1;
    config.privacy.dp = true;
    config.privacy.clip_norm = 1.0;
    config.privacy.noise_multiplier = kZ;
    config.privacy.delta = 1e-5;
    config.privacy.noise = "seeded";
    REQUIRE(MakeDirs(config.state_dir).ok());

    auto mc = model::LoadModelConfig(model_dir);
    REQUIRE(mc.ok());
    lora::LoraConfig lc;
    lc.rank = config.lora_rank;
    lc.alpha = config.lora_alpha;
    auto adapter = lora::LoraAdapter::Create(*mc, lc);
    REQUIRE(adapter.ok());
    auto store = Store::Open(config.state_dir);
    REQUIRE(store.ok());
    // 10 devices and 1 client per round: q = 0.1 for the next round too.
    for (int d = 0; d < 10; ++d) REQUIRE(AddDevice(**store, "dev-" + std::to_string(d), 1000).ok());
    RoundRecord f;
    f.method = "lora-bp";
    f.config_json = "{}";
    f.target = 1;
    f.min_reports = 1;
    const uint64_t id = (*store)->CreateRound(f)->round_id;
    REQUIRE((*store)->SetRoundState(id, RoundState::kCollecting, 1).ok());
    REQUIRE((*store)->SetRoundState(id, RoundState::kAggregating, 2).ok());
    REQUIRE((*store)->WriteCheckpoint(1, {{"params", std::vector<float>((*adapter)->numel(), 0.0f)}}).ok());
    REQUIRE((*store)->CommitRound(id, 1, 3, "{}", "", DpSpend{id, kQ, kZ, 1}).ok());
  }
};

TEST_CASE("The spent budget survives a restart and the round that would exceed it is not opened", "[server][dp]") {
  DpWorld w;
  const double eps1 = privacy::ComputeEpsilon(DpWorld::kQ, DpWorld::kZ, 1, 1e-5)->epsilon;
  const double eps2 = privacy::ComputeEpsilon(DpWorld::kQ, DpWorld::kZ, 2, 1e-5)->epsilon;
  REQUIRE(eps2 > eps1);
  ManualClock clock;
  {
    // Budget between one and two rounds: round 2 is refused.
    w.config.privacy.target_epsilon = 0.5 * (eps1 + eps2);
    Metrics metrics;
    auto c = Coordinator::Create(w.config, &clock, &metrics);
    REQUIRE(c.ok());
    CHECK((*c)->dp_epsilon() == Approx(eps1).epsilon(1e-9));
    (*c)->Tick();
    auto round2 = (*c)->FindRound(2);
    REQUIRE(round2.ok());
    CHECK(!round2->has_value());
    const DashboardSnapshot snap = (*c)->Snapshot();
    CHECK(snap.epsilon == Approx(eps1).epsilon(1e-9));
    CHECK(snap.dp_refusal.find("privacy budget exhausted") != std::string::npos);
    CHECK(snap.dp_refusal.find("no round is opened") != std::string::npos);
    CHECK(RenderStatusJson(snap).find("privacy budget exhausted") != std::string::npos);
    CHECK((*c)->Finished());
    CHECK((*c)->Health().ok());  // a spent budget is not a fault
    const std::string prom = metrics.RenderPrometheus();
    CHECK(prom.find("seedling_dp_epsilon ") != std::string::npos);
  }
  {
    // A budget that allows round 2: it opens.
    w.config.privacy.target_epsilon = eps2 * 1.01;
    auto c = Coordinator::Create(w.config, &clock, nullptr);
    REQUIRE(c.ok());
    (*c)->Tick();
    auto round2 = (*c)->FindRound(2);
    REQUIRE(round2.ok());
    CHECK(round2->has_value());
    CHECK((*c)->Snapshot().dp_refusal.empty());
    CHECK(!(*c)->Finished());
    (*c)->Shutdown();
  }
}

}  // namespace
}  // namespace seedling::server
