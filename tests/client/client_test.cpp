// The client SDK (client/client.h) against the real coordinator over the in-memory transport: a round
// interrupted by Cancel() or by a broken upload resumes from the state directory in a new Client; network
// errors are retried with backoff; the server's RetryAfter is obeyed; tasks over the memory budget are
// declined with a reason the server counts; bad input is refused with a clear status.

#include "client/client.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "base/clock.h"
#include "base/file.h"
#include "base/sha256.h"
#include "base/strings.h"
#include "comms/codec.h"
#include "comms/framing.h"
#include "comms/in_memory.h"
#include "model/gguf.h"
#include "model/init.h"
#include "model/runtime.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "server/coordinator.h"
#include "server/devices.h"
#include "server/metrics.h"
#include "server/store.h"
#include "tests/test_util.h"

namespace seedling::client {
namespace {

using Json = nlohmann::json;

using seedling::testing::TempDir;

// One tiny base model per process, shared by every client (as the simulator does).
struct ModelFixture {
  TempDir dir;
  std::string model_dir = JoinPath(dir.path, "model");
  SharedModel shared;

  ModelFixture() {
    model::ConfigureCompute({1});  // deterministic, and safe with a canceller thread: see model/runtime.h
    model::InitModelOptions init;
    init.preset = "tiny";
    init.seed = 3;
    REQUIRE(model::InitModel(model_dir, init).ok());
    auto m = model::LlamaModel::Load(model_dir);
    REQUIRE(m.ok());
    auto t = model::LoadTokenizer(model_dir);
    REQUIRE(t.ok());
    shared.model = std::move(m).value();
    shared.tokenizer = std::move(t).value();
  }
};

const ModelFixture& Model() {
  static ModelFixture fixture;  // built on first use, removed at exit
  return fixture;
}

std::string SampleData() { return JoinPath(SEEDLING_SOURCE_DIR, "data/sample/instructions.jsonl"); }

server::ServerConfig TinyServerConfig(const std::string& state_dir) {
  server::ServerConfig c;
  c.state_dir = state_dir;
  c.model_dir = Model().model_dir;
  c.method = "lora-bp";
  c.codec.codec = v1::CODEC_FP32;  // lossless: updates can be compared bit for bit
  c.steps = 6;
  c.batch = 1;
  c.seq_len = 32;
  c.lr = 5e-3;
  c.lora_rank = 4;
  c.rounds = 1;
  c.clients_per_round = 1;
  c.min_reports = 1;
  c.over_selection = 1.0;
  c.selection_window_s = 60;
  c.round_deadline_s = 600;
  c.retry_base_s = 7;
  c.retry_jitter = 0.0;
  c.seed = 11;
  return c;
}

// A coordinator on a manual clock, reached over the in-memory transport.
struct Server {
  server::ServerConfig config;
  ManualClock clock;
  server::Metrics metrics;
  std::unique_ptr<server::Coordinator> coordinator;

  explicit Server(server::ServerConfig c) : config(std::move(c)) {
    REQUIRE(config.Validate().ok());
    auto co = server::Coordinator::Create(config, &clock, &metrics);
    REQUIRE(co.ok());
    coordinator = std::move(co).value();
  }
  std::string Register(const std::string& device) {
    auto token = coordinator->RegisterDevice(device);
    REQUIRE(token.ok());
    return *token;
  }
  std::unique_ptr<comms::Transport> Transport(comms::InMemoryFaults faults = {}) {
    return comms::MakeInMemoryTransport(coordinator->handler_factory(), std::move(faults));
  }
  // Closes the coordinator (and its store) so the test can open the store itself.
  std::unique_ptr<server::Store> CloseAndOpenStore() {
    coordinator.reset();
    auto store = server::Store::Open(config.state_dir);
    REQUIRE(store.ok());
    return std::move(store).value();
  }
};

ClientConfig ClientFor(const std::string& state_dir, const std::string& device, const std::string& token) {
  ClientConfig c;
  c.device_id = device;
  c.token = token;
  c.state_dir = state_dir;
  c.model_dir = Model().model_dir;
  c.data_path = SampleData();
  c.backoff_base_s = 0.001;
  c.backoff_max_s = 0.01;
  c.checkpoint_every = 0;
  return c;
}

std::unique_ptr<Client> MakeClient(const ClientConfig& config, std::unique_ptr<comms::Transport> transport) {
  auto c = Client::Create(config, std::move(transport), Model().shared);
  REQUIRE(c.ok());
  (*c)->SetConditions({true, true, true, 1.0f});
  return std::move(c).value();
}

std::optional<v1::Envelope> Decode(const std::string& frame) {
  auto e = comms::DecodeFrameBody(std::string_view(frame).substr(4));
  if (!e.ok()) return std::nullopt;
  return *e;
}

Json ReadJson(const std::string& path) {
  auto text = ReadFile(path);
  REQUIRE(text.ok());
  return Json::parse(*text);
}

int CountLines(const std::string& path) {
  auto text = ReadFile(path);
  REQUIRE(text.ok());
  return static_cast<int>(std::count(text->begin(), text->end(), '\n'));
}

// Wraps a transport: the first `failures` Connect() calls fail with Unavailable (the network is down).
class FlakyTransport : public comms::Transport {
 public:
  FlakyTransport(std::unique_ptr<comms::Transport> inner, int failures)
      : inner_(std::move(inner)), failures_(failures) {}

