#pragma once

// The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N,
// N bytes of JSON header {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"k": "v"}}, then the data section; offsets are relative to the data section.
//
// Reading maps the file (base/file.h MappedFile) and validates every header field before handing out any
// pointer: header size, JSON shape, dtype names, shape × dtype size = byte length, offsets inside the data
// section, no overlaps, no holes, no duplicate names. Errors are InvalidArgument (DataLoss for a truncated
// file) and name the file and the tensor. Nothing here depends on LibTorch.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/file.h"

namespace seedling::model {

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

// Bytes per element.
size_t DTypeSize(DType dtype);
// The safetensors name: "F32", "BF16", ...
std::string_view DTypeName(DType dtype);
// InvalidArgument for names this reader does not support (e.g. "F8_E4M3").
absl::StatusOr<DType> ParseDType(std::string_view name);

// One tensor inside a mapped file. `data` points into the mapping; it stays valid while `file` lives.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  std::shared_ptr<MappedFile> file;  // keeps the mapping alive

  int64_t numel() const;
};

// One .safetensors file.
class SafetensorsFile {
 public:
  // Maps and validates `path`. `mode` kCopyOnWrite lets callers write through tensor pointers (e.g. merging an
  // adapter in place) without touching the file.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path,
                                                               MappedFile::Mode mode = MappedFile::Mode::kReadOnly);
  // Validates the safetensors bytes `file` holds (a mapping, or bytes in memory: MappedFile::FromBytes).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromMapping(std::shared_ptr<MappedFile> file);

  // Tensors by name, in name order.
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  // nullptr if absent.
  const TensorView* Find(std::string_view name) const;
  // The optional "__metadata__" string map.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return file_->path(); }
  uint64_t file_size() const { return file_->size(); }
  // The header's JSON bytes and the data section, inside the mapping.
  std::string_view header() const { return header_; }
  std::span<const uint8_t> data_section() const { return data_section_; }
  // Drops the resident pages of `bytes` (inside this file's mapping) from RSS (MappedFile::Release).
  void Release(std::span<const uint8_t> bytes) const { file_->Release(bytes.data(), bytes.size()); }
  // The mapping the tensors view.
  const std::shared_ptr<MappedFile>& mapping() const { return file_; }

 private:
  SafetensorsFile() = default;

  std::shared_ptr<MappedFile> file_;
  std::string_view header_;
  std::span<const uint8_t> data_section_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All the weights of a model directory: `model.safetensors`, or the shards listed in
// `model.safetensors.index.json` ({"weight_map": {"tensor": "model-00001-of-00002.safetensors"}}). Also
// accepts the path of a single .safetensors file. Validates that every tensor of the index is in the shard
// the index names and that no tensor appears twice.
class SafetensorsCollection {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsCollection>> Open(
      const std::string& dir_or_file, MappedFile::Mode mode = MappedFile::Mode::kReadOnly);

  const TensorView* Find(std::string_view name) const;
  // All tensor names, sorted.
  std::vector<std::string> names() const;
  // The files, sorted by name (one for a single-file model).
  std::vector<const SafetensorsFile*> files() const;
  size_t size() const { return index_.size(); }

 private:
  SafetensorsCollection() = default;

  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*, std::less<>> index_;
};

// A tensor to write: the bytes are borrowed and must stay valid during the call.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::span<const uint8_t> data;
};

// The layout of a tensor whose bytes are produced while the file is written (WriteSafetensorsStreamed).
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};

// Produces tensor i's bytes (exactly dtype × shape of them), valid until the next call; an error aborts
// the write.
using TensorProducer = std::function<absl::StatusOr<std::span<const uint8_t>>(size_t index)>;

// Like WriteSafetensors, but each tensor's bytes are asked for when it is written, so only one tensor's
// bytes need exist at a time (e.g. a model quantized tensor by tensor). With `digest_key`, metadata[digest_key]
// is set to the lower-case hex SHA-256 of the data section (every tensor's bytes, in order): written as a
// placeholder first and filled in once the data is known. Nothing is left at `path` on error. The file goes
// through `fs` (null: FileSystem::Default(), base/file.h).
absl::Status WriteSafetensorsStreamed(const std::string& path, std::span<const TensorSpec> specs,
                                      const TensorProducer& produce,
                                      const std::map<std::string, std::string>& metadata = {},
                                      const std::string& digest_key = "", FileSystem* fs = nullptr);

// Writes a .safetensors file atomically (temp file, fsync, rename), streaming the tensors without copying
// them into one buffer. Tensors are laid out in the order given, contiguous from offset 0; the header is
// padded with spaces to a multiple of 8 bytes. InvalidArgument for duplicate or empty names or a byte
// length that does not match dtype × shape. The file goes through `fs` (null: FileSystem::Default()).
absl::Status WriteSafetensors(const std::string& path, std::span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata = {}, FileSystem* fs = nullptr);

}  // namespace seedling::model
