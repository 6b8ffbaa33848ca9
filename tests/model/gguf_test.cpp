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
#include <map>
#include <nlohmann/json.hpp>
#include <numbers>
#include <set>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/tokenizer.h"
#include "model/weights.h"

namespace seedling::model {
namespace {

using json = nlohmann::json;

// ---- An independent GGUF reader, written from the specification (ggml docs/gguf.md) -------------

// gguf_metadata_value_type
enum : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};
// ggml_type
constexpr uint32_t kGgmlF32 = 0;
constexpr uint32_t kGgmlF16 = 1;

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
    auto it = std::find_if(tensors.begin(), tensors.end(),
                           [&](const TensorInfo& t) { return t.name == name; });
    REQUIRE(it != tensors.end());
    return *it;
  }
  bool HasTensor(const std::string& name) const {
    return std::any_of(tensors.begin(), tensors.end(),
                       [&](const TensorInfo& t) { return t.name == name; });
  }
  const char* Data(const TensorInfo& t) const { return bytes.data() + data_start + t.offset; }
};

uint64_t ElementBytes(uint32_t ggml_type) {
  REQUIRE((ggml_type == kGgmlF32 || ggml_type == kGgmlF16));
  return ggml_type == kGgmlF32 ? 4 : 2;
}

uint64_t TensorBytes(const TensorInfo& t) {
  uint64_t n = ElementBytes(t.type);
  for (uint64_t d : t.ne) n *= d;
  return n;
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

// Undoes llama.cpp's q/k row permutation, written as index arithmetic: within each head of D rows,
// file row 2i + j holds original row j * D/2 + i (i < D/2, j in {0, 1}).
std::vector<float> Unpermute(const std::vector<float>& rows, int64_t n_rows, int64_t n_cols,
                             int64_t heads) {
  const int64_t d = n_rows / heads;
  std::vector<float> out(rows.size());
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < d / 2; ++i) {
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t file_row = h * d + 2 * i + j;
        const int64_t original_row = h * d + j * (d / 2) + i;
        std::copy_n(rows.begin() + file_row * n_cols, n_cols, out.begin() + original_row * n_cols);
      }
    }
  }
  return out;
}

// ---- Fixtures -----------------------------------------------------------------------------------

