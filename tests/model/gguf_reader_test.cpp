#include "model/gguf_reader.h"

#include <ATen/ATen.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/gguf.h"
#include "model/gguf_model.h"
#include "model/kernels.h"
#include "model/llama.h"
#include "model/quant.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tests/model/fixtures.h"
#include "tests/test_util.h"

namespace seedling::model {
namespace {

using json = nlohmann::json;
using enum testing::GgufSpecType;
using seedling::testing::TempDir;

// ---- A GGUF encoder written from the specification (ggml docs/gguf.md), independent of the
// writer, so tests can build files with exactly the flaw they need --------------------------------

// ggml_type values.
enum : uint32_t { kTypeF32 = 0, kTypeF16 = 1, kTypeQ4_0 = 2, kTypeQ8_0 = 8, kTypeQ6_K = 14 };

class Encoder {
 public:
  template <typename T>
  Encoder& Put(T v) {
    bytes_.append(reinterpret_cast<const char*>(&v), sizeof(v));  // little-endian, like the host
    return *this;
  }
  Encoder& Str(std::string_view s) {
    Put<uint64_t>(s.size());
    bytes_.append(s);
    return *this;
  }
  Encoder& Raw(std::string_view s) {
    bytes_.append(s);
    return *this;
  }
  const std::string& bytes() const { return bytes_; }

 private:
  std::string bytes_;
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;  // PyTorch order; written reversed as ne
  uint32_t type = kTypeF32;
  std::string data;
  std::optional<uint64_t> offset;  // default: packed, each at the aligned end of the one before
  bool place_data = true;          // false: the header points at bytes that are not written
};

uint64_t AlignUp(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

class GgufBuilder {
 public:
  uint32_t version = 3;
  uint64_t alignment = 32;                 // the layout; general.alignment is a key like any other
  std::optional<uint64_t> tensor_count;    // overrides the real count in the header
  std::optional<uint64_t> metadata_count;  // likewise

  // A key with its value type; append the value's encoding to the returned encoder.
  Encoder& Key(std::string_view key, uint32_t type) {
    ++keys_;
    return kv_.Str(key).Put<uint32_t>(type);
  }
  GgufBuilder& U32(std::string_view key, uint32_t v) {
    Key(key, kU32).Put(v);
    return *this;
  }
  GgufBuilder& F32(std::string_view key, float v) {
    Key(key, kF32).Put(v);
    return *this;
  }
  GgufBuilder& Bool(std::string_view key, bool v) {
    Key(key, kBool).Put<uint8_t>(v);
    return *this;
  }
  GgufBuilder& Str(std::string_view key, std::string_view v) {
    Key(key, kString).Str(v);
    return *this;
  }
  GgufBuilder& StrArray(std::string_view key, const std::vector<std::string>& v) {
    Encoder& e = Key(key, kArray).Put<uint32_t>(kString).Put<uint64_t>(v.size());
    for (const std::string& s : v) e.Str(s);
    return *this;
  }
  GgufBuilder& Add(TensorSpec t) {
    tensors.push_back(std::move(t));
    return *this;
  }
  GgufBuilder& Add(std::string name, std::vector<int64_t> shape, uint32_t type, std::string data,
                   std::optional<uint64_t> offset = std::nullopt, bool place_data = true) {
    return Add(TensorSpec{std::move(name), std::move(shape), type, std::move(data), offset, place_data});
  }

  std::string Build() const {
    Encoder h;
    h.Raw("GGUF").Put(version).Put<uint64_t>(tensor_count.value_or(tensors.size()));
    h.Put<uint64_t>(metadata_count.value_or(keys_)).Raw(kv_.bytes());
    std::vector<uint64_t> offsets;
    uint64_t next = 0;
    for (const TensorSpec& t : tensors) {
      offsets.push_back(t.offset.value_or(AlignUp(next, alignment)));
      next = offsets.back() + t.data.size();
      h.Str(t.name).Put<uint32_t>(t.shape.size());
      for (auto d = t.shape.rbegin(); d != t.shape.rend(); ++d) h.Put<uint64_t>(*d);
      h.Put(t.type).Put(offsets.back());
    }
    std::string out = h.bytes();
    out.resize(AlignUp(out.size(), alignment), '\0');
    std::string data;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!tensors[i].place_data) continue;
      data.resize(std::max<uint64_t>(data.size(), offsets[i] + tensors[i].data.size()), '\0');
      std::memcpy(data.data() + offsets[i], tensors[i].data.data(), tensors[i].data.size());
    }
    data.resize(AlignUp(data.size(), alignment), '\0');
    return out + data;
  }

  std::vector<TensorSpec> tensors;

 private:
  Encoder kv_;
  uint64_t keys_ = 0;
};

std::string WriteBytes(const std::string& dir, const std::string& bytes) {
  const std::string path = dir + "/model.gguf";
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  return path;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

absl::StatusOr<std::unique_ptr<GgufFile>> OpenBytes(const TempDir& dir, const std::string& bytes) {
  return GgufFile::Open(WriteBytes(dir.path, bytes));
}

std::unique_ptr<GgufFile> MustOpen(const std::string& path) {
  auto f = GgufFile::Open(path);
  INFO(f.status().ToString());
  REQUIRE(f.ok());
  return std::move(*f);
}

void CheckError(const absl::Status& s, absl::StatusCode code, const std::string& substring) {
  INFO(s.ToString());
  CHECK(s.code() == code);
  CHECK_THAT(std::string(s.message()), Catch::Contains(substring));
}

template <typename T>
void CheckError(const absl::StatusOr<T>& s, absl::StatusCode code, const std::string& substring) {
  CheckError(s.status(), code, substring);
}

std::string TensorBytes(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), c.nbytes());
}

// One small F32 tensor "a" at offset 0 of a file with a few keys: the base the corruption tests
// break one thing in.
GgufBuilder ValidFile() {
  GgufBuilder b;
  b.Str("general.architecture", "llama").U32("general.alignment", 32);
  b.Add("a", {2, 32}, kTypeF32, std::string(2 * 32 * 4, '\1'));
  return b;
}

// ---- A tiny model, hand-encoded -----------------------------------------------------------------

// Llama, 1 layer, hidden 256 (so Q6_K rows fit), GQA 4 / 2 heads of 64, tied; every matrix has a
// multiple of 32 columns.
ModelConfig MiniConfig() {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.vocab_size = 64;
  c.hidden_size = 256;
  c.intermediate_size = 128;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.max_position_embeddings = 128;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = true;
  REQUIRE(c.Validate().ok());
  return c;
}

// Rows of q / k as llama.cpp's convert stores them, as plain index arithmetic: within each head of
// D rows, file row 2i + j holds original row j * D/2 + i.
at::Tensor Interleave(const at::Tensor& w, int64_t heads) {
  const int64_t d = w.size(0) / heads;
  at::Tensor out = at::empty_like(w);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < d / 2; ++i) {
      for (int64_t j = 0; j < 2; ++j) out[h * d + 2 * i + j].copy_(w[h * d + j * (d / 2) + i]);
    }
  }
  return out;
}

