#pragma once

// C ABI of libseedling_spm_shim.so, the only place that links libsentencepiece.
//
// Why a separate, dlopen'ed library: Debian's libsentencepiece bundles its own copy of protobuf-lite 3.14
// and exports those symbols. In a process that also loads libprotobuf 3.21 (LibTorch does, and so does
// comms/), the two copies interpose each other and the process crashes during static initialization.
// The shim is opened with RTLD_LOCAL | RTLD_DEEPBIND, so SentencePiece binds to its bundled protobuf and
// nothing else sees it. See model/internal/spm_library.h for the loader.
//
// Pitfall: with RTLD_DEEPBIND, code inside the shim that writes to std::cerr uses libstdc++'s own copy,
// which is never initialized when the executable holds a copy relocation of std::cerr, and crashes. Loading
// and encoding do not log; SentencePiece's trainer does, which is why it is not exposed here.
//
// Conventions: functions return 0 on success; on failure they write a NUL-terminated message into
// `err` (capacity `err_cap`) and return non-zero. Buffers handed out are freed with seedling_spm_free_buffer.

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SEEDLING_SPM_ABI_VERSION 1

typedef struct seedling_spm seedling_spm;

// Piece types, as in SentencePiece's ModelProto.SentencePiece.Type.
enum {
  SEEDLING_SPM_NORMAL = 1,
  SEEDLING_SPM_UNKNOWN = 2,
  SEEDLING_SPM_CONTROL = 3,
  SEEDLING_SPM_USER_DEFINED = 4,  // reported as NORMAL: SentencePiece's processor API cannot tell them apart
  SEEDLING_SPM_UNUSED = 5,
  SEEDLING_SPM_BYTE = 6,
};

int seedling_spm_abi_version(void);
// Loads a serialized ModelProto (a tokenizer.model file's bytes).
int seedling_spm_load(const char* data, size_t len, seedling_spm** out, char* err, size_t err_cap);
void seedling_spm_free(seedling_spm* spm);
// Encodes UTF-8 text to ids (malloc'd array in *ids, count in *n).
int seedling_spm_encode(const seedling_spm* spm, const char* text, size_t len, int32_t** ids, size_t* n, char* err,
                        size_t err_cap);
// Decodes ids to UTF-8 text (malloc'd, not NUL-terminated; length in *len).
int seedling_spm_decode(const seedling_spm* spm, const int32_t* ids, size_t n, char** text, size_t* len, char* err,
                        size_t err_cap);
void seedling_spm_free_buffer(void* p);
int32_t seedling_spm_piece_size(const seedling_spm* spm);
// The piece string of `id` (borrowed, valid while spm lives; length in *len); NULL if out of range.
const char* seedling_spm_id_to_piece(const seedling_spm* spm, int32_t id, size_t* len);
// The id of a piece, or -1 if it is not in the vocabulary.
int32_t seedling_spm_piece_to_id(const seedling_spm* spm, const char* piece, size_t len);
// One of the SEEDLING_SPM_* types, or 0 if out of range.
int seedling_spm_piece_type(const seedling_spm* spm, int32_t id);
// The piece's score (for BPE models, higher merges first), or 0 if out of range.
float seedling_spm_piece_score(const seedling_spm* spm, int32_t id);
// Special ids, -1 when the model has none.
int32_t seedling_spm_bos_id(const seedling_spm* spm);
int32_t seedling_spm_eos_id(const seedling_spm* spm);
int32_t seedling_spm_unk_id(const seedling_spm* spm);

#ifdef __cplusplus
}
#endif