std::string TempDir(const std::string& name) {
  const std::string dir = std::filesystem::temp_directory_path() /
                          ("seedling_gguf_test_" + std::to_string(getpid()) + "_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

bool DirEmpty(const std::string& dir) { return std::filesystem::is_empty(dir); }

std::string Corpus() {
  std::string s;
  for (int i = 0; i < 20; ++i) {
    s += "The phone learns a little every night, and the server averages what the phones learned. ";
    s += "Federated fine-tuning keeps the data on the device; only the updates travel. 12345 "
         "67890\n";
  }
  return s;
}

constexpr int32_t kTokenizerVocab = 290;  // 256 bytes + 3 specials + 31 merges
constexpr int64_t kModelVocab = 320;      // the last 30 ids are padding

std::string TokenizerJson() {
  BpeTrainerOptions options;
  options.vocab_size = kTokenizerVocab;
  auto doc = TrainByteLevelBpeTokenizerJson(Corpus(), options);
  INFO(doc.status().ToString());
  REQUIRE(doc.ok());
  return *doc;
}

std::unique_ptr<Tokenizer> ParseTokenizer(const std::string& doc) {
  auto t = ParseTokenizerJson(doc);
  INFO(t.status().ToString());
  REQUIRE(t.ok());
  return std::move(*t);
}

// "tiny" (Llama, GQA 8/2 heads, head_dim 32, tied) with 2 layers and a 320-id vocabulary.
ModelConfig TinyLlama() {
  auto c = PresetConfig("tiny");
  REQUIRE(c.ok());
  c->num_hidden_layers = 2;
  c->vocab_size = kModelVocab;
  REQUIRE(c->Validate().ok());
  return *c;
}

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

// "tiny-qwen2" (q/k/v biases, untied) with 2 layers, a 320-id vocabulary and no RoPE scaling
// (llama.cpp's qwen2 cannot express the preset's llama3 scaling).
ModelConfig TinyQwen2() {
  auto c = PresetConfig("tiny-qwen2");
  REQUIRE(c.ok());
  c->num_hidden_layers = 2;
  c->vocab_size = kModelVocab;
  c->rope_scaling = RopeScaling{};
  REQUIRE(c->Validate().ok());
  return *c;
}

GgufFile Export(const std::string& path, const ModelConfig& c, const ModelWeights& w,
                const Tokenizer& t, const GgufOptions& options = {}) {
  const absl::Status s = WriteGguf(path, c, w, t, options);
  INFO(s.ToString());
  REQUIRE(s.ok());
  return ReadGguf(path);
}

GgufOptions F32() {
  GgufOptions o;
  o.dtype = DType::kF32;
  return o;
}

// The Hugging Face name -> tensor of every weight, for comparing with the file.
std::map<std::string, at::Tensor> ByGgufName(const ModelWeights& w) {
  std::map<std::string, at::Tensor> m = {{"token_embd.weight", w.embed},
                                         {"output_norm.weight", w.final_norm},
                                         {"output.weight", w.lm_head}};
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const LayerWeights& l = w.layers[i];
    const std::string b = "blk." + std::to_string(i) + ".";
    m[b + "attn_norm.weight"] = l.input_norm;
    m[b + "attn_q.weight"] = l.q;
    m[b + "attn_k.weight"] = l.k;
    m[b + "attn_v.weight"] = l.v;
    m[b + "attn_output.weight"] = l.o;
    m[b + "ffn_norm.weight"] = l.post_norm;
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
  }
  return m;
}

// The heads a tensor's rows are permuted in (llama arch q / k weights and biases), else 0.
int64_t PermutedHeads(const std::string& name, const ModelConfig& c) {
  if (name.find("attn_q.") != std::string::npos) return c.num_attention_heads;
  if (name.find("attn_k.") != std::string::npos) return c.num_key_value_heads;
  return 0;
}

// Checks every tensor of `f` against `w`: ggml dims are the PyTorch shape reversed, and the values
// equal `expected(original)` after undoing the q/k permutation when `permuted`.
void CheckTensorData(const GgufFile& f, const ModelConfig& c, const ModelWeights& w, bool permuted,
                     at::ScalarType matrix_dtype) {
  const auto originals = ByGgufName(w);
  for (const TensorInfo& t : f.tensors) {
    if (t.name == "rope_freqs.weight") continue;
    INFO("tensor " << t.name);
    const at::Tensor& original = originals.at(t.name);
    REQUIRE(original.defined());
    std::vector<uint64_t> reversed(original.sizes().rbegin(), original.sizes().rend());
    CHECK(t.ne == reversed);
    const bool matrix = original.dim() == 2;
    CHECK(t.type == (matrix && matrix_dtype == at::kHalf ? kGgmlF16 : kGgmlF32));
    // What the file should hold: the weight rounded to the file's type (a no-op for F32).
    const std::vector<float> want = ToVector(original.to(matrix ? matrix_dtype : at::kFloat));
    std::vector<float> got = Floats(f, t);
    const int64_t heads = permuted ? PermutedHeads(t.name, c) : 0;
    if (heads > 0) {
      const int64_t rows = original.size(0), cols = matrix ? original.size(1) : 1;
      // The permutation must have moved something, or the un-permuting below proves nothing.
      CHECK(got != want);
      got = Unpermute(got, rows, cols, heads);
    }
    CHECK(got == want);
  }
}

// ---- Tests --------------------------------------------------------------------------------------

TEST_CASE(
    "A GGUF export parses with an independent reader: header, every metadata key, tensor layout",
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
  CHECK(u32("tokenizer.ggml.bos_token_id") ==
        0);  // from config.json: the trained tokenizer defines none
  CHECK(u32("tokenizer.ggml.eos_token_id") == 0);
  CHECK_FALSE(boolean("tokenizer.ggml.add_bos_token"));
  CHECK_FALSE(boolean("tokenizer.ggml.add_eos_token"));

  // Tensor infos: the expected names (tied: no output.weight), aligned offsets, packed in order.
  std::set<std::string> names, expected_names = {"token_embd.weight", "output_norm.weight"};
  for (int i = 0; i < 2; ++i) {
    for (const char* n : {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                          "ffn_gate", "ffn_up", "ffn_down"}) {
      expected_names.insert("blk." + std::to_string(i) + "." + n + ".weight");
    }
    for (const char* n :
         {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}) {
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
    CHECK(t.offset ==
          next);  // llama.cpp requires tensors back to back, each padded to the alignment
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
  CheckTensorData(f, c, w, /*permuted=*/true, at::kFloat);
  std::filesystem::remove_all(dir);
}

TEST_CASE("An F16 export rounds every matrix to half precision and keeps norms in F32",
          "[model][gguf]") {
  const std::string dir = TempDir("f16");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 3);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok);  // F16 is the default
  CHECK(f.Get("general.file_type").u == 1);
  CHECK(f.Tensor("blk.0.attn_v.weight").type == kGgmlF16);
  CHECK(f.Tensor("blk.0.attn_norm.weight").type == kGgmlF32);
  CheckTensorData(f, c, w, /*permuted=*/true, at::kHalf);
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

TEST_CASE("Weights held in bfloat16 or float16 are converted to the file's types",
          "[model][gguf]") {
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
  CheckTensorData(Export(dir + "/f32.gguf", c, w, *tok, F32()), c, w, true, at::kFloat);
  CheckTensorData(Export(dir + "/f16.gguf", c, w, *tok), c, w, true, at::kHalf);
  std::filesystem::remove_all(dir);
}

// Hugging Face's RoPE (rotate_half): dimension i < D/2 pairs with i + D/2, rotated by pos *
// inv_freq[i].
std::vector<double> HfRope(std::vector<double> x, int64_t d, double pos,
                           const std::vector<double>& inv_freq) {
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

std::vector<double> MatVec(const std::vector<float>& m, int64_t rows,
                           const std::vector<double>& x) {
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
      const double smooth =
          (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
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
    const auto q_gg = GgmlRope(MatVec(Floats(f, f.Tensor("blk.0.attn_q.weight")), c.q_dim(), x), d,
                               pos_q, c.rope_theta, factors);
    const auto k_gg = GgmlRope(MatVec(Floats(f, f.Tensor("blk.0.attn_k.weight")), c.kv_dim(), x), d,
                               pos_k, c.rope_theta, factors);
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

TEST_CASE(
    "GGML's interleaved RoPE on the exported q/k gives Hugging Face's rotate-half attention logits",
    "[model][gguf]") {
  const std::string dir = TempDir("rope");
  const ModelConfig c = TinyLlama();
  const ModelWeights w = RandomWeights(c, 5);
  auto tok = ParseTokenizer(TokenizerJson());
  const GgufFile f = Export(dir + "/model.gguf", c, w, *tok, F32());
  CHECK_FALSE(f.HasTensor("rope_freqs.weight"));
  std::vector<double> inv_freq;
  for (int64_t i = 0; i < c.head_dim / 2; ++i)
    inv_freq.push_back(std::pow(c.rope_theta, -2.0 * i / c.head_dim));
  CheckAttentionLogitsMatch(f, c, w, inv_freq);
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "Llama 3 RoPE scaling becomes rope_freqs factors that give Hugging Face's scaled frequencies",
    "[model][gguf]") {
  const std::string dir = TempDir("llama3");
  ModelConfig c = TinyLlama();
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.original_max_position_embeddings =
      512;  // puts frequencies in all three Llama 3 bands
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

TEST_CASE("An untied Qwen2 model's GGUF has output.weight and F32 q/k/v biases, unpermuted",
          "[model][gguf]") {
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
  CheckTensorData(f, c, w, /*permuted=*/false, at::kHalf);
  std::filesystem::remove_all(dir);
}

TEST_CASE("The vocabulary is padded to vocab_size with UNUSED PAD tokens and keeps the BPE merges",
          "[model][gguf]") {
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
    merges.push_back(m.is_string() ? m.get<std::string>()
                                   : m[0].get<std::string>() + " " + m[1].get<std::string>());
  }
  CHECK(merges.size() == static_cast<size_t>(kTokenizerVocab - 259));
  CHECK(Strings(f.Get("tokenizer.ggml.merges")) == merges);
  CHECK_FALSE(f.kv.count("tokenizer.ggml.scores"));  // byte-level BPE has no scores in llama.cpp
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "A SentencePiece-style tokenizer.json exports as llama.cpp's 'llama' tokenizer with scores",
    "[model][gguf]") {
  const std::string meta = "\xE2\x96\x81";  // "▁"
  json vocab = json::object();
  int32_t next = 0;
  for (const std::string t : {"<unk>", "<s>", "</s>"}) vocab[t] = next++;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = next++;
  }
  for (const std::string& t : std::vector<std::string>{meta, "h", "i", meta + "h", meta + "hi"})
    vocab[t] = next++;
  const json doc = {
      {"added_tokens", json::array({{{"id", 0}, {"content", "<unk>"}, {"special", true}},
                                    {{"id", 1}, {"content", "<s>"}, {"special", true}},
                                    {{"id", 2}, {"content", "</s>"}, {"special", true}}})},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "Prepend"}, {"prepend", meta}},
          {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", meta}}}}}},
      {"pre_tokenizer", nullptr},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single",
         {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair", json::array()},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {{{"type", "Replace"}, {"pattern", {{"String", meta}}}, {"content", " "}},
          {{"type", "ByteFallback"}},
          {{"type", "Fuse"}}}}}},
      {"model",
       {{"type", "BPE"},
        {"unk_token", "<unk>"},
        {"byte_fallback", true},
        {"vocab", vocab},
        {"merges", {meta + " h", meta + "h i"}}}}};
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
  std::filesystem::remove_all(dir);
}