// The keys and tensors of `c` / `w` (llama only), matrices stored as `format` (F32, Q8_0 or Q4_0).
GgufBuilder MiniModel(const ModelConfig& c, const ModelWeights& w, WeightFormat format) {
  GgufBuilder b;
  b.Str("general.architecture", "llama")
      .U32("llama.vocab_size", c.vocab_size)
      .U32("llama.context_length", c.max_position_embeddings)
      .U32("llama.embedding_length", c.hidden_size)
      .U32("llama.block_count", c.num_hidden_layers)
      .U32("llama.feed_forward_length", c.intermediate_size)
      .U32("llama.attention.head_count", c.num_attention_heads)
      .U32("llama.attention.head_count_kv", c.num_key_value_heads)
      .F32("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps);
  auto matrix = [&](const std::string& name, const at::Tensor& t, int64_t heads = 0) {
    at::Tensor m = heads > 0 ? Interleave(t, heads) : t;
    uint32_t type = kTypeF32;
    if (IsBlockFormat(format)) {
      auto q = QuantizeMatrix(m, format, name);
      REQUIRE(q.ok());
      m = *q;
      type = format == WeightFormat::kQ8_0 ? kTypeQ8_0 : kTypeQ4_0;
    }
    b.Add(name, {t.size(0), t.size(1)}, type, TensorBytes(m));
  };
  auto vector = [&](const std::string& name, const at::Tensor& t) {
    b.Add(name, {t.size(0)}, kTypeF32, TensorBytes(t));
  };
  matrix("token_embd.weight", w.embed);
  const LayerWeights& l = w.layers[0];
  vector("blk.0.attn_norm.weight", l.input_norm);
  matrix("blk.0.attn_q.weight", l.q, c.num_attention_heads);
  matrix("blk.0.attn_k.weight", l.k, c.num_key_value_heads);
  matrix("blk.0.attn_v.weight", l.v);
  matrix("blk.0.attn_output.weight", l.o);
  vector("blk.0.ffn_norm.weight", l.pre_mlp_norm);
  matrix("blk.0.ffn_gate.weight", l.gate);
  matrix("blk.0.ffn_up.weight", l.up);
  matrix("blk.0.ffn_down.weight", l.down);
  vector("output_norm.weight", w.final_norm);
  return b;
}

TensorSpec* FindSpec(GgufBuilder& b, const std::string& name) {
  for (TensorSpec& t : b.tensors) {
    if (t.name == name) return &t;
  }
  FAIL("no tensor " << name);
  return nullptr;
}

// ConfigFromGguf + WeightsFromGguf of hand-encoded bytes.
absl::StatusOr<ModelWeights> LoadMini(const TempDir& dir, const GgufBuilder& b,
                                      WeightPrecision precision = WeightPrecision::kStored) {
  auto f = OpenBytes(dir, b.Build());
  if (!f.ok()) return f.status();
  auto c = ConfigFromGguf(**f);
  if (!c.ok()) return c.status();
  return WeightsFromGguf(**f, *c, precision);
}

// ---- Seedling's own export as the reference ---------------------------------------------------

using testing::Corpus;
using testing::kModelVocab;
using testing::ParseTokenizer;
using testing::TinyGemma2;
using testing::TinyGemma3;
using testing::TinyLlama;
using testing::TinyOlmo2;
using testing::TinyPhi;
using testing::TinyQwen2;
using testing::TinyQwen3;
using testing::TokenizerJson;

// The shared tiny-qwen2 with one EOS id.
ModelConfig TinyQwen2OneEos() {
  ModelConfig c = TinyQwen2();
  c.eos_token_ids = {2};
  return c;
}

GgufOptions Format(WeightFormat format) {
  GgufOptions o;
  o.format = format;
  return o;
}

std::string Export(const TempDir& dir, const ModelConfig& c, const ModelWeights& w, const Tokenizer& t,
                   WeightFormat format = WeightFormat::kF32) {
  const std::string path = dir.path + "/export.gguf";
  const absl::Status s = WriteGguf(path, c, w, t, Format(format));
  INFO(s.ToString());
  REQUIRE(s.ok());
  return path;
}

ModelConfig MustConfig(const GgufFile& f) {
  auto c = ConfigFromGguf(f);
  INFO(c.status().ToString());
  REQUIRE(c.ok());
  return *c;
}

ModelWeights MustWeights(const GgufFile& f, const ModelConfig& c, WeightPrecision precision) {
  auto w = WeightsFromGguf(f, c, precision);
  INFO(w.status().ToString());
  REQUIRE(w.ok());
  return std::move(*w);
}

std::unique_ptr<Tokenizer> MustTokenizer(const GgufFile& f) {
  auto t = TokenizerFromGguf(f);
  INFO(t.status().ToString());
  REQUIRE(t.ok());
  return std::move(*t);
}

void CheckSameConfig(const ModelConfig& got, const ModelConfig& want) {
  CHECK(got.architecture == want.architecture);
  CHECK(got.model_type == want.model_type);
  CHECK(got.vocab_size == want.vocab_size);
  CHECK(got.hidden_size == want.hidden_size);
  CHECK(got.intermediate_size == want.intermediate_size);
  CHECK(got.num_hidden_layers == want.num_hidden_layers);
  CHECK(got.num_attention_heads == want.num_attention_heads);
  CHECK(got.num_key_value_heads == want.num_key_value_heads);
  CHECK(got.head_dim == want.head_dim);
  CHECK(got.max_position_embeddings == want.max_position_embeddings);
  CHECK(got.rms_norm_eps == want.rms_norm_eps);  // exact: float32 keys widen to the intended value
  CHECK(got.rope_theta == want.rope_theta);
  CHECK(got.rope_scaling.type == want.rope_scaling.type);
  CHECK(got.rope_scaling.factor == want.rope_scaling.factor);
  CHECK(got.rope_scaling.low_freq_factor == want.rope_scaling.low_freq_factor);
  CHECK(got.rope_scaling.high_freq_factor == want.rope_scaling.high_freq_factor);
  CHECK(got.rope_scaling.original_max_position_embeddings == want.rope_scaling.original_max_position_embeddings);
  CHECK(got.tie_word_embeddings == want.tie_word_embeddings);
  CHECK(got.qkv_bias == want.qkv_bias);
  CHECK(got.o_bias == want.o_bias);
  CHECK(got.mlp_bias == want.mlp_bias);
  CHECK(got.lm_head_bias == want.lm_head_bias);
  CHECK(got.norm_kind == want.norm_kind);
  CHECK(got.parallel_residual == want.parallel_residual);
  CHECK(got.rotary_dim() == want.rotary_dim());
  CHECK(got.qk_norm == want.qk_norm);
  CHECK(got.norms == want.norms);
  CHECK(got.sliding_window == want.sliding_window);
  CHECK(got.bos_token_id == want.bos_token_id);
  CHECK(got.eos_token_ids == want.eos_token_ids);
  CHECK(got.torch_dtype == want.torch_dtype);
}

// The weights under llama.cpp's names, for comparing slot by slot.
std::vector<std::pair<std::string, at::Tensor>> Slots(const ModelWeights& w) {
  std::vector<std::pair<std::string, at::Tensor>> out = {{"token_embd", w.embed},
                                                         {"output_norm", w.final_norm},
                                                         {"output_norm.bias", w.final_norm_bias},
                                                         {"output", w.lm_head},
                                                         {"output.bias", w.lm_head_bias}};
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const LayerWeights& l = w.layers[i];
    const std::string b = "blk." + std::to_string(i) + ".";
    for (const auto& [name, t] :
         std::vector<std::pair<std::string, at::Tensor>>{{"attn_norm", l.input_norm},
                                                         {"attn_q", l.q},
                                                         {"attn_k", l.k},
                                                         {"attn_v", l.v},
                                                         {"attn_output", l.o},
                                                         {"attn_q_norm", l.q_norm},
                                                         {"attn_k_norm", l.k_norm},
                                                         {"post_attention_norm", l.attention_output_norm},
                                                         {"ffn_norm", l.pre_mlp_norm},
                                                         {"post_ffw_norm", l.mlp_output_norm},
                                                         {"ffn_gate", l.gate},
                                                         {"ffn_up", l.up},
                                                         {"ffn_down", l.down},
                                                         {"attn_q.bias", l.q_bias},
                                                         {"attn_k.bias", l.k_bias},
                                                         {"attn_v.bias", l.v_bias},
                                                         {"attn_output.bias", l.o_bias},
                                                         {"ffn_gate.bias", l.gate_bias},
                                                         {"ffn_up.bias", l.up_bias},
                                                         {"ffn_down.bias", l.down_bias},
                                                         {"attn_norm.bias", l.input_norm_bias},
                                                         {"ffn_norm.bias", l.pre_mlp_norm_bias}}) {
      out.emplace_back(b + name, t);
    }
  }
  return out;
}

// Every slot of `got` equals `want(original)` exactly, in the expected dtype.
template <typename Want>
void CheckWeights(const ModelWeights& got, const ModelWeights& original, Want want) {
  const auto got_slots = Slots(got), original_slots = Slots(original);
  REQUIRE(got_slots.size() == original_slots.size());
  for (size_t i = 0; i < got_slots.size(); ++i) {
    INFO("slot " << got_slots[i].first);
    const at::Tensor& g = got_slots[i].second;
    const at::Tensor& o = original_slots[i].second;
    REQUIRE(g.defined() == o.defined());
    if (!o.defined()) continue;
    const at::Tensor expected = want(o);
    CHECK(g.scalar_type() == expected.scalar_type());
    CHECK(g.sizes() == expected.sizes());
    CHECK(at::equal(g, expected));
  }
}

