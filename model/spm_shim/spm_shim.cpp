// libseedling_spm_shim.so: wraps libsentencepiece behind the C ABI of model/internal/spm_shim_api.h.
// Built as a MODULE library and only ever dlopen'ed (see the header for why).

#include <sentencepiece_processor.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "model/internal/spm_shim_api.h"

struct seedling_spm {
  sentencepiece::SentencePieceProcessor processor;
};

namespace {

int Fail(const std::string& msg, char* err, size_t err_cap) {
  if (err != nullptr && err_cap > 0) {
    const size_t n = std::min(msg.size(), err_cap - 1);
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
  }
  return 1;
}

}  // namespace

extern "C" {

int seedling_spm_abi_version(void) { return SEEDLING_SPM_ABI_VERSION; }

int seedling_spm_load(const char* data, size_t len, seedling_spm** out, char* err, size_t err_cap) {
  try {
    auto spm = std::make_unique<seedling_spm>();
    const auto status = spm->processor.LoadFromSerializedProto(std::string_view(data, len));
    if (!status.ok()) return Fail(status.ToString(), err, err_cap);
    *out = spm.release();
    return 0;
  } catch (const std::exception& e) {
    return Fail(e.what(), err, err_cap);
  }
}

void seedling_spm_free(seedling_spm* spm) { delete spm; }

int seedling_spm_encode(const seedling_spm* spm, const char* text, size_t len, int32_t** ids, size_t* n, char* err,
                        size_t err_cap) {
  try {
    std::vector<int> v;
    const auto status = spm->processor.Encode(std::string_view(text, len), &v);
    if (!status.ok()) return Fail(status.ToString(), err, err_cap);
    auto* buf = static_cast<int32_t*>(std::malloc(std::max<size_t>(1, v.size()) * sizeof(int32_t)));
    if (buf == nullptr) return Fail("out of memory", err, err_cap);
    for (size_t i = 0; i < v.size(); ++i) buf[i] = v[i];
    *ids = buf;
    *n = v.size();
    return 0;
  } catch (const std::exception& e) {
    return Fail(e.what(), err, err_cap);
  }
}

int seedling_spm_decode(const seedling_spm* spm, const int32_t* ids, size_t n, char** text, size_t* len, char* err,
                        size_t err_cap) {
  try {
    std::vector<int> v(ids, ids + n);
    std::string out;
    const auto status = spm->processor.Decode(v, &out);
    if (!status.ok()) return Fail(status.ToString(), err, err_cap);
    char* buf = static_cast<char*>(std::malloc(std::max<size_t>(1, out.size())));
    if (buf == nullptr) return Fail("out of memory", err, err_cap);
    std::memcpy(buf, out.data(), out.size());
    *text = buf;
    *len = out.size();
    return 0;
  } catch (const std::exception& e) {
    return Fail(e.what(), err, err_cap);
  }
}

void seedling_spm_free_buffer(void* p) { std::free(p); }

int32_t seedling_spm_piece_size(const seedling_spm* spm) { return spm->processor.GetPieceSize(); }

const char* seedling_spm_id_to_piece(const seedling_spm* spm, int32_t id, size_t* len) {
  if (id < 0 || id >= spm->processor.GetPieceSize()) return nullptr;
  const std::string& piece = spm->processor.IdToPiece(id);
  *len = piece.size();
  return piece.data();
}

int32_t seedling_spm_piece_to_id(const seedling_spm* spm, const char* piece, size_t len) {
  const std::string_view p(piece, len);
  const int id = spm->processor.PieceToId(p);
  // PieceToId answers unk_id for unknown pieces; only the unknown piece itself maps to it legitimately.
  if (id == spm->processor.unk_id() && spm->processor.IdToPiece(id) != p) return -1;
  return id;
}

int seedling_spm_piece_type(const seedling_spm* spm, int32_t id) {
  if (id < 0 || id >= spm->processor.GetPieceSize()) return 0;
  if (spm->processor.IsUnknown(id)) return SEEDLING_SPM_UNKNOWN;
  if (spm->processor.IsControl(id)) return SEEDLING_SPM_CONTROL;
  if (spm->processor.IsUnused(id)) return SEEDLING_SPM_UNUSED;
  if (spm->processor.IsByte(id)) return SEEDLING_SPM_BYTE;
  return SEEDLING_SPM_NORMAL;  // user-defined pieces also report NORMAL (the processor API cannot tell)
}

float seedling_spm_piece_score(const seedling_spm* spm, int32_t id) {
  if (id < 0 || id >= spm->processor.GetPieceSize()) return 0.0f;
  return spm->processor.GetScore(id);
}

int32_t seedling_spm_bos_id(const seedling_spm* spm) { return spm->processor.bos_id(); }
int32_t seedling_spm_eos_id(const seedling_spm* spm) { return spm->processor.eos_id(); }
int32_t seedling_spm_unk_id(const seedling_spm* spm) { return spm->processor.unk_id(); }

}  // extern "C"
