#include "model/safetensors.h"

#include <algorithm>
#include <bit>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <tuple>
#include <utility>

#include "base/check.h"
#include "base/file.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::model {
namespace {

// Tensor bytes pass through unconverted, and safetensors is little-endian.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

using Json = nlohmann::json;

// Hugging Face's reader refuses headers over 100 MB; a header this large is either corrupt or an
// attack, and refusing it before parsing keeps a bad file from costing gigabytes of JSON nodes.
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
constexpr uint64_t kHeaderLengthBytes = 8;
// The writer pads the header so that the data section, and so the first tensor, is 8-byte aligned.
constexpr uint64_t kHeaderAlignment = 8;
constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::string_view kSingleFileName = "model.safetensors";
constexpr std::string_view kIndexFileName = "model.safetensors.index.json";

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kF64, "F64", 8}, {DType::kF32, "F32", 4},   {DType::kF16, "F16", 2}, {DType::kBF16, "BF16", 2},
    {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},   {DType::kI16, "I16", 2}, {DType::kI8, "I8", 1},
    {DType::kU8, "U8", 1},   {DType::kBool, "BOOL", 1},
};

const DTypeInfo& InfoOf(DType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info;
  }
  // Only a cast from a bad integer gets here: a programming error, not bad input.
  SEEDLING_CHECK(false, "invalid DType value");
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += StrCat(i ? ", " : "", shape[i]);
  return out + "]";
}

// Bytes of a tensor of `shape` and `dtype`, or nullopt if a dimension is negative or the count
// overflows.
std::optional<uint64_t> CheckedByteSize(const std::vector<int64_t>& shape, DType dtype) {
  uint64_t numel = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return std::nullopt;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dim), &numel)) return std::nullopt;
  }
  // numel() returns int64_t, so the element count must fit it too.
  if (numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(numel, uint64_t{InfoOf(dtype).size}, &bytes)) return std::nullopt;
  return bytes;
}

absl::Status Error(absl::StatusCode code, std::string_view message) { return absl::Status(code, ToAbsl(message)); }

absl::Status FileError(absl::StatusCode code, std::string_view path, std::string_view message) {
  return Error(code, StrCat("safetensors file '", path, "': ", message));
}

absl::Status TensorError(absl::StatusCode code, std::string_view path, std::string_view tensor,
                         std::string_view message) {
  return Error(code, StrCat("safetensors file '", path, "': tensor '", tensor, "': ", message));
}

// Parses JSON and rejects duplicate keys in any object. nlohmann keeps the last of duplicate keys
// silently; in a safetensors header that would drop a tensor (the spec forbids duplicates), in an
// index it would pick one of two shards at random. The parser callback sees every key before it is
// inserted, so it tracks the keys of each object being parsed. `top_level_key` names what a
// top-level key is ("tensor name") for the message. InvalidArgument without a file name: callers
// add it.
absl::StatusOr<Json> ParseJsonRejectingDuplicates(std::string_view text, std::string_view top_level_key) {
  struct OpenObject {
    std::set<std::string> keys;
    std::string current_key;
  };
  std::vector<OpenObject> open;
  std::string duplicate;  // message for the first duplicate found
  auto callback = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        open.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        open.pop_back();
        break;
      case Json::parse_event_t::key: {
        std::string key = parsed.get<std::string>();
        OpenObject& object = open.back();
        if (!object.keys.insert(key).second && duplicate.empty()) {
          duplicate = open.size() == 1
                          ? StrCat("duplicate ", top_level_key, " '", key, "'")
                          : StrCat("duplicate key '", key, "' in '", open[open.size() - 2].current_key, "'");
        }
        object.current_key = std::move(key);
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    Json json = Json::parse(text.begin(), text.end(), callback);
    if (!duplicate.empty()) return Error(absl::StatusCode::kInvalidArgument, duplicate);
    return json;
  } catch (const Json::exception& e) {
    return Error(absl::StatusCode::kInvalidArgument, StrCat("not valid JSON: ", e.what()));
  }
}

// The non-negative integer in `json`, if it is one. nlohmann stores non-negative integer literals
// as number_unsigned, negative ones as number_integer, and fractions, exponents and values beyond
// 2^64 as number_float.
std::optional<uint64_t> AsUnsigned(const Json& json) {
  if (!json.is_number_unsigned()) return std::nullopt;
  return json.get<uint64_t>();
}

