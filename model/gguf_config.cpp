#include "model/gguf_config.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <optional>
#include <vector>

#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"
#include "model/internal/gguf_util.h"

namespace seedling::model {
namespace {

using internal::FileError;
using internal::Optional;
using internal::ShapeString;

// The double a float32 key was meant to be: its shortest decimal form, read as a double (1e-5f
// becomes 1e-5, not 9.99999974737875e-06), so a config written as float32 reads back equal.
double Widen(float value) {
  char buffer[32];
  const auto written = std::to_chars(buffer, buffer + sizeof(buffer), value);
  double widened = value;
  std::from_chars(buffer, written.ptr, widened);
  return widened;
}

// ---- Config -------------------------------------------------------------------------------------

absl::Status ReadSizes(const GgufFile& f, const std::string& p, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(c.max_position_embeddings, f.GetU32(p + "context_length"));
  SEEDLING_ASSIGN_OR_RETURN(c.hidden_size, f.GetU32(p + "embedding_length"));
  SEEDLING_ASSIGN_OR_RETURN(c.num_hidden_layers, f.GetU32(p + "block_count"));
  SEEDLING_ASSIGN_OR_RETURN(c.intermediate_size, f.GetU32(p + "feed_forward_length"));
  SEEDLING_ASSIGN_OR_RETURN(c.num_attention_heads, f.GetU32(p + "attention.head_count"));
  if (c.num_attention_heads == 0) return FileError(f, StrCat(p, "attention.head_count is 0"));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> kv, Optional(f.GetU32(p + "attention.head_count_kv")));
  c.num_key_value_heads = kv.value_or(c.num_attention_heads);
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> experts, Optional(f.GetU32(p + "expert_count")));
  if (experts.value_or(0) > 0) {
    return FileError(f, StrCat(p, "expert_count is ", *experts, ": mixture-of-experts models are not supported"));
  }
  SEEDLING_ASSIGN_OR_RETURN(const float eps, f.GetF32(p + GgufNormEpsilonKey(c)));
  c.rms_norm_eps = Widen(eps);
  return absl::OkStatus();
}

// head_dim: llama.cpp's key length, which defaults to embedding_length / head_count.
absl::Status ReadHeadDim(const GgufFile& f, const std::string& p, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> key_length, Optional(f.GetU32(p + "attention.key_length")));
  if (!key_length.has_value() && c.hidden_size % c.num_attention_heads != 0) {
    return FileError(f, StrCat(p, "embedding_length ", c.hidden_size, " is not a multiple of the head count ",
                               c.num_attention_heads, " and ", p, "attention.key_length is missing"));
  }
  c.head_dim = key_length.value_or(c.hidden_size / c.num_attention_heads);
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> value_length, Optional(f.GetU32(p + "attention.value_length")));
  if (value_length.has_value() && *value_length != c.head_dim) {
    return FileError(f, StrCat(p, "attention.value_length ", *value_length, " differs from the key length ", c.head_dim,
                               "; Seedling's attention needs them equal"));
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
    return FileError(f, StrCat(p, "vocab_size is ", *declared, " but tokenizer.ggml.tokens has ", *tokens, " tokens"));
  }
  const GgufTensorInfo* embed = f.FindTensor("token_embd.weight");
  if (declared.has_value()) {
    c.vocab_size = *declared;
  } else if (tokens.has_value()) {
    c.vocab_size = *tokens;
  } else if (embed != nullptr && embed->shape.size() == 2) {
    c.vocab_size = embed->shape[0];
  } else {
    return FileError(
        f, StrCat("no vocabulary size: neither ", p, "vocab_size, tokenizer.ggml.tokens nor token_embd.weight"));
  }
  return absl::OkStatus();
}

// The factor each frequency pair's angle is divided by under `scaling` (what rope_freqs.weight
// holds).
std::vector<double> RopeFactors(const ModelConfig& c, const RopeScaling& scaling) {
  ModelConfig scaled = c;
  scaled.rope_scaling = scaling;
  return RopeScalingFactors(scaled);
}

