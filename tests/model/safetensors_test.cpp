#include "model/safetensors.h"

#include <stdlib.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "base/file.h"
#include "base/strings.h"

namespace seedling::model {
namespace {

using Catch::Matchers::Contains;

// A fresh directory per test, removed with everything in it at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "seedling_safetensors_test_XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string file(std::string_view name) const { return JoinPath(path_, name); }
  size_t num_entries() const {
    size_t n = 0;
    for (const auto& entry : std::filesystem::directory_iterator(path_)) {
      (void)entry;
      ++n;
    }
    return n;
  }

 private:
  std::string path_;
};

// Writes `bytes` as they are. No fsync: the fuzz test writes hundreds of files.
void WriteBytes(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  REQUIRE(out.good());
}

std::string LengthPrefix(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out;
}

// A hand-made safetensors file: the 8-byte little-endian length of `header`, `header`, then `data`.
std::string RawFile(std::string_view header, std::string_view data) {
  return StrCat(LengthPrefix(header.size()), header, data);
}

template <typename T>
std::span<const uint8_t> AsBytes(const std::vector<T>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)};
}

std::string Message(const absl::Status& status) { return std::string(FromAbsl(status.message())); }

void CheckError(const absl::Status& status, absl::StatusCode code, const std::string& needle) {
  INFO(status.ToString());
  CHECK(status.code() == code);
  CHECK_THAT(Message(status), Contains(needle));
}

// Writes `header` + `data` as a file in `dir` and returns the status of opening it.
absl::Status OpenRaw(const TempDir& dir, std::string_view header, std::string_view data) {
  const std::string path = dir.file("t.safetensors");
  WriteBytes(path, RawFile(header, data));
  return SafetensorsFile::Open(path).status();
}

// ---------------------------------------------------------------------------------------------------
// dtypes

TEST_CASE("ParseDType inverts DTypeName for every dtype and DTypeSize gives element bytes", "[model][safetensors]") {
  const std::vector<std::pair<DType, size_t>> all = {
      {DType::kF64, 8}, {DType::kF32, 4}, {DType::kF16, 2}, {DType::kBF16, 2}, {DType::kI64, 8},
      {DType::kI32, 4}, {DType::kI16, 2}, {DType::kI8, 1},  {DType::kU8, 1},   {DType::kBool, 1}};
  for (const auto& [dtype, size] : all) {
    INFO(DTypeName(dtype));
    auto parsed = ParseDType(DTypeName(dtype));
    REQUIRE(parsed.ok());
    CHECK(*parsed == dtype);
    CHECK(DTypeSize(dtype) == size);
  }
  CHECK(DTypeName(DType::kBF16) == "BF16");
  CHECK(DTypeName(DType::kBool) == "BOOL");
}

TEST_CASE("ParseDType rejects F8 types and unknown names as unsupported", "[model][safetensors]") {
  CheckError(ParseDType("F8_E4M3").status(), absl::StatusCode::kInvalidArgument, "unsupported dtype 'F8_E4M3'");
  CheckError(ParseDType("f32").status(), absl::StatusCode::kInvalidArgument, "unsupported dtype");
}

// ---------------------------------------------------------------------------------------------------
// Round trip and the written format