  absl::StatusOr<std::unique_ptr<comms::Channel>> Connect(comms::Duration timeout) override {
    std::lock_guard<std::mutex> lock(mu_);
    times_.push_back(std::chrono::steady_clock::now());
    if (static_cast<int>(times_.size()) <= failures_) return absl::UnavailableError("connection refused");
    return inner_->Connect(timeout);
  }
  std::vector<std::chrono::steady_clock::time_point> times() {
    std::lock_guard<std::mutex> lock(mu_);
    return times_;
  }

 private:
  std::unique_ptr<comms::Transport> inner_;
  const int failures_;
  std::mutex mu_;
  std::vector<std::chrono::steady_clock::time_point> times_;
};

// ---- the state directory: resume after Cancel() ------------------------------------------------------------

// Runs the single task of a fresh one-device server to completion without interruption; returns its upload.
std::string UninterruptedUpload(v1::Task* task_out) {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  auto c = MakeClient(ClientFor(JoinPath(dir.path, "client"), "dev0", token), server.Transport());
  std::string payload;
  int observed = 0;
  c->SetUploadObserver([&](const v1::Task& task, const std::string& p, uint64_t) {
    *task_out = task;
    payload = p;
    ++observed;
  });
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  REQUIRE(r->outcome == RunOutcome::kUploaded);
  REQUIRE(observed == 1);
  return payload;
}

TEST_CASE("A round cancelled mid-training resumes from its checkpoint in a new Client and uploads the same update",
          "[client][resume]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();  // opens round 1
  const ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);

  // 1. The first Client is cancelled from another thread after training step 2 of 6.
  {
    auto c = MakeClient(config, server.Transport());
    std::mutex mu;
    std::condition_variable cv;
    bool reached = false, cancelled = false;
    c->SetProgressCallback([&](const RunProgress& p) {
      if (p.phase != "training" || p.done != 2) return;
      std::unique_lock<std::mutex> lock(mu);
      reached = true;
      cv.notify_all();
      cv.wait(lock, [&] { return cancelled; });  // the step boundary comes only after Cancel()
    });
    int observed = 0;
    c->SetUploadObserver([&](const v1::Task&, const std::string&, uint64_t) { ++observed; });
    std::thread canceller([&] {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return reached; });
      c->Cancel();
      cancelled = true;
      cv.notify_all();
    });
    auto r = c->RunOnce();
    canceller.join();
    REQUIRE(r.ok());
    CHECK(r->outcome == RunOutcome::kCancelled);
    CHECK(r->round_id == 1);
    CHECK(observed == 0);
  }
  // The checkpoint is on disk: step 2 of the task, and the state says "training".
  REQUIRE(FileExists(JoinPath(config.state_dir, "checkpoint.safetensors")));
  const Json cp = ReadJson(JoinPath(config.state_dir, "checkpoint.json"));
  CHECK(cp.at("steps").get<int64_t>() == 2);
  CHECK(cp.at("key").get<std::string>() == "dev0/1/r1-1");
  CHECK(ReadJson(JoinPath(config.state_dir, "state.json")).at("phase") == "training");
  CHECK_FALSE(FileExists(JoinPath(config.state_dir, "update.bin")));

  // 2. A new Client on the same state directory continues at step 3 and uploads.
  auto c = MakeClient(config, server.Transport());
  std::vector<int64_t> steps_seen;
  c->SetProgressCallback([&](const RunProgress& p) {
    if (p.phase == "training") steps_seen.push_back(p.done);
  });
  std::string resumed;
  v1::Task resumed_task;
  c->SetUploadObserver([&](const v1::Task& task, const std::string& payload, uint64_t) {
    resumed_task = task;
    resumed = payload;
  });
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kUploaded);
  CHECK(r->round_id == 1);
  REQUIRE_FALSE(steps_seen.empty());
  CHECK(steps_seen.front() == 3);  // resumed, not restarted
  CHECK(steps_seen.back() == 6);
  CHECK_FALSE(FileExists(JoinPath(config.state_dir, "checkpoint.json")));
  CHECK(CountLines(JoinPath(config.state_dir, "acks.jsonl")) == 1);
  CHECK(server.coordinator->global_version() == 1);

  // 3. The same task run straight through (another server with the same seed, hence the same task seed)
  // uploads exactly the same bytes: resuming loses nothing (trainer state, data position, parameters).
  v1::Task straight_task;
  const std::string straight = UninterruptedUpload(&straight_task);
  REQUIRE(straight_task.seed() == resumed_task.seed());
  REQUIRE(straight_task.task_id() == resumed_task.task_id());
  auto decoded = comms::DecodeDense(resumed);
  REQUIRE(decoded.ok());
  CHECK(std::any_of(decoded->begin(), decoded->end(), [](float v) { return v != 0.0f; }));  // it trained
  CHECK(resumed.size() == straight.size());
  CHECK(resumed == straight);
}

// ---- the state directory: resume a broken upload -----------------------------------------------------------

