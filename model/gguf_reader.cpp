#include "model/gguf_reader.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>

#include "base/status.h"
#include "base/strings.h"

namespace seedling::model {
namespace {

using internal::kGgufDefaultAlignment;
using internal::kGgufMagic;
using internal::kGgufMaxDims;
using internal::kGgufMaxTensorName;

// Values are copied out of the mapping as they are in memory.
static_assert(std::endian::native == std::endian::little, "the GGUF reader assumes a little-endian host");

// The smallest possible encodings, for bounding counts by the bytes left before anything is
// allocated. A key-value pair: key length, at least one key byte, value type, a 1-byte value. A
// tensor info: name length, n_dims, one ne, type, offset.
constexpr uint64_t kMinKeyValueBytes = 8 + 1 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;
// The fixed header: magic, version, tensor count, key-value count.
constexpr uint64_t kHeaderBytes = 4 + 4 + 8 + 8;

// ggml's type traits (ggml.c type_traits): elements per block and bytes per block.
struct TypeTraits {
  GgmlType type;
  const char* name;
  uint64_t block;
  uint64_t bytes;
};

constexpr TypeTraits kGgmlTypes[] = {
    {GgmlType::kF32, "f32", 1, 4},
    {GgmlType::kF16, "f16", 1, 2},
    {GgmlType::kQ4_0, "q4_0", 32, 18},
    {GgmlType::kQ4_1, "q4_1", 32, 20},
    {GgmlType::kQ5_0, "q5_0", 32, 22},
    {GgmlType::kQ5_1, "q5_1", 32, 24},
    {GgmlType::kQ8_0, "q8_0", 32, 34},
    {GgmlType::kQ8_1, "q8_1", 32, 36},
    {GgmlType::kQ2_K, "q2_K", 256, 84},
    {GgmlType::kQ3_K, "q3_K", 256, 110},
    {GgmlType::kQ4_K, "q4_K", 256, 144},
    {GgmlType::kQ5_K, "q5_K", 256, 176},
    {GgmlType::kQ6_K, "q6_K", 256, 210},
    {GgmlType::kQ8_K, "q8_K", 256, 292},
    {GgmlType::kIQ2_XXS, "iq2_xxs", 256, 66},
    {GgmlType::kIQ2_XS, "iq2_xs", 256, 74},
    {GgmlType::kIQ3_XXS, "iq3_xxs", 256, 98},
    {GgmlType::kIQ1_S, "iq1_s", 256, 50},
    {GgmlType::kIQ4_NL, "iq4_nl", 32, 18},
    {GgmlType::kIQ3_S, "iq3_s", 256, 110},
    {GgmlType::kIQ2_S, "iq2_s", 256, 82},
    {GgmlType::kIQ4_XS, "iq4_xs", 256, 136},
    {GgmlType::kI8, "i8", 1, 1},
    {GgmlType::kI16, "i16", 1, 2},
    {GgmlType::kI32, "i32", 1, 4},
    {GgmlType::kI64, "i64", 1, 8},
    {GgmlType::kF64, "f64", 1, 8},
    {GgmlType::kIQ1_M, "iq1_m", 256, 56},
    {GgmlType::kBF16, "bf16", 1, 2},
    {GgmlType::kTQ1_0, "tq1_0", 256, 54},
    {GgmlType::kTQ2_0, "tq2_0", 256, 66},
    {GgmlType::kMXFP4, "mxfp4", 32, 17},
};

const TypeTraits* FindTraits(uint32_t type) {
  for (const TypeTraits& t : kGgmlTypes) {
    if (static_cast<uint32_t>(t.type) == type) return &t;
  }
  return nullptr;
}

// Bytes of a fixed-size value type; nullopt for strings, arrays and unknown types.
std::optional<uint64_t> ScalarBytes(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    case GgufValueType::kString:
    case GgufValueType::kArray:
      break;
  }
  return std::nullopt;
}

bool IsKnownValueType(uint32_t type) { return type <= static_cast<uint32_t>(GgufValueType::kFloat64); }

// The smallest encoding of one value of `type` (a string: its length; an array: type and count).
uint64_t MinValueBytes(GgufValueType type) {
  if (type == GgufValueType::kString) return 8;
  if (type == GgufValueType::kArray) return 4 + 8;
  return *ScalarBytes(type);
}

uint64_t AlignUp(uint64_t n, uint64_t alignment) { return (n + alignment - 1) / alignment * alignment; }

template <typename T>
T Load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

absl::Status FileError(absl::StatusCode code, std::string_view path, std::string_view message) {
  return absl::Status(code, ToAbsl(StrCat("GGUF file '", path, "': ", message)));
}

// A bounds-checked reader over the mapped header. Every read that would pass the end of the file
// is DataLoss naming what was being read.
class Cursor {
 public:
  explicit Cursor(const MappedFile& file) : file_(file) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return file_.size() - pos_; }
  const uint8_t* here() const { return file_.data() + pos_; }
  const std::string& path() const { return file_.path(); }