// One tensor entry of a header, checked on its own (layout checks come after all are parsed).
struct Entry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

absl::StatusOr<Entry> ParseEntry(const std::string& path, const std::string& name, const Json& json) {
  auto bad = [&](std::string_view message) {
    return TensorError(absl::StatusCode::kInvalidArgument, path, name, message);
  };
  if (!json.is_object()) return bad("header entry is not a JSON object");
  Entry entry;
  entry.name = name;

  auto dtype_it = json.find("dtype");
  if (dtype_it == json.end() || !dtype_it->is_string()) {
    return bad("\"dtype\" missing or not a string");
  }
  absl::StatusOr<DType> dtype = ParseDType(dtype_it->get_ref<const std::string&>());
  if (!dtype.ok()) return bad(FromAbsl(dtype.status().message()));
  entry.dtype = *dtype;

  auto shape_it = json.find("shape");
  if (shape_it == json.end() || !shape_it->is_array()) {
    return bad("\"shape\" missing or not an array");
  }
  for (const Json& dim : *shape_it) {
    if (!dim.is_number_integer()) {
      return bad(StrCat("shape ", shape_it->dump(), " is not an array of integers"));
    }
    if (!dim.is_number_unsigned()) {  // a negative literal (or -0)
      if (dim.get<int64_t>() < 0) {
        return bad(StrCat("negative dimension in shape ", shape_it->dump()));
      }
      entry.shape.push_back(0);
      continue;
    }
    const uint64_t value = dim.get<uint64_t>();
    if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return bad(StrCat("dimension ", value, " is too large"));
    }
    entry.shape.push_back(static_cast<int64_t>(value));
  }

  auto offsets_it = json.find("data_offsets");
  if (offsets_it == json.end() || !offsets_it->is_array() || offsets_it->size() != 2 || !AsUnsigned((*offsets_it)[0]) ||
      !AsUnsigned((*offsets_it)[1])) {
    return bad("\"data_offsets\" missing or not an array of two non-negative integers");
  }
  entry.begin = *AsUnsigned((*offsets_it)[0]);
  entry.end = *AsUnsigned((*offsets_it)[1]);
  if (entry.begin > entry.end) {
    return bad(StrCat("data_offsets [", entry.begin, ", ", entry.end, "] begin after end"));
  }

  std::optional<uint64_t> bytes = CheckedByteSize(entry.shape, entry.dtype);
  if (!bytes) {
    return bad(StrCat("shape ", ShapeString(entry.shape), " of ", DTypeName(entry.dtype),
                      " overflows 64 bits (dtype/shape mismatch with data_offsets)"));
  }
  if (*bytes != entry.end - entry.begin) {
    return bad(StrCat("dtype ", DTypeName(entry.dtype), " shape ", ShapeString(entry.shape), " needs ", *bytes,
                      " bytes but data_offsets [", entry.begin, ", ", entry.end, "] span ", entry.end - entry.begin,
                      " (dtype/shape mismatch)"));
  }
  return entry;
}

absl::StatusOr<std::map<std::string, std::string>> ParseMetadata(const std::string& path, const Json& json) {
  if (!json.is_object()) {
    return FileError(absl::StatusCode::kInvalidArgument, path, "\"__metadata__\" is not a JSON object of strings");
  }
  std::map<std::string, std::string> metadata;
  for (const auto& [key, value] : json.items()) {
    if (!value.is_string()) {
      return FileError(absl::StatusCode::kInvalidArgument, path,
                       StrCat("\"__metadata__\" value of '", key, "' is not a string: ", value.dump()));
    }
    metadata.emplace(key, value.get<std::string>());
  }
  return metadata;
}

