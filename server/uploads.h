#pragma once

// Plaintext uploads in progress (docs/protocol.md, "UploadBegin / UploadChunk / UploadCommit"): the bytes of each
// update between UploadBegin and UploadCommit, held in memory by idempotency key until the coordinator validates,
// aggregates and records them. A device that reconnects mid-upload resumes where the server's copy ends. Uploads die
// with their round, or when they stay silent for longer than a device could need to resume. Not thread-safe (the
// coordinator holds its lock).

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "comms/proto/seedling.pb.h"
#include "server/store.h"

namespace seedling::server {

struct Upload {
  std::string key;  // idempotency key: "<device>/<round>/<task>"
  std::string device_id;
  std::string task_id;
  uint64_t round_id = 0;
  uint64_t total_bytes = 0;
  v1::Codec codec = v1::CODEC_UNSPECIFIED;
  uint64_t num_examples = 0;
  v1::UpdateMetrics metrics;  // as announced, token counts capped at kMaxReportedTokens
  std::string sha256;         // raw, as announced
  std::string data;           // received so far
  int64_t last_activity_ms = 0;

  // Every announced byte arrived.
  bool Complete() const { return data.size() == total_bytes; }
};

// A device's own count of tokens it processed is informational; capped so a hostile value cannot overflow a
// round's sum.
inline constexpr uint64_t kMaxReportedTokens = uint64_t{1} << 40;

// The ledger entry of an accepted upload (its metrics as JSON).
LedgerEntry LedgerEntryFor(const Upload& upload, int64_t now_ms);

class Uploads {
 public:
  explicit Uploads(int64_t max_inflight) : max_inflight_(max_inflight) {}

  // UploadBegin of `device_id` (the coordinator checked its round, task and key): resumes an upload of the
  // same update (same size and hash) or starts one, and returns the bytes already held.
  // ResourceExhausted when `max_inflight` uploads are in progress.
  absl::StatusOr<uint64_t> Begin(const std::string& device_id, const v1::UploadBegin& begin, int64_t now_ms);
  // The upload under `key` if `device_id` started it, else null.
  Upload* Find(const std::string& key, const std::string& device_id);
  // Removes the upload under `key` and returns it (null if none).
  std::unique_ptr<Upload> Take(const std::string& key);
  void Put(std::unique_ptr<Upload> upload);

  // Drops the uploads of round `round_id` (it closed).
  void DropRound(uint64_t round_id);
  // Drops uploads silent since before `now_ms - silence_ms`.
  void DropSilent(int64_t now_ms, int64_t silence_ms);

 private:
  const int64_t max_inflight_;
  std::map<std::string, std::unique_ptr<Upload>> uploads_;  // by idempotency key
};

}  // namespace seedling::server
