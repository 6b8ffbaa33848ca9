// [strategy] mode = "fedbuff" (buffered asynchronous aggregation): the staleness weight against its formula,
// the config's refusals, and a live coordinator over the in-memory transport driven request by request on a
// manual clock: K accepted uploads commit exactly one version whose parameters are checked against a naive
// FedBuff step computed here, stale updates are weighted or refused as documented, and a crash between
// accepting an update and flushing its buffer loses nothing acknowledged and applies nothing twice.

#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/clock.h"
#include "base/file.h"
#include "base/sha256.h"
#include "comms/codec.h"
#include "comms/framing.h"
#include "comms/in_memory.h"
#include "model/init.h"
#include "server/config.h"
#include "server/coordinator.h"
#include "server/strategy.h"
#include "tests/test_util.h"

namespace seedling::server {
namespace {

// ---- the staleness weight and the strategy -----------------------------------------------------------------

TEST_CASE("StalenessWeight is 1 / (1 + tau)^a", "[server][fedbuff]") {
  CHECK(StalenessWeight(0, 0.5) == 1.0);
  CHECK(StalenessWeight(3, 0.5) == Approx(0.5));
  CHECK(StalenessWeight(8, 0.5) == Approx(1.0 / 3.0));
  CHECK(StalenessWeight(4, 1.0) == Approx(0.2));
  CHECK(StalenessWeight(100, 0.0) == 1.0);
}

std::string Fp32(const std::vector<float>& v) {
  comms::CodecOptions o;
  o.codec = v1::CODEC_FP32;
  auto p = comms::EncodeDense(v, o, 0);
  REQUIRE(p.ok());
  return *p;
}

TEST_CASE("The fedavg family weighs stale updates by w(tau) and divides by the unweighted example total",
          "[server][fedbuff]") {
  StrategyOptions options;
  options.name = "fedavg";
  options.server_lr = 0.7;
  options.staleness_exponent = 0.5;
  auto strategy = MakeStrategy(options);
  REQUIRE(strategy.ok());
  GlobalModel global;
  global.params = {0.5f, -1.0f, 2.0f};
  REQUIRE((*strategy)->BeginRound(global).ok());
  struct Update {
    std::vector<float> delta;
    uint64_t examples;
    uint64_t staleness;
  };
  const std::vector<Update> updates = {{{1.0f, 2.0f, -1.0f}, 3, 0}, {{-2.0f, 0.5f, 4.0f}, 5, 2}, {{0.25f, 1, 1}, 2, 7}};
  for (const Update& u : updates) {
    const std::string payload = Fp32(u.delta);
    REQUIRE((*strategy)->Accumulate({"d", u.examples, payload, u.staleness}).ok());
  }
  GlobalModel next = global;
  REQUIRE((*strategy)->FinishRound(next).ok());
  // Naive: θ + η Σ n_c (1 + τ_c)^-½ Δ_c / Σ n_c.
  for (size_t i = 0; i < global.params.size(); ++i) {
    double sum = 0, examples = 0;
    for (const Update& u : updates) {
      sum += static_cast<double>(u.examples) / std::sqrt(1.0 + static_cast<double>(u.staleness)) * u.delta[i];
      examples += static_cast<double>(u.examples);
    }
    CHECK(next.params[i] == Approx(global.params[i] + 0.7 * sum / examples).epsilon(1e-6));
  }
}

TEST_CASE("kseed refuses stale updates and leaves its sums unchanged", "[server][fedbuff]") {
  StrategyOptions options;
  options.name = "kseed";
  options.kseed_pool_size = 16;
  auto strategy = MakeStrategy(options);
  REQUIRE(strategy.ok());
  GlobalModel global;
  global.params.assign(8, 0.0f);
  REQUIRE((*strategy)->BeginRound(global).ok());
  const std::vector<comms::SeedIndexScalar> pairs = {{3, 0.5f}};
  const std::string payload = comms::EncodeSeedIndexScalars(pairs);
  const absl::Status st = (*strategy)->Accumulate({"d", 1, payload, 1});
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK((*strategy)->accumulated() == 0);
  CHECK((*strategy)->Accumulate({"d", 1, payload, 0}).ok());
}

// ---- the config ------------------------------------------------------------------------------------------

std::string ConfigError(const std::string& toml) {
  auto c = ParseServerConfig("[model]\ndir = \"m\"\n" + toml);
  if (!c.ok()) return std::string(c.status().message());
  const absl::Status st = c->Validate();
  return st.ok() ? "" : std::string(st.message());
}

TEST_CASE("The fedbuff keys parse, and fedbuff refuses what needs a fixed cohort", "[server][fedbuff]") {
  auto c = ParseServerConfig(
      "[model]\ndir = \"m\"\n[strategy]\nmode = \"fedbuff\"\nbuffer_size = 4\nconcurrency = 40\n"
      "max_staleness = 5\nstaleness_exponent = 0.25\n");
  REQUIRE(c.ok());
  CHECK(c->FedBuff());
  CHECK(c->fedbuff.buffer_size == 4);
  CHECK(c->fedbuff.concurrency == 40);
  CHECK(c->fedbuff.max_staleness == 5);
  CHECK(c->strategy.staleness_exponent == 0.25);
  CHECK(c->Validate().ok());
  CHECK_THAT(ConfigError("[strategy]\nmode = \"async\"\n"), Catch::Contains("mode"));
  CHECK_THAT(ConfigError("[strategy]\nmode = \"fedbuff\"\nbuffer_size = 0\n"), Catch::Contains("buffer_size"));
  CHECK_THAT(ConfigError("[strategy]\nmode = \"fedbuff\"\nbuffer_size = 20\nconcurrency = 10\n"),
             Catch::Contains("concurrency"));
  CHECK_THAT(ConfigError("[strategy]\nmode = \"fedbuff\"\nmax_staleness = -1\n"), Catch::Contains("max_staleness"));
  CHECK_THAT(ConfigError("[strategy]\nmode = \"fedbuff\"\nstaleness_exponent = 1.5\n"),
             Catch::Contains("staleness_exponent"));
  CHECK_THAT(ConfigError("[strategy]\nmode = \"fedbuff\"\n[secagg]\nenabled = true\n"),
             Catch::Contains("fixed cohort"));
  CHECK_THAT(ConfigError("[strategy]\nmode = \"fedbuff\"\n[privacy]\ndp = true\nclip_norm = 1\nnoise_multiplier = 1\n"
                         "target_epsilon = 5\n"),
             Catch::Contains("[privacy] dp"));
  CHECK_THAT(ConfigError("[strategy]\nmode = \"fedbuff\"\nrobust = \"median\"\n"), Catch::Contains("robust"));
  CHECK_THAT(ConfigError("[training]\nmethod = \"kseed\"\ncodec = \"seed-scalars\"\n[strategy]\nmode = \"fedbuff\"\n"),
             Catch::Contains("fedavg family"));
}

// ---- a live coordinator ------------------------------------------------------------------------------------

// A coordinator in fedbuff mode on a manual clock, reached through the in-memory transport; devices d0..d<n-1>.
class Buffered {
 public:
  Buffered(int64_t buffer_size, int64_t concurrency, int64_t max_staleness, int devices) {
    model::InitModelOptions init;
    init.preset = "tiny";
    REQUIRE(model::InitModel(JoinPath(dir_.path, "model"), init).ok());
    config_.state_dir = JoinPath(dir_.path, "state");
    config_.model_dir = JoinPath(dir_.path, "model");
    config_.codec.codec = v1::CODEC_FP32;
    config_.lora_rank = 2;
    config_.round_deadline_s = 600;
    config_.mode = "fedbuff";
    config_.fedbuff.buffer_size = buffer_size;
    config_.fedbuff.concurrency = concurrency;
    config_.fedbuff.max_staleness = max_staleness;
    config_.strategy.server_lr = 0.5;
    REQUIRE(config_.Validate().ok());
    Start();
    for (int i = 0; i < devices; ++i) {
      auto token = coordinator_->RegisterDevice(Device(i));
      REQUIRE(token.ok());
      tokens_[Device(i)] = *token;
    }
    coordinator_->Tick();  // buffer 1 opens
  }

