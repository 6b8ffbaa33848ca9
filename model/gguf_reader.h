#pragma once

// Reading GGUF files (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), the single-file
// format of llama.cpp, versions 2 and 3 (identical on a little-endian host). model/gguf.h writes
// them; model/gguf_model.h turns one into Seedling's config, weights and tokenizer.
//
// Open() maps the file and validates the whole header before handing out anything, as strictly as
// model/safetensors.h does: every count, string length and array length is checked against the
// bytes left in the file before anything is allocated or read (a count of 2^60 costs nothing),
// value types must be known, arrays nest at most kGgufMaxArrayDepth deep, keys and tensor names are
// unique, general.alignment is a power of two, tensor shapes and types are valid and their bytes
// lie aligned, inside the data section, without overlapping. Errors name the file and the key or
// tensor:
//   DataLoss        the file ends before something it declares (a truncated download, or a length
//                   or count too large for the file);
//   InvalidArgument anything else malformed (bad magic, unsupported version, unknown type, ...).
// Metadata values and tensor data stay in the mapping; nothing is copied at Open.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "base/file.h"
#include "model/internal/gguf_format.h"

namespace seedling::model {

using GgufValueType = internal::GgufValueType;
using GgmlType = internal::GgmlType;

// Arrays of arrays nest at most this deep (an array of scalars has depth 1). llama.cpp writes no
// nested arrays at all; the bound keeps a hostile file from driving the validator's recursion.
inline constexpr int kGgufMaxArrayDepth = 4;

// "uint32", "string", "array", ... for messages.
const char* GgufValueTypeName(GgufValueType type);
// ggml's name of a tensor type ("f32", "q4_0", "q6_K", "bf16"); "type <n>" for unknown values.
std::string GgmlTypeName(GgmlType type);

// One metadata value, viewing the mapped file (valid while its GgufFile lives). Read it through
// GgufFile's typed getters.
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  const uint8_t* data = nullptr;  // the encoded value, after its type field
  // Arrays only.
  GgufValueType element_type = GgufValueType::kUint8;
  uint64_t count = 0;
  const uint8_t* elements = nullptr;  // the first element
};

// One tensor of the file.
struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<int64_t> shape;  // PyTorch order: the file's ne reversed (ne[0], fastest, is last)
  uint64_t offset = 0;         // from the start of the data section
  const uint8_t* data = nullptr;
  uint64_t nbytes = 0;
  std::shared_ptr<MappedFile> file;  // keeps `data` alive
};

// A validated, memory-mapped GGUF file. Immutable; thread-safe for concurrent reads.
class GgufFile {
 public:
  // Maps `path` and validates it (see the file comment). `mode` kCopyOnWrite lets callers write
  // through tensor pointers (e.g. merge an adapter into a weight) without changing the file.
  // NotFound / PermissionDenied from the file system; DataLoss / InvalidArgument for bad content.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path,
                                                        MappedFile::Mode mode = MappedFile::Mode::kReadOnly);
  // Validates the GGUF bytes `file` holds (a mapping, or bytes in memory: MappedFile::FromBytes).
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromMapping(std::shared_ptr<MappedFile> file);

  const std::string& path() const { return file_->path(); }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::shared_ptr<MappedFile>& file() const { return file_; }

  // ---- Metadata. Getters return NotFound for a missing key and InvalidArgument for a value of
  // another type, both naming the file and the key. String results view the mapping.
  const std::map<std::string, GgufValue, std::less<>>& metadata() const { return metadata_; }
  bool Has(std::string_view key) const { return metadata_.find(key) != metadata_.end(); }
  absl::StatusOr<std::string_view> GetString(std::string_view key) const;
  absl::StatusOr<uint32_t> GetU32(std::string_view key) const;
  absl::StatusOr<int32_t> GetI32(std::string_view key) const;
  absl::StatusOr<uint64_t> GetU64(std::string_view key) const;
  absl::StatusOr<float> GetF32(std::string_view key) const;
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  // An array of any element type, unread (for its element type and length).
  absl::StatusOr<GgufValue> GetArray(std::string_view key) const;
  absl::StatusOr<std::vector<std::string_view>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<int32_t>> GetI32Array(std::string_view key) const;
  absl::StatusOr<std::vector<float>> GetF32Array(std::string_view key) const;

  // ---- Tensors, in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  // nullptr if absent.
  const GgufTensorInfo* FindTensor(std::string_view name) const;

 private:
  GgufFile() = default;
  // The value of `key` if it has `type`, else NotFound / InvalidArgument.
  absl::StatusOr<const GgufValue*> Typed(std::string_view key, GgufValueType type) const;
  // The value of `key` if it is an array of `element`.
  absl::StatusOr<const GgufValue*> TypedArray(std::string_view key, GgufValueType element) const;
  // A fixed-size value or array of them, `T` being the C++ type of `type` (defined in the .cpp).
  template <typename T>
  absl::StatusOr<T> Scalar(std::string_view key, GgufValueType type) const;
  template <typename T>
  absl::StatusOr<std::vector<T>> ScalarArray(std::string_view key, GgufValueType element) const;

  // Constant after Open.
  std::shared_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  uint64_t alignment_ = internal::kGgufDefaultAlignment;
  std::map<std::string, GgufValue, std::less<>> metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;  // name -> index into tensors_
};

}  // namespace seedling::model
