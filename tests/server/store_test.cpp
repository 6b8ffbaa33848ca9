#include "server/store.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/file.h"
#include "base/strings.h"
#include "model/safetensors.h"
#include "tests/fault_file_system.h"

namespace seedling::server {
namespace {

namespace fs = std::filesystem;

// ---- helpers

// A fresh directory per test, removed at the end.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "seedling_store_test_XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

#define REQUIRE_OK(expr)             \
  do {                               \
    const absl::Status _st = (expr); \
    INFO(_st.ToString());            \
    REQUIRE(_st.ok());               \
  } while (0)

template <typename T>
T Value(absl::StatusOr<T> v) {
  INFO(v.status().ToString());
  REQUIRE(v.ok());
  return *std::move(v);
}

std::unique_ptr<Store> OpenStore(const std::string& dir) { return Value(Store::Open(dir)); }

// A well-formed token hash, different per seed.
std::string FakeSha(int seed) {
  std::string s(64, '0');
  const std::string n = std::to_string(seed);
  s.replace(64 - n.size(), n.size(), n);
  return s;
}

DeviceRecord Device(const std::string& id, int64_t now = 100) {
  DeviceRecord d;
  d.device_id = id;
  d.token_sha256 = FakeSha(static_cast<int>(std::hash<std::string>()(id) % 100000));
  d.created_ms = now;
  d.last_seen_ms = now;
  return d;
}

RoundRecord Fields(uint64_t base_version = 0, int64_t now = 1000) {
  RoundRecord r;
  r.method = "lora-bp";
  r.config_json = R"({"steps":10})";
  r.base_version = base_version;
  r.target = 3;
  r.min_reports = 2;
  r.opened_ms = now;
  r.deadline_ms = now + 60000;
  return r;
}

TaskRecord Task(const std::string& task_id, uint64_t round_id, const std::string& device_id) {
  TaskRecord t;
  t.task_id = task_id;
  t.round_id = round_id;
  t.device_id = device_id;
  t.assigned_ms = 2000;
  return t;
}

LedgerEntry Entry(const std::string& key, uint64_t round_id, const std::string& task_id, const std::string& device_id) {
  LedgerEntry e;
  e.idempotency_key = key;
  e.round_id = round_id;
  e.task_id = task_id;
  e.device_id = device_id;
  e.num_examples = 17;
  e.bytes = 4096;
  e.sha256 = FakeSha(7);
  e.accepted_ms = 3000;
  e.metrics_json = R"({"loss_end":1.5})";
  return e;
}

// Deterministic contents for version `version`.
std::vector<NamedVector> Vectors(uint64_t version, size_t n = 64) {
  NamedVector params{"params", std::vector<float>(n)};
  for (size_t i = 0; i < n; ++i) params.values[i] = static_cast<float>(version) + 0.001f * static_cast<float>(i);
  NamedVector moment{"adam.m", {static_cast<float>(version), -1.0f}};
  return {params, moment};
}

bool SameVectors(const std::vector<NamedVector>& a, const std::vector<NamedVector>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].values != b[i].values) return false;
  }
  return true;
}

// Creates a round (with one device, task and accepted update) and moves it to Aggregating.
uint64_t AggregatingRound(Store& store, const std::string& tag, uint64_t base_version = 0) {
  const uint64_t id = Value(store.CreateRound(Fields(base_version))).round_id;
  REQUIRE_OK(store.AddDevice(Device("dev-" + tag)));
  REQUIRE_OK(store.AddTask(Task("task-" + tag, id, "dev-" + tag)));
  REQUIRE_OK(store.SetRoundState(id, RoundState::kCollecting, 1500));
  REQUIRE_OK(store.RecordAcceptedUpdate(Entry("key-" + tag, id, "task-" + tag, "dev-" + tag)));
  REQUIRE_OK(store.SetRoundState(id, RoundState::kAggregating, 4000));
  return id;
}

// Writes checkpoint `version` and commits `round_id` with it.
void Commit(Store& store, uint64_t round_id, uint64_t version, const std::string& seed_blob = "") {
  Value(store.WriteCheckpoint(version, Vectors(version)));
  REQUIRE_OK(store.CommitRound(round_id, version, 5000, R"({"loss":1})", seed_blob));
}

std::set<std::string> ListDir(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

std::string CheckpointsDir(const std::string& dir) { return JoinPath(dir, "checkpoints"); }
std::string CheckpointFile(const std::string& dir, uint64_t v) {
  return JoinPath(CheckpointsDir(dir), StrCat("global-", v, ".safetensors"));
}

// Runs SQL on state.db behind the Store's back (the Store must be closed).
void RawSql(const std::string& dir, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(JoinPath(dir, "state.db").c_str(), &db) == SQLITE_OK);
  char* err = nullptr;
  const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
  INFO((err != nullptr ? err : ""));
  sqlite3_free(err);
  sqlite3_close(db);
  REQUIRE(rc == SQLITE_OK);
}

// ---- devices

TEST_CASE("AddDevice stores a device that FindDevice returns and refuses a duplicate id", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  CHECK_FALSE(Value(store->FindDevice("phone-1")).has_value());
  const DeviceRecord d = Device("phone-1", 123);
  REQUIRE_OK(store->AddDevice(d));
  const std::optional<DeviceRecord> got = Value(store->FindDevice("phone-1"));
  REQUIRE(got.has_value());
  CHECK(got->device_id == "phone-1");
  CHECK(got->token_sha256 == d.token_sha256);
  CHECK(got->created_ms == 123);

  const std::string before = Value(store->Checksum());
  const absl::Status dup = store->AddDevice(Device("phone-1", 999));
  CHECK(dup.code() == absl::StatusCode::kAlreadyExists);
  CHECK(std::string(dup.message()).find("phone-1") != std::string::npos);
  CHECK(Value(store->Checksum()) == before);
  CHECK(Value(store->FindDevice("phone-1"))->created_ms == 123);
}

TEST_CASE("AddDevice refuses a token hash that is not 64 hex digits", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  DeviceRecord d = Device("phone-1");
  d.token_sha256 = "raw-bearer-token";
  const absl::Status st = store->AddDevice(d);
  CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(st.message()).find("raw-bearer-token") == std::string::npos);  // never echo a secret
  CHECK_FALSE(Value(store->FindDevice("phone-1")).has_value());
}

TEST_CASE("RevokeDevice revokes once, keeps the first time, and reports an unknown device", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  REQUIRE_OK(store->AddDevice(Device("phone-1", 1)));
  REQUIRE_OK(store->AddDevice(Device("phone-2", 1)));
  CHECK(Value(store->FindDevice("phone-1"))->revoked_ms == 0);
  REQUIRE_OK(store->RevokeDevice("phone-1", 500));
  REQUIRE_OK(store->RevokeDevice("phone-1", 900));  // idempotent
  CHECK(Value(store->FindDevice("phone-1"))->revoked_ms == 500);
  CHECK(Value(store->FindDevice("phone-2"))->revoked_ms == 0);
  const std::string before = Value(store->Checksum());
  const absl::Status unknown = store->RevokeDevice("phone-9", 1000);
  CHECK(unknown.code() == absl::StatusCode::kNotFound);
  CHECK(std::string(unknown.message()).find("phone-9") != std::string::npos);
  CHECK(Value(store->Checksum()) == before);
  // Durable, and the id stays taken.
  store.reset();
  store = OpenStore(dir.path());
  CHECK(Value(store->FindDevice("phone-1"))->revoked_ms == 500);
  CHECK(store->AddDevice(Device("phone-1", 2)).code() == absl::StatusCode::kAlreadyExists);
}