// Checks that the entries tile the data section [0, data_size) exactly. The rule for offsets past
// the end: if the entries are otherwise a valid layout (contiguous from 0, no overlap), the header
// is believable and the file was cut short: DataLoss "truncated". If not, the header itself is
// wrong: InvalidArgument, with "out of range" for the first entry past the end in preference to the
// overlap or hole it also causes.
absl::Status CheckLayout(const std::string& path, const std::vector<Entry>& entries, uint64_t data_size) {
  std::vector<const Entry*> sorted;
  sorted.reserve(entries.size());
  for (const Entry& e : entries) sorted.push_back(&e);
  // Zero-size tensors sort before the tensor starting at their offset, so they are accepted
  // wherever they sit on a boundary, whatever the header order.
  std::sort(sorted.begin(), sorted.end(), [](const Entry* a, const Entry* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });

  absl::Status layout;
  uint64_t covered = 0;  // data section bytes [0, covered) are tiled so far
  const Entry* previous = nullptr;
  for (const Entry* e : sorted) {
    if (e->begin < covered) {
      layout =
          FileError(absl::StatusCode::kInvalidArgument, path,
                    StrCat("tensors '", previous->name, "' and '", e->name, "' overlap: data_offsets of '", e->name,
                           "' start at ", e->begin, ", before the end of '", previous->name, "' at ", covered));
      break;
    }
    if (e->begin > covered) {
      layout = FileError(
          absl::StatusCode::kInvalidArgument, path,
          StrCat("hole of ", e->begin - covered, " bytes in the data section at [", covered, ", ", e->begin, ") ",
                 previous ? StrCat("between tensors '", previous->name, "' and '", e->name, "'")
                          : StrCat("before tensor '", e->name, "'"),
                 "; tensors must cover the data section contiguously"));
      break;
    }
    covered = e->end;
    previous = e;
  }

  for (const Entry* e : sorted) {
    if (e->end <= data_size) continue;
    if (layout.ok()) {
      return TensorError(
          absl::StatusCode::kDataLoss, path, e->name,
          StrCat("truncated: data_offsets [", e->begin, ", ", e->end, "] end past the data section, which has ",
                 data_size, " of the ", covered, " bytes the header describes"));
    }
    return TensorError(
        absl::StatusCode::kInvalidArgument, path, e->name,
        StrCat("data_offsets [", e->begin, ", ", e->end, "] out of range: the data section has ", data_size, " bytes"));
  }
  if (!layout.ok()) return layout;
  if (covered < data_size) {
    return FileError(absl::StatusCode::kInvalidArgument, path,
                     StrCat("hole of ", data_size - covered, " bytes at the end of the data section: tensors cover ",
                            covered, " of ", data_size, " bytes"));
  }
  return absl::OkStatus();
}

// A shard name from an index must be a plain file name inside the model directory.
bool IsPlainFileName(std::string_view name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of(std::string_view("/\\\0", 3)) == std::string_view::npos;
}

// The shards of a sharded model, with an index of their tensors that points into them.
struct Shards {
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, const TensorView*, std::less<>> index;
};

absl::StatusOr<Shards> OpenShards(const std::string& dir, const std::string& index_path, MappedFile::Mode mode) {
  auto bad = [&](std::string_view message) {
    return Error(absl::StatusCode::kInvalidArgument, StrCat("safetensors index '", index_path, "': ", message));
  };
  SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(index_path));
  absl::StatusOr<Json> index = ParseJsonRejectingDuplicates(text, "key");
  if (!index.ok()) return bad(FromAbsl(index.status().message()));
  if (!index->is_object()) return bad("not a JSON object");
  auto weight_map_it = index->find("weight_map");
  if (weight_map_it == index->end() || !weight_map_it->is_object()) {
    return bad("\"weight_map\" missing or not a JSON object");
  }
  if (weight_map_it->empty()) return bad("\"weight_map\" lists no tensors");

  // tensor -> shard, and shard -> one tensor it should hold (for messages).
  std::map<std::string, std::string, std::less<>> shard_of;
  std::map<std::string, std::string> example_tensor;
  for (const auto& [tensor, shard] : weight_map_it->items()) {
    if (!shard.is_string()) {
      return bad(StrCat("shard of tensor '", tensor, "' is not a string: ", shard.dump()));
    }
    const std::string& shard_name = shard.get_ref<const std::string&>();
    if (!IsPlainFileName(shard_name)) {
      return bad(
          StrCat("shard '", shard_name, "' of tensor '", tensor, "' is not a plain file name in the model directory"));
    }
    shard_of.emplace(tensor, shard_name);
    example_tensor.emplace(shard_name, tensor);
  }

  Shards shards;
  // Each shard is mapped once, however many tensors the index puts in it.
  for (const auto& [shard_name, tensor] : example_tensor) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(JoinPath(dir, shard_name), mode);
    if (!file.ok()) {
      return Annotate(file.status(), StrCat("safetensors index '", index_path, "' names shard '", shard_name,
                                            "' (e.g. for tensor '", tensor, "')"));
    }
    for (const auto& [name, view] : (*file)->tensors()) {
      auto listed = shard_of.find(name);
      if (listed == shard_of.end()) {
        return bad(StrCat("shard '", shard_name, "' holds tensor '", name, "', which the index does not list"));
      }
      if (listed->second != shard_name) {
        return bad(StrCat("tensor '", name, "' is in shard '", shard_name, "' but the index puts it in shard '",
                          listed->second, "'"));
      }
      shards.index.emplace(name, &view);
    }
    shards.files.push_back(std::move(*file));
  }

  for (const auto& [tensor, shard_name] : shard_of) {
    if (!shards.index.contains(tensor)) {
      return bad(StrCat("index puts tensor '", tensor, "' in shard '", shard_name, "', which does not hold it"));
    }
  }
  return shards;
}

}  // namespace