bool InsideFile(const at::Tensor& t, const GgufFile& f) {
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  return p >= f.file()->data() && p < f.file()->data() + f.file()->size();
}

// =================================================================================================
// The reader
// =================================================================================================

TEST_CASE("A hand-written GGUF reads back every metadata type and tensor", "[model][gguf]") {
  TempDir dir;
  GgufBuilder good;
  // An array of two arrays of uint8: [[7], []].
  good.Key("nested", kArray)
      .Put<uint32_t>(kArray)
      .Put<uint64_t>(2)
      .Put<uint32_t>(kU8)
      .Put<uint64_t>(1)
      .Put<uint8_t>(7)
      .Put<uint32_t>(kU8)
      .Put<uint64_t>(0);
  good.Key("u8", kU8).Put<uint8_t>(200);
  good.Key("i8", kI8).Put<int8_t>(-5);
  good.Key("u16", kU16).Put<uint16_t>(60000);
  good.Key("i16", kI16).Put<int16_t>(-300);
  good.Key("i64", kI64).Put<int64_t>(-(int64_t{1} << 40));
  good.U32("u32", 4000000000u);
  good.Key("i32", kI32).Put<int32_t>(-7);
  good.F32("f32", 0.25f).Bool("bool", true).Str("str", "hello");
  good.Key("u64", kU64).Put<uint64_t>(1ull << 40);
  good.Key("f64", kF64).Put<double>(0.125);
  good.StrArray("strs", {"a", "", "b c"});
  good.Key("i32s", kArray).Put<uint32_t>(kI32).Put<uint64_t>(3).Put<int32_t>(1).Put<int32_t>(-2).Put<int32_t>(3);
  good.Key("f32s", kArray).Put<uint32_t>(kF32).Put<uint64_t>(2).Put<float>(1.5f).Put<float>(-2.0f);
  const at::Tensor x = at::arange(6, at::kFloat).reshape({2, 3});
  good.Add("x", {2, 3}, kTypeF32, TensorBytes(x));
  const at::Tensor y = at::arange(64, at::kFloat).to(at::kHalf);
  good.Add("y", {64}, kTypeF16, TensorBytes(y));

  auto f = OpenBytes(dir, good.Build());
  INFO(f.status().ToString());
  REQUIRE(f.ok());
  const GgufFile& g = **f;
  CHECK(g.version() == 3);
  CHECK(g.alignment() == 32);
  CHECK(g.metadata().size() == 16);
  CHECK(*g.GetU32("u32") == 4000000000u);
  CHECK(*g.GetI32("i32") == -7);
  CHECK(*g.GetU64("u64") == (1ull << 40));
  CHECK(*g.GetF32("f32") == 0.25f);
  CHECK(*g.GetBool("bool"));
  CHECK(*g.GetString("str") == "hello");
  CHECK(*g.GetStringArray("strs") == std::vector<std::string_view>{"a", "", "b c"});
  CHECK(*g.GetI32Array("i32s") == std::vector<int32_t>{1, -2, 3});
  CHECK(*g.GetF32Array("f32s") == std::vector<float>{1.5f, -2.0f});
  const GgufValue nested = *g.GetArray("nested");
  CHECK(nested.element_type == GgufValueType::kArray);
  CHECK(nested.count == 2);
  CHECK(g.metadata().at("u8").type == GgufValueType::kUint8);
  CHECK(g.metadata().at("f64").type == GgufValueType::kFloat64);

  REQUIRE(g.tensors().size() == 2);
  const GgufTensorInfo* tx = g.FindTensor("x");
  REQUIRE(tx != nullptr);
  CHECK(tx->type == GgmlType::kF32);
  CHECK(tx->shape == std::vector<int64_t>{2, 3});  // ne = [3, 2] reversed
  CHECK(tx->nbytes == 24);
  CHECK(std::memcmp(tx->data, x.data_ptr(), 24) == 0);
  const GgufTensorInfo* ty = g.FindTensor("y");
  REQUIRE(ty != nullptr);
  CHECK(ty->offset == 32);  // 24 bytes, padded to the alignment
  CHECK(std::memcmp(ty->data, y.data_ptr(), 128) == 0);
  CHECK(g.FindTensor("z") == nullptr);
}

TEST_CASE("A version 2 file reads like version 3", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.version = 2;
  auto f = OpenBytes(dir, b.Build());
  REQUIRE(f.ok());
  CHECK((*f)->version() == 2);
  CHECK((*f)->tensors().size() == 1);
}

TEST_CASE("Typed getters report a missing key as NotFound and a wrong type as InvalidArgument", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.StrArray("list", {"x"});
  auto f = OpenBytes(dir, b.Build());
  REQUIRE(f.ok());
  CheckError((*f)->GetU32("llama.block_count"), absl::StatusCode::kNotFound, "key 'llama.block_count' is missing");
  CheckError((*f)->GetU32("general.architecture"), absl::StatusCode::kInvalidArgument,
             "key 'general.architecture' has type string, expected uint32");
  CheckError((*f)->GetI32Array("list"), absl::StatusCode::kInvalidArgument,
             "key 'list' is an array of string, expected an array of int32");
  CheckError((*f)->GetString("general.alignment"), absl::StatusCode::kInvalidArgument,
             "model.gguf");  // the file is named
}

TEST_CASE("Tensor data outlives the GgufFile through its keep-alive", "[model][gguf]") {
  TempDir dir;
  std::shared_ptr<MappedFile> keep;
  const uint8_t* data = nullptr;
  {
    auto f = OpenBytes(dir, ValidFile().Build());
    REQUIRE(f.ok());
    keep = (*f)->tensors()[0].file;
    data = (*f)->tensors()[0].data;
  }
  std::filesystem::remove(dir.path + "/model.gguf");
  CHECK(data[0] == 1);  // still mapped
  CHECK(keep.use_count() == 1);
}

// ---- One test per validation rule
// ----------------------------------------------------------------

TEST_CASE("A file without the GGUF magic is InvalidArgument", "[model][gguf]") {
  TempDir dir;
  std::string bytes = ValidFile().Build();
  bytes[0] = 'X';
  CheckError(OpenBytes(dir, bytes), absl::StatusCode::kInvalidArgument, "magic");
}

TEST_CASE("Versions other than 2 and 3, and big-endian files, are refused", "[model][gguf]") {
  TempDir dir;
  for (uint32_t version : {1u, 4u}) {
    GgufBuilder b = ValidFile();
    b.version = version;
    CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument,
               "GGUF version " + std::to_string(version) + " is not supported");
  }
  GgufBuilder b = ValidFile();
  b.version = 0x03000000;  // 3 as a big-endian writer stores it
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument, "big-endian");
}

TEST_CASE("A huge tensor or metadata count is refused before anything is allocated", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.tensor_count = uint64_t{1} << 60;
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kDataLoss, "tensor count 1152921504606846976");
  GgufBuilder m = ValidFile();
  m.metadata_count = ~uint64_t{0};
  CheckError(OpenBytes(dir, m.Build()), absl::StatusCode::kDataLoss, "metadata count");
}

TEST_CASE("A string length beyond the file is DataLoss naming the key", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.Key("general.name", kString).Put<uint64_t>(uint64_t{1} << 60).Raw("abc");
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kDataLoss,
             "key 'general.name' string of length 1152921504606846976");
}

TEST_CASE("An array length beyond the file is DataLoss naming the key", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.Key("tokenizer.ggml.scores", kArray).Put<uint32_t>(kF32).Put<uint64_t>(uint64_t{1} << 60);
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kDataLoss,
             "key 'tokenizer.ggml.scores' array length 1152921504606846976");
  // Strings count at least their 8-byte length each.
  GgufBuilder s = ValidFile();
  s.Key("tokenizer.ggml.tokens", kArray).Put<uint32_t>(kString).Put<uint64_t>(1000);
  CheckError(OpenBytes(dir, s.Build()), absl::StatusCode::kDataLoss, "key 'tokenizer.ggml.tokens' array length 1000");
}