TEST_CASE("An upload cut off mid-way resumes in a new Client at the last acknowledged chunk and is recorded once",
          "[client][upload]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  config.upload_chunk_bytes = 1024;  // several chunks per update

  // Every UploadChunk frame the devices send, by offset, and whether it reached the server.
  struct Sent {
    uint64_t offset;
    bool delivered;
    int client;
  };
  std::mutex mu;
  std::vector<Sent> sent;
  int client_index = 0;
  auto faults = [&](int index) {
    comms::InMemoryFaults f;
    f.on_request = [&, index](std::string& frame) {
      auto e = Decode(frame);
      if (!e || !e->has_upload_chunk()) return true;
      std::lock_guard<std::mutex> lock(mu);
      const bool deliver = !(index == 0 && sent.size() == 2);  // the first device's third chunk is lost
      sent.push_back({e->upload_chunk().offset(), deliver, index});
      return deliver;
    };
    return f;
  };

  std::string payload;
  {
    ClientConfig first = config;
    first.max_attempts = 1;  // no second chance: the app is killed with the upload half done
    auto c = MakeClient(first, server.Transport(faults(client_index++)));
    c->SetUploadObserver([&](const v1::Task&, const std::string& p, uint64_t) { payload = p; });
    auto r = c->RunOnce();
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == absl::StatusCode::kUnavailable);
  }
  REQUIRE(payload.size() > 4 * static_cast<size_t>(config.upload_chunk_bytes));
  CHECK(ReadJson(JoinPath(config.state_dir, "state.json")).at("phase") == "trained");
  REQUIRE(FileExists(JoinPath(config.state_dir, "update.bin")));
  REQUIRE(sent.size() == 3);
  const uint64_t lost_offset = sent[2].offset;
  CHECK(lost_offset == 2 * static_cast<uint64_t>(config.upload_chunk_bytes));

  // The next launch: a new Client finishes the upload without training again.
  auto c = MakeClient(config, server.Transport(faults(client_index++)));
  bool trained = false;
  c->SetProgressCallback([&](const RunProgress& p) {
    if (p.phase == "training") trained = true;
  });
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kUploaded);
  CHECK(r->update_bytes == payload.size());
  CHECK_FALSE(trained);
  CHECK_FALSE(FileExists(JoinPath(config.state_dir, "update.bin")));

  // The second device's first chunk starts where the server stopped; no acknowledged chunk went twice.
  std::vector<uint64_t> second;
  std::map<uint64_t, int> delivered;
  for (const Sent& s : sent) {
    if (s.client == 1) second.push_back(s.offset);
    if (s.delivered) ++delivered[s.offset];
  }
  REQUIRE_FALSE(second.empty());
  CHECK(second.front() == lost_offset);
  uint64_t expect = 0;
  for (const auto& [offset, times] : delivered) {
    INFO("offset " << offset);
    CHECK(times == 1);
    CHECK(offset == expect);  // contiguous
    expect += static_cast<uint64_t>(config.upload_chunk_bytes);
  }
  CHECK(expect >= payload.size());

  // Recorded exactly once: one ledger entry with the update's size and hash; the round committed.
  auto round = server.coordinator->FindRound(1);
  REQUIRE(round.ok());
  REQUIRE(round->has_value());
  CHECK((*round)->accepted == 1);
  CHECK((*round)->state == server::RoundState::kCommitted);
  CHECK(CountLines(JoinPath(config.state_dir, "acks.jsonl")) == 1);
  auto store = server.CloseAndOpenStore();
  auto ledger = store->LedgerForRound(1);
  REQUIRE(ledger.ok());
  REQUIRE(ledger->size() == 1);
  CHECK((*ledger)[0].bytes == payload.size());
  CHECK((*ledger)[0].sha256 == Sha256Hex(payload));
}

TEST_CASE("A lost commit acknowledgement is retried without counting the update twice", "[client][upload]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  std::atomic<int> accepted_acks{0};
  comms::InMemoryFaults faults;
  faults.on_response = [&](std::string& frame) {
    auto e = Decode(frame);
    // The server accepted the update, but the first acknowledgement never arrives.
    if (e && e->has_upload_ack() && e->upload_ack().accepted()) return accepted_acks++ > 0;
    return true;
  };
  const ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  auto c = MakeClient(config, server.Transport(std::move(faults)));
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kUploaded);
  CHECK(r->round_id == 1);
  CHECK(accepted_acks == 2);  // the lost one, then the answer to the retry (from the ledger)
  CHECK(CountLines(JoinPath(config.state_dir, "acks.jsonl")) == 1);
  CHECK(server.coordinator->global_version() == 1);
  auto store = server.CloseAndOpenStore();
  auto ledger = store->LedgerForRound(1);
  REQUIRE(ledger.ok());
  CHECK(ledger->size() == 1);
}

// ---- retry and backoff ------------------------------------------------------------------------------------

TEST_CASE("An unselected device is told to retry after the delay the server set", "[client][retry]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token0 = server.Register("dev0");
  const std::string token1 = server.Register("dev1");
  server.coordinator->Tick();
  // dev0 takes the round's only task (a raw check-in: the test plays that device).
  {
    auto transport = server.Transport();
    auto ch = transport->Connect(comms::Duration(1000));
    REQUIRE(ch.ok());
    v1::Envelope hello;
    hello.set_protocol_version(1);
    hello.set_request_id(1);
    hello.mutable_hello()->set_device_id("dev0");
    hello.mutable_hello()->set_token(token0);
    REQUIRE((*ch)->Call(hello, comms::Duration(1000)).ok());
    v1::Envelope check_in;
    check_in.set_protocol_version(1);
    check_in.set_request_id(2);
    check_in.mutable_check_in();
    auto reply = (*ch)->Call(check_in, comms::Duration(1000));
    REQUIRE(reply.ok());
    REQUIRE(reply->check_in_reply().has_task());
  }
  auto c = MakeClient(ClientFor(JoinPath(dir.path, "client"), "dev1", token1), server.Transport());
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kRetryLater);
  CHECK(r->retry_after_seconds == 7);  // the server's retry_base_s (no jitter)
  CHECK(r->detail == "not selected");
}