TEST_CASE("A version-2 state database gains the revocation column and keeps its devices active", "[server][store]") {
  TempDir dir;
  {
    auto store = OpenStore(dir.path());
    REQUIRE_OK(store->AddDevice(Device("phone-1", 7)));
  }
  // What a build before device revocation left behind.
  RawSql(dir.path(), "ALTER TABLE devices DROP COLUMN revoked_ms; UPDATE schema_version SET version = 2");
  auto store = OpenStore(dir.path());
  const std::optional<DeviceRecord> d = Value(store->FindDevice("phone-1"));
  REQUIRE(d.has_value());
  CHECK(d->created_ms == 7);
  CHECK(d->revoked_ms == 0);
  REQUIRE_OK(store->RevokeDevice("phone-1", 10));
}

TEST_CASE("TouchDevice updates last_seen and reports an unknown device", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  REQUIRE_OK(store->AddDevice(Device("b")));
  REQUIRE_OK(store->AddDevice(Device("a")));
  REQUIRE_OK(store->TouchDevice("b", 777));
  CHECK(Value(store->FindDevice("b"))->last_seen_ms == 777);
  CHECK(store->TouchDevice("nobody", 1).code() == absl::StatusCode::kNotFound);
  const std::vector<DeviceRecord> all = Value(store->ListDevices());
  REQUIRE(all.size() == 2);
  CHECK(all[0].device_id == "a");
  CHECK(all[1].device_id == "b");
}

// ---- rounds

TEST_CASE("CreateRound gives increasing ids that keep increasing after reopening", "[server][store]") {
  TempDir dir;
  {
    auto store = OpenStore(dir.path());
    const RoundRecord r1 = Value(store->CreateRound(Fields()));
    const RoundRecord r2 = Value(store->CreateRound(Fields()));
    CHECK(r1.round_id == 1);
    CHECK(r2.round_id == 2);
    CHECK(r1.state == RoundState::kOpen);
    CHECK(r1.method == "lora-bp");
    CHECK(r1.deadline_ms == 61000);
    const std::optional<RoundRecord> latest = Value(store->LatestRound());
    REQUIRE(latest.has_value());
    CHECK(latest->round_id == 2);
  }
  auto store = OpenStore(dir.path());
  CHECK(Value(store->CreateRound(Fields())).round_id == 3);
  const std::vector<RoundRecord> recent = Value(store->RecentRounds(2));
  REQUIRE(recent.size() == 2);
  CHECK(recent[0].round_id == 3);
  CHECK(recent[1].round_id == 2);
}

TEST_CASE("Round ids never go backwards even when round rows are deleted", "[server][store]") {
  TempDir dir;
  {
    auto store = OpenStore(dir.path());
    Value(store->CreateRound(Fields()));
    Value(store->CreateRound(Fields()));
  }
  RawSql(dir.path(), "DELETE FROM rounds");
  auto store = OpenStore(dir.path());
  CHECK(Value(store->CreateRound(Fields())).round_id == 3);
}

TEST_CASE("CreateRound refuses a base version newer than the global version", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  CHECK(store->CreateRound(Fields(/*base_version=*/1)).status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_FALSE(Value(store->LatestRound()).has_value());
}

TEST_CASE("SetRoundState moves a round from open to collecting to aggregating", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->SetRoundState(id, RoundState::kCollecting, 1100));
  CHECK(Value(store->FindRound(id))->state == RoundState::kCollecting);
  REQUIRE_OK(store->SetRoundState(id, RoundState::kAggregating, 1200));
  const RoundRecord r = *Value(store->FindRound(id));
  CHECK(r.state == RoundState::kAggregating);
  CHECK(r.state_ms == 1200);
}

TEST_CASE("SetRoundState refuses skipped, backward and final transitions and names both states", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  const std::string before = Value(store->Checksum());

  const absl::Status skip = store->SetRoundState(id, RoundState::kAggregating, 1);
  CHECK(skip.code() == absl::StatusCode::kFailedPrecondition);
  const std::string msg(skip.message());
  CHECK(msg.find("open") != std::string::npos);
  CHECK(msg.find("aggregating") != std::string::npos);
  CHECK(msg.find(std::to_string(id)) != std::string::npos);

  CHECK(store->SetRoundState(id, RoundState::kOpen, 1).code() == absl::StatusCode::kFailedPrecondition);
  CHECK(store->SetRoundState(id, RoundState::kCommitted, 1).code() == absl::StatusCode::kFailedPrecondition);
  CHECK(store->SetRoundState(id, RoundState::kAborted, 1).code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE_OK(store->SetRoundState(id, RoundState::kCollecting, 2));
  CHECK(store->SetRoundState(id, RoundState::kOpen, 3).code() == absl::StatusCode::kFailedPrecondition);
  CHECK(store->SetRoundState(id, RoundState::kCollecting, 3).code() == absl::StatusCode::kFailedPrecondition);
  CHECK(store->SetRoundState(999, RoundState::kCollecting, 3).code() == absl::StatusCode::kNotFound);
  REQUIRE_OK(store->AbortRound(id, 4, "test"));
  CHECK(store->SetRoundState(id, RoundState::kCollecting, 5).code() == absl::StatusCode::kFailedPrecondition);
  CHECK(Value(store->Checksum()) != before);  // the successful calls did change something
  CHECK(Value(store->FindRound(id))->state == RoundState::kAborted);
}

TEST_CASE("AbortRound aborts any non-final round and refuses a final one", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t open = Value(store->CreateRound(Fields())).round_id;
  const uint64_t collecting = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->SetRoundState(collecting, RoundState::kCollecting, 1));
  const uint64_t aggregating = AggregatingRound(*store, "x");
  for (uint64_t id : {open, collecting, aggregating}) {
    REQUIRE_OK(store->AbortRound(id, 8000, "too few reports"));
    const RoundRecord r = *Value(store->FindRound(id));
    CHECK(r.state == RoundState::kAborted);
    CHECK(r.closed_ms == 8000);
    CHECK(r.abort_reason == "too few reports");
  }
  const std::string before = Value(store->Checksum());
  CHECK(store->AbortRound(open, 9000, "again").code() == absl::StatusCode::kFailedPrecondition);
  CHECK(store->AbortRound(12345, 9000, "none").code() == absl::StatusCode::kNotFound);
  CHECK(Value(store->Checksum()) == before);
}

TEST_CASE("CommitRound increments the global version and makes the checkpoint current", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  CHECK(Value(store->GlobalVersion()) == 0);
  const uint64_t id = AggregatingRound(*store, "a");
  const std::string sha = Value(store->WriteCheckpoint(1, Vectors(1)));
  CHECK(Value(store->GlobalVersion()) == 0);  // written, not yet current
  CHECK_FALSE(Value(store->FindCheckpoint(1)).has_value());
  REQUIRE_OK(store->CommitRound(id, 1, 5000, R"({"loss":0.5})"));

  CHECK(Value(store->GlobalVersion()) == 1);
  const RoundRecord r = *Value(store->FindRound(id));
  CHECK(r.state == RoundState::kCommitted);
  CHECK(r.result_version == 1);
  CHECK(r.closed_ms == 5000);
  CHECK(r.result_json == R"({"loss":0.5})");
  const std::optional<CheckpointRecord> ck = Value(store->FindCheckpoint(1));
  REQUIRE(ck.has_value());
  CHECK(ck->sha256 == sha);
  CHECK(ck->path == CheckpointFile(dir.path(), 1));
  CHECK(SameVectors(Value(store->ReadCheckpoint(1)), Vectors(1)));

  // The next round builds on it.
  const uint64_t id2 = AggregatingRound(*store, "b", /*base_version=*/1);
  Commit(*store, id2, 2);
  CHECK(Value(store->GlobalVersion()) == 2);
}

