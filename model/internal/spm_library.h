#pragma once

// Loads libseedling_spm_shim.so (see spm_shim_api.h for why SentencePiece lives behind dlopen) and exposes
// its functions. The library is found, in order, at: $SEEDLING_SPM_SHIM; next to the running executable;
// in ../lib relative to it; next to the shared library holding this code (libseedling_client.so); at the
// path the build wrote it to; at the path `cmake --install` puts it.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/internal/spm_shim_api.h"

namespace seedling::model::internal {

struct SpmLibrary {
  decltype(&seedling_spm_load) load = nullptr;
  decltype(&seedling_spm_free) free = nullptr;
  decltype(&seedling_spm_encode) encode = nullptr;
  decltype(&seedling_spm_decode) decode = nullptr;
  decltype(&seedling_spm_free_buffer) free_buffer = nullptr;
  decltype(&seedling_spm_piece_size) piece_size = nullptr;
  decltype(&seedling_spm_id_to_piece) id_to_piece = nullptr;
  decltype(&seedling_spm_piece_to_id) piece_to_id = nullptr;
  decltype(&seedling_spm_piece_type) piece_type = nullptr;
  decltype(&seedling_spm_piece_score) piece_score = nullptr;
  decltype(&seedling_spm_bos_id) bos_id = nullptr;
  decltype(&seedling_spm_eos_id) eos_id = nullptr;
  decltype(&seedling_spm_unk_id) unk_id = nullptr;
  std::string path;  // where it was loaded from
};

// Opens the shim once per process and returns its function table (never unloaded; thread-safe).
// NotFound lists the places searched; FailedPrecondition for an ABI version mismatch.
absl::StatusOr<const SpmLibrary*> OpenSpmLibrary();

}  // namespace seedling::model::internal
