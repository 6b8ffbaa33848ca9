#include "model/gguf.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <numbers>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/llama.h"
#include "model/quant.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tests/model/fixtures.h"

namespace seedling::model {
namespace {

using json = nlohmann::json;
using enum testing::GgufSpecType;

// ---- An independent GGUF reader, written from the specification (ggml docs/gguf.md) -------------

// ggml_type
constexpr uint32_t kGgmlF32 = 0;
constexpr uint32_t kGgmlF16 = 1;
constexpr uint32_t kGgmlQ4_0 = 2;
constexpr uint32_t kGgmlQ8_0 = 8;

struct Value {
  uint32_t type = 0;
  uint64_t u = 0;  // unsigned integers and bool
  int64_t i = 0;   // signed integers
  double f = 0;    // floats
  std::string s;
  uint32_t element_type = 0;  // arrays
  std::vector<Value> elements;
};

struct TensorInfo {
  std::string name;
  std::vector<uint64_t> ne;  // ggml order: ne[0] varies fastest
  uint32_t type = 0;
  uint64_t offset = 0;  // relative to the data section
};

struct GgufFile {
  std::string bytes;
  uint32_t version = 0;
  uint64_t tensor_count = 0;
  uint64_t kv_count = 0;
  std::map<std::string, Value> kv;
  std::vector<TensorInfo> tensors;
  uint64_t alignment = 32;
  uint64_t data_start = 0;

  const Value& Get(const std::string& key) const {
    INFO("key " << key);
    auto it = kv.find(key);
    REQUIRE(it != kv.end());
    return it->second;
  }
  const TensorInfo& Tensor(const std::string& name) const {
    INFO("tensor " << name);
    auto it = std::find_if(tensors.begin(), tensors.end(), [&](const TensorInfo& t) { return t.name == name; });
    REQUIRE(it != tensors.end());
    return *it;
  }
  bool HasTensor(const std::string& name) const {
    return std::any_of(tensors.begin(), tensors.end(), [&](const TensorInfo& t) { return t.name == name; });
  }
  const char* Data(const TensorInfo& t) const { return bytes.data() + data_start + t.offset; }
};

// Bytes of a row of n values: 4 / 2 per value, or blocks of 32 values in 34 (Q8_0: a half scale
// and 32 int8) or 18 bytes (Q4_0: a half scale and 16 bytes of nibbles), per ggml-common.h.
uint64_t TensorRowBytes(uint32_t ggml_type, uint64_t n) {
  switch (ggml_type) {
    case kGgmlF32:
      return 4 * n;
    case kGgmlF16:
      return 2 * n;
    case kGgmlQ8_0:
      REQUIRE(n % 32 == 0);
      return n / 32 * 34;
    case kGgmlQ4_0:
      REQUIRE(n % 32 == 0);
      return n / 32 * 18;
    default:
      FAIL("unexpected ggml type " << ggml_type);
  }
  return 0;
}

uint64_t TensorBytes(const TensorInfo& t) {
  uint64_t rows = 1;
  for (size_t d = 1; d < t.ne.size(); ++d) rows *= t.ne[d];
  return rows * TensorRowBytes(t.type, t.ne[0]);
}

class Reader {
 public:
  explicit Reader(const std::string& bytes) : bytes_(bytes) {}

  template <typename T>
  T Read() {
    REQUIRE(pos_ + sizeof(T) <= bytes_.size());
    T v;
    std::memcpy(&v, bytes_.data() + pos_,
                sizeof(T));  // the file is little-endian, like the test host
    pos_ += sizeof(T);
    return v;
  }
  std::string String() {
    const auto n = Read<uint64_t>();
    REQUIRE(pos_ + n <= bytes_.size());
    std::string s = bytes_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  Value ReadValue(uint32_t type) {
    Value v;
    v.type = type;
    switch (type) {
      case kU8:
        v.u = Read<uint8_t>();
        break;
      case kI8:
        v.i = Read<int8_t>();
        break;
      case kU16:
        v.u = Read<uint16_t>();
        break;
      case kI16:
        v.i = Read<int16_t>();
        break;
      case kU32:
        v.u = Read<uint32_t>();
        break;
      case kI32:
        v.i = Read<int32_t>();
        break;
      case kF32:
        v.f = Read<float>();
        break;
      case kBool: {
        v.u = Read<uint8_t>();
        REQUIRE(v.u <= 1);  // the spec: anything else is invalid
        break;
      }
      case kString:
        v.s = String();
        break;
      case kArray: {
        v.element_type = Read<uint32_t>();
        const auto n = Read<uint64_t>();
        v.elements.reserve(n);
        for (uint64_t k = 0; k < n; ++k) v.elements.push_back(ReadValue(v.element_type));
        break;
      }
      case kU64:
        v.u = Read<uint64_t>();
        break;
      case kI64:
        v.i = Read<int64_t>();
        break;
      case kF64:
        v.f = Read<double>();
        break;
      default:
        FAIL("unknown metadata value type " << type);
    }
    return v;
  }
  uint64_t pos() const { return pos_; }

 private:
  const std::string& bytes_;
  uint64_t pos_ = 0;
};

GgufFile ReadGguf(const std::string& path) {
  GgufFile f;
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  f.bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  Reader r(f.bytes);
  REQUIRE(f.bytes.substr(0, 4) == "GGUF");
  r.Read<uint32_t>();
  f.version = r.Read<uint32_t>();
  f.tensor_count = r.Read<uint64_t>();
  f.kv_count = r.Read<uint64_t>();
  for (uint64_t k = 0; k < f.kv_count; ++k) {
    std::string key = r.String();
    const auto type = r.Read<uint32_t>();
    INFO("key " << key);
    REQUIRE(f.kv.count(key) == 0);
    f.kv.emplace(std::move(key), r.ReadValue(type));
  }
  if (auto it = f.kv.find("general.alignment"); it != f.kv.end()) {
    REQUIRE(it->second.type == kU32);
    f.alignment = it->second.u;
  }
  for (uint64_t k = 0; k < f.tensor_count; ++k) {
    TensorInfo t;
    t.name = r.String();
    const auto n_dims = r.Read<uint32_t>();
    REQUIRE(n_dims >= 1);
    REQUIRE(n_dims <= 4);
    for (uint32_t d = 0; d < n_dims; ++d) t.ne.push_back(r.Read<uint64_t>());
    t.type = r.Read<uint32_t>();
    t.offset = r.Read<uint64_t>();
    f.tensors.push_back(std::move(t));
  }
  // The data section starts at the next multiple of the alignment; the padding is zeros.
  f.data_start = (r.pos() + f.alignment - 1) / f.alignment * f.alignment;
  for (uint64_t p = r.pos(); p < f.data_start; ++p) REQUIRE(f.bytes[p] == '\0');
  for (const TensorInfo& t : f.tensors) {
    INFO("tensor " << t.name);
    REQUIRE(f.data_start + t.offset + TensorBytes(t) <= f.bytes.size());
  }
  return f;
}

std::vector<std::string> Strings(const Value& v) {
  REQUIRE(v.type == kArray);
  REQUIRE(v.element_type == kString);
  std::vector<std::string> out;
  for (const Value& e : v.elements) out.push_back(e.s);
  return out;
}

std::vector<int64_t> Ints(const Value& v) {
  REQUIRE(v.type == kArray);
  REQUIRE(v.element_type == kI32);
  std::vector<int64_t> out;
  for (const Value& e : v.elements) out.push_back(e.i);
  return out;
}

// IEEE half -> float, written out from the bit layout (1 sign, 5 exponent, 10 mantissa bits).
float HalfToFloat(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return static_cast<float>(sign ? -magnitude : magnitude);
}

// The tensor's values as floats, in file (row-major, ne[0] fastest) order.
std::vector<float> Floats(const GgufFile& f, const TensorInfo& t) {
  uint64_t n = 1;
  for (uint64_t d : t.ne) n *= d;
  std::vector<float> out(n);
  const char* p = f.Data(t);
  for (uint64_t k = 0; k < n; ++k) {
    if (t.type == kGgmlF32) {
      std::memcpy(&out[k], p + 4 * k, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, p + 2 * k, 2);
      out[k] = HalfToFloat(h);
    }
  }
  return out;
}

std::vector<float> ToVector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

std::vector<uint8_t> Bytes(const GgufFile& f, const TensorInfo& t) {
  const auto* p = reinterpret_cast<const uint8_t*>(f.Data(t));
  return std::vector<uint8_t>(p, p + TensorBytes(t));
}

std::vector<uint8_t> Bytes(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  REQUIRE(c.scalar_type() == at::kByte);
  return std::vector<uint8_t>(c.data_ptr<uint8_t>(), c.data_ptr<uint8_t>() + c.numel());
}

// llama.cpp's q/k row permutation, written as index arithmetic: within each head of D rows, file
// row 2i + j holds original row j * D/2 + i (i < D/2, j in {0, 1}). Rows are `n_cols` elements.
enum class RowOrder { kToFile, kToOriginal };
template <typename T>
std::vector<T> PermuteRows(const std::vector<T>& rows, int64_t n_rows, int64_t n_cols, int64_t heads, RowOrder order) {
  const int64_t d = n_rows / heads;
  std::vector<T> out(rows.size());
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < d / 2; ++i) {
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t file_row = h * d + 2 * i + j;
        const int64_t original_row = h * d + j * (d / 2) + i;
        const int64_t from = order == RowOrder::kToFile ? original_row : file_row;
        const int64_t to = order == RowOrder::kToFile ? file_row : original_row;
        std::copy_n(rows.begin() + from * n_cols, n_cols, out.begin() + to * n_cols);
      }
    }
  }
  return out;
}

std::vector<float> Unpermute(const std::vector<float>& rows, int64_t n_rows, int64_t n_cols, int64_t heads) {
  return PermuteRows(rows, n_rows, n_cols, heads, RowOrder::kToOriginal);
}

// What a block-format export holds for the float matrix `values` (rows, cols): QuantizeMatrix of
// its rows in file order (permuted in `heads` heads, or not when 0).
std::vector<uint8_t> ExpectedBlocks(const at::Tensor& values, WeightFormat format, int64_t heads) {
  const int64_t n_rows = values.size(0), n_cols = values.size(1);
  std::vector<float> rows = ToVector(values);
  if (heads > 0) rows = PermuteRows(rows, n_rows, n_cols, heads, RowOrder::kToFile);
  auto blocks = QuantizeMatrix(at::from_blob(rows.data(), {n_rows, n_cols}, at::kFloat), format);
  INFO(blocks.status().ToString());
  REQUIRE(blocks.ok());
  return Bytes(*blocks);
}

// ---- Fixtures -----------------------------------------------------------------------------------