TEST_CASE("Arrays nested deeper than the bound are InvalidArgument, at the bound they read", "[model][gguf]") {
  TempDir dir;
  auto nested = [](int depth) {
    GgufBuilder b = ValidFile();
    Encoder& e = b.Key("deep", kArray);
    for (int d = 1; d < depth; ++d) e.Put<uint32_t>(kArray).Put<uint64_t>(1);
    e.Put<uint32_t>(kU8).Put<uint64_t>(1).Put<uint8_t>(42);
    return b.Build();
  };
  CHECK(OpenBytes(dir, nested(kGgufMaxArrayDepth)).ok());
  CheckError(OpenBytes(dir, nested(kGgufMaxArrayDepth + 1)), absl::StatusCode::kInvalidArgument,
             "key 'deep': arrays nested more than 4 deep");
  // A hostile depth far beyond the bound fails the same way, without deep recursion.
  CheckError(OpenBytes(dir, nested(100000)), absl::StatusCode::kInvalidArgument, "nested more than");
}

TEST_CASE("A duplicate key is InvalidArgument naming it", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.Str("general.architecture", "qwen2");
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument,
             "key 'general.architecture': duplicate key");
}

TEST_CASE("Unknown value types and bool values other than 0 / 1 are InvalidArgument", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.Key("odd", 13).Put<uint32_t>(0);
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument, "key 'odd': unknown value type 13");
  GgufBuilder a = ValidFile();
  a.Key("odd", kArray).Put<uint32_t>(99).Put<uint64_t>(0);
  CheckError(OpenBytes(dir, a.Build()), absl::StatusCode::kInvalidArgument, "key 'odd': unknown array element type 99");
  GgufBuilder t = ValidFile();
  t.Key("flag", kBool).Put<uint8_t>(2);
  CheckError(OpenBytes(dir, t.Build()), absl::StatusCode::kInvalidArgument,
             "key 'flag': bool value 2 is neither 0 nor 1");
}

TEST_CASE("general.alignment must be a uint32 power of two", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b;
  b.U32("general.alignment", 48);
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument,
             "general.alignment 48 is not a power of two");
  GgufBuilder z;
  z.U32("general.alignment", 0);
  CheckError(OpenBytes(dir, z.Build()), absl::StatusCode::kInvalidArgument, "not a power of two");
  GgufBuilder t;
  t.Key("general.alignment", kU64).Put<uint64_t>(32);
  CheckError(OpenBytes(dir, t.Build()), absl::StatusCode::kInvalidArgument,
             "'general.alignment' has type uint64, expected uint32");
}

TEST_CASE("A custom alignment lays out the data section and offsets", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b;
  b.alignment = 64;
  b.U32("general.alignment", 64);
  b.Add("a", {3}, kTypeF32, TensorBytes(at::ones({3})));
  b.Add("b", {2}, kTypeF32, TensorBytes(at::full({2}, 2.0f)));
  auto f = OpenBytes(dir, b.Build());
  INFO(f.status().ToString());
  REQUIRE(f.ok());
  CHECK((*f)->alignment() == 64);
  CHECK((*f)->FindTensor("b")->offset == 64);
  float v;
  std::memcpy(&v, (*f)->FindTensor("b")->data, 4);
  CHECK(v == 2.0f);
  // The data section itself starts at a multiple of 64 (the mapping is page-aligned).
  CHECK(reinterpret_cast<uintptr_t>((*f)->FindTensor("a")->data) % 64 == 0);
}

TEST_CASE("A tensor offset that is not a multiple of the alignment is InvalidArgument", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.Add("b", {8}, kTypeF32, std::string(32, '\0'), uint64_t{256 + 4});
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument,
             "tensor 'b': offset 260 is not a multiple of the alignment 32");
}

TEST_CASE("A tensor beyond the data section, in a layout no writer makes, is out of range", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.Add("far", {8}, kTypeF32, std::string(32, '\0'), uint64_t{1} << 20, /*place_data=*/false);
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument,
             "tensor 'far': offset 1048576 + 32 bytes is out of range");
  GgufBuilder wrap = ValidFile();
  wrap.Add("wrap", {8}, kTypeF32, std::string(32, '\0'), ~uint64_t{31}, /*place_data=*/false);
  CheckError(OpenBytes(dir, wrap.Build()), absl::StatusCode::kInvalidArgument, "tensor 'wrap': offset");
}

TEST_CASE("Overlapping tensors are InvalidArgument naming both", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();  // "a" occupies [0, 256)
  b.Add("b", {8}, kTypeF32, std::string(32, '\0'), uint64_t{224});
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument, "tensors 'a' and 'b' overlap");
}

TEST_CASE("A truncated file is DataLoss, whether the cut is in the data or the header", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.Add("b", {64}, kTypeF32, std::string(256, '\2'));
  const std::string bytes = b.Build();
  CheckError(OpenBytes(dir, bytes.substr(0, bytes.size() - 100)), absl::StatusCode::kDataLoss,
             "truncated: tensor 'b' occupies data bytes [256, 512)");
  // Cut inside tensor "a"'s info (its ne[1] starts at 123): the counts still fit, the info does
  // not.
  CheckError(OpenBytes(dir, bytes.substr(0, 130)), absl::StatusCode::kDataLoss,
             "truncated or corrupt: tensor 'a' ne (8 bytes at offset 123) runs past the end of the "
             "file (130 bytes)");
  CheckError(OpenBytes(dir, bytes.substr(0, 10)), absl::StatusCode::kDataLoss, "shorter than the 24-byte GGUF header");
}

TEST_CASE("An unknown ggml type is InvalidArgument naming the tensor", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b = ValidFile();
  b.tensors[0].type = 4;  // Q4_2, removed from ggml long ago
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument, "tensor 'a': unknown ggml type 4");
}

TEST_CASE("A Q4_0 tensor whose rows are not whole blocks is InvalidArgument", "[model][gguf]") {
  TempDir dir;
  GgufBuilder b;
  b.Add("blk.0.attn_q.weight", {2, 48}, kTypeQ4_0, std::string(2 * 18, '\0'));
  CheckError(OpenBytes(dir, b.Build()), absl::StatusCode::kInvalidArgument,
             "tensor 'blk.0.attn_q.weight': type q4_0 stores blocks of 32 elements, but ne[0] (the "
             "row length) is 48");
}

TEST_CASE("Tensor names, dimensions and duplicates are validated", "[model][gguf]") {
  TempDir dir;
  GgufBuilder long_name = ValidFile();
  long_name.tensors[0].name = std::string(64, 'n');
  CheckError(OpenBytes(dir, long_name.Build()), absl::StatusCode::kInvalidArgument,
             "name is 64 bytes, longer than ggml's 63");
  GgufBuilder dup = ValidFile();
  dup.Add(dup.tensors[0]);
  CheckError(OpenBytes(dir, dup.Build()), absl::StatusCode::kInvalidArgument, "tensor 'a': duplicate tensor name");
  GgufBuilder dims = ValidFile();
  dims.tensors[0].shape = {1, 1, 1, 2, 32};
  CheckError(OpenBytes(dir, dims.Build()), absl::StatusCode::kInvalidArgument,
             "tensor 'a': n_dims 5 is outside [1, 4]");
  GgufBuilder zero = ValidFile();
  zero.tensors[0].shape = {0, 32};
  CheckError(OpenBytes(dir, zero.Build()), absl::StatusCode::kInvalidArgument, "tensor 'a': a dimension is 0");
  GgufBuilder overflow = ValidFile();
  overflow.tensors[0].shape = {int64_t{1} << 40, int64_t{1} << 40};
  CheckError(OpenBytes(dir, overflow.Build()), absl::StatusCode::kInvalidArgument, "element count overflows");
}

// =================================================================================================
// Model building
// =================================================================================================