bool FactorsMatch(const ModelConfig& c, const RopeScaling& scaling, const std::vector<double>& factors) {
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
std::vector<RopeScaling> Llama3Candidates(const ModelConfig& c, const std::vector<double>& factors) {
  RopeScaling base;
  base.type = RopeScaling::Type::kLlama3;
  base.factor = *std::max_element(factors.begin(), factors.end());
  ModelConfig unscaled = c;
  unscaled.rope_scaling = RopeScaling{};
  const std::vector<double> inv = RopeInverseFrequencyValues(unscaled);
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
    standard.original_max_position_embeddings = std::llround(sum / static_cast<double>(ramp.size()));
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

// The per-pair RoPE factors of tensor `name`: f32, head_dim / 2 of them, each finite and >= `min`.
absl::StatusOr<std::vector<double>> RopeFactorTensor(const GgufFile& f, const char* name, const ModelConfig& c,
                                                     double min) {
  const GgufTensorInfo& t = *f.FindTensor(name);
  if (t.type != GgmlType::kF32 || t.shape != std::vector<int64_t>{c.head_dim / 2}) {
    return FileError(f, StrCat("tensor '", name, "' is ", GgmlTypeName(t.type), " ", ShapeString(t.shape),
                               ", expected f32 [", c.head_dim / 2, "]"));
  }
  std::vector<double> factors(c.head_dim / 2);
  for (size_t i = 0; i < factors.size(); ++i) {
    float v;
    std::memcpy(&v, t.data + 4 * i, 4);
    if (!(v >= min && std::isfinite(v))) {
      return FileError(f,
                       StrCat("tensor '", name, "' holds factor ", v, " at ", i, "; expected a finite value >= ", min));
    }
    factors[i] = Widen(v);  // 1.05 stored as float32 reads back as the double 1.05
  }
  return factors;
}

// LongRoPE (phi3): rope_factors_short / _long.weight, the pre-trained context from rope.scaling.original_context_length
// (default: context_length) and rope.scaling.attn_factor, kept only where it differs from the LongRoPE paper's
// default (so the config equals the config.json's that leaves it out).
absl::Status ReadLongRope(const GgufFile& f, const std::string& p, ModelConfig& c) {
  RopeScaling rs;
  rs.type = RopeScaling::Type::kLongRope;
  SEEDLING_ASSIGN_OR_RETURN(rs.short_factor, RopeFactorTensor(f, "rope_factors_short.weight", c, 1e-6));
  SEEDLING_ASSIGN_OR_RETURN(rs.long_factor, RopeFactorTensor(f, "rope_factors_long.weight", c, 1e-6));
  SEEDLING_ASSIGN_OR_RETURN(const std::optional<uint32_t> original,
                            Optional(f.GetU32(p + "rope.scaling.original_context_length")));
  rs.original_max_position_embeddings = original.has_value() ? *original : c.max_position_embeddings;
  if (rs.original_max_position_embeddings <= 0) {
    return FileError(f, StrCat(p, "rope.scaling.original_context_length must be positive"));
  }
  c.rope_scaling = rs;
  SEEDLING_ASSIGN_OR_RETURN(const std::optional<float> factor, Optional(f.GetF32(p + "rope.scaling.attn_factor")));
  if (factor.has_value()) {
    if (!(*factor > 0) || !std::isfinite(*factor)) {
      return FileError(f, StrCat(p, "rope.scaling.attn_factor must be a finite number > 0, got ", *factor));
    }
    const double implied = RopeAttentionFactor(c);
    if (std::abs(*factor - implied) > 1e-6 * implied) c.rope_scaling.attention_factor = Widen(*factor);
  }
  return absl::OkStatus();
}

// phi3: the window every layer attends through (attention.sliding_window; 0 or absent = none) and LongRoPE.
absl::Status ReadPhi3(const GgufFile& f, const std::string& p, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(const std::optional<uint32_t> window, Optional(f.GetU32(p + "attention.sliding_window")));
  if (window.has_value() && *window > 0) c.sliding_window = *window;
  const bool has_long = f.FindTensor("rope_factors_long.weight") != nullptr;
  const bool has_short = f.FindTensor("rope_factors_short.weight") != nullptr;
  if (has_long != has_short) {
    return FileError(f, "LongRoPE needs both rope_factors_long.weight and rope_factors_short.weight");
  }
  return has_long ? ReadLongRope(f, p, c) : absl::OkStatus();
}

// gptneox: attention and MLP in parallel unless use_parallel_residual says otherwise (llama.cpp's default: true).
absl::Status ReadGptNeoX(const GgufFile& f, const std::string& p, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(const std::optional<bool> parallel, Optional(f.GetBool(p + "use_parallel_residual")));
  c.parallel_residual = parallel.value_or(true);
  return absl::OkStatus();
}

// phi2: q, k and v apart, as convert_hf_to_gguf writes the transformers layout. Files converted from the
// remote-code layout keep them fused as attn_qkv, which PhiForCausalLM has no module for.
absl::Status ReadPhi2(const GgufFile& f) {
  if (f.FindTensor("blk.0.attn_qkv.weight") == nullptr) return absl::OkStatus();
  return FileError(f,
                   "tensor 'blk.0.attn_qkv.weight': a phi2 file with q, k and v fused (converted from the "
                   "remote-code layout) is not supported; convert from the transformers layout, which writes "
                   "attn_q, attn_k and attn_v");
}

absl::StatusOr<RopeScaling> Llama3FromRopeFreqs(const GgufFile& f, const ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(const std::vector<double> factors, RopeFactorTensor(f, "rope_freqs.weight", c, 1 - 1e-6));
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
  SEEDLING_ASSIGN_OR_RETURN(std::optional<std::string_view> type, Optional(f.GetString(p + "rope.scaling.type")));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<float> factor, Optional(f.GetF32(p + "rope.scaling.factor")));
  SEEDLING_ASSIGN_OR_RETURN(std::optional<float> legacy, Optional(f.GetF32(p + "rope.scale_linear")));
  if (type.has_value() && *type != "none" && *type != "linear") {
    return FileError(f, StrCat(p, "rope.scaling.type '", *type, "' is not supported (supported: none, linear)"));
  }
  if ((type == "linear" && factor.has_value()) || (!type.has_value() && legacy.has_value())) {
    const float value = type.has_value() ? *factor : *legacy;
    if (!(value >= 1)) return FileError(f, StrCat("linear RoPE scaling factor ", value, " is below 1"));
    c.rope_scaling.type = RopeScaling::Type::kLinear;
    c.rope_scaling.factor = Widen(value);
  } else if (type == "linear") {
    return FileError(f, StrCat(p, "rope.scaling.type is linear but ", p, "rope.scaling.factor is missing"));
  }
  return absl::OkStatus();
}

absl::Status ReadRope(const GgufFile& f, const std::string& p, std::string_view arch, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<float> theta, Optional(f.GetF32(p + "rope.freq_base")));
  c.rope_theta = theta.has_value() ? Widen(*theta) : 10000.0;
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> rotated, Optional(f.GetU32(p + "rope.dimension_count")));
  if (rotated.has_value() && *rotated != c.rotary_dim()) {
    // A family whose block rotates a share of each head (its default below 1) takes the file's share.
    if (c.partial_rotary_factor == 1.0 || *rotated == 0 || *rotated > c.head_dim) {
      return FileError(f, StrCat(p, "rope.dimension_count ", *rotated, " differs from the head size ", c.head_dim,
                                 ": partial rotary embeddings are not supported for ", arch));
    }
    c.partial_rotary_factor = static_cast<double>(*rotated) / static_cast<double>(c.head_dim);
    if (c.rotary_dim() != static_cast<int64_t>(*rotated)) {
      return FileError(f, StrCat(p, "rope.dimension_count ", *rotated, " is not a share of head size ", c.head_dim,
                                 " that reads back exactly"));
    }
  }
  SEEDLING_RETURN_IF_ERROR(ReadLinearScaling(f, p, c));
  if (f.FindTensor("rope_freqs.weight") == nullptr) return absl::OkStatus();
  if (arch != "llama" || c.rope_scaling.type != RopeScaling::Type::kNone) {
    return FileError(f, StrCat("tensor 'rope_freqs.weight' (Llama 3 RoPE scaling) is only supported for "
                               "architecture llama without other scaling"));
  }
  SEEDLING_ASSIGN_OR_RETURN(c.rope_scaling, Llama3FromRopeFreqs(f, c));
  return absl::OkStatus();
}