TEST_CASE("Tensors written by WriteSafetensors read back with the same dtype, shape, bytes and metadata",
          "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 1e-3f, 7.0f};
  const std::vector<uint16_t> f16 = {0x3c00, 0x4000, 0xc000, 0x7bff};
  const std::vector<uint16_t> bf16 = {0x3f80, 0x4000, 0x0001};
  const std::vector<int64_t> scalar = {-42};
  const std::vector<uint8_t> empty;
  const std::vector<TensorToWrite> tensors = {
      {"weight", DType::kF32, {2, 3}, AsBytes(f32)}, {"half", DType::kF16, {4}, AsBytes(f16)},
      {"brain", DType::kBF16, {3}, AsBytes(bf16)},   {"step", DType::kI64, {}, AsBytes(scalar)},
      {"empty", DType::kU8, {0, 5}, AsBytes(empty)},
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "round \"trip\""}};
  REQUIRE(WriteSafetensors(path, tensors, metadata).ok());

  auto file = SafetensorsFile::Open(path);
  REQUIRE(file.ok());
  CHECK((*file)->path() == path);
  CHECK((*file)->metadata() == metadata);
  REQUIRE((*file)->tensors().size() == tensors.size());
  for (const TensorToWrite& t : tensors) {
    INFO(t.name);
    const TensorView* view = (*file)->Find(t.name);
    REQUIRE(view != nullptr);
    CHECK(view->name == t.name);
    CHECK(view->dtype == t.dtype);
    CHECK(view->shape == t.shape);
    CHECK(view->nbytes == t.data.size());
    CHECK(view->numel() * static_cast<int64_t>(DTypeSize(t.dtype)) == static_cast<int64_t>(t.data.size()));
    REQUIRE(view->file != nullptr);
    CHECK(view->data >= view->file->data());
    CHECK(view->data + view->nbytes <= view->file->data() + view->file->size());
    if (!t.data.empty()) CHECK(std::memcmp(view->data, t.data.data(), t.data.size()) == 0);
  }
  CHECK((*file)->Find("step")->numel() == 1);
  CHECK((*file)->Find("empty")->numel() == 0);
  const TensorView* first = (*file)->Find("weight");
  CHECK((first->data - first->file->data()) % 8 == 0);
  CHECK(first->file->mode() == MappedFile::Mode::kReadOnly);
}

TEST_CASE("WriteSafetensors writes the exact bytes of Hugging Face's layout for a small case", "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("small.safetensors");
  const std::vector<float> a = {1.0f, 2.0f};
  const std::vector<uint8_t> b = {1, 2, 3};
  const std::vector<TensorToWrite> tensors = {{"a", DType::kF32, {2}, AsBytes(a)}, {"b", DType::kU8, {3}, AsBytes(b)}};
  REQUIRE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());

  // 138 bytes of compact JSON, __metadata__ first, padded with 6 spaces to 144 = 0x90 so that the
  // data is 8-byte aligned. (Hugging Face's writer sorts by descending dtype size, then name, which
  // gives this order too.)
  const std::string header = R"({"__metadata__":{"format":"pt"},)"
                             R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}})";
  REQUIRE(header.size() == 138);
  const std::string expected = std::string("\x90\0\0\0\0\0\0\0", 8) + header + "      " +
                               std::string("\x00\x00\x80\x3f\x00\x00\x00\x40\x01\x02\x03", 11);
  auto written = ReadFile(path);
  REQUIRE(written.ok());
  CHECK(*written == expected);
}

TEST_CASE("WriteSafetensors lays tensors out in the order given", "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("order.safetensors");
  const std::vector<uint8_t> z = {9, 9};
  const std::vector<uint8_t> a = {1};
  const std::vector<TensorToWrite> tensors = {{"z", DType::kU8, {2}, AsBytes(z)}, {"a", DType::kU8, {1}, AsBytes(a)}};
  REQUIRE(WriteSafetensors(path, tensors).ok());
  auto file = SafetensorsFile::Open(path);
  REQUIRE(file.ok());
  CHECK((*file)->Find("a")->data - (*file)->Find("z")->data == 2);
  CHECK((*file)->metadata().empty());
  auto written = ReadFile(path);
  REQUIRE(written.ok());
  CHECK(written->find("__metadata__") == std::string::npos);
}

TEST_CASE("A header listing tensors out of offset order with a zero-size tensor between them is valid",
          "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  WriteBytes(path, RawFile(R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},)"
                           R"("z":{"dtype":"F32","shape":[3,0],"data_offsets":[2,2]},)"
                           R"("a":{"dtype":"I16","shape":[],"data_offsets":[0,2]}})",
                           "ABCD"));
  auto file = SafetensorsFile::Open(path);
  REQUIRE(file.ok());
  CHECK(std::string(reinterpret_cast<const char*>((*file)->Find("b")->data), 2) == "CD");
  CHECK((*file)->Find("z")->nbytes == 0);
  CHECK((*file)->Find("z")->shape == std::vector<int64_t>{3, 0});
  CHECK((*file)->Find("a")->numel() == 1);
}

