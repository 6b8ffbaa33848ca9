// Disk failures at the coordinator, injected through the store's seams (StoreOptions: a FileSystem for the
// checkpoint files, a hook that fails a transaction's COMMIT): a failed checkpoint write, round commit or
// ledger write aborts the round (docs/architecture.md, "Round state machine"), no acknowledged upload is lost
// or left uncounted, across a restart too, and the server goes on to run the next round.

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/file.h"
#include "base/sha256.h"
#include "comms/codec.h"
#include "model/init.h"
#include "server/coordinator.h"
#include "tests/fault_file_system.h"
#include "tests/test_util.h"

namespace seedling::server {
namespace {

using Op = testing::FaultFileSystem::Op;

// One coordinator on a state directory, with its devices talking to it through handlers (no transport).
struct World {
  testing::TempDir dir;
  ServerConfig config;
  ManualClock clock;
  testing::FaultFileSystem files;
  std::mutex mu;
  std::string fail_transaction;  // guarded by mu: fail the COMMIT of the next transaction of this name...
  int fail_after = 0;            // guarded by mu: ...after letting this many of them through
  // Holds the COMMIT of the next transaction of this name until Release(): the coordinator is then inside
  // its I/O, and the test can see what other requests get meanwhile.
  std::string hold_transaction;  // guarded by mu
  bool held = false;             // guarded by mu
  bool released = false;         // guarded by mu
  std::condition_variable changed;
  std::unique_ptr<Coordinator> coordinator;
  std::map<std::string, std::string> tokens;

  explicit World(int clients_per_round, int devices) {
    model::InitModelOptions init;
    init.preset = "tiny";
    REQUIRE(model::InitModel(JoinPath(dir.path, "model"), init).ok());
    config.state_dir = JoinPath(dir.path, "state");
    config.model_dir = JoinPath(dir.path, "model");
    config.codec.codec = v1::CODEC_FP32;
    config.clients_per_round = clients_per_round;
    config.over_selection = 1.0;
    config.min_reports = 1;
    config.lora_rank = 2;
    Start();
    for (int i = 0; i < devices; ++i) {
      const std::string id = "phone-" + std::to_string(i);
      auto token = coordinator->RegisterDevice(id);
      REQUIRE(token.ok());
      tokens[id] = *token;
    }
  }

  // (Re)creates the coordinator on the state directory, as a restarted server would.
  void Start() {
    coordinator.reset();
    StoreOptions options;
    options.fs = &files;
    options.before_commit = [this](std::string_view transaction, int) -> absl::Status {
      std::unique_lock<std::mutex> lock(mu);
      if (!hold_transaction.empty() && transaction == hold_transaction) {
        hold_transaction.clear();
        held = true;
        changed.notify_all();
        changed.wait(lock, [this] { return released; });
      }
      if (fail_transaction.empty() || transaction != fail_transaction) return absl::OkStatus();
      if (fail_after-- > 0) return absl::OkStatus();
      fail_transaction.clear();
      return absl::InternalError("injected: the COMMIT's fsync failed");
    };
    auto c = Coordinator::Create(config, &clock, nullptr, options);
    REQUIRE(c.ok());
    coordinator = std::move(c).value();
  }

  void FailCommitOf(const std::string& transaction, int after = 0) {
    std::lock_guard<std::mutex> lock(mu);
    fail_transaction = transaction;
    fail_after = after;
  }

  void Hold(const std::string& transaction) {
    std::lock_guard<std::mutex> lock(mu);
    hold_transaction = transaction;
  }
  void WaitUntilHeld() {
    std::unique_lock<std::mutex> lock(mu);
    changed.wait(lock, [this] { return held; });
  }
  void Release() {
    std::lock_guard<std::mutex> lock(mu);
    released = true;
    changed.notify_all();
  }

  RoundRecord Round(uint64_t round_id) {
    auto r = coordinator->FindRound(round_id);
    REQUIRE(r.ok());
    REQUIRE(r->has_value());
    return **r;
  }
};

// A device's connection: Hello, then requests through the coordinator's handler.
struct Device {
  std::string id;
  std::unique_ptr<comms::ConnectionHandler> handler;
  v1::Task task;

