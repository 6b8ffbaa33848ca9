#include "server/strategy.h"

#include <ATen/ATen.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "base/philox.h"
#include "comms/codec.h"
#include "lora/adapter.h"
#include "optim/kseed.h"
#include "optim/parameters.h"
#include "tests/optim/test_util.h"

// ---- Heap accounting for the memory test
// ------------------------------------------------------------- Every non-aligned operator new of
// the process goes through here. Blocks allocated while the current thread has counting switched on
// are tagged, and their bytes are tracked (live and peak) until freed, so the test measures exactly
// what the strategy allocates, deterministically (no RSS noise).
namespace {

constexpr size_t kHeader = 16;  // keeps the default new alignment (16) and holds the size and the tag
constexpr uint64_t kCountedTag = 0x5eed1196c0117edULL;
std::atomic<int64_t> g_live_bytes{0};
std::atomic<int64_t> g_peak_bytes{0};
thread_local bool t_counting = false;

[[gnu::noinline]] void* CountedAlloc(size_t n) {
  auto* base = static_cast<unsigned char*>(std::malloc(n + kHeader));
  if (base == nullptr) return nullptr;
  uint64_t header[2] = {static_cast<uint64_t>(n), t_counting ? kCountedTag : 0};
  std::memcpy(base, header, sizeof(header));
  if (t_counting) {
    const int64_t live = g_live_bytes.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t peak = g_peak_bytes.load();
    while (live > peak && !g_peak_bytes.compare_exchange_weak(peak, live)) {
    }
  }
  return base + kHeader;
}

[[gnu::noinline]] void CountedFree(void* p) {
  if (p == nullptr) return;
  unsigned char* base = static_cast<unsigned char*>(p) - kHeader;
  uint64_t header[2];
  std::memcpy(header, base, sizeof(header));
  if (header[1] == kCountedTag) g_live_bytes.fetch_sub(static_cast<int64_t>(header[0]));
  std::free(base);
}

// Switches counting on for the current thread while in scope.
class CountAllocations {
 public:
  CountAllocations() { t_counting = true; }
  ~CountAllocations() { t_counting = false; }
};

}  // namespace