  static std::string Device(int i) { return "d" + std::to_string(i); }

  // A crash: the coordinator goes without Shutdown (every durable write already returned), then restarts.
  void CrashAndRestart() {
    transport_.reset();
    coordinator_.reset();
    Start();
    coordinator_->Tick();
  }

  Coordinator& coordinator() { return *coordinator_; }
  ManualClock& clock() { return clock_; }

  v1::Envelope Call(const std::string& device, v1::Envelope request) {
    auto ch = transport_->Connect(comms::Duration(5000));
    REQUIRE(ch.ok());
    v1::Envelope hello;
    hello.set_protocol_version(1);
    hello.set_request_id(1);
    hello.mutable_hello()->set_device_id(device);
    hello.mutable_hello()->set_token(tokens_.at(device));
    auto h = (*ch)->Call(hello, comms::Duration(5000));
    REQUIRE(h.ok());
    REQUIRE(h->has_hello_reply());
    request.set_protocol_version(1);
    request.set_request_id(2);
    auto r = (*ch)->Call(request, comms::Duration(5000));
    REQUIRE(r.ok());
    return *r;
  }

  v1::Envelope CheckIn(const std::string& device) {
    v1::Envelope e;
    e.mutable_check_in()->mutable_conditions()->set_charging(true);
    return Call(device, e);
  }

