#include "model/gguf_model.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "base/status.h"
#include "base/strings.h"
#include "model/kernels.h"
#include "model/quant.h"
#include "model/torch_status.h"

namespace seedling::model {
namespace {

// ---- Helpers
// --------------------------------------------------------------------------------------

absl::Status FileError(const GgufFile& f, std::string_view message) {
  return absl::InvalidArgumentError(StrCat("GGUF file '", f.path(), "': ", message));
}

// A getter's value, or nullopt when the key is absent; a wrong type stays an error.
template <typename T>
absl::StatusOr<std::optional<T>> Optional(absl::StatusOr<T> value) {
  if (value.ok()) return std::optional<T>(*std::move(value));
  if (absl::IsNotFound(value.status())) return std::optional<T>();
  return value.status();
}

// The double a float32 key was meant to be: its shortest decimal form, read as a double (1e-5f
// becomes 1e-5, not 9.99999974737875e-06), so a config written as float32 reads back equal.
double Widen(float value) {
  char buffer[32];
  const auto written = std::to_chars(buffer, buffer + sizeof(buffer), value);
  double widened = value;
  std::from_chars(buffer, written.ptr, widened);
  return widened;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += StrCat(i > 0 ? ", " : "", shape[i]);
  return s + "]";
}

// ---- Config -------------------------------------------------------------------------------------

absl::Status ReadSizes(const GgufFile& f, const std::string& p, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(c.max_position_embeddings, f.GetU32(p + "context_length"));
  SEEDLING_ASSIGN_OR_RETURN(c.hidden_size, f.GetU32(p + "embedding_length"));
  SEEDLING_ASSIGN_OR_RETURN(c.num_hidden_layers, f.GetU32(p + "block_count"));
  SEEDLING_ASSIGN_OR_RETURN(c.intermediate_size, f.GetU32(p + "feed_forward_length"));
  SEEDLING_ASSIGN_OR_RETURN(c.num_attention_heads, f.GetU32(p + "attention.head_count"));
  if (c.num_attention_heads == 0) return FileError(f, StrCat(p, "attention.head_count is 0"));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> kv,
                            Optional(f.GetU32(p + "attention.head_count_kv")));
  c.num_key_value_heads = kv.value_or(c.num_attention_heads);
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> experts,
                            Optional(f.GetU32(p + "expert_count")));
  if (experts.value_or(0) > 0) {
    return FileError(f, StrCat(p, "expert_count is ", *experts,
                               ": mixture-of-experts models are not supported"));
  }
  SEEDLING_ASSIGN_OR_RETURN(const float eps, f.GetF32(p + "attention.layer_norm_rms_epsilon"));
  c.rms_norm_eps = Widen(eps);
  return absl::OkStatus();
}

// head_dim: llama.cpp's key length, which defaults to embedding_length / head_count.
absl::Status ReadHeadDim(const GgufFile& f, const std::string& p, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> key_length,
                            Optional(f.GetU32(p + "attention.key_length")));
  if (!key_length.has_value() && c.hidden_size % c.num_attention_heads != 0) {
    return FileError(
        f, StrCat(p, "embedding_length ", c.hidden_size, " is not a multiple of the head count ",
                  c.num_attention_heads, " and ", p, "attention.key_length is missing"));
  }
  c.head_dim = key_length.value_or(c.hidden_size / c.num_attention_heads);
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> value_length,
                            Optional(f.GetU32(p + "attention.value_length")));
  if (value_length.has_value() && *value_length != c.head_dim) {
    return FileError(
        f, StrCat(p, "attention.value_length ", *value_length, " differs from the key length ",
                  c.head_dim, "; Seedling's attention needs them equal"));
  }
  return absl::OkStatus();
}