[[gnu::noinline]] void* operator new(size_t n) {
  void* p = CountedAlloc(n);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
[[gnu::noinline]] void* operator new[](size_t n) {
  void* p = CountedAlloc(n);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
[[gnu::noinline]] void* operator new(size_t n, const std::nothrow_t&) noexcept { return CountedAlloc(n); }
[[gnu::noinline]] void* operator new[](size_t n, const std::nothrow_t&) noexcept { return CountedAlloc(n); }
[[gnu::noinline]] void operator delete(void* p) noexcept { CountedFree(p); }
[[gnu::noinline]] void operator delete[](void* p) noexcept { CountedFree(p); }
[[gnu::noinline]] void operator delete(void* p, size_t) noexcept { CountedFree(p); }
[[gnu::noinline]] void operator delete[](void* p, size_t) noexcept { CountedFree(p); }
[[gnu::noinline]] void operator delete(void* p, const std::nothrow_t&) noexcept { CountedFree(p); }
[[gnu::noinline]] void operator delete[](void* p, const std::nothrow_t&) noexcept { CountedFree(p); }

namespace seedling::server {
namespace {

constexpr uint64_t kTestStream = 77;  // the tests' own random draws

std::vector<float> RandomVector(size_t n, uint64_t seed, double scale = 1.0) {
  Rng rng(seed, kTestStream);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(scale * rng.Normal());
  return v;
}

std::string Encode(const std::vector<float>& v, v1::Codec codec = v1::CODEC_FP32, uint64_t rounding_seed = 0) {
  comms::CodecOptions o;
  o.codec = codec;
  absl::StatusOr<std::string> payload = comms::EncodeDense(v, o, rounding_seed);
  REQUIRE(payload.ok());
  return std::move(payload).value();
}

std::unique_ptr<Strategy> Make(const StrategyOptions& options) {
  absl::StatusOr<std::unique_ptr<Strategy>> s = MakeStrategy(options);
  REQUIRE(s.ok());
  return std::move(s).value();
}

StrategyOptions Named(const std::string& name) {
  StrategyOptions o;
  o.name = name;
  return o;
}

UpdateView View(const std::string& payload, uint64_t n, std::string device = "d") {
  UpdateView u;
  u.device_id = std::move(device);
  u.num_examples = n;
  u.payload = payload;
  return u;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// ‖a − b‖₂ / ‖b‖₂ in double.
double RelativeError(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  double e = 0, w = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    e += (got[i] - want[i]) * (got[i] - want[i]);
    w += want[i] * want[i];
  }
  return std::sqrt(e / w);
}

// θ_new − θ_old, element-wise in double.
std::vector<double> Change(const std::vector<float>& after, const std::vector<float>& before) {
  std::vector<double> c(after.size());
  for (size_t i = 0; i < c.size(); ++i) c[i] = static_cast<double>(after[i]) - static_cast<double>(before[i]);
  return c;
}

// ---- FedAvg
// ----------------------------------------------------------------------------------------------

TEST_CASE("Streaming FedAvg of fp32 updates equals the example-weighted mean computed in double",
          "[server][strategy]") {
  constexpr size_t kParams = 2000;
  constexpr int kClients = 40;
  GlobalModel global;
  global.params = RandomVector(kParams, 1, 0.1);
  const std::vector<float> before = global.params;

  auto fedavg = Make(Named("fedavg"));
  REQUIRE(fedavg->BeginRound(global).ok());
  std::vector<double> weighted_sum(kParams, 0.0);
  double total = 0;
  for (int c = 0; c < kClients; ++c) {
    const std::vector<float> delta = RandomVector(kParams, 100 + c);
    const uint64_t n = 1 + static_cast<uint64_t>(c * 37 % 101);
    for (size_t i = 0; i < kParams; ++i) weighted_sum[i] += static_cast<double>(n) * delta[i];
    total += static_cast<double>(n);
    REQUIRE(fedavg->Accumulate(View(Encode(delta), n)).ok());
  }
  CHECK(fedavg->accumulated() == kClients);
  absl::StatusOr<RoundOutcome> outcome = fedavg->FinishRound(global);
  REQUIRE(outcome.ok());

  std::vector<double> want(kParams);
  for (size_t i = 0; i < kParams; ++i) want[i] = weighted_sum[i] / total;  // server_lr = 1
  CHECK(RelativeError(Change(global.params, before), want) < 1e-6);
  CHECK(outcome->metrics.at("clients") == kClients);
  CHECK(outcome->metrics.at("examples") == total);
  CHECK(outcome->seed_sums_blob.empty());
}

TEST_CASE("Streaming FedAvg of int8 updates equals the weighted mean of the decoded updates", "[server][strategy]") {
  constexpr size_t kParams = 1500;
  GlobalModel global;
  global.params.assign(kParams, 0.5f);
  const std::vector<float> before = global.params;
  StrategyOptions options = Named("fedavg");
  options.server_lr = 0.5;
  auto fedavg = Make(options);
  REQUIRE(fedavg->BeginRound(global).ok());
  std::vector<double> weighted_sum(kParams, 0.0);
  double total = 0;
  for (int c = 0; c < 12; ++c) {
    const std::string payload = Encode(RandomVector(kParams, 200 + c), v1::CODEC_INT8, /*rounding_seed=*/c);
    absl::StatusOr<std::vector<float>> decoded = comms::DecodeDense(payload);
    REQUIRE(decoded.ok());
    const uint64_t n = 3 + c;
    for (size_t i = 0; i < kParams; ++i) weighted_sum[i] += static_cast<double>(n) * (*decoded)[i];
    total += static_cast<double>(n);
    REQUIRE(fedavg->Accumulate(View(payload, n)).ok());
  }
  REQUIRE(fedavg->FinishRound(global).ok());
  std::vector<double> want(kParams);
  for (size_t i = 0; i < kParams; ++i) want[i] = 0.5 * weighted_sum[i] / total;
  CHECK(RelativeError(Change(global.params, before), want) < 1e-6);
}

TEST_CASE("The fedavg family accepts fp16, int4 and top-k payloads and applies their decoded values",
          "[server][strategy]") {
  constexpr size_t kParams = 640;
  const v1::Codec codec = GENERATE(v1::CODEC_FP16, v1::CODEC_INT4, v1::CODEC_TOPK);
  CAPTURE(v1::Codec_Name(codec));
  comms::CodecOptions options;
  options.codec = codec;
  options.topk_fraction = 0.1f;
  comms::ErrorFeedback feedback(kParams);
  absl::StatusOr<std::string> payload = comms::EncodeDense(RandomVector(kParams, 60), options, 61, &feedback);
  REQUIRE(payload.ok());
  absl::StatusOr<std::vector<float>> decoded = comms::DecodeDense(*payload);
  REQUIRE(decoded.ok());

  GlobalModel global;
  global.params.assign(kParams, 0.0f);
  auto fedavg = Make(Named("fedavg"));
  REQUIRE(fedavg->BeginRound(global).ok());
  REQUIRE(fedavg->Accumulate(View(*payload, 9)).ok());
  REQUIRE(fedavg->FinishRound(global).ok());
  CHECK(SameBits(global.params, *decoded));  // one client, η = 1: θ = 0 + Δ exactly
}

TEST_CASE("FedAvg's heap use does not grow with the number of clients", "[server][strategy]") {
  constexpr size_t kParams = 100000;
  struct Measure {
    int64_t retained = 0;  // bytes the strategy still holds after the last Accumulate
    int64_t peak = 0;      // highest bytes held at once during the round
  };
  auto run = [&](int clients) {
    GlobalModel global;
    global.params.assign(kParams, 0.0f);
    auto fedavg = Make(Named("fedavg"));
    g_live_bytes = 0;
    g_peak_bytes = 0;
    // Only the strategy's calls are counted (not the test's payloads, nor Catch's bookkeeping).
    absl::Status status;
    {
      CountAllocations count;
      status = fedavg->BeginRound(global);
    }
    REQUIRE(status.ok());
    for (int c = 0; c < clients; ++c) {
      const std::string payload = Encode(RandomVector(kParams, c));
      const UpdateView update = View(payload, 1 + c % 7);
      {
        CountAllocations count;
        status = fedavg->Accumulate(update);
      }
      REQUIRE(status.ok());
    }
    Measure m{g_live_bytes.load(), g_peak_bytes.load()};
    bool finished = false;
    {
      CountAllocations count;
      finished = fedavg->FinishRound(global).ok();
    }
    REQUIRE(finished);
    m.peak = g_peak_bytes.load();
    return m;
  };
  const Measure few = run(10);
  const Measure many = run(500);
  CHECK(many.retained == few.retained);
  CHECK(many.peak == few.peak);
  // O(params): a double accumulator and one fp32 scratch vector, plus small change.
  CHECK(few.retained >= static_cast<int64_t>(12 * kParams));
  CHECK(few.peak < static_cast<int64_t>(13 * kParams));
}

TEST_CASE("Concurrent Accumulate calls are serialized and all counted", "[server][strategy]") {
  constexpr size_t kParams = 500;
  constexpr int kThreads = 4, kPerThread = 25;
  GlobalModel global;
  global.params.assign(kParams, 0.0f);
  auto fedavg = Make(Named("fedavg"));
  REQUIRE(fedavg->BeginRound(global).ok());
  std::vector<std::string> payloads;
  std::vector<double> want(kParams, 0.0);
  for (int c = 0; c < kThreads * kPerThread; ++c) {
    const std::vector<float> delta = RandomVector(kParams, 300 + c);
    for (size_t i = 0; i < kParams; ++i) want[i] += delta[i] / (kThreads * kPerThread);
    payloads.push_back(Encode(delta));
  }
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < kPerThread; ++k) {
        if (!fedavg->Accumulate(View(payloads[t * kPerThread + k], 1)).ok()) ++failures;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  CHECK(failures == 0);
  CHECK(fedavg->accumulated() == kThreads * kPerThread);
  REQUIRE(fedavg->FinishRound(global).ok());
  CHECK(RelativeError(Change(global.params, std::vector<float>(kParams, 0.0f)), want) < 1e-6);
}

// ---- Server optimizers
// -----------------------------------------------------------------------------------

// Reddi et al. 2021 Alg. 2 / Hsu et al. 2019, written for clarity in double.
struct NaiveServer {
  std::string name;
  double lr = 0, mu = 0, b1 = 0, b2 = 0, tau = 0;
  std::vector<double> theta, m, v;

  void Step(const std::vector<double>& d) {
    for (size_t i = 0; i < theta.size(); ++i) {
      if (name == "fedavgm") {
        m[i] = mu * m[i] + d[i];
        theta[i] += lr * m[i];
        continue;
      }
      m[i] = b1 * m[i] + (1 - b1) * d[i];
      const double d2 = d[i] * d[i];
      if (name == "fedadam") v[i] = b2 * v[i] + (1 - b2) * d2;
      if (name == "fedyogi") v[i] = v[i] - (1 - b2) * d2 * (v[i] > d2 ? 1.0 : (v[i] < d2 ? -1.0 : 0.0));
      if (name == "fedadagrad") v[i] = v[i] + d2;
      theta[i] += lr * m[i] / (std::sqrt(v[i]) + tau);
    }
  }
};

TEST_CASE("FedAvgM, FedAdam, FedYogi and FedAdagrad match the naive update rules over 3 rounds", "[server][strategy]") {
  const std::string name = GENERATE(as<std::string>{}, "fedavgm", "fedadam", "fedyogi", "fedadagrad");
  CAPTURE(name);
  constexpr size_t kParams = 3000;
  StrategyOptions options = Named(name);
  options.server_lr = name == "fedavgm" ? 0.7 : 0.01;
  options.momentum = 0.9;
  options.beta1 = 0.9;
  options.beta2 = 0.99;
  options.tau = 1e-3;
  auto strategy = Make(options);

  GlobalModel global;
  // Small θ so that storing θ in fp32 does not swamp the comparison of the (≈1e-3) changes.
  global.params = RandomVector(kParams, 5, 0.01);
  NaiveServer naive;
  naive.name = name;
  naive.lr = options.server_lr;
  naive.mu = options.momentum;
  naive.b1 = options.beta1;
  naive.b2 = options.beta2;
  naive.tau = options.tau;
  naive.theta.assign(global.params.begin(), global.params.end());
  naive.m.assign(kParams, 0.0);
  naive.v.assign(kParams, options.tau * options.tau);  // v_{−1} = τ²

  // Round scales chosen so that Yogi's sign(v − Δ̄²) takes both signs.
  const double scales[3] = {0.1, 0.005, 0.3};
  for (int round = 0; round < 3; ++round) {
    REQUIRE(strategy->BeginRound(global).ok());
    std::vector<double> mean(kParams, 0.0);
    double total = 0;
    for (int c = 0; c < 3; ++c) {
      const std::vector<float> delta = RandomVector(kParams, 1000 * round + c, scales[round]);
      const uint64_t n = 2 + 3 * c;
      for (size_t i = 0; i < kParams; ++i) mean[i] += static_cast<double>(n) * delta[i];
      total += static_cast<double>(n);
      REQUIRE(strategy->Accumulate(View(Encode(delta), n)).ok());
    }
    for (double& x : mean) x /= total;
    const std::vector<float> before = global.params;
    const std::vector<double> naive_before = naive.theta;
    REQUIRE(strategy->FinishRound(global).ok());
    naive.Step(mean);
    ++global.version;

    std::vector<double> naive_change(kParams);
    for (size_t i = 0; i < kParams; ++i) naive_change[i] = naive.theta[i] - naive_before[i];
    CHECK(RelativeError(Change(global.params, before), naive_change) < 1e-5);
    const std::string m_name = name == "fedavgm" ? "momentum" : "m";
    REQUIRE(global.buffers.count(m_name) == 1);
    const std::vector<float>& m = global.buffers.at(m_name);
    CHECK(RelativeError(std::vector<double>(m.begin(), m.end()), naive.m) < 1e-6);
    if (name != "fedavgm") {
      REQUIRE(global.buffers.count("v") == 1);
      const std::vector<float>& v = global.buffers.at("v");
      CHECK(RelativeError(std::vector<double>(v.begin(), v.end()), naive.v) < 1e-6);
    }
  }
}

TEST_CASE("An optimizer buffer of the wrong length is FailedPrecondition and changes nothing", "[server][strategy]") {
  GlobalModel global;
  global.params.assign(8, 1.0f);
  global.buffers["v"] = std::vector<float>(7, 0.5f);
  auto fedadam = Make(Named("fedadam"));
  CHECK(fedadam->BeginRound(global).code() == absl::StatusCode::kFailedPrecondition);
  global.buffers.erase("v");
  REQUIRE(fedadam->BeginRound(global).ok());
  REQUIRE(fedadam->Accumulate(View(Encode(RandomVector(8, 70)), 1)).ok());
  global.buffers["m"] = std::vector<float>(9, 0.0f);  // replaced between BeginRound and FinishRound
  CHECK(fedadam->FinishRound(global).status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(global.params == std::vector<float>(8, 1.0f));
  CHECK(global.buffers.count("v") == 0);
}

// ---- fwdgrad
// ---------------------------------------------------------------------------------------------

TEST_CASE("fwdgrad's learning rate warms up linearly then decays linearly to zero", "[server][strategy]") {
  StrategyOptions o = Named("fwdgrad");
  o.fwdgrad_lr = 0.03;
  o.total_rounds = 100;
  o.warmup_fraction = 0.06;  // W = 6
  CHECK(FwdGradLearningRate(o, 0) == Approx(0.03 * 1.0 / 6.0).epsilon(1e-12));
  CHECK(FwdGradLearningRate(o, 2) == Approx(0.03 * 3.0 / 6.0).epsilon(1e-12));
  CHECK(FwdGradLearningRate(o, 5) == Approx(0.03).epsilon(1e-12));    // end of warm-up: the peak
  CHECK(FwdGradLearningRate(o, 6) == Approx(0.03).epsilon(1e-12));    // decay starts from the peak
  CHECK(FwdGradLearningRate(o, 53) == Approx(0.015).epsilon(1e-12));  // (100 − 53) / 94 = 1/2
  CHECK(FwdGradLearningRate(o, 99) == Approx(0.03 / 94.0).epsilon(1e-12));
  CHECK(FwdGradLearningRate(o, 100) == 0.0);
  CHECK(FwdGradLearningRate(o, 250) == 0.0);
}

TEST_CASE("fwdgrad applies theta minus eta_t times the summed gradients over the summed examples",
          "[server][strategy]") {
  constexpr size_t kParams = 800;
  StrategyOptions o = Named("fwdgrad");
  o.fwdgrad_lr = 0.05;
  o.total_rounds = 50;
  auto fwdgrad = Make(o);
  GlobalModel global;
  global.version = 20;
  global.params = RandomVector(kParams, 9, 0.01);
  const std::vector<float> before = global.params;
  REQUIRE(fwdgrad->BeginRound(global).ok());
  const std::vector<float> g1 = RandomVector(kParams, 10), g2 = RandomVector(kParams, 11);
  REQUIRE(fwdgrad->Accumulate(View(Encode(g1), 4)).ok());
  REQUIRE(fwdgrad->Accumulate(View(Encode(g2), 12)).ok());
  absl::StatusOr<RoundOutcome> outcome = fwdgrad->FinishRound(global);
  REQUIRE(outcome.ok());
  const double eta = FwdGradLearningRate(o, 20);
  CHECK(outcome->metrics.at("lr") == eta);
  std::vector<double> want(kParams);
  for (size_t i = 0; i < kParams; ++i) want[i] = -eta * (static_cast<double>(g1[i]) + g2[i]) / 16.0;
  CHECK(RelativeError(Change(global.params, before), want) < 1e-5);
}

TEST_CASE("fwdgrad gives bit-identical models from dense and seed-pair uploads of the same gradients",
          "[server][strategy]") {
  constexpr int64_t kParams = 1234;
  StrategyOptions o = Named("fwdgrad");
  o.total_rounds = 10;
  GlobalModel start;
  start.version = 3;
  start.params = RandomVector(kParams, 12);

  // Two clients' gradients as (seed, value) pairs, and the same gradients built densely the way a
  // client does (optim::AddSeededNormal in pair order from zero).
  std::vector<std::vector<comms::SeedValueScalar>> clients = {
      {{11, 0.5f}, {987654321ULL, -1.25f}, {42, 0.0625f}},
      {{7, 2.0f}, {8, -0.3f}},
  };
  const uint64_t examples[2] = {5, 9};
  auto dense = Make(o);
  auto pairs = Make(o);
  GlobalModel a = start, b = start;
  REQUIRE(dense->BeginRound(a).ok());
  REQUIRE(pairs->BeginRound(b).ok());
  for (size_t c = 0; c < clients.size(); ++c) {
    at::Tensor g = at::zeros({kParams}, at::kFloat);
    for (const comms::SeedValueScalar& p : clients[c]) optim::AddSeededNormal(g, p.seed, p.value);
    const std::vector<float> values(g.data_ptr<float>(), g.data_ptr<float>() + kParams);
    REQUIRE(dense->Accumulate(View(Encode(values), examples[c])).ok());
    REQUIRE(pairs->Accumulate(View(comms::EncodeSeedValueScalars(clients[c]), examples[c])).ok());
  }
  REQUIRE(dense->FinishRound(a).ok());
  REQUIRE(pairs->FinishRound(b).ok());
  CHECK(SameBits(a.params, b.params));
  CHECK_FALSE(SameBits(a.params, start.params));
}

TEST_CASE("fwdgrad tasks tell clients not to apply their estimates locally", "[server][strategy]") {
  v1::Task task;
  Make(Named("fwdgrad"))->ConfigureTask(0, task);
  REQUIRE(task.hyperparameters().count("apply_locally") == 1);
  CHECK(task.hyperparameters().at("apply_locally") == 0.0);
}

// ---- fwdgrad pacing
// --------------------------------------------------------------------------------------

TEST_CASE("Pacing doubles K while the variance is over the threshold, caps it, and resets after applying",
          "[server][strategy][pacing]") {
  FwdGradPacingOptions o;
  o.enabled = true;
  o.base_perturbations = 2;
  o.max_perturbations = 8;
  o.variance_threshold = 0.1;
  const std::vector<double> variances = {0.5, 0.3, 0.05, 0.5, 0.5, 0.5, NAN, 0.09, 0.2};
  const std::vector<PacingStep> steps = PacingSchedule(o, variances);
  REQUIRE(steps.size() == variances.size());
  // Held at 2 and 4; applied at 8 (under the threshold); held, held, applied at the cap whatever the
  // variance; an unmeasured variance applies; under the threshold applies; over it holds again.
  const std::vector<int64_t> want_k = {2, 4, 8, 2, 4, 8, 2, 2, 2};
  const std::vector<bool> want_apply = {false, false, true, false, false, true, true, true, false};
  for (size_t i = 0; i < steps.size(); ++i) {
    INFO("round " << i + 1);
    CHECK(steps[i].perturbations == want_k[i]);
    CHECK(steps[i].apply == want_apply[i]);
  }
  // A cap that is not a power-of-two multiple of the base is reached, not passed.
  o.base_perturbations = 3;
  o.max_perturbations = 10;
  const std::vector<double> high = {1, 1, 1, 1};
  const std::vector<PacingStep> capped = PacingSchedule(o, high);
  CHECK(capped[0].perturbations == 3);
  CHECK(capped[1].perturbations == 6);
  CHECK(capped[2].perturbations == 10);
  CHECK(capped[2].apply);
  CHECK(capped[3].perturbations == 3);
}

// Var(ḡ) averaged over elements, written out from the per-client values: ḡ = Σ n_c x_c / W and
// Σ_c n_c (x_c − ḡ)² / ((C − 1) W) per element.
double NaiveGlobalVariance(const std::vector<std::vector<float>>& g, const std::vector<double>& n) {
  const size_t p = g[0].size();
  double w = 0;
  for (double v : n) w += v;
  double total = 0;
  for (size_t i = 0; i < p; ++i) {
    double mean = 0;
    for (size_t c = 0; c < g.size(); ++c) mean += static_cast<double>(g[c][i]) / w;
    double spread = 0;
    for (size_t c = 0; c < g.size(); ++c) {
      const double x = static_cast<double>(g[c][i]) / n[c];
      spread += n[c] * (x - mean) * (x - mean);
    }
    total += spread / (static_cast<double>(g.size() - 1) * w);
  }
  return total / static_cast<double>(p);
}

TEST_CASE("EstimateGlobalVariance matches the spread of the clients' per-example estimates",
          "[server][strategy][pacing]") {
  // Equal weights, one element: x = 1, 3, 5 → sample variance 4, of the mean 4 / 3.
  const std::vector<double> sum = {2 * (1 + 3 + 5)}, sum_sq = {2 * (1 + 9 + 25)};
  CHECK(EstimateGlobalVariance(sum, sum_sq, 6, 3) == Approx(4.0 / 3.0).epsilon(1e-12));
  // Unequal weights against the naive formula.
  const std::vector<std::vector<float>> g = {RandomVector(50, 1), RandomVector(50, 2), RandomVector(50, 3)};
  const std::vector<double> n = {2, 5, 9};
  std::vector<double> s(50, 0.0), q(50, 0.0);
  for (size_t c = 0; c < g.size(); ++c) {
    for (size_t i = 0; i < 50; ++i) {
      s[i] += g[c][i];
      q[i] += static_cast<double>(g[c][i]) * g[c][i] / n[c];
    }
  }
  CHECK(EstimateGlobalVariance(s, q, 16, 3) == Approx(NaiveGlobalVariance(g, n)).epsilon(1e-9));
  // One client: no spread to measure.
  CHECK(std::isnan(EstimateGlobalVariance(s, q, 16, 1)));
}

TEST_CASE("A paced fwdgrad round with a noisy estimate is held, and the next applies cache plus new",
          "[server][strategy][pacing]") {
  constexpr size_t kParams = 300;
  StrategyOptions o = Named("fwdgrad");
  o.fwdgrad_lr = 0.05;
  o.total_rounds = 40;
  o.fwdgrad_pacing.enabled = true;
  o.fwdgrad_pacing.base_perturbations = 4;
  o.fwdgrad_pacing.max_perturbations = 32;
  // Round 1: two clients that disagree; round 2: two that sit at the pool's mean, so the pooled
  // variance (4 clients) is much lower. The threshold lies between the two.
  const std::vector<float> g1 = RandomVector(kParams, 21), g2 = RandomVector(kParams, 22);
  std::vector<float> g3(kParams);
  for (size_t i = 0; i < kParams; ++i) g3[i] = 0.5f * (g1[i] + g2[i]);
  const double held_variance = NaiveGlobalVariance({g1, g2}, {4, 4});
  const double pooled_variance = NaiveGlobalVariance({g1, g2, g3, g3}, {4, 4, 4, 4});
  REQUIRE(pooled_variance < 0.5 * held_variance);
  o.fwdgrad_pacing.variance_threshold = 0.5 * (held_variance + pooled_variance);

  GlobalModel global;
  global.version = 7;
  global.params = RandomVector(kParams, 20, 0.01);
  const std::vector<float> start = global.params;
  {
    auto strategy = Make(o);
    REQUIRE(strategy->BeginRound(global).ok());
    v1::Task task;
    strategy->ConfigureTask(7, task);
    CHECK(task.hyperparameters().at("perturbations") == 4.0);
    REQUIRE(strategy->Accumulate(View(Encode(g1), 4)).ok());
    REQUIRE(strategy->Accumulate(View(Encode(g2), 4)).ok());
    absl::StatusOr<RoundOutcome> held = strategy->FinishRound(global);
    REQUIRE(held.ok());
    CHECK(held->metrics.at("pacing_applied") == 0.0);
    CHECK(held->metrics.at("perturbations") == 4.0);
    CHECK(held->metrics.at("gradient_variance") == Approx(held_variance).epsilon(1e-6));
    CHECK(held->metrics.at("update_norm") == 0.0);
    CHECK(SameBits(global.params, start));
    REQUIRE(global.buffers.count("fwdgrad_cache_sum") == 1);
    CHECK(global.buffers.at("fwdgrad_pacing")[0] == 8.0f);
  }
  global.version = 8;
  // Round 2 on a new strategy object, as after a server restart: the schedule comes from the buffers.
  auto strategy = Make(o);
  REQUIRE(strategy->BeginRound(global).ok());
  v1::Task task;
  strategy->ConfigureTask(8, task);
  CHECK(task.hyperparameters().at("perturbations") == 8.0);
  REQUIRE(strategy->Accumulate(View(Encode(g3), 4)).ok());
  REQUIRE(strategy->Accumulate(View(Encode(g3), 4)).ok());
  absl::StatusOr<RoundOutcome> applied = strategy->FinishRound(global);
  REQUIRE(applied.ok());
  CHECK(applied->metrics.at("pacing_applied") == 1.0);
  CHECK(applied->metrics.at("pacing_pooled_rounds") == 2.0);
  CHECK(applied->metrics.at("perturbations") == 8.0);
  CHECK(applied->metrics.at("gradient_variance") == Approx(pooled_variance).epsilon(1e-6));
  const double eta = FwdGradLearningRate(o, 8);
  std::vector<double> want(kParams);
  for (size_t i = 0; i < kParams; ++i) want[i] = -eta * (static_cast<double>(g1[i]) + g2[i] + 2.0 * g3[i]) / 16.0;
  CHECK(RelativeError(Change(global.params, start), want) < 1e-5);
  CHECK(global.buffers.count("fwdgrad_cache_sum") == 0);
  CHECK(global.buffers.at("fwdgrad_pacing")[0] == 4.0f);
  // Round 3's tasks are back at the base K.
  global.version = 9;
  auto next = Make(o);
  REQUIRE(next->BeginRound(global).ok());
  v1::Task task3;
  next->ConfigureTask(9, task3);
  CHECK(task3.hyperparameters().at("perturbations") == 4.0);
}

TEST_CASE("Pacing settings are validated when the strategy is made", "[server][strategy][pacing]") {
  StrategyOptions o = Named("fwdgrad");
  o.fwdgrad_pacing.enabled = true;
  absl::StatusOr<std::unique_ptr<Strategy>> s = MakeStrategy(o);
  REQUIRE_FALSE(s.ok());
  CHECK_THAT(std::string(s.status().message()), Catch::Contains("fwdgrad_variance_threshold"));
  o.fwdgrad_pacing.variance_threshold = 0.1;
  o.fwdgrad_pacing.max_perturbations = 4;  // below the base K (8)
  s = MakeStrategy(o);
  REQUIRE_FALSE(s.ok());
  CHECK_THAT(std::string(s.status().message()), Catch::Contains("max_perturbations"));
  o.fwdgrad_pacing.max_perturbations = 64;
  CHECK(MakeStrategy(o).ok());
}

// ---- kseed
// -----------------------------------------------------------------------------------------------

StrategyOptions KSeedOptions() {
  StrategyOptions o = Named("kseed");
  o.kseed_pool_size = 64;
  o.kseed_pool_seed = 17;
  o.kseed_lr = 1e-3;  // not representable in fp32: the wire value is what counts
  return o;
}

std::unique_ptr<lora::LoraAdapter> MicroAdapter() {
  lora::LoraConfig lc;
  lc.rank = 2;
  lc.targets = {model::Projection::kQ, model::Projection::kV, model::Projection::kUp};
  auto a = lora::LoraAdapter::Create(optim::testing::MicroConfig(), lc);
  REQUIRE(a.ok());
  return std::move(a).value();
}

TEST_CASE("A client replaying kseed's seed sums with ApplySeedSums gets the server's bits", "[server][strategy]") {
  const StrategyOptions o = KSeedOptions();
  auto adapter = MicroAdapter();
  const size_t numel = static_cast<size_t>(adapter->numel());
  GlobalModel global;
  global.version = 7;
  global.params = RandomVector(numel, 21, 0.05);
  const std::vector<float> theta0 = global.params;

  auto kseed = Make(o);
  REQUIRE(kseed->BeginRound(global).ok());
  const std::vector<std::vector<comms::SeedIndexScalar>> clients = {
      {{0, 1.5f}, {3, -2.0f}, {17, 0.25f}, {63, 4.0f}},
      {{3, 1.0f}, {17, -0.75f}, {40, 3.0f}},
      {{5, -0.5f}},
  };
  const uint64_t n[3] = {10, 30, 60};
  std::map<uint32_t, double> want;  // G_i = Σ_c (n_c / Σ n) ĝ_c,i
  for (size_t c = 0; c < clients.size(); ++c) {
    for (const comms::SeedIndexScalar& p : clients[c]) want[p.index] += n[c] / 100.0 * p.value;
    REQUIRE(kseed->Accumulate(View(comms::EncodeSeedIndexScalars(clients[c]), n[c])).ok());
  }
  absl::StatusOr<RoundOutcome> outcome = kseed->FinishRound(global);
  REQUIRE(outcome.ok());
  CHECK(outcome->metrics.at("seeds") == static_cast<double>(want.size()));
  CHECK(outcome->metrics.at("update_norm") > 0);

  absl::StatusOr<v1::RoundSeedSums> blob = ParseSeedSums(outcome->seed_sums_blob);
  REQUIRE(blob.ok());
  CHECK(blob->version() == 8);
  CHECK(blob->lr() == static_cast<float>(1e-3));
  REQUIRE(blob->sums_size() == static_cast<int>(want.size()));
  std::vector<optim::SeedScalar> sums;
  for (const v1::SeedScalar& s : blob->sums()) {
    CHECK(s.value() == Approx(want.at(s.index())).epsilon(1e-6));
    sums.push_back({s.index(), s.value()});
  }

  // The client: θ0 in its adapter, then the published sums.
  std::memcpy(adapter->flat().data_ptr<float>(), theta0.data(), numel * sizeof(float));
  REQUIRE(optim::ApplySeedSums(optim::ParameterSet::Adapter(*adapter), optim::CandidateSeeds(17, 64), sums, blob->lr())
              .ok());
  const std::vector<float> replayed(adapter->flat().data_ptr<float>(), adapter->flat().data_ptr<float>() + numel);
  CHECK(SameBits(replayed, global.params));
  CHECK_FALSE(SameBits(theta0, global.params));
}

TEST_CASE("kseed tasks carry the pool and the wire learning rate", "[server][strategy]") {
  v1::Task task;
  Make(KSeedOptions())->ConfigureTask(3, task);
  CHECK(task.kseed_pool_seed() == 17);
  CHECK(task.kseed_pool_size() == 64);
  CHECK(task.hyperparameters().at("lr") == static_cast<double>(static_cast<float>(1e-3)));
}

TEST_CASE("ParseSeedSums rejects garbage, a bad lr, non-finite values and unordered indices", "[server][strategy]") {
  CHECK(ParseSeedSums("\xff\xff\xff").status().code() == absl::StatusCode::kInvalidArgument);
  v1::RoundSeedSums s;
  s.set_lr(0.0f);
  CHECK(ParseSeedSums(s.SerializeAsString()).status().code() == absl::StatusCode::kInvalidArgument);
  s.set_lr(1e-3f);
  s.add_sums()->set_index(4);
  s.mutable_sums(0)->set_value(1.0f);
  CHECK(ParseSeedSums(s.SerializeAsString()).ok());
  s.add_sums()->set_index(4);
  CHECK(ParseSeedSums(s.SerializeAsString()).status().code() == absl::StatusCode::kInvalidArgument);
  s.mutable_sums(1)->set_index(5);
  s.mutable_sums(1)->set_value(std::numeric_limits<float>::quiet_NaN());
  CHECK(ParseSeedSums(s.SerializeAsString()).status().code() == absl::StatusCode::kInvalidArgument);
}

// ---- Rejections
// ------------------------------------------------------------------------------------------

// A dense fp32 payload whose element `at` is NaN: encoded with a marker value, then the marker's
// bytes replaced (the fp32 codec stores values as little-endian floats).
std::string PayloadWithNaN(std::vector<float> v, size_t at) {
  const float marker = 12345.678f;
  v[at] = marker;
  std::string payload = Encode(v);
  const std::string needle(reinterpret_cast<const char*>(&marker), sizeof(float));
  const size_t pos = payload.find(needle);
  REQUIRE(pos != std::string::npos);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(payload.data() + pos, &nan, sizeof(float));
  return payload;
}

TEST_CASE("Invalid dense updates are rejected and leave the aggregate unchanged", "[server][strategy]") {
  constexpr size_t kParams = 300;
  StrategyOptions o = Named("fedavg");
  o.max_update_norm = 100.0;  // ‖N(0, I_300)‖ ≈ 17
  const std::string good1 = Encode(RandomVector(kParams, 31)), good2 = Encode(RandomVector(kParams, 32));
  GlobalModel start;
  start.params = RandomVector(kParams, 30);

  GlobalModel clean = start;
  auto reference = Make(o);
  REQUIRE(reference->BeginRound(clean).ok());
  REQUIRE(reference->Accumulate(View(good1, 3)).ok());
  REQUIRE(reference->Accumulate(View(good2, 5)).ok());
  REQUIRE(reference->FinishRound(clean).ok());

  GlobalModel dirty = start;
  auto strategy = Make(o);
  REQUIRE(strategy->BeginRound(dirty).ok());
  REQUIRE(strategy->Accumulate(View(good1, 3)).ok());
  const std::string wrong_length = Encode(RandomVector(kParams + 1, 33));
  const std::string with_nan = PayloadWithNaN(RandomVector(kParams, 34), 17);
  const std::string over_cap = Encode(RandomVector(kParams, 35, 10.0));  // norm ≈ 170
  const std::string seed_pairs = comms::EncodeSeedIndexScalars(std::vector<comms::SeedIndexScalar>{{1, 1.0f}});
  struct Bad {
    const char* what;
    UpdateView update;
    const char* message;
  };
  const Bad bad[] = {
      {"wrong length", View(wrong_length, 3), "301 elements"},
      {"NaN", View(with_nan, 3), ""},
      {"norm over the cap", View(over_cap, 3), "max_update_norm"},
      {"wrong codec", View(seed_pairs, 3), "strategy fedavg does not accept codec CODEC_SEED_SCALARS (seed index"},
      {"no examples", View(good2, 0), "num_examples"},
  };
  for (const Bad& b : bad) {
    CAPTURE(b.what);
    const absl::Status status = strategy->Accumulate(b.update);
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(status.message()), Catch::Contains(b.message));
  }
  CHECK(strategy->accumulated() == 1);
  REQUIRE(strategy->Accumulate(View(good2, 5)).ok());
  REQUIRE(strategy->FinishRound(dirty).ok());
  CHECK(SameBits(dirty.params, clean.params));
}

TEST_CASE(
    "fwdgrad rejects non-finite rebuilt gradients and seed-index pairs, leaving the aggregate "
    "unchanged",
    "[server][strategy]") {
  constexpr size_t kParams = 256;
  const StrategyOptions o = Named("fwdgrad");
  const std::string good = Encode(RandomVector(kParams, 40));
  // Two huge scalars on the same seed overflow fp32 where |z| is large enough.
  const std::string overflow =
      comms::EncodeSeedValueScalars(std::vector<comms::SeedValueScalar>{{5, 3e38f}, {5, 3e38f}});
  GlobalModel clean, dirty;
  clean.params = dirty.params = RandomVector(kParams, 41);
  auto reference = Make(o), strategy = Make(o);
  REQUIRE(reference->BeginRound(clean).ok());
  REQUIRE(strategy->BeginRound(dirty).ok());
  REQUIRE(reference->Accumulate(View(good, 2)).ok());
  REQUIRE(strategy->Accumulate(View(good, 2)).ok());
  CHECK(strategy->Accumulate(View(overflow, 2)).code() == absl::StatusCode::kInvalidArgument);
  const std::string index_pairs = comms::EncodeSeedIndexScalars(std::vector<comms::SeedIndexScalar>{{1, 1.0f}});
  const absl::Status wrong_kind = strategy->Accumulate(View(index_pairs, 2));
  CHECK(wrong_kind.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(wrong_kind.message()),
             Catch::Contains("strategy fwdgrad does not accept codec CODEC_SEED_SCALARS (seed index, scalar) pairs"));
  REQUIRE(reference->FinishRound(clean).ok());
  REQUIRE(strategy->FinishRound(dirty).ok());
  CHECK(SameBits(dirty.params, clean.params));
}

TEST_CASE(
    "kseed rejects dense payloads, (seed, value) pairs and indices outside the pool, leaving its "
    "sums unchanged",
    "[server][strategy]") {
  const StrategyOptions o = KSeedOptions();
  const std::string good = comms::EncodeSeedIndexScalars(std::vector<comms::SeedIndexScalar>{{2, 1.0f}, {9, -1.0f}});
  const std::string out_of_pool = comms::EncodeSeedIndexScalars(std::vector<comms::SeedIndexScalar>{{64, 1.0f}});
  const std::string dense = Encode(RandomVector(100, 50));
  const std::string seed_values = comms::EncodeSeedValueScalars(std::vector<comms::SeedValueScalar>{{2, 1.0f}});
  GlobalModel clean, dirty;
  clean.params = dirty.params = RandomVector(100, 51);
  auto reference = Make(o), strategy = Make(o);
  REQUIRE(reference->BeginRound(clean).ok());
  REQUIRE(strategy->BeginRound(dirty).ok());
  REQUIRE(reference->Accumulate(View(good, 4)).ok());
  REQUIRE(strategy->Accumulate(View(good, 4)).ok());
  CHECK(strategy->Accumulate(View(out_of_pool, 4)).code() == absl::StatusCode::kInvalidArgument);
  const absl::Status wrong_codec = strategy->Accumulate(View(dense, 4));
  CHECK(wrong_codec.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(wrong_codec.message()), Catch::Contains("strategy kseed does not accept codec CODEC_FP32"));
  const absl::Status wrong_kind = strategy->Accumulate(View(seed_values, 4));
  CHECK(wrong_kind.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(wrong_kind.message()),
             Catch::Contains("strategy kseed does not accept codec CODEC_SEED_SCALARS (seed, scalar) pairs"));
  CHECK(strategy->Accumulate(View(good, 0)).code() == absl::StatusCode::kInvalidArgument);
  absl::StatusOr<RoundOutcome> a = reference->FinishRound(clean);
  absl::StatusOr<RoundOutcome> b = strategy->FinishRound(dirty);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a->seed_sums_blob == b->seed_sums_blob);
  CHECK(SameBits(dirty.params, clean.params));
}

// ---- Round state and construction
// ------------------------------------------------------------------------

TEST_CASE("FinishRound with nothing accumulated is FailedPrecondition", "[server][strategy]") {
  const std::string name = GENERATE(as<std::string>{}, "fedavg", "fedadam", "fwdgrad", "kseed");
  CAPTURE(name);
  auto strategy = Make(name == "kseed" ? KSeedOptions() : Named(name));
  GlobalModel global;
  global.params.assign(10, 1.0f);
  CHECK(strategy->FinishRound(global).status().code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(strategy->BeginRound(global).ok());
  CHECK(strategy->FinishRound(global).status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(global.params == std::vector<float>(10, 1.0f));
  CHECK(global.buffers.empty());
}

TEST_CASE("MakeStrategy rejects an unknown name and out-of-range options", "[server][strategy]") {
  CHECK(MakeStrategy(Named("fedsgd-typo")).status().code() == absl::StatusCode::kInvalidArgument);
  StrategyOptions o = Named("fedadam");
  o.beta2 = 1.0;
  CHECK(MakeStrategy(o).status().code() == absl::StatusCode::kInvalidArgument);
  o = Named("fedavg");
  o.max_update_norm = -1;
  CHECK(MakeStrategy(o).status().code() == absl::StatusCode::kInvalidArgument);
  o = KSeedOptions();
  o.kseed_pool_size = 0;
  CHECK(MakeStrategy(o).status().code() == absl::StatusCode::kInvalidArgument);
  for (const char* name : {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fwdgrad", "kseed"}) {
    absl::StatusOr<std::unique_ptr<Strategy>> s = MakeStrategy(Named(name));
    REQUIRE(s.ok());
    CHECK((*s)->name() == name);
  }
}

}  // namespace
}  // namespace seedling::server