TEST_CASE("CommitRound with a wrong version fails and changes nothing", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = AggregatingRound(*store, "a");
  Value(store->WriteCheckpoint(1, Vectors(1)));
  // Files exist for the wrong versions too, so only the version check can refuse them.
  for (uint64_t v : {0, 2, 7}) fs::copy_file(CheckpointFile(dir.path(), 1), CheckpointFile(dir.path(), v));
  const std::string before = Value(store->Checksum());
  for (uint64_t bad : {0, 2, 7}) {
    const absl::Status st = store->CommitRound(id, bad, 5000, "{}");
    CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
    CHECK(std::string(st.message()).find(StrCat("round ", id)) != std::string::npos);
    CHECK(std::string(st.message()).find("global version is 0") != std::string::npos);
  }
  CHECK(Value(store->Checksum()) == before);
  CHECK(Value(store->GlobalVersion()) == 0);
  CHECK(Value(store->FindRound(id))->state == RoundState::kAggregating);
  REQUIRE_OK(store->CommitRound(id, 1, 5000, "{}"));  // the right one still works
}

TEST_CASE("CommitRound without a checkpoint file fails and changes nothing", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = AggregatingRound(*store, "a");
  const std::string before = Value(store->Checksum());
  const absl::Status st = store->CommitRound(id, 1, 5000, "{}", "seed-sums");
  CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(st.message()).find("global-1.safetensors") != std::string::npos);
  CHECK(Value(store->Checksum()) == before);
  CHECK(Value(store->SeedSumsSince(0)).empty());
}

TEST_CASE("CommitRound requires the round to be aggregating", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->SetRoundState(id, RoundState::kCollecting, 1));
  Value(store->WriteCheckpoint(1, Vectors(1)));
  const std::string before = Value(store->Checksum());
  const absl::Status st = store->CommitRound(id, 1, 5000, "{}");
  CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(st.message()).find("collecting") != std::string::npos);
  CHECK(std::string(st.message()).find("committed") != std::string::npos);
  CHECK(Value(store->Checksum()) == before);
}

// ---- tasks and ledger

TEST_CASE("AddTask counts the selection and refuses a second task for the device in that round", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->AddTask(Task("t1", id, "dev")));
  CHECK(Value(store->FindRound(id))->selected == 1);
  const std::optional<TaskRecord> t = Value(store->FindTaskFor(id, "dev"));
  REQUIRE(t.has_value());
  CHECK(t->task_id == "t1");
  CHECK(t->state == "assigned");
  const std::string before = Value(store->Checksum());
  CHECK(store->AddTask(Task("t2", id, "dev")).code() == absl::StatusCode::kAlreadyExists);
  CHECK(store->AddTask(Task("t1", id, "other")).code() == absl::StatusCode::kAlreadyExists);
  CHECK(store->AddTask(Task("t3", 99, "dev")).code() == absl::StatusCode::kNotFound);
  CHECK(Value(store->Checksum()) == before);
  REQUIRE_OK(store->IncrementSelected(id));
  CHECK(Value(store->FindRound(id))->selected == 2);
}

TEST_CASE("SetTaskState declines a task but cannot fake or undo an upload", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->AddTask(Task("t1", id, "d1")));
  REQUIRE_OK(store->AddTask(Task("t2", id, "d2")));
  REQUIRE_OK(store->SetTaskState("t1", "declined", "low battery"));
  const TaskRecord t1 = *Value(store->FindTask("t1"));
  CHECK(t1.state == "declined");
  CHECK(t1.detail == "low battery");
  CHECK(store->SetTaskState("t2", "uploaded").code() == absl::StatusCode::kFailedPrecondition);
  CHECK(store->SetTaskState("t2", "bogus").code() == absl::StatusCode::kInvalidArgument);
  CHECK(store->SetTaskState("nope", "declined").code() == absl::StatusCode::kNotFound);
  REQUIRE_OK(store->RecordAcceptedUpdate(Entry("k2", id, "t2", "d2")));
  REQUIRE_OK(store->SetTaskState("t2", "uploaded"));  // idempotent
  CHECK(store->SetTaskState("t2", "declined").code() == absl::StatusCode::kFailedPrecondition);
  CHECK(Value(store->FindTask("t2"))->state == "uploaded");
}

TEST_CASE("RecordAcceptedUpdate records the entry, marks the task uploaded and counts it", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->AddTask(Task("t1", id, "d1")));
  REQUIRE_OK(store->AddTask(Task("t2", id, "d2")));
  REQUIRE_OK(store->SetRoundState(id, RoundState::kCollecting, 1));
  REQUIRE_OK(store->RecordAcceptedUpdate(Entry("k2", id, "t2", "d2")));
  REQUIRE_OK(store->RecordAcceptedUpdate(Entry("k1", id, "t1", "d1")));

  const std::optional<LedgerEntry> e = Value(store->FindLedgerEntry("k1"));
  REQUIRE(e.has_value());
  CHECK(e->round_id == id);
  CHECK(e->task_id == "t1");
  CHECK(e->device_id == "d1");
  CHECK(e->num_examples == 17);
  CHECK(e->bytes == 4096);
  CHECK(e->metrics_json == R"({"loss_end":1.5})");
  CHECK(Value(store->FindTask("t1"))->state == "uploaded");
  CHECK(Value(store->FindRound(id))->accepted == 2);
  const std::vector<LedgerEntry> ledger = Value(store->LedgerForRound(id));
  REQUIRE(ledger.size() == 2);
  CHECK(ledger[0].idempotency_key == "k2");  // in the order recorded
  CHECK(ledger[1].idempotency_key == "k1");
  CHECK_FALSE(Value(store->FindLedgerEntry("k3")).has_value());
}

TEST_CASE("RecordAcceptedUpdate refuses a duplicate key and changes nothing", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->AddTask(Task("t1", id, "d1")));
  REQUIRE_OK(store->RecordAcceptedUpdate(Entry("k1", id, "t1", "d1")));
  const std::string before = Value(store->Checksum());
  LedgerEntry again = Entry("k1", id, "t1", "d1");
  again.num_examples = 99;
  const absl::Status st = store->RecordAcceptedUpdate(again);
  CHECK(st.code() == absl::StatusCode::kAlreadyExists);
  CHECK(std::string(st.message()).find("k1") != std::string::npos);
  // Another key for a task that already uploaded would count the device twice.
  CHECK(store->RecordAcceptedUpdate(Entry("k1-bis", id, "t1", "d1")).code() == absl::StatusCode::kAlreadyExists);
  CHECK(Value(store->Checksum()) == before);
  CHECK(Value(store->FindRound(id))->accepted == 1);
  CHECK(Value(store->FindLedgerEntry("k1"))->num_examples == 17);
}