TEST_CASE("Q8_0 and Q4_0 matrices read back bit for bit, q and k rows un-interleaved whole", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = MiniConfig();
  const ModelWeights w = RandomWeights(c, 21);
  for (WeightFormat format : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    INFO(WeightFormatName(format));
    auto f = OpenBytes(dir, MiniModel(c, w, format).Build());
    INFO(f.status().ToString());
    REQUIRE(f.ok());
    CheckSameConfig(MustConfig(**f), [&] {
      ModelConfig want = c;
      want.torch_dtype = "float16";  // what a quantized file implies
      return want;
    }());
    auto quantized = [&](const at::Tensor& t) {
      if (t.dim() == 1) return t;
      auto q = QuantizeMatrix(t, format);
      REQUIRE(q.ok());
      return *q;
    };
    const ModelWeights stored = MustWeights(**f, c, WeightPrecision::kStored);
    CheckWeights(stored, w, quantized);
    // Only q and k were copied (to un-interleave); the rest view the file.
    CHECK(InsideFile(stored.layers[0].v, **f));
    CHECK(InsideFile(stored.embed, **f));
    CHECK_FALSE(InsideFile(stored.layers[0].q, **f));
    const ModelWeights fp32 = MustWeights(**f, c, WeightPrecision::kFloat32);
    CheckWeights(fp32, w, [&](const at::Tensor& t) { return t.dim() == 1 ? t : DequantizeMatrix(quantized(t)); });
  }
}

TEST_CASE("Tensor types Seedling cannot load are refused, naming the tensor and llama-quantize", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = MiniConfig();
  GgufBuilder b = MiniModel(c, RandomWeights(c, 22), WeightFormat::kF32);
  TensorSpec* q = FindSpec(b, "blk.0.attn_q.weight");
  q->type = kTypeQ6_K;
  q->data = std::string(256 * 210, '\0');  // 256 rows of one 210-byte super-block
  auto w = LoadMini(dir, b);
  CheckError(w, absl::StatusCode::kInvalidArgument,
             "tensor 'blk.0.attn_q.weight' has type q6_K, which Seedling cannot load");
  CheckError(w, absl::StatusCode::kInvalidArgument, "llama-quantize --pure");
}

TEST_CASE("A tensor whose shape does not match the config is refused naming both shapes", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = MiniConfig();
  GgufBuilder b = MiniModel(c, RandomWeights(c, 23), WeightFormat::kF32);
  TensorSpec* k = FindSpec(b, "blk.0.attn_k.weight");
  k->shape = {64, 256};  // one KV head instead of two
  k->data.resize(64 * 256 * 4);
  CheckError(LoadMini(dir, b), absl::StatusCode::kInvalidArgument,
             "tensor 'blk.0.attn_k.weight' has shape [64, 256], config implies [128, 256]");
}

TEST_CASE("A missing tensor is NotFound naming it", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = MiniConfig();
  GgufBuilder b = MiniModel(c, RandomWeights(c, 24), WeightFormat::kF32);
  std::erase_if(b.tensors, [](const TensorSpec& t) { return t.name == "blk.0.ffn_up.weight"; });
  CheckError(LoadMini(dir, b), absl::StatusCode::kNotFound, "'blk.0.ffn_up.weight'");
}

TEST_CASE("A tensor the architecture does not have is refused naming it", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = MiniConfig();
  GgufBuilder b = MiniModel(c, RandomWeights(c, 25), WeightFormat::kF32);
  b.Add("blk.0.attn_q_norm.weight", {64}, kTypeF32, std::string(64 * 4, '\0'));
  CheckError(LoadMini(dir, b), absl::StatusCode::kInvalidArgument,
             "1 tensor(s) are not part of a LlamaForCausalLM with this config: "
             "'blk.0.attn_q_norm.weight'");
}

TEST_CASE("Norms stored as f16 become fp32, a quantized norm is refused", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = MiniConfig();
  const ModelWeights w = RandomWeights(c, 26);
  GgufBuilder b = MiniModel(c, w, WeightFormat::kF32);
  TensorSpec* norm = FindSpec(b, "output_norm.weight");
  const at::Tensor half = (w.final_norm * 0.5).to(at::kHalf);
  norm->type = kTypeF16;
  norm->data = TensorBytes(half);
  auto loaded = LoadMini(dir, b);
  REQUIRE(loaded.ok());
  CHECK(loaded->final_norm.scalar_type() == at::kFloat);
  CHECK(at::equal(loaded->final_norm, half.to(at::kFloat)));

  norm->type = kTypeQ8_0;
  norm->data = std::string(8 * 34, '\0');
  CheckError(LoadMini(dir, b), absl::StatusCode::kInvalidArgument,
             "tensor 'output_norm.weight' is 1-D but has block type q8_0");
}

TEST_CASE("Other architectures and missing required keys are refused naming them", "[model][gguf]") {
  TempDir dir;
  GgufBuilder other;
  other.Str("general.architecture", "falcon");
  auto f = OpenBytes(dir, other.Build());
  REQUIRE(f.ok());
  CheckError(ConfigFromGguf(**f), absl::StatusCode::kInvalidArgument,
             "general.architecture 'falcon' is not supported (supported: llama, qwen2, qwen3, olmo2, gemma2, gemma3, "
             "phi3, gptneox, gpt2, phi2)");
  // A required key missing: NotFound naming it.
  GgufBuilder partial;
  partial.Str("general.architecture", "llama").U32("llama.context_length", 8);
  auto p = OpenBytes(dir, partial.Build());
  REQUIRE(p.ok());
  CheckError(ConfigFromGguf(**p), absl::StatusCode::kNotFound, "'llama.embedding_length'");
}

TEST_CASE("Config keys Seedling cannot honour are refused naming the key", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = MiniConfig();
  const ModelWeights w = RandomWeights(c, 28);
  const std::vector<std::pair<std::function<void(GgufBuilder&)>, std::string>> cases = {
      {[](GgufBuilder& b) { b.U32("llama.expert_count", 8); },
       "llama.expert_count is 8: mixture-of-experts models are not supported"},
      {[](GgufBuilder& b) { b.U32("llama.rope.dimension_count", 32); },
       "llama.rope.dimension_count 32 differs from the head size 64"},
      {[](GgufBuilder& b) { b.U32("llama.attention.value_length", 32); },
       "llama.attention.value_length 32 differs from the key length 64"},
      {[](GgufBuilder& b) { b.Str("llama.rope.scaling.type", "yarn"); },
       "llama.rope.scaling.type 'yarn' is not supported"},
      {[](GgufBuilder& b) {
         b.StrArray("tokenizer.ggml.tokens", {"a", "b"});
       },
       "llama.vocab_size is 64 but tokenizer.ggml.tokens has 2 tokens"},
  };
  for (const auto& [add, message] : cases) {
    INFO(message);
    GgufBuilder b = MiniModel(c, w, WeightFormat::kF32);
    add(b);
    auto f = OpenBytes(dir, b.Build());
    REQUIRE(f.ok());
    CheckError(ConfigFromGguf(**f), absl::StatusCode::kInvalidArgument, message);
  }
}

// ---- Round trips through Seedling's writer
// --------------------------------------------------------

TEST_CASE("A Llama export with every bias reads back to an equal config and equal F32 weights", "[model][gguf]") {
  TempDir dir;
  ModelConfig c = TinyLlama();
  c.intermediate_size = 690;
  c.qkv_bias = c.o_bias = c.mlp_bias = true;  // q / k biases are interleaved like the weights
  const ModelWeights w = RandomWeights(c, 31);
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, w, *tok));
  CheckSameConfig(MustConfig(*f), c);
  const ModelWeights got = MustWeights(*f, c, WeightPrecision::kFloat32);
  CheckWeights(got, w, [](const at::Tensor& t) { return t; });
  // Zero copy: an F32 matrix views the mapping; q and k were un-interleaved into copies.
  CHECK(got.layers[1].v.data_ptr() == f->FindTensor("blk.1.attn_v.weight")->data);
  CHECK_FALSE(InsideFile(got.layers[1].q, *f));
  CHECK(got.lm_head.data_ptr() == got.embed.data_ptr());  // tied
}

TEST_CASE("An F16 export keeps f16 matrices with kStored and converts them with kFloat32", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 32);
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, w, *tok, WeightFormat::kF16));
  ModelConfig want = c;
  want.torch_dtype = "float16";
  CheckSameConfig(MustConfig(*f), want);
  // The server's model id: a device holding the GGUF and one holding the source directory agree.
  CHECK(ModelId(MustConfig(*f)) == ModelId(c));
  auto rounded = [](const at::Tensor& t) { return t.dim() == 1 ? t : t.to(at::kHalf); };
  CheckWeights(MustWeights(*f, c, WeightPrecision::kStored), w, rounded);
  CheckWeights(MustWeights(*f, c, WeightPrecision::kFloat32), w,
               [&](const at::Tensor& t) { return rounded(t).to(at::kFloat); });
}

