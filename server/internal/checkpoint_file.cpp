#include "server/internal/checkpoint_file.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <span>

#include "base/status.h"
#include "base/strings.h"
#include "model/safetensors.h"

namespace seedling::server::store_internal {

// Checkpoints store the host's float bytes as safetensors' little-endian F32.
static_assert(std::endian::native == std::endian::little, "checkpoints assume a little-endian host");

namespace {
constexpr char kVersionMetadataKey[] = "seedling.checkpoint_version";
}  // namespace

absl::StatusOr<std::string> WriteCheckpointFile(const std::string& path, uint64_t version,
                                                const std::vector<NamedVector>& vectors, FileSystem* fs) {
  std::vector<model::TensorToWrite> tensors;
  tensors.reserve(vectors.size());
  for (const NamedVector& v : vectors) {
    model::TensorToWrite t;
    t.name = v.name;
    t.dtype = model::DType::kF32;
    t.shape = {static_cast<int64_t>(v.values.size())};
    t.data =
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.values.data()), v.values.size() * sizeof(float));
    tensors.push_back(std::move(t));
  }
  // The version inside the file catches a file renamed to another version's name.
  SEEDLING_RETURN_IF_ERROR(model::WriteSafetensors(path, tensors, {{kVersionMetadataKey, StrCat(version)}}, fs));
  return FileSha256Hex(path);
}

absl::StatusOr<std::vector<NamedVector>> ReadCheckpointFile(const std::string& path, uint64_t version,
                                                            const std::optional<std::string>& recorded_sha256) {
  if (!FileExists(path)) {
    if (recorded_sha256.has_value()) {
      return absl::DataLossError(StrCat("checkpoint of version ", version, " ('", path, "') is recorded but missing"));
    }
    return absl::NotFoundError(StrCat("there is no checkpoint of version ", version, " ('", path, "')"));
  }
  if (recorded_sha256.has_value()) {
    SEEDLING_ASSIGN_OR_RETURN(std::string sha, FileSha256Hex(path));
    if (sha != *recorded_sha256) {
      return absl::DataLossError(StrCat("checkpoint '", path, "' has SHA-256 ", sha, ", but version ", version,
                                        " was recorded with ", *recorded_sha256));
    }
  }
  absl::StatusOr<std::unique_ptr<model::SafetensorsFile>> file = model::SafetensorsFile::Open(path);
  if (!file.ok()) {
    // A checkpoint the store wrote that no longer parses is damaged data, whatever the parser calls
    // it.
    if (file.status().code() == absl::StatusCode::kNotFound) return file.status();
    return absl::DataLossError(StrCat("checkpoint of version ", version, ": ", FromAbsl(file.status().message())));
  }
  const auto& meta = (*file)->metadata();
  if (auto it = meta.find(kVersionMetadataKey); it != meta.end() && it->second != StrCat(version)) {
    return absl::DataLossError(
        StrCat("checkpoint '", path, "' says it holds version ", it->second, ", expected ", version));
  }
  std::vector<const model::TensorView*> views;
  for (const auto& [name, view] : (*file)->tensors()) {
    if (view.dtype != model::DType::kF32 || view.shape.size() != 1) {
      return absl::DataLossError(StrCat("checkpoint '", path, "': tensor '", name, "' is ",
                                        model::DTypeName(view.dtype), " with ", view.shape.size(),
                                        " dimensions; expected a 1-D F32 vector"));
    }
    views.push_back(&view);
  }
  // Data offsets follow the order the vectors were written in; the map iterates by name, which
  // breaks ties.
  std::stable_sort(views.begin(), views.end(),
                   [](const model::TensorView* a, const model::TensorView* b) { return a->data < b->data; });
  std::vector<NamedVector> out;
  out.reserve(views.size());
  for (const model::TensorView* v : views) {
    NamedVector nv;
    nv.name = v->name;
    nv.values.resize(v->nbytes / sizeof(float));
    if (v->nbytes > 0) std::memcpy(nv.values.data(), v->data, v->nbytes);
    out.push_back(std::move(nv));
  }
  return out;
}

}  // namespace seedling::server::store_internal