size_t DTypeSize(DType dtype) { return InfoOf(dtype).size; }

std::string_view DTypeName(DType dtype) { return InfoOf(dtype).name; }

absl::StatusOr<DType> ParseDType(std::string_view name) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.name == name) return info.dtype;
  }
  std::string supported;
  for (const DTypeInfo& info : kDTypes) {
    supported += StrCat(supported.empty() ? "" : ", ", info.name);
  }
  return Error(absl::StatusCode::kInvalidArgument,
               StrCat("unsupported dtype '", name, "' (supported: ", supported, ")"));
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;  // cannot overflow: checked when the header was read
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path, MappedFile::Mode mode) {
  SEEDLING_ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> file, MappedFile::Open(path, mode));
  return FromMapping(std::move(file));
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromMapping(std::shared_ptr<MappedFile> file) {
  const std::string& path = file->path();
  const uint64_t size = file->size();
  if (size < kHeaderLengthBytes) {
    return FileError(absl::StatusCode::kDataLoss, path,
                     StrCat("truncated: ", size, " bytes, shorter than the 8-byte header length"));
  }
  uint64_t header_bytes = 0;
  for (uint64_t i = 0; i < kHeaderLengthBytes; ++i) {
    header_bytes |= uint64_t{file->data()[i]} << (8 * i);
  }
  if (header_bytes > kMaxHeaderBytes) {
    return FileError(
        absl::StatusCode::kInvalidArgument, path,
        StrCat("header length ", header_bytes, " exceeds the limit of ", kMaxHeaderBytes, " bytes (100 MiB)"));
  }
  if (header_bytes > size - kHeaderLengthBytes) {
    return FileError(absl::StatusCode::kDataLoss, path,
                     StrCat("truncated or corrupt: header length ", header_bytes,
                            " runs past the end of the file (file size ", size, " bytes)"));
  }

  const char* header_begin = reinterpret_cast<const char*>(file->data()) + kHeaderLengthBytes;
  absl::StatusOr<Json> header =
      ParseJsonRejectingDuplicates(std::string_view(header_begin, header_bytes), "tensor name");
  if (!header.ok()) {
    return FileError(absl::StatusCode::kInvalidArgument, path, StrCat("header: ", FromAbsl(header.status().message())));
  }
  if (!header->is_object()) {
    return FileError(absl::StatusCode::kInvalidArgument, path, "header is not a JSON object");
  }

  std::unique_ptr<SafetensorsFile> result(new SafetensorsFile());
  std::vector<Entry> entries;
  entries.reserve(header->size());
  try {
    for (const auto& [name, value] : header->items()) {
      if (name == kMetadataKey) {
        SEEDLING_ASSIGN_OR_RETURN(result->metadata_, ParseMetadata(path, value));
        continue;
      }
      SEEDLING_ASSIGN_OR_RETURN(Entry entry, ParseEntry(path, name, value));
      entries.push_back(std::move(entry));
    }
  } catch (const Json::exception& e) {
    // Backstop: the checks above test every type before reading it, and no exception may escape.
    return FileError(absl::StatusCode::kInvalidArgument, path, StrCat("bad header: ", e.what()));
  }

  const uint64_t data_offset = kHeaderLengthBytes + header_bytes;
  SEEDLING_RETURN_IF_ERROR(CheckLayout(path, entries, size - data_offset));

  const uint8_t* data = file->data() + data_offset;
  for (Entry& entry : entries) {
    TensorView view;
    view.name = entry.name;
    view.dtype = entry.dtype;
    view.shape = std::move(entry.shape);
    view.data = data + entry.begin;
    view.nbytes = entry.end - entry.begin;
    view.file = file;
    result->tensors_.emplace(std::move(entry.name), std::move(view));
  }
  result->header_ = std::string_view(header_begin, header_bytes);
  result->data_section_ = std::span<const uint8_t>(data, size - data_offset);
  result->file_ = std::move(file);
  return result;
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = tensors_.find(std::string(name));
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<std::unique_ptr<SafetensorsCollection>> SafetensorsCollection::Open(const std::string& dir_or_file,
                                                                                   MappedFile::Mode mode) {
  std::error_code ec;
  const std::filesystem::file_status status = std::filesystem::status(dir_or_file, ec);
  if (status.type() == std::filesystem::file_type::not_found) {
    return Error(absl::StatusCode::kNotFound, StrCat("model weights '", dir_or_file, "' do not exist"));
  }
  if (ec) {
    return Error(ec == std::errc::permission_denied ? absl::StatusCode::kPermissionDenied : absl::StatusCode::kInternal,
                 StrCat("cannot stat model weights '", dir_or_file, "': ", ec.message()));
  }

  std::unique_ptr<SafetensorsCollection> result(new SafetensorsCollection());
  std::string single_path = dir_or_file;
  if (std::filesystem::is_directory(status)) {
    // Like transformers, prefer the single file when a directory has both.
    single_path = JoinPath(dir_or_file, kSingleFileName);
    if (!FileExists(single_path)) {
      const std::string index_path = JoinPath(dir_or_file, kIndexFileName);
      if (!FileExists(index_path)) {
        return Error(absl::StatusCode::kNotFound, StrCat("model directory '", dir_or_file, "' has neither ",
                                                         kSingleFileName, " nor ", kIndexFileName));
      }
      SEEDLING_ASSIGN_OR_RETURN(Shards shards, OpenShards(dir_or_file, index_path, mode));
      result->files_ = std::move(shards.files);
      result->index_ = std::move(shards.index);
      return result;
    }
  }
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(single_path, mode));
  for (const auto& [name, view] : file->tensors()) result->index_.emplace(name, &view);
  result->files_.push_back(std::move(file));
  return result;
}

