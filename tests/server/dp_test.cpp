// Differential privacy on the server: the DpStrategy wrapper (clipping, noise, fixed denominator), the
// [privacy] config, the durable budget and the refusal to open a round that would exceed it.

#include "privacy/dp.h"

#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
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
#include "privacy/tree_aggregation.h"
#include "server/config.h"
#include "server/coordinator.h"
#include "server/devices.h"
#include "server/dp_strategy.h"
#include "server/store.h"
#include "tests/server/store_rounds.h"
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

std::unique_ptr<Strategy> Ftrl(const std::string& inner_name, double server_lr, double clip, double z, double m,
                               int64_t restart, uint64_t seed) {
  StrategyOptions so;
  so.name = inner_name;
  so.server_lr = server_lr;
  so.momentum = 0.5;
  auto inner = MakeStrategy(so);
  REQUIRE(inner.ok());
  DpStrategyOptions dp;
  dp.clip_norm = clip;
  dp.noise_multiplier = z;
  dp.expected_clients = m;
  dp.tree_restart_rounds = restart;
  auto s = MakeDpFtrlStrategy(std::move(inner).value(), dp, std::make_unique<privacy::SeededNodeNoise>(seed));
  REQUIRE(s.ok());
  return std::move(s).value();
}

// Round `version + 1` of a strategy: two clients with updates drawn from (version, seed).
RoundOutcome FtrlRound(Strategy& s, GlobalModel& g, std::vector<std::vector<float>>* updates = nullptr) {
  REQUIRE(s.BeginRound(g).ok());
  Rng rng(100 + g.version, 0);
  for (int c = 0; c < 2; ++c) {
    std::vector<float> u(g.params.size());
    for (float& x : u) x = static_cast<float>(0.4 * rng.Normal());
    REQUIRE(s.Accumulate({"dev" + std::to_string(c), 1, Fp32(u)}).ok());
    if (updates != nullptr) updates->push_back(u);
  }
  auto out = s.FinishRound(g);
  REQUIRE(out.ok());
  g.version += 1;
  return *out;
}

TEST_CASE("DP-FTRL's model is theta_start + lr * (noisy prefix sum) / m, restarted with each tree",
          "[server][dp][ftrl]") {
  // Naive reference: keep the clipped sums s_t of the current tree and the model at the tree's start, and
  // compute θ = θ_start + η (Σ_{i ≤ τ} s_i + tree prefix noise of τ) / m with AddPrefixNoise (not the
  // increments the strategy uses).
  const size_t dim = 64;
  const double lr = 0.7, clip = 1.0, z = 1.2, m = 3.0;
  const int64_t restart = 4;
  auto s = Ftrl("fedavg", lr, clip, z, m, restart, 21);
  privacy::SeededNodeNoise reference_noise(21);
  GlobalModel g;
  g.params.assign(dim, 0.25f);
  std::vector<double> theta_start(g.params.begin(), g.params.end());
  std::vector<double> tree_sum(dim, 0.0);
  for (int t = 1; t <= 10; ++t) {
    const uint64_t version = g.version;
    if (version % restart == 0) {  // a new tree: the model so far is its start
      theta_start.assign(g.params.begin(), g.params.end());
      std::fill(tree_sum.begin(), tree_sum.end(), 0.0);
    }
    std::vector<std::vector<float>> updates;
    const RoundOutcome out = FtrlRound(*s, g, &updates);
    for (const auto& u : updates) {
      const double scale = std::min(1.0, clip / Norm(u));
      for (size_t i = 0; i < dim; ++i) tree_sum[i] += u[i] * scale;
    }
    const uint64_t position = version % restart + 1;
    std::vector<double> noisy = tree_sum;
    REQUIRE(privacy::AddPrefixNoise(reference_noise, version / restart, position, z * clip, noisy).ok());
    for (size_t i = 0; i < dim; ++i) {
      CHECK(g.params[i] == Approx(theta_start[i] + lr * noisy[i] / m).margin(2e-5));
    }
    CHECK(out.metrics.at("dp_tree") == static_cast<double>(version / restart));
    CHECK(out.metrics.at("dp_tree_round") == static_cast<double>(position));
    CHECK(out.metrics.at("dp_prefix_noise_stddev") == Approx(z * clip * std::sqrt(std::popcount(position)) / m));
  }
}