  absl::Status Skip(uint64_t n, std::string_view what) {
    if (n > remaining()) {
      return FileError(absl::StatusCode::kDataLoss, path(),
                       StrCat("truncated or corrupt: ", what, " (", n, " bytes at offset ", pos_,
                              ") runs past the end of the file (", file_.size(), " bytes)"));
    }
    pos_ += n;
    return absl::OkStatus();
  }

  template <typename T>
  absl::StatusOr<T> Read(std::string_view what) {
    const uint8_t* p = here();
    SEEDLING_RETURN_IF_ERROR(Skip(sizeof(T), what));
    return Load<T>(p);
  }

  absl::StatusOr<std::string_view> String(std::string_view what) {
    SEEDLING_ASSIGN_OR_RETURN(const uint64_t length, Read<uint64_t>(StrCat(what, " length")));
    const uint8_t* p = here();
    SEEDLING_RETURN_IF_ERROR(Skip(length, StrCat(what, " of length ", length)));
    return std::string_view(reinterpret_cast<const char*>(p), length);
  }

  // DataLoss unless `count` items of at least `min_bytes` each fit in the rest of the file. Run
  // before anything is sized by `count`.
  absl::Status CheckCount(uint64_t count, uint64_t min_bytes, std::string_view what) const {
    if (count <= remaining() / min_bytes) return absl::OkStatus();
    return FileError(absl::StatusCode::kDataLoss, path(),
                     StrCat("truncated or corrupt: ", what, " ", count, " needs at least ", min_bytes,
                            " bytes each, but only ", remaining(), " bytes remain after offset ", pos_));
  }

 private:
  const MappedFile& file_;
  uint64_t pos_ = 0;
};

absl::Status KeyError(const Cursor& in, std::string_view key, std::string_view message) {
  return FileError(absl::StatusCode::kInvalidArgument, in.path(), StrCat("key '", key, "': ", message));
}

absl::Status CheckBools(const Cursor& in, std::string_view key, const uint8_t* p, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) {
    if (p[i] > 1) return KeyError(in, key, StrCat("bool value ", int{p[i]}, " is neither 0 nor 1"));
  }
  return absl::OkStatus();
}

absl::StatusOr<GgufValueType> ReadValueType(Cursor& in, std::string_view key, const char* what) {
  SEEDLING_ASSIGN_OR_RETURN(const uint32_t type, in.Read<uint32_t>(StrCat("key '", key, "' ", what)));
  if (!IsKnownValueType(type)) return KeyError(in, key, StrCat("unknown ", what, " ", type));
  return static_cast<GgufValueType>(type);
}

absl::StatusOr<GgufValue> ParseValue(Cursor& in, std::string_view key, GgufValueType type, int depth);

// An array's header and elements; `depth` counts the arrays around this one.
absl::StatusOr<GgufValue> ParseArray(Cursor& in, std::string_view key, int depth) {
  if (depth >= kGgufMaxArrayDepth) {
    return KeyError(in, key, StrCat("arrays nested more than ", kGgufMaxArrayDepth, " deep"));
  }
  GgufValue value;
  value.type = GgufValueType::kArray;
  value.data = in.here();
  SEEDLING_ASSIGN_OR_RETURN(value.element_type, ReadValueType(in, key, "array element type"));
  SEEDLING_ASSIGN_OR_RETURN(value.count, in.Read<uint64_t>(StrCat("key '", key, "' array length")));
  SEEDLING_RETURN_IF_ERROR(
      in.CheckCount(value.count, MinValueBytes(value.element_type), StrCat("key '", key, "' array length")));
  value.elements = in.here();
  if (std::optional<uint64_t> size = ScalarBytes(value.element_type)) {
    SEEDLING_RETURN_IF_ERROR(in.Skip(value.count * *size, StrCat("key '", key, "' array")));
    if (value.element_type == GgufValueType::kBool) {
      SEEDLING_RETURN_IF_ERROR(CheckBools(in, key, value.elements, value.count));
    }
    return value;
  }
  for (uint64_t i = 0; i < value.count; ++i) {
    SEEDLING_RETURN_IF_ERROR(ParseValue(in, key, value.element_type, depth + 1));
  }
  return value;
}