absl::Status ReadVocabSize(const GgufFile& f, const std::string& p, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> declared, Optional(f.GetU32(p + "vocab_size")));
  std::optional<int64_t> tokens;
  if (f.Has("tokenizer.ggml.tokens")) {
    SEEDLING_ASSIGN_OR_RETURN(const GgufValue array, f.GetArray("tokenizer.ggml.tokens"));
    tokens = static_cast<int64_t>(array.count);
  }
  if (declared.has_value() && tokens.has_value() && *declared != *tokens) {
    return FileError(f, StrCat(p, "vocab_size is ", *declared, " but tokenizer.ggml.tokens has ",
                               *tokens, " tokens"));
  }
  const GgufTensorInfo* embed = f.FindTensor("token_embd.weight");
  if (declared.has_value()) {
    c.vocab_size = *declared;
  } else if (tokens.has_value()) {
    c.vocab_size = *tokens;
  } else if (embed != nullptr && embed->shape.size() == 2) {
    c.vocab_size = embed->shape[0];
  } else {
    return FileError(f, StrCat("no vocabulary size: neither ", p,
                               "vocab_size, tokenizer.ggml.tokens nor token_embd.weight"));
  }
  return absl::OkStatus();
}

// The factor each frequency pair's angle is divided by under `scaling` (what rope_freqs.weight
// holds).
std::vector<double> RopeFactors(const ModelConfig& c, const RopeScaling& scaling) {
  ModelConfig unscaled = c, scaled = c;
  unscaled.rope_scaling = RopeScaling{};
  scaled.rope_scaling = scaling;
  const at::Tensor ratio = RopeInverseFrequencies(unscaled) / RopeInverseFrequencies(scaled);
  const double* p = ratio.data_ptr<double>();
  return std::vector<double>(p, p + ratio.numel());
}

bool FactorsMatch(const ModelConfig& c, const RopeScaling& scaling,
                  const std::vector<double>& factors) {
  const std::vector<double> want = RopeFactors(c, scaling);
  for (size_t i = 0; i < factors.size(); ++i) {
    // The file holds float32: a relative error of 6e-8, plus a rounded context length.
    if (!(std::abs(want[i] - factors[i]) <= 1e-5 * want[i])) return false;
  }
  return true;
}

// Llama 3 scaling (Hugging Face's _compute_llama3_parameters) divides pair i's frequency by
//   1 when its wavelength is below orig / high, `factor` above orig / low, and between them by
//   1 / ((1 - s) / factor + s) with s = (orig / wavelength - low) / (high - low).
// Candidates for (low, high, orig) given the factors; FactorsMatch picks the right one.
std::vector<RopeScaling> Llama3Candidates(const ModelConfig& c,
                                          const std::vector<double>& factors) {
  RopeScaling base;
  base.type = RopeScaling::Type::kLlama3;
  base.factor = *std::max_element(factors.begin(), factors.end());
  ModelConfig unscaled = c;
  unscaled.rope_scaling = RopeScaling{};
  const at::Tensor inv_tensor = RopeInverseFrequencies(unscaled);
  const double* inv = inv_tensor.data_ptr<double>();
  // (wavelength, s) of every pair on the ramp.
  std::vector<std::pair<double, double>> ramp;
  for (size_t i = 0; i < factors.size(); ++i) {
    if (factors[i] > 1 + 1e-6 && factors[i] < base.factor * (1 - 1e-6)) {
      const double s = (1 / factors[i] - 1 / base.factor) / (1 - 1 / base.factor);
      ramp.emplace_back(2 * std::numbers::pi / inv[i], s);
    }
  }
  std::vector<RopeScaling> out;
  // Every Llama 3.x: low 1, high 4; orig from the ramp (orig = wavelength * (low + s (high -
  // low))), or Llama 3.1's 8192 when no pair is on the ramp.
  RopeScaling standard = base;
  if (!ramp.empty()) {
    double sum = 0;
    for (const auto& [wavelength, s] : ramp) sum += wavelength * (1 + 3 * s);
    standard.original_max_position_embeddings =
        std::llround(sum / static_cast<double>(ramp.size()));
  }
  out.push_back(standard);
  if (ramp.size() >= 2) {
    // s is linear in 1 / wavelength: s = a / wavelength + b with a = orig / (high - low) and
    // b = -low / (high - low). With low = 1: high = 1 - 1 / b and orig = -a / b.
    const auto [w0, s0] = ramp.front();
    const auto [w1, s1] = ramp.back();
    const double a = (s1 - s0) / (1 / w1 - 1 / w0);
    const double b = s0 - a / w0;
    if (b < 0) {
      RopeScaling fitted = base;
      fitted.low_freq_factor = 1;
      fitted.high_freq_factor = 1 - 1 / b;
      fitted.original_max_position_embeddings = std::llround(-a / b);
      out.push_back(fitted);
    }
  }
  return out;
}