  v1::Task Task(const std::string& device) {
    v1::Envelope r = CheckIn(device);
    REQUIRE(r.has_check_in_reply());
    REQUIRE(r.check_in_reply().has_task());
    return r.check_in_reply().task();
  }

  // UploadBegin, one chunk and UploadCommit; the commit's answer (or the first refusal).
  v1::Envelope Upload(const std::string& device, const v1::Task& task, const std::string& payload, uint64_t examples) {
    const std::string key = device + "/" + std::to_string(task.round_id()) + "/" + task.task_id();
    v1::Envelope b;
    b.mutable_upload_begin()->set_round_id(task.round_id());
    b.mutable_upload_begin()->set_task_id(task.task_id());
    b.mutable_upload_begin()->set_idempotency_key(key);
    b.mutable_upload_begin()->set_total_bytes(payload.size());
    b.mutable_upload_begin()->set_codec(task.codec().codec());
    b.mutable_upload_begin()->set_num_examples(examples);
    b.mutable_upload_begin()->set_sha256(Sha256(payload));
    v1::Envelope r = Call(device, b);
    if (r.has_reject() || r.upload_ack().accepted()) return r;
    v1::Envelope c;
    c.mutable_upload_chunk()->set_idempotency_key(key);
    c.mutable_upload_chunk()->set_offset(0);
    c.mutable_upload_chunk()->set_data(payload);
    r = Call(device, c);
    if (r.has_reject()) return r;
    v1::Envelope m;
    m.mutable_upload_commit()->set_idempotency_key(key);
    return Call(device, m);
  }

  // The adapter of `version` as Download serves it (one chunk: the tiny adapter is small), or the refusal.
  v1::Envelope Download(const std::string& device, uint64_t version) {
    v1::Envelope d;
    d.mutable_download()->set_what(v1::Download::ADAPTER);
    d.mutable_download()->set_version(version);
    return Call(device, d);
  }

 private:
  void Start() {
    auto c = Coordinator::Create(config_, &clock_, nullptr);
    REQUIRE(c.ok());
    coordinator_ = std::move(c).value();
    transport_ = comms::MakeInMemoryTransport(coordinator_->handler_factory());
  }

  testing::TempDir dir_;
  ServerConfig config_;
  ManualClock clock_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<comms::Transport> transport_;
  std::map<std::string, std::string> tokens_;
};

// A device's update: a distinct, non-uniform change per (device, seed).
std::vector<float> Delta(size_t n, int device, int seed) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    v[i] = 1e-3f * static_cast<float>((static_cast<int>(i) * (device + 3) + seed * 7) % 11 - 5);
  }
  return v;
}

struct Sent {
  std::vector<float> delta;
  uint64_t examples;
  uint64_t staleness;
};

// FedBuff's server step with fedavg, naively: θ + η Σ n_c (1 + τ_c)^-½ Δ_c / Σ n_c.
std::vector<float> NaiveFlush(const std::vector<float>& theta, const std::vector<Sent>& buffer, double lr) {
  std::vector<float> next(theta.size());
  for (size_t i = 0; i < theta.size(); ++i) {
    double sum = 0, examples = 0;
    for (const Sent& s : buffer) {
      sum += static_cast<double>(s.examples) / std::sqrt(1.0 + static_cast<double>(s.staleness)) * s.delta[i];
      examples += static_cast<double>(s.examples);
    }
    next[i] = static_cast<float>(theta[i] + lr * sum / examples);
  }
  return next;
}

double MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(static_cast<double>(a[i]) - b[i]));
  return d;
}

bool Accepted(const v1::Envelope& r) { return r.has_upload_ack() && r.upload_ack().accepted(); }