TEST_CASE("A client whose first connections fail backs off and succeeds within max_attempts", "[client][retry]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  // No Tick: no round is open, so a successful check-in answers RetryAfter.
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  config.max_attempts = 4;
  config.backoff_base_s = 0.05;
  config.backoff_max_s = 0.15;
  auto flaky = std::make_unique<FlakyTransport>(server.Transport(), 3);
  FlakyTransport* transport = flaky.get();
  auto c = MakeClient(config, std::move(flaky));
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kRetryLater);
  CHECK(r->detail == "no open round");
  const auto times = transport->times();
  REQUIRE(times.size() == 4);
  // Full jitter: the wait before attempt k is in [0, min(max, base × 2^k)] (plus scheduling slack).
  for (size_t k = 1; k < times.size(); ++k) {
    const double gap = std::chrono::duration<double>(times[k] - times[k - 1]).count();
    const double cap = std::min(config.backoff_max_s, config.backoff_base_s * std::pow(2.0, static_cast<double>(k)));
    INFO("attempt " << k << ": waited " << gap << " s, cap " << cap << " s");
    CHECK(gap <= cap + 0.5);
  }
}

TEST_CASE("After max_attempts failed connections RunOnce returns Unavailable", "[client][retry]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  config.max_attempts = 3;
  auto flaky = std::make_unique<FlakyTransport>(server.Transport(), 1000);
  FlakyTransport* transport = flaky.get();
  auto c = MakeClient(config, std::move(flaky));
  auto r = c->RunOnce();
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == absl::StatusCode::kUnavailable);
  CHECK(transport->times().size() == 3);
  // The state directory is untouched: the next call starts afresh.
  CHECK_FALSE(FileExists(JoinPath(config.state_dir, "update.bin")));
}

TEST_CASE("Cancel() during the backoff makes RunOnce return kCancelled promptly", "[client][retry]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  config.max_attempts = 6;
  config.backoff_base_s = 20;  // waits of up to minutes
  config.backoff_max_s = 60;
  auto c = MakeClient(config, std::make_unique<FlakyTransport>(server.Transport(), 1000));
  const auto t0 = std::chrono::steady_clock::now();
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    c->Cancel();
  });
  auto r = c->RunOnce();
  canceller.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kCancelled);
  CHECK(seconds < 10);
}

TEST_CASE("With a simulated clock the backoff passes the clock's time, not the host's", "[client][retry][clock]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  config.max_attempts = 4;
  config.backoff_base_s = 20;  // waits of up to a minute each on a real clock
  config.backoff_max_s = 60;
  auto c = MakeClient(config, std::make_unique<FlakyTransport>(server.Transport(), 3));
  ManualClock clock(1'000'000);
  SimulationHooks hooks;
  hooks.clock = &clock;
  c->SetSimulationHooks(hooks);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = c->RunOnce();
  const double host_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kRetryLater);
  CHECK(host_seconds < 10);
  // Three waits, each in [0, min(60, 20 × 2^k)] for k = 1, 2, 3: at most 160 s in all.
  const int64_t waited_ms = clock.NowMs() - 1'000'000;
  CHECK(waited_ms > 0);
  CHECK(waited_ms <= 160'000);
}

TEST_CASE("With a simulated clock acks.jsonl records the clock's time", "[client][upload][clock]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  const ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  auto c = MakeClient(config, server.Transport());
  ManualClock clock(123'456'789);
  SimulationHooks hooks;
  hooks.clock = &clock;
  c->SetSimulationHooks(hooks);
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  REQUIRE(r->outcome == RunOutcome::kUploaded);
  auto log = ReadFile(JoinPath(config.state_dir, "acks.jsonl"));
  REQUIRE(log.ok());
  const nlohmann::json ack = nlohmann::json::parse(log->substr(0, log->find('\n')));
  CHECK(ack.at("time_ms").get<int64_t>() == clock.NowMs());
  CHECK(ack.at("round").get<uint64_t>() == 1);
}

TEST_CASE("A Cancel() before RunOnce is not lost: that run returns kCancelled at once, the next one runs",
          "[client][cancel]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  auto flaky = std::make_unique<FlakyTransport>(server.Transport(), 0);
  FlakyTransport* transport = flaky.get();
  auto c = MakeClient(ClientFor(JoinPath(dir.path, "client"), "dev0", token), std::move(flaky));
  c->Cancel();
  auto first = c->RunOnce();
  REQUIRE(first.ok());
  CHECK(first->outcome == RunOutcome::kCancelled);
  CHECK(transport->times().empty());  // it did not even connect
  auto second = c->RunOnce();
  REQUIRE(second.ok());
  CHECK(second->outcome == RunOutcome::kUploaded);
}