std::string TempDir(const std::string& name) {
  const std::string dir =
      std::filesystem::temp_directory_path() / ("seedling_gguf_test_" + std::to_string(getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

bool DirEmpty(const std::string& dir) { return std::filesystem::is_empty(dir); }

using testing::Corpus;
using testing::kModelVocab;
using testing::kTokenizerVocab;
using testing::ParseTokenizer;
using testing::TinyGemma2;
using testing::TinyGemma3;
using testing::TinyGpt2;
using testing::TinyGptNeoX;
using testing::TinyLlama;
using testing::TinyOlmo2;
using testing::TinyPhi;
using testing::TinyPhi3;
using testing::TinyQwen2;
using testing::TinyQwen3;
using testing::TokenizerJson;

// TinyLlama() with every optional Llama bias (attention_bias, mlp_bias) and an intermediate size
// whose F32 vectors (690 x 4 bytes) are not a multiple of the alignment, so the padding between
// tensors is exercised.
ModelConfig TinyLlamaWithBiases() {
  ModelConfig c = TinyLlama();
  c.intermediate_size = 690;
  c.qkv_bias = true;
  c.o_bias = true;
  c.mlp_bias = true;
  REQUIRE(c.Validate().ok());
  return c;
}

GgufFile Export(const std::string& path, const ModelConfig& c, const ModelWeights& w, const Tokenizer& t,
                const GgufOptions& options = {}) {
  const absl::Status s = WriteGguf(path, c, w, t, options);
  INFO(s.ToString());
  REQUIRE(s.ok());
  return ReadGguf(path);
}

GgufOptions F32() {
  GgufOptions o;
  o.format = WeightFormat::kF32;
  return o;
}

// The Hugging Face name -> tensor of every weight, for comparing with the file.
std::map<std::string, at::Tensor> ByGgufName(const ModelWeights& w) {
  std::map<std::string, at::Tensor> m = {{"token_embd.weight", w.embed},
                                         {"output_norm.weight", w.final_norm},
                                         {"output_norm.bias", w.final_norm_bias},
                                         {"position_embd.weight", w.positions},
                                         {"output.weight", w.lm_head},
                                         {"output.bias", w.lm_head_bias}};
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const LayerWeights& l = w.layers[i];
    const std::string b = "blk." + std::to_string(i) + ".";
    m[b + "attn_norm.weight"] = l.input_norm;
    m[b + "attn_q.weight"] = l.q;
    m[b + "attn_k.weight"] = l.k;
    m[b + "attn_v.weight"] = l.v;
    m[b + "attn_output.weight"] = l.o;
    m[b + "attn_q_norm.weight"] = l.q_norm;
    m[b + "attn_k_norm.weight"] = l.k_norm;
    m[b + "post_attention_norm.weight"] = l.attention_output_norm;
    m[b + "ffn_norm.weight"] = l.pre_mlp_norm;
    m[b + "post_ffw_norm.weight"] = l.mlp_output_norm;
    m[b + "ffn_gate.weight"] = l.gate;
    m[b + "ffn_up.weight"] = l.up;
    m[b + "ffn_down.weight"] = l.down;
    m[b + "attn_q.bias"] = l.q_bias;
    m[b + "attn_k.bias"] = l.k_bias;
    m[b + "attn_v.bias"] = l.v_bias;
    m[b + "attn_output.bias"] = l.o_bias;
    m[b + "ffn_gate.bias"] = l.gate_bias;
    m[b + "ffn_up.bias"] = l.up_bias;
    m[b + "ffn_down.bias"] = l.down_bias;
    m[b + "attn_norm.bias"] = l.input_norm_bias;  // LayerNorms (gptneox)
    m[b + "ffn_norm.bias"] = l.pre_mlp_norm_bias;
    if (l.qkv.defined()) m[b + "attn_qkv.weight"] = l.qkv;
    if (l.qkv_bias.defined()) m[b + "attn_qkv.bias"] = l.qkv_bias;
    if (l.gate_up.defined()) m[b + "ffn_up.weight"] = l.gate_up;  // llama.cpp's phi3: gate | up
  }
  return m;
}

// The heads a tensor's rows are permuted in (llama arch q / k weights and biases), else 0.
int64_t PermutedHeads(const std::string& name, const ModelConfig& c) {
  if (name.find("attn_q.") != std::string::npos) return c.num_attention_heads;
  if (name.find("attn_k.") != std::string::npos) return c.num_key_value_heads;
  return 0;
}

uint32_t GgmlTypeFor(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32:
      return kGgmlF32;
    case WeightFormat::kF16:
      return kGgmlF16;
    case WeightFormat::kQ8_0:
      return kGgmlQ8_0;
    case WeightFormat::kQ4_0:
      return kGgmlQ4_0;
    default:
      FAIL("no GGUF export in " << WeightFormatName(format));
  }
  return 0;
}

// The format a tensor must have in a file whose matrices were requested in `requested`: 1-D
// tensors F32; a block format only for rows of whole blocks (cols % 32 == 0), else F16.
WeightFormat ExpectedFormat(const at::Tensor& original, WeightFormat requested) {
  if (original.dim() == 1) return WeightFormat::kF32;
  const bool blocks = requested == WeightFormat::kQ8_0 || requested == WeightFormat::kQ4_0;
  return blocks && LogicalShape(original)[1] % 32 != 0 ? WeightFormat::kF16 : requested;
}

// Checks every tensor of `f` against `w`: ggml dims are the (logical) PyTorch shape reversed, and
// the contents are the weight's values (dequantized first if `w` holds blocks) in the file's
// format: rounded to F16, or QuantizeMatrix's blocks, with q/k rows permuted when `permuted`.
void CheckTensorData(const GgufFile& f, const ModelConfig& c, const ModelWeights& w, bool permuted,
                     WeightFormat matrix_format) {
  const auto originals = ByGgufName(w);
  for (const TensorInfo& t : f.tensors) {
    if (t.name.starts_with("rope_f")) continue;  // rope_freqs / rope_factors_*: checked where written
    INFO("tensor " << t.name);
    const at::Tensor& original = originals.at(t.name);
    REQUIRE(original.defined());
    const std::vector<int64_t> shape = LogicalShape(original);
    CHECK(t.ne == std::vector<uint64_t>(shape.rbegin(), shape.rend()));
    const WeightFormat format = ExpectedFormat(original, matrix_format);
    CHECK(t.type == GgmlTypeFor(format));
    const at::Tensor values = original.scalar_type() == at::kByte ? DequantizeMatrix(original) : original;
    const int64_t heads = permuted ? PermutedHeads(t.name, c) : 0;
    if (format == WeightFormat::kQ8_0 || format == WeightFormat::kQ4_0) {
      CHECK(Bytes(f, t) == ExpectedBlocks(values, format, heads));
      if (heads > 0) CHECK(Bytes(f, t) != ExpectedBlocks(values, format, 0));
      continue;
    }
    // What the file should hold: the weight rounded to the file's type (a no-op for F32).
    const std::vector<float> want = ToVector(values.to(format == WeightFormat::kF16 ? at::kHalf : at::kFloat));
    std::vector<float> got = Floats(f, t);
    if (heads > 0) {
      const int64_t rows = shape[0], cols = shape.size() == 2 ? shape[1] : 1;
      // The permutation must have moved something, or the un-permuting below proves nothing.
      CHECK(got != want);
      got = Unpermute(got, rows, cols, heads);
    }
    CHECK(got == want);
  }
}

// Seedling loads the F32 file at `path` as the model (c, w) it was written from: the same logits.
void CheckSameLogits(const std::string& path, const ModelConfig& c, const ModelWeights& w) {
  auto original = LlamaModel::Create(c, w);
  auto loaded = LlamaModel::Load(path);
  REQUIRE(original.ok());
  REQUIRE(loaded.ok());
  const at::Tensor tokens = at::tensor({5, 17, 3, 250, 9, 1}, at::kLong).view({1, 6});
  CHECK((*(*loaded)->Logits(tokens) - *(*original)->Logits(tokens)).abs().max().item<double>() < 1e-5);
}

// ---- Tests --------------------------------------------------------------------------------------

TEST_CASE("A GGUF export parses with an independent reader: header, every metadata key, tensor layout",
          "[model][gguf]") {
  const std::string dir = TempDir("layout");
  const ModelConfig c = TinyLlamaWithBiases();
  const ModelWeights w = RandomWeights(c, 1);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok);

  CHECK(f.version == 3);
  // Every key written, with its type and value.
  const std::set<std::string> expected_keys = {"general.architecture",
                                               "general.name",
                                               "general.file_type",
                                               "general.alignment",
                                               "llama.vocab_size",
                                               "llama.context_length",
                                               "llama.embedding_length",
                                               "llama.block_count",
                                               "llama.feed_forward_length",
                                               "llama.attention.head_count",
                                               "llama.attention.head_count_kv",
                                               "llama.attention.layer_norm_rms_epsilon",
                                               "llama.rope.dimension_count",
                                               "llama.rope.freq_base",
                                               "tokenizer.ggml.model",
                                               "tokenizer.ggml.pre",
                                               "tokenizer.ggml.tokens",
                                               "tokenizer.ggml.token_type",
                                               "tokenizer.ggml.merges",
                                               "tokenizer.ggml.bos_token_id",
                                               "tokenizer.ggml.eos_token_id",
                                               "tokenizer.ggml.add_bos_token",
                                               "tokenizer.ggml.add_eos_token"};
  std::set<std::string> keys;
  for (const auto& [key, value] : f.kv) keys.insert(key);
  CHECK(keys == expected_keys);
  CHECK(f.kv_count == expected_keys.size());
  auto u32 = [&](const std::string& key) {
    const Value& v = f.Get(key);
    INFO(key);
    CHECK(v.type == kU32);  // llama.cpp rejects any other integer type for these
    return v.u;
  };
  auto f32 = [&](const std::string& key) {
    const Value& v = f.Get(key);
    INFO(key);
    CHECK(v.type == kF32);
    return v.f;
  };
  auto str = [&](const std::string& key) {
    const Value& v = f.Get(key);
    INFO(key);
    CHECK(v.type == kString);
    return v.s;
  };
  auto boolean = [&](const std::string& key) {
    const Value& v = f.Get(key);
    INFO(key);
    CHECK(v.type == kBool);
    return v.u != 0;
  };
  CHECK(str("general.architecture") == "llama");
  CHECK(str("general.name") == "LlamaForCausalLM");
  CHECK(u32("general.file_type") == 1);  // MOSTLY_F16, the default
  CHECK(u32("general.alignment") == 32);
  CHECK(u32("llama.vocab_size") == 320);
  CHECK(u32("llama.context_length") == static_cast<uint64_t>(c.max_position_embeddings));
  CHECK(u32("llama.embedding_length") == 256);
  CHECK(u32("llama.block_count") == 2);
  CHECK(u32("llama.feed_forward_length") == 690);
  CHECK(u32("llama.attention.head_count") == 8);
  CHECK(u32("llama.attention.head_count_kv") == 2);
  CHECK(f32("llama.attention.layer_norm_rms_epsilon") == static_cast<float>(c.rms_norm_eps));
  CHECK(u32("llama.rope.dimension_count") == 32);
  CHECK(f32("llama.rope.freq_base") == 10000.0);
  CHECK(str("tokenizer.ggml.model") == "gpt2");
  CHECK(str("tokenizer.ggml.pre") == "gpt-2");
  CHECK(Strings(f.Get("tokenizer.ggml.tokens")).size() == 320);
  CHECK(Ints(f.Get("tokenizer.ggml.token_type")).size() == 320);
  CHECK(u32("tokenizer.ggml.bos_token_id") == 0);  // from config.json: the trained tokenizer defines none
  CHECK(u32("tokenizer.ggml.eos_token_id") == 0);
  CHECK_FALSE(boolean("tokenizer.ggml.add_bos_token"));
  CHECK_FALSE(boolean("tokenizer.ggml.add_eos_token"));

  // Tensor infos: the expected names (tied: no output.weight), aligned offsets, packed in order.
  std::set<std::string> names, expected_names = {"token_embd.weight", "output_norm.weight"};
  for (int i = 0; i < 2; ++i) {
    for (const char* n :
         {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}) {
      expected_names.insert("blk." + std::to_string(i) + "." + n + ".weight");
    }
    for (const char* n : {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}) {
      expected_names.insert("blk." + std::to_string(i) + "." + n + ".bias");
    }
  }
  for (const TensorInfo& t : f.tensors) names.insert(t.name);
  CHECK(names == expected_names);
  CHECK(f.tensor_count == expected_names.size());
  CHECK(f.data_start % 32 == 0);
  uint64_t next = 0;
  for (const TensorInfo& t : f.tensors) {
    INFO("tensor " << t.name);
    CHECK(t.offset % 32 == 0);
    CHECK(t.offset == next);  // llama.cpp requires tensors back to back, each padded to the alignment
    next = (t.offset + TensorBytes(t) + 31) / 32 * 32;
  }
  CHECK(f.bytes.size() == f.data_start + next);
  CHECK(f.Tensor("token_embd.weight").ne == std::vector<uint64_t>{256, 320});
  CHECK(f.Tensor("blk.1.attn_k.weight").ne == std::vector<uint64_t>{256, 64});
  CHECK(f.Tensor("blk.0.ffn_down.weight").ne == std::vector<uint64_t>{690, 256});
  CHECK(f.Tensor("blk.0.ffn_up.bias").ne == std::vector<uint64_t>{690});
  CHECK(f.Tensor("blk.0.ffn_up.bias").type == kGgmlF32);
  CHECK(f.Tensor("output_norm.weight").ne == std::vector<uint64_t>{256});
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "An F32 export holds the weights exactly, with q and k rows permuted as llama.cpp's convert "
    "does",
    "[model][gguf]") {
  const std::string dir = TempDir("f32");
  const ModelConfig c = TinyLlamaWithBiases();  // q / k biases are permuted like the weights
  const ModelWeights w = RandomWeights(c, 2);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, F32());
  CHECK(f.Get("general.file_type").u == 0);  // ALL_F32
  CheckTensorData(f, c, w, /*permuted=*/true, WeightFormat::kF32);
  std::filesystem::remove_all(dir);
}