TEST_CASE("FedBuff: K accepted uploads commit exactly one version, stale ones weighted 1/sqrt(1 + tau)",
          "[server][fedbuff]") {
  Buffered b(/*buffer_size=*/3, /*concurrency=*/5, /*max_staleness=*/0, /*devices=*/7);
  Coordinator& c = b.coordinator();
  const std::vector<float> theta0 = c.global_params();
  const size_t n = theta0.size();

  // Five tasks out at once (the concurrency), all from version 0; the sixth device waits.
  std::map<std::string, v1::Task> tasks;
  for (int i = 0; i < 5; ++i) tasks[Buffered::Device(i)] = b.Task(Buffered::Device(i));
  for (const auto& [device, task] : tasks) CHECK(task.global_version() == 0);
  {
    const v1::Envelope r = b.CheckIn("d5");
    REQUIRE(r.has_check_in_reply());
    CHECK_FALSE(r.check_in_reply().has_task());
  }
  // The same device checking in again gets its task again.
  CHECK(b.Task("d1").task_id() == tasks["d1"].task_id());

  // Buffer 1: two uploads do not move the model; the third flushes it: version 1.
  std::vector<Sent> first;
  for (int i = 0; i < 3; ++i) {
    const std::string device = Buffered::Device(i);
    first.push_back({Delta(n, i, 1), static_cast<uint64_t>(2 + i), 0});
    const v1::Envelope r = b.Upload(device, tasks[device], Fp32(first.back().delta), first.back().examples);
    REQUIRE(Accepted(r));
    CHECK(r.upload_ack().round_id() == 1);
    CHECK(c.global_version() == (i < 2 ? 0u : 1u));
  }
  const std::vector<float> theta1 = c.global_params();
  CHECK(MaxDiff(theta1, NaiveFlush(theta0, first, 0.5)) < 1e-6);
  {
    auto round = c.FindRound(1);
    REQUIRE(round.ok());
    REQUIRE(round->has_value());
    CHECK((*round)->state == RoundState::kCommitted);
    CHECK((*round)->accepted == 3);
    CHECK((*round)->result_version == 1);
  }

  // Version 0 is still served while d3 and d4 train from it; the current one too.
  {
    const v1::Envelope old = b.Download("d3", 0);
    REQUIRE(old.has_download_reply());
    CHECK(old.download_reply().sha256() == tasks["d3"].global_sha256());
    CHECK(Sha256(old.download_reply().data()) == tasks["d3"].global_sha256());
    CHECK(b.Download("d3", 1).has_download_reply());
  }

  // Buffer 2: d0 trains again from version 1 (τ = 0); d3 and d4 bring updates from version 0 (τ = 1).
  const v1::Task again = b.Task("d0");
  CHECK(again.global_version() == 1);
  CHECK(again.round_id() == 2);
  std::vector<Sent> second;
  second.push_back({Delta(n, 3, 2), 4, 1});
  REQUIRE(Accepted(b.Upload("d3", tasks["d3"], Fp32(second.back().delta), 4)));
  second.push_back({Delta(n, 0, 2), 3, 0});
  REQUIRE(Accepted(b.Upload("d0", again, Fp32(second.back().delta), 3)));
  CHECK(c.global_version() == 1);
  second.push_back({Delta(n, 4, 2), 6, 1});
  const v1::Envelope last = b.Upload("d4", tasks["d4"], Fp32(second.back().delta), 6);
  REQUIRE(Accepted(last));
  CHECK(last.upload_ack().round_id() == 2);  // the buffer it joined, not the one its task came from
  CHECK(c.global_version() == 2);
  CHECK(MaxDiff(c.global_params(), NaiveFlush(theta1, second, 0.5)) < 1e-6);
  // Unweighted, the result would differ by far more than the tolerance.
  std::vector<Sent> unweighted = second;
  for (Sent& s : unweighted) s.staleness = 0;
  CHECK(MaxDiff(c.global_params(), NaiveFlush(theta1, unweighted, 0.5)) > 1e-5);

  // No task trains from version 0 any more: it is no longer served.
  CHECK(b.Download("d3", 0).has_reject());
  // A replayed commit gets the same acknowledgement; a second upload of the task is refused.
  CHECK(Accepted(b.Upload("d4", tasks["d4"], Fp32(second.back().delta), 6)));
  CHECK(b.Upload("d4", tasks["d4"], Fp32(Delta(n, 4, 9)), 6).has_reject());
  CHECK(c.global_version() == 2);
}