TEST_CASE("Cancel() between upload chunks keeps the update, the next run resumes the upload", "[client][cancel]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  config.upload_chunk_bytes = 1024;  // several chunks (the smallest allowed)
  auto c = MakeClient(config, server.Transport());
  int64_t cancelled_at = -1, total = 0;
  c->SetProgressCallback([&](const RunProgress& p) {
    if (p.phase != "uploading" || p.done == 0 || cancelled_at >= 0) return;
    cancelled_at = p.done;  // the first chunk is on the server
    total = p.total;
    c->Cancel();
  });
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kCancelled);
  REQUIRE(cancelled_at > 0);
  REQUIRE(cancelled_at < total);
  CHECK(ReadJson(JoinPath(config.state_dir, "state.json")).at("phase") == "trained");
  CHECK(FileExists(JoinPath(config.state_dir, "update.bin")));
  // The next run uploads the rest, starting where the server stands.
  std::vector<int64_t> offsets;
  c->SetProgressCallback([&](const RunProgress& p) {
    if (p.phase == "uploading") offsets.push_back(p.done);
  });
  auto again = c->RunOnce();
  REQUIRE(again.ok());
  CHECK(again->outcome == RunOutcome::kUploaded);
  CHECK(again->round_id == 1);
  REQUIRE_FALSE(offsets.empty());
  CHECK(offsets.front() == cancelled_at);
}

TEST_CASE("A device registered beside the running server (devices add) is authenticated without a restart",
          "[client][auth]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  server.coordinator->Tick();
  // What `seedling devices add` does while `seedling serve` holds the state directory.
  std::string token;
  {
    auto registry = server::Store::OpenForDevices(server.config.state_dir);
    INFO(registry.status().ToString());
    REQUIRE(registry.ok());
    auto added = server::AddDevice(**registry, "late-phone", 1);
    REQUIRE(added.ok());
    token = *added;
  }
  auto c = MakeClient(ClientFor(JoinPath(dir.path, "client"), "late-phone", token), server.Transport());
  auto r = c->RunOnce();
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kUploaded);
}

TEST_CASE("A device revoked while the server runs is refused at its next Hello, and told so", "[client][auth]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  {
    auto registry = server::Store::OpenForDevices(server.config.state_dir);  // `seedling devices revoke`
    REQUIRE(registry.ok());
    REQUIRE((*registry)->RevokeDevice("dev0", 1).ok());
  }
  auto c = MakeClient(ClientFor(JoinPath(dir.path, "client"), "dev0", token), server.Transport());
  auto r = c->RunOnce();
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == absl::StatusCode::kUnauthenticated);
  CHECK_THAT(std::string(r.status().message()), Catch::Contains("revoked"));
  // A wrong token for the same id learns nothing about the revocation.
  auto wrong = MakeClient(ClientFor(JoinPath(dir.path, "other"), "dev0", "not-the-token"), server.Transport());
  auto w = wrong->RunOnce();
  REQUIRE_FALSE(w.ok());
  CHECK(std::string(w.status().message()).find("revoked") == std::string::npos);
}

TEST_CASE("After a token rotation the old token is refused and the new one works", "[client][auth]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string old_token = server.Register("dev0");
  server.coordinator->Tick();
  std::string new_token;
  {
    auto registry = server::Store::OpenForDevices(server.config.state_dir);  // `seedling devices rotate`
    REQUIRE(registry.ok());
    auto rotated = server::RotateDeviceToken(**registry, "dev0");
    REQUIRE(rotated.ok());
    new_token = *rotated;
    CHECK(server::RotateDeviceToken(**registry, "nosuch").status().code() == absl::StatusCode::kNotFound);
    REQUIRE((*registry)->AddDevice({"dev1", std::string(64, 'a'), 1, 0, 0}).ok());
    REQUIRE((*registry)->RevokeDevice("dev1", 2).ok());
    CHECK(server::RotateDeviceToken(**registry, "dev1").status().code() == absl::StatusCode::kFailedPrecondition);
    CHECK((*registry)->SetDeviceToken("dev0", "not-a-hash").code() == absl::StatusCode::kInvalidArgument);
  }
  CHECK(new_token != old_token);
  auto stale = MakeClient(ClientFor(JoinPath(dir.path, "old"), "dev0", old_token), server.Transport());
  auto r = stale->RunOnce();
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == absl::StatusCode::kUnauthenticated);
  auto fresh = MakeClient(ClientFor(JoinPath(dir.path, "new"), "dev0", new_token), server.Transport());
  auto ok = fresh->RunOnce();
  INFO(ok.status().ToString());
  REQUIRE(ok.ok());
  CHECK(ok->outcome == RunOutcome::kUploaded);
}

TEST_CASE("A wrong token is Unauthenticated and is not retried", "[client][auth]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  server.Register("dev0");
  server.coordinator->Tick();
  auto flaky = std::make_unique<FlakyTransport>(server.Transport(), 0);
  FlakyTransport* transport = flaky.get();
  auto c = MakeClient(ClientFor(JoinPath(dir.path, "client"), "dev0", "not-the-token"), std::move(flaky));
  auto r = c->RunOnce();
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == absl::StatusCode::kUnauthenticated);
  CHECK(transport->times().size() == 1);
}

// ---- memory budget ----------------------------------------------------------------------------------------

TEST_CASE("A task over the memory budget is declined and the server records the decline as MEMORY",
          "[client][planner]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  config.memory_budget_bytes = 64 << 10;  // 64 KiB: nothing fits
  auto c = MakeClient(config, server.Transport());
  bool trained = false;
  c->SetProgressCallback([&](const RunProgress& p) {
    if (p.phase == "training") trained = true;
  });
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kDeclined);
  CHECK(r->round_id == 1);
  CHECK_THAT(r->detail, Catch::Contains("does not fit"));
  CHECK_FALSE(trained);
  // The server counts it by reason ...
  CHECK_THAT(server.metrics.RenderPrometheus(), Catch::Contains("seedling_declines_total{reason=\"MEMORY\"} 1"));
  // ... does not hand the task out again ...
  auto again = c->RunOnce();
  REQUIRE(again.ok());
  CHECK(again->outcome == RunOutcome::kRetryLater);
  CHECK(again->detail == "declined this round");
  // ... and the store holds the task as declined for MEMORY.
  auto store = server.CloseAndOpenStore();
  auto task = store->FindTaskFor(1, "dev0");
  REQUIRE(task.ok());
  REQUIRE(task->has_value());
  CHECK((*task)->state == "declined");
  CHECK_THAT((*task)->detail, Catch::StartsWith("MEMORY"));
}