TEST_CASE("RecordAcceptedUpdate refuses unknown tasks, mismatched entries and final rounds", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->AddTask(Task("t1", id, "d1")));
  REQUIRE_OK(store->AddTask(Task("t2", id, "d2")));
  REQUIRE_OK(store->AbortRound(id, 10, "deadline"));
  const std::string before = Value(store->Checksum());
  CHECK(store->RecordAcceptedUpdate(Entry("k", id, "missing", "d1")).code() == absl::StatusCode::kNotFound);
  CHECK(store->RecordAcceptedUpdate(Entry("k", id, "t1", "d2")).code() == absl::StatusCode::kInvalidArgument);
  CHECK(store->RecordAcceptedUpdate(Entry("k", id + 1, "t1", "d1")).code() == absl::StatusCode::kInvalidArgument);
  const absl::Status final_round = store->RecordAcceptedUpdate(Entry("k", id, "t1", "d1"));
  CHECK(final_round.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(final_round.message()).find("aborted") != std::string::npos);
  CHECK(Value(store->Checksum()) == before);
}

// Every COMMIT the store runs: its transaction and the connection's synchronous setting then.
struct CommitLog {
  std::mutex mu;
  std::vector<std::pair<std::string, int>> commits;
  std::string fail;  // a transaction to fail, once
  StoreOptions Options() {
    StoreOptions o;
    o.before_commit = [this](std::string_view transaction, int synchronous) -> absl::Status {
      std::lock_guard<std::mutex> lock(mu);
      commits.emplace_back(std::string(transaction), synchronous);
      if (!fail.empty() && transaction == fail) {
        fail.clear();
        return absl::InternalError("injected COMMIT failure");
      }
      return absl::OkStatus();
    };
    return o;
  }
};

TEST_CASE("RecordAcceptedUpdates writes a batch in one transaction and refuses only the bad entries",
          "[server][store]") {
  TempDir dir;
  CommitLog log;
  auto store = Value(Store::Open(dir.path(), log.Options()));
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->AddTask(Task("t1", id, "d1")));
  REQUIRE_OK(store->AddTask(Task("t2", id, "d2")));
  log.commits.clear();
  const std::vector<LedgerEntry> batch = {Entry("k1", id, "t1", "d1"), Entry("k1", id, "t1", "d1"),
                                          Entry("", id, "t2", "d2"), Entry("k2", id, "t2", "d2")};
  const std::vector<absl::Status> results = store->RecordAcceptedUpdates(batch);
  REQUIRE(results.size() == 4);
  CHECK(results[0].ok());
  CHECK(results[1].code() == absl::StatusCode::kAlreadyExists);
  CHECK(results[2].code() == absl::StatusCode::kInvalidArgument);
  CHECK(results[3].ok());
  REQUIRE(log.commits.size() == 1);
  CHECK(log.commits[0].first == "RecordAcceptedUpdates");
  CHECK(Value(store->FindRound(id))->accepted == 2);
  const std::vector<LedgerEntry> ledger = Value(store->LedgerForRound(id));
  REQUIRE(ledger.size() == 2);
  CHECK(ledger[0].idempotency_key == "k1");
  CHECK(ledger[1].idempotency_key == "k2");
}

TEST_CASE("A failed COMMIT of RecordAcceptedUpdates records nothing of its batch", "[server][store]") {
  TempDir dir;
  CommitLog log;
  auto store = Value(Store::Open(dir.path(), log.Options()));
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->AddTask(Task("t1", id, "d1")));
  REQUIRE_OK(store->AddTask(Task("t2", id, "d2")));
  const std::string before = Value(store->Checksum());
  log.fail = "RecordAcceptedUpdates";
  const std::vector<absl::Status> results =
      store->RecordAcceptedUpdates(std::vector<LedgerEntry>{Entry("k1", id, "t1", "d1"), Entry("k2", id, "t2", "d2")});
  REQUIRE(results.size() == 2);
  CHECK(results[0].code() == absl::StatusCode::kInternal);
  CHECK(results[1].code() == absl::StatusCode::kInternal);
  CHECK(Value(store->Checksum()) == before);
  // The store is usable afterwards: the same entries go in.
  CHECK(store->RecordAcceptedUpdate(Entry("k1", id, "t1", "d1")).ok());
  CHECK(Value(store->FindRound(id))->accepted == 1);
}

TEST_CASE("After a lazy write the next write commits with synchronous FULL again", "[server][store]") {
  TempDir dir;
  CommitLog log;
  auto store = Value(Store::Open(dir.path(), log.Options()));
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->AddDevice(Device("d1")));
  log.commits.clear();
  REQUIRE_OK(store->TouchDevice("d1", 500));
  REQUIRE_OK(store->AddDevice(Device("d2")));
  REQUIRE_OK(store->AddTask(Task("t1", id, "d1")));
  REQUIRE_OK(store->RecordAcceptedUpdate(Entry("k1", id, "t1", "d1")));
  // A lazy write that fails still restores FULL for the next one.
  CHECK(store->AddTask(Task("t1", id, "d1")).code() == absl::StatusCode::kAlreadyExists);
  REQUIRE_OK(store->SetRoundState(id, RoundState::kCollecting, 600));
  const std::vector<std::pair<std::string, int>> expected = {
      {"TouchDevice", 1}, {"AddDevice", 2}, {"AddTask", 1}, {"RecordAcceptedUpdates", 2}, {"SetRoundState", 2}};
  CHECK(log.commits == expected);
}

TEST_CASE("A failed checkpoint write, fsync or rename leaves no checkpoint and a usable store", "[server][store]") {
  using Op = testing::FaultFileSystem::Op;
  for (Op op : {Op::kWrite, Op::kSync, Op::kRename}) {
    TempDir dir;
    testing::FaultFileSystem files;
    StoreOptions options;
    options.fs = &files;
    auto store = Value(Store::Open(dir.path(), options));
    const uint64_t id = AggregatingRound(*store, "a");
    files.FailNext(op, "global-1.safetensors");
    CHECK_FALSE(store->WriteCheckpoint(1, Vectors(1)).ok());
    CHECK(files.injected() == 1);
    CHECK(ListDir(CheckpointsDir(dir.path())).empty());  // neither the file nor its temporary
    CHECK(store->CommitRound(id, 1, 5000, "{}").code() == absl::StatusCode::kFailedPrecondition);
    CHECK(Value(store->GlobalVersion()) == 0);
    Commit(*store, id, 1);
    CHECK(Value(store->GlobalVersion()) == 1);
    CHECK(SameVectors(Value(store->ReadCheckpoint(1)), Vectors(1)));
  }
}

TEST_CASE("AbortRound keeps the round's ledger entries", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  REQUIRE_OK(store->AddTask(Task("t1", id, "d1")));
  REQUIRE_OK(store->RecordAcceptedUpdate(Entry("k1", id, "t1", "d1")));
  REQUIRE_OK(store->AbortRound(id, 10, "deadline"));
  CHECK(Value(store->FindLedgerEntry("k1")).has_value());
  CHECK(Value(store->LedgerForRound(id)).size() == 1);
  const RoundRecord r = *Value(store->FindRound(id));
  CHECK(r.state == RoundState::kAborted);
  CHECK(r.accepted == 1);
}

TEST_CASE("SeedSumsSince returns the sums of later committed versions in ascending order", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const std::string blob1("sums\0one", 8);  // binary-safe
  Commit(*store, AggregatingRound(*store, "a"), 1, blob1);
  Commit(*store, AggregatingRound(*store, "b", 1), 2);  // a round without seed sums
  Commit(*store, AggregatingRound(*store, "c", 2), 3, "sums-three");
  const auto all = Value(store->SeedSumsSince(0));
  REQUIRE(all.size() == 2);
  CHECK(all[0].first == 1);
  CHECK(all[0].second == blob1);
  CHECK(all[1].first == 3);
  CHECK(all[1].second == "sums-three");
  const auto later = Value(store->SeedSumsSince(1));
  REQUIRE(later.size() == 1);
  CHECK(later[0].first == 3);
  CHECK(Value(store->SeedSumsSince(3)).empty());
}