absl::StatusOr<RopeScaling> Llama3FromRopeFreqs(const GgufFile& f, const ModelConfig& c) {
  const GgufTensorInfo& t = *f.FindTensor("rope_freqs.weight");
  if (t.type != GgmlType::kF32 || t.shape != std::vector<int64_t>{c.head_dim / 2}) {
    return FileError(f, StrCat("tensor 'rope_freqs.weight' is ", GgmlTypeName(t.type), " ",
                               ShapeString(t.shape), ", expected f32 [", c.head_dim / 2, "]"));
  }
  std::vector<double> factors(c.head_dim / 2);
  for (size_t i = 0; i < factors.size(); ++i) {
    float v;
    std::memcpy(&v, t.data + 4 * i, 4);
    if (!(v >= 1 - 1e-6 && std::isfinite(v))) {
      return FileError(f, StrCat("tensor 'rope_freqs.weight' holds factor ", v, " at ", i,
                                 "; Llama 3 scaling factors are >= 1"));
    }
    factors[i] = v;
  }
  for (const RopeScaling& candidate : Llama3Candidates(c, factors)) {
    if (FactorsMatch(c, candidate, factors)) return candidate;
  }
  return FileError(f,
                   "tensor 'rope_freqs.weight' does not follow Llama 3 RoPE scaling for any "
                   "low/high frequency factors and original context length; other frequency "
                   "factors are not supported");
}

// rope.scaling.type "linear" with rope.scaling.factor, or the legacy rope.scale_linear.
absl::Status ReadLinearScaling(const GgufFile& f, const std::string& p, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<std::string_view> type,
                            Optional(f.GetString(p + "rope.scaling.type")));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<float> factor,
                            Optional(f.GetF32(p + "rope.scaling.factor")));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<float> legacy,
                            Optional(f.GetF32(p + "rope.scale_linear")));
  if (type.has_value() && *type != "none" && *type != "linear") {
    return FileError(
        f, StrCat(p, "rope.scaling.type '", *type, "' is not supported (supported: none, linear)"));
  }
  if ((type == "linear" && factor.has_value()) || (!type.has_value() && legacy.has_value())) {
    const float value = type.has_value() ? *factor : *legacy;
    if (!(value >= 1))
      return FileError(f, StrCat("linear RoPE scaling factor ", value, " is below 1"));
    c.rope_scaling.type = RopeScaling::Type::kLinear;
    c.rope_scaling.factor = Widen(value);
  } else if (type == "linear") {
    return FileError(
        f, StrCat(p, "rope.scaling.type is linear but ", p, "rope.scaling.factor is missing"));
  }
  return absl::OkStatus();
}

absl::Status ReadRope(const GgufFile& f, const std::string& p, std::string_view arch,
                      ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<float> theta, Optional(f.GetF32(p + "rope.freq_base")));
  c.rope_theta = theta.has_value() ? Widen(*theta) : 10000.0;
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> rotated,
                            Optional(f.GetU32(p + "rope.dimension_count")));
  if (rotated.has_value() && *rotated != c.head_dim) {
    return FileError(f, StrCat(p, "rope.dimension_count ", *rotated, " differs from the head size ",
                               c.head_dim, ": partial rotary embeddings are not supported"));
  }
  SEEDLING_RETURN_IF_ERROR(ReadLinearScaling(f, p, c));
  if (f.FindTensor("rope_freqs.weight") == nullptr) return absl::OkStatus();
  if (arch != "llama" || c.rope_scaling.type != RopeScaling::Type::kNone) {
    return FileError(
        f, StrCat("tensor 'rope_freqs.weight' (Llama 3 RoPE scaling) is only supported for "
                  "architecture llama without other scaling"));
  }
  SEEDLING_ASSIGN_OR_RETURN(c.rope_scaling, Llama3FromRopeFreqs(f, c));
  return absl::OkStatus();
}