TEST_CASE("Copy-on-write mode lets callers write through a tensor without changing the file", "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("cow.safetensors");
  const std::vector<uint8_t> bytes = {1, 2, 3, 4};
  const std::vector<TensorToWrite> tensors = {{"t", DType::kU8, {4}, AsBytes(bytes)}};
  REQUIRE(WriteSafetensors(path, tensors).ok());
  {
    auto file = SafetensorsFile::Open(path, MappedFile::Mode::kCopyOnWrite);
    REQUIRE(file.ok());
    const TensorView* t = (*file)->Find("t");
    REQUIRE(t->file->mode() == MappedFile::Mode::kCopyOnWrite);
    uint8_t* writable = t->file->mutable_data() + (t->data - t->file->data());
    writable[0] = 77;
    CHECK(t->data[0] == 77);
  }
  auto again = SafetensorsFile::Open(path);
  REQUIRE(again.ok());
  CHECK((*again)->Find("t")->data[0] == 1);
}

TEST_CASE("Safetensors bytes in memory parse as the file does, and corrupt bytes fail the same way",
          "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  const std::vector<uint8_t> a = {1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<uint8_t> b = {9, 10};
  const std::vector<TensorToWrite> tensors = {{"a", DType::kF32, {2}, AsBytes(a)}, {"b", DType::kU8, {2}, AsBytes(b)}};
  REQUIRE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());
  auto from_file = SafetensorsFile::Open(path);
  REQUIRE(from_file.ok());
  auto bytes = ReadFile(path);
  REQUIRE(bytes.ok());
  auto in_memory = SafetensorsFile::FromMapping(MappedFile::FromBytes("buffer", *bytes));
  REQUIRE(in_memory.ok());
  CHECK((*in_memory)->header() == (*from_file)->header());
  CHECK((*in_memory)->metadata() == (*from_file)->metadata());
  REQUIRE((*in_memory)->tensors().size() == 2);
  for (const auto& [name, view] : (*from_file)->tensors()) {
    const TensorView* other = (*in_memory)->Find(name);
    REQUIRE(other != nullptr);
    CHECK(other->shape == view.shape);
    CHECK(std::memcmp(other->data, view.data, view.nbytes) == 0);
  }
  auto cut = SafetensorsFile::FromMapping(MappedFile::FromBytes("buffer", bytes->substr(0, bytes->size() - 1)));
  REQUIRE(!cut.ok());
  CHECK(cut.status().code() == absl::StatusCode::kDataLoss);
  CHECK(std::string(cut.status().message()).find("buffer") != std::string::npos);
}

TEST_CASE("Find returns nullptr for a tensor that is not present", "[model][safetensors]") {
  TempDir dir;
  const std::vector<uint8_t> bytes = {1};
  const std::vector<TensorToWrite> tensors = {{"present", DType::kU8, {1}, AsBytes(bytes)}};
  REQUIRE(WriteSafetensors(dir.file("model.safetensors"), tensors).ok());
  auto file = SafetensorsFile::Open(dir.file("model.safetensors"));
  REQUIRE(file.ok());
  CHECK((*file)->Find("present") != nullptr);
  CHECK((*file)->Find("absent") == nullptr);
  CHECK((*file)->Find("__metadata__") == nullptr);
  auto collection = SafetensorsCollection::Open(dir.path());
  REQUIRE(collection.ok());
  CHECK((*collection)->Find("present") != nullptr);
  CHECK((*collection)->Find("absent") == nullptr);
}

// ---------------------------------------------------------------------------------------------------
// Corrupt files

TEST_CASE("A file shorter than 8 bytes is DataLoss truncated", "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("short.safetensors");
  WriteBytes(path, "abc");
  const absl::Status status = SafetensorsFile::Open(path).status();
  CheckError(status, absl::StatusCode::kDataLoss, "truncated");
  CHECK_THAT(Message(status), Contains(path));
}