// ---- opening

TEST_CASE("Open refuses a database with a newer schema version", "[server][store]") {
  TempDir dir;
  { OpenStore(dir.path()); }
  RawSql(dir.path(), "UPDATE schema_version SET version = 99");
  const auto st = Store::Open(dir.path());
  CHECK(st.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(st.status().message()).find("99") != std::string::npos);
  CHECK(std::string(st.status().message()).find("state.db") != std::string::npos);
}

TEST_CASE("Open refuses a SQLite database that is not a Seedling state database", "[server][store]") {
  TempDir dir;
  RawSql(dir.path(), "CREATE TABLE users (name TEXT)");
  CHECK(Store::Open(dir.path()).status().code() == absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("Open reports a state database that is not SQLite as DataLoss and names the file", "[server][store]") {
  TempDir dir;
  REQUIRE_OK(WriteFileAtomic(JoinPath(dir.path(), "state.db"), std::string(8192, 'x')));
  const auto st = Store::Open(dir.path());
  CHECK(st.status().code() == absl::StatusCode::kDataLoss);
  CHECK(std::string(st.status().message()).find("state.db") != std::string::npos);
}

TEST_CASE("Open refuses a second Store on the same directory", "[server][store]") {
  TempDir dir;
  auto first = OpenStore(dir.path());
  CHECK(Store::Open(dir.path()).status().code() == absl::StatusCode::kFailedPrecondition);
  first.reset();
  CHECK(Store::Open(dir.path()).ok());
}

TEST_CASE("OpenForDevices beside a running Store registers devices the owner sees, and nothing else",
          "[server][store]") {
  TempDir dir;
  auto owner = OpenStore(dir.path());
  REQUIRE_OK(owner->AddDevice(Device("phone-1", 1)));
  auto registry = Value(Store::OpenForDevices(dir.path()));
  REQUIRE_OK(registry->AddDevice(Device("phone-2", 2)));
  const std::optional<DeviceRecord> seen = Value(owner->FindDevice("phone-2"));  // no reopen needed
  REQUIRE(seen.has_value());
  CHECK(seen->created_ms == 2);
  CHECK(Value(registry->ListDevices()).size() == 2);
  CHECK(registry->AddDevice(Device("phone-1", 3)).code() == absl::StatusCode::kAlreadyExists);
  // The methods that touch checkpoint files belong to the owner.
  const std::string before = Value(owner->Checksum());
  CHECK(registry->RecoverAfterCrash(10, "test").status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(registry->WriteCheckpoint(1, Vectors(1)).status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(registry->CommitRound(1, 1, 10, "{}", "", std::nullopt).code() == absl::StatusCode::kFailedPrecondition);
  CHECK(Value(owner->Checksum()) == before);
  // It never makes a second owner.
  CHECK(Store::Open(dir.path()).status().code() == absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("OpenForDevices owns a directory nobody holds, and refuses a live database of another schema",
          "[server][store]") {
  TempDir fresh;
  {
    auto store = Value(Store::OpenForDevices(fresh.path()));  // creates it, as Open does
    REQUIRE_OK(store->AddDevice(Device("phone-1", 1)));
    CHECK(store->RecoverAfterCrash(10, "test").ok());
    CHECK(Store::Open(fresh.path()).status().code() == absl::StatusCode::kFailedPrecondition);
  }
  CHECK(Value(OpenStore(fresh.path())->FindDevice("phone-1")).has_value());

  TempDir old;
  auto owner = OpenStore(old.path());
  RawSql(old.path(), "UPDATE schema_version SET version = 1");  // as if the server were an older build
  const auto st = Store::OpenForDevices(old.path());
  CHECK(st.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(st.status().message()).find("schema version 1") != std::string::npos);
}

TEST_CASE("The state database is in WAL mode and survives reopening unchanged", "[server][store]") {
  TempDir dir;
  std::string sum;
  {
    auto store = OpenStore(dir.path());
    REQUIRE_OK(store->AddDevice(Device("d")));
    sum = Value(store->Checksum());
  }
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(JoinPath(dir.path(), "state.db").c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &stmt, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  const std::string mode = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  CHECK(mode == "wal");
  auto store = OpenStore(dir.path());
  CHECK(Value(store->Checksum()) == sum);
}

TEST_CASE("Checksum changes when any durable field changes", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  REQUIRE_OK(store->AddDevice(Device("d")));
  const std::string a = Value(store->Checksum());
  CHECK(Value(store->Checksum()) == a);
  REQUIRE_OK(store->TouchDevice("d", 101));
  const std::string b = Value(store->Checksum());
  CHECK(b != a);
  REQUIRE_OK(store->TouchDevice("d", 100));  // back to the original value
  CHECK(Value(store->Checksum()) == a);
}

TEST_CASE("Concurrent calls from several threads are serialized without losing updates", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t id = Value(store->CreateRound(Fields())).round_id;
  constexpr int kThreads = 3, kPerThread = 15;
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kPerThread; ++i) {
      REQUIRE_OK(store->AddTask(Task(StrCat("t", t, "-", i), id, StrCat("d", t, "-", i))));
    }
  }
  std::vector<absl::Status> failures(kThreads + 1);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread && failures[t].ok(); ++i) {
        const std::string task = StrCat("t", t, "-", i);
        failures[t] = store->RecordAcceptedUpdate(Entry("k" + task, id, task, StrCat("d", t, "-", i)));
      }
    });
  }
  // A checkpoint write runs beside them (it does not hold the database lock while writing).
  threads.emplace_back([&] { failures[kThreads] = store->WriteCheckpoint(1, Vectors(1, 1 << 18)).status(); });
  for (std::thread& th : threads) th.join();
  for (const absl::Status& st : failures) CHECK(st.ok());
  CHECK(Value(store->FindRound(id))->accepted == kThreads * kPerThread);
  CHECK(Value(store->LedgerForRound(id)).size() == size_t{kThreads * kPerThread});
  CHECK(SameVectors(Value(store->ReadCheckpoint(1)), Vectors(1, 1 << 18)));
}

// ---- checkpoints

TEST_CASE("Checkpoints keep the vectors' names, order and values", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::vector<NamedVector> vs = {{"z.first", {1.5f, -2.0f, 3.25f}}, {"a.second", {}}, {"m.third", {42.0f}}};
  Value(store->WriteCheckpoint(1, vs));
  CHECK(SameVectors(Value(store->ReadCheckpoint(1)), vs));
  CHECK(store->ReadCheckpoint(2).status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("WriteCheckpoint writes only the next version and never rewrites a recorded one", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  CHECK(store->WriteCheckpoint(2, Vectors(2)).status().code() == absl::StatusCode::kFailedPrecondition);
  // Version 0, the initial model, is recorded at once: no round commits it.
  const std::string sha0 = Value(store->WriteCheckpoint(0, Vectors(0)));
  CHECK(Value(store->FindCheckpoint(0))->sha256 == sha0);
  CHECK(store->WriteCheckpoint(0, Vectors(5)).status().code() == absl::StatusCode::kAlreadyExists);
  Value(store->WriteCheckpoint(1, Vectors(9)));
  Value(store->WriteCheckpoint(1, Vectors(1)));  // an uncommitted file may be rewritten
  Commit(*store, AggregatingRound(*store, "a"), 1);
  CHECK(store->WriteCheckpoint(1, Vectors(3)).status().code() == absl::StatusCode::kAlreadyExists);
  CHECK(SameVectors(Value(store->ReadCheckpoint(1)), Vectors(1)));
  CHECK(SameVectors(Value(store->ReadCheckpoint(0)), Vectors(0)));
  CHECK_FALSE(fs::exists(CheckpointFile(dir.path(), 2)));
}

TEST_CASE("ReadCheckpoint reports a modified committed checkpoint as DataLoss", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  Commit(*store, AggregatingRound(*store, "a"), 1);
  REQUIRE(store->ReadCheckpoint(1).ok());
  {
    // Flip one bit of the last float: the file still parses, only the hash can tell.
    std::fstream f(CheckpointFile(dir.path(), 1), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-1, std::ios::end);
    char c = 0;
    f.get(c);
    f.seekp(-1, std::ios::end);
    f.put(static_cast<char>(c ^ 1));
  }
  const auto st = store->ReadCheckpoint(1).status();
  CHECK(st.code() == absl::StatusCode::kDataLoss);
  CHECK(std::string(st.message()).find("global-1.safetensors") != std::string::npos);
}

TEST_CASE("ReadCheckpoint reports a truncated committed checkpoint as DataLoss", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  Commit(*store, AggregatingRound(*store, "a"), 1);
  const std::string path = CheckpointFile(dir.path(), 1);
  fs::resize_file(path, fs::file_size(path) - 10);
  CHECK(store->ReadCheckpoint(1).status().code() == absl::StatusCode::kDataLoss);
  fs::resize_file(path, 0);
  CHECK(store->ReadCheckpoint(1).status().code() == absl::StatusCode::kDataLoss);
  fs::remove(path);
  CHECK(store->ReadCheckpoint(1).status().code() == absl::StatusCode::kDataLoss);  // recorded but gone
}

TEST_CASE("ReadCheckpoint validates an uncommitted checkpoint without a recorded hash", "[server][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  Value(store->WriteCheckpoint(1, Vectors(1)));
  const std::string path = CheckpointFile(dir.path(), 1);
  fs::resize_file(path, fs::file_size(path) - 4);
  CHECK(store->ReadCheckpoint(1).status().code() == absl::StatusCode::kDataLoss);

  // A 2-D tensor is not a checkpoint vector.
  const std::vector<float> data(6, 1.0f);
  const model::TensorToWrite t{"params",
                               model::DType::kF32,
                               {2, 3},
                               std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()), 24)};
  REQUIRE_OK(model::WriteSafetensors(path, std::span<const model::TensorToWrite>(&t, 1)));
  const auto st = store->ReadCheckpoint(1).status();
  CHECK(st.code() == absl::StatusCode::kDataLoss);
  CHECK(std::string(st.message()).find("params") != std::string::npos);
}

// ---- recovery

TEST_CASE("RecoverAfterCrash aborts unfinished rounds and deletes orphan and temporary checkpoint files",
          "[server][store]") {
  TempDir dir;
  const std::string ckdir = CheckpointsDir(dir.path());
  uint64_t committed = 0, open = 0, aggregating = 0;
  {
    auto store = OpenStore(dir.path());
    committed = AggregatingRound(*store, "a");
    Commit(*store, committed, 1);
    open = Value(store->CreateRound(Fields(1))).round_id;
    aggregating = AggregatingRound(*store, "b", 1);
    Value(store->WriteCheckpoint(2, Vectors(2)));  // the crash came before CommitRound
  }
  REQUIRE_OK(WriteFileAtomic(JoinPath(ckdir, "global-3.safetensors.tmp.4242"), "half a file"));
  REQUIRE_OK(WriteFileAtomic(JoinPath(ckdir, "README"), "not ours"));

  auto store = OpenStore(dir.path());
  const std::vector<RoundRecord> aborted = Value(store->RecoverAfterCrash(9000, "server restarted"));
  REQUIRE(aborted.size() == 2);
  CHECK(aborted[0].round_id == open);
  CHECK(aborted[1].round_id == aggregating);
  for (const RoundRecord& r : aborted) {
    CHECK(r.state == RoundState::kAborted);
    CHECK(r.abort_reason == "server restarted");
    const RoundRecord stored = *Value(store->FindRound(r.round_id));
    CHECK(stored.state == RoundState::kAborted);
    CHECK(stored.closed_ms == 9000);
  }
  CHECK(Value(store->FindRound(committed))->state == RoundState::kCommitted);
  CHECK(Value(store->FindLedgerEntry("key-b")).has_value());  // the aborted round's update stays
  CHECK(ListDir(ckdir) == std::set<std::string>{"global-1.safetensors", "README"});
  CHECK(SameVectors(Value(store->ReadCheckpoint(1)), Vectors(1)));
  // Idempotent.
  const std::string sum = Value(store->Checksum());
  CHECK(Value(store->RecoverAfterCrash(9500, "again")).empty());
  CHECK(Value(store->Checksum()) == sum);
}

TEST_CASE("RecoverAfterCrash reports a missing current checkpoint as DataLoss", "[server][store]") {
  TempDir dir;
  {
    auto store = OpenStore(dir.path());
    Commit(*store, AggregatingRound(*store, "a"), 1);
  }
  fs::remove(CheckpointFile(dir.path(), 1));
  auto store = OpenStore(dir.path());
  CHECK(store->RecoverAfterCrash(1, "restart").status().code() == absl::StatusCode::kDataLoss);
}

// ---- crash simulation
//
// A child process runs store calls and writes one line to a pipe after each call that returned OK
// (and, for asynchronous kills, one line before each call). Pipe contents outlive the writer, so
// after the child dies the parent knows exactly which calls were acknowledged.

// Used only in the child: no Catch2 there, failures go through the pipe.
class Reporter {
 public:
  explicit Reporter(int fd) : fd_(fd) {}
  void Line(const std::string& s) {
    const std::string line = s + "\n";
    size_t off = 0;
    while (off < line.size()) {
      const ssize_t n = ::write(fd_, line.data() + off, line.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) ::_exit(4);
      off += static_cast<size_t>(n);
    }
  }
  void Must(const absl::Status& st, const std::string& what) {
    if (!st.ok()) {
      Line("ERR " + what + ": " + st.ToString());
      ::_exit(3);
    }
  }
  template <typename T>
  T Must(absl::StatusOr<T> v, const std::string& what) {
    Must(v.status(), what);
    return *std::move(v);
  }

 private:
  int fd_;
};

struct ChildRun {
  std::vector<std::string> lines;
  int wait_status = 0;
};

// When the parent kills the child: `delay` after the child reports the line `trigger`.
struct KillPlan {
  std::string trigger;
  std::chrono::microseconds delay{0};
};

// Forks a child running `body`, optionally killed by the parent as `kill` says. Returns every line
// the child wrote and how it ended.
ChildRun RunChild(const std::function<void(Reporter&)>& body, std::optional<KillPlan> kill = std::nullopt) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    Reporter reporter(fds[1]);
    body(reporter);
    ::_exit(0);  // skip atexit handlers and Catch2's teardown
  }
  ::close(fds[1]);
  ChildRun run;
  std::string buffer;
  bool killed = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  bool kill_armed = false;
  std::chrono::steady_clock::time_point kill_at{};
  while (true) {
    int timeout_ms = 1000;
    if (kill_armed && !killed) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(kill_at - std::chrono::steady_clock::now());
      timeout_ms = static_cast<int>(std::max<int64_t>(0, left.count()));
    }
    pollfd p{fds[0], POLLIN, 0};
    const int ready = ::poll(&p, 1, timeout_ms);
    if (kill_armed && !killed && std::chrono::steady_clock::now() >= kill_at) {
      ::kill(pid, SIGKILL);
      killed = true;
    }
    if (std::chrono::steady_clock::now() > deadline && !killed) {
      ::kill(pid, SIGKILL);  // a hung child must not hang the test
      killed = true;
      FAIL_CHECK("child process did not finish in time");
    }
    if (ready <= 0) continue;
    char chunk[4096];
    const ssize_t n = ::read(fds[0], chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // EOF: the child is gone
    buffer.append(chunk, static_cast<size_t>(n));
    size_t nl;
    while ((nl = buffer.find('\n')) != std::string::npos) {
      run.lines.push_back(buffer.substr(0, nl));
      buffer.erase(0, nl + 1);
      if (kill && !kill_armed && run.lines.back() == kill->trigger) {
        kill_armed = true;
        kill_at = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(kill->delay);
      }
    }
  }
  ::close(fds[0]);
  REQUIRE(::waitpid(pid, &run.wait_status, 0) == pid);
  for (const std::string& l : run.lines) {
    INFO(l);
    CHECK(l.rfind("ERR", 0) != 0);
  }
  return run;
}