absl::Status ReadSpecialIds(const GgufFile& f, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> bos,
                            Optional(f.GetU32("tokenizer.ggml.bos_token_id")));
  if (bos.has_value()) c.bos_token_id = *bos;
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                          "tokenizer.ggml.eom_token_id"}) {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> id, Optional(f.GetU32(key)));
    if (id.has_value() &&
        std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), *id) == c.eos_token_ids.end()) {
      c.eos_token_ids.push_back(*id);
    }
  }
  return absl::OkStatus();
}

void ReadLayout(const GgufFile& f, ModelConfig& c) {
  auto has = [&](const char* name) { return f.FindTensor(name) != nullptr; };
  c.tie_word_embeddings = !has("output.weight");
  c.qkv_bias = has("blk.0.attn_q.bias");
  c.o_bias = has("blk.0.attn_output.bias");
  c.mlp_bias = has("blk.0.ffn_gate.bias") || has("blk.0.ffn_up.bias") || has("blk.0.ffn_down.bias");
  const GgufTensorInfo* embed = f.FindTensor("token_embd.weight");
  const GgmlType type = embed != nullptr ? embed->type : GgmlType::kF16;
  c.torch_dtype = type == GgmlType::kF32    ? "float32"
                  : type == GgmlType::kBF16 ? "bfloat16"
                                            : "float16";
}

// ---- Weights ------------------------------------------------------------------------------------

// One tensor the architecture expects.
struct Expected {
  std::string name;
  std::vector<int64_t> shape;  // PyTorch order; a block matrix's logical (rows, cols)
  at::Tensor* slot;
  int64_t rope_heads = 0;  // > 0: undo GGML's RoPE row interleave within this many heads
};

// The tensors of `c` in llama.cpp's names, pointing at the slots of `w` (whose layers it sizes).
std::vector<Expected> GgufTensorSlots(const ModelConfig& c, ModelWeights& w) {
  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const int64_t q = c.q_dim(), kv = c.kv_dim();
  // model/gguf.h: only the llama architecture (Llama and Mistral) interleaves q / k rows.
  const bool permuted = c.architecture != "Qwen2ForCausalLM";
  const int64_t q_heads = permuted ? c.num_attention_heads : 0;
  const int64_t k_heads = permuted ? c.num_key_value_heads : 0;
  std::vector<Expected> out;
  out.push_back({"token_embd.weight", {V, H}, &w.embed});
  w.layers.resize(c.num_hidden_layers);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    LayerWeights& l = w.layers[i];
    const std::string b = StrCat("blk.", i, ".");
    out.push_back({b + "attn_norm.weight", {H}, &l.input_norm});
    out.push_back({b + "attn_q.weight", {q, H}, &l.q, q_heads});
    out.push_back({b + "attn_k.weight", {kv, H}, &l.k, k_heads});
    out.push_back({b + "attn_v.weight", {kv, H}, &l.v});
    out.push_back({b + "attn_output.weight", {H, q}, &l.o});
    if (c.qkv_bias) {
      out.push_back({b + "attn_q.bias", {q}, &l.q_bias, q_heads});
      out.push_back({b + "attn_k.bias", {kv}, &l.k_bias, k_heads});
      out.push_back({b + "attn_v.bias", {kv}, &l.v_bias});
    }
    if (c.o_bias) out.push_back({b + "attn_output.bias", {H}, &l.o_bias});
    out.push_back({b + "ffn_norm.weight", {H}, &l.post_norm});
    out.push_back({b + "ffn_gate.weight", {I, H}, &l.gate});
    out.push_back({b + "ffn_up.weight", {I, H}, &l.up});
    out.push_back({b + "ffn_down.weight", {H, I}, &l.down});
    if (c.mlp_bias) {
      out.push_back({b + "ffn_gate.bias", {I}, &l.gate_bias});
      out.push_back({b + "ffn_up.bias", {I}, &l.up_bias});
      out.push_back({b + "ffn_down.bias", {H}, &l.down_bias});
    }
  }
  out.push_back({"output_norm.weight", {H}, &w.final_norm});
  if (!c.tie_word_embeddings) out.push_back({"output.weight", {V, H}, &w.lm_head});
  return out;
}