TEST_CASE("FedBuff refuses an upload trained more than max_staleness server updates ago, and frees its place",
          "[server][fedbuff]") {
  Buffered b(/*buffer_size=*/1, /*concurrency=*/3, /*max_staleness=*/1, /*devices=*/4);
  Coordinator& c = b.coordinator();
  const size_t n = c.global_params().size();
  const v1::Task t0 = b.Task("d0"), t1 = b.Task("d1"), t2 = b.Task("d2");
  CHECK_FALSE(b.CheckIn("d3").check_in_reply().has_task());        // three out: full
  REQUIRE(Accepted(b.Upload("d0", t0, Fp32(Delta(n, 0, 1)), 1)));  // τ = 0 → version 1
  REQUIRE(Accepted(b.Upload("d1", t1, Fp32(Delta(n, 1, 1)), 1)));  // τ = 1 → version 2
  CHECK(c.global_version() == 2);
  const std::string before = *c.StoreChecksum();
  const v1::Envelope refused = b.Upload("d2", t2, Fp32(Delta(n, 2, 1)), 1);  // τ = 2 > 1
  REQUIRE(refused.has_reject());
  CHECK(refused.reject().code() == v1::STALE);
  CHECK(c.global_version() == 2);
  CHECK(*c.StoreChecksum() == before);
  // Its place is free again: d3 gets a task, from version 2.
  const v1::Task t3 = b.Task("d3");
  CHECK(t3.global_version() == 2);
}

TEST_CASE("FedBuff: a task past its own deadline is refused and frees its place", "[server][fedbuff]") {
  Buffered b(/*buffer_size=*/2, /*concurrency=*/2, /*max_staleness=*/0, /*devices=*/3);
  Coordinator& c = b.coordinator();
  const size_t n = c.global_params().size();
  const v1::Task t0 = b.Task("d0");
  const v1::Task t1 = b.Task("d1");
  CHECK_FALSE(b.CheckIn("d2").check_in_reply().has_task());
  b.clock().Advance(601'000);
  c.Tick();  // forgets both tasks
  const v1::Envelope late = b.Upload("d0", t0, Fp32(Delta(n, 0, 1)), 1);
  REQUIRE(late.has_reject());
  CHECK(late.reject().code() == v1::STALE);
  CHECK(b.Task("d2").global_version() == 0);
  CHECK(c.global_version() == 0);
}

TEST_CASE(
    "FedBuff: a crash between accepting updates and flushing their buffer loses nothing and applies "
    "nothing twice",
    "[server][fedbuff][crash]") {
  Buffered b(/*buffer_size=*/3, /*concurrency=*/4, /*max_staleness=*/0, /*devices=*/4);
  const std::vector<float> theta0 = b.coordinator().global_params();
  const size_t n = theta0.size();
  std::map<std::string, v1::Task> tasks;
  for (int i = 0; i < 3; ++i) tasks[Buffered::Device(i)] = b.Task(Buffered::Device(i));
  const std::string early0 = Fp32(Delta(n, 0, 1)), early1 = Fp32(Delta(n, 1, 1));
  REQUIRE(Accepted(b.Upload("d0", tasks["d0"], early0, 2)));
  REQUIRE(Accepted(b.Upload("d1", tasks["d1"], early1, 2)));
  CHECK(b.coordinator().global_version() == 0);

  b.CrashAndRestart();
  Coordinator& c = b.coordinator();
  // The buffer that held the two acknowledged updates is marked aborted, with both in its ledger.
  {
    auto round = c.FindRound(1);
    REQUIRE(round.ok());
    REQUIRE(round->has_value());
    CHECK((*round)->state == RoundState::kAborted);
    CHECK((*round)->accepted == 2);
  }
  // Their devices are told so when they retry, and the retry changes nothing.
  const std::string before = *c.StoreChecksum();
  const v1::Envelope retried = b.Upload("d0", tasks["d0"], early0, 2);
  REQUIRE(retried.has_reject());
  CHECK(retried.reject().code() == v1::ABORTED);
  CHECK(*c.StoreChecksum() == before);
  // d2's task was issued before the restart: the restarted server no longer holds it.
  const v1::Envelope forgotten = b.Upload("d2", tasks["d2"], Fp32(Delta(n, 2, 1)), 2);
  REQUIRE(forgotten.has_reject());
  CHECK(forgotten.reject().code() == v1::STALE);

  // They check in again and train anew; the next flush holds exactly the three new updates.
  std::vector<Sent> fresh;
  for (int i = 0; i < 3; ++i) {
    const std::string device = Buffered::Device(i);
    const v1::Task task = b.Task(device);
    CHECK(task.round_id() == 2);
    CHECK(task.global_version() == 0);
    fresh.push_back({Delta(n, i, 5), 2, 0});
    REQUIRE(Accepted(b.Upload(device, task, Fp32(fresh.back().delta), 2)));
  }
  CHECK(c.global_version() == 1);
  CHECK(MaxDiff(c.global_params(), NaiveFlush(theta0, fresh, 0.5)) < 1e-6);
  auto round = c.FindRound(2);
  REQUIRE(round.ok());
  REQUIRE(round->has_value());
  CHECK((*round)->state == RoundState::kCommitted);
  CHECK((*round)->accepted == 3);
}

}  // namespace
}  // namespace seedling::server