absl::Status ReadSpecialIds(const GgufFile& f, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> bos, Optional(f.GetU32("tokenizer.ggml.bos_token_id")));
  if (bos.has_value()) c.bos_token_id = *bos;
  for (const char* key :
       {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<uint32_t> id, Optional(f.GetU32(key)));
    if (id.has_value() && std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), *id) == c.eos_token_ids.end()) {
      c.eos_token_ids.push_back(*id);
    }
  }
  return absl::OkStatus();
}

void ReadLayout(const GgufFile& f, ModelConfig& c) {
  auto has = [&](const char* name) { return f.FindTensor(name) != nullptr; };
  c.tie_word_embeddings = !has("output.weight");
  c.qkv_bias = has("blk.0.attn_q.bias") || has("blk.0.attn_qkv.bias");
  c.o_bias = has("blk.0.attn_output.bias");
  c.mlp_bias = has("blk.0.ffn_gate.bias") || has("blk.0.ffn_up.bias") || has("blk.0.ffn_down.bias");
  const GgufTensorInfo* embed = f.FindTensor("token_embd.weight");
  const GgmlType type = embed != nullptr ? embed->type : GgmlType::kF16;
  c.torch_dtype = type == GgmlType::kF32 ? "float32" : type == GgmlType::kBF16 ? "bfloat16" : "float16";
}