TEST_CASE("An F16 export rounds every matrix to half precision and keeps norms in F32", "[model][gguf]") {
  const std::string dir = TempDir("f16");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 3);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok);  // F16 is the default
  CHECK(f.Get("general.file_type").u == 1);
  CHECK(f.Tensor("blk.0.attn_v.weight").type == kGgmlF16);
  CHECK(f.Tensor("blk.0.attn_norm.weight").type == kGgmlF32);
  CheckTensorData(f, c, w, /*permuted=*/true, WeightFormat::kF16);
  // Half precision keeps 11 significant bits: the file is within 2^-11 (relative) of the fp32
  // weights.
  const TensorInfo& v = f.Tensor("blk.1.attn_v.weight");
  const std::vector<float> got = Floats(f, v), original = ToVector(w.layers[1].v);
  for (size_t k = 0; k < got.size(); ++k) {
    INFO(k);
    REQUIRE(std::abs(got[k] - original[k]) <= std::abs(original[k]) * 0x1p-11f + 0x1p-24f);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("Weights held in bfloat16 or float16 are converted to the file's types", "[model][gguf]") {
  const std::string dir = TempDir("stored");
  const ModelConfig c = TinyLlama();
  ModelWeights w = RandomWeights(c, 4);
  // As WeightPrecision::kStored leaves them: 16-bit matrices, fp32 norms.
  w.embed = w.embed.to(at::kBFloat16);
  w.lm_head = w.embed;
  for (LayerWeights& l : w.layers) {
    for (at::Tensor* t : {&l.q, &l.k, &l.v, &l.o}) *t = t->to(at::kBFloat16);
    for (at::Tensor* t : {&l.gate, &l.up, &l.down}) *t = t->to(at::kHalf);
  }
  auto tok = ParseTokenizer(TokenizerJson());
  // F32 holds the 16-bit values exactly; F16 rounds the bfloat16 ones (more exponent, fewer
  // mantissa bits).
  CheckTensorData(Export(dir + "/f32.gguf", c, w, *tok, F32()), c, w, true, WeightFormat::kF32);
  CheckTensorData(Export(dir + "/f16.gguf", c, w, *tok), c, w, true, WeightFormat::kF16);
  std::filesystem::remove_all(dir);
}

GgufOptions Format(WeightFormat format) {
  GgufOptions o;
  o.format = format;
  return o;
}

TEST_CASE("A Q8_0 export holds QuantizeMatrix's blocks of every matrix, q and k rows permuted",
          "[model][gguf][quant]") {
  const std::string dir = TempDir("q8_0");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 20);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, Format(WeightFormat::kQ8_0));
  CHECK(f.Tensor("blk.0.attn_q.weight").type == kGgmlQ8_0);
  CHECK(f.Tensor("token_embd.weight").type == kGgmlQ8_0);
  CheckTensorData(f, c, w, /*permuted=*/true, WeightFormat::kQ8_0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Q4_0 export holds QuantizeMatrix's blocks of every matrix, q and k rows permuted",
          "[model][gguf][quant]") {
  const std::string dir = TempDir("q4_0");
  const ModelConfig c = TinyLlamaWithBiases();  // q / k biases stay F32 but are permuted
  const ModelWeights w = RandomWeights(c, 21);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, Format(WeightFormat::kQ4_0));
  CHECK(f.Tensor("blk.1.attn_k.weight").type == kGgmlQ4_0);
  CHECK(f.Tensor("blk.1.attn_k.bias").type == kGgmlF32);
  CheckTensorData(f, c, w, /*permuted=*/true, WeightFormat::kQ4_0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Qwen2 Q4_0 export quantizes q and k rows in their original order", "[model][gguf][quant]") {
  const std::string dir = TempDir("qwen2_q4_0");
  const ModelConfig c = TinyQwen2();
  const ModelWeights w = RandomWeights(c, 22);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, Format(WeightFormat::kQ4_0));
  CHECK(f.Tensor("output.weight").type == kGgmlQ4_0);
  CheckTensorData(f, c, w, /*permuted=*/false, WeightFormat::kQ4_0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("A matrix whose column count is not a multiple of 32 is written F16 in a Q4_0 export",
          "[model][gguf][quant]") {
  const std::string dir = TempDir("odd_cols");
  const ModelConfig c = TinyLlama();
  REQUIRE(c.intermediate_size == 688);  // down_proj (256, 688): 21.5 blocks per row
  // The in-memory quantized base follows the same rule, so both hold the same numbers.
  REQUIRE(MatrixFormatFor(WeightFormat::kQ4_0, 688) == WeightFormat::kF16);
  const ModelWeights w = RandomWeights(c, 23);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, Format(WeightFormat::kQ4_0));
  const TensorInfo& down = f.Tensor("blk.0.ffn_down.weight");
  CHECK(down.type == kGgmlF16);
  CHECK(down.ne == std::vector<uint64_t>{688, 256});
  CHECK(Floats(f, down) == ToVector(w.layers[0].down.to(at::kHalf)));
  CHECK(f.Tensor("blk.0.ffn_up.weight").type == kGgmlQ4_0);  // (688, 256): whole blocks
  CHECK(f.Get("general.file_type").u == 2);                  // still MOSTLY_Q4_0
  std::filesystem::remove_all(dir);
}

TEST_CASE("general.file_type names the requested format, and block formats add the quantization version",
          "[model][gguf][quant]") {
  const std::string dir = TempDir("file_type");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 24);
  auto tok = ParseTokenizer(TokenizerJson());
  // llama_ftype: ALL_F32 = 0, MOSTLY_F16 = 1, MOSTLY_Q4_0 = 2, MOSTLY_Q8_0 = 7.
  const std::pair<WeightFormat, uint64_t> cases[] = {
      {WeightFormat::kF32, 0}, {WeightFormat::kF16, 1}, {WeightFormat::kQ4_0, 2}, {WeightFormat::kQ8_0, 7}};
  for (const auto& [format, file_type] : cases) {
    INFO(WeightFormatName(format));
    const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, Format(format));
    CHECK(f.Get("general.file_type").type == kU32);
    CHECK(f.Get("general.file_type").u == file_type);
    if (file_type >= 2) {
      CHECK(f.Get("general.quantization_version").type == kU32);
      CHECK(f.Get("general.quantization_version").u == 2);  // ggml's GGML_QNT_VERSION
    } else {
      CHECK_FALSE(f.kv.count("general.quantization_version"));
    }
  }
  std::filesystem::remove_all(dir);
}

// A (rows, cols) matrix of valid GGUF blocks that QuantizeMatrix would never produce (every code
// well inside its range, one fixed scale), so copying and re-quantizing give different bytes.
at::Tensor OffGridBlocks(int64_t rows, int64_t cols, WeightFormat format, uint32_t seed) {
  const int64_t block_bytes = BlockBytes(format);
  at::Tensor t = at::empty({rows, cols / 32, block_bytes}, at::kByte);
  std::mt19937 rng(seed);
  uint8_t* p = t.data_ptr<uint8_t>();
  for (int64_t b = 0; b < rows * cols / 32; ++b, p += block_bytes) {
    p[0] = 0x1F;  // binary16 0x211F, about 0.01
    p[1] = 0x21;
    for (int64_t k = 2; k < block_bytes; ++k) {
      if (format == WeightFormat::kQ8_0) {
        p[k] = static_cast<uint8_t>(static_cast<int8_t>(static_cast<int>(rng() % 101) - 50));
      } else {
        p[k] = static_cast<uint8_t>((2 + rng() % 12) | ((2 + rng() % 12) << 4));
      }
    }
  }
  return t;
}

// `c`'s weights with every matrix of whole blocks in `format` (off-grid blocks) and the others F16,
// as a quantized base holds them.
ModelWeights QuantizedWeights(const ModelConfig& c, WeightFormat format) {
  ModelWeights w = RandomWeights(c, 25);
  uint32_t seed = 0;
  auto quantize = [&](at::Tensor& t) {
    t = t.size(1) % 32 == 0 ? OffGridBlocks(t.size(0), t.size(1), format, ++seed) : t.to(at::kHalf);
  };
  quantize(w.embed);
  w.lm_head = w.embed;
  for (LayerWeights& l : w.layers) {
    for (at::Tensor* t : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) quantize(*t);
  }
  return w;
}

