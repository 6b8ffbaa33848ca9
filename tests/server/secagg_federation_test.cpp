// End-to-end secure aggregation: the real coordinator with [secagg] enabled and real SDK clients, over
// loopback TLS (and the in-memory transport with a manual clock for the dropout scenarios). The server only
// ever sees masked vectors; the model it publishes is checked against one computed here from the clients'
// quantized inputs (recorded by the upload observer before masking) summed in the clear.

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "base/file.h"
#include "client/client.h"
#include "comms/framing.h"
#include "comms/in_memory.h"
#include "comms/tls.h"
#include "lora/adapter.h"
#include "model/init.h"
#include "model/runtime.h"
#include "privacy/secagg.h"
#include "server/coordinator.h"
#include "server/secagg_strategy.h"
#include "server/store.h"
#include "tests/server/federation_world.h"
#include "tests/test_util.h"

namespace seedling::server {
namespace {

// The federation world with SecAgg+ on: 8-device cohorts may lose 2.
struct World : testing::FederationWorld {
  World() {
    config.method = "lora-bp";
    config.lr = 5e-3;
    config.secagg.enabled = true;
    config.secagg.max_dropout_fraction = 0.25;
    config.secagg.clipping_range = 0.05;
    config.secagg.max_weight = 50;
    config.secagg.poll_ms = 20;
  }
};

// A device's quantized input [w, w·q(x_0), ...] as the upload observer saw it (before masking).
struct Input {
  std::string device;
  std::vector<uint32_t> values;
};

std::vector<uint32_t> AsWords(const std::string& bytes) {
  std::vector<uint32_t> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

// The plaintext reference: Σ of the inputs mod 2^32 (the integer sum: no overflow by the validated
// parameters), decoded, then one FedAvg step from `prev` by a fresh strategy and, independently, by hand.
std::vector<float> ExpectedNext(const ServerConfig& config, const std::vector<float>& prev,
                                const std::vector<Input>& inputs, uint32_t cohort, std::vector<float>* by_hand) {
  REQUIRE(!inputs.empty());
  std::vector<uint32_t> sum(prev.size() + 1, 0);
  for (const Input& in : inputs) {
    REQUIRE(in.values.size() == sum.size());
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += in.values[i];
  }
  auto params = SecAggParamsFor(config.secagg, cohort, static_cast<uint32_t>(sum.size()));
  REQUIRE(params.ok());
  auto decoded = privacy::DecodeAggregate(sum, *params);
  REQUIRE(decoded.ok());
  auto strategy = MakeStrategy(config.strategy);
  REQUIRE(strategy.ok());
  GlobalModel global;
  global.params = prev;
  REQUIRE((*strategy)->BeginRound(global).ok());
  SummedUpdate s{decoded->weighted_sum, decoded->total_weight, static_cast<int64_t>(inputs.size())};
  REQUIRE((*strategy)->AccumulateSum(s).ok());
  REQUIRE((*strategy)->FinishRound(global).ok());
  by_hand->resize(prev.size());
  for (size_t i = 0; i < prev.size(); ++i) {
    (*by_hand)[i] = static_cast<float>(prev[i] + static_cast<double>(decoded->weighted_sum[i]) /
                                                     static_cast<double>(decoded->total_weight));
  }
  return global.params;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(static_cast<double>(a[i]) - b[i]));
  return d;
}

TEST_CASE("A loopback TLS federation with SecAgg+ equals the plaintext aggregate of the same quantized updates",
          "[server][secagg][federation]") {
  World w;
  const int clients = 6, rounds = 2;
  w.config.rounds = rounds;
  w.config.clients_per_round = clients;
  w.config.min_reports = clients;
  REQUIRE(w.config.Validate().ok());
  testing::LoopbackCoordinator served(w.config, clients);
  Coordinator& coordinator = served.coordinator();
  std::mutex mu;
  std::map<uint64_t, std::vector<Input>> by_round;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back([&, i] {
      const std::string id = "dev" + std::to_string(i);
      client::ClientConfig cc = w.ClientFor(id, served.token(id), served.port());
      // Half the devices send their masked input (4 bytes × 13,313 entries) in 4 KiB pieces, as a device
      // with an adapter over ~1M entries must (comms/proto "Size").
      if (i % 2 == 0) cc.upload_chunk_bytes = 4096;
      auto c = client::Client::Create(cc);
      if (!c.ok()) {
        ++failures;
        return;
      }
      (*c)->SetConditions({true, true, true, 1.0f});
      (*c)->SetUploadObserver([&, id](const v1::Task& task, const std::string& payload, uint64_t) {
        std::lock_guard<std::mutex> lock(mu);
        by_round[task.round_id()].push_back({id, AsWords(payload)});
      });
      int uploaded = 0;
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(240);
      while (uploaded < rounds && std::chrono::steady_clock::now() < give_up) {
        auto r = (*c)->RunOnce();
        if (r.ok() && r->outcome == client::RunOutcome::kUploaded) {
          ++uploaded;
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
      }
      if (uploaded < rounds) ++failures;
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 200 && coordinator.global_version() < static_cast<uint64_t>(rounds); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  served.Stop();
  REQUIRE(failures == 0);
  REQUIRE(coordinator.global_version() == static_cast<uint64_t>(rounds));

  std::vector<float> prev = w.InitialAdapter();
  for (int r = 1; r <= rounds; ++r) {
    INFO("round " << r);
    const std::vector<Input>& inputs = by_round[static_cast<uint64_t>(r)];
    REQUIRE(inputs.size() == static_cast<size_t>(clients));
    for (const Input& in : inputs) CHECK(in.values[0] >= 1);  // the weight slot: examples capped at W
    auto actual = coordinator.CheckpointParams(static_cast<uint64_t>(r));
    REQUIRE(actual.ok());
    std::vector<float> by_hand;
    const std::vector<float> expected = ExpectedNext(w.config, prev, inputs, clients, &by_hand);
    CHECK(*actual == expected);  // bit for bit: the unmasked sum is the plaintext sum
    CHECK(MaxAbsDiff(*actual, by_hand) < 1e-6);
    CHECK(MaxAbsDiff(*actual, prev) > 1e-6);  // the round changed the model
    prev = *actual;
  }
  // No plaintext update went through the upload path.
  CHECK(served.metrics().RenderPrometheus().find("seedling_requests_total{kind=\"upload_begin\"}") ==
        std::string::npos);
}

// ---- dropouts, with the in-memory transport and a manual clock -------------------------------------------

// Drops the connection for good once the device sends its masked input: it vanished mid-stage.
std::unique_ptr<comms::Transport> VanishAtMaskedInput(comms::HandlerFactory factory) {
  auto vanished = std::make_shared<std::atomic<bool>>(false);
  comms::InMemoryFaults faults;
  faults.on_request = [vanished](std::string& frame) {
    auto decoded = comms::DecodeFrameBody(std::string_view(frame).substr(4));
    if (decoded.ok() && decoded->has_secagg() && decoded->secagg().stage() == v1::SECAGG_MASKED_INPUT) *vanished = true;
    return !vanished->load();
  };
  return comms::MakeInMemoryTransport(std::move(factory), std::move(faults));
}

struct DropoutRun {
  std::vector<std::string> errors;  // the failed devices' statuses
  std::optional<RoundRecord> round;
  uint64_t global_version = 0;
  std::vector<Input> survivor_inputs;
  int uploaded = 0;
  std::vector<float> initial, committed;
  std::string metrics;
};

// `clients` devices (the whole cohort); the first `vanishing` vanish when they send their masked input.
// The test thread ticks the coordinator and, once every survivor's masked input arrived, moves the manual
// clock past the round's deadline so the stage closes without the vanished devices. With `target` > 0
// the round wants only `target` reports (the cohort is over-selected) and the clock never moves: the
// stage must close on its own.
DropoutRun RunWithDropouts(World& w, int clients, int vanishing, int target = 0,
                           std::function<std::unique_ptr<comms::Transport>(comms::HandlerFactory, int)> bad = nullptr) {
  w.config.rounds = 1;
  w.config.clients_per_round = target > 0 ? target : clients;
  w.config.over_selection = static_cast<double>(clients) / w.config.clients_per_round;
  w.config.min_reports = w.config.clients_per_round;
  REQUIRE(w.config.Validate().ok());
  ManualClock clock;
  Metrics metrics;
  auto coordinator = Coordinator::Create(w.config, &clock, &metrics);
  REQUIRE(coordinator.ok());
  (*coordinator)->Tick();  // opens round 1
  std::vector<std::unique_ptr<client::Client>> devices;
  std::mutex mu;
  std::map<std::string, std::vector<uint32_t>> inputs;
  for (int i = 0; i < clients; ++i) {
    const std::string id = "dev" + std::to_string(i);
    auto token = (*coordinator)->RegisterDevice(id);
    REQUIRE(token.ok());
    client::ClientConfig cc = w.ClientFor(id, *token, 0);
    cc.max_attempts = 1;
    auto transport = i >= vanishing ? comms::MakeInMemoryTransport((*coordinator)->handler_factory())
                     : bad          ? bad((*coordinator)->handler_factory(), i)
                                    : VanishAtMaskedInput((*coordinator)->handler_factory());
    auto c = client::Client::Create(cc, std::move(transport));
    REQUIRE(c.ok());
    (*c)->SetConditions({true, true, true, 1.0f});
    (*c)->SetUploadObserver([&, id](const v1::Task&, const std::string& payload, uint64_t) {
      std::lock_guard<std::mutex> lock(mu);
      inputs[id] = AsWords(payload);
    });
    devices.push_back(std::move(c).value());
  }
  std::vector<absl::StatusOr<client::RunResult>> results(clients, absl::UnknownError("not run"));
  std::atomic<int> running{clients};
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back([&, i] {
      results[i] = devices[i]->RunOnce();
      --running;
    });
  }
  bool advanced = false;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(240);
  while (running > 0 && std::chrono::steady_clock::now() < give_up) {
    (*coordinator)->Tick();
    const SecAggProgress p = (*coordinator)->secagg_progress();
    if (target == 0 && !advanced && p.stage == v1::SECAGG_MASKED_INPUT && p.answered == clients - vanishing) {
      clock.Advance(static_cast<int64_t>(w.config.round_deadline_s) * 1000 + 1);
      advanced = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (std::thread& t : threads) t.join();
  (*coordinator)->Tick();
  DropoutRun run;
  CHECK(advanced == (target == 0));
  for (int i = 0; i < clients; ++i) {
    if (!results[i].ok()) run.errors.push_back(results[i].status().ToString());
    if (results[i].ok() && results[i]->outcome == client::RunOutcome::kUploaded) {
      ++run.uploaded;
      run.survivor_inputs.push_back({"dev" + std::to_string(i), inputs["dev" + std::to_string(i)]});
    }
  }
  auto round = (*coordinator)->FindRound(1);
  REQUIRE(round.ok());
  run.round = *round;
  run.global_version = (*coordinator)->global_version();
  run.initial = w.InitialAdapter();
  run.committed = (*coordinator)->global_params();
  run.metrics = metrics.RenderPrometheus();
  return run;
}

TEST_CASE("SecAgg+ devices vanishing during the masked-input stage leave the exact sum of the survivors",
          "[server][secagg][federation]") {
  World w;  // 8 devices, δ = 0.25: up to 2 may drop
  const DropoutRun run = RunWithDropouts(w, 8, 2);
  REQUIRE(run.round.has_value());
  INFO("abort reason: " << run.round->abort_reason);
  REQUIRE(run.round->state == RoundState::kCommitted);
  CHECK(run.uploaded == 6);
  REQUIRE(run.global_version == 1);
  std::vector<float> by_hand;
  const std::vector<float> expected = ExpectedNext(w.config, run.initial, run.survivor_inputs, 8, &by_hand);
  CHECK(run.committed == expected);
  CHECK(MaxAbsDiff(run.committed, by_hand) < 1e-6);
}

TEST_CASE("With its target of masked inputs in and the rest within the dropout budget, the stage closes early",
          "[server][secagg][federation]") {
  World w;  // 8 devices for a target of 4, δ = 0.25: 2 vanish, and the round ends without its deadline
  const DropoutRun run = RunWithDropouts(w, 8, 2, 4);
  REQUIRE(run.round.has_value());
  INFO("abort reason: " << run.round->abort_reason);
  REQUIRE(run.round->state == RoundState::kCommitted);
  CHECK(run.round->closed_ms < run.round->deadline_ms);
  CHECK(run.uploaded == 6);
  std::vector<float> by_hand;
  CHECK(run.committed == ExpectedNext(w.config, run.initial, run.survivor_inputs, 8, &by_hand));
}

// Rewrites the device's masked-input pieces: device 0 sends its second piece one byte late, device 1 claims a
// message far larger than the session's masked inputs.
std::unique_ptr<comms::Transport> TamperPieces(comms::HandlerFactory factory, int device) {
  comms::InMemoryFaults faults;
  faults.on_request = [device](std::string& frame) {
    auto e = comms::DecodeFrameBody(std::string_view(frame).substr(4));
    if (!e.ok() || !e->has_secagg() || e->secagg().message_size() == 0) return true;
    v1::SecAggRequest* r = e->mutable_secagg();
    if (device == 0 && r->message_offset() > 0) r->set_message_offset(r->message_offset() + 1);
    if (device == 1) r->set_message_size(uint64_t{1} << 40);
    auto re = comms::EncodeFrame(*e, comms::kMaxControlFrameBytes);
    REQUIRE(re.ok());
    frame = *re;
    return true;
  };
  return comms::MakeInMemoryTransport(std::move(factory), std::move(faults));
}

TEST_CASE("Masked inputs in pieces add up exactly, a piece out of order or too large drops only its device",
          "[server][secagg][federation]") {
  World w;  // 8 devices, δ = 0.25: the 2 tampering devices drop, the other 6 are summed
  w.upload_chunk_bytes = 4096;
  const DropoutRun run = RunWithDropouts(w, 8, 2, 0, TamperPieces);
  REQUIRE(run.round.has_value());
  INFO("abort reason: " << run.round->abort_reason);
  REQUIRE(run.round->state == RoundState::kCommitted);
  CHECK(run.uploaded == 6);
  std::vector<float> by_hand;
  CHECK(run.committed == ExpectedNext(w.config, run.initial, run.survivor_inputs, 8, &by_hand));
  // Each tampering device is refused with its piece's error, or, when the six others closed the stage first,
  // told the session went on without it (a kDropped outcome): either way it is not summed.
  CHECK(run.errors.size() <= 2);
  for (const std::string& e : run.errors) {
    INFO(e);
    const bool out_of_order = e.find("MALFORMED_MESSAGE") != std::string::npos && e.find("offset") != std::string::npos;
    const bool too_large = e.find("RESOURCE_EXHAUSTED") != std::string::npos && e.find("at most") != std::string::npos;
    CHECK((out_of_order || too_large));
  }
}

TEST_CASE("Too many SecAgg+ dropouts abort the round and release nothing", "[server][secagg][federation]") {
  World w;
  const DropoutRun run = RunWithDropouts(w, 8, 3);  // 3 > ⌊0.25·8⌋
  REQUIRE(run.round.has_value());
  CHECK(run.round->state == RoundState::kAborted);
  CHECK(run.round->abort_reason.find("secure aggregation aborted at stage masked_input") != std::string::npos);
  CHECK(run.uploaded == 0);  // no survivor was asked for its unmasking shares
  CHECK(run.global_version == 0);
  CHECK(run.committed == run.initial);
  CHECK(run.metrics.find("seedling_secagg_aborts_total{stage=\"masked_input\"} 1") != std::string::npos);
}

TEST_CASE("One SecAgg+ round with DP noise added to the unmasked sum completes", "[server][secagg][federation]") {
  World w;
  w.config.privacy.dp = true;
  w.config.privacy.clip_norm = 0.5;
  w.config.privacy.noise_multiplier = 0.5;
  w.config.privacy.target_epsilon = 1e6;
  w.config.privacy.noise = "seeded";
  w.config.secagg.max_weight = 1;
  const DropoutRun run = RunWithDropouts(w, 6, 1);
  REQUIRE(run.round.has_value());
  INFO("abort reason: " << run.round->abort_reason);
  CHECK(run.round->state == RoundState::kCommitted);
  CHECK(run.uploaded == 5);
  CHECK(run.global_version == 1);
  CHECK(MaxAbsDiff(run.committed, run.initial) > 0);
}

TEST_CASE("A SecAgg configuration that could overflow is refused at load", "[server][secagg]") {
  const std::string base = "[model]\ndir = \"m\"\n[training]\nclients_per_round = 100\n";
  // 130 devices · W 1000 · (Q − 1) far beyond 2^32.
  auto bad = ParseServerConfig(base + "[secagg]\nenabled = true\nquantization_levels = 1048576\nmax_weight = 1000\n");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad.status().message()).find("overflow") != std::string::npos);
  // The same with weights 1 fits: 130 · (2^20 − 1) < 2^32.
  auto good = ParseServerConfig(base + "[secagg]\nenabled = true\nquantization_levels = 1048576\nmax_weight = 1\n");
  CHECK(good.ok());
  // Threshold above the degree, and an unknown key, are refused too.
  CHECK_FALSE(ParseServerConfig(base + "[secagg]\nenabled = true\nneighbors = 10\nthreshold = 11\n").ok());
  CHECK_FALSE(ParseServerConfig(base + "[secagg]\nenabled = true\nneighbours = 10\n").ok());
  // kseed cannot be securely summed.
  CHECK_FALSE(
      ParseServerConfig(base + "method = \"kseed\"\ncodec = \"seed-scalars\"\n[secagg]\nenabled = true\n").ok());
}

}  // namespace
}  // namespace seedling::server