TEST_CASE("A Q8_0 export reads back block for block, matrices that cannot be blocked stay F16", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyLlama();  // intermediate 688: ffn_down's rows are not whole blocks
  const ModelWeights w = RandomWeights(c, 33);
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, w, *tok, WeightFormat::kQ8_0));
  CHECK(f->FindTensor("blk.0.ffn_down.weight")->type == GgmlType::kF16);
  CheckWeights(MustWeights(*f, c, WeightPrecision::kStored), w, [](const at::Tensor& t) {
    if (t.dim() == 1) return t;
    if (MatrixFormatFor(WeightFormat::kQ8_0, t.size(1)) == WeightFormat::kF16) return t.to(at::kHalf);
    auto q = QuantizeMatrix(t, WeightFormat::kQ8_0);
    REQUIRE(q.ok());
    return *q;
  });
}

TEST_CASE("A GGUF model with frozen weights streams the layer matrices it uses in place, with the same results",
          "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyLlama();  // intermediate 688: ffn_down is written F16
  auto tok = ParseTokenizer(TokenizerJson());
  const std::string path = Export(dir, c, RandomWeights(c, 36), *tok, WeightFormat::kQ8_0);
  const std::unique_ptr<GgufFile> f = MustOpen(path);
  const int64_t layers = c.num_hidden_layers;
  // stored: v, o, gate, up (Q8_0) and down (F16) in place, and the tied embedding as the LM head (Q8_0);
  // q and k are un-permuted copies.
  CHECK(static_cast<int64_t>(GgufStreamableMatrices(*f, c, WeightPrecision::kStored).size()) == 5 * layers + 1);
  CHECK(static_cast<int64_t>(GgufStreamableMatrices(*f, c, WeightPrecision::kQ8_0).size()) == 5 * layers + 1);
  // q4_0 converts the Q8_0 blocks into memory; only the F16 ffn_down stays as the file holds it.
  CHECK(static_cast<int64_t>(GgufStreamableMatrices(*f, c, WeightPrecision::kQ4_0).size()) == layers);
  CHECK(GgufStreamableMatrices(*f, c, WeightPrecision::kFloat32).empty());
  const int64_t resident = *ResidentWeightBytes(path, c, WeightPrecision::kStored);
  const int64_t streamed = *StreamedWeightBytes(path, c, WeightPrecision::kStored, resident);
  CHECK(streamed > 0);
  CHECK(streamed < resident);
  CHECK(*StreamedWeightBytes(path, c, WeightPrecision::kFloat32, resident) == -1);

  LoadOptions stored;
  stored.precision = WeightPrecision::kStored;
  auto model = LlamaModel::Load(path, stored);
  REQUIRE(model.ok());
  REQUIRE((*model)->streamable());
  const at::Tensor tokens = at::arange(0, 40, at::kLong).view({2, 20}) * 37 % kModelVocab;
  const at::Tensor in_memory = *(*model)->Logits(tokens);
  (*model)->set_stream_weights(true);
  CHECK((*model)->stream_weights());
  CHECK((*model)->Logits(tokens)->equal(in_memory));
  CHECK((*model)->Logits(tokens)->equal(in_memory));  // released pages fault back in from the file
  auto fp32 = LlamaModel::Load(path, {});
  REQUIRE(fp32.ok());
  CHECK_FALSE((*fp32)->streamable());  // copy-on-write: --full may train its F32 matrices in place
}

TEST_CASE("A Qwen2 export reads back: untied head, q/k/v biases, rows not interleaved", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyQwen2OneEos();
  const ModelWeights w = RandomWeights(c, 34);
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, w, *tok));
  CheckSameConfig(MustConfig(*f), c);
  const ModelWeights got = MustWeights(*f, c, WeightPrecision::kStored);
  CheckWeights(got, w, [](const at::Tensor& t) { return t; });
  CHECK(InsideFile(got.layers[0].q, *f));  // no permutation, so no copy
}

TEST_CASE("A Phi export reads back: LayerNorm and LM head biases, the rotary share, one norm per block",
          "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyPhi();
  ModelWeights w = RandomWeights(c, 37);
  w.lm_head_bias.uniform_(-1, 1);
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, w, *tok));
  const ModelConfig got_config = MustConfig(*f);
  CheckSameConfig(got_config, c);
  CHECK(got_config.rotary_dim() == 16);
  const ModelWeights got = MustWeights(*f, c, WeightPrecision::kStored);
  CheckWeights(got, w, [](const at::Tensor& t) { return t; });
  REQUIRE(got.lm_head_bias.defined());
  CHECK(at::equal(got.lm_head_bias, w.lm_head_bias));
}

TEST_CASE("A phi2 file with q, k and v fused (the remote-code conversion) is refused naming the tensor",
          "[model][gguf]") {
  TempDir dir;
  GgufBuilder b;
  b.Str("general.architecture", "phi2")
      .U32("phi2.vocab_size", 64)
      .U32("phi2.context_length", 128)
      .U32("phi2.embedding_length", 32)
      .U32("phi2.block_count", 1)
      .U32("phi2.feed_forward_length", 128)
      .U32("phi2.attention.head_count", 4)
      .U32("phi2.attention.head_count_kv", 4)
      .F32("phi2.attention.layer_norm_epsilon", 1e-5f)
      .U32("phi2.rope.dimension_count", 4);
  b.Add("blk.0.attn_qkv.weight", {96, 32}, kTypeF32, TensorBytes(at::zeros({96, 32})));
  auto f = OpenBytes(dir, b.Build());
  REQUIRE(f.ok());
  CheckError(ConfigFromGguf(**f), absl::StatusCode::kInvalidArgument,
             "tensor 'blk.0.attn_qkv.weight': a phi2 file with q, k and v fused");
}

TEST_CASE("A Qwen3 export reads back: q/k norms, head size apart from hidden / heads, rows not interleaved",
          "[model][gguf]") {
  TempDir dir;
  ModelConfig c = TinyQwen3();
  c.eos_token_ids = {2};
  ModelWeights w = RandomWeights(c, 36);
  for (LayerWeights& l : w.layers) l.k_norm.uniform_(0.5, 1.5);
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, w, *tok));
  const ModelConfig got_config = MustConfig(*f);
  CheckSameConfig(got_config, c);
  CHECK(got_config.qk_norm == QkNorm::kPerHead);
  const ModelWeights got = MustWeights(*f, c, WeightPrecision::kStored);
  CheckWeights(got, w, [](const at::Tensor& t) { return t; });
  CHECK(at::equal(got.layers[1].k_norm, w.layers[1].k_norm));
}

TEST_CASE("An OLMo 2 export reads back: output norms, q/k norms over the projections, rows not interleaved",
          "[model][gguf]") {
  TempDir dir;
  ModelConfig c = TinyOlmo2();
  c.eos_token_ids = {2};
  ModelWeights w = RandomWeights(c, 37);
  for (LayerWeights& l : w.layers) {
    l.k_norm.uniform_(0.5, 1.5);
    l.mlp_output_norm.uniform_(0.5, 1.5);
  }
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, w, *tok));
  const ModelConfig got_config = MustConfig(*f);
  CheckSameConfig(got_config, c);
  CHECK(got_config.architecture == "Olmo2ForCausalLM");
  CHECK(got_config.qk_norm == QkNorm::kPerProjection);
  CHECK(got_config.norms.mlp_output);
  const ModelWeights got = MustWeights(*f, c, WeightPrecision::kStored);
  CheckWeights(got, w, [](const at::Tensor& t) { return t; });
  CHECK(at::equal(got.layers[1].mlp_output_norm, w.layers[1].mlp_output_norm));
  CHECK(InsideFile(got.layers[0].q, *f));  // no permutation, so no copy
}

