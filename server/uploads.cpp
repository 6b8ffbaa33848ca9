#include "server/uploads.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "base/sha256.h"

namespace seedling::server {

LedgerEntry LedgerEntryFor(const Upload& upload, int64_t now_ms) {
  LedgerEntry entry;
  entry.idempotency_key = upload.key;
  entry.round_id = upload.round_id;
  entry.task_id = upload.task_id;
  entry.device_id = upload.device_id;
  entry.num_examples = upload.num_examples;
  entry.bytes = upload.total_bytes;
  entry.sha256 = HexOf(upload.sha256);
  entry.accepted_ms = now_ms;
  const v1::UpdateMetrics& m = upload.metrics;
  const nlohmann::json json = {{"loss_start", m.loss_start()},
                               {"loss_end", m.loss_end()},
                               {"steps", m.steps()},
                               {"skipped_steps", m.skipped_steps()},
                               {"processed_tokens", m.processed_tokens()},
                               {"scored_tokens", m.scored_tokens()}};
  entry.metrics_json = json.dump();
  return entry;
}

absl::StatusOr<uint64_t> Uploads::Begin(const std::string& device_id, const v1::UploadBegin& begin, int64_t now_ms) {
  auto it = uploads_.find(begin.idempotency_key());
  if (it != uploads_.end() && it->second->total_bytes == begin.total_bytes() && it->second->sha256 == begin.sha256()) {
    // Resume: the device reconnected mid-upload.
    it->second->last_activity_ms = now_ms;
    return it->second->data.size();
  }
  if (it == uploads_.end() && static_cast<int64_t>(uploads_.size()) >= max_inflight_) {
    return absl::ResourceExhaustedError("too many uploads in progress");
  }
  auto up = std::make_unique<Upload>();
  up->key = begin.idempotency_key();
  up->device_id = device_id;
  up->task_id = begin.task_id();
  up->round_id = begin.round_id();
  up->total_bytes = begin.total_bytes();
  up->codec = begin.codec();
  up->num_examples = begin.num_examples();
  up->metrics = begin.metrics();
  // Capped once, here: the ledger entry and the round's sums both read these.
  up->metrics.set_processed_tokens(std::min(up->metrics.processed_tokens(), kMaxReportedTokens));
  up->metrics.set_scored_tokens(std::min(up->metrics.scored_tokens(), kMaxReportedTokens));
  up->sha256 = begin.sha256();
  up->last_activity_ms = now_ms;
  uploads_[up->key] = std::move(up);
  return 0;
}

Upload* Uploads::Find(const std::string& key, const std::string& device_id) {
  auto it = uploads_.find(key);
  return it == uploads_.end() || it->second->device_id != device_id ? nullptr : it->second.get();
}

std::unique_ptr<Upload> Uploads::Take(const std::string& key) {
  auto it = uploads_.find(key);
  if (it == uploads_.end()) return nullptr;
  std::unique_ptr<Upload> up = std::move(it->second);
  uploads_.erase(it);
  return up;
}

void Uploads::Put(std::unique_ptr<Upload> upload) {
  const std::string key = upload->key;
  uploads_[key] = std::move(upload);
}

void Uploads::DropRound(uint64_t round_id) {
  std::erase_if(uploads_, [&](const auto& entry) { return entry.second->round_id == round_id; });
}

void Uploads::DropSilent(int64_t now_ms, int64_t silence_ms) {
  std::erase_if(uploads_, [&](const auto& entry) { return now_ms - entry.second->last_activity_ms > silence_ms; });
}

}  // namespace seedling::server
