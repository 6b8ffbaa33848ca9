#include "client/internal/state_dir.h"

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "base/file.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/safetensors.h"
#include "spdlog/spdlog.h"

namespace seedling::client::internal {
namespace {

using Json = nlohmann::json;

std::string B64(std::string_view raw) { return absl::Base64Escape(ToAbsl(raw)); }

absl::StatusOr<std::string> UnB64(const std::string& text) {
  std::string out;
  if (!absl::Base64Unescape(text, &out)) return absl::DataLossError("corrupt base64 in the client state");
  return out;
}

// checkpoint.json: the trainer's scalars and the data position; the vectors go to checkpoint.safetensors.
Json CheckpointJson(const std::string& key, const TrainingCheckpoint& cp) {
  Json pairs = Json::array(), seed_pairs = Json::array();
  for (const auto& [i, v] : cp.trainer.pairs) pairs.push_back({i, v});
  for (const auto& [s, v] : cp.trainer.seed_pairs) seed_pairs.push_back({s, v});
  return {{"key", key},
          {"steps", cp.trainer.steps},
          {"skipped", cp.trainer.skipped},
          {"counter", cp.trainer.counter},
          {"pairs", pairs},
          {"seed_pairs", seed_pairs},
          {"epoch", cp.data.epoch},
          {"offset", cp.data.offset},
          {"fingerprint", cp.data.fingerprint},
          {"loss_start", cp.loss_start},
          {"tokens", cp.scored_tokens},
          {"processed_tokens", cp.processed_tokens},
          {"seconds", cp.seconds}};
}

// Throws Json::exception on a missing or mistyped field.
void ReadCheckpointJson(const Json& j, TrainingCheckpoint& cp) {
  cp.trainer.steps = j.at("steps").get<int64_t>();
  cp.trainer.skipped = j.at("skipped").get<int64_t>();
  cp.trainer.counter = j.at("counter").get<int64_t>();
  for (const Json& p : j.at("pairs")) cp.trainer.pairs.emplace_back(p[0].get<uint32_t>(), p[1].get<float>());
  for (const Json& p : j.at("seed_pairs")) cp.trainer.seed_pairs.emplace_back(p[0].get<uint64_t>(), p[1].get<float>());
  cp.data.epoch = j.at("epoch").get<uint64_t>();
  cp.data.offset = j.at("offset").get<uint64_t>();
  cp.data.fingerprint = j.at("fingerprint").get<uint64_t>();
  cp.loss_start = j.at("loss_start").get<double>();
  cp.scored_tokens = j.at("tokens").get<int64_t>();
  cp.processed_tokens = j.value("processed_tokens", int64_t{0});  // absent before it was counted
  cp.seconds = j.at("seconds").get<double>();
}

}  // namespace

const char* PhaseName(Phase phase) {
  switch (phase) {
    case Phase::kIdle:
      return "idle";
    case Phase::kTraining:
      return "training";
    case Phase::kTrained:
      return "trained";
  }
  return "?";
}

absl::StatusOr<Phase> ParsePhase(const std::string& name) {
  for (Phase p : {Phase::kIdle, Phase::kTraining, Phase::kTrained}) {
    if (name == PhaseName(p)) return p;
  }
  return absl::DataLossError(StrCat("unknown phase '", name, "'"));
}

absl::Status WriteVectors(const std::string& path, const NamedVectors& vectors) {
  std::vector<model::TensorToWrite> tensors;
  for (const auto& [name, values] : vectors) {
    tensors.push_back({name,
                       model::DType::kF32,
                       {static_cast<int64_t>(values.size())},
                       std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(values.data()), values.size() * 4)});
  }
  return model::WriteSafetensors(path, tensors);
}

absl::StatusOr<std::map<std::string, std::vector<float>>> ReadVectors(const std::string& path) {
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::SafetensorsFile> file, model::SafetensorsFile::Open(path));
  std::map<std::string, std::vector<float>> out;
  for (const auto& [name, view] : file->tensors()) {
    if (view.dtype != model::DType::kF32 || view.shape.size() != 1) {
      return absl::DataLossError(StrCat(path, ": tensor '", name, "' is not a 1-D F32 vector"));
    }
    std::vector<float> v(static_cast<size_t>(view.shape[0]));
    std::memcpy(v.data(), view.data, view.nbytes);
    out[name] = std::move(v);
  }
  return out;
}