  Device(World& world, std::string device_id) : id(std::move(device_id)) {
    handler = world.coordinator->handler_factory()(comms::PeerInfo{"test:" + id, ""});
    v1::Envelope hello;
    hello.mutable_hello()->set_device_id(id);
    hello.mutable_hello()->set_token(world.tokens.at(id));
    REQUIRE(Call(hello).has_hello_reply());
  }

  v1::Envelope Call(v1::Envelope e) {
    e.set_protocol_version(1);
    e.set_request_id(1);
    return handler->Handle(e);
  }

  std::string Key() const { return id + "/" + std::to_string(task.round_id()) + "/" + task.task_id(); }

  void CheckIn() {
    v1::Envelope e;
    e.mutable_check_in()->mutable_conditions()->set_charging(true);
    const v1::Envelope r = Call(e);
    REQUIRE(r.has_check_in_reply());
    REQUIRE(r.check_in_reply().has_task());
    task = r.check_in_reply().task();
  }

  std::string Payload() const {
    std::vector<float> delta(task.num_parameters(), 0.001f);
    comms::CodecOptions codec;
    codec.codec = v1::CODEC_FP32;
    return *comms::EncodeDense(delta, codec, 0);
  }

  v1::Envelope Begin(const std::string& payload) {
    v1::Envelope b;
    b.mutable_upload_begin()->set_round_id(task.round_id());
    b.mutable_upload_begin()->set_task_id(task.task_id());
    b.mutable_upload_begin()->set_idempotency_key(Key());
    b.mutable_upload_begin()->set_total_bytes(payload.size());
    b.mutable_upload_begin()->set_codec(v1::CODEC_FP32);
    b.mutable_upload_begin()->set_num_examples(4);
    b.mutable_upload_begin()->set_sha256(Sha256(payload));
    return Call(b);
  }

  // UploadBegin and the one chunk of a small dense update; the commit is separate.
  void Send() {
    const std::string payload = Payload();
    REQUIRE(Begin(payload).has_upload_ack());
    v1::Envelope c;
    c.mutable_upload_chunk()->set_idempotency_key(Key());
    c.mutable_upload_chunk()->set_offset(0);
    c.mutable_upload_chunk()->set_data(payload);
    REQUIRE(Call(c).upload_ack().received_bytes() == payload.size());
  }

  // UploadCommit: true when acknowledged as accepted.
  bool Commit() {
    v1::Envelope m;
    m.mutable_upload_commit()->set_idempotency_key(Key());
    const v1::Envelope r = Call(m);
    return r.has_upload_ack() && r.upload_ack().accepted();
  }