struct Storage {
  at::ScalarType dtype;
  int64_t element_bytes;  // the alignment a from_blob view needs
};

std::optional<Storage> StorageOf(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return Storage{at::kFloat, 4};
    case GgmlType::kF16:
      return Storage{at::kHalf, 2};
    case GgmlType::kBF16:
      return Storage{at::kBFloat16, 2};
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0:
      return Storage{at::kByte, 1};
    default:
      return std::nullopt;
  }
}

// The weight format a matrix of ggml type `type` is held in, if Seedling loads that type.
std::optional<WeightFormat> MatrixFormatOf(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return WeightFormat::kF32;
    case GgmlType::kF16:
      return WeightFormat::kF16;
    case GgmlType::kBF16:
      return WeightFormat::kBF16;
    case GgmlType::kQ8_0:
      return WeightFormat::kQ8_0;
    case GgmlType::kQ4_0:
      return WeightFormat::kQ4_0;
    default:
      return std::nullopt;
  }
}

// The tensor's bytes as a tensor (model/quant.h layout): a view of the mapping whose deleter keeps
// the file mapped, or a copy when the bytes are not aligned for the dtype. Sets `copied`.
at::Tensor MappedTensor(const GgufTensorInfo& t, const Storage& storage, bool& copied) {
  std::vector<int64_t> sizes = t.shape;
  if (storage.dtype == at::kByte) {
    const int64_t block_bytes = t.type == GgmlType::kQ8_0 ? sizeof(BlockQ8_0) : sizeof(BlockQ4_0);
    sizes = {t.shape[0], t.shape[1] / kQuantBlock, block_bytes};
  }
  const at::TensorOptions options = at::TensorOptions().dtype(storage.dtype);
  copied = reinterpret_cast<uintptr_t>(t.data) % storage.element_bytes != 0;
  if (copied) {
    at::Tensor out = at::empty(sizes, options);
    std::memcpy(out.data_ptr(), t.data, t.nbytes);
    return out;
  }
  std::shared_ptr<MappedFile> keep = t.file;
  return at::from_blob(
      const_cast<uint8_t*>(t.data), sizes, [keep](void*) mutable { keep.reset(); }, options);
}

// model/gguf.h: export row h*D + 2i + j holds original row h*D + j*D/2 + i. Rows move whole, so a
// block matrix (rows, blocks, bytes) is un-permuted without touching its blocks.
at::Tensor UndoRopeInterleave(const at::Tensor& w, int64_t heads) {
  std::vector<int64_t> split = {heads, w.size(0) / heads / 2, 2};
  split.insert(split.end(), w.sizes().begin() + 1, w.sizes().end());
  return w.reshape(split).transpose(1, 2).reshape(w.sizes()).contiguous();
}

absl::Status UnsupportedType(const GgufFile& f, const GgufTensorInfo& t) {
  return FileError(
      f, StrCat("tensor '", t.name, "' has type ", GgmlTypeName(t.type),
                ", which Seedling cannot load (supported: f32, f16, bf16, q8_0, q4_0); convert the "
                "model with `llama-quantize --pure` to q8_0 or q4_0 (add --allow-requantize for an "
                "already quantized file), or export it as f16"));
}

absl::StatusOr<at::Tensor> LoadTensor(const GgufFile& f, const GgufTensorInfo& t, const Expected& e,
                                      WeightPrecision precision) {
  if (t.shape != e.shape) {
    return FileError(f, StrCat("tensor '", t.name, "' has shape ", ShapeString(t.shape),
                               ", config implies ", ShapeString(e.shape)));
  }
  const std::optional<Storage> storage = StorageOf(t.type);
  if (!storage.has_value()) return UnsupportedType(f, t);
  const bool matrix = e.shape.size() == 2;
  if (!matrix && storage->dtype == at::kByte) {
    return FileError(
        f, StrCat("tensor '", t.name, "' is 1-D but has block type ", GgmlTypeName(t.type),
                  "; norms and biases must be f32, f16 or bf16"));
  }
  bool copied = false;
  at::Tensor out = MappedTensor(t, *storage, copied);
  if (e.rope_heads > 0) {
    out = UndoRopeInterleave(out, e.rope_heads);
    copied = true;
  }
  const bool to_fp32 = !matrix || precision == WeightPrecision::kFloat32;
  if (to_fp32 && out.scalar_type() != at::kFloat) {
    out = matrix ? DequantizeMatrix(out) : out.to(at::kFloat);
    copied = true;
  }
  // The mapped source is no longer referenced: let its pages leave RSS.
  if (copied) t.file->Release(t.data, t.nbytes);
  return out;
}