TEST_CASE("A file cut short inside the data section is DataLoss truncated naming the tensor", "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("cut.safetensors");
  const std::vector<float> a = {1, 2};
  const std::vector<float> b = {3, 4, 5};
  const std::vector<TensorToWrite> tensors = {{"a", DType::kF32, {2}, AsBytes(a)}, {"b", DType::kF32, {3}, AsBytes(b)}};
  REQUIRE(WriteSafetensors(path, tensors).ok());
  auto bytes = ReadFile(path);
  REQUIRE(bytes.ok());
  WriteBytes(path, std::string_view(*bytes).substr(0, bytes->size() - 3));
  const absl::Status status = SafetensorsFile::Open(path).status();
  CheckError(status, absl::StatusCode::kDataLoss, "truncated");
  CHECK_THAT(Message(status), Contains("tensor 'b'"));
  CHECK_THAT(Message(status), Contains(path));
}

TEST_CASE("A header length beyond the end of the file is DataLoss naming both sizes", "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  WriteBytes(path, LengthPrefix(1000) + "{}");
  const absl::Status status = SafetensorsFile::Open(path).status();
  CheckError(status, absl::StatusCode::kDataLoss, "header length 1000");
  CHECK_THAT(Message(status), Contains("file size 10 bytes"));
}

TEST_CASE("A header length over 100 MiB is refused as InvalidArgument before it is read", "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  WriteBytes(path, LengthPrefix((uint64_t{100} << 20) + 1) + "{}      ");
  CheckError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument, "100 MiB");
  WriteBytes(path, LengthPrefix(~uint64_t{0}) + "{}      ");
  CheckError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument, "100 MiB");
}

TEST_CASE("A header that is not JSON is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  CheckError(OpenRaw(dir, R"({"a": {"dtype": )", ""), absl::StatusCode::kInvalidArgument, "not valid JSON");
  CheckError(OpenRaw(dir, "", ""), absl::StatusCode::kInvalidArgument, "not valid JSON");
}

TEST_CASE("A header that is JSON but not an object is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  CheckError(OpenRaw(dir, "[1, 2]", ""), absl::StatusCode::kInvalidArgument, "header is not a JSON object");
}

TEST_CASE("A tensor entry with a missing or ill-typed field is InvalidArgument naming the tensor",
          "[model][safetensors]") {
  TempDir dir;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"w":[1,2]})", "not a JSON object"},
      {R"({"w":{"shape":[1],"data_offsets":[0,4]}})", "\"dtype\" missing"},
      {R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", "\"dtype\" missing or not a string"},
      {R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", "\"shape\" missing"},
      {R"({"w":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", "\"shape\" missing or not an array"},
      {R"({"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", "not an array of integers"},
      {R"({"w":{"dtype":"F32","shape":[1]}})", "\"data_offsets\" missing"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", "\"data_offsets\" missing"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", "\"data_offsets\" missing"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,-4]}})", "\"data_offsets\" missing"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}})", "\"data_offsets\" missing"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "begin after end"},
  };
  for (const auto& [header, needle] : cases) {
    INFO(header);
    const absl::Status status = OpenRaw(dir, header, std::string(4, '\0'));
    CheckError(status, absl::StatusCode::kInvalidArgument, needle);
    CHECK_THAT(Message(status), Contains("tensor 'w'"));
  }
}

TEST_CASE("A negative dimension is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  CheckError(OpenRaw(dir, R"({"w":{"dtype":"U8","shape":[-2,-2],"data_offsets":[0,4]}})", std::string(4, '\0')),
             absl::StatusCode::kInvalidArgument, "negative dimension");
}