TEST_CASE("A Gemma 2 export reads back: its soft-caps, window and alternating layers", "[model][gguf]") {
  TempDir dir;
  ModelConfig c = TinyGemma2();
  c.eos_token_ids = {2};
  c.attention_softcap = 40.0;  // not llama.cpp's defaults, so the keys are read
  c.final_logit_softcap = 25.0;
  const ModelWeights w = RandomWeights(c, 39);
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, w, *tok));
  const ModelConfig got_config = MustConfig(*f);
  CheckSameConfig(got_config, c);
  CHECK(got_config.attention_softcap == 40.0);
  CHECK(got_config.final_logit_softcap == 25.0);
  CHECK(ModelConfigToJson(got_config) == ModelConfigToJson(c));
  const ModelWeights got = MustWeights(*f, c, WeightPrecision::kStored);
  CHECK((got.layers[1].attention_output_norm - w.layers[1].attention_output_norm).abs().max().item<double>() < 1e-6);
  CHECK(at::equal(got.layers[0].k, w.layers[0].k));
}

TEST_CASE("A Gemma 3 export reads back: its window and local layers, norms back to w from the file's 1 + w",
          "[model][gguf]") {
  TempDir dir;
  ModelConfig c = TinyGemma3();
  c.eos_token_ids = {2};
  ModelWeights w = RandomWeights(c, 38);
  for (const NamedWeight& nw : NamedWeights(w, c)) {
    if (nw.name.find("norm") != std::string::npos) nw.tensor.uniform_(-0.5, 0.5);
  }
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, w, *tok));
  const ModelConfig got_config = MustConfig(*f);
  CheckSameConfig(got_config, c);
  CHECK(ModelConfigToJson(got_config) == ModelConfigToJson(c));  // every block option, the window pattern too
  const ModelWeights got = MustWeights(*f, c, WeightPrecision::kStored);
  for (const auto& [a, b] :
       {std::pair{got.layers[3].mlp_output_norm, w.layers[3].mlp_output_norm},
        std::pair{got.layers[0].k_norm, w.layers[0].k_norm}, std::pair{got.final_norm, w.final_norm}}) {
    CHECK((a - b).abs().max().item<double>() < 1e-6);  // (w + 1) - 1 in fp32
  }
  CHECK(at::equal(got.layers[1].q, w.layers[1].q));
}

TEST_CASE("Linear RoPE scaling and a head size apart from hidden / heads round-trip", "[model][gguf]") {
  TempDir dir;
  ModelConfig c = TinyLlama();
  c.rope_scaling.type = RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 4.0;
  c.head_dim = 48;
  c.rope_theta = 500000.0;
  c.rms_norm_eps = 1e-6;
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, RandomWeights(c, 35), *tok));
  CheckSameConfig(MustConfig(*f), c);
}

TEST_CASE("Llama 3 RoPE scaling round-trips through rope_freqs.weight", "[model][gguf]") {
  TempDir dir;
  auto tok = ParseTokenizer(TokenizerJson());
  ModelConfig tiny = TinyLlama();
  tiny.rope_scaling.type = RopeScaling::Type::kLlama3;
  tiny.rope_scaling.factor = 8.0;
  tiny.rope_scaling.original_max_position_embeddings = 512;  // frequencies in all three bands
  // Llama 3.2 1B's RoPE: head size 64, theta 500000, factor 32 over 8192 positions.
  ModelConfig llama32 = tiny;
  llama32.head_dim = 64;
  llama32.rope_theta = 500000.0;
  llama32.rope_scaling.factor = 32.0;
  llama32.rope_scaling.original_max_position_embeddings = 8192;
  for (const ModelConfig& c : {tiny, llama32}) {
    const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, RandomWeights(c, 36), *tok));
    CheckSameConfig(MustConfig(*f), c);
    CHECK(WeightsFromGguf(*f, c, WeightPrecision::kStored).ok());  // rope_freqs.weight expected
    ModelConfig unscaled = c;
    unscaled.rope_scaling = RopeScaling{};
    CheckError(WeightsFromGguf(*f, unscaled, WeightPrecision::kStored), absl::StatusCode::kInvalidArgument,
               "'rope_freqs.weight'");
  }
}

TEST_CASE("Llama 3 factors with other low / high frequency factors are fitted exactly", "[model][gguf]") {
  TempDir dir;
  ModelConfig c = TinyLlama();
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 16.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 6.0;
  c.rope_scaling.original_max_position_embeddings = 600;
  auto tok = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, RandomWeights(c, 37), *tok));
  const ModelConfig got = MustConfig(*f);
  CHECK(got.rope_scaling.type == RopeScaling::Type::kLlama3);
  CHECK(got.rope_scaling.factor == 16.0);
  CHECK(got.rope_scaling.original_max_position_embeddings == 600);
  CHECK(got.rope_scaling.high_freq_factor == Approx(6.0).epsilon(1e-4));
  const at::Tensor want = RopeInverseFrequencies(c), have = RopeInverseFrequencies(got);
  CHECK(at::allclose(have, want, 1e-5, 0));
}

TEST_CASE("rope_freqs.weight that is not Llama 3 scaling is refused", "[model][gguf]") {
  TempDir dir;
  ModelConfig c = TinyLlama();
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  auto tok = ParseTokenizer(TokenizerJson());
  const std::string path = Export(dir, c, RandomWeights(c, 38), *tok);
  uint64_t at = 0;
  {
    const std::unique_ptr<GgufFile> f = MustOpen(path);
    at = f->FindTensor("rope_freqs.weight")->data - f->file()->data();
  }
  std::string bytes = ReadBytes(path);
  for (int i = 0; i < 16; ++i) {
    const float factor = i % 2 == 0 ? 1.0f : 2.0f;  // alternating: no RoPE scaling looks like this
    std::memcpy(bytes.data() + at + 4 * i, &factor, 4);
  }
  auto f = OpenBytes(dir, bytes);
  REQUIRE(f.ok());
  CheckError(ConfigFromGguf(**f), absl::StatusCode::kInvalidArgument,
             "'rope_freqs.weight' does not follow Llama 3 RoPE scaling");
}

TEST_CASE("Logits of a model built from an F16 GGUF match the original within fp16 rounding", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 39);
  auto tok = ParseTokenizer(TokenizerJson());
  const at::Tensor tokens = at::tensor({3, 17, 250, 4, 99, 100, 7, 300}, at::kLong).reshape({1, 8});
  auto original = LlamaModel::Create(c, w);
  REQUIRE(original.ok());
  const at::Tensor want = *(*original)->Logits(tokens);
  for (WeightFormat format : {WeightFormat::kF32, WeightFormat::kF16}) {
    INFO(WeightFormatName(format));
    auto loaded = LoadGgufModel(Export(dir, c, w, *tok, format));
    INFO(loaded.status().ToString());
    REQUIRE(loaded.ok());
    auto model = LlamaModel::Create(loaded->config, std::move(loaded->weights));
    REQUIRE(model.ok());
    const at::Tensor got = *(*model)->Logits(tokens);
    const double diff = (got - want).abs().max().item<double>();
    const double scale = want.abs().max().item<double>();
    INFO("max |diff| " << diff << ", max |logit| " << scale);
    // F32 is the same computation; F16 rounds each weight by up to 2^-11 relative.
    CHECK(diff <= (format == WeightFormat::kF32 ? 1e-5 : 2e-3) * scale);
  }
}

// ---- Tokenizers
// ----------------------------------------------------------------------------------

const std::vector<std::string> kSamples = {
    "The phone learns a little every night.",      "Federated fine-tuning keeps the data on the device; 12345 67890",
    "  leading spaces, tabs\tand\nnewlines\n\n",   "<|im_start|>user\nhello<|im_end|><|endoftext|>",
    "caf\xC3\xA9 \xE2\x82\xAC 5 \xF0\x9F\x98\x80", "",
};

void CheckSameTokens(const Tokenizer& got, const Tokenizer& want, const std::vector<std::string>& samples) {
  for (const std::string& text : samples) {
    INFO("text '" << text << "'");
    for (bool special : {false, true}) {
      auto a = got.Encode(text, special);
      auto b = want.Encode(text, special);
      REQUIRE(a.ok());
      REQUIRE(b.ok());
      CHECK(*a == *b);
      CHECK(*got.Decode(*a) == *want.Decode(*b));
    }
  }
}