TEST_CASE("A DP-FTRL strategy re-created at version t continues the same tree (server restart)", "[server][dp][ftrl]") {
  // fedavgm: the momentum buffer travels in the global model (the checkpoint), the node noise is regenerated.
  GlobalModel continuous;
  continuous.params.assign(40, 0.0f);
  auto a = Ftrl("fedavgm", 1.0, 1.0, 0.8, 2.0, 5, 33);
  GlobalModel restarted;
  for (int t = 1; t <= 8; ++t) {
    FtrlRound(*a, continuous);
    if (t == 3) restarted = continuous;  // the checkpoint at version 3
  }
  auto b = Ftrl("fedavgm", 1.0, 1.0, 0.8, 2.0, 5, 33);
  for (int t = 4; t <= 8; ++t) FtrlRound(*b, restarted);
  CHECK(restarted.version == continuous.version);
  CHECK(restarted.params == continuous.params);
  CHECK(restarted.buffers == continuous.buffers);
  // Another seed gives other noise (the comparison above can fail).
  auto c = Ftrl("fedavgm", 1.0, 1.0, 0.8, 2.0, 5, 34);
  GlobalModel other;
  other.params.assign(40, 0.0f);
  FtrlRound(*c, other);
  GlobalModel first;
  first.params.assign(40, 0.0f);
  auto d = Ftrl("fedavgm", 1.0, 1.0, 0.8, 2.0, 5, 33);
  FtrlRound(*d, first);
  CHECK(other.params != first.params);
}

