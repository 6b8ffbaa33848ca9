// End-to-end federation: the real coordinator and real clients (SDK), over loopback TLS or the in-memory
// transport. The aggregate the server publishes is checked against one computed here from the very
// updates the clients sent.

#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "base/file.h"
#include "base/philox.h"
#include "client/client.h"
#include "comms/codec.h"
#include "comms/framing.h"
#include "comms/in_memory.h"
#include "comms/tls.h"
#include "lora/adapter.h"
#include "model/init.h"
#include "model/runtime.h"
#include "nlohmann/json.hpp"
#include "optim/kseed.h"
#include "privacy/accountant.h"
#include "server/coordinator.h"
#include "server/store.h"
#include "tests/server/federation_world.h"
#include "tests/test_util.h"

namespace seedling::server {
namespace {

using World = seedling::testing::FederationWorld;

struct Observed {
  std::string device;
  std::string payload;
  uint64_t num_examples = 0;
};

// θ_r from θ_{r-1} and the round's updates, computed directly from the payloads (no strategy object).
std::vector<float> ExpectedNext(const ServerConfig& config, const std::vector<float>& prev, uint64_t round_index,
                                const std::vector<Observed>& updates) {
  std::vector<double> sum(prev.size(), 0.0);
  double examples = 0;
  for (const Observed& u : updates) examples += static_cast<double>(u.num_examples);
  std::vector<float> next = prev;
  if (config.method == "kseed") {
    std::map<uint32_t, double> per_seed;
    for (const Observed& u : updates) {
      auto pairs = comms::DecodeSeedIndexScalars(u.payload, config.strategy.kseed_pool_size);
      REQUIRE(pairs.ok());
      for (const auto& p : *pairs) per_seed[p.index] += static_cast<double>(p.value) * (u.num_examples / examples);
    }
    const std::vector<uint64_t> pool =
        optim::CandidateSeeds(config.strategy.kseed_pool_seed, config.strategy.kseed_pool_size);
    for (const auto& [index, g] : per_seed) {
      const float value = static_cast<float>(g);
      if (value == 0.0f) continue;
      AddNormal({pool[index], rng_stream::kPerturbation}, 0,
                static_cast<float>(-config.strategy.kseed_lr * static_cast<double>(value)), next);
    }
    return next;
  }
  for (const Observed& u : updates) {
    auto v = comms::DecodeDense(u.payload);
    REQUIRE(v.ok());
    REQUIRE(v->size() == prev.size());
    for (size_t i = 0; i < prev.size(); ++i)
      sum[i] += static_cast<double>((*v)[i]) * static_cast<double>(u.num_examples);
  }
  if (config.method == "fwdgrad") {
    // FwdLLM: θ − η_t Σ g_c / Σ n_c (clients upload summed gradients; the weights are example counts).
    double total = 0;
    for (const Observed& u : updates) total += static_cast<double>(u.num_examples);
    std::vector<double> g(prev.size(), 0.0);
    for (const Observed& u : updates) {
      auto v = comms::DecodeDense(u.payload);
      for (size_t i = 0; i < prev.size(); ++i) g[i] += static_cast<double>((*v)[i]);
    }
    const double eta = FwdGradLearningRate(config.strategy, round_index);
    for (size_t i = 0; i < prev.size(); ++i) next[i] = static_cast<float>(prev[i] - eta * g[i] / total);
    return next;
  }
  for (size_t i = 0; i < prev.size(); ++i) {
    next[i] = static_cast<float>(prev[i] + config.strategy.server_lr * sum[i] / examples);  // FedAvg
  }
  return next;
}

double MaxRelativeDiff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 1e-12;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return diff / scale;
}

// Runs `clients` SDK clients over loopback TLS until each has uploaded `rounds` times, and checks every
// committed global version against the aggregate of the payloads the clients sent in that round.
void RunLoopback(World& w, int clients, int rounds) {
  w.config.rounds = rounds;
  w.config.clients_per_round = clients;
  w.config.min_reports = clients;
  REQUIRE(w.config.Validate().ok());
  testing::LoopbackCoordinator served(w.config, clients);
  Coordinator& coordinator = served.coordinator();

  std::mutex mu;
  std::map<uint64_t, std::vector<Observed>> by_round;  // what each client sent, by round
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back([&, i] {
      const std::string id = "dev" + std::to_string(i);
      auto c = client::Client::Create(w.ClientFor(id, served.token(id), served.port()));
      if (!c.ok()) {
        ++failures;
        return;
      }
      (*c)->SetConditions({true, true, true, 1.0f});
      (*c)->SetUploadObserver([&, id](const v1::Task& task, const std::string& payload, uint64_t n) {
        std::lock_guard<std::mutex> lock(mu);
        by_round[task.round_id()].push_back({id, payload, n});
      });
      int uploaded = 0;
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(240);
      while (uploaded < rounds && std::chrono::steady_clock::now() < give_up) {
        auto r = (*c)->RunOnce();
        if (!r.ok()) {
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
          continue;
        }
        if (r->outcome == client::RunOutcome::kUploaded) {
          ++uploaded;
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
        }
      }
      if (uploaded < rounds) ++failures;
    });
  }
  for (std::thread& t : threads) t.join();
  // Wait for the last round's commit (the last upload triggers it, but give the ticker a moment).
  for (int i = 0; i < 200 && coordinator.global_version() < static_cast<uint64_t>(rounds); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  served.Stop();
  REQUIRE(failures == 0);
  REQUIRE(coordinator.global_version() == static_cast<uint64_t>(rounds));

  std::vector<float> prev = w.InitialAdapter();
  for (int r = 1; r <= rounds; ++r) {
    INFO("round " << r << " (" << w.config.method << ")");
    REQUIRE(by_round[static_cast<uint64_t>(r)].size() == static_cast<size_t>(clients));
    auto actual = coordinator.CheckpointParams(static_cast<uint64_t>(r));
    REQUIRE(actual.ok());
    const std::vector<float> expected = ExpectedNext(w.config, prev, static_cast<uint64_t>(r - 1), by_round[r]);
    const double rel = MaxRelativeDiff(*actual, expected);
    INFO("max relative difference " << rel);
    CHECK(rel < 1e-5);
    CHECK(MaxRelativeDiff(*actual, prev) > 1e-7);  // the round changed the model
    prev = *actual;
  }
}

TEST_CASE("20 TLS clients complete 3 lora-bp rounds with int8 updates, as aggregated by hand", "[server][federation]") {
  World w;
  w.config.method = "lora-bp";
  w.config.codec.codec = v1::CODEC_INT8;
  w.config.lr = 5e-3;
  w.config.strategy.name = "fedavg";
  RunLoopback(w, 20, 3);
}

TEST_CASE("20 TLS clients complete 3 fwdgrad rounds, as aggregated by hand", "[server][federation]") {
  World w;
  w.config.method = "fwdgrad";
  w.config.codec.codec = v1::CODEC_FP32;
  w.config.perturbations = 2;
  w.config.strategy.name = "fwdgrad";
  w.config.strategy.total_rounds = 3;
  w.config.strategy.warmup_fraction = 0.0;
  RunLoopback(w, 20, 3);
}

TEST_CASE("20 TLS clients complete 3 kseed rounds, as aggregated by hand", "[server][federation]") {
  World w;
  w.config.method = "kseed";
  w.config.codec.codec = v1::CODEC_SEED_SCALARS;
  w.config.strategy.name = "kseed";
  w.config.strategy.kseed_pool_size = 256;
  w.config.strategy.kseed_pool_seed = 9;
  w.config.strategy.kseed_lr = 1e-3;
  w.config.lr = 1e-3;
  RunLoopback(w, 20, 3);
}

// ---- dropouts, with the in-memory transport and a manual clock -----------------------------------------

// A transport that drops the connection for good after `chunks_allowed` upload chunks: the device vanished.
std::unique_ptr<comms::Transport> VanishingTransport(comms::HandlerFactory factory, int chunks_allowed) {
  auto count = std::make_shared<std::atomic<int>>(0);
  comms::InMemoryFaults faults;
  faults.on_request = [count, chunks_allowed](std::string& frame) {
    auto decoded = comms::DecodeFrameBody(std::string_view(frame).substr(4));
    if (decoded.ok() && decoded->has_upload_chunk()) return count->fetch_add(1) < chunks_allowed;
    return !(decoded.ok() && decoded->has_upload_commit() && count->load() >= chunks_allowed);
  };
  return comms::MakeInMemoryTransport(std::move(factory), std::move(faults));
}

// 13 devices get tasks (target 10, 130% over-selection); `vanishing` of them disappear mid-upload.
std::pair<RoundState, int64_t> RoundWithDropouts(int vanishing) {
  World w;
  w.config.method = "lora-bp";
  w.config.codec.codec = v1::CODEC_FP32;
  w.config.rounds = 1;
  w.config.clients_per_round = 10;
  w.config.over_selection = 1.3;
  w.config.min_reports = 8;
  w.config.round_deadline_s = 600;
  ManualClock clock;
  auto coordinator = Coordinator::Create(w.config, &clock, nullptr);
  REQUIRE(coordinator.ok());
  (*coordinator)->Tick();  // opens round 1
  std::vector<std::unique_ptr<client::Client>> clients;
  for (int i = 0; i < 13; ++i) {
    const std::string id = "dev" + std::to_string(i);
    auto token = (*coordinator)->RegisterDevice(id);
    REQUIRE(token.ok());
    client::ClientConfig cc = w.ClientFor(id, *token, 0);
    cc.upload_chunk_bytes = 4096;  // several chunks per update
    cc.max_attempts = 1;
    auto transport = i < vanishing ? VanishingTransport((*coordinator)->handler_factory(), 2)
                                   : comms::MakeInMemoryTransport((*coordinator)->handler_factory());
    auto c = client::Client::Create(cc, std::move(transport));
    REQUIRE(c.ok());
    (*c)->SetConditions({true, true, true, 1.0f});
    clients.push_back(std::move(c).value());
  }
  int uploaded = 0;
  for (auto& c : clients) {
    auto r = c->RunOnce();
    if (r.ok() && r->outcome == client::RunOutcome::kUploaded) ++uploaded;
  }
  CHECK(uploaded == 13 - vanishing);
  clock.Advance(601'000);  // past the deadline
  (*coordinator)->Tick();
  auto round = (*coordinator)->FindRound(1);
  REQUIRE(round.ok());
  REQUIRE(round->has_value());
  return {(*round)->state, (*round)->accepted};
}

TEST_CASE("With 30% of selected clients vanishing mid-upload the round still commits", "[server][federation]") {
  const auto [state, accepted] = RoundWithDropouts(4);  // 4 of 13 = 31%
  CHECK(state == RoundState::kCommitted);
  CHECK(accepted == 9);
}

TEST_CASE("Below the minimum number of reports the round aborts", "[server][federation]") {
  const auto [state, accepted] = RoundWithDropouts(8);  // 5 reports < 8
  CHECK(state == RoundState::kAborted);
  CHECK(accepted == 5);
}

// ---- DP-FTRL: the privacy figures move with each commit --------------------------------------------------

// The value of the unlabelled sample `name` in Prometheus text; NaN when absent.
double GaugeValue(const std::string& prometheus, const std::string& name) {
  const std::string prefix = "\n" + name + " ";
  const size_t at = ("\n" + prometheus).find(prefix);
  if (at == std::string::npos) return NAN;
  return std::stod(prometheus.substr(at + prefix.size() - 1));
}

TEST_CASE("DP-FTRL rounds move rho and epsilon at both deltas on /metrics and the status with each commit",
          "[server][federation][dp][ftrl]") {
  World w;
  w.config.method = "lora-bp";
  w.config.codec.codec = v1::CODEC_FP32;
  w.config.clients_per_round = 2;
  w.config.min_reports = 2;
  w.config.round_deadline_s = 600;
  w.config.privacy.dp = true;
  w.config.privacy.clip_norm = 0.5;
  w.config.privacy.noise_multiplier = 2.0;
  w.config.privacy.target_epsilon = 100;
  w.config.privacy.delta = 1e-6;
  w.config.privacy.noise = "seeded";
  w.config.privacy.mechanism = "dp-ftrl";
  w.config.privacy.tree_restart_rounds = 2;
  ManualClock clock;
  Metrics metrics;
  auto coordinator = Coordinator::Create(w.config, &clock, &metrics);
  REQUIRE(coordinator.ok());
  Coordinator& c = **coordinator;
  CHECK(GaugeValue(metrics.RenderPrometheus(), "seedling_dp_rho") == 0.0);
  // ρ after r rounds, trees of R = 2 rounds, z = 2, k = 1: 1/8 per level in use; levels 1, 2, 2 + 1.
  const double expected_rho[] = {1.0 / 8, 2.0 / 8, 3.0 / 8};
  for (int round = 1; round <= 3; ++round) {
    c.Tick();  // opens the round
    // Two fresh devices per round, so the per-tree participation bound never turns one away.
    for (int d = 0; d < 2; ++d) {
      const std::string id = "r" + std::to_string(round) + "-dev" + std::to_string(d);
      auto token = c.RegisterDevice(id);
      REQUIRE(token.ok());
      client::ClientConfig cc = w.ClientFor(id, *token, 0);
      cc.max_attempts = 1;
      auto client = client::Client::Create(cc, comms::MakeInMemoryTransport(c.handler_factory()));
      REQUIRE(client.ok());
      (*client)->SetConditions({true, true, true, 1.0f});
      auto r = (*client)->RunOnce();
      REQUIRE(r.ok());
      REQUIRE(r->outcome == client::RunOutcome::kUploaded);
    }
    clock.Advance(601'000);
    c.Tick();  // commits it
    auto record = c.FindRound(round);
    REQUIRE(record.ok());
    REQUIRE(record->has_value());
    REQUIRE((*record)->state == RoundState::kCommitted);

    const double rho = expected_rho[round - 1];
    REQUIRE(rho == Approx(*privacy::TreeAggregationZcdp(round, 2, 2.0, 1)).epsilon(1e-12));
    const double eps = rho + 2 * std::sqrt(rho * std::log(1e6));
    const double eps_1e10 = rho + 2 * std::sqrt(rho * std::log(1e10));
    INFO("round " << round);
    const std::string prom = metrics.RenderPrometheus();
    CHECK(GaugeValue(prom, "seedling_dp_rho") == Approx(rho).epsilon(1e-12));
    CHECK(GaugeValue(prom, "seedling_dp_epsilon") == Approx(eps).epsilon(1e-12));
    CHECK(GaugeValue(prom, "seedling_dp_epsilon_delta_1e_10") == Approx(eps_1e10).epsilon(1e-12));
    const nlohmann::json status = nlohmann::json::parse(RenderStatusJson(c.Snapshot()));
    CHECK(status.at("dp_mechanism") == "dp-ftrl");
    CHECK(status.at("dp_rho").get<double>() == Approx(rho).epsilon(1e-12));
    CHECK(status.at("epsilon").get<double>() == Approx(eps).epsilon(1e-12));
    CHECK(status.at("dp_epsilon_delta_1e-10").get<double>() == Approx(eps_1e10).epsilon(1e-12));
  }
  c.Shutdown();
}

}  // namespace
}  // namespace seedling::server