std::string NameList(const std::vector<std::string>& names) {
  std::string list;
  for (size_t i = 0; i < names.size() && i < 5; ++i)
    list += StrCat(i ? ", " : "", "'", names[i], "'");
  if (names.size() > 5) list += StrCat(" and ", names.size() - 5, " more");
  return list;
}

absl::StatusOr<ModelWeights> LoadGgufWeights(const GgufFile& f, const ModelConfig& c,
                                             WeightPrecision precision) {
  ModelWeights w;
  std::vector<std::string> missing;
  std::set<std::string, std::less<>> used;
  for (const Expected& e : GgufTensorSlots(c, w)) {
    const GgufTensorInfo* t = f.FindTensor(e.name);
    if (t == nullptr) {
      missing.push_back(e.name);
      continue;
    }
    used.insert(e.name);
    SEEDLING_ASSIGN_OR_RETURN(*e.slot, LoadTensor(f, *t, e, precision));
  }
  // Llama 3 scaling is carried by rope_freqs.weight, which ConfigFromGguf reads.
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    if (f.FindTensor("rope_freqs.weight") == nullptr) missing.push_back("rope_freqs.weight");
    used.insert("rope_freqs.weight");
  }
  if (!missing.empty()) {
    return absl::NotFoundError(StrCat("GGUF file '", f.path(), "': ", missing.size(),
                                      " tensor(s) the ", c.architecture,
                                      " config requires are missing: ", NameList(missing)));
  }
  std::vector<std::string> unexpected;
  for (const GgufTensorInfo& t : f.tensors()) {
    if (!used.contains(t.name)) unexpected.push_back(t.name);
  }
  if (!unexpected.empty()) {
    return FileError(f, StrCat(unexpected.size(), " tensor(s) are not part of a ", c.architecture,
                               " with this config: ", NameList(unexpected)));
  }
  if (c.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

// ---- Tokenizer ----------------------------------------------------------------------------------

using Vocab = TokenizerVocabulary;

// llama.cpp's tokenizer.ggml.pre names (llama-vocab.cpp) of the byte-level pre-tokenizers Seedling
// implements the same way.
struct PreTokenizerName {
  std::string_view name;
  Vocab::PreTokenizer pre;
};
constexpr PreTokenizerName kPreTokenizers[] = {
    {"gpt-2", Vocab::PreTokenizer::kGpt2},
    {"smollm", Vocab::PreTokenizer::kGpt2Digits},
    {"llama-bpe", Vocab::PreTokenizer::kLlama3},
    {"llama3", Vocab::PreTokenizer::kLlama3},
    {"llama-v3", Vocab::PreTokenizer::kLlama3},
    {"qwen2", Vocab::PreTokenizer::kQwen2},
    {"deepseek-r1-qwen", Vocab::PreTokenizer::kQwen2},
};

absl::StatusOr<Vocab::PreTokenizer> ReadPreTokenizer(const GgufFile& f) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<std::string_view> name,
                            Optional(f.GetString("tokenizer.ggml.pre")));
  std::string known;
  for (const PreTokenizerName& p : kPreTokenizers) {
    if (name == p.name) return p.pre;
    known += StrCat(known.empty() ? "" : ", ", p.name);
  }
  return FileError(
      f, StrCat("tokenizer.ggml.pre ",
                name.has_value() ? StrCat("'", *name, "' is not supported") : "is missing",
                " for a gpt2 tokenizer (supported: ", known, ")"));
}

