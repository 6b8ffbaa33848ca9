#pragma once

// The weight cache: a model's frozen matrices in a GGUF block format (Q8_0 or Q4_0, model/quant.h),
// quantized once from the model's F32/F16/BF16 safetensors and memory-mapped read-only afterwards, so
// they are clean file-backed pages that the OS can drop under memory pressure and read back when needed.
//
// The cache is one safetensors file, `weights-<format>.safetensors`, in the cache directory:
//   matrices      U8 (rows, cols / 32, 34 or 18): the GGUF blocks of each row; F16 (rows, cols) for a
//                 matrix whose column count is not a multiple of 32 (MatrixFormatFor)
//   norms, biases F32
//   __metadata__  seedling.cache.version ("1"), seedling.cache.format ("q8_0" / "q4_0"),
//                 seedling.cache.source (SHA-256 over each source file's name, size, header bytes and 16
//                 evenly spaced 4 KiB samples of its data),
//                 seedling.cache.data_sha256 (SHA-256 of the data section)
// F32 tensors come first, then F16, then U8, so every tensor is aligned for its dtype in the mapping.
//
// Never trusted blindly: opening validates the safetensors structure (model/safetensors.h), the version,
// format and source fingerprint, every tensor's name, dtype and shape against the config, and the data
// digest. A missing, stale, truncated or damaged cache is rebuilt: written to a temporary file, fsynced
// and renamed, so a crash never leaves a partial cache behind. Building quantizes tensor by tensor and
// releases each source tensor's pages after use, so it needs about one tensor of extra memory.

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/quant.h"
#include "model/safetensors.h"

namespace seedling::model {

struct WeightCacheOptions {
  // Directory of the cache file (created if missing). Empty = "<model_dir>/.seedling-cache".
  std::string dir;
  // Called while building: (tensors done, tensors in all). May be empty.
  std::function<void(int64_t done, int64_t total)> progress;
};

struct WeightCache {
  std::unique_ptr<SafetensorsCollection> files;  // the cache file, mapped read-only (LoadWeights reads it)
  std::string path;
  bool built = false;          // true when this call (re)built the file
  std::string rebuild_reason;  // why it was rebuilt ("missing", "stale: ...", "damaged: ..."); empty if not
};

// The cache path for a model directory and format.
std::string WeightCachePath(const std::string& model_dir, WeightFormat format, const WeightCacheOptions& options);

// Opens the `format` cache of the model whose weights are `source` (opened from `model_dir`), building
// it first when missing, stale or damaged. `format` must be kQ8_0 or kQ4_0. Errors: InvalidArgument for a
// source tensor that cannot be quantized (non-finite values), I/O errors creating the directory or file
// (PermissionDenied for a read-only model directory: set `options.dir`).
absl::StatusOr<WeightCache> OpenWeightCache(const SafetensorsCollection& source, const std::string& model_dir,
                                            const ModelConfig& config, WeightFormat format,
                                            const WeightCacheOptions& options = {});

}  // namespace seedling::model