// Validates one value of `type` at the cursor and moves past it.
absl::StatusOr<GgufValue> ParseValue(Cursor& in, std::string_view key, GgufValueType type, int depth) {
  if (type == GgufValueType::kArray) return ParseArray(in, key, depth);
  GgufValue value;
  value.type = type;
  value.data = in.here();
  if (type == GgufValueType::kString) {
    SEEDLING_RETURN_IF_ERROR(in.String(StrCat("key '", key, "' string")));
    return value;
  }
  SEEDLING_RETURN_IF_ERROR(in.Skip(*ScalarBytes(type), StrCat("key '", key, "' value")));
  if (type == GgufValueType::kBool) SEEDLING_RETURN_IF_ERROR(CheckBools(in, key, value.data, 1));
  return value;
}

struct Header {
  uint32_t version = 0;
  uint64_t tensor_count = 0;
  uint64_t metadata_count = 0;
};

absl::StatusOr<Header> ParseHeader(Cursor& in) {
  if (in.remaining() < kHeaderBytes) {
    return FileError(
        absl::StatusCode::kDataLoss, in.path(),
        StrCat("truncated: ", in.remaining(), " bytes, shorter than the ", kHeaderBytes, "-byte GGUF header"));
  }
  const uint32_t magic = *in.Read<uint32_t>("magic");
  if (magic != kGgufMagic) {
    return FileError(absl::StatusCode::kInvalidArgument, in.path(),
                     "not a GGUF file: the first 4 bytes are not the magic \"GGUF\"");
  }
  Header h;
  h.version = *in.Read<uint32_t>("version");
  if (h.version != 2 && h.version != 3) {
    const uint32_t swapped = __builtin_bswap32(h.version);
    return FileError(absl::StatusCode::kInvalidArgument, in.path(),
                     swapped == 2 || swapped == 3
                         ? std::string("big-endian GGUF files are not supported")
                         : StrCat("GGUF version ", h.version, " is not supported (2 and 3 are)"));
  }
  h.tensor_count = *in.Read<uint64_t>("tensor count");
  h.metadata_count = *in.Read<uint64_t>("metadata count");
  // Both sections must fit in what is left, however small their entries.
  SEEDLING_RETURN_IF_ERROR(in.CheckCount(h.metadata_count, kMinKeyValueBytes, "metadata count"));
  const uint64_t left = in.remaining() - h.metadata_count * kMinKeyValueBytes;
  if (h.tensor_count > left / kMinTensorInfoBytes) {
    return FileError(absl::StatusCode::kDataLoss, in.path(),
                     StrCat("truncated or corrupt: tensor count ", h.tensor_count, " needs at least ",
                            kMinTensorInfoBytes, " bytes each, but only ", left, " bytes remain for tensor infos"));
  }
  return h;
}