  bool Upload() {
    CheckIn();
    Send();
    return Commit();
  }
};

// The ledger's keys for a round, read from a store opened on the (stopped) server's directory.
std::set<std::string> LedgerKeys(World& world, uint64_t round_id) {
  world.coordinator.reset();
  auto store = Store::Open(world.config.state_dir);
  REQUIRE(store.ok());
  auto ledger = (*store)->LedgerForRound(round_id);
  REQUIRE(ledger.ok());
  std::set<std::string> keys;
  for (const LedgerEntry& e : *ledger) keys.insert(e.idempotency_key);
  return keys;
}

// After a failure ended round 1: the next round runs and commits version 1.
void NextRoundCommits(World& world, int clients) {
  world.coordinator->Tick();
  for (int i = 0; i < clients; ++i) {
    Device d(world, "phone-" + std::to_string(i));
    REQUIRE(d.Upload());
  }
  CHECK(world.Round(2).state == RoundState::kCommitted);
  CHECK(world.coordinator->global_version() == 1);
}

// Round 1 with two devices whose uploads are both acknowledged, the second ending the round in `failure`.
// Returns the first device's task.
v1::Task RoundEndsIn(World& world, const std::string& failure) {
  world.coordinator->Tick();  // round 1 opens
  Device a(world, "phone-0");
  Device b(world, "phone-1");
  REQUIRE(a.Upload());
  REQUIRE(b.Upload());  // acknowledged before the round's end is attempted
  const RoundRecord r = world.Round(1);
  CHECK(r.state == RoundState::kAborted);
  CHECK(r.abort_reason.find(failure) != std::string::npos);
  CHECK(r.accepted == 2);
  CHECK(world.coordinator->global_version() == 0);
  CHECK(world.coordinator->Health().ok());
  return a.task;
}

TEST_CASE("A failed checkpoint fsync aborts the round and keeps its acknowledged uploads", "[server][faults]") {
  World world(2, 2);
  world.files.FailNext(Op::kSync, "global-1.safetensors");
  RoundEndsIn(world, "checkpoint failed");
  CHECK(world.files.injected() == 1);
  NextRoundCommits(world, 2);
  CHECK(LedgerKeys(world, 1) == std::set<std::string>{"phone-0/1/r1-1", "phone-1/1/r1-2"});
}

TEST_CASE("A failed round commit aborts the round, keeps its acknowledged uploads, and survives a restart",
          "[server][faults]") {
  World world(2, 2);
  world.FailCommitOf("CommitRound");
  const v1::Task task = RoundEndsIn(world, "commit failed");
  // A restart finds the round aborted with both uploads counted, and tells a device retrying one so.
  world.Start();
  CHECK(world.Round(1).state == RoundState::kAborted);
  CHECK(world.Round(1).accepted == 2);
  Device a(world, "phone-0");
  a.task = task;
  const v1::Envelope retry = a.Begin(a.Payload());
  REQUIRE(retry.has_reject());
  CHECK(retry.reject().code() == v1::ABORTED);
  NextRoundCommits(world, 2);
  CHECK(LedgerKeys(world, 1) == std::set<std::string>{"phone-0/1/r1-1", "phone-1/1/r1-2"});
}

TEST_CASE("A failed ledger write refuses the upload, aborts the round, and keeps the uploads acknowledged before",
          "[server][faults]") {
  World world(3, 3);
  world.coordinator->Tick();
  Device a(world, "phone-0");
  Device b(world, "phone-1");
  REQUIRE(a.Upload());
  world.FailCommitOf("RecordAcceptedUpdates");
  CHECK_FALSE(b.Upload());
  const RoundRecord r = world.Round(1);
  CHECK(r.state == RoundState::kAborted);
  CHECK(r.abort_reason.find("ledger") != std::string::npos);
  CHECK(r.accepted == 1);
  NextRoundCommits(world, 3);
  CHECK(LedgerKeys(world, 1) == std::set<std::string>{"phone-0/1/r1-1"});
}

// N devices commit at once from N threads; returns the keys acknowledged as accepted.
std::set<std::string> CommitConcurrently(World& world, int n) {
  std::vector<std::unique_ptr<Device>> devices;
  for (int i = 0; i < n; ++i) {
    devices.push_back(std::make_unique<Device>(world, "phone-" + std::to_string(i)));
    devices.back()->CheckIn();
    devices.back()->Send();
  }
  std::mutex mu;
  std::set<std::string> acknowledged;
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (auto& d : devices) {
    threads.emplace_back([&, device = d.get()] {
      ++ready;
      while (ready.load() < n) std::this_thread::yield();  // start together, so commits queue up
      if (device->Commit()) {
        std::lock_guard<std::mutex> lock(mu);
        acknowledged.insert(device->Key());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  return acknowledged;
}

TEST_CASE("Concurrent upload commits are all recorded and counted once, and the round commits", "[server][faults]") {
  constexpr int kDevices = 8;
  World world(kDevices, kDevices);
  world.coordinator->Tick();
  const std::set<std::string> acknowledged = CommitConcurrently(world, kDevices);
  CHECK(acknowledged.size() == kDevices);
  CHECK(world.Round(1).state == RoundState::kCommitted);
  CHECK(world.Round(1).accepted == kDevices);
  CHECK(world.coordinator->global_version() == 1);
  CHECK(LedgerKeys(world, 1) == acknowledged);
}

TEST_CASE("When a group commit fails, exactly the acknowledged uploads are in the ledger", "[server][faults]") {
  constexpr int kDevices = 8;
  World world(kDevices, kDevices);
  world.coordinator->Tick();
  world.FailCommitOf("RecordAcceptedUpdates", /*after=*/1);  // the second transaction, whatever its batch
  const std::set<std::string> acknowledged = CommitConcurrently(world, kDevices);
  CHECK(acknowledged.size() < kDevices);
  const RoundRecord r = world.Round(1);
  CHECK(r.state == RoundState::kAborted);
  CHECK(r.accepted == static_cast<int64_t>(acknowledged.size()));
  CHECK(LedgerKeys(world, 1) == acknowledged);
}

// The tests below hold a transaction's COMMIT (with the store's own lock, which serializes its one SQLite
// connection) and meanwhile send requests that need only the coordinator's state: with the coordinator's lock
// held across that I/O they would never return, and the test would hang.

v1::Envelope DownloadAdapter(Device& d, uint64_t version) {
  v1::Envelope e;
  e.mutable_download()->set_what(v1::Download::ADAPTER);
  e.mutable_download()->set_version(version);
  return d.Call(e);
}

TEST_CASE("While an upload's ledger entry is being written, other requests are served", "[server][faults]") {
  World world(2, 2);
  world.coordinator->Tick();
  Device a(world, "phone-0");
  Device b(world, "phone-1");
  a.CheckIn();
  a.Send();
  b.CheckIn();
  const std::string payload = b.Payload();
  REQUIRE(b.Begin(payload).has_upload_ack());
  world.Hold("RecordAcceptedUpdates");
  bool acknowledged = false;
  std::thread commit([&] { acknowledged = a.Commit(); });
  world.WaitUntilHeld();
  // Answered while a's entry is not yet durable.
  CHECK(DownloadAdapter(b, 0).download_reply().total_bytes() > 0);
  v1::Envelope chunk;
  chunk.mutable_upload_chunk()->set_idempotency_key(b.Key());
  chunk.mutable_upload_chunk()->set_offset(0);
  chunk.mutable_upload_chunk()->set_data(payload);
  CHECK(b.Call(chunk).upload_ack().received_bytes() == payload.size());
  world.Release();
  commit.join();
  CHECK(acknowledged);
  CHECK(world.Round(1).accepted == 1);
}

TEST_CASE("A commit retried on a new connection while the first one's ledger write is queued is acknowledged",
          "[server][faults]") {
  World world(3, 2);
  world.coordinator->Tick();
  Device a(world, "phone-0");
  Device b(world, "phone-1");
  Device retry(world, "phone-0");  // a's second connection (Hello needs the store, so before the hold)
  a.CheckIn();
  b.CheckIn();
  retry.task = a.task;
  a.Send();
  b.Send();
  world.Hold("RecordAcceptedUpdates");
  bool b_acknowledged = false, first = false, second = false;
  std::thread b_commit([&] { b_acknowledged = b.Commit(); });
  world.WaitUntilHeld();                              // b's write leads and is held
  std::thread a_commit([&] { first = a.Commit(); });  // queued behind it
  // Scheduling only, not a timed assertion: give a's commit time to queue, so that the retry below finds
  // neither an upload nor (yet) a ledger entry under its key; the fix makes it wait for the queue instead.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::thread again([&] { second = retry.Commit(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  world.Release();
  b_commit.join();
  a_commit.join();
  again.join();
  CHECK(b_acknowledged);
  CHECK(first);
  CHECK(second);
  CHECK(world.Round(1).accepted == 2);
}

TEST_CASE("While a round commits, requests see it closed and Tick starts no second commit", "[server][faults]") {
  World world(2, 2);
  world.coordinator->Tick();
  Device a(world, "phone-0");
  Device b(world, "phone-1");
  REQUIRE(a.Upload());
  b.CheckIn();
  b.Send();
  world.Hold("CommitRound");
  bool acknowledged = false;
  std::thread last([&] { acknowledged = b.Commit(); });  // reaches the target: the round's end starts
  world.WaitUntilHeld();
  v1::Envelope check_in;
  check_in.mutable_check_in()->mutable_conditions()->set_charging(true);
  const v1::Envelope retry = a.Call(check_in);
  REQUIRE(retry.check_in_reply().has_retry_after());
  CHECK(retry.check_in_reply().retry_after().reason() == "no open round");
  CHECK(DownloadAdapter(a, 0).download_reply().version() == 0);  // the old model until the commit is durable
  // Past the deadline, a tick must leave the round to the commit in progress (not abort or finish it again).
  world.clock.Advance(int64_t{world.config.round_deadline_s} * 1000 + 1);
  world.coordinator->Tick();
  world.Release();
  last.join();
  CHECK(acknowledged);
  const RoundRecord r = world.Round(1);
  CHECK(r.state == RoundState::kCommitted);
  CHECK(r.result_version == 1);
  CHECK(world.coordinator->global_version() == 1);
  world.coordinator->Shutdown();  // nothing left to abort
  CHECK(world.Round(1).state == RoundState::kCommitted);
}

}  // namespace
}  // namespace seedling::server