absl::Status ReadMerges(const GgufFile& f, Vocab& v) {
  SEEDLING_ASSIGN_OR_RETURN(const std::vector<std::string_view> merges,
                            f.GetStringArray("tokenizer.ggml.merges"));
  v.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    // llama.cpp splits at the first space after the first byte (a token may be a space).
    const size_t space = merges[i].find(' ', 1);
    if (space == std::string_view::npos) {
      return FileError(f, StrCat("tokenizer.ggml.merges[", i, "] '", merges[i],
                                 "' is not two tokens separated by a space"));
    }
    v.merges.emplace_back(merges[i].substr(0, space), merges[i].substr(space + 1));
  }
  return absl::OkStatus();
}

absl::Status ReadTokens(const GgufFile& f, Vocab& v) {
  SEEDLING_ASSIGN_OR_RETURN(const std::vector<std::string_view> tokens,
                            f.GetStringArray("tokenizer.ggml.tokens"));
  v.tokens.assign(tokens.begin(), tokens.end());
  const size_t n = tokens.size();
  if (f.Has("tokenizer.ggml.token_type")) {
    SEEDLING_ASSIGN_OR_RETURN(v.types, f.GetI32Array("tokenizer.ggml.token_type"));
    // llama.cpp reads type 0 (UNDEFINED) as a normal token.
    std::replace(v.types.begin(), v.types.end(), 0, static_cast<int32_t>(Vocab::kNormal));
  } else {
    v.types.assign(n, Vocab::kNormal);
  }
  if (f.Has("tokenizer.ggml.scores")) {
    SEEDLING_ASSIGN_OR_RETURN(v.scores, f.GetF32Array("tokenizer.ggml.scores"));
  }
  if (v.types.size() != n || (!v.scores.empty() && v.scores.size() != n)) {
    return FileError(f, StrCat("tokenizer.ggml.tokens has ", n, " entries but token_type has ",
                               v.types.size(), " and scores ", v.scores.size()));
  }
  return absl::OkStatus();
}

absl::Status ReadTokenizerFlags(const GgufFile& f, Vocab& v, bool& add_space_prefix) {
  const std::pair<const char*, std::optional<int32_t>*> ids[] = {
      {"tokenizer.ggml.bos_token_id", &v.bos_id},
      {"tokenizer.ggml.eos_token_id", &v.eos_id},
      {"tokenizer.ggml.unknown_token_id", &v.unk_id},
      {"tokenizer.ggml.padding_token_id", &v.pad_id}};
  for (const auto& [key, id] : ids) {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> value, Optional(f.GetU32(key)));
    if (value.has_value() && *value >= v.tokens.size()) {
      return FileError(f, StrCat(key, " ", *value, " is outside the vocabulary of ",
                                 v.tokens.size(), " tokens"));
    }
    if (value.has_value()) *id = static_cast<int32_t>(*value);
  }
  const bool spm = v.kind != Vocab::Kind::kByteLevelBpe;
  SEEDLING_ASSIGN_OR_RETURN(std::optional<bool> add_bos,
                            Optional(f.GetBool("tokenizer.ggml.add_bos_token")));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<bool> add_eos,
                            Optional(f.GetBool("tokenizer.ggml.add_eos_token")));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<bool> prefix,
                            Optional(f.GetBool("tokenizer.ggml.add_space_prefix")));
  // llama.cpp adds BOS by default for SentencePiece vocabularies (when they name one).
  v.add_bos = add_bos.value_or(spm && v.bos_id.has_value());
  v.add_eos = add_eos.value_or(false);
  add_space_prefix = prefix.value_or(spm);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ConfigFromGguf(const GgufFile& file) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string_view arch, file.GetString("general.architecture"));
  ModelConfig c;
  if (arch == "llama") {
    c.architecture = "LlamaForCausalLM";
  } else if (arch == "qwen2") {
    c.architecture = "Qwen2ForCausalLM";
  } else {
    return FileError(file, StrCat("general.architecture '", arch,
                                  "' is not supported (supported: llama, qwen2)"));
  }
  c.model_type = std::string(arch);
  const std::string p = StrCat(arch, ".");
  return CatchTorch("GGUF config", [&]() -> absl::StatusOr<ModelConfig> {
    SEEDLING_RETURN_IF_ERROR(ReadSizes(file, p, c));
    SEEDLING_RETURN_IF_ERROR(ReadHeadDim(file, p, c));
    SEEDLING_RETURN_IF_ERROR(ReadVocabSize(file, p, c));
    SEEDLING_RETURN_IF_ERROR(ReadRope(file, p, arch, c));
    SEEDLING_RETURN_IF_ERROR(ReadSpecialIds(file, c));
    ReadLayout(file, c);
    const absl::Status valid = c.Validate();
    if (!valid.ok()) return Annotate(valid, StrCat("GGUF file '", file.path(), "'"));
    return c;
  });
}