TEST_CASE("Linear RoPE scaling and an explicit head_dim are written as llama.cpp reads them",
          "[model][gguf]") {
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

void CheckRefused(const absl::Status& s, const std::string& dir, const std::string& message) {
  INFO(s.ToString());
  CHECK(s.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(s.message()), Catch::Contains(message));
  CHECK(DirEmpty(dir));  // neither the file nor a temporary one
}

TEST_CASE("Requesting BF16 is InvalidArgument and leaves no file behind", "[model][gguf]") {
  const std::string dir = TempDir("bf16");
  const ModelConfig c = TinyLlama();
  auto tok = ParseTokenizer(TokenizerJson());
  GgufOptions options;
  options.dtype = DType::kBF16;
  CheckRefused(WriteGguf(dir + "/model.gguf", c, RandomWeights(c, 12), *tok, options), dir,
               "F32 or F16");
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
    ModelConfig c = TinyQwen2();
    c.rope_scaling.type = RopeScaling::Type::kLlama3;
    c.rope_scaling.factor = 8.0;
    CheckRefused(WriteGguf(path, c, RandomWeights(c, 14), *tok), dir, "llama3");
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
    CHECK(Export(path, c, RandomWeights(c, 15), *prefixed, options).Get("tokenizer.ggml.pre").s ==
          "gpt-2");
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("Weights or a tokenizer that do not fit the config are refused without a file",
          "[model][gguf]") {
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
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace seedling::model