TEST_CASE("An unsupported dtype is InvalidArgument naming the dtype and the tensor", "[model][safetensors]") {
  TempDir dir;
  const absl::Status status =
      OpenRaw(dir, R"({"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", std::string(4, '\0'));
  CheckError(status, absl::StatusCode::kInvalidArgument, "unsupported dtype 'F8_E4M3'");
  CHECK_THAT(Message(status), Contains("tensor 'w'"));
}

TEST_CASE("A byte length that does not match dtype and shape is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  const absl::Status status =
      OpenRaw(dir, R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0'));
  CheckError(status, absl::StatusCode::kInvalidArgument, "dtype/shape mismatch");
  CHECK_THAT(Message(status), Contains("tensor 'w'"));
}

TEST_CASE("A shape whose byte size overflows 64 bits is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  // 2^32 × 2^32 elements wraps to 0 in 64 bits, which would match data_offsets [0, 0] if unchecked.
  CheckError(OpenRaw(dir, R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", ""),
             absl::StatusCode::kInvalidArgument, "overflows");
  CheckError(OpenRaw(dir, R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})", ""),
             absl::StatusCode::kInvalidArgument, "overflows");
}

TEST_CASE("Overlapping data_offsets are InvalidArgument naming both tensors", "[model][safetensors]") {
  TempDir dir;
  const absl::Status status = OpenRaw(dir,
                                      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                      std::string(12, '\0'));
  CheckError(status, absl::StatusCode::kInvalidArgument, "overlap");
  CHECK_THAT(Message(status), Contains("'a'"));
  CHECK_THAT(Message(status), Contains("'b'"));
}

TEST_CASE("Two tensors at the same offsets overlap", "[model][safetensors]") {
  TempDir dir;
  CheckError(OpenRaw(dir,
                     R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                     R"("b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})",
                     std::string(8, '\0')),
             absl::StatusCode::kInvalidArgument, "overlap");
}

TEST_CASE("data_offsets out of range of an inconsistent layout are InvalidArgument, not DataLoss",
          "[model][safetensors]") {
  TempDir dir;
  // Nothing covers [0, 8), so a short file cannot explain this header: the header is wrong.
  const absl::Status status =
      OpenRaw(dir, R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", std::string(8, '\0'));
  CheckError(status, absl::StatusCode::kInvalidArgument, "out of range");
  CHECK_THAT(Message(status), Contains("tensor 'w'"));
}

TEST_CASE("A hole between tensors is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  const absl::Status status = OpenRaw(dir,
                                      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})",
                                      std::string(24, '\0'));
  CheckError(status, absl::StatusCode::kInvalidArgument, "hole of 8 bytes");
  CHECK_THAT(Message(status), Contains("between tensors 'a' and 'b'"));
}

TEST_CASE("A hole before the first tensor is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  CheckError(OpenRaw(dir, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, '\0')),
             absl::StatusCode::kInvalidArgument, "before tensor 'a'");
}

TEST_CASE("Bytes after the last tensor are InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  CheckError(OpenRaw(dir, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(16, '\0')),
             absl::StatusCode::kInvalidArgument, "hole of 8 bytes at the end");
}

TEST_CASE("Duplicate tensor names are InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  CheckError(OpenRaw(dir,
                     R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                     R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                     std::string(16, '\0')),
             absl::StatusCode::kInvalidArgument, "duplicate tensor name 'a'");
}

TEST_CASE("A duplicate key inside a tensor entry is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  CheckError(
      OpenRaw(dir, R"({"a":{"dtype":"F32","dtype":"U8","shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')),
      absl::StatusCode::kInvalidArgument, "duplicate key 'dtype' in 'a'");
}