std::string StateDir::Path(const char* name) const { return JoinPath(dir, name); }

absl::Status StateDir::Load() {
  const std::string path = Path("state.json");
  if (!FileExists(path)) return absl::OkStatus();
  SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  std::string phase_name;
  try {
    const Json j = Json::parse(text);
    synced_version = j.at("synced_version").get<uint64_t>();
    phase_name = j.at("phase").get<std::string>();
    idempotency_key = j.value("idempotency_key", "");
    num_examples = j.value("num_examples", uint64_t{0});
    SEEDLING_ASSIGN_OR_RETURN(std::string task_bytes, UnB64(j.value("task", "")));
    SEEDLING_ASSIGN_OR_RETURN(std::string metric_bytes, UnB64(j.value("metrics", "")));
    SEEDLING_ASSIGN_OR_RETURN(update_sha256, UnB64(j.value("update_sha256", "")));
    if (!task.ParseFromString(task_bytes) || !metrics.ParseFromString(metric_bytes)) {
      return absl::DataLossError(StrCat(path, ": corrupt task"));
    }
  } catch (const Json::exception&) {
    return absl::DataLossError(StrCat(path, " is corrupt"));
  }
  absl::StatusOr<Phase> parsed = ParsePhase(phase_name);
  if (!parsed.ok()) return absl::DataLossError(StrCat(path, ": ", parsed.status().message()));
  phase = *parsed;
  return absl::OkStatus();
}

absl::Status StateDir::Save() const {
  Json j = {{"synced_version", synced_version},      {"phase", PhaseName(phase)},
            {"idempotency_key", idempotency_key},    {"num_examples", num_examples},
            {"task", B64(task.SerializeAsString())}, {"metrics", B64(metrics.SerializeAsString())},
            {"update_sha256", B64(update_sha256)}};
  return WriteFileAtomic(Path("state.json"), j.dump(2) + "\n");
}

absl::Status StateDir::AppendAck(uint64_t round_id, int64_t now_ms) const {
  // Append with a full line per acknowledgement, then fsync through an atomic rewrite: a crash leaves the
  // old or the new log.
  std::string log;
  if (FileExists(Path("acks.jsonl"))) {
    SEEDLING_ASSIGN_OR_RETURN(log, ReadFile(Path("acks.jsonl")));
  }
  log += Json({{"key", idempotency_key}, {"round", round_id}, {"time_ms", now_ms}, {"sha256", HexOf(update_sha256)}})
             .dump() +
         "\n";
  return WriteFileAtomic(Path("acks.jsonl"), log);
}

std::optional<TrainingCheckpoint> StateDir::ReadCheckpoint(const std::string& key) const {
  if (!FileExists(Path("checkpoint.json")) || !FileExists(Path("checkpoint.safetensors"))) return std::nullopt;
  absl::StatusOr<std::string> text = ReadFile(Path("checkpoint.json"));
  absl::StatusOr<std::map<std::string, std::vector<float>>> vectors = ReadVectors(Path("checkpoint.safetensors"));
  if (!text.ok() || !vectors.ok()) return std::nullopt;
  TrainingCheckpoint cp;
  try {
    const Json j = Json::parse(*text);
    if (j.at("key").get<std::string>() != key) return std::nullopt;
    ReadCheckpointJson(j, cp);
  } catch (const Json::exception&) {
    spdlog::warn("ignoring a corrupt training checkpoint");
    return std::nullopt;
  }
  for (auto& [name, values] : *vectors) {
    if (name == "params") {
      cp.params = std::move(values);
    } else {
      cp.trainer.buffers[name] = std::move(values);
    }
  }
  if (cp.params.empty()) return std::nullopt;
  return cp;
}

absl::Status StateDir::WriteCheckpoint(const std::string& key, const TrainingCheckpoint& cp) const {
  NamedVectors vectors = {{"params", cp.params}};
  for (const auto& [name, values] : cp.trainer.buffers) vectors.emplace_back(name, values);
  SEEDLING_RETURN_IF_ERROR(WriteVectors(Path("checkpoint.safetensors"), vectors));
  return WriteFileAtomic(Path("checkpoint.json"), CheckpointJson(key, cp).dump() + "\n");
}

void StateDir::RemoveCheckpoint() const {
  std::filesystem::remove(Path("checkpoint.safetensors"));
  std::filesystem::remove(Path("checkpoint.json"));
}

}  // namespace seedling::client::internal
