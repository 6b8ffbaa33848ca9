#include "client/internal/state_dir.h"

#include <catch2/catch.hpp>

#include "base/file.h"
#include "tests/test_util.h"

namespace seedling::client::internal {
namespace {

TrainingCheckpoint SampleCheckpoint() {
  TrainingCheckpoint cp;
  cp.trainer.steps = 3;
  cp.trainer.skipped = 1;
  cp.trainer.counter = 7;
  cp.trainer.buffers["adam_m"] = {0.5f, -0.25f};
  cp.trainer.pairs = {{2, 0.125f}};
  cp.trainer.seed_pairs = {{1234567890123ULL, -2.5f}};
  cp.params = {1.0f, 2.0f, 3.0f};
  cp.data = {4, 9, 0xfeedULL};
  cp.loss_start = 2.75;
  cp.scored_tokens = 300;
  cp.processed_tokens = 512;
  cp.seconds = 1.5;
  return cp;
}

TEST_CASE("The state directory keeps the phase, task and update across a reload", "[client][state]") {
  testing::TempDir dir;
  StateDir state;
  state.dir = dir.path;
  REQUIRE(state.Load().ok());  // a fresh device
  CHECK(state.phase == Phase::kIdle);

  state.phase = Phase::kTrained;
  state.synced_version = 12;
  state.task.set_round_id(5);
  state.task.set_method("mezo");
  state.idempotency_key = "dev/5/t1";
  state.num_examples = 40;
  state.metrics.set_loss_end(1.25f);
  state.update_sha256 = std::string("\x00\x01\xff", 3);
  REQUIRE(state.Save().ok());

  StateDir reloaded;
  reloaded.dir = dir.path;
  REQUIRE(reloaded.Load().ok());
  CHECK(reloaded.phase == Phase::kTrained);
  CHECK(reloaded.synced_version == 12);
  CHECK(reloaded.task.round_id() == 5);
  CHECK(reloaded.task.method() == "mezo");
  CHECK(reloaded.idempotency_key == "dev/5/t1");
  CHECK(reloaded.num_examples == 40);
  CHECK(reloaded.metrics.loss_end() == 1.25f);
  CHECK(reloaded.update_sha256 == state.update_sha256);
}

TEST_CASE("Phases have stable names and an unknown one is DataLoss", "[client][state]") {
  for (Phase p : {Phase::kIdle, Phase::kTraining, Phase::kTrained}) {
    absl::StatusOr<Phase> parsed = ParsePhase(PhaseName(p));
    REQUIRE(parsed.ok());
    CHECK(*parsed == p);
  }
  CHECK(std::string(PhaseName(Phase::kTrained)) == "trained");  // the on-disk name older SDKs wrote

  testing::TempDir dir;
  REQUIRE(WriteFileAtomic(JoinPath(dir.path, "state.json"), R"({"synced_version": 1, "phase": "uploading"})").ok());
  StateDir state;
  state.dir = dir.path;
  absl::Status st = state.Load();
  CHECK(st.code() == absl::StatusCode::kDataLoss);
  CHECK(std::string(st.message()).find("uploading") != std::string::npos);

  REQUIRE(WriteFileAtomic(JoinPath(dir.path, "state.json"), "{not json").ok());
  CHECK(state.Load().code() == absl::StatusCode::kDataLoss);
}

TEST_CASE("A training checkpoint round-trips for its own task only", "[client][state]") {
  testing::TempDir dir;
  StateDir state;
  state.dir = dir.path;
  CHECK_FALSE(state.ReadCheckpoint("dev/1/t").has_value());  // none yet

  const TrainingCheckpoint cp = SampleCheckpoint();
  REQUIRE(state.WriteCheckpoint("dev/1/t", cp).ok());
  std::optional<TrainingCheckpoint> back = state.ReadCheckpoint("dev/1/t");
  REQUIRE(back.has_value());
  CHECK(back->trainer.steps == 3);
  CHECK(back->trainer.skipped == 1);
  CHECK(back->trainer.counter == 7);
  CHECK(back->trainer.buffers == cp.trainer.buffers);
  CHECK(back->trainer.pairs == cp.trainer.pairs);
  CHECK(back->trainer.seed_pairs == cp.trainer.seed_pairs);
  CHECK(back->params == cp.params);
  CHECK(back->data == cp.data);
  CHECK(back->loss_start == 2.75);
  CHECK(back->scored_tokens == 300);
  CHECK(back->processed_tokens == 512);
  CHECK(back->seconds == 1.5);

  CHECK_FALSE(state.ReadCheckpoint("dev/2/t").has_value());  // another task's checkpoint is not resumed

  REQUIRE(WriteFileAtomic(state.Path("checkpoint.json"), "{\"key\": \"dev/1/t\"}").ok());
  CHECK_FALSE(state.ReadCheckpoint("dev/1/t").has_value());  // corrupt: training starts over

  state.RemoveCheckpoint();
  CHECK_FALSE(FileExists(state.Path("checkpoint.json")));
  CHECK_FALSE(FileExists(state.Path("checkpoint.safetensors")));
}

TEST_CASE("Acknowledgements append one line each", "[client][state]") {
  testing::TempDir dir;
  StateDir state;
  state.dir = dir.path;
  state.idempotency_key = "k1";
  REQUIRE(state.AppendAck(3, 1000).ok());
  state.idempotency_key = "k2";
  REQUIRE(state.AppendAck(4, 2000).ok());
  absl::StatusOr<std::string> log = ReadFile(state.Path("acks.jsonl"));
  REQUIRE(log.ok());
  CHECK(std::count(log->begin(), log->end(), '\n') == 2);
  CHECK(log->find("\"key\":\"k1\"") != std::string::npos);
  CHECK(log->find("\"key\":\"k2\"") != std::string::npos);
  CHECK(log->find("\"round\":4") != std::string::npos);
}

}  // namespace
}  // namespace seedling::client::internal