TEST_CASE("__metadata__ that is not an object of strings is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  const std::string tensor = R"("a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]})";
  CheckError(OpenRaw(dir, StrCat(R"({"__metadata__":"pt",)", tensor, "}"), "x"), absl::StatusCode::kInvalidArgument,
             "\"__metadata__\" is not a JSON object");
  CheckError(OpenRaw(dir, StrCat(R"({"__metadata__":{"step":3},)", tensor, "}"), "x"),
             absl::StatusCode::kInvalidArgument, "value of 'step' is not a string");
  CheckError(OpenRaw(dir, StrCat(R"({"__metadata__":{"k":"v","k":"w"},)", tensor, "}"), "x"),
             absl::StatusCode::kInvalidArgument, "duplicate key 'k' in '__metadata__'");
}

TEST_CASE("A missing file is NotFound", "[model][safetensors]") {
  TempDir dir;
  CHECK(SafetensorsFile::Open(dir.file("nope.safetensors")).status().code() == absl::StatusCode::kNotFound);
}

// ---------------------------------------------------------------------------------------------------
// Collections

constexpr char kShard1[] = "model-00001-of-00002.safetensors";
constexpr char kShard2[] = "model-00002-of-00002.safetensors";

// Two shards: a (F32 [2]) and b (U8 [3]) in the first, c (I64 [1]) in the second; no index.
void WriteTwoShards(const TempDir& dir) {
  const std::vector<float> a = {1, 2};
  const std::vector<uint8_t> b = {7, 8, 9};
  const std::vector<int64_t> c = {123456789};
  const std::vector<TensorToWrite> first = {{"a", DType::kF32, {2}, AsBytes(a)}, {"b", DType::kU8, {3}, AsBytes(b)}};
  const std::vector<TensorToWrite> second = {{"c", DType::kI64, {1}, AsBytes(c)}};
  REQUIRE(WriteSafetensors(dir.file(kShard1), first, {{"format", "pt"}}).ok());
  REQUIRE(WriteSafetensors(dir.file(kShard2), second, {{"format", "pt"}}).ok());
}

void WriteIndex(const TempDir& dir, std::string_view weight_map) {
  WriteBytes(dir.file("model.safetensors.index.json"),
             StrCat(R"({"metadata": {"total_size": 28}, "weight_map": )", weight_map, "}"));
}

TEST_CASE("A sharded model directory opens each shard once and finds tensors from both", "[model][safetensors]") {
  TempDir dir;
  WriteTwoShards(dir);
  WriteIndex(dir, StrCat(R"({"a": ")", kShard1, R"(", "b": ")", kShard1, R"(", "c": ")", kShard2, R"("})"));
  auto collection = SafetensorsCollection::Open(dir.path());
  REQUIRE(collection.ok());
  CHECK((*collection)->size() == 3);
  CHECK((*collection)->names() == std::vector<std::string>{"a", "b", "c"});
  const TensorView* a = (*collection)->Find("a");
  const TensorView* b = (*collection)->Find("b");
  const TensorView* c = (*collection)->Find("c");
  REQUIRE(a != nullptr);
  REQUIRE(b != nullptr);
  REQUIRE(c != nullptr);
  CHECK(a->file == b->file);
  CHECK(a->file != c->file);
  CHECK(c->file->path() == dir.file(kShard2));
  int64_t c_value = 0;
  std::memcpy(&c_value, c->data, sizeof(c_value));
  CHECK(c_value == 123456789);
  CHECK(b->data[2] == 9);
  CHECK((*collection)->Find("d") == nullptr);
}

TEST_CASE("A directory with model.safetensors, or the file's own path, opens as one collection",
          "[model][safetensors]") {
  TempDir dir;
  const std::vector<uint8_t> bytes = {5, 6};
  const std::vector<TensorToWrite> tensors = {{"x", DType::kU8, {2}, AsBytes(bytes)}};
  REQUIRE(WriteSafetensors(dir.file("model.safetensors"), tensors).ok());
  for (const std::string& path : {dir.path(), dir.file("model.safetensors")}) {
    INFO(path);
    auto collection = SafetensorsCollection::Open(path);
    REQUIRE(collection.ok());
    CHECK((*collection)->size() == 1);
    REQUIRE((*collection)->Find("x") != nullptr);
    CHECK((*collection)->Find("x")->data[1] == 6);
  }
}

TEST_CASE("A directory with neither model.safetensors nor an index is NotFound", "[model][safetensors]") {
  TempDir dir;
  const absl::Status status = SafetensorsCollection::Open(dir.path()).status();
  CheckError(status, absl::StatusCode::kNotFound, "model.safetensors.index.json");
  CHECK_THAT(Message(status), Contains(dir.path()));
  CHECK(SafetensorsCollection::Open(dir.file("missing")).status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("An index naming a tensor its shard does not hold is InvalidArgument naming both", "[model][safetensors]") {
  TempDir dir;
  WriteTwoShards(dir);
  WriteIndex(dir, StrCat(R"({"a": ")", kShard1, R"(", "b": ")", kShard1, R"(", "c": ")", kShard2, R"(", "d": ")",
                         kShard2, R"("})"));
  const absl::Status status = SafetensorsCollection::Open(dir.path()).status();
  CheckError(status, absl::StatusCode::kInvalidArgument, "tensor 'd'");
  CHECK_THAT(Message(status), Contains(kShard2));
}

TEST_CASE("An index naming a shard that does not exist is NotFound naming the shard", "[model][safetensors]") {
  TempDir dir;
  WriteTwoShards(dir);
  WriteIndex(dir, StrCat(R"({"a": ")", kShard1, R"(", "b": ")", kShard1, R"(", "c": ")",
                         "model-00003-of-00003.safetensors", R"("})"));
  CheckError(SafetensorsCollection::Open(dir.path()).status(), absl::StatusCode::kNotFound,
             "shard 'model-00003-of-00003.safetensors'");
}

TEST_CASE("An index shard name with a path separator is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  WriteTwoShards(dir);
  for (const std::string shard : {"../x.safetensors", "sub/x.safetensors", "..", ""}) {
    INFO(shard);
    WriteIndex(dir, StrCat(R"({"a": ")", shard, R"("})"));
    CheckError(SafetensorsCollection::Open(dir.path()).status(), absl::StatusCode::kInvalidArgument,
               "is not a plain file name");
  }
}

TEST_CASE("A tensor present in two shards is InvalidArgument naming both shards", "[model][safetensors]") {
  TempDir dir;
  WriteTwoShards(dir);
  const std::vector<uint8_t> bytes = {1};
  const std::vector<TensorToWrite> again = {{"c", DType::kU8, {1}, AsBytes(bytes)}};
  REQUIRE(WriteSafetensors(dir.file(kShard1), again).ok());  // the first shard now also holds c
  WriteIndex(dir, StrCat(R"({"c": ")", kShard2, R"(", "x": ")", kShard1, R"("})"));
  const absl::Status status = SafetensorsCollection::Open(dir.path()).status();
  CheckError(status, absl::StatusCode::kInvalidArgument, "tensor 'c'");
  CHECK_THAT(Message(status), Contains(kShard1));
  CHECK_THAT(Message(status), Contains(kShard2));
}

TEST_CASE("An index listing one tensor twice is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  WriteTwoShards(dir);
  WriteIndex(dir, StrCat(R"({"a": ")", kShard1, R"(", "b": ")", kShard1, R"(", "c": ")", kShard2, R"(", "a": ")",
                         kShard2, R"("})"));
  CheckError(SafetensorsCollection::Open(dir.path()).status(), absl::StatusCode::kInvalidArgument,
             "duplicate key 'a' in 'weight_map'");
}