bool KilledBySigkill(int wait_status) { return WIFSIGNALED(wait_status) && WTERMSIG(wait_status) == SIGKILL; }

// One deterministic store call of a scripted run, with what it leaves behind when acknowledged.
struct Step {
  std::string name;
  std::function<absl::Status(Store&)> run;
  uint64_t creates_round = 0;
  uint64_t commits_version = 0;
  std::string ledger_key;
};

std::vector<Step> Script() {
  std::vector<Step> s;
  auto add = [&](std::string name, std::function<absl::Status(Store&)> run) {
    Step step;
    step.name = std::move(name);
    step.run = std::move(run);
    s.push_back(std::move(step));
    return &s.back();
  };
  for (int d = 0; d < 3; ++d) {
    add(StrCat("add device d", d), [d](Store& st) { return st.AddDevice(Device(StrCat("d", d), 10 + d)); });
  }
  // Two rounds that commit, then a third left open.
  const int devices_in_round[] = {3, 2};
  for (uint64_t r = 1; r <= 2; ++r) {
    const int64_t t0 = static_cast<int64_t>(r) * 10000;
    add(StrCat("create round ", r), [r, t0](Store& st) {
      return st.CreateRound(Fields(r - 1, t0)).status();
    })->creates_round = r;
    for (int d = 0; d < devices_in_round[r - 1]; ++d) {
      add(StrCat("add task r", r, "-d", d),
          [r, d](Store& st) { return st.AddTask(Task(StrCat("t", r, "-", d), r, StrCat("d", d))); });
    }
    add(StrCat("round ", r, " collecting"),
        [r, t0](Store& st) { return st.SetRoundState(r, RoundState::kCollecting, t0 + 1); });
    for (int d = 0; d < devices_in_round[r - 1]; ++d) {
      const std::string key = StrCat("k", r, "-", d);
      add(StrCat("record ", key), [r, d, key](Store& st) {
        return st.RecordAcceptedUpdate(Entry(key, r, StrCat("t", r, "-", d), StrCat("d", d)));
      })->ledger_key = key;
    }
    add(StrCat("round ", r, " aggregating"),
        [r, t0](Store& st) { return st.SetRoundState(r, RoundState::kAggregating, t0 + 2); });
    add(StrCat("write checkpoint ", r), [r](Store& st) { return st.WriteCheckpoint(r, Vectors(r)).status(); });
    add(StrCat("commit round ", r), [r, t0](Store& st) {
      return st.CommitRound(r, r, t0 + 3, StrCat("{\"round\":", r, "}"), StrCat("sums-", r));
    })->commits_version = r;
  }
  add("create round 3", [](Store& st) { return st.CreateRound(Fields(2, 30000)).status(); })->creates_round = 3;
  add("touch d1", [](Store& st) { return st.TouchDevice("d1", 31000); });
  return s;
}

