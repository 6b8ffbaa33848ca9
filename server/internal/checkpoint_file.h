#pragma once

// The checkpoint file format of the store (server/store.h): a safetensors file of 1-D F32 vectors in the order
// they were written, with the version in its metadata. Internal to the store, which decides when a file may be
// written or read and records its SHA-256.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/file.h"
#include "server/store.h"

namespace seedling::server::store_internal {

// Writes `vectors` to `path` through `fs` (temporary file, fsync, rename, directory fsync) and returns the
// file's SHA-256 (hex).
absl::StatusOr<std::string> WriteCheckpointFile(const std::string& path, uint64_t version,
                                                const std::vector<NamedVector>& vectors, FileSystem* fs);

// Reads the vectors of `version` back, in the order they were written. `recorded_sha256`: the hash the store
// recorded for the file, if any. NotFound if there is no file and none was recorded; DataLoss if a recorded
// file is missing or its hash differs, if the file does not parse, holds another version or anything but 1-D
// F32 vectors.
absl::StatusOr<std::vector<NamedVector>> ReadCheckpointFile(const std::string& path, uint64_t version,
                                                            const std::optional<std::string>& recorded_sha256);

}  // namespace seedling::server::store_internal