TEST_CASE("A shard tensor that the index does not list is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  WriteTwoShards(dir);
  WriteIndex(dir, StrCat(R"({"a": ")", kShard1, R"(", "c": ")", kShard2, R"("})"));
  CheckError(SafetensorsCollection::Open(dir.path()).status(), absl::StatusCode::kInvalidArgument,
             "holds tensor 'b', which the index does not list");
}

TEST_CASE("An index without a weight_map object is InvalidArgument", "[model][safetensors]") {
  TempDir dir;
  WriteTwoShards(dir);
  WriteBytes(dir.file("model.safetensors.index.json"), R"({"metadata": {}})");
  CheckError(SafetensorsCollection::Open(dir.path()).status(), absl::StatusCode::kInvalidArgument,
             "\"weight_map\" missing");
  WriteBytes(dir.file("model.safetensors.index.json"), "not json");
  CheckError(SafetensorsCollection::Open(dir.path()).status(), absl::StatusCode::kInvalidArgument, "not valid JSON");
}

// ---------------------------------------------------------------------------------------------------
// Writer validation

TEST_CASE("WriteSafetensors rejects bad names and byte lengths and leaves no file behind", "[model][safetensors]") {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  const std::vector<float> two = {1, 2};
  struct Case {
    std::vector<TensorToWrite> tensors;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {{{"a", DType::kF32, {2}, AsBytes(two)}, {"a", DType::kF32, {2}, AsBytes(two)}}, "duplicate tensor name 'a'"},
      {{{"a", DType::kF32, {3}, AsBytes(two)}}, "tensor 'a' has 8 bytes"},
      {{{"a", DType::kF16, {2}, AsBytes(two)}}, "needs 4"},
      {{{"", DType::kF32, {2}, AsBytes(two)}}, "empty name"},
      {{{"__metadata__", DType::kF32, {2}, AsBytes(two)}}, "cannot be named '__metadata__'"},
      {{{"a", DType::kF32, {-2}, AsBytes(two)}}, "negative dimension"},
  };
  for (const Case& c : cases) {
    INFO(c.needle);
    CheckError(WriteSafetensors(path, c.tensors), absl::StatusCode::kInvalidArgument, c.needle);
    CHECK(dir.num_entries() == 0);
  }
}