TEST_CASE("The plan counts the data, and rows over max_row_bytes are skipped instead of loaded", "[client][planner]") {
  TempDir dir;
  server::ServerConfig sc = TinyServerConfig(JoinPath(dir.path, "server"));
  sc.clients_per_round = 2;  // a task for each device
  Server server(sc);
  const std::string token = server.Register("dev0");
  const std::string token1 = server.Register("dev1");
  server.coordinator->Tick();
  auto sample = ReadFile(SampleData());
  REQUIRE(sample.ok());
  // A 200 KiB row (within the default cap): tokenizing it may take ~19 MiB, and the plan says so.
  const std::string long_row = StrCat(R"({"text": ")", std::string(200 << 10, 'a'), R"("})");
  const std::string data = JoinPath(dir.path, "data.jsonl");
  REQUIRE(WriteFileAtomic(data, StrCat(*sample, long_row, "\n")).ok());
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  config.data_path = data;
  config.memory_budget_bytes = 64 << 10;  // nothing fits: the decline shows the smallest plan
  auto declined = MakeClient(config, server.Transport())->RunOnce();
  REQUIRE(declined.ok());
  REQUIRE(declined->outcome == RunOutcome::kDeclined);
  const std::string detail = declined->detail;
  const size_t at = detail.find(" + data ");
  REQUIRE(at != std::string::npos);
  CHECK(std::stod(detail.substr(at + 8)) >= 200.0 * 1024 * kRowTokenizeBytesPerByte / (1 << 20));

  // A 3 MiB row is over the cap: skipped and counted, never held, and the device trains on the rest.
  const std::string huge_row = StrCat(R"({"text": ")", std::string(3 << 20, 'a'), R"("})");
  REQUIRE(WriteFileAtomic(data, StrCat(huge_row, "\n", *sample)).ok());
  ClientConfig roomy = ClientFor(JoinPath(dir.path, "client1"), "dev1", token1);
  roomy.data_path = data;
  auto uploaded = MakeClient(roomy, server.Transport())->RunOnce();
  REQUIRE(uploaded.ok());
  INFO(uploaded->detail);
  CHECK(uploaded->outcome == RunOutcome::kUploaded);
  // Throughput in processed tokens: the sample's instruction rows mask their prompts, so fewer are scored.
  CHECK(uploaded->scored_tokens > 0);
  CHECK(uploaded->processed_tokens > uploaded->scored_tokens);
  CHECK(uploaded->tokens_per_second > 0);
  // AddExample refuses such a row at once.
  auto adder = MakeClient(roomy, server.Transport());
  CHECK_THAT(std::string(adder->AddExample(huge_row).message()), Catch::Contains("max_row_bytes is 262144"));
}

// ---- frozen weights: the task's representation, or the device's ---------------------------------------------

// Runs the single task of a fresh one-device server whose tasks ask for `server_weights`; the client's config
// says `device_weights`. Returns the run's result and the task the device trained on.
std::pair<RunResult, v1::Task> RunWithWeights(const std::string& dir, model::WeightPrecision server_weights,
                                              const std::string& device_weights) {
  server::ServerConfig sc = TinyServerConfig(JoinPath(dir, "server"));
  sc.weights = server_weights;
  Server server(sc);
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  ClientConfig config = ClientFor(JoinPath(dir, "client"), "dev0", token);
  config.weights = device_weights;
  auto c = MakeClient(config, server.Transport());
  v1::Task task;
  c->SetUploadObserver([&](const v1::Task& t, const std::string&, uint64_t) { task = t; });
  auto r = c->RunOnce();
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  INFO(r->detail);
  REQUIRE(r->outcome == RunOutcome::kUploaded);
  return {*r, task};
}

TEST_CASE("A task carries the server's weights and the client trains with them", "[client][weights]") {
  TempDir dir;
  // The shared test model is fp32: the client loads its own q8_0 copy from a cache in its state directory.
  const auto [r, task] = RunWithWeights(dir.path, model::WeightPrecision::kQ8_0, "");
  CHECK(task.weights() == "q8_0");
  CHECK(r.weights == "q8_0");
  CHECK(FileExists(JoinPath(dir.path, "client/model-cache/weights-q8_0.safetensors")));
}

TEST_CASE("A device's own weights setting wins over the task's", "[client][weights]") {
  TempDir dir;
  const auto [r, task] = RunWithWeights(dir.path, model::WeightPrecision::kQ8_0, "fp32");
  CHECK(task.weights() == "q8_0");
  CHECK(r.weights == "fp32");
  CHECK_FALSE(std::filesystem::exists(JoinPath(dir.path, "client/model-cache")));  // the fp32 model needs no cache
}