TEST_CASE("A byte-level BPE tokenizer read from GGUF encodes like the original", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyLlama();
  auto original = ParseTokenizer(TokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, RandomWeights(c, 41), *original));
  auto tok = MustTokenizer(*f);
  CheckSameTokens(*tok, *original, kSamples);
  // Special tokens in text are their single ids, as llama.cpp matches control tokens.
  const auto ids = *tok->Encode("<|im_start|>");
  CHECK(ids == std::vector<int32_t>{*original->TokenToId("<|im_start|>")});
  CHECK(tok->IsSpecial(ids[0]));
  CHECK(tok->vocab_size() == kModelVocab);  // the padding ids exist but are never produced
  // The trained tokenizer defines no BOS / EOS; the file has config.json's (0).
  CHECK(tok->bos_id() == 0);
  CHECK(tok->eos_id() == 0);
}

// tokenizer.json's pre-tokenizer rewritten to Llama 3's Split + ByteLevel(use_regex=false).
std::string Llama3StyleTokenizerJson() {
  json doc = json::parse(TokenizerJson());
  const std::string regex =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  doc["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
  doc["model"]["ignore_merges"] = true;
  return doc.dump();
}

TEST_CASE("A Llama 3 style tokenizer round-trips through tokenizer.ggml.pre 'llama-bpe'", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyLlama();
  auto original = ParseTokenizer(Llama3StyleTokenizerJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, RandomWeights(c, 42), *original));
  CHECK(*f->GetString("tokenizer.ggml.pre") == "llama-bpe");
  auto tok = MustTokenizer(*f);
  CheckSameTokens(*tok, *original, kSamples);
  // The Llama 3 split keeps digits in groups of up to three, unlike GPT-2's.
  CHECK(tok->Encode("1234567")->size() == original->Encode("1234567")->size());
  CHECK((*tok->Vocabulary()).pre_tokenizer == TokenizerVocabulary::PreTokenizer::kLlama3);
}

// A SentencePiece-style tokenizer.json (Llama 2 layout): "▁" escaping, byte fallback, BOS added.
std::string SentencePieceStyleJson() {
  const std::string meta = "\xE2\x96\x81";
  return testing::SentencePieceStyleTokenizerJson(
             {meta, "a", "d", "e", "h", "l", "o", "r", "w"},
             {{meta, "h"},
              {"e", "l"},
              {"el", "l"},
              {meta + "h", "ell"},
              {meta + "hell", "o"},
              {meta, "w"},
              {"o", "r"},
              {meta + "w", "or"},
              {meta + "wor", "l"},
              {meta + "worl", "d"},
              // Ranked last, so "hello" is "el" + "l" first, never "lo": merge order matters.
              {"l", "o"}})
      .dump();
}

TEST_CASE("A SentencePiece-style tokenizer read from GGUF encodes like the original", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyLlama();
  auto original = ParseTokenizer(SentencePieceStyleJson());
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, RandomWeights(c, 43), *original));
  CHECK(*f->GetString("tokenizer.ggml.model") == "llama");
  auto tok = MustTokenizer(*f);
  CheckSameTokens(*tok, *original,
                  {"hello world", "hello  world", "world hello", "h\xC3\xA9llo", "<s>hello</s>", "helloworld",
                   "dear old hollow", ""});
  // The merged pieces come back whole: merges were recovered from the scores.
  const auto ids = *tok->Encode("hello world");
  CHECK(ids.size() == 2);
  CHECK(*tok->Encode("hello", true) == std::vector<int32_t>{1, ids[0]});  // add_bos_token
  CHECK(tok->bos_id() == 1);
  CHECK(tok->eos_id() == static_cast<int32_t>(*f->GetU32("tokenizer.ggml.eos_token_id")));
}

TEST_CASE("A Gemma-style tokenizer (no dummy prefix) read from GGUF encodes like the original", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyGemma2();
  SentencePieceTrainerOptions options;
  options.vocab_size = 300;  // within the fixture model's vocabulary
  auto doc = TrainSentencePieceBpeTokenizerJson(
      "hello world, the world says hello; hello again and again, world.\nthe end of the world", options);
  REQUIRE(doc.ok());
  auto original = ParseTokenizer(*doc);
  const std::unique_ptr<GgufFile> f = MustOpen(Export(dir, c, RandomWeights(c, 44), *original));
  CHECK(*f->GetBool("tokenizer.ggml.add_space_prefix") == false);
  auto tok = MustTokenizer(*f);
  // With a dummy prefix "hello" would start as "▁hello", a different token.
  CheckSameTokens(*tok, *original, {"hello world", "world hello", " hello", "the end\nof", "caf\xC3\xA9", ""});
  CHECK(*tok->Encode("hello", true) == *original->Encode("hello", true));
}

TEST_CASE("Tokenizer models and pre-tokenizers llama.cpp would run differently are refused", "[model][gguf]") {
  TempDir dir;
  GgufBuilder base;
  base.StrArray("tokenizer.ggml.tokens", {"a", "b", "ab"});
  {
    GgufBuilder b = base;
    b.Str("tokenizer.ggml.model", "gpt2").Str("tokenizer.ggml.pre", "falcon");
    b.StrArray("tokenizer.ggml.merges", {"a b"});
    auto f = OpenBytes(dir, b.Build());
    REQUIRE(f.ok());
    CheckError(TokenizerFromGguf(**f), absl::StatusCode::kInvalidArgument,
               "tokenizer.ggml.pre 'falcon' is not supported");
  }
  {
    GgufBuilder b = base;
    b.Str("tokenizer.ggml.model", "t5");
    auto f = OpenBytes(dir, b.Build());
    REQUIRE(f.ok());
    CheckError(TokenizerFromGguf(**f), absl::StatusCode::kInvalidArgument,
               "tokenizer.ggml.model 't5' is not supported");
  }
  {
    GgufBuilder b = base;
    b.Str("tokenizer.ggml.model", "gpt2").Str("tokenizer.ggml.pre", "gpt-2");
    b.StrArray("tokenizer.ggml.merges", {"ab"});
    auto f = OpenBytes(dir, b.Build());
    REQUIRE(f.ok());
    CheckError(TokenizerFromGguf(**f), absl::StatusCode::kInvalidArgument,
               "tokenizer.ggml.merges[0] 'ab' is not two tokens");
  }
  {
    GgufBuilder b;
    b.StrArray("tokenizer.ggml.tokens", {"a", "b", "a"});
    b.Str("tokenizer.ggml.model", "llama");
    auto f = OpenBytes(dir, b.Build());
    REQUIRE(f.ok());
    CheckError(TokenizerFromGguf(**f), absl::StatusCode::kInvalidArgument, "token 'a' has two ids, 0 and 2");
  }
}

// ---- Entry points
// --------------------------------------------------------------------------------

TEST_CASE("IsGgufPath recognizes the suffix or the magic", "[model][gguf]") {
  TempDir dir;
  CHECK(IsGgufPath("/nonexistent/model.gguf"));
  const std::string plain = dir.path + "/weights.bin";
  std::ofstream(plain, std::ios::binary) << ValidFile().Build();
  CHECK(IsGgufPath(plain));
  const std::string other = dir.path + "/config.json";
  std::ofstream(other) << "{}";
  CHECK_FALSE(IsGgufPath(other));
  CHECK_FALSE(IsGgufPath(dir.path));
}

TEST_CASE("LoadGgufModel returns config, weights and tokenizer, or the first error", "[model][gguf]") {
  TempDir dir;
  const ModelConfig c = TinyQwen2OneEos();
  auto tok = ParseTokenizer(TokenizerJson());
  auto model = LoadGgufModel(Export(dir, c, RandomWeights(c, 44), *tok, WeightFormat::kF16), WeightPrecision::kStored);
  INFO(model.status().ToString());
  REQUIRE(model.ok());
  CHECK(model->config.architecture == "Qwen2ForCausalLM");
  CHECK(model->weights.layers[1].up.scalar_type() == at::kHalf);
  CHECK(*model->tokenizer->Encode("hello") == *tok->Encode("hello"));
  CheckError(LoadGgufModel(dir.path + "/missing.gguf"), absl::StatusCode::kNotFound, "missing.gguf");
}

}  // namespace
}  // namespace seedling::model