TEST_CASE("MakeDpFtrlStrategy refuses a bad tree_restart_rounds or a missing node noise", "[server][dp][ftrl]") {
  DpStrategyOptions dp;
  dp.clip_norm = 1;
  dp.noise_multiplier = 1;
  dp.expected_clients = 1;
  auto make = [&](int64_t restart, bool with_noise) {
    dp.tree_restart_rounds = restart;
    std::unique_ptr<privacy::NodeNoise> noise;
    if (with_noise) noise = std::make_unique<privacy::SeededNodeNoise>(1);
    return MakeDpFtrlStrategy(MakeStrategy(StrategyOptions{}).value(), dp, std::move(noise)).status();
  };
  CHECK(make(4, true).ok());
  CHECK(std::string(make(0, true).message()).find("tree_restart_rounds must be in [1, 4294967296], got 0") !=
        std::string::npos);
  CHECK(make((int64_t{1} << 32) + 1, true).code() == absl::StatusCode::kInvalidArgument);
  CHECK(make(4, false).code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("[privacy] mechanism = dp-ftrl is parsed and its keys validated", "[server][dp][ftrl][config]") {
  const std::string base =
      "[model]\ndir = \"m\"\n[privacy]\ndp = true\nclip_norm = 1\nnoise_multiplier = 1\ntarget_epsilon = 5\n";
  auto ok =
      ParseServerConfig(base + "mechanism = \"dp-ftrl\"\ntree_restart_rounds = 16\nmax_participations_per_tree = 2\n");
  REQUIRE(ok.ok());
  CHECK(ok->privacy.dp_ftrl());
  CHECK(ok->privacy.tree_restart_rounds == 16);
  CHECK(ok->privacy.max_participations_per_tree == 2);
  auto defaults = ParseServerConfig(base);
  REQUIRE(defaults.ok());
  CHECK(defaults->privacy.mechanism == "gaussian");
  CHECK(!defaults->privacy.dp_ftrl());
  CHECK(defaults->privacy.max_participations_per_tree == 1);
  auto error = [&](const std::string& extra) {
    auto c = ParseServerConfig(base + extra);
    REQUIRE(!c.ok());
    CHECK(c.status().code() == absl::StatusCode::kInvalidArgument);
    return std::string(c.status().message());
  };
  CHECK(error("mechanism = \"ftrl\"\n").find("[privacy] mechanism: must be \"gaussian\" or \"dp-ftrl\"") !=
        std::string::npos);
  CHECK(error("mechanism = \"dp-ftrl\"\n").find("[privacy] tree_restart_rounds: must be >= 1 with mechanism") !=
        std::string::npos);
  CHECK(error("tree_restart_rounds = -2\n").find("[privacy] tree_restart_rounds") != std::string::npos);
  CHECK(error("mechanism = \"dp-ftrl\"\ntree_restart_rounds = 4\nmax_participations_per_tree = 0\n")
            .find("[privacy] max_participations_per_tree: must be >= 1, got 0") != std::string::npos);
}

TEST_CASE("The DP-FTRL tree state is created once, kept secret and must not change", "[server][dp][ftrl]") {
  TempDir dir;
  PrivacyConfig p;
  p.dp = true;
  p.mechanism = "dp-ftrl";
  p.tree_restart_rounds = 8;
  p.noise = "csprng";
  const std::string path = dir.path + "/dp-ftrl-tree";
  auto node_vector = [](privacy::NodeNoise& noise) {
    std::vector<double> v(32, 0.0);
    REQUIRE(noise.AddNodeNoise({0, 1, 2}, 1.0, v).ok());
    return v;
  };
  // Missing after rounds were committed: the key is lost (or the rounds were not DP-FTRL).
  CHECK(OpenTreeNoise(dir.path, p, 1, 3).status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(!std::filesystem::exists(path));
  auto first = OpenTreeNoise(dir.path, p, 1, 0);
  REQUIRE(first.ok());
  CHECK((*first)->cryptographically_secure());
  CHECK((std::filesystem::status(path).permissions() & std::filesystem::perms::others_read) ==
        std::filesystem::perms::none);
  // A restart (any version) regenerates the same node noise.
  auto again = OpenTreeNoise(dir.path, p, 1, 5);
  REQUIRE(again.ok());
  CHECK(node_vector(**again) == node_vector(**first));
  // Another run (another directory) draws another key.
  TempDir other_dir;
  auto other = OpenTreeNoise(other_dir.path, p, 1, 0);
  REQUIRE(other.ok());
  CHECK(node_vector(**other) != node_vector(**first));
  // Settings the accounting depends on cannot change.
  PrivacyConfig changed = p;
  changed.tree_restart_rounds = 16;
  auto refused = OpenTreeNoise(dir.path, changed, 1, 5);
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(refused.status().message()).find("cannot change under committed rounds") != std::string::npos);
  // A damaged file.
  REQUIRE(WriteFileAtomic(path,
                          "seedling dp-ftrl tree v1\ntree_restart_rounds 8\nmax_participations_per_tree 1\n"
                          "noise csprng\nkey 12\n")
              .ok());
  CHECK(OpenTreeNoise(dir.path, p, 1, 5).status().code() == absl::StatusCode::kDataLoss);
  REQUIRE(WriteFileAtomic(path, "something else\n").ok());
  CHECK(OpenTreeNoise(dir.path, p, 1, 5).status().code() == absl::StatusCode::kDataLoss);
}

TEST_CASE("The store records a round's DP spend with its commit and keeps it across reopening", "[server][dp][store]") {
  TempDir dir;
  {
    auto store = Store::Open(dir.path);
    REQUIRE(store.ok());
    const uint64_t id = seedling::server::testing::AggregatingRound(**store);
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
    const uint64_t id = seedling::server::testing::AggregatingRound(**store);
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
