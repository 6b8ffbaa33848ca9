#pragma once

// The SDK's state directory (docs/architecture.md, "The client"): what a device must keep across an app
// kill so that the next Client::RunOnce continues where the last one stopped.
//
//   state.json                the phase, the task being worked on, the synced global version, the pending
//                             update's key, size and metrics (written atomically after every phase change)
//   adapter.safetensors       the global adapter at `synced_version`
//   checkpoint.{json,safetensors}  the latest training checkpoint of the current task
//   update.bin                the encoded update while phase is kTrained (durable before the upload starts)
//   feedback.bin              top-k error feedback carried between rounds
//   acks.jsonl                one line per update the server acknowledged
//
// Every file is replaced with WriteFileAtomic (write, fsync, rename, fsync the directory), so a kill leaves
// either the old or the new version of each.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "client/local_training.h"
#include "comms/proto/seedling.pb.h"

namespace seedling::client::internal {

// Where the device stands with its current task.
enum class Phase {
  kIdle,      // nothing in progress
  kTraining,  // training `task` (a checkpoint may exist)
  kTrained,   // the encoded update is in update.bin, not yet acknowledged
};

const char* PhaseName(Phase phase);
// DataLoss for a name that is not a phase (a corrupt or foreign state.json).
absl::StatusOr<Phase> ParsePhase(const std::string& name);

// Named 1-D float vectors in one safetensors file (the adapter, a checkpoint's buffers).
using NamedVectors = std::vector<std::pair<std::string, std::vector<float>>>;
absl::Status WriteVectors(const std::string& path, const NamedVectors& vectors);
// DataLoss if a tensor is not a 1-D F32 vector.
absl::StatusOr<std::map<std::string, std::vector<float>>> ReadVectors(const std::string& path);

struct StateDir {
  std::string dir;
  uint64_t synced_version = 0;
  Phase phase = Phase::kIdle;
  v1::Task task;
  std::string idempotency_key;
  uint64_t num_examples = 0;
  v1::UpdateMetrics metrics;
  std::string update_sha256;  // raw

  std::string Path(const char* name) const;

  // Reads state.json (a missing file is a fresh device). DataLoss if it is corrupt.
  absl::Status Load();
  absl::Status Save() const;
  // Appends the acknowledgement of the pending update to acks.jsonl.
  absl::Status AppendAck(uint64_t round_id, int64_t now_ms) const;

  // The latest training checkpoint if it belongs to the task `key`; nullopt if there is none, it is
  // another task's, or it is unreadable (training then starts over: a checkpoint only saves time).
  std::optional<TrainingCheckpoint> ReadCheckpoint(const std::string& key) const;
  absl::Status WriteCheckpoint(const std::string& key, const TrainingCheckpoint& checkpoint) const;
  void RemoveCheckpoint() const;
};

}  // namespace seedling::client::internal