TEST_CASE("WriteSafetensors rejects a name that is not valid UTF-8 and leaves no file behind", "[model][safetensors]") {
  TempDir dir;
  const std::vector<uint8_t> one = {1};
  const std::vector<TensorToWrite> tensors = {{"bad\xff", DType::kU8, {1}, AsBytes(one)}};
  CheckError(WriteSafetensors(dir.file("bad.safetensors"), tensors), absl::StatusCode::kInvalidArgument, "UTF-8");
  CHECK(dir.num_entries() == 0);
}

// ---------------------------------------------------------------------------------------------------
// Fuzz

TEST_CASE("Open never crashes on corrupted files and every tensor it accepts lies inside the mapping",
          "[model][safetensors]") {
  TempDir dir;
  const std::string valid_path = dir.file("valid.safetensors");
  const std::vector<float> w = {1, 2, 3, 4, 5, 6};
  const std::vector<uint16_t> h = {1, 2, 3};
  const std::vector<int64_t> s = {5};
  const std::vector<uint8_t> z;
  const std::vector<TensorToWrite> tensors = {{"w", DType::kF32, {2, 3}, AsBytes(w)},
                                              {"h", DType::kBF16, {3}, AsBytes(h)},
                                              {"s", DType::kI64, {}, AsBytes(s)},
                                              {"z", DType::kU8, {0}, AsBytes(z)}};
  REQUIRE(WriteSafetensors(valid_path, tensors, {{"format", "pt"}}).ok());
  auto valid_or = ReadFile(valid_path);
  REQUIRE(valid_or.ok());
  const std::string valid = *valid_or;
  const size_t header_end = 8 + (static_cast<uint8_t>(valid[0]) | static_cast<uint8_t>(valid[1]) << 8);

  std::mt19937_64 rng(0x5afe7e45);
  auto below = [&rng](size_t n) { return static_cast<size_t>(rng() % n); };
  const std::string json_chars = "{}[],:\"0123456789-. eE\\aF";
  const std::string path = dir.file("fuzz.safetensors");
  int accepted = 0;
  int rejected = 0;
  for (int i = 0; i < 400; ++i) {
    std::string bytes = valid;
    switch (i % 5) {
      case 0:  // flip a few bits anywhere
        for (int k = 1 + below(3); k > 0; --k) bytes[below(bytes.size())] ^= 1 << below(8);
        break;
      case 1:  // flip a few bits in the length and header
        for (int k = 1 + below(3); k > 0; --k) bytes[below(header_end)] ^= 1 << below(8);
        break;
      case 2:  // write JSON punctuation and digits into the header
        for (int k = 1 + below(4); k > 0; --k) {
          bytes[8 + below(header_end - 8)] = json_chars[below(json_chars.size())];
        }
        break;
      case 3:  // truncate
        bytes.resize(below(bytes.size()));
        break;
      case 4:  // a header length near the true one
        bytes.replace(0, 8, LengthPrefix(header_end - 8 + below(33) - 16));
        break;
    }
    WriteBytes(path, bytes);
    auto file = SafetensorsFile::Open(path);
    if (!file.ok()) {
      ++rejected;
      continue;
    }
    ++accepted;
    for (const auto& [name, view] : (*file)->tensors()) {
      INFO("variant " << i << " tensor '" << name << "'");
      REQUIRE(view.file != nullptr);
      const uint8_t* begin = view.file->data();
      const uint8_t* end = begin + view.file->size();
      CHECK(view.data >= begin);
      CHECK(view.data <= end);
      CHECK(view.nbytes <= static_cast<size_t>(end - view.data));
      CHECK(view.numel() * static_cast<int64_t>(DTypeSize(view.dtype)) == static_cast<int64_t>(view.nbytes));
    }
  }
  // Both outcomes must occur, or the variants did not exercise the checks.
  CHECK(accepted > 10);
  CHECK(rejected > 100);
}

}  // namespace
}  // namespace seedling::model