size_t StepIndex(const std::vector<Step>& script, const std::string& name) {
  for (size_t i = 0; i < script.size(); ++i) {
    if (script[i].name == name) return i;
  }
  FAIL("no step " << name);
  return 0;
}

TEST_CASE("After a SIGKILL between calls the store holds exactly the acknowledged calls", "[server][store]") {
  const std::vector<Step> script = Script();
  // The number of calls the child completes before it kills itself.
  const std::string kill_before = GENERATE(as<std::string>{},
                                           "add device d0",   // empty store
                                           "add task r1-d0",  // right after CreateRound: round open
                                           "record k1-2",     // between RecordAcceptedUpdate calls
                                           "commit round 1",  // checkpoint written, not committed
                                           "create round 2",  // right after a commit
                                           "commit round 2",  // orphan next to a committed checkpoint
                                           "touch d1",        // third round open, two committed
                                           "");               // after every call
  const size_t kill_at = kill_before.empty() ? script.size() : StepIndex(script, kill_before);
  INFO("killed before step " << kill_at << " (" << (kill_before.empty() ? "end" : kill_before) << ")");

  TempDir dir;
  const ChildRun run = RunChild([&](Reporter& rep) {
    auto store = rep.Must(Store::Open(dir.path()), "open");
    rep.Must(store->RecoverAfterCrash(1, "start").status(), "recover");
    for (size_t i = 0; i < kill_at; ++i) {
      rep.Must(script[i].run(*store), script[i].name);
      rep.Line("OK " + script[i].name);
    }
    ::raise(SIGKILL);
  });
  REQUIRE(KilledBySigkill(run.wait_status));
  REQUIRE(run.lines.size() == kill_at);
  for (size_t i = 0; i < kill_at; ++i) CHECK(run.lines[i] == "OK " + script[i].name);

  // What the acknowledged calls promise.
  std::set<uint64_t> created, committed;
  std::vector<std::string> keys;
  for (size_t i = 0; i < kill_at; ++i) {
    if (script[i].creates_round) created.insert(script[i].creates_round);
    if (script[i].commits_version) committed.insert(script[i].commits_version);
    if (!script[i].ledger_key.empty()) keys.push_back(script[i].ledger_key);
  }

  auto store = OpenStore(dir.path());
  const std::vector<RoundRecord> aborted = Value(store->RecoverAfterCrash(99000, "crash"));
  std::set<uint64_t> aborted_ids;
  for (const RoundRecord& r : aborted) aborted_ids.insert(r.round_id);
  std::set<uint64_t> expect_aborted;
  for (uint64_t r : created) {
    if (committed.count(r) == 0) expect_aborted.insert(r);  // round r commits version r in the script
  }
  CHECK(aborted_ids == expect_aborted);
  CHECK(Value(store->GlobalVersion()) == committed.size());
  for (const std::string& k : keys) CHECK(Value(store->FindLedgerEntry(k)).has_value());
  for (const RoundRecord& r : Value(store->RecentRounds(100))) {
    CHECK((r.state == RoundState::kCommitted || r.state == RoundState::kAborted));
    CHECK(r.accepted == static_cast<int64_t>(Value(store->LedgerForRound(r.round_id)).size()));
  }
  std::set<std::string> expect_files;
  for (uint64_t v : committed) {
    expect_files.insert(StrCat("global-", v, ".safetensors"));
    CHECK(SameVectors(Value(store->ReadCheckpoint(v)), Vectors(v)));
  }
  CHECK(ListDir(CheckpointsDir(dir.path())) == expect_files);  // orphans and temporaries are gone

  // Nothing else: the same calls run without a crash, then recovered, give the same database.
  TempDir ref_dir;
  {
    auto ref = OpenStore(ref_dir.path());
    REQUIRE_OK(ref->RecoverAfterCrash(1, "start").status());
    for (size_t i = 0; i < kill_at; ++i) REQUIRE_OK(script[i].run(*ref));
    REQUIRE_OK(ref->RecoverAfterCrash(99000, "crash").status());
    CHECK(Value(ref->Checksum()) == Value(store->Checksum()));
  }

  // Round ids keep increasing.
  const RoundRecord next = Value(store->CreateRound(Fields(committed.size(), 100000)));
  CHECK(next.round_id == created.size() + 1);
}