TEST_CASE("Weights already in the requested block format are copied block for block, q/k rows permuted",
          "[model][gguf][quant]") {
  const std::string dir = TempDir("copy_blocks");
  const ModelConfig c = TinyLlama();
  auto tok = ParseTokenizer(TokenizerJson());
  for (const WeightFormat format : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    INFO(WeightFormatName(format));
    const ModelWeights w = QuantizedWeights(c, format);
    const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, Format(format));
    for (const auto& [name, original] : ByGgufName(w)) {
      if (!original.defined() || original.scalar_type() != at::kByte || !f.HasTensor(name)) continue;
      INFO("tensor " << name);
      const TensorInfo& t = f.Tensor(name);
      CHECK(t.type == GgmlTypeFor(format));
      const int64_t heads = PermutedHeads(name, c);
      const std::vector<uint8_t> blocks = Bytes(original);
      const int64_t rows = original.size(0), row_bytes = original.size(1) * original.size(2);
      CHECK(Bytes(f, t) == (heads > 0 ? PermuteRows(blocks, rows, row_bytes, heads, RowOrder::kToFile) : blocks));
      // Re-quantizing would have changed them.
      CHECK(Bytes(f, t) != ExpectedBlocks(DequantizeMatrix(original), format, heads));
    }
    CHECK(f.Tensor("blk.0.ffn_down.weight").type == kGgmlF16);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("Quantized weights exported in another format are dequantized, then converted", "[model][gguf][quant]") {
  const std::string dir = TempDir("requantize");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = QuantizedWeights(c, WeightFormat::kQ8_0);
  auto tok = ParseTokenizer(TokenizerJson());
  for (const WeightFormat format : {WeightFormat::kQ4_0, WeightFormat::kF32, WeightFormat::kF16}) {
    INFO(WeightFormatName(format));
    CheckTensorData(Export(dir + "/model.gguf", c, w, *tok, Format(format)), c, w,
                    /*permuted=*/true, format);
  }
  std::filesystem::remove_all(dir);
}

// Hugging Face's RoPE (rotate_half): dimension i < D/2 pairs with i + D/2, rotated by pos *
// inv_freq[i].
std::vector<double> HfRope(std::vector<double> x, int64_t d, double pos, const std::vector<double>& inv_freq) {
  for (size_t h = 0; h < x.size() / d; ++h) {
    double* v = x.data() + h * d;
    for (int64_t i = 0; i < d / 2; ++i) {
      const double a = pos * inv_freq[i], x0 = v[i], x1 = v[i + d / 2];
      v[i] = x0 * std::cos(a) - x1 * std::sin(a);
      v[i + d / 2] = x1 * std::cos(a) + x0 * std::sin(a);
    }
  }
  return x;
}

// GGML's "normal" RoPE (the llama architecture): adjacent dimensions 2i, 2i + 1 rotate together by
// pos * base^(-2i/D), divided by the rope_freqs factor when the file has one.
std::vector<double> GgmlRope(std::vector<double> x, int64_t d, double pos, double base,
                             const std::vector<float>& freq_factors) {
  for (size_t h = 0; h < x.size() / d; ++h) {
    double* v = x.data() + h * d;
    for (int64_t i = 0; i < d / 2; ++i) {
      double a = pos * std::pow(base, -2.0 * i / d);
      if (!freq_factors.empty()) a /= freq_factors[i];
      const double x0 = v[2 * i], x1 = v[2 * i + 1];
      v[2 * i] = x0 * std::cos(a) - x1 * std::sin(a);
      v[2 * i + 1] = x0 * std::sin(a) + x1 * std::cos(a);
    }
  }
  return x;
}

std::vector<double> MatVec(const std::vector<float>& m, int64_t rows, const std::vector<double>& x) {
  std::vector<double> y(rows, 0.0);
  const int64_t cols = static_cast<int64_t>(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) y[r] += m[r * cols + k] * x[k];
  }
  return y;
}

// Hugging Face's Llama 3 frequencies (transformers _compute_llama3_parameters), written out again
// here.
std::vector<double> HfLlama3InvFreq(const ModelConfig& c) {
  const RopeScaling& s = c.rope_scaling;
  const double old_len = static_cast<double>(s.original_max_position_embeddings);
  std::vector<double> out;
  for (int64_t i = 0; i < c.head_dim / 2; ++i) {
    const double f = 1.0 / std::pow(c.rope_theta, 2.0 * i / c.head_dim);
    const double wavelen = 2 * std::numbers::pi / f;
    if (wavelen < old_len / s.high_freq_factor) {
      out.push_back(f);
    } else if (wavelen > old_len / s.low_freq_factor) {
      out.push_back(f / s.factor);
    } else {
      const double smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      out.push_back((1 - smooth) * f / s.factor + smooth * f);
    }
  }
  return out;
}

// Attention logits q_h . k_g at positions (pq, pk) for every query head, as Hugging Face computes
// them from the original weights and as llama.cpp computes them from the file.
void CheckAttentionLogitsMatch(const GgufFile& f, const ModelConfig& c, const ModelWeights& w,
                               const std::vector<double>& hf_inv_freq) {
  std::vector<float> factors;
  if (f.HasTensor("rope_freqs.weight")) factors = Floats(f, f.Tensor("rope_freqs.weight"));
  std::vector<double> x(c.hidden_size);
  for (int64_t k = 0; k < c.hidden_size; ++k) x[k] = std::sin(0.37 * k + 1.0);
  const int64_t d = c.head_dim, group = c.num_attention_heads / c.num_key_value_heads;
  for (const double pos_q : {0.0, 5.0, 700.0}) {
    const double pos_k = pos_q > 0 ? pos_q - 3 : 0;
    const auto q_hf = HfRope(MatVec(ToVector(w.layers[0].q), c.q_dim(), x), d, pos_q, hf_inv_freq);
    const auto k_hf = HfRope(MatVec(ToVector(w.layers[0].k), c.kv_dim(), x), d, pos_k, hf_inv_freq);
    const auto q_gg =
        GgmlRope(MatVec(Floats(f, f.Tensor("blk.0.attn_q.weight")), c.q_dim(), x), d, pos_q, c.rope_theta, factors);
    const auto k_gg =
        GgmlRope(MatVec(Floats(f, f.Tensor("blk.0.attn_k.weight")), c.kv_dim(), x), d, pos_k, c.rope_theta, factors);
    for (int64_t h = 0; h < c.num_attention_heads; ++h) {
      INFO("position " << pos_q << ", head " << h);
      double want = 0, got = 0;
      for (int64_t k = 0; k < d; ++k) want += q_hf[h * d + k] * k_hf[(h / group) * d + k];
      for (int64_t k = 0; k < d; ++k) got += q_gg[h * d + k] * k_gg[(h / group) * d + k];
      // rope_freqs is F32 (as llama.cpp reads it): its rounding shifts the angles by ~1e-7
      // relative.
      CHECK(got == Approx(want).epsilon(factors.empty() ? 1e-9 : 1e-5).margin(1e-12));
    }
  }
}

TEST_CASE("GGML's interleaved RoPE on the exported q/k gives Hugging Face's rotate-half attention logits",
          "[model][gguf]") {
  const std::string dir = TempDir("rope");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 5);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, F32());
  CHECK_FALSE(f.HasTensor("rope_freqs.weight"));
  std::vector<double> inv_freq;
  for (int64_t i = 0; i < c.head_dim / 2; ++i) inv_freq.push_back(std::pow(c.rope_theta, -2.0 * i / c.head_dim));
  CheckAttentionLogitsMatch(f, c, w, inv_freq);
  std::filesystem::remove_all(dir);
}

TEST_CASE("Llama 3 RoPE scaling becomes rope_freqs factors that give Hugging Face's scaled frequencies",
          "[model][gguf]") {
  const std::string dir = TempDir("llama3");
  ModelConfig c = TinyLlama();
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.original_max_position_embeddings = 512;  // puts frequencies in all three Llama 3 bands
  const ModelWeights w = RandomWeights(c, 6);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, F32());
  const TensorInfo& t = f.Tensor("rope_freqs.weight");
  CHECK(t.type == kGgmlF32);
  CHECK(t.ne == std::vector<uint64_t>{16});
  CHECK_FALSE(f.kv.count("llama.rope.scaling.type"));  // llama3 is carried by the tensor alone
  const std::vector<float> factors = Floats(f, t);
  const std::vector<double> hf = HfLlama3InvFreq(c);
  std::set<float> distinct(factors.begin(), factors.end());
  CHECK(distinct.count(1.0f) == 1);  // high frequencies untouched
  CHECK(distinct.count(8.0f) == 1);  // low frequencies divided by the factor
  CHECK(distinct.size() > 3);        // and a ramp between
  for (int64_t i = 0; i < 16; ++i) {
    INFO(i);
    CHECK(std::pow(c.rope_theta, -2.0 * i / 32) / factors[i] == Approx(hf[i]).epsilon(1e-6));
  }
  CheckAttentionLogitsMatch(f, c, w, hf);
  std::filesystem::remove_all(dir);
}

TEST_CASE("A tied model's GGUF has no output.weight", "[model][gguf]") {
  const std::string dir = TempDir("tied");
  const ModelConfig c = TinyLlama();
  REQUIRE(c.tie_word_embeddings);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, RandomWeights(c, 7), *tok);
  CHECK(f.HasTensor("token_embd.weight"));
  CHECK_FALSE(f.HasTensor("output.weight"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("An untied Qwen2 model's GGUF has output.weight and F32 q/k/v biases, unpermuted", "[model][gguf]") {
  const std::string dir = TempDir("qwen2");
  const ModelConfig c = TinyQwen2();
  REQUIRE_FALSE(c.tie_word_embeddings);
  const ModelWeights w = RandomWeights(c, 8);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok);
  CHECK(f.Get("general.architecture").s == "qwen2");
  CHECK(f.Get("qwen2.attention.head_count").u == 6);
  CHECK(f.Get("qwen2.vocab_size").u == 320);
  CHECK_FALSE(f.kv.count("llama.block_count"));
  CHECK(f.Tensor("output.weight").ne == std::vector<uint64_t>{192, 320});
  CHECK(f.Tensor("output.weight").type == kGgmlF16);
  for (int i = 0; i < 2; ++i) {
    for (const char* b : {"attn_q.bias", "attn_k.bias", "attn_v.bias"}) {
      const TensorInfo& t = f.Tensor("blk." + std::to_string(i) + "." + b);
      CHECK(t.type == kGgmlF32);
      CHECK(t.ne.size() == 1);
    }
    CHECK_FALSE(f.HasTensor("blk." + std::to_string(i) + ".attn_output.bias"));
  }
  CHECK_FALSE(f.HasTensor("rope_freqs.weight"));
  // qwen2 uses rotate-half RoPE like Hugging Face: rows stay in place.
  CheckTensorData(f, c, w, /*permuted=*/false, WeightFormat::kF16);
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Qwen3 model's GGUF is architecture qwen3 with F32 q/k norms, its head size, rows unpermuted",
          "[model][gguf]") {
  const std::string dir = TempDir("qwen3");
  const ModelConfig c = TinyQwen3();
  ModelWeights w = RandomWeights(c, 9);
  for (LayerWeights& l : w.layers) {
    l.q_norm.uniform_(0.5, 1.5);
    l.k_norm.uniform_(0.5, 1.5);
  }
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok);
  CHECK(f.Get("general.architecture").s == "qwen3");
  CHECK(f.Get("qwen3.attention.head_count").u == 4);
  CHECK(f.Get("qwen3.attention.key_length").u == 48);  // 4 x 48 != hidden 128: llama.cpp needs it
  CHECK(f.Get("qwen3.attention.value_length").u == 48);
  CHECK(f.Get("qwen3.rope.dimension_count").u == 48);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    for (const char* n : {"attn_q_norm.weight", "attn_k_norm.weight"}) {
      const TensorInfo& t = f.Tensor("blk." + std::to_string(i) + "." + n);
      CHECK(t.type == kGgmlF32);
      CHECK(t.ne == std::vector<uint64_t>{48});
    }
    CHECK_FALSE(f.HasTensor("blk." + std::to_string(i) + ".attn_q.bias"));
  }
  // qwen3 uses rotate-half RoPE like Hugging Face: rows stay in place.
  CheckTensorData(f, c, w, /*permuted=*/false, WeightFormat::kF16);
  std::filesystem::remove_all(dir);
}

TEST_CASE("An OLMo 2 model's GGUF is architecture olmo2 with output norms and q/k norms over the projections",
          "[model][gguf]") {
  const std::string dir = TempDir("olmo2");
  const ModelConfig c = TinyOlmo2();
  ModelWeights w = RandomWeights(c, 10);
  for (const NamedWeight& nw : NamedWeights(w, c)) {
    if (nw.name.find("norm") != std::string::npos) nw.tensor.uniform_(0.5, 1.5);
  }
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok);
  CHECK(f.Get("general.architecture").s == "olmo2");
  CHECK(f.Get("olmo2.attention.head_count_kv").u == 2);
  CHECK(f.Get("olmo2.attention.layer_norm_rms_epsilon").f == Approx(1e-6));
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    CHECK(f.Tensor(b + "attn_q_norm.weight").ne == std::vector<uint64_t>{128});  // q_dim
    CHECK(f.Tensor(b + "attn_k_norm.weight").ne == std::vector<uint64_t>{64});   // kv_dim (2 heads of 32)
    CHECK(f.Tensor(b + "post_attention_norm.weight").ne == std::vector<uint64_t>{128});
    CHECK(f.Tensor(b + "post_ffw_norm.weight").type == kGgmlF32);
    CHECK_FALSE(f.HasTensor(b + "attn_norm.weight"));  // no norms on the sub-blocks' inputs
    CHECK_FALSE(f.HasTensor(b + "ffn_norm.weight"));
  }
  // olmo2 uses rotate-half RoPE like Hugging Face: rows stay in place.
  CheckTensorData(f, c, w, /*permuted=*/false, WeightFormat::kF16);
  std::filesystem::remove_all(dir);
}