absl::StatusOr<ModelWeights> WeightsFromGguf(const GgufFile& file, const ModelConfig& config,
                                             WeightPrecision precision) {
  return CatchTorch(StrCat("GGUF file '", file.path(), "'"),
                    [&] { return LoadGgufWeights(file, config, precision); });
}

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromGguf(const GgufFile& file) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string_view model, file.GetString("tokenizer.ggml.model"));
  Vocab v;
  if (model == "gpt2") {
    v.kind = Vocab::Kind::kByteLevelBpe;
    SEEDLING_ASSIGN_OR_RETURN(v.pre_tokenizer, ReadPreTokenizer(file));
    SEEDLING_RETURN_IF_ERROR(ReadMerges(file, v));
  } else if (model == "llama") {
    v.kind = Vocab::Kind::kSentencePieceBpe;
  } else {
    return FileError(file, StrCat("tokenizer.ggml.model '", model,
                                  "' is not supported (supported: gpt2, llama)"));
  }
  SEEDLING_RETURN_IF_ERROR(ReadTokens(file, v));
  VocabularyTokenizerOptions options;
  SEEDLING_RETURN_IF_ERROR(ReadTokenizerFlags(file, v, options.add_space_prefix));
  options.source = StrCat("GGUF file '", file.path(), "': tokenizer");
  return TokenizerFromVocabulary(v, options);
}

std::vector<HeldMatrix> GgufStreamableMatrices(const GgufFile& file, const ModelConfig& config,
                                                WeightPrecision precision) {
  std::vector<HeldMatrix> out;
  if (precision == WeightPrecision::kFloat32) return out;
  ModelWeights slots;
  for (const Expected& e : GgufTensorSlots(config, slots)) {
    const bool head = e.name == "output.weight" || (config.tie_word_embeddings && e.name == "token_embd.weight");
    if (e.shape.size() != 2 || (!head && !e.name.starts_with("blk.")) || e.rope_heads > 0) continue;
    const GgufTensorInfo* t = file.FindTensor(e.name);
    if (t == nullptr || t->shape != e.shape) continue;
    const std::optional<WeightFormat> held = MatrixFormatOf(t->type);
    if (!held.has_value() || *held == WeightFormat::kF32) continue;
    if (reinterpret_cast<uintptr_t>(t->data) % StorageOf(t->type)->element_bytes != 0) continue;  // copied
    const std::optional<WeightFormat> block = BlockFormatOf(precision);
    if (block.has_value() && *held != MatrixFormatFor(*block, e.shape[1])) continue;  // converted at load
    out.push_back({e.shape[0], e.shape[1], static_cast<int64_t>(t->nbytes)});
  }
  return out;
}

bool IsGgufPath(const std::string& path) {
  if (path.ends_with(".gguf")) return true;
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return false;
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  in.read(magic, sizeof(magic));
  return in.gcount() == sizeof(magic) && std::memcmp(magic, "GGUF", sizeof(magic)) == 0;
}

absl::StatusOr<GgufModel> LoadGgufModel(const std::string& path, WeightPrecision precision) {
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file,
                            GgufFile::Open(path, MappedFile::Mode::kCopyOnWrite));
  GgufModel model;
  SEEDLING_ASSIGN_OR_RETURN(model.config, ConfigFromGguf(*file));
  SEEDLING_ASSIGN_OR_RETURN(model.tokenizer, TokenizerFromGguf(*file));
  SEEDLING_ASSIGN_OR_RETURN(model.weights, WeightsFromGguf(*file, model.config, precision));
  return model;
}

}  // namespace seedling::model