constexpr GgufGemmaGraph kGemmaGraphs[] = {
    {.arch = "gemma2", .pattern = 2, .local_theta = 0.0, .softcaps = true, .default_window = 4096, .layers_27b = 46},
    {.arch = "gemma3", .pattern = 6, .local_theta = 10000.0, .softcaps = false, .default_window = 0, .layers_27b = 62},
};

// What a Gemma graph fixes, and the window and soft-caps it reads.
absl::Status ReadGemma(const GgufFile& f, const std::string& p, const GgufGemmaGraph& graph, ModelConfig& c) {
  const std::string window_key = p + "attention.sliding_window";
  if (graph.default_window == 0) {
    SEEDLING_ASSIGN_OR_RETURN(const uint32_t window, f.GetU32(window_key));
    c.sliding_window = window;
  } else {
    SEEDLING_ASSIGN_OR_RETURN(const std::optional<uint32_t> window, Optional(f.GetU32(window_key)));
    c.sliding_window = window.has_value() ? static_cast<int64_t>(*window) : graph.default_window;
  }
  c.sliding_window_pattern = graph.pattern;
  c.rope_local_theta = graph.local_theta;
  c.attention_scale = graph.QueryScale(c);
  c.attention_softcap = c.final_logit_softcap = 0.0;
  if (graph.softcaps) {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<float> attention, Optional(f.GetF32(p + "attn_logit_softcapping")));
    SEEDLING_ASSIGN_OR_RETURN(std::optional<float> final_cap, Optional(f.GetF32(p + "final_logit_softcapping")));
    c.attention_softcap = attention.has_value() ? Widen(*attention) : 50.0;
    c.final_logit_softcap = final_cap.has_value() ? Widen(*final_cap) : 30.0;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ConfigFromGguf(const GgufFile& file) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string_view arch, file.GetString("general.architecture"));
  const families::FamilySpec* family = families::FamilyOfGgufArchitecture(arch);
  if (family == nullptr) {
    std::string names;
    for (const families::FamilySpec& f : families::Families()) {
      if (families::FamilyOfGgufArchitecture(f.gguf_architecture) == &f) {
        names += StrCat(names.empty() ? "" : ", ", f.gguf_architecture);
      }
    }
    return FileError(file, StrCat("general.architecture '", arch, "' is not supported (supported: ", names, ")"));
  }
  ModelConfig c;
  c.architecture = family->architecture;
  c.model_type = family->model_type;
  // The family's block; the biases then follow the file's tensors (ReadLayout).
  SEEDLING_RETURN_IF_ERROR(family->read(internal::Json::object(), c));
  const std::string p = StrCat(arch, ".");
  SEEDLING_RETURN_IF_ERROR(ReadSizes(file, p, c));
  SEEDLING_RETURN_IF_ERROR(ReadHeadDim(file, p, c));
  SEEDLING_RETURN_IF_ERROR(ReadVocabSize(file, p, c));
  SEEDLING_RETURN_IF_ERROR(ReadRope(file, p, arch, c));
  SEEDLING_RETURN_IF_ERROR(ReadSpecialIds(file, c));
  ReadLayout(file, c);
  if (const GgufGemmaGraph* graph = GemmaGraphOf(arch)) SEEDLING_RETURN_IF_ERROR(ReadGemma(file, p, *graph, c));
  if (arch == "phi3") SEEDLING_RETURN_IF_ERROR(ReadPhi3(file, p, c));
  if (arch == "gptneox") SEEDLING_RETURN_IF_ERROR(ReadGptNeoX(file, p, c));
  if (arch == "phi2") SEEDLING_RETURN_IF_ERROR(ReadPhi2(file));
  const absl::Status valid = c.Validate();
  if (!valid.ok()) return Annotate(valid, StrCat("GGUF file '", file.path(), "'"));
  return c;
}

double GgufGemmaGraph::QueryScale(const ModelConfig& c) const {
  const double dim = c.num_hidden_layers == layers_27b ? static_cast<double>(c.hidden_size / c.num_attention_heads)
                                                       : static_cast<double>(c.head_dim);
  return 1.0 / std::sqrt(dim);
}

const GgufGemmaGraph* GemmaGraphOf(std::string_view arch) {
  for (const GgufGemmaGraph& g : kGemmaGraphs) {
    if (g.arch == arch) return &g;
  }
  return nullptr;
}

std::string GgufNormEpsilonKey(const ModelConfig& c) {
  return c.norm_kind == NormKind::kLayerNorm ? "attention.layer_norm_epsilon" : "attention.layer_norm_rms_epsilon";
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

}  // namespace seedling::model
