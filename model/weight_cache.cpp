#include "model/weight_cache.h"

#include <algorithm>
#include <filesystem>
#include <set>
#include <span>
#include <utility>
#include <vector>

#include "base/file.h"
#include "base/memory.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/torch_status.h"
#include "model/weights.h"

namespace seedling::model {
namespace {

constexpr char kVersionKey[] = "seedling.cache.version";
constexpr char kFormatKey[] = "seedling.cache.format";
constexpr char kSourceKey[] = "seedling.cache.source";
constexpr char kDigestKey[] = "seedling.cache.data_sha256";
constexpr char kVersion[] = "1";

// Samples of each file's data section that the fingerprint hashes: a checkpoint retrained with the same
// shapes has the same header and size but different numbers everywhere.
constexpr int64_t kFingerprintSamples = 16;
constexpr int64_t kFingerprintSampleBytes = 4096;

// Ties the cache to its source without reading all the weights: every file's name, size and header bytes
// (which hold every tensor's name, dtype, shape and offsets), and 16 evenly spaced 4 KiB samples of its
// data, whose pages are released again after hashing.
std::string SourceFingerprint(const SafetensorsCollection& source) {
  Sha256Hasher hasher;
  for (const SafetensorsFile* f : source.files()) {
    hasher.Update(StrCat(std::filesystem::path(f->path()).filename().string(), "\n", f->file_size(), "\n"));
    hasher.Update(f->header());
    const std::span<const uint8_t> data = f->data_section();
    const auto size = static_cast<int64_t>(data.size());
    for (int64_t i = 0; i < kFingerprintSamples && size > 0; ++i) {
      const int64_t at = size * i / kFingerprintSamples;
      const int64_t n = std::min(kFingerprintSampleBytes, size - at);
      hasher.Update(data.data() + at, static_cast<size_t>(n));
    }
    f->Release(data);
  }
  return HexOf(hasher.Finish());
}

// What the cache holds for each tensor the config implies, F32 first, then F16, then U8.
std::vector<TensorSpec> CacheSpecs(const ModelConfig& config, WeightFormat format) {
  std::vector<TensorSpec> specs;
  for (const auto& [name, shape, quantizable, transposed] : ExpectedTensors(config)) {
    if (!quantizable) {
      specs.push_back({name, DType::kF32, shape});
      continue;
    }
    const WeightFormat f = MatrixFormatFor(format, shape[1]);
    if (IsBlockFormat(f)) {
      specs.push_back({name, DType::kU8, {shape[0], shape[1] / kQuantBlock, BlockBytes(f)}});
    } else {
      specs.push_back({name, DType::kF16, shape});
    }
  }
  auto rank = [](DType d) { return d == DType::kF32 ? 0 : d == DType::kF16 ? 1 : 2; };
  std::stable_sort(specs.begin(), specs.end(),
                   [&](const TensorSpec& a, const TensorSpec& b) { return rank(a.dtype) < rank(b.dtype); });
  return specs;
}

// SHA-256 of the data section, hex. Each 8 MiB read is dropped from RSS once hashed: the check should
// not leave the whole cache resident when training then streams its weights (model/frozen_linear.h).
std::string DataDigest(const SafetensorsFile& file) {
  constexpr size_t kChunk = size_t{8} << 20;
  const std::span<const uint8_t> data = file.data_section();
  Sha256Hasher hasher;
  for (size_t at = 0; at < data.size(); at += kChunk) {
    const std::span<const uint8_t> chunk = data.subspan(at, std::min(kChunk, data.size() - at));
    hasher.Update(chunk.data(), chunk.size());
    file.Release(chunk);
  }
  return HexOf(hasher.Finish());
}

// Empty when the opened file is the cache these arguments describe; otherwise why it is not.
std::string Mismatch(const SafetensorsFile& file, const std::vector<TensorSpec>& specs, WeightFormat format,
                     const std::string& fingerprint) {
  auto meta = [&](const char* key) -> std::string {
    auto it = file.metadata().find(key);
    return it == file.metadata().end() ? std::string() : it->second;
  };
  if (meta(kVersionKey) != kVersion) return StrCat("stale: cache version '", meta(kVersionKey), "'");
  if (meta(kFormatKey) != WeightFormatName(format)) return StrCat("stale: holds '", meta(kFormatKey), "'");
  if (meta(kSourceKey) != fingerprint) return "stale: the model's weights changed";
  if (file.tensors().size() != specs.size()) return "damaged: wrong number of tensors";
  for (const TensorSpec& spec : specs) {
    const TensorView* view = file.Find(spec.name);
    if (view == nullptr) return StrCat("damaged: tensor '", spec.name, "' is missing");
    if (view->dtype != spec.dtype || view->shape != spec.shape) {
      return StrCat("damaged: tensor '", spec.name, "' has the wrong dtype or shape");
    }
  }
  if (meta(kDigestKey) != DataDigest(file)) return "damaged: the data does not match its SHA-256";
  return "";
}

// Converts one source tensor to its cache representation; a `transposed` one (stored (in, out)) to (out, in).
absl::StatusOr<at::Tensor> Convert(const TensorView& view, const TensorSpec& spec, WeightFormat format,
                                   bool transposed) {
  const at::Tensor source = transposed ? TensorFromView(view).t().contiguous() : TensorFromView(view);
  switch (spec.dtype) {
    case DType::kF32:
      return source.to(at::kFloat).contiguous();
    case DType::kF16:
      return source.to(at::kHalf).contiguous();
    default: {
      // Drop each band's source pages as it is done: the embedding's 16-bit source alone is larger than
      // a tight budget's whole activation share.
      const int64_t row_bytes = static_cast<int64_t>(view.nbytes) / std::max<int64_t>(1, view.shape[0]);
      auto release = [&](int64_t first_row, int64_t rows) {
        view.file->Release(view.data + first_row * row_bytes, static_cast<size_t>(rows * row_bytes));
      };
      if (transposed) return QuantizeMatrix(source, MatrixFormatFor(format, source.size(1)), spec.name);
      return QuantizeMatrix(source, MatrixFormatFor(format, view.shape[1]), spec.name, release);
    }
  }
}

absl::Status Build(const SafetensorsCollection& source, const ModelConfig& config, const std::vector<TensorSpec>& specs,
                   WeightFormat format, const std::string& fingerprint, const std::string& path,
                   const WeightCacheOptions& options) {
  std::set<std::string> transposed;  // stored (in, out) (GPT-2's Conv1D); the cache holds (out, in)
  for (const ExpectedTensor& e : ExpectedTensors(config)) {
    if (e.transposed) transposed.insert(e.name);
  }
  at::Tensor current;  // the tensor being written; replaced by the next one
  auto produce = [&](size_t i) -> absl::StatusOr<std::span<const uint8_t>> {
    const TensorSpec& spec = specs[i];
    const TensorView* view = FindWeight(source, config, spec.name);
    if (view == nullptr) return absl::NotFoundError(StrCat("the model has no tensor '", spec.name, "'"));
    SEEDLING_ASSIGN_OR_RETURN(current, CatchTorch("quantizing", [&] {
                                return Convert(*view, spec, format, transposed.contains(spec.name));
                              }));
    view->file->Release(view->data, view->nbytes);  // the source pages are no longer needed
    if (options.progress) options.progress(static_cast<int64_t>(i) + 1, static_cast<int64_t>(specs.size()));
    return std::span<const uint8_t>(static_cast<const uint8_t*>(current.data_ptr()), current.nbytes());
  };
  const std::map<std::string, std::string> metadata = {
      {kVersionKey, kVersion}, {kFormatKey, WeightFormatName(format)}, {kSourceKey, fingerprint}};
  return WriteSafetensorsStreamed(path, specs, produce, metadata, kDigestKey);
}

}  // namespace

std::string WeightCachePath(const std::string& model_dir, WeightFormat format, const WeightCacheOptions& options) {
  const std::string dir = options.dir.empty() ? JoinPath(model_dir, ".seedling-cache") : options.dir;
  return JoinPath(dir, StrCat("weights-", WeightFormatName(format), ".safetensors"));
}

absl::StatusOr<WeightCache> OpenWeightCache(const SafetensorsCollection& source, const std::string& model_dir,
                                            const ModelConfig& config, WeightFormat format,
                                            const WeightCacheOptions& options) {
  if (!IsBlockFormat(format)) {
    return absl::InvalidArgumentError(StrCat("the weight cache holds q8_0 or q4_0, not ", WeightFormatName(format)));
  }
  WeightCache cache;
  cache.path = WeightCachePath(model_dir, format, options);
  const std::vector<TensorSpec> specs = CacheSpecs(config, format);
  const std::string fingerprint = SourceFingerprint(source);
  if (FileExists(cache.path)) {
    absl::StatusOr<std::unique_ptr<SafetensorsCollection>> existing =
        SafetensorsCollection::Open(cache.path, MappedFile::Mode::kReadOnly);
    cache.rebuild_reason = existing.ok() ? Mismatch(*(*existing)->files()[0], specs, format, fingerprint)
                                         : StrCat("damaged: ", existing.status().message());
    if (cache.rebuild_reason.empty()) {
      cache.files = std::move(*existing);
      return cache;
    }
    existing = absl::UnknownError("");  // unmap before the file is replaced
  } else {
    cache.rebuild_reason = "missing";
  }
  SEEDLING_RETURN_IF_ERROR(MakeDirs(std::filesystem::path(cache.path).parent_path().string()));
  const absl::Status built = Build(source, config, specs, format, fingerprint, cache.path, options);
  ReleaseFreeHeapMemory();  // the conversion's buffers: training would otherwise run on top of them
  SEEDLING_RETURN_IF_ERROR(built);
  cache.built = true;
  SEEDLING_ASSIGN_OR_RETURN(cache.files, SafetensorsCollection::Open(cache.path, MappedFile::Mode::kReadOnly));
  return cache;
}

}  // namespace seedling::model