TEST_CASE(
    "After a SIGKILL at a random moment, even inside a checkpoint write, the store reopens and "
    "recovers",
    "[server][store]") {
  // Large enough that most kills land inside WriteCheckpoint (writing, fsyncing or renaming).
  constexpr size_t kValues = size_t{2} << 20;  // 8 MiB per checkpoint
  auto big = [](uint64_t version) {
    NamedVector v{"params", std::vector<float>(kValues)};
    for (size_t i = 0; i < kValues; ++i) v.values[i] = static_cast<float>(version) + static_cast<float>(i % 1000);
    return std::vector<NamedVector>{v};
  };
  // Kill delays are fractions of the time one checkpoint write takes on this machine, so they hit
  // every phase of the write (data, fsync, rename, directory fsync) whatever the disk's speed.
  std::chrono::microseconds write_time{0};
  {
    TempDir scratch;
    auto store = OpenStore(scratch.path());
    const auto payload = big(1);
    const auto start = std::chrono::steady_clock::now();
    Value(store->WriteCheckpoint(1, payload));
    write_time = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start);
  }
  std::mt19937 rng(20240611);  // fixed seed: the same sequence of kill times on every run
  std::uniform_real_distribution<double> fraction(0.0, 1.0);
  int kills_inside_write = 0;
  for (int rep = 0; rep < 10; ++rep) {
    // Even repetitions: anywhere in the loop of rounds. Odd ones: during (or just after) a
    // checkpoint write.
    KillPlan plan;
    const double f = fraction(rng);
    if (rep % 2 == 0) {
      plan.trigger = "READY";
      plan.delay = std::chrono::microseconds(static_cast<int64_t>(f * 3.0 * static_cast<double>(write_time.count())));
    } else {
      plan.trigger = StrCat("BEGIN write ", 1 + rep % 3);
      plan.delay = std::chrono::microseconds(static_cast<int64_t>(f * 1.2 * static_cast<double>(write_time.count())));
    }
    INFO("repetition " << rep << ": kill " << plan.delay.count() << " us after '" << plan.trigger
                       << "'; one checkpoint write takes " << write_time.count() << " us");
    TempDir dir;
    const ChildRun run = RunChild(
        [&](Reporter& r) {
          auto store = r.Must(Store::Open(dir.path()), "open");
          r.Must(store->RecoverAfterCrash(1, "start").status(), "recover");
          r.Must(store->AddDevice(Device("d")), "add device");
          std::vector<NamedVector> payload = big(0);
          r.Line("READY");
          for (uint64_t v = 1; v < 1000; ++v) {
            const std::string task = StrCat("t", v), key = StrCat("k", v);
            r.Line(StrCat("BEGIN round ", v));
            const uint64_t id = r.Must(store->CreateRound(Fields(v - 1)), "create").round_id;
            r.Line(StrCat("OK round ", id));
            r.Must(store->AddTask(Task(task, id, "d")), "task");
            r.Must(store->SetRoundState(id, RoundState::kCollecting, 1), "collecting");
            r.Line(StrCat("BEGIN ledger ", key));
            r.Must(store->RecordAcceptedUpdate(Entry(key, id, task, "d")), "record");
            r.Line(StrCat("OK ledger ", key));
            r.Must(store->SetRoundState(id, RoundState::kAggregating, 2), "aggregating");
            payload[0].values[0] = static_cast<float>(v);  // tells the versions apart
            r.Line(StrCat("BEGIN write ", v));
            r.Must(store->WriteCheckpoint(v, payload).status(), "write");
            r.Line(StrCat("OK write ", v));
            r.Line(StrCat("BEGIN commit ", v));
            r.Must(store->CommitRound(id, v, 3, "{}"), "commit");
            r.Line(StrCat("OK commit ", v));
          }
        },
        plan);
    REQUIRE(KilledBySigkill(run.wait_status));

    // What was acknowledged, and the one call that may have been in flight.
    uint64_t acked_commits = 0, max_round = 0;
    std::vector<std::string> acked_keys;
    std::string in_flight;
    for (const std::string& l : run.lines) {
      if (l.rfind("BEGIN ", 0) == 0) in_flight = l.substr(6);
      if (l.rfind("OK ", 0) != 0) continue;
      in_flight.clear();
      std::string what = l.substr(3);
      if (what.rfind("commit ", 0) == 0) acked_commits = std::stoull(what.substr(7));
      if (what.rfind("round ", 0) == 0) max_round = std::stoull(what.substr(6));
      if (what.rfind("ledger ", 0) == 0) acked_keys.push_back(what.substr(7));
    }
    if (in_flight.rfind("write ", 0) == 0) ++kills_inside_write;
    INFO("in flight: '" << in_flight << "'");

    auto store = OpenStore(dir.path());  // must always reopen
    Value(store->RecoverAfterCrash(50000, "crash"));
    const uint64_t global = Value(store->GlobalVersion());
    const bool commit_in_flight = in_flight == StrCat("commit ", acked_commits + 1);
    CHECK((global == acked_commits || (commit_in_flight && global == acked_commits + 1)));
    for (const std::string& k : acked_keys) CHECK(Value(store->FindLedgerEntry(k)).has_value());
    for (const RoundRecord& r : Value(store->RecentRounds(1000))) {
      CHECK((r.state == RoundState::kCommitted || r.state == RoundState::kAborted));
      // Ledger row, task state and counter move together or not at all.
      const auto ledger = Value(store->LedgerForRound(r.round_id));
      CHECK(r.accepted == static_cast<int64_t>(ledger.size()));
      for (const LedgerEntry& e : ledger) CHECK(Value(store->FindTask(e.task_id))->state == "uploaded");
    }
    for (uint64_t v = 1; v <= global; ++v) {
      const std::vector<NamedVector> got = Value(store->ReadCheckpoint(v));  // verifies the recorded hash
      REQUIRE(got.size() == 1);
      REQUIRE(got[0].values.size() == kValues);
      CHECK(got[0].values[0] == static_cast<float>(v));
      CHECK(got[0].values[kValues - 1] == static_cast<float>((kValues - 1) % 1000));
    }
    std::set<std::string> expect_files;
    for (uint64_t v = 1; v <= global; ++v) expect_files.insert(StrCat("global-", v, ".safetensors"));
    CHECK(ListDir(CheckpointsDir(dir.path())) == expect_files);
    const RoundRecord next = Value(store->CreateRound(Fields(global)));
    CHECK(next.round_id > max_round);
  }
  // Proof that the scenario really interrupts checkpoint writes (5 tries at uniform points of one
  // write).
  CHECK(kills_inside_write >= 1);
}

}  // namespace
}  // namespace seedling::server