void CheckRefused(const absl::Status& s, const std::string& dir, const std::string& message) {
  INFO(s.ToString());
  CHECK(s.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(s.message()), Catch::Contains(message));
  CHECK(DirEmpty(dir));  // neither the file nor a temporary one
}

TEST_CASE("An OLMo 2 model llama.cpp's olmo2 cannot express is refused with the reason", "[model][gguf]") {
  const std::string dir = TempDir("olmo2-refused");
  auto tok = ParseTokenizer(TokenizerJson());
  ModelConfig wide = TinyOlmo2();
  wide.head_dim = 48;  // q_dim 192 != hidden 128
  ModelConfig biased = TinyOlmo2();
  biased.qkv_bias = biased.o_bias = true;
  ModelConfig tied = TinyOlmo2();
  tied.tie_word_embeddings = true;  // llama.cpp's olmo2 loads output.weight as a required tensor
  for (const auto& [c, reason] : {std::pair{wide, "sizes q_proj as hidden x hidden"}, std::pair{biased, "biases"},
                                  std::pair{tied, "requires output.weight"}}) {
    CheckRefused(WriteGguf(dir + "/model.gguf", c, RandomWeights(c, 1), *tok, {}), dir, reason);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Gemma 3 model's GGUF is architecture gemma3 with its window, norms stored as 1 + w", "[model][gguf]") {
  const std::string dir = TempDir("gemma3");
  const ModelConfig c = TinyGemma3();
  ModelWeights w = RandomWeights(c, 11);
  for (const NamedWeight& nw : NamedWeights(w, c)) {
    if (nw.name.find("norm") != std::string::npos) nw.tensor.uniform_(-0.5, 0.5);
  }
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok);
  CHECK(f.Get("general.architecture").s == "gemma3");
  CHECK(f.Get("gemma3.attention.sliding_window").u == 64);
  CHECK(f.Get("gemma3.attention.key_length").u == 48);
  CHECK(f.Get("gemma3.rope.freq_base").f == Approx(1e6));
  CHECK_FALSE(f.HasTensor("output.weight"));  // tied
  CHECK(f.Tensor("blk.0.attn_q_norm.weight").type == kGgmlF32);
  // llama.cpp's gemma3 scales by the stored weight: the file holds 1 + w for every norm.
  const LayerWeights& l = w.layers[2];
  for (const auto& [name, t] :
       std::vector<std::pair<std::string, at::Tensor>>{{"blk.2.attn_norm.weight", l.input_norm},
                                                       {"blk.2.post_attention_norm.weight", l.attention_output_norm},
                                                       {"blk.2.ffn_norm.weight", l.pre_mlp_norm},
                                                       {"blk.2.post_ffw_norm.weight", l.mlp_output_norm},
                                                       {"blk.2.attn_q_norm.weight", l.q_norm},
                                                       {"output_norm.weight", w.final_norm}}) {
    INFO(name);
    const std::vector<float> got = Floats(f, f.Tensor(name));
    REQUIRE(static_cast<int64_t>(got.size()) == t.numel());
    for (int64_t i = 0; i < t.numel(); ++i) CHECK(got[static_cast<size_t>(i)] == t[i].item<float>() + 1.0f);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Gemma 3 model llama.cpp's gemma3 cannot express is refused with the reason", "[model][gguf]") {
  const std::string dir = TempDir("gemma3-refused");
  auto tok = ParseTokenizer(TokenizerJson());
  ModelConfig pattern = TinyGemma3();
  pattern.sliding_window_pattern = 2;
  ModelConfig base = TinyGemma3();
  base.rope_local_theta = 20000.0;
  ModelConfig scale = TinyGemma3();
  scale.attention_scale = 0.1;
  for (const auto& [c, reason] : {std::pair{pattern, "one global layer in every 6"}, std::pair{base, "RoPE base"},
                                  std::pair{scale, "query scale"}}) {
    CheckRefused(WriteGguf(dir + "/model.gguf", c, RandomWeights(c, 1), *tok, {}), dir, reason);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Gemma 2 model's GGUF is architecture gemma2 with its window and soft-caps", "[model][gguf]") {
  const std::string dir = TempDir("gemma2");
  const ModelConfig c = TinyGemma2();
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, RandomWeights(c, 12), *tok);
  CHECK(f.Get("general.architecture").s == "gemma2");
  CHECK(f.Get("gemma2.attention.sliding_window").u == 32);
  CHECK(f.Get("gemma2.attn_logit_softcapping").f == 50.0);
  CHECK(f.Get("gemma2.final_logit_softcapping").f == 30.0);
  CHECK(f.Get("gemma2.attention.key_length").u == 48);
  CHECK_FALSE(f.HasTensor("output.weight"));
  CHECK_FALSE(f.HasTensor("blk.0.attn_q_norm.weight"));
  CHECK(f.HasTensor("blk.1.post_attention_norm.weight"));
  CHECK(f.HasTensor("blk.1.post_ffw_norm.weight"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Gemma 2 model llama.cpp's gemma2 cannot express is refused with the reason", "[model][gguf]") {
  const std::string dir = TempDir("gemma2-refused");
  auto tok = ParseTokenizer(TokenizerJson());
  ModelConfig pattern = TinyGemma2();
  pattern.sliding_window_pattern = 3;
  ModelConfig uncapped = TinyGemma2();
  uncapped.final_logit_softcap = 0;  // llama.cpp's gemma2 always caps
  ModelConfig untied = TinyGemma2();
  untied.tie_word_embeddings = false;  // gemma2 reads the output projection from token_embd.weight
  ModelConfig base = TinyGemma2();
  base.rope_local_theta = 10000.0;
  ModelConfig capped3 = TinyGemma3();
  capped3.attention_softcap = 50.0;  // and gemma3 never caps
  for (const auto& [c, reason] : {std::pair{pattern, "one global layer in every 2"},
                                  std::pair{uncapped, "always soft-caps both"}, std::pair{untied, "untied LM head"},
                                  std::pair{base, "one RoPE base"}, std::pair{capped3, "soft-caps neither"}}) {
    CheckRefused(WriteGguf(dir + "/model.gguf", c, RandomWeights(c, 1), *tok, {}), dir, reason);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Phi-3 model's GGUF is architecture phi3 with fused attn_qkv and ffn_up, its window and LongRoPE",
          "[model][gguf]") {
  const std::string dir = TempDir("phi3");
  const ModelConfig c = TinyPhi3();
  const ModelWeights w = RandomWeights(c, 13);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, F32());
  CHECK(f.Get("general.architecture").s == "phi3");
  CHECK(f.Get("phi3.attention.sliding_window").u == 256);
  CHECK(f.Get("phi3.context_length").u == 4096);
  CHECK(f.Get("phi3.rope.scaling.original_context_length").u == 512);
  // The LongRoPE paper's attention factor for an 8x stretch of 512 positions.
  CHECK(f.Get("phi3.rope.scaling.attn_factor").f == Approx(std::sqrt(1.0 + std::log(8.0) / std::log(512.0))));
  CHECK(f.Tensor("blk.0.attn_qkv.weight").ne == std::vector<uint64_t>{128, 128 + 2 * 64});
  CHECK(f.Tensor("blk.1.ffn_up.weight").ne == std::vector<uint64_t>{128, 2 * 384});
  for (const char* absent : {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight"}) {
    CHECK_FALSE(f.HasTensor(absent));
  }
  for (const auto& [name, values] : {std::pair{"rope_factors_short.weight", &c.rope_scaling.short_factor},
                                     std::pair{"rope_factors_long.weight", &c.rope_scaling.long_factor}}) {
    INFO(name);
    std::vector<float> want(values->begin(), values->end());
    CHECK(Floats(f, f.Tensor(name)) == want);
  }
  // Every weight as it is: phi3 rotates halves as Hugging Face does, nothing is permuted.
  CheckTensorData(f, c, w, /*permuted=*/false, WeightFormat::kF32);

  // Seedling reads the file back as the same model: the same id (LongRoPE, window, fused layout) and logits.
  auto read = LoadModelConfig(dir + "/model.gguf");
  REQUIRE(read.ok());
  CHECK(ModelId(*read) == ModelId(c));
  auto original = LlamaModel::Create(c, w);
  auto loaded = LlamaModel::Load(dir + "/model.gguf");
  REQUIRE(original.ok());
  REQUIRE(loaded.ok());
  const at::Tensor tokens = at::tensor({5, 17, 3, 250, 9, 1}, at::kLong).view({1, 6});
  CHECK((*(*loaded)->Logits(tokens) - *(*original)->Logits(tokens)).abs().max().item<double>() < 1e-5);
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Phi-3 model llama.cpp's phi3 cannot express is refused with the reason", "[model][gguf]") {
  const std::string dir = TempDir("phi3-refused");
  auto tok = ParseTokenizer(TokenizerJson());
  ModelConfig tied = TinyPhi3();
  tied.tie_word_embeddings = true;
  ModelConfig biased = TinyPhi3();
  biased.qkv_bias = true;
  ModelConfig wide = TinyPhi3();
  wide.head_dim = 48;  // q_dim 192 != hidden 128: llama.cpp sizes attn_qkv as hidden + 2 kv_dim
  wide.rope_scaling = RopeScaling{};
  ModelConfig partial = TinyPhi3();  // Phi-4-mini's block: llama.cpp's phi3 here rotates whole heads
  partial.partial_rotary_factor = 0.5;
  partial.rope_scaling = RopeScaling{};
  ModelConfig llama_longrope = TinyLlama();
  llama_longrope.rope_scaling = TinyPhi3().rope_scaling;
  llama_longrope.rope_scaling.short_factor.resize(static_cast<size_t>(llama_longrope.head_dim / 2), 1.0);
  llama_longrope.rope_scaling.long_factor.resize(static_cast<size_t>(llama_longrope.head_dim / 2), 2.0);
  for (const auto& [c, reason] :
       {std::pair{tied, "requires output.weight"}, std::pair{biased, "biases"},
        std::pair{wide, "sizes q_proj as hidden x hidden"}, std::pair{llama_longrope, "has no LongRoPE factors"},
        std::pair{partial, "rotates whole heads"}}) {
    CheckRefused(WriteGguf(dir + "/model.gguf", c, RandomWeights(c, 1), *tok, {}), dir, reason);
  }
  std::filesystem::remove_all(dir);
}

// Hugging Face's per-head query_key_value rows (q_h | k_h | v_h for each head h) in llama.cpp's blocks q | k | v,
// moved one row at a time, as convert_hf_to_gguf.py's GPTNeoXModel reorders them.
at::Tensor QkvBlocks(const at::Tensor& t, int64_t heads) {
  const int64_t d = t.size(0) / (3 * heads);
  at::Tensor out = at::empty_like(t);
  for (int64_t part = 0; part < 3; ++part) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < d; ++i) out[(part * heads + h) * d + i].copy_(t[(h * 3 + part) * d + i]);
    }
  }
  return out;
}

TEST_CASE(
    "A GPT-NeoX model's GGUF is architecture gptneox with LayerNorm biases, q | k | v blocks and its rotary share",
    "[model][gguf]") {
  const std::string dir = TempDir("gptneox");
  for (const bool parallel : {true, false}) {
    INFO("use_parallel_residual " << parallel);
    ModelConfig c = TinyGptNeoX();
    c.parallel_residual = parallel;
    const ModelWeights w = RandomWeights(c, 17);
    auto tok = ParseTokenizer(TokenizerJson());
    for (const GgufOptions& options : {F32(), GgufOptions{}}) {  // f32, then the default q8_0
      INFO("format " << WeightFormatName(options.format));
      const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, options);
      CHECK(f.Get("general.architecture").s == "gptneox");
      CHECK(f.Get("gptneox.rope.dimension_count").u == 8);  // a quarter of head_dim 32
      CHECK(f.Get("gptneox.use_parallel_residual").u == (parallel ? 1u : 0u));
      CHECK(f.Get("gptneox.attention.layer_norm_epsilon").f == Approx(1e-5));
      CHECK_FALSE(f.kv.contains("gptneox.attention.layer_norm_rms_epsilon"));
      for (const char* present :
           {"blk.0.attn_norm.bias", "blk.1.ffn_norm.bias", "output_norm.bias", "blk.0.attn_qkv.bias",
            "blk.0.attn_output.bias", "blk.1.ffn_up.bias", "blk.1.ffn_down.bias", "output.weight"}) {
        CHECK(f.HasTensor(present));
      }
      CHECK_FALSE(f.HasTensor("blk.0.ffn_gate.weight"));
      // The file holds query_key_value in blocks, every other weight as it is.
      ModelWeights blocks = w;
      for (LayerWeights& l : blocks.layers) {
        l.qkv = QkvBlocks(l.qkv, c.num_attention_heads);
        l.qkv_bias = QkvBlocks(l.qkv_bias, c.num_attention_heads);
      }
      CHECK((blocks.layers[0].qkv - w.layers[0].qkv).abs().max().item<double>() > 0);  // the reorder moves rows
      CheckTensorData(f, c, blocks, /*permuted=*/false, options.format);

      // Seedling reads the file back as the same model: the same id and (f32) logits.
      auto read = LoadModelConfig(dir + "/model.gguf");
      REQUIRE(read.ok());
      CHECK(ModelId(*read) == ModelId(c));
      if (options.format == WeightFormat::kF32) CheckSameLogits(dir + "/model.gguf", c, w);
    }
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("A GPT-NeoX model llama.cpp's gptneox cannot express is refused with the reason", "[model][gguf]") {
  const std::string dir = TempDir("gptneox-refused");
  auto tok = ParseTokenizer(TokenizerJson());
  ModelConfig tied = TinyGptNeoX();
  tied.tie_word_embeddings = true;
  ModelConfig unbiased = TinyGptNeoX();
  unbiased.qkv_bias = unbiased.o_bias = false;
  ModelConfig relu = TinyGptNeoX();
  relu.mlp_activation = MlpActivation::kRelu;
  ModelConfig partial_llama = TinyLlama();
  partial_llama.partial_rotary_factor = 0.5;
  for (const auto& [c, reason] : {std::pair{tied, "requires output.weight"}, std::pair{unbiased, "biases"},
                                  std::pair{relu, "applies GELU"}, std::pair{partial_llama, "rotates whole heads"}}) {
    CheckRefused(WriteGguf(dir + "/model.gguf", c, RandomWeights(c, 1), *tok, {}), dir, reason);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("A GPT-2 model's GGUF is architecture gpt2 with an F32 position_embd and no RoPE keys", "[model][gguf]") {
  const std::string dir = TempDir("gpt2");
  const ModelConfig c = TinyGpt2();
  const ModelWeights w = RandomWeights(c, 19);
  auto tok = ParseTokenizer(TokenizerJson());
  for (const GgufOptions& options : {F32(), GgufOptions{}}) {  // f32, then the default q8_0
    INFO("format " << WeightFormatName(options.format));
    const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, options);
    CHECK(f.Get("general.architecture").s == "gpt2");
    CHECK(f.Get("gpt2.context_length").u == 256);
    CHECK(f.Get("gpt2.attention.layer_norm_epsilon").f == Approx(1e-5));
    for (const char* absent : {"gpt2.rope.dimension_count", "gpt2.rope.freq_base"}) CHECK_FALSE(f.kv.contains(absent));
    CHECK(f.Tensor("position_embd.weight").ne == std::vector<uint64_t>{128, 256});
    CHECK(f.Tensor("position_embd.weight").type == kGgmlF32);  // as llama.cpp's converter keeps it
    CHECK(f.Tensor("blk.0.attn_qkv.weight").ne == std::vector<uint64_t>{128, 3 * 128});
    CHECK_FALSE(f.HasTensor("output.weight"));  // tied
    // Every weight as Hugging Face holds it in memory, (out, in): nothing reordered or permuted.
    if (options.format == WeightFormat::kF32) CheckTensorData(f, c, w, /*permuted=*/false, WeightFormat::kF32);
    auto read = LoadModelConfig(dir + "/model.gguf");
    REQUIRE(read.ok());
    CHECK(ModelId(*read) == ModelId(c));
  }
  Export(dir + "/model.gguf", c, w, *tok, F32());
  CheckSameLogits(dir + "/model.gguf", c, w);
  // RoPE models cannot be written as gpt2, nor GPT-2 without its biases.
  std::filesystem::remove(dir + "/model.gguf");
  ModelConfig unbiased = TinyGpt2();
  unbiased.mlp_bias = false;
  CheckRefused(WriteGguf(dir + "/model.gguf", unbiased, RandomWeights(unbiased, 1), *tok, {}), dir, "biases");
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Phi model's GGUF is architecture phi2 with q, k, v apart, LayerNorm biases and output.bias",
          "[model][gguf]") {
  const std::string dir = TempDir("phi2");
  const ModelConfig c = TinyPhi();
  ModelWeights w = RandomWeights(c, 23);
  w.lm_head_bias.uniform_(-1, 1);
  auto tok = ParseTokenizer(TokenizerJson());
  for (const GgufOptions& options : {F32(), GgufOptions{}}) {  // f32, then the default q8_0
    INFO("format " << WeightFormatName(options.format));
    const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, options);
    CHECK(f.Get("general.architecture").s == "phi2");
    CHECK(f.Get("phi2.rope.dimension_count").u == 16);  // half of head_dim 32
    CHECK(f.Get("phi2.attention.layer_norm_epsilon").f == Approx(1e-5));
    CHECK_FALSE(f.kv.contains("phi2.attention.layer_norm_rms_epsilon"));
    for (const char* present :
         {"blk.0.attn_norm.bias", "blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias",
          "blk.0.attn_output.bias", "blk.1.ffn_up.bias", "blk.1.ffn_down.bias", "output_norm.bias", "output.weight"}) {
      CHECK(f.HasTensor(present));
    }
    // llama.cpp's phi2 graph: one norm per block, q, k and v apart, the LM head's bias in F32.
    for (const char* absent : {"blk.0.ffn_norm.weight", "blk.0.attn_qkv.weight", "blk.0.ffn_gate.weight"}) {
      CHECK_FALSE(f.HasTensor(absent));
    }
    CHECK(f.Tensor("output.bias").ne == std::vector<uint64_t>{static_cast<uint64_t>(c.vocab_size)});
    CHECK(f.Tensor("output.bias").type == kGgmlF32);
    // Every weight as Hugging Face holds it: phi2 rotates NeoX-style, so nothing is permuted.
    CheckTensorData(f, c, w, /*permuted=*/false, options.format);
    auto read = LoadModelConfig(dir + "/model.gguf");
    REQUIRE(read.ok());
    CHECK(ModelId(*read) == ModelId(c));
  }
  Export(dir + "/model.gguf", c, w, *tok, F32());
  CheckSameLogits(dir + "/model.gguf", c, w);
  std::filesystem::remove(dir + "/model.gguf");
  // What llama.cpp's phi2 graph cannot run is refused with the reason.
  ModelConfig no_head_bias = TinyPhi();
  no_head_bias.lm_head_bias = false;
  ModelConfig sequential = TinyPhi();
  sequential.parallel_residual = false;
  ModelConfig tied = TinyPhi();
  tied.tie_word_embeddings = true;
  ModelConfig head_bias_llama = TinyLlama();
  head_bias_llama.lm_head_bias = true;
  for (const auto& [refused, reason] :
       {std::pair{no_head_bias, "requires output.bias"}, std::pair{sequential, "residual layout"},
        std::pair{tied, "requires output.weight"}, std::pair{head_bias_llama, "has no output.bias"}}) {
    CheckRefused(WriteGguf(dir + "/model.gguf", refused, RandomWeights(refused, 1), *tok, {}), dir, reason);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("The vocabulary is padded to vocab_size with UNUSED PAD tokens and keeps the BPE merges", "[model][gguf]") {
  const std::string dir = TempDir("vocab");
  const ModelConfig c = TinyLlama();
  const std::string doc = TokenizerJson();
  auto tok = ParseTokenizer(doc);
  REQUIRE(tok->vocab_size() == kTokenizerVocab);
  const GgufFile f = Export(dir + "/model.gguf", c, RandomWeights(c, 9), *tok);
  const std::vector<std::string> tokens = Strings(f.Get("tokenizer.ggml.tokens"));
  const std::vector<int64_t> types = Ints(f.Get("tokenizer.ggml.token_type"));
  REQUIRE(tokens.size() == static_cast<size_t>(kModelVocab));
  REQUIRE(types.size() == static_cast<size_t>(kModelVocab));
  // tokenizer.json itself is the reference: its vocabulary and added tokens by id, its merges in
  // order.
  const json parsed = json::parse(doc);
  std::map<int64_t, std::string> by_id;
  for (const auto& [token, id] : parsed["model"]["vocab"].items()) by_id[id.get<int64_t>()] = token;
  std::set<int64_t> special;
  for (const json& a : parsed["added_tokens"]) {
    by_id[a["id"].get<int64_t>()] = a["content"].get<std::string>();
    if (a["special"].get<bool>()) special.insert(a["id"].get<int64_t>());
  }
  REQUIRE(by_id.size() == static_cast<size_t>(kTokenizerVocab));
  REQUIRE(special.size() == 3);
  for (int64_t id = 0; id < kModelVocab; ++id) {
    INFO("id " << id);
    if (id < kTokenizerVocab) {
      CHECK(tokens[id] == by_id.at(id));
      CHECK(types[id] == (special.count(id) ? 3 : 1));  // CONTROL / NORMAL
    } else {
      CHECK(tokens[id] == "[PAD" + std::to_string(id) + "]");
      CHECK(types[id] == 5);  // UNUSED
    }
  }
  std::vector<std::string> merges;
  for (const json& m : parsed["model"]["merges"]) {
    merges.push_back(m.is_string() ? m.get<std::string>() : m[0].get<std::string>() + " " + m[1].get<std::string>());
  }
  CHECK(merges.size() == static_cast<size_t>(kTokenizerVocab - 259));
  CHECK(Strings(f.Get("tokenizer.ggml.merges")) == merges);
  CHECK_FALSE(f.kv.count("tokenizer.ggml.scores"));  // byte-level BPE has no scores in llama.cpp
  std::filesystem::remove_all(dir);
}

TEST_CASE("A SentencePiece-style tokenizer.json exports as llama.cpp's 'llama' tokenizer with scores",
          "[model][gguf]") {
  const std::string meta = "\xE2\x96\x81";  // "▁"
  const json doc = testing::SentencePieceStyleTokenizerJson({meta, "h", "i", meta + "h", meta + "hi"},
                                                            {{meta, "h"}, {meta + "h", "i"}});
  const json& vocab = doc["model"]["vocab"];
  auto tok = ParseTokenizer(doc.dump());
  const std::string dir = TempDir("spm");
  const ModelConfig c = TinyLlama();
  const GgufFile f = Export(dir + "/model.gguf", c, RandomWeights(c, 10), *tok);
  CHECK(f.Get("tokenizer.ggml.model").s == "llama");
  CHECK(f.Get("tokenizer.ggml.pre").s == "default");
  CHECK_FALSE(f.kv.count("tokenizer.ggml.merges"));
  const Value& scores = f.Get("tokenizer.ggml.scores");
  REQUIRE(scores.element_type == kF32);
  REQUIRE(scores.elements.size() == 320);
  // Merge results score minus their rank, so llama.cpp's score-ordered merging follows the BPE
  // ranks.
  CHECK(scores.elements[vocab[meta + "h"].get<int>()].f == 0.0);
  CHECK(scores.elements[vocab[meta + "hi"].get<int>()].f == -1.0);
  CHECK(scores.elements[319].f == -1000.0);  // padding
  const std::vector<int64_t> types = Ints(f.Get("tokenizer.ggml.token_type"));
  CHECK(types[0] == 2);         // UNKNOWN
  CHECK(types[1] == 3);         // CONTROL
  CHECK(types[3 + 0x0A] == 6);  // BYTE "<0x0A>"
  CHECK(types[vocab["i"].get<int>()] == 1);
  CHECK(f.Get("tokenizer.ggml.bos_token_id").u == 1);
  CHECK(f.Get("tokenizer.ggml.unknown_token_id").u == 0);
  CHECK(f.Get("tokenizer.ggml.add_bos_token").u == 1);
  CHECK(f.Get("tokenizer.ggml.add_space_prefix").u == 1);  // the Prepend normalizer's dummy prefix
  std::filesystem::remove_all(dir);
}

TEST_CASE("Linear RoPE scaling and an explicit head_dim are written as llama.cpp reads them", "[model][gguf]") {
  const std::string dir = TempDir("keys");
  ModelConfig c = TinyLlama();
  c.rope_scaling.type = RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 4.0;
  c.head_dim = 48;  // 8 heads x 48 = 384 != hidden 256
  REQUIRE(c.Validate().ok());
  auto tok = ParseTokenizer(TokenizerJson());
  GgufOptions options;
  options.name = "tiny-wide-heads";
  const GgufFile f = Export(dir + "/model.gguf", c, RandomWeights(c, 11), *tok, options);
  CHECK(f.Get("general.name").s == "tiny-wide-heads");
  CHECK(f.Get("llama.rope.scaling.type").s == "linear");
  CHECK(f.Get("llama.rope.scaling.factor").type == kF32);
  CHECK(f.Get("llama.rope.scaling.factor").f == 4.0);
  CHECK(f.Get("llama.attention.key_length").u == 48);
  CHECK(f.Get("llama.attention.value_length").u == 48);
  CHECK(f.Get("llama.rope.dimension_count").u == 48);
  CHECK(f.Tensor("blk.0.attn_q.weight").ne == std::vector<uint64_t>{256, 384});
  CHECK(f.Tensor("blk.0.attn_output.weight").ne == std::vector<uint64_t>{384, 256});
  std::filesystem::remove_all(dir);
}

TEST_CASE("Requesting BF16 is InvalidArgument and leaves no file behind", "[model][gguf]") {
  const std::string dir = TempDir("bf16");
  const ModelConfig c = TinyLlama();
  auto tok = ParseTokenizer(TokenizerJson());
  GgufOptions options;
  options.format = WeightFormat::kBF16;
  CheckRefused(WriteGguf(dir + "/model.gguf", c, RandomWeights(c, 12), *tok, options), dir, "not bf16");
  std::filesystem::remove_all(dir);
}

TEST_CASE("Models llama.cpp cannot run as written are refused without a file", "[model][gguf]") {
  const std::string dir = TempDir("unsupported");
  auto tok = ParseTokenizer(TokenizerJson());
  const std::string path = dir + "/model.gguf";
  {
    ModelConfig c = TinyLlama();
    c.architecture = "GemmaForCausalLM";
    CheckRefused(WriteGguf(path, c, RandomWeights(TinyLlama(), 13), *tok), dir, "GemmaForCausalLM");
  }
  {
    const ModelConfig c = testing::TinyPreset("tiny-opt");  // llama.cpp has no OPT graph
    CheckRefused(WriteGguf(path, c, RandomWeights(c, 13), *tok), dir, "llama.cpp has no graph for it");
  }
  {
    ModelConfig c = TinyQwen2();
    c.rope_scaling.type = RopeScaling::Type::kLlama3;
    c.rope_scaling.factor = 8.0;
    CheckRefused(WriteGguf(path, c, RandomWeights(c, 14), *tok), dir, "llama3");
  }
  {
    // OPT's block layouts on an architecture llama.cpp has: post-LN, no final norm, narrower embeddings.
    ModelConfig post_ln = TinyLlama();
    post_ln.norm_after_residual = true;
    ModelConfig no_final_norm = TinyLlama();
    no_final_norm.norms.final = false;
    ModelConfig projected = TinyLlama();
    projected.word_embed_proj_dim = projected.hidden_size / 2;
    for (const auto& [c, reason] :
         {std::pair{post_ln, "norms after each residual add"}, std::pair{no_final_norm, "requires output_norm"},
          std::pair{projected, "project_in"}}) {
      REQUIRE(c.Validate().ok());
      CheckRefused(WriteGguf(path, c, RandomWeights(c, 16), *tok), dir, reason);
    }
  }
  {
    // A byte-level pre-tokenizer llama.cpp has no name for (GPT-2's, but adding a prefix space).
    json doc = json::parse(TokenizerJson());
    doc["pre_tokenizer"]["add_prefix_space"] = true;
    auto prefixed = ParseTokenizer(doc.dump());
    const ModelConfig c = TinyLlama();
    CheckRefused(WriteGguf(path, c, RandomWeights(c, 15), *prefixed), dir, "tokenizer_pre");
    GgufOptions options;
    options.tokenizer_pre = "gpt-2";  // the caller vouches for it
    CHECK(Export(path, c, RandomWeights(c, 15), *prefixed, options).Get("tokenizer.ggml.pre").s == "gpt-2");
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("Weights or a tokenizer that do not fit the config are refused without a file", "[model][gguf]") {
  const std::string dir = TempDir("mismatch");
  auto tok = ParseTokenizer(TokenizerJson());
  const std::string path = dir + "/model.gguf";
  {
    ModelConfig c = TinyLlama();
    c.vocab_size = kTokenizerVocab - 10;  // fewer ids than the tokenizer
    CheckRefused(WriteGguf(path, c, RandomWeights(c, 16), *tok), dir, "vocab_size");
  }
  {
    const ModelConfig c = TinyLlama();
    ModelWeights w = RandomWeights(c, 17);
    w.layers[1].k = w.layers[1].k.narrow(0, 0, 32);
    CheckRefused(WriteGguf(path, c, w, *tok), dir, "blk.1.attn_k.weight");
  }
  {
    const ModelConfig c = TinyQwen2();
    ModelWeights w = RandomWeights(c, 18);
    w.lm_head = at::Tensor();
    CheckRefused(WriteGguf(path, c, w, *tok), dir, "output.weight");
  }
  {
    const ModelConfig c = TinyLlama();  // no biases: a q_proj bias would be dropped from the file
    ModelWeights w = RandomWeights(c, 19);
    w.layers[1].q_bias = at::zeros({c.q_dim()});
    CheckRefused(WriteGguf(path, c, w, *tok), dir, "weights of layer 1 hold a tensor");
  }
  {
    const ModelConfig c = TinyPhi3();  // fused: separate q, k, v would be dropped
    ModelWeights w = RandomWeights(c, 20);
    w.layers[0].q = at::zeros({c.q_dim(), c.hidden_size});
    CheckRefused(WriteGguf(path, c, w, *tok), dir, "weights of layer 0 hold a tensor");
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("A uint8 weight that is not GGUF blocks is refused without a file", "[model][gguf][quant]") {
  const std::string dir = TempDir("bad_blocks");
  const ModelConfig c = TinyLlama();
  ModelWeights w = RandomWeights(c, 26);
  w.layers[0].v = at::zeros({64, 8, 33}, at::kByte);  // 33-byte "blocks"
  auto tok = ParseTokenizer(TokenizerJson());
  CheckRefused(WriteGguf(dir + "/model.gguf", c, w, *tok, Format(WeightFormat::kQ8_0)), dir,
               "'blk.0.attn_v.weight' is a uint8 tensor of shape [64, 8, 33]");
  std::filesystem::remove_all(dir);
}

TEST_CASE("A weight that cannot be quantized is refused and leaves no file", "[model][gguf][quant]") {
  const std::string dir = TempDir("nan");
  const ModelConfig c = TinyLlama();
  ModelWeights w = RandomWeights(c, 27);
  w.layers[1].up[5][7] = std::numeric_limits<float>::quiet_NaN();
  auto tok = ParseTokenizer(TokenizerJson());
  CheckRefused(WriteGguf(dir + "/model.gguf", c, w, *tok, Format(WeightFormat::kQ4_0)), dir,
               "'blk.1.ffn_up.weight' row 5");
  std::filesystem::remove_all(dir);
}

// ---- LoRA adapters ------------------------------------------------------------------------------

// A (rows, cols) fp32 matrix of normals from its own seeded stream.
at::Tensor RandomMatrix(int64_t rows, int64_t cols, uint32_t seed) {
  at::Tensor t = at::empty({rows, cols}, at::kFloat);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  for (int64_t k = 0; k < t.numel(); ++k) t.data_ptr<float>()[k] = normal(rng);
  return t;
}

// The weight a projection adapts, (out, in); indexed by Projection.
const at::Tensor& BaseWeight(const ModelWeights& w, int64_t layer, Projection p) {
  const LayerWeights& l = w.layers[layer];
  const at::Tensor* slots[] = {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down, &l.qkv, &l.gate_up};
  return *slots[static_cast<int>(p)];
}

// Random rank-`rank` pairs for every projection of every layer, shaped after `w`.
std::vector<GgufLoraPair> RandomPairs(const ModelConfig& c, const ModelWeights& w, int64_t rank) {
  std::vector<GgufLoraPair> pairs;
  uint32_t seed = 100;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    for (Projection p : ModelProjections(c)) {
      const at::Tensor& base = BaseWeight(w, layer, p);
      pairs.push_back({layer, p, RandomMatrix(rank, base.size(1), ++seed), RandomMatrix(base.size(0), rank, ++seed)});
    }
  }
  return pairs;
}

std::string GgufBase(const GgufLoraPair& pair) {
  static const char* kNames[] = {"attn_q", "attn_k",   "attn_v",   "attn_output", "ffn_gate",
                                 "ffn_up", "ffn_down", "attn_qkv", "ffn_up"};  // by Projection
  return "blk." + std::to_string(pair.layer) + "." + kNames[static_cast<int>(pair.projection)] + ".weight";
}

GgufFile ExportLora(const std::string& path, const ModelConfig& c, const std::vector<GgufLoraPair>& pairs, double scale,
                    const GgufLoraOptions& options = {}) {
  const absl::Status s = WriteGgufLora(path, c, pairs, scale, options);
  INFO(s.ToString());
  REQUIRE(s.ok());
  return ReadGguf(path);
}

TEST_CASE("A LoRA adapter GGUF has llama.cpp's adapter keys and a lora_a / lora_b pair per projection",
          "[model][gguf][lora]") {
  const std::string dir = TempDir("lora_layout");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 30);
  const std::vector<GgufLoraPair> pairs = RandomPairs(c, w, 4);
  const GgufFile f = ExportLora(dir + "/adapter.gguf", c, pairs, /*scale=*/2.0);

  std::set<std::string> keys;
  for (const auto& [key, value] : f.kv) keys.insert(key);
  CHECK(keys == std::set<std::string>{"general.architecture", "general.type", "general.alignment", "adapter.type",
                                      "adapter.lora.alpha"});
  CHECK(f.Get("general.architecture").s == "llama");
  CHECK(f.Get("general.type").s == "adapter");
  CHECK(f.Get("adapter.type").s == "lora");
  CHECK(f.Get("adapter.lora.alpha").type == kF32);
  CHECK(f.Get("adapter.lora.alpha").f == 8.0);  // llama.cpp applies alpha / rank = 2
  CHECK(f.Get("general.alignment").u == 32);

  REQUIRE(f.tensors.size() == 2 * pairs.size());
  for (size_t k = 0; k < pairs.size(); ++k) {
    const std::string base = GgufBase(pairs[k]);
    INFO(base);
    const at::Tensor& weight = BaseWeight(w, pairs[k].layer, pairs[k].projection);
    const uint64_t out = weight.size(0), in = weight.size(1);
    // Shapes as llama-adapter.cpp checks them: a->ne[0] = the base's ne[0] (in), b->ne[1] = its
    // ne[1] (out), a->ne[1] = b->ne[0] = rank.
    CHECK(f.tensors[2 * k].name == base + ".lora_a");
    CHECK(f.tensors[2 * k].ne == std::vector<uint64_t>{in, 4});
    CHECK(f.tensors[2 * k].type == kGgmlF32);
    CHECK(f.tensors[2 * k + 1].name == base + ".lora_b");
    CHECK(f.tensors[2 * k + 1].ne == std::vector<uint64_t>{4, out});
    CHECK(f.tensors[2 * k + 1].type == kGgmlF32);
  }
  std::filesystem::remove_all(dir);
}

// Checks the values of every pair in `f`: A as given, B with q/k rows permuted when `permuted`.
void CheckLoraData(const GgufFile& f, const ModelConfig& c, const std::vector<GgufLoraPair>& pairs, bool permuted,
                   at::ScalarType dtype) {
  for (const GgufLoraPair& pair : pairs) {
    const std::string base = GgufBase(pair);
    INFO(base);
    CHECK(Floats(f, f.Tensor(base + ".lora_a")) == ToVector(pair.a.to(dtype)));
    std::vector<float> b = Floats(f, f.Tensor(base + ".lora_b"));
    const std::vector<float> want = ToVector(pair.b.to(dtype));
    const int64_t heads = permuted ? PermutedHeads(base, c) : 0;
    if (heads > 0) {
      CHECK(b != want);
      b = Unpermute(b, pair.b.size(0), pair.b.size(1), heads);
    }
    CHECK(b == want);
  }
}

TEST_CASE("A llama LoRA adapter holds A as given and B with q/k rows permuted like the base", "[model][gguf][lora]") {
  const std::string dir = TempDir("lora_llama");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 31);
  const std::vector<GgufLoraPair> pairs = RandomPairs(c, w, 8);
  const GgufFile f = ExportLora(dir + "/adapter.gguf", c, pairs, 2.0);
  CheckLoraData(f, c, pairs, /*permuted=*/true, at::kFloat);
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Qwen2 LoRA adapter keeps B's rows in their original order", "[model][gguf][lora]") {
  const std::string dir = TempDir("lora_qwen2");
  const ModelConfig c = TinyQwen2();
  const ModelWeights w = RandomWeights(c, 32);
  const std::vector<GgufLoraPair> pairs = RandomPairs(c, w, 4);
  const GgufFile f = ExportLora(dir + "/adapter.gguf", c, pairs, 2.0);
  CHECK(f.Get("general.architecture").s == "qwen2");
  CheckLoraData(f, c, pairs, /*permuted=*/false, at::kFloat);
  std::filesystem::remove_all(dir);
}

TEST_CASE("llama.cpp's W + (alpha / rank) B A on the exported files gives the export of the merged model",
          "[model][gguf][lora]") {
  const std::string dir = TempDir("lora_merge");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 33);
  const std::vector<GgufLoraPair> pairs = RandomPairs(c, w, 4);
  const double scale = 0.75;
  ModelWeights merged = RandomWeights(c, 33);
  for (const GgufLoraPair& pair : pairs) {
    const_cast<at::Tensor&>(BaseWeight(merged, pair.layer, pair.projection)).add_(at::matmul(pair.b, pair.a), scale);
  }
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile base = Export(dir + "/base.gguf", c, w, *tok, F32());
  const GgufFile want = Export(dir + "/merged.gguf", c, merged, *tok, F32());
  const GgufFile adapter = ExportLora(dir + "/adapter.gguf", c, pairs, scale);
  const double alpha = adapter.Get("adapter.lora.alpha").f;
  for (const GgufLoraPair& pair : pairs) {
    const std::string name = GgufBase(pair);
    INFO(name);
    // In ggml's terms: the base is (out rows, in cols), lora_a (rank rows, in cols), lora_b
    // (out rows, rank cols), each row-major in file order.
    const TensorInfo& a = adapter.Tensor(name + ".lora_a");
    const TensorInfo& b = adapter.Tensor(name + ".lora_b");
    const int64_t rank = static_cast<int64_t>(b.ne[0]), in = static_cast<int64_t>(a.ne[0]);
    const int64_t out = static_cast<int64_t>(b.ne[1]);
    const std::vector<float> a_rows = Floats(adapter, a), b_rows = Floats(adapter, b);
    const std::vector<float> w_rows = Floats(base, base.Tensor(name));
    const std::vector<float> merged_rows = Floats(want, want.Tensor(name));
    for (int64_t r = 0; r < out; r += 7) {
      for (int64_t k = 0; k < in; k += 5) {
        double delta = 0;
        for (int64_t j = 0; j < rank; ++j) delta += b_rows[r * rank + j] * a_rows[j * in + k];
        REQUIRE(w_rows[r * in + k] + alpha / rank * delta == Approx(merged_rows[r * in + k]).margin(1e-6));
      }
    }
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("A Phi-3 LoRA adapter adapts the fused attn_qkv and ffn_up as llama.cpp names them", "[model][gguf][lora]") {
  const std::string dir = TempDir("lora_phi3");
  const ModelConfig c = TinyPhi3();
  const ModelWeights w = RandomWeights(c, 31);
  const std::vector<GgufLoraPair> pairs = RandomPairs(c, w, 4);
  REQUIRE(pairs.size() == 2 * 4);  // qkv, o, gate_up, down per layer
  const GgufFile f = ExportLora(dir + "/adapter.gguf", c, pairs, /*scale=*/2.0);
  CHECK(f.Get("general.architecture").s == "phi3");
  CHECK(f.Tensor("blk.1.attn_qkv.weight.lora_b").ne == std::vector<uint64_t>{4, 256});
  CHECK(f.Tensor("blk.1.ffn_up.weight.lora_b").ne == std::vector<uint64_t>{4, 768});
  CheckLoraData(f, c, pairs, /*permuted=*/false, at::kFloat);
  std::filesystem::remove_all(dir);
}

TEST_CASE("A GPT-NeoX LoRA adapter holds attn_qkv's B in q | k | v blocks like the base", "[model][gguf][lora]") {
  const std::string dir = TempDir("lora_gptneox");
  const ModelConfig c = TinyGptNeoX();
  const ModelWeights w = RandomWeights(c, 32);
  const std::vector<GgufLoraPair> pairs = RandomPairs(c, w, 4);
  REQUIRE(pairs.size() == 2 * 4);  // query_key_value, dense, dense_h_to_4h, dense_4h_to_h per layer
  const GgufFile f = ExportLora(dir + "/adapter.gguf", c, pairs, /*scale=*/2.0);
  CHECK(f.Get("general.architecture").s == "gptneox");
  for (const GgufLoraPair& pair : pairs) {
    const std::string base = GgufBase(pair);
    INFO(base);
    CHECK(Floats(f, f.Tensor(base + ".lora_a")) == ToVector(pair.a));
    const bool qkv = pair.projection == Projection::kQkv;
    CHECK(Floats(f, f.Tensor(base + ".lora_b")) == ToVector(qkv ? QkvBlocks(pair.b, c.num_attention_heads) : pair.b));
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("An rsLoRA scale is carried as adapter.lora.alpha = scale * rank", "[model][gguf][lora]") {
  const std::string dir = TempDir("lora_rslora");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 34);
  const double scale = 16.0 / std::sqrt(8.0);  // rsLoRA: alpha / sqrt(r)
  const GgufFile f = ExportLora(dir + "/adapter.gguf", c, RandomPairs(c, w, 8), scale);
  CHECK(f.Get("adapter.lora.alpha").f == static_cast<float>(scale * 8));
  std::filesystem::remove_all(dir);
}

TEST_CASE("An F16 LoRA adapter rounds A and B to half precision", "[model][gguf][lora]") {
  const std::string dir = TempDir("lora_f16");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 35);
  const std::vector<GgufLoraPair> pairs = RandomPairs(c, w, 4);
  GgufLoraOptions options;
  options.format = WeightFormat::kF16;
  const GgufFile f = ExportLora(dir + "/adapter.gguf", c, pairs, 2.0, options);
  for (const TensorInfo& t : f.tensors) CHECK(t.type == kGgmlF16);
  CheckLoraData(f, c, pairs, /*permuted=*/true, at::kHalf);
  std::filesystem::remove_all(dir);
}

TEST_CASE("LoRA pairs or options that do not fit are refused without a file", "[model][gguf][lora]") {
  const std::string dir = TempDir("lora_refused");
  const std::string path = dir + "/adapter.gguf";
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 36);
  const std::vector<GgufLoraPair> good = RandomPairs(c, w, 4);
  {
    std::vector<GgufLoraPair> pairs = good;
    pairs[1].b = RandomMatrix(32, 4, 1);  // k_proj has 64 output rows
    CheckRefused(WriteGgufLora(path, c, pairs, 2.0), dir,
                 "'blk.0.attn_k.weight.lora_b' has shape [32, 4], config implies [64, 4]");
  }
  {
    std::vector<GgufLoraPair> pairs = good;
    pairs[2].a = RandomMatrix(8, 256, 2);
    CheckRefused(WriteGgufLora(path, c, pairs, 2.0), dir, "rank 8 but earlier pairs have rank 4");
  }
  {
    std::vector<GgufLoraPair> pairs = good;
    pairs.push_back(good[3]);
    CheckRefused(WriteGgufLora(path, c, pairs, 2.0), dir, "two LoRA pairs for 'blk.0.attn_output.weight'");
  }
  {
    std::vector<GgufLoraPair> pairs = good;
    pairs[0].layer = 2;
    CheckRefused(WriteGgufLora(path, c, pairs, 2.0), dir, "layer 2, the model has 2 layers");
  }
  CheckRefused(WriteGgufLora(path, c, {}, 2.0), dir, "no tensors");
  CheckRefused(WriteGgufLora(path, c, good, 0.0), dir, "scale");
  GgufLoraOptions q8;
  q8.format = WeightFormat::kQ8_0;
  CheckRefused(WriteGgufLora(path, c, good, 2.0, q8), dir, "f32 or f16, not q8_0");
  ModelConfig gemma = c;
  gemma.architecture = "GemmaForCausalLM";
  CheckRefused(WriteGgufLora(path, gemma, good, 2.0), dir, "GemmaForCausalLM");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace seedling::model