TEST_CASE("A task asking for weights this SDK does not know is declined as UNSUPPORTED", "[client][weights]") {
  TempDir dir;
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  comms::InMemoryFaults faults;
  faults.on_response = [](std::string& frame) {
    std::optional<v1::Envelope> e = Decode(frame);
    if (e && e->has_check_in_reply() && e->check_in_reply().has_task()) {
      e->mutable_check_in_reply()->mutable_task()->set_weights("q3_k");  // a newer server's representation
      auto encoded = comms::EncodeFrame(*e, comms::kMaxControlFrameBytes);
      REQUIRE(encoded.ok());
      frame = *encoded;
    }
    return true;
  };
  auto c = MakeClient(ClientFor(JoinPath(dir.path, "client"), "dev0", token), server.Transport(std::move(faults)));
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kDeclined);
  CHECK_THAT(r->detail, Catch::Contains("q3_k"));
  CHECK_THAT(server.metrics.RenderPrometheus(), Catch::Contains("seedling_declines_total{reason=\"UNSUPPORTED\"} 1"));
}

// ---- The base model: directory or GGUF file, compared by architecture --------------------------------------

// A device that loads its base model itself (no SharedModel) from `model_path`.
std::unique_ptr<Client> ClientOwningModel(ClientConfig config, const std::string& model_path,
                                          std::unique_ptr<comms::Transport> transport) {
  config.model_dir = model_path;
  auto c = Client::Create(config, std::move(transport), SharedModel{});
  REQUIRE(c.ok());
  (*c)->SetConditions({true, true, true, 1.0f});
  return std::move(c).value();
}

TEST_CASE("A device holding the server's model as a GGUF file trains on it and uploads", "[client][gguf]") {
  TempDir dir;
  const std::string gguf = JoinPath(dir.path, "model-q8_0.gguf");
  {
    auto m = model::LlamaModel::Load(Model().model_dir);
    REQUIRE(m.ok());
    model::GgufOptions options;
    options.format = model::WeightFormat::kQ8_0;
    REQUIRE(model::WriteGguf(gguf, (*m)->config(), (*m)->weights(), *Model().shared.tokenizer, options).ok());
  }
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", token);
  config.weights = "stored";  // the file's Q8_0 blocks in place
  auto c = ClientOwningModel(config, gguf, server.Transport());
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kUploaded);
  CHECK(r->weights == "stored");
  server.coordinator->Tick();
  CHECK_THAT(server.metrics.RenderPrometheus(), Catch::Contains("seedling_global_version 1"));  // accepted
}

TEST_CASE("A device whose base model has other shapes declines the task as UNSUPPORTED", "[client][gguf]") {
  TempDir dir;
  const std::string other = JoinPath(dir.path, "other-model");
  model::InitModelOptions init;
  init.preset = "tiny-qwen2";
  REQUIRE(model::InitModel(other, init).ok());
  Server server(TinyServerConfig(JoinPath(dir.path, "server")));
  const std::string token = server.Register("dev0");
  server.coordinator->Tick();
  auto c = ClientOwningModel(ClientFor(JoinPath(dir.path, "client"), "dev0", token), other, server.Transport());
  auto r = c->RunOnce();
  REQUIRE(r.ok());
  CHECK(r->outcome == RunOutcome::kDeclined);
  CHECK_THAT(r->detail, Catch::Contains("a different base model"));
  CHECK_THAT(server.metrics.RenderPrometheus(), Catch::Contains("seedling_declines_total{reason=\"UNSUPPORTED\"} 1"));
}

// ---- kseed: seed replay -------------------------------------------------------------------------------------

TEST_CASE("A kseed straggler whose round committed meanwhile replays only up to its task's version",
          "[client][kseed]") {
  TempDir dir;
  server::ServerConfig config = TinyServerConfig(JoinPath(dir.path, "server"));
  config.method = "kseed";
  config.codec.codec = v1::CODEC_SEED_SCALARS;
  config.strategy.name = "kseed";
  config.strategy.kseed_pool_size = 64;
  config.strategy.kseed_lr = 1e-3;
  config.steps = 2;
  config.rounds = 3;
  config.over_selection = 2.0;  // round 2 hands out 2 tasks for 1 report
  Server server(config);
  const std::string ta = server.Register("a"), tb = server.Register("b"), tc = server.Register("c");
  server.coordinator->Tick();
  // Round 1: device a alone → global version 1.
  auto a = MakeClient(ClientFor(JoinPath(dir.path, "a"), "a", ta), server.Transport());
  auto ra = a->RunOnce();
  REQUIRE(ra.ok());
  REQUIRE(ra->outcome == RunOutcome::kUploaded);
  server.coordinator->Tick();
  REQUIRE(server.coordinator->Snapshot().global_version == 1);
  // Round 2: b gets a task for version 1, and c completes the round (version 2) before b syncs.
  auto c = MakeClient(ClientFor(JoinPath(dir.path, "c"), "c", tc), server.Transport());
  std::atomic<int> adapter_downloads{0};
  bool c_ran = false;
  comms::InMemoryFaults faults;
  faults.on_request = [&](std::string& frame) {
    std::optional<v1::Envelope> e = Decode(frame);
    if (e && e->has_download()) {
      if (e->download().what() == v1::Download::ADAPTER) ++adapter_downloads;
      if (!c_ran) {
        c_ran = true;
        auto rc = c->RunOnce();
        REQUIRE(rc.ok());
        REQUIRE(rc->outcome == RunOutcome::kUploaded);
        server.coordinator->Tick();
        REQUIRE(server.coordinator->Snapshot().global_version == 2);
      }
    }
    return true;
  };
  auto b = MakeClient(ClientFor(JoinPath(dir.path, "b"), "b", tb), server.Transport(std::move(faults)));
  auto rb = b->RunOnce();
  REQUIRE(c_ran);
  // b synced to version 1 from the seed history alone (replaying version 2 as well would not match the
  // task's SHA-256 and fall back to downloading the adapter), trained, and its upload came too late.
  CHECK(adapter_downloads == 0);
  // Routine for a straggler: an outcome, not an error, and the device is ready to check in again.
  INFO(rb.status().ToString());
  REQUIRE(rb.ok());
  CHECK(rb->outcome == RunOutcome::kDropped);
  CHECK_THAT(rb->detail, Catch::StartsWith("STALE: "));
  server.coordinator->Tick();
  auto again = b->RunOnce();
  REQUIRE(again.ok());
  CHECK(again->outcome == RunOutcome::kUploaded);
}