const TensorView* SafetensorsCollection::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

std::vector<const SafetensorsFile*> SafetensorsCollection::files() const {
  std::vector<const SafetensorsFile*> out;
  for (const auto& f : files_) out.push_back(f.get());
  return out;
}

std::vector<std::string> SafetensorsCollection::names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, view] : index_) names.push_back(name);
  return names;
}

namespace {

// The header, laid out in the given order in the compact form Hugging Face's library writes:
// {"__metadata__":{...},"name":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},...}, padded with spaces
// to kHeaderAlignment. Validates every spec first, so a bad call leaves nothing behind.
absl::StatusOr<std::string> BuildHeader(const std::string& path, std::span<const TensorSpec> specs,
                                        const std::map<std::string, std::string>& metadata,
                                        std::vector<uint64_t>& sizes) {
  auto bad = [&](std::string_view message) {
    return Error(absl::StatusCode::kInvalidArgument, StrCat("cannot write safetensors file '", path, "': ", message));
  };
  std::string header = "{";
  std::set<std::string_view> seen;
  uint64_t offset = 0;
  try {
    if (!metadata.empty()) {
      // nlohmann::json objects are std::maps, so the keys come out sorted, like `metadata`.
      header += StrCat("\"", kMetadataKey, "\":", Json(metadata).dump());
    }
    for (const TensorSpec& t : specs) {
      if (t.name.empty()) return bad("a tensor has an empty name");
      if (t.name == kMetadataKey) return bad(StrCat("a tensor cannot be named '", kMetadataKey, "'"));
      if (!seen.insert(t.name).second) return bad(StrCat("duplicate tensor name '", t.name, "'"));
      std::optional<uint64_t> bytes = CheckedByteSize(t.shape, t.dtype);
      if (!bytes) {
        return bad(
            StrCat("tensor '", t.name, "': shape ", ShapeString(t.shape), " has a negative dimension or overflows"));
      }
      uint64_t end = 0;
      if (__builtin_add_overflow(offset, *bytes, &end)) return bad("total size overflows 64 bits");
      header += StrCat(header.size() > 1 ? "," : "", Json(t.name).dump(), ":{\"dtype\":\"", DTypeName(t.dtype),
                       "\",\"shape\":[");
      for (size_t i = 0; i < t.shape.size(); ++i) header += StrCat(i ? "," : "", t.shape[i]);
      header += StrCat("],\"data_offsets\":[", offset, ",", end, "]}");
      sizes.push_back(*bytes);
      offset = end;
    }
  } catch (const Json::exception& e) {
    // dump() throws on strings that are not valid UTF-8.
    return bad(StrCat("names and metadata must be valid UTF-8: ", e.what()));
  }
  header += "}";
  header.append((kHeaderAlignment - header.size() % kHeaderAlignment) % kHeaderAlignment, ' ');
  if (header.size() > kMaxHeaderBytes) {
    return bad(StrCat("header of ", header.size(), " bytes exceeds the 100 MiB limit of readers"));
  }
  return header;
}

std::string LengthPrefix(uint64_t n) {
  std::string length(kHeaderLengthBytes, '\0');
  for (uint64_t i = 0; i < kHeaderLengthBytes; ++i) length[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return length;
}

}  // namespace

absl::Status WriteSafetensorsStreamed(const std::string& path, std::span<const TensorSpec> specs,
                                      const TensorProducer& produce, const std::map<std::string, std::string>& metadata,
                                      const std::string& digest_key, FileSystem* fs) {
  std::map<std::string, std::string> meta = metadata;
  // A placeholder of the digest's exact length, found again by its unique pattern.
  const std::string placeholder(64, '#');
  if (!digest_key.empty()) meta[digest_key] = placeholder;
  std::vector<uint64_t> sizes;
  SEEDLING_ASSIGN_OR_RETURN(std::string header, BuildHeader(path, specs, meta, sizes));
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<AtomicFileWriter> writer, AtomicFileWriter::Create(path, 0644, fs));
  SEEDLING_RETURN_IF_ERROR(writer->Append(LengthPrefix(header.size())));
  SEEDLING_RETURN_IF_ERROR(writer->Append(header));
  Sha256Hasher hasher;
  for (size_t i = 0; i < specs.size(); ++i) {
    SEEDLING_ASSIGN_OR_RETURN(std::span<const uint8_t> bytes, produce(i));
    if (bytes.size() != sizes[i]) {
      return absl::InvalidArgumentError(StrCat("cannot write safetensors file '", path, "': tensor '", specs[i].name,
                                               "' has ", bytes.size(), " bytes, but dtype ", DTypeName(specs[i].dtype),
                                               " shape ", ShapeString(specs[i].shape), " needs ", sizes[i]));
    }
    const std::string_view view(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    if (!digest_key.empty()) hasher.Update(view);
    SEEDLING_RETURN_IF_ERROR(writer->Append(view));
  }
  if (!digest_key.empty()) {
    const size_t at = header.find(placeholder);
    SEEDLING_CHECK(at != std::string::npos);
    SEEDLING_RETURN_IF_ERROR(writer->WriteAt(kHeaderLengthBytes + at, HexOf(hasher.Finish())));
  }
  return writer->Commit();
}

absl::Status WriteSafetensors(const std::string& path, std::span<const TensorToWrite> tensors,
                              const std::map<std::string, std::string>& metadata, FileSystem* fs) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const TensorToWrite& t : tensors) specs.push_back({t.name, t.dtype, t.shape});
  return WriteSafetensorsStreamed(
      path, specs, [&](size_t i) -> absl::StatusOr<std::span<const uint8_t>> { return tensors[i].data; }, metadata, "",
      fs);
}

}  // namespace seedling::model