absl::Status ParseMetadata(Cursor& in, uint64_t count, std::map<std::string, GgufValue, std::less<>>& out) {
  for (uint64_t i = 0; i < count; ++i) {
    SEEDLING_ASSIGN_OR_RETURN(const std::string_view key, in.String(StrCat("key #", i)));
    if (key.empty()) {
      return FileError(absl::StatusCode::kInvalidArgument, in.path(), StrCat("key #", i, " is empty"));
    }
    SEEDLING_ASSIGN_OR_RETURN(const GgufValueType type, ReadValueType(in, key, "value type"));
    SEEDLING_ASSIGN_OR_RETURN(GgufValue value, ParseValue(in, key, type, 0));
    if (!out.emplace(std::string(key), value).second) {
      return KeyError(in, key, "duplicate key");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ParseAlignment(const std::string& path,
                                        const std::map<std::string, GgufValue, std::less<>>& md) {
  auto it = md.find("general.alignment");
  if (it == md.end()) return uint64_t{kGgufDefaultAlignment};
  if (it->second.type != GgufValueType::kUint32) {
    return FileError(
        absl::StatusCode::kInvalidArgument, path,
        StrCat("key 'general.alignment' has type ", GgufValueTypeName(it->second.type), ", expected uint32"));
  }
  const uint32_t alignment = Load<uint32_t>(it->second.data);
  if (alignment == 0 || !std::has_single_bit(alignment)) {
    return FileError(absl::StatusCode::kInvalidArgument, path,
                     StrCat("general.alignment ", alignment, " is not a power of two"));
  }
  return uint64_t{alignment};
}

absl::Status TensorError(const Cursor& in, std::string_view name, std::string_view message) {
  return FileError(absl::StatusCode::kInvalidArgument, in.path(), StrCat("tensor '", name, "': ", message));
}

// Reads ne[0..n_dims) into `info.shape` (reversed) and sets `info.nbytes`, checking sizes.
absl::Status ParseDims(Cursor& in, GgufTensorInfo& info, const TypeTraits*& traits) {
  SEEDLING_ASSIGN_OR_RETURN(const uint32_t n_dims, in.Read<uint32_t>(StrCat("tensor '", info.name, "' n_dims")));
  if (n_dims < 1 || n_dims > kGgufMaxDims) {
    return TensorError(in, info.name, StrCat("n_dims ", n_dims, " is outside [1, ", kGgufMaxDims, "]"));
  }
  std::vector<uint64_t> ne(n_dims);
  for (uint32_t d = 0; d < n_dims; ++d) {
    SEEDLING_ASSIGN_OR_RETURN(ne[d], in.Read<uint64_t>(StrCat("tensor '", info.name, "' ne")));
  }
  SEEDLING_ASSIGN_OR_RETURN(const uint32_t type, in.Read<uint32_t>(StrCat("tensor '", info.name, "' type")));
  traits = FindTraits(type);
  if (traits == nullptr) return TensorError(in, info.name, StrCat("unknown ggml type ", type));
  info.type = traits->type;
  uint64_t numel = 1;
  for (uint64_t n : ne) {
    if (n == 0 || __builtin_mul_overflow(numel, n, &numel) ||
        numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return TensorError(in, info.name, "a dimension is 0 or the element count overflows");
    }
  }
  info.shape.assign(ne.rbegin(), ne.rend());
  if (ne[0] % traits->block != 0) {
    return TensorError(
        in, info.name,
        StrCat("type ", traits->name, " stores blocks of ", traits->block, " elements, but ne[0] (the row length) is ",
               ne[0], ", not a multiple of ", traits->block));
  }
  if (__builtin_mul_overflow(numel / traits->block, traits->bytes, &info.nbytes)) {
    return TensorError(in, info.name, "the byte size overflows");
  }
  return absl::OkStatus();
}

absl::StatusOr<GgufTensorInfo> ParseTensorInfo(Cursor& in, uint64_t index, uint64_t alignment) {
  GgufTensorInfo info;
  SEEDLING_ASSIGN_OR_RETURN(const std::string_view name, in.String(StrCat("tensor #", index, " name")));
  info.name = std::string(name);
  if (name.size() > kGgufMaxTensorName) {
    return TensorError(in, info.name,
                       StrCat("name is ", name.size(), " bytes, longer than ggml's ", kGgufMaxTensorName));
  }
  const TypeTraits* traits = nullptr;
  SEEDLING_RETURN_IF_ERROR(ParseDims(in, info, traits));
  SEEDLING_ASSIGN_OR_RETURN(info.offset, in.Read<uint64_t>(StrCat("tensor '", info.name, "' offset")));
  if (info.offset % alignment != 0) {
    return TensorError(in, info.name,
                       StrCat("offset ", info.offset, " is not a multiple of the alignment ", alignment));
  }
  return info;
}

// Checks that the tensors' byte ranges lie in the data section without overlapping. Past the end:
// when the tensors are packed as GGUF writers lay them out (in offset order from 0, each at the
// aligned end of the one before), the header is believable and the file was cut short, DataLoss;
// otherwise the offset itself is wrong, InvalidArgument.
absl::Status CheckLayout(const std::string& path, const std::vector<GgufTensorInfo>& tensors, uint64_t data_size,
                         uint64_t alignment) {
  std::vector<const GgufTensorInfo*> sorted;
  sorted.reserve(tensors.size());
  for (const GgufTensorInfo& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  auto out_of_range = [&](const GgufTensorInfo& t) {
    return FileError(absl::StatusCode::kInvalidArgument, path,
                     StrCat("tensor '", t.name, "': offset ", t.offset, " + ", t.nbytes,
                            " bytes is out of range: the data section has ", data_size, " bytes"));
  };
  bool packed = true;
  uint64_t end = 0;  // the end of the previous tensor in offset order
  const GgufTensorInfo* previous = nullptr;
  for (const GgufTensorInfo* t : sorted) {
    uint64_t t_end = 0;
    if (__builtin_add_overflow(t->offset, t->nbytes, &t_end)) return out_of_range(*t);
    if (previous != nullptr && t->offset < end) {
      return FileError(absl::StatusCode::kInvalidArgument, path,
                       StrCat("tensors '", previous->name, "' and '", t->name, "' overlap: '", t->name,
                              "' starts at data offset ", t->offset, ", before '", previous->name, "' ends at ", end));
    }
    packed = packed && t->offset == AlignUp(end, alignment);
    end = t_end;
    previous = t;
  }
  for (const GgufTensorInfo* t : sorted) {
    if (t->offset + t->nbytes <= data_size) continue;
    if (packed) {
      return FileError(absl::StatusCode::kDataLoss, path,
                       StrCat("truncated: tensor '", t->name, "' occupies data bytes [", t->offset, ", ",
                              t->offset + t->nbytes, "), but the data section has only ", data_size, " bytes"));
    }
    return out_of_range(*t);
  }
  return absl::OkStatus();
}

}  // namespace

const char* GgufValueTypeName(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
      return "uint8";
    case GgufValueType::kInt8:
      return "int8";
    case GgufValueType::kUint16:
      return "uint16";
    case GgufValueType::kInt16:
      return "int16";
    case GgufValueType::kUint32:
      return "uint32";
    case GgufValueType::kInt32:
      return "int32";
    case GgufValueType::kFloat32:
      return "float32";
    case GgufValueType::kBool:
      return "bool";
    case GgufValueType::kString:
      return "string";
    case GgufValueType::kArray:
      return "array";
    case GgufValueType::kUint64:
      return "uint64";
    case GgufValueType::kInt64:
      return "int64";
    case GgufValueType::kFloat64:
      return "float64";
  }
  return "unknown";
}

std::string GgmlTypeName(GgmlType type) {
  const TypeTraits* traits = FindTraits(static_cast<uint32_t>(type));
  return traits != nullptr ? std::string(traits->name) : StrCat("type ", static_cast<uint32_t>(type));
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path, MappedFile::Mode mode) {
  SEEDLING_ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> file, MappedFile::Open(path, mode));
  return FromMapping(std::move(file));
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromMapping(std::shared_ptr<MappedFile> file) {
  const std::string& path = file->path();
  std::unique_ptr<GgufFile> result(new GgufFile());
  Cursor in(*file);
  SEEDLING_ASSIGN_OR_RETURN(const Header header, ParseHeader(in));
  result->version_ = header.version;
  SEEDLING_RETURN_IF_ERROR(ParseMetadata(in, header.metadata_count, result->metadata_));
  SEEDLING_ASSIGN_OR_RETURN(result->alignment_, ParseAlignment(path, result->metadata_));

  // ParseHeader bounded the count by the bytes left, so this reserve is at most file-sized.
  result->tensors_.reserve(header.tensor_count);
  for (uint64_t i = 0; i < header.tensor_count; ++i) {
    SEEDLING_ASSIGN_OR_RETURN(GgufTensorInfo info, ParseTensorInfo(in, i, result->alignment_));
    if (!result->tensor_index_.emplace(info.name, result->tensors_.size()).second) {
      return TensorError(in, info.name, "duplicate tensor name");
    }
    result->tensors_.push_back(std::move(info));
  }
  const uint64_t data_start = AlignUp(in.pos(), result->alignment_);
  const uint64_t data_size = data_start < file->size() ? file->size() - data_start : 0;
  SEEDLING_RETURN_IF_ERROR(CheckLayout(path, result->tensors_, data_size, result->alignment_));
  for (GgufTensorInfo& t : result->tensors_) {
    t.data = file->data() + data_start + t.offset;
    t.file = file;
  }
  result->file_ = std::move(file);
  return result;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<const GgufValue*> GgufFile::Typed(std::string_view key, GgufValueType type) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) {
    return FileError(absl::StatusCode::kNotFound, path(), StrCat("key '", key, "' is missing"));
  }
  if (it->second.type != type) {
    return FileError(absl::StatusCode::kInvalidArgument, path(),
                     StrCat("key '", key, "' has type ", GgufValueTypeName(it->second.type), ", expected ",
                            GgufValueTypeName(type)));
  }
  return &it->second;
}

absl::StatusOr<const GgufValue*> GgufFile::TypedArray(std::string_view key, GgufValueType element) const {
  SEEDLING_ASSIGN_OR_RETURN(const GgufValue* value, Typed(key, GgufValueType::kArray));
  if (value->element_type != element) {
    return FileError(absl::StatusCode::kInvalidArgument, path(),
                     StrCat("key '", key, "' is an array of ", GgufValueTypeName(value->element_type),
                            ", expected an array of ", GgufValueTypeName(element)));
  }
  return value;
}

absl::StatusOr<std::string_view> GgufFile::GetString(std::string_view key) const {
  SEEDLING_ASSIGN_OR_RETURN(const GgufValue* value, Typed(key, GgufValueType::kString));
  return std::string_view(reinterpret_cast<const char*>(value->data) + 8, Load<uint64_t>(value->data));
}

template <typename T>
absl::StatusOr<T> GgufFile::Scalar(std::string_view key, GgufValueType type) const {
  SEEDLING_ASSIGN_OR_RETURN(const GgufValue* value, Typed(key, type));
  return Load<T>(value->data);
}

absl::StatusOr<uint32_t> GgufFile::GetU32(std::string_view key) const {
  return Scalar<uint32_t>(key, GgufValueType::kUint32);
}

absl::StatusOr<int32_t> GgufFile::GetI32(std::string_view key) const {
  return Scalar<int32_t>(key, GgufValueType::kInt32);
}

absl::StatusOr<uint64_t> GgufFile::GetU64(std::string_view key) const {
  return Scalar<uint64_t>(key, GgufValueType::kUint64);
}

absl::StatusOr<float> GgufFile::GetF32(std::string_view key) const {
  return Scalar<float>(key, GgufValueType::kFloat32);
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  SEEDLING_ASSIGN_OR_RETURN(const uint8_t value, Scalar<uint8_t>(key, GgufValueType::kBool));
  return value != 0;
}

absl::StatusOr<GgufValue> GgufFile::GetArray(std::string_view key) const {
  SEEDLING_ASSIGN_OR_RETURN(const GgufValue* value, Typed(key, GgufValueType::kArray));
  return *value;
}

absl::StatusOr<std::vector<std::string_view>> GgufFile::GetStringArray(std::string_view key) const {
  SEEDLING_ASSIGN_OR_RETURN(const GgufValue* value, TypedArray(key, GgufValueType::kString));
  std::vector<std::string_view> out;
  out.reserve(value->count);
  const uint8_t* p = value->elements;
  for (uint64_t i = 0; i < value->count; ++i) {  // validated at Open
    const uint64_t length = Load<uint64_t>(p);
    out.emplace_back(reinterpret_cast<const char*>(p) + 8, length);
    p += 8 + length;
  }
  return out;
}

template <typename T>
absl::StatusOr<std::vector<T>> GgufFile::ScalarArray(std::string_view key, GgufValueType element) const {
  SEEDLING_ASSIGN_OR_RETURN(const GgufValue* value, TypedArray(key, element));
  std::vector<T> out(value->count);
  if (value->count > 0) std::memcpy(out.data(), value->elements, value->count * sizeof(T));
  return out;
}

absl::StatusOr<std::vector<int32_t>> GgufFile::GetI32Array(std::string_view key) const {
  return ScalarArray<int32_t>(key, GgufValueType::kInt32);
}

absl::StatusOr<std::vector<float>> GgufFile::GetF32Array(std::string_view key) const {
  return ScalarArray<float>(key, GgufValueType::kFloat32);
}

}  // namespace seedling::model