// ---- bad input --------------------------------------------------------------------------------------------

const char* kBase = R"("device_id": "d", "state_dir": "/tmp/s", "model_dir": "/tmp/m")";

absl::Status ParseWith(const std::string& extra) {
  return ClientConfig::FromJson(StrCat("{", kBase, extra.empty() ? "" : ", ", extra, "}")).status();
}

TEST_CASE("A bad JSON config is InvalidArgument naming the key", "[client][config]") {
  REQUIRE(ParseWith("").ok());
  REQUIRE(ParseWith(R"("port": 9443, "memory_budget": "600M", "methods": ["mezo"])").ok());
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"("prot": 9443)", "prot"},
      {R"("port": "9443")", "port"},
      {R"("port": 70000)", "port"},
      {R"("port": -1)", "port"},
      {R"("max_attempts": 1.5)", "max_attempts"},
      {R"("max_attempts": 0)", "max_attempts"},
      {R"("max_attempts": 4294967297)", "max_attempts"},
      {R"("seed": -3)", "seed"},
      {R"("upload_chunk_bytes": 10)", "upload_chunk_bytes"},
      {R"("call_timeout_ms": 0)", "call_timeout_ms"},
      {R"("checkpoint_every": -1)", "checkpoint_every"},
      {R"("backoff_base_s": "fast")", "backoff_base_s"},
      {R"("methods": "mezo")", "methods"},
      {R"("methods": ["sgd"])", "sgd"},
      {R"("memory_budget": "lots")", "lots"},
      {R"("weights": "q5_k")", "weights"},
      {R"("weights": 4)", "weights"},
      {R"("weight_cache_dir": ["c"])", "weight_cache_dir"},
  };
  for (const auto& [extra, key] : cases) {
    INFO(extra);
    const absl::Status st = ParseWith(extra);
    CHECK(st.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(st.message()), Catch::Contains(key));
  }
  CHECK(ClientConfig::FromJson("{\"device_id\": ").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(ClientConfig::FromJson("[1, 2]").status().code() == absl::StatusCode::kInvalidArgument);
  const absl::Status missing = ClientConfig::FromJson(R"({"device_id": "d", "model_dir": "m"})").status();
  CHECK_THAT(std::string(missing.message()), Catch::Contains("state_dir"));
  const absl::Status toml = ClientConfig::FromToml("[client]\ndevice_id = \"d\"\nstate_dr = \"s\"\n").status();
  CHECK(toml.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(toml.message()), Catch::Contains("state_dr"));
}

TEST_CASE("The weights and weight_cache_dir keys are read from JSON and TOML, empty by default", "[client][config]") {
  auto json = ClientConfig::FromJson(StrCat("{", kBase, R"(, "weights": "q4_0", "weight_cache_dir": "/tmp/c"})"));
  REQUIRE(json.ok());
  CHECK(json->weights == "q4_0");
  CHECK(json->weight_cache_dir == "/tmp/c");
  auto toml = ClientConfig::FromToml(
      "[client]\ndevice_id = \"d\"\nstate_dir = \"s\"\nmodel_dir = \"m\"\nweights = \"stored\"\n");
  REQUIRE(toml.ok());
  CHECK(toml->weights == "stored");
  auto defaults = ClientConfig::FromJson(StrCat("{", kBase, "}"));
  REQUIRE(defaults.ok());
  CHECK(defaults->weights.empty());           // as the task says
  CHECK(defaults->weight_cache_dir.empty());  // <state_dir>/model-cache
}

TEST_CASE("AddExample refuses a row that is not a JSON object and keeps the store intact", "[client][data]") {
  TempDir dir;
  ClientConfig config = ClientFor(JoinPath(dir.path, "client"), "dev0", "t");
  config.data_path.clear();  // the local example store
  auto c = Client::Create(config, comms::MakeInMemoryTransport(nullptr), Model().shared);
  REQUIRE(c.ok());
  const std::string store = JoinPath(config.state_dir, "examples.jsonl");
  REQUIRE((*c)->AddExample(R"({"text": "one"})").ok());
  for (const char* bad : {"[1, 2]", "\"text\"", "42", "null", "{\"text\": ", ""}) {
    INFO(bad);
    const absl::Status st = (*c)->AddExample(bad);
    CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  }
  REQUIRE((*c)->AddExample(R"({"instruction": "two", "output": "2"})").ok());
  CHECK(CountLines(store) == 2);
  auto text = ReadFile(store);
  REQUIRE(text.ok());
  std::istringstream lines(*text);
  std::string line;
  while (std::getline(lines, line)) CHECK(Json::parse(line).is_object());
}

}  // namespace
}  // namespace seedling::client
