#include "model/config.h"

#include <cmath>
#include <nlohmann/json.hpp>
#include <numbers>

#include "base/file.h"
#include "base/json.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"
#include "model/gguf_config.h"
#include "model/internal/config_json.h"

namespace seedling::model {
namespace {

using internal::FieldError;
using internal::GetBool;
using internal::GetDouble;
using internal::GetInt;
using internal::Json;

// A list of positive finite numbers, e.g. rope_scaling.short_factor.
absl::StatusOr<std::vector<double>> GetFactors(const Json& r, const char* key, const char* field) {
  auto it = r.find(key);
  if (it == r.end() || !it->is_array() || it->empty()) return FieldError(field, "must be a non-empty list of numbers");
  if (it->size() > static_cast<size_t>(kMaxHeadDim)) return FieldError(field, "is longer than any head_dim / 2");
  std::vector<double> out;
  for (const Json& v : *it) {
    if (!v.is_number() || !(v.get<double>() > 0) || !std::isfinite(v.get<double>())) {
      return FieldError(field, "must hold positive finite numbers");
    }
    out.push_back(v.get<double>());
  }
  return out;
}

// LongRoPE (Phi-3): short and long per-pair factors; the pre-trained context is config.json's top-level
// original_max_position_embeddings (max_position_embeddings when absent).
absl::StatusOr<RopeScaling> ParseLongRope(const Json& j, const Json& r) {
  RopeScaling rs;
  rs.type = RopeScaling::Type::kLongRope;
  SEEDLING_ASSIGN_OR_RETURN(rs.short_factor, GetFactors(r, "short_factor", "rope_scaling.short_factor"));
  SEEDLING_ASSIGN_OR_RETURN(rs.long_factor, GetFactors(r, "long_factor", "rope_scaling.long_factor"));
  SEEDLING_ASSIGN_OR_RETURN(rs.attention_factor, GetDouble(r, "attention_factor", 0.0));
  if (!(rs.attention_factor >= 0) || !std::isfinite(rs.attention_factor)) {
    return FieldError("rope_scaling.attention_factor", "must be a finite number > 0");
  }
  SEEDLING_ASSIGN_OR_RETURN(const int64_t max_positions, GetInt(j, "max_position_embeddings", 2048));
  SEEDLING_ASSIGN_OR_RETURN(rs.original_max_position_embeddings,
                            GetInt(j, "original_max_position_embeddings", max_positions));
  return rs;
}

absl::StatusOr<RopeScaling> ParseRopeScaling(const Json& j) {
  RopeScaling rs;
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) return rs;
  if (!it->is_object()) return FieldError("rope_scaling", "must be an object or null");
  const Json& r = *it;
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    auto t = r.find(key);
    if (t != r.end() && t->is_string()) {
      type = t->get<std::string>();
      break;
    }
  }
  if (type.empty()) return FieldError("rope_scaling", "has no 'rope_type' (or 'type')");
  if (type == "default") return rs;
  if (type == "longrope" || type == "su") return ParseLongRope(j, r);
  SEEDLING_ASSIGN_OR_RETURN(rs.factor, GetDouble(r, "factor", 1.0));
  if (!(rs.factor >= 1.0)) return FieldError("rope_scaling.factor", "must be >= 1");
  if (type == "linear") {
    rs.type = RopeScaling::Type::kLinear;
  } else if (type == "llama3") {
    rs.type = RopeScaling::Type::kLlama3;
    SEEDLING_ASSIGN_OR_RETURN(rs.low_freq_factor, GetDouble(r, "low_freq_factor", 1.0));
    SEEDLING_ASSIGN_OR_RETURN(rs.high_freq_factor, GetDouble(r, "high_freq_factor", 4.0));
    SEEDLING_ASSIGN_OR_RETURN(rs.original_max_position_embeddings, GetInt(r, "original_max_position_embeddings", 8192));
    if (!(rs.high_freq_factor > rs.low_freq_factor)) {
      return FieldError("rope_scaling", "needs high_freq_factor > low_freq_factor");
    }
  } else {
    return FieldError("rope_scaling",
                      StrCat("has type '", type, "', which is not supported (supported: linear, llama3, longrope)"));
  }
  return rs;
}

const char* DtypeFromTorch(std::string_view s) {
  if (s == "bfloat16") return "bfloat16";
  if (s == "float16") return "float16";
  if (s == "float32") return "float32";
  return nullptr;
}

// The family config.json names: by its architecture, or by model_type when "architectures" is absent.
absl::StatusOr<const families::FamilySpec*> FamilyOf(std::string_view architecture, std::string_view model_type) {
  if (architecture.empty()) {
    if (const families::FamilySpec* f = families::FamilyOfModelType(model_type)) return f;
    return FieldError("architectures",
                      StrCat("is missing (and model_type '", model_type,
                             "' names no supported family; supported: ", families::ArchitectureNames(), ")"));
  }
  if (const families::FamilySpec* f = families::FamilyOfArchitecture(architecture)) return f;
  return absl::InvalidArgumentError(StrCat("config.json: architecture '", architecture,
                                           "' is not supported (supported: ", families::ArchitectureNames(), ")"));
}

}  // namespace

int64_t ModelConfig::NumParameters() const {
  const int64_t h = hidden_size;
  const int64_t norm_size = norm_kind == NormKind::kLayerNorm ? 2 * h : h;  // LayerNorm: weight and bias
  int64_t per_layer = norm_size * norms.count() + LayerMatrixParameters(*this);
  if (qkv_bias) per_layer += q_dim() + 2 * kv_dim();
  per_layer += q_norm_size() + k_norm_size();
  if (o_bias) per_layer += h;
  if (mlp_bias) per_layer += (gated_mlp ? 2 : 1) * intermediate_size + h;
  const int64_t e = embedding_dim();
  int64_t total = vocab_size * e + position_rows() * h + num_hidden_layers * per_layer;
  if (norms.final) total += norm_size;
  if (projects_embeddings()) total += 2 * e * h;  // project_in and project_out
  if (!tie_word_embeddings) total += vocab_size * e;
  if (lm_head_bias) total += vocab_size;
  return total;
}

absl::Status ModelConfig::Validate() const {
  // Every size must be positive and at most its bound: the bounds sit well above any real model and
  // keep every byte count the loader, the planner and the kernels multiply out of these within int64.
  auto in_range = [](int64_t v, const char* name, int64_t max) -> absl::Status {
    if (v <= 0) return FieldError(name, StrCat("must be positive, got ", v));
    if (v > max) return FieldError(name, StrCat("is ", v, "; at most ", max, " is supported"));
    return absl::OkStatus();
  };
  SEEDLING_RETURN_IF_ERROR(in_range(vocab_size, "vocab_size", kMaxVocabSize));
  SEEDLING_RETURN_IF_ERROR(in_range(hidden_size, "hidden_size", kMaxHiddenSize));
  SEEDLING_RETURN_IF_ERROR(in_range(intermediate_size, "intermediate_size", kMaxIntermediateSize));
  SEEDLING_RETURN_IF_ERROR(in_range(num_hidden_layers, "num_hidden_layers", kMaxLayers));
  SEEDLING_RETURN_IF_ERROR(in_range(num_attention_heads, "num_attention_heads", kMaxHeads));
  SEEDLING_RETURN_IF_ERROR(in_range(num_key_value_heads, "num_key_value_heads", kMaxHeads));
  SEEDLING_RETURN_IF_ERROR(in_range(head_dim, "head_dim", kMaxHeadDim));
  SEEDLING_RETURN_IF_ERROR(in_range(max_position_embeddings, "max_position_embeddings", kMaxPositions));
  if (num_attention_heads % num_key_value_heads != 0) {
    return FieldError("num_key_value_heads", StrCat("(", num_key_value_heads, ") must divide num_attention_heads (",
                                                    num_attention_heads, ")"));
  }
  if (head_dim % 2 != 0) return FieldError("head_dim", StrCat("must be even for RoPE, got ", head_dim));
  if (!(partial_rotary_factor > 0 && partial_rotary_factor <= 1)) {
    return FieldError("partial_rotary_factor", StrCat("must be in (0, 1], got ", partial_rotary_factor));
  }
  if (rotary_dim() < 2 || rotary_dim() % 2 != 0) {
    return FieldError("partial_rotary_factor", StrCat("rotates ", rotary_dim(), " of head_dim ", head_dim,
                                                      " dimensions; RoPE needs an even number, at least 2"));
  }
  if (position_offset < 0 || position_offset > kMaxPositions) {
    return FieldError("position_offset", StrCat("must be in [0, ", kMaxPositions, "], got ", position_offset));
  }
  if (fused.qkv_per_head && (!fused.qkv || num_key_value_heads != num_attention_heads)) {
    return FieldError("num_key_value_heads", "must equal num_attention_heads for a query_key_value fused per head");
  }
  if (!gated_mlp && (fused.gate_up || mlp_activation == MlpActivation::kSilu)) {
    return FieldError("hidden_act", "a plain (ungated) MLP takes gelu, gelu_new or relu, and no gate_up_proj");
  }
  if (word_embed_proj_dim != 0) {
    SEEDLING_RETURN_IF_ERROR(in_range(word_embed_proj_dim, "word_embed_proj_dim", kMaxHiddenSize));
  }
  // Post-LN normalizes after both residual adds of a sequential block, with its two norms and no others.
  const bool post_ln_block =
      norms.pre_attention && norms.pre_mlp && !norms.attention_output && !norms.mlp_output && !parallel_residual;
  if (norm_after_residual && !post_ln_block) {
    return FieldError("do_layer_norm_before",
                      "norms after each residual add need a sequential block with exactly its two norms");
  }
  if (!(rms_norm_eps > 0)) return FieldError("rms_norm_eps", "must be positive");
  if (!(rope_theta > 0)) return FieldError("rope_theta", "must be positive");
  if (sliding_window) SEEDLING_RETURN_IF_ERROR(in_range(*sliding_window, "sliding_window", kMaxPositions));
  if (rope_scaling.type == RopeScaling::Type::kLongRope) {
    const auto pairs = static_cast<size_t>(rotary_dim() / 2);
    for (const auto& [factors, name] : {std::pair{&rope_scaling.short_factor, "rope_scaling.short_factor"},
                                        std::pair{&rope_scaling.long_factor, "rope_scaling.long_factor"}}) {
      if (factors->size() != pairs) {
        return FieldError(name, StrCat("has ", factors->size(), " values; the rotated dimensions / 2 = ", pairs));
      }
    }
    SEEDLING_RETURN_IF_ERROR(
        in_range(rope_scaling.original_max_position_embeddings, "original_max_position_embeddings", kMaxPositions));
  }
  if (sliding_window_pattern < 0 || sliding_window_pattern > kMaxLayers) {
    return FieldError("sliding_window_pattern",
                      StrCat("must be in [0, ", kMaxLayers, "], got ", sliding_window_pattern));
  }
  auto non_negative = [](double v, const char* name, const char* zero) -> absl::Status {
    if (v >= 0 && std::isfinite(v)) return absl::OkStatus();
    return FieldError(name, StrCat("must be a finite number >= 0 (0 = ", zero, "), got ", v));
  };
  SEEDLING_RETURN_IF_ERROR(non_negative(rope_local_theta, "rope_local_base_freq", "rope_theta"));
  SEEDLING_RETURN_IF_ERROR(non_negative(attention_scale, "attention_scale", "1 / sqrt(head_dim)"));
  SEEDLING_RETURN_IF_ERROR(non_negative(attention_softcap, "attn_logit_softcapping", "none"));
  SEEDLING_RETURN_IF_ERROR(non_negative(final_logit_softcap, "final_logit_softcapping", "none"));
  if (!std::isfinite(norm_weight_offset)) return FieldError("norm_weight_offset", "must be finite");
  if (bos_token_id && (*bos_token_id < 0 || *bos_token_id >= vocab_size)) {
    return FieldError("bos_token_id", StrCat("(", *bos_token_id, ") is outside the vocabulary"));
  }
  for (int64_t e : eos_token_ids) {
    if (e < 0 || e >= vocab_size) {
      return FieldError("eos_token_id", StrCat("(", e, ") is outside the vocabulary"));
    }
  }
  return absl::OkStatus();
}

namespace {

// The family config.json `j` names (by its architecture, or its model_type).
absl::StatusOr<const families::FamilySpec*> FamilyOfConfig(const Json& j) {
  std::string architecture, model_type;
  auto arch = j.find("architectures");
  if (arch != j.end() && arch->is_array() && !arch->empty() && (*arch)[0].is_string()) {
    architecture = (*arch)[0].get<std::string>();
  }
  auto mt = j.find("model_type");
  if (mt != j.end() && mt->is_string()) model_type = mt->get<std::string>();
  return FamilyOf(architecture, model_type);
}

// Reads config.json `j` of `family` (after its prepare step).
absl::StatusOr<ModelConfig> ReadConfig(const Json& j, const families::FamilySpec* family) {
  try {
    ModelConfig c;
    c.architecture = family->architecture;
    c.model_type = family->model_type;
    SEEDLING_ASSIGN_OR_RETURN(c.vocab_size, GetInt(j, "vocab_size", std::nullopt));
    SEEDLING_ASSIGN_OR_RETURN(c.hidden_size, GetInt(j, "hidden_size", std::nullopt));
    SEEDLING_ASSIGN_OR_RETURN(c.intermediate_size, GetInt(j, "intermediate_size", std::nullopt));
    SEEDLING_ASSIGN_OR_RETURN(c.num_hidden_layers, GetInt(j, "num_hidden_layers", std::nullopt));
    SEEDLING_ASSIGN_OR_RETURN(c.num_attention_heads, GetInt(j, "num_attention_heads", std::nullopt));
    SEEDLING_ASSIGN_OR_RETURN(c.num_key_value_heads, GetInt(j, "num_key_value_heads", c.num_attention_heads));
    if (c.num_attention_heads <= 0) return FieldError("num_attention_heads", "must be positive");
    SEEDLING_ASSIGN_OR_RETURN(c.head_dim, GetInt(j, "head_dim", c.hidden_size / c.num_attention_heads));
    if (!j.contains("head_dim") && c.hidden_size % c.num_attention_heads != 0) {
      return FieldError("hidden_size", "must be divisible by num_attention_heads when head_dim is absent");
    }
    SEEDLING_ASSIGN_OR_RETURN(c.max_position_embeddings, GetInt(j, "max_position_embeddings", 2048));
    SEEDLING_ASSIGN_OR_RETURN(c.rms_norm_eps, GetDouble(j, "rms_norm_eps", 1e-6));
    SEEDLING_ASSIGN_OR_RETURN(c.rope_theta, GetDouble(j, "rope_theta", 10000.0));
    SEEDLING_ASSIGN_OR_RETURN(c.rope_scaling, ParseRopeScaling(j));
    SEEDLING_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(j, "tie_word_embeddings", false));
    SEEDLING_RETURN_IF_ERROR(family->read(j, c));
    SEEDLING_RETURN_IF_ERROR(internal::CheckActivation(j, "hidden_act", c.mlp_activation));
    auto bos = j.find("bos_token_id");
    if (bos != j.end() && !bos->is_null()) {
      SEEDLING_ASSIGN_OR_RETURN(int64_t b, GetInt(j, "bos_token_id", std::nullopt));
      c.bos_token_id = b;
    }
    auto eos = j.find("eos_token_id");
    if (eos != j.end() && !eos->is_null()) {
      if (eos->is_array()) {
        for (const Json& e : *eos) {
          if (!e.is_number_integer()) return FieldError("eos_token_id", "must hold integers");
          c.eos_token_ids.push_back(e.get<int64_t>());
        }
      } else {
        SEEDLING_ASSIGN_OR_RETURN(int64_t e, GetInt(j, "eos_token_id", std::nullopt));
        c.eos_token_ids.push_back(e);
      }
    }
    auto dt = j.find("torch_dtype");
    if (dt != j.end() && dt->is_string()) {
      const char* d = DtypeFromTorch(dt->get<std::string>());
      if (d == nullptr) {
        return FieldError("torch_dtype", StrCat("is ", dt->dump(), "; expected bfloat16, float16 or float32"));
      }
      c.torch_dtype = d;
    }
    SEEDLING_RETURN_IF_ERROR(c.Validate());
    return c;
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(StrCat("config.json: ", e.what()));
  }
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text) {
  SEEDLING_ASSIGN_OR_RETURN(Json j, ParseJson(json_text, "config.json"));
  if (!j.is_object()) return absl::InvalidArgumentError("config.json must be a JSON object");
  SEEDLING_ASSIGN_OR_RETURN(const families::FamilySpec* family, FamilyOfConfig(j));
  if (family->prepare != nullptr) SEEDLING_RETURN_IF_ERROR(family->prepare(j));
  return ReadConfig(j, family);
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  if (IsGgufPath(model_dir)) {
    SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(model_dir));
    return ConfigFromGguf(*file);
  }
  const std::string path = JoinPath(model_dir, "config.json");
  SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  auto config = ParseModelConfig(text);
  if (!config.ok()) return Annotate(config.status(), path);
  return config;
}

bool RopeLongContext(const ModelConfig& c, int64_t end) {
  return c.rope_scaling.type == RopeScaling::Type::kLongRope && end > c.rope_scaling.original_max_position_embeddings;
}

double RopeAttentionFactor(const ModelConfig& c) {
  const RopeScaling& rs = c.rope_scaling;
  if (rs.type != RopeScaling::Type::kLongRope) return 1.0;
  if (rs.attention_factor > 0) return rs.attention_factor;
  const double scale =
      static_cast<double>(c.max_position_embeddings) / static_cast<double>(rs.original_max_position_embeddings);
  if (scale <= 1.0) return 1.0;
  return std::sqrt(1.0 + std::log(scale) / std::log(static_cast<double>(rs.original_max_position_embeddings)));
}

std::vector<double> RopeInverseFrequencyValues(const ModelConfig& c, bool long_context) {
  const int64_t rotary = c.rotary_dim(), half = rotary / 2;
  std::vector<double> inv(static_cast<size_t>(half));
  double* p = inv.data();
  for (int64_t i = 0; i < half; ++i) {
    p[i] = 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * i) / static_cast<double>(rotary));
  }
  const RopeScaling& rs = c.rope_scaling;
  switch (rs.type) {
    case RopeScaling::Type::kNone:
      break;
    case RopeScaling::Type::kLinear:
      // Position interpolation: positions / factor, i.e. frequencies / factor.
      for (int64_t i = 0; i < half; ++i) p[i] /= rs.factor;
      break;
    case RopeScaling::Type::kLlama3: {
      // Llama 3.1: long wavelengths scaled by 1/factor, short ones kept, a smooth ramp in between.
      const double old_len = static_cast<double>(rs.original_max_position_embeddings);
      const double low_freq_wavelen = old_len / rs.low_freq_factor;
      const double high_freq_wavelen = old_len / rs.high_freq_factor;
      for (int64_t i = 0; i < half; ++i) {
        const double wavelen = 2.0 * std::numbers::pi / p[i];
        if (wavelen < high_freq_wavelen) continue;
        if (wavelen > low_freq_wavelen) {
          p[i] /= rs.factor;
          continue;
        }
        const double smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        p[i] = (1.0 - smooth) * p[i] / rs.factor + smooth * p[i];
      }
      break;
    }
    case RopeScaling::Type::kLongRope: {
      const std::vector<double>& factors = long_context ? rs.long_factor : rs.short_factor;
      for (int64_t i = 0; i < half && i < static_cast<int64_t>(factors.size()); ++i) p[i] /= factors[i];
      break;
    }
  }
  return inv;
}

std::vector<double> RopeScalingFactors(const ModelConfig& c) {
  ModelConfig unscaled = c;
  unscaled.rope_scaling = RopeScaling{};
  const std::vector<double> base = RopeInverseFrequencyValues(unscaled);
  std::vector<double> factors = RopeInverseFrequencyValues(c);
  for (size_t i = 0; i < factors.size(); ++i) factors[i] = base[i] / factors[i];
  return factors;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  Json j = Json::object();
  j["architectures"] = Json::array({c.architecture});
  j["model_type"] = c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  switch (c.rope_scaling.type) {
    case RopeScaling::Type::kNone:
      j["rope_scaling"] = nullptr;
      break;
    case RopeScaling::Type::kLinear:
      j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_scaling.factor}};
      break;
    case RopeScaling::Type::kLlama3:
      j["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", c.rope_scaling.factor},
                           {"low_freq_factor", c.rope_scaling.low_freq_factor},
                           {"high_freq_factor", c.rope_scaling.high_freq_factor},
                           {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
      break;
    case RopeScaling::Type::kLongRope:
      j["rope_scaling"] = {{"type", "longrope"},
                           {"short_factor", c.rope_scaling.short_factor},
                           {"long_factor", c.rope_scaling.long_factor}};
      if (c.rope_scaling.attention_factor > 0) j["rope_scaling"]["attention_factor"] = c.rope_scaling.attention_factor;
      j["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
      break;
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["hidden_act"] = internal::ActivationName(c.mlp_activation);
  if (const families::FamilySpec* family = families::FamilyOfArchitecture(c.architecture)) family->write(c, j);
  if (c.bos_token_id) j["bos_token_id"] = *c.bos_token_id;
  if (c.eos_token_ids.size() == 1) j["eos_token_id"] = c.eos_token_ids[0];
  if (c.eos_token_ids.size() > 1) j["eos_token_id"] = c.eos_token_ids;
  j["torch_dtype"] = c.torch_dtype;
  j["use_cache"] = true;
  return j.dump(2) + "\n";
}

std::string ModelId(const ModelConfig& config) {
  ModelConfig architecture = config;
  architecture.torch_dtype.clear();
  architecture.bos_token_id.reset();
  architecture.eos_token_ids.clear();
  return HexOf(Sha256(ModelConfigToJson(architecture)));
}

namespace {

ModelConfig Llama(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv, double theta,
                  double eps, bool tied, int64_t max_pos) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv;
  c.head_dim = hidden / heads;
  c.rope_theta = theta;
  c.rms_norm_eps = eps;
  c.tie_word_embeddings = tied;
  c.max_position_embeddings = max_pos;
  return c;
}

// Qwen3: q/k RMSNorm per head, explicit head_dim, no biases, RoPE base 1e6, eps 1e-6.
ModelConfig Qwen3(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                  int64_t head_dim, bool tied, int64_t max_pos) {
  ModelConfig c = Llama(vocab, hidden, inter, layers, heads, kv, 1000000.0, 1e-6, tied, max_pos);
  c.architecture = "Qwen3ForCausalLM";
  c.model_type = "qwen3";
  c.head_dim = head_dim;
  c.qk_norm = QkNorm::kPerHead;
  return c;
}

// OLMo 2: post-norm blocks, q/k RMSNorm over the whole projections, untied, eps 1e-6.
ModelConfig Olmo2(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv, double theta,
                  int64_t max_pos) {
  ModelConfig c = Llama(vocab, hidden, inter, layers, heads, kv, theta, 1e-6, false, max_pos);
  c.architecture = "Olmo2ForCausalLM";
  c.model_type = "olmo2";
  c.norms = {.pre_attention = false, .attention_output = true, .pre_mlp = false, .mlp_output = true};
  c.qk_norm = QkNorm::kPerProjection;
  return c;
}

// Gemma 2 and 3 share: GeGLU, 1 + w norms before and after each sub-block, scaled embeddings,
// query_pre_attn_scalar = head_dim, windowed local layers between global ones, tied, eps 1e-6.
ModelConfig Gemma(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                  int64_t head_dim, int64_t window, int64_t max_pos, double theta) {
  ModelConfig c = Llama(vocab, hidden, inter, layers, heads, kv, theta, 1e-6, true, max_pos);
  c.head_dim = head_dim;
  c.norms = {.pre_attention = true, .attention_output = true, .pre_mlp = true, .mlp_output = true};
  c.mlp_activation = MlpActivation::kGeluTanh;
  c.norm_weight_offset = 1.0;
  c.scale_embeddings = true;
  c.attention_scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  c.sliding_window = window;
  return c;
}

// Gemma 2: local and global layers alternate (RoPE base 10,000 for both), attention scores soft-capped at 50
// and the final logits at 30.
ModelConfig Gemma2(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                   int64_t head_dim, int64_t window, int64_t max_pos) {
  ModelConfig c = Gemma(vocab, hidden, inter, layers, heads, kv, head_dim, window, max_pos, 10000.0);
  c.architecture = "Gemma2ForCausalLM";
  c.model_type = "gemma2";
  c.sliding_window_pattern = 2;
  c.attention_softcap = 50.0;
  c.final_logit_softcap = 30.0;
  return c;
}

// Gemma 3 (text): per-head q/k norms, local layers (RoPE base 10,000) with every 6th global (base 1e6), no
// soft-capping.
ModelConfig Gemma3(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                   int64_t head_dim, int64_t window, int64_t max_pos) {
  ModelConfig c = Gemma(vocab, hidden, inter, layers, heads, kv, head_dim, window, max_pos, 1000000.0);
  c.architecture = "Gemma3ForCausalLM";
  c.model_type = "gemma3_text";
  c.qk_norm = QkNorm::kPerHead;
  c.sliding_window_pattern = 6;
  c.rope_local_theta = 10000.0;
  return c;
}

// Phi-3: fused qkv_proj and gate_up_proj, every layer windowed, untied, eps 1e-5, RoPE base 10,000.
ModelConfig Phi3(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv,
                 int64_t window, int64_t max_pos) {
  ModelConfig c = Llama(vocab, hidden, inter, layers, heads, kv, 10000.0, 1e-5, false, max_pos);
  c.architecture = "Phi3ForCausalLM";
  c.model_type = "phi3";
  c.fused = {.qkv = true, .gate_up = true};
  c.sliding_window = window;
  return c;
}

// GPT-NeoX (Pythia): LayerNorms, parallel attention and MLP, a quarter of each head rotated, query_key_value
// fused per head, biases everywhere, a plain GELU MLP, untied, eps 1e-5, RoPE base 10,000.
ModelConfig GptNeoX(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t max_pos) {
  ModelConfig c = Llama(vocab, hidden, inter, layers, heads, heads, 10000.0, 1e-5, false, max_pos);
  c.architecture = "GPTNeoXForCausalLM";
  c.model_type = "gpt_neox";
  c.norm_kind = NormKind::kLayerNorm;
  c.gated_mlp = false;
  c.mlp_activation = MlpActivation::kGelu;
  c.partial_rotary_factor = 0.25;
  c.parallel_residual = true;
  c.fused = {.qkv = true, .qkv_per_head = true};
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  return c;
}

// GPT-2: learned positions, LayerNorms, c_attn fused as q | k | v, biases everywhere, a plain GELU MLP of 4 x
// hidden, tied, eps 1e-5.
ModelConfig Gpt2(int64_t vocab, int64_t hidden, int64_t layers, int64_t heads, int64_t max_pos,
                 MlpActivation activation) {
  ModelConfig c = Llama(vocab, hidden, 4 * hidden, layers, heads, heads, 10000.0, 1e-5, true, max_pos);
  c.architecture = "GPT2LMHeadModel";
  c.model_type = "gpt2";
  c.norm_kind = NormKind::kLayerNorm;
  c.gated_mlp = false;
  c.mlp_activation = activation;
  c.positions = PositionKind::kLearned;
  c.fused = {.qkv = true};
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  return c;
}

// OPT: learned positions with two unused rows, LayerNorms, ReLU MLP, biases everywhere, tied, eps 1e-5.
ModelConfig Opt(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t max_pos) {
  ModelConfig c = Llama(vocab, hidden, inter, layers, heads, heads, 10000.0, 1e-5, true, max_pos);
  c.architecture = "OPTForCausalLM";
  c.model_type = "opt";
  c.norm_kind = NormKind::kLayerNorm;
  c.gated_mlp = false;
  c.mlp_activation = MlpActivation::kRelu;
  c.positions = PositionKind::kLearned;
  c.position_offset = 2;
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  return c;
}

// Phi-1 / 1.5 / 2: one LayerNorm feeding attention and the MLP in parallel, partial rotary, biases everywhere
// (the LM head's too), a plain tanh-GELU MLP, untied, eps 1e-5, RoPE base 10,000.
ModelConfig Phi(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads, double rotary) {
  ModelConfig c = Llama(vocab, hidden, inter, layers, heads, heads, 10000.0, 1e-5, false, 2048);
  c.architecture = "PhiForCausalLM";
  c.model_type = "phi";
  c.norm_kind = NormKind::kLayerNorm;
  c.norms = {.pre_attention = true, .attention_output = false, .pre_mlp = false, .mlp_output = false};
  c.parallel_residual = true;
  c.gated_mlp = false;
  c.mlp_activation = MlpActivation::kGeluTanh;
  c.partial_rotary_factor = rotary;
  c.qkv_bias = c.o_bias = c.mlp_bias = c.lm_head_bias = true;
  return c;
}

}  // namespace

std::vector<std::string> PresetNames() {
  return {"tiny",           "tiny-qwen2",   "tiny-qwen3",   "tiny-olmo2",        "tiny-gemma2",  "tiny-gemma3",
          "tiny-phi3",      "tiny-gptneox", "smollm2-135m", "smollm2-360m",      "qwen2.5-0.5b", "qwen3-0.6b",
          "tinyllama-1.1b", "olmo-2-1b",    "gemma-2-2b",   "gemma-3-270m",      "gemma-3-1b",   "phi-3-mini",
          "pythia-160m",    "tiny-gpt2",    "gpt2",         "cerebras-gpt-111m", "tiny-opt",     "opt-125m",
          "tiny-phi",       "phi-1.5",      "phi-2",        "opt-350m"};
}

absl::StatusOr<ModelConfig> PresetConfig(std::string_view name) {
  ModelConfig c;
  if (name == "tiny") {
    c = Llama(2048, 256, 688, 4, 8, 2, 10000.0, 1e-5, true, 2048);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
  } else if (name == "tiny-qwen2") {
    c = Llama(2048, 192, 512, 3, 6, 2, 1000000.0, 1e-6, false, 4096);
    c.architecture = "Qwen2ForCausalLM";
    c.model_type = "qwen2";
    c.qkv_bias = true;
    c.rope_scaling.type = RopeScaling::Type::kLlama3;  // allowed for any family; exercises the code path
    c.rope_scaling.factor = 8.0;
    c.rope_scaling.original_max_position_embeddings = 512;
    c.bos_token_id = 0;
    c.eos_token_ids = {0, 2};
  } else if (name == "tiny-qwen3") {
    // head_dim 48 x 4 heads = 192 != hidden_size 128, as in Qwen3 (head_dim 128 x 16 heads vs 1024).
    c = Qwen3(2048, 128, 384, 2, 4, 2, 48, true, 4096);
    c.bos_token_id = 0;
    c.eos_token_ids = {0, 2};
  } else if (name == "qwen3-0.6b") {
    c = Qwen3(151936, 1024, 3072, 28, 16, 8, 128, true, 40960);
    c.bos_token_id = 151643;
    c.eos_token_ids = {151645};
    c.torch_dtype = "bfloat16";
  } else if (name == "tiny-olmo2") {
    // GQA (OLMo 2 1B has none): the k norm's kv_dim weights then differ from the q norm's q_dim ones.
    c = Olmo2(2048, 128, 384, 2, 4, 2, 500000.0, 4096);
    c.eos_token_ids = {0};
  } else if (name == "olmo-2-1b") {
    // allenai/OLMo-2-0425-1B: 16 layers, MHA, untied, 1,484,916,736 parameters.
    c = Olmo2(100352, 2048, 8192, 16, 16, 16, 500000.0, 4096);
    c.eos_token_ids = {100257};
    c.torch_dtype = "float32";
  } else if (name == "tiny-gemma2") {
    // 4 layers (0 and 2 local with a window of 32, 1 and 3 global); head_dim 48 x 4 != 128, as gemma-2-2b's
    // 256 x 8 != 2304.
    c = Gemma2(2048, 128, 384, 4, 4, 2, 48, 32, 4096);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
  } else if (name == "gemma-2-2b") {
    // google/gemma-2-2b: 2,614,341,888 parameters, stored in float32.
    c = Gemma2(256000, 2304, 9216, 26, 8, 4, 256, 4096, 8192);
    c.bos_token_id = 2;
    c.eos_token_ids = {1};
  } else if (name == "tiny-gemma3") {
    // 6 layers, so both kinds appear (layers 0-4 local, window 64; layer 5 global); head_dim 48 x 4 != 128.
    c = Gemma3(2048, 128, 384, 6, 4, 2, 48, 64, 4096);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
  } else if (name == "gemma-3-270m") {
    // google/gemma-3-270m: 268,098,176 parameters.
    c = Gemma3(262144, 640, 2048, 18, 4, 1, 256, 512, 32768);
    c.bos_token_id = 2;
    c.eos_token_ids = {1};
    c.torch_dtype = "bfloat16";
  } else if (name == "gemma-3-1b") {
    // google/gemma-3-1b-pt: 999,885,952 parameters.
    c = Gemma3(262144, 1152, 6912, 26, 4, 1, 256, 512, 32768);
    c.bos_token_id = 2;
    c.eos_token_ids = {1};
    c.torch_dtype = "bfloat16";
  } else if (name == "tiny-phi3") {
    // GQA (Phi-3-mini has none, Phi-3-medium has) so the fused rows split unevenly, and LongRoPE with a short
    // pre-trained context of 512, so a long enough sequence switches to the long factors.
    c = Phi3(2048, 128, 384, 2, 4, 2, 256, 4096);
    c.rope_scaling.type = RopeScaling::Type::kLongRope;
    c.rope_scaling.original_max_position_embeddings = 512;
    // Short decimals (1, 1.05, 1.1, ...), which a GGUF file's float32 factors read back exactly.
    for (int64_t i = 0; i < c.head_dim / 2; ++i) {
      c.rope_scaling.short_factor.push_back(static_cast<double>(100 + 5 * i) / 100.0);
      c.rope_scaling.long_factor.push_back(static_cast<double>(2 + i) / 2.0);
    }
    c.bos_token_id = 1;
    c.eos_token_ids = {2};
  } else if (name == "phi-3-mini") {
    // microsoft/Phi-3-mini-4k-instruct: 3,821,079,552 parameters, a 2047-token window.
    c = Phi3(32064, 3072, 8192, 32, 32, 32, 2047, 4096);
    c.bos_token_id = 1;
    c.eos_token_ids = {32000};
    c.torch_dtype = "bfloat16";
  } else if (name == "tiny-gptneox") {
    // head_dim 32, of which RoPE rotates 8.
    c = GptNeoX(2048, 128, 512, 2, 4, 2048);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
  } else if (name == "pythia-160m") {
    // EleutherAI/pythia-160m: 162,322,944 parameters.
    c = GptNeoX(50304, 768, 3072, 12, 12, 2048);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
    c.torch_dtype = "float16";
  } else if (name == "opt-350m") {
    // facebook/opt-350m: 331,196,416 parameters; norms after each residual add, no final norm, 512-wide
    // embeddings projected to the 1,024-wide blocks and back.
    c = Opt(50272, 1024, 4096, 24, 16, 2048);
    c.norm_after_residual = true;
    c.norms.final = false;
    c.word_embed_proj_dim = 512;
    c.bos_token_id = 2;
    c.eos_token_ids = {2};
    c.torch_dtype = "float16";
  } else if (name == "tiny-phi") {
    // head_dim 32, of which RoPE rotates 16.
    c = Phi(2048, 128, 512, 2, 4, 0.5);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
  } else if (name == "phi-1.5") {
    // microsoft/phi-1_5: 1,418,270,720 parameters.
    c = Phi(51200, 2048, 8192, 24, 32, 0.5);
    c.bos_token_id = 50256;
    c.eos_token_ids = {50256};
    c.torch_dtype = "float16";
  } else if (name == "phi-2") {
    // microsoft/phi-2: 2,779,683,840 parameters.
    c = Phi(51200, 2560, 10240, 32, 32, 0.4);
    c.bos_token_id = 50256;
    c.eos_token_ids = {50256};
    c.torch_dtype = "float16";
  } else if (name == "tiny-gpt2") {
    // A 256-position table, so a long enough prompt reaches its end.
    c = Gpt2(2048, 128, 2, 4, 256, MlpActivation::kGeluTanh);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
  } else if (name == "gpt2") {
    // openai-community/gpt2: 124,439,808 parameters.
    c = Gpt2(50257, 768, 12, 12, 1024, MlpActivation::kGeluTanh);
    c.bos_token_id = 50256;
    c.eos_token_ids = {50256};
  } else if (name == "cerebras-gpt-111m") {
    // cerebras/Cerebras-GPT-111M: 111,050,496 parameters, exact GELU, 2,048 positions.
    c = Gpt2(50257, 768, 10, 12, 2048, MlpActivation::kGelu);
    c.bos_token_id = 50256;
    c.eos_token_ids = {50256};
  } else if (name == "tiny-opt") {
    c = Opt(2048, 128, 512, 2, 4, 2048);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
  } else if (name == "opt-125m") {
    // facebook/opt-125m: 125,239,296 parameters.
    c = Opt(50272, 768, 3072, 12, 12, 2048);
    c.bos_token_id = 2;
    c.eos_token_ids = {2};
    c.torch_dtype = "float16";
  } else if (name == "smollm2-135m") {
    c = Llama(49152, 576, 1536, 30, 9, 3, 100000.0, 1e-5, true, 8192);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
    c.torch_dtype = "bfloat16";
  } else if (name == "smollm2-360m") {
    c = Llama(49152, 960, 2560, 32, 15, 5, 100000.0, 1e-5, true, 8192);
    c.bos_token_id = 0;
    c.eos_token_ids = {0};
    c.torch_dtype = "bfloat16";
  } else if (name == "qwen2.5-0.5b") {
    c = Llama(151936, 896, 4864, 24, 14, 2, 1000000.0, 1e-6, true, 32768);
    c.architecture = "Qwen2ForCausalLM";
    c.model_type = "qwen2";
    c.qkv_bias = true;
    c.bos_token_id = 151643;
    c.eos_token_ids = {151643};
    c.torch_dtype = "bfloat16";
  } else if (name == "tinyllama-1.1b") {
    c = Llama(32000, 2048, 5632, 22, 32, 4, 10000.0, 1e-5, false, 2048);
    c.bos_token_id = 1;
    c.eos_token_ids = {2};
    c.torch_dtype = "bfloat16";
  } else {
    std::string names;
    for (const std::string& n : PresetNames()) names += (names.empty() ? "" : ", ") + n;
    return absl::NotFoundError(StrCat("unknown preset '", name, "' (presets: ", names, ")"));
  }
  return c;
}

const char* ProjectionName(Projection p) {
  switch (p) {
    case Projection::kQ:
      return "q_proj";
    case Projection::kK:
      return "k_proj";
    case Projection::kV:
      return "v_proj";
    case Projection::kO:
      return "o_proj";
    case Projection::kGate:
      return "gate_proj";
    case Projection::kUp:
      return "up_proj";
    case Projection::kDown:
      return "down_proj";
    case Projection::kQkv:
      return "qkv_proj";
    case Projection::kGateUp:
      return "gate_up_proj";
  }
  return "?";
}

std::optional<Projection> ProjectionFromName(std::string_view name) {
  for (Projection p : kAllProjections) {
    if (name == ProjectionName(p)) return p;
  }
  return std::nullopt;
}

std::vector<Projection> ModelProjections(const ModelConfig& config) {
  std::vector<Projection> out;
  for (Projection p : kAllProjections) {
    if (HasProjection(config, p)) out.push_back(p);
  }
  return out;
}

bool HasProjection(const ModelConfig& config, Projection p) {
  switch (p) {
    case Projection::kQ:
    case Projection::kK:
    case Projection::kV:
      return !config.fused.qkv;
    case Projection::kQkv:
      return config.fused.qkv;
    case Projection::kGate:
      return config.gated_mlp && !config.fused.gate_up;
    case Projection::kUp:
      return !config.fused.gate_up;
    case Projection::kGateUp:
      return config.fused.gate_up;
    case Projection::kO:
    case Projection::kDown:
      return true;
  }
  return false;
}

std::optional<Projection> ProjectionIn(const ModelConfig& config, Projection p) {
  if (HasProjection(config, p)) return p;
  if (p == Projection::kQ || p == Projection::kK || p == Projection::kV) return Projection::kQkv;
  if ((p == Projection::kGate || p == Projection::kUp) && config.fused.gate_up) return Projection::kGateUp;
  return std::nullopt;
}

ProjectionFeatures FeaturesOf(const ModelConfig& c, Projection p) {
  const int64_t h = c.hidden_size, i = c.intermediate_size;
  switch (p) {
    case Projection::kQ:
      return {h, c.q_dim()};
    case Projection::kK:
    case Projection::kV:
      return {h, c.kv_dim()};
    case Projection::kQkv:
      return {h, c.q_dim() + 2 * c.kv_dim()};
    case Projection::kO:
      return {c.q_dim(), h};
    case Projection::kGate:
    case Projection::kUp:
      return {h, i};
    case Projection::kGateUp:
      return {h, 2 * i};
    case Projection::kDown:
      return {i, h};
  }
  return {};
}

int64_t LayerMatrixParameters(const ModelConfig& config) {
  int64_t total = 0;
  for (Projection p : ModelProjections(config)) {
    const ProjectionFeatures f = FeaturesOf(config, p);
    total += f.in * f.out;
  }
  return total;
}

namespace {

std::string_view LastPart(std::string_view path) {
  const size_t dot = path.rfind('.');
  return dot == std::string_view::npos ? path : path.substr(dot + 1);
}

}  // namespace

std::string LayerPrefix(const ModelConfig& config, int64_t layer) {
  return StrCat(families::ModuleNamesOf(config.architecture).layers, ".", layer, ".");
}

std::string ProjectionPath(const ModelConfig& config, Projection p) {
  return std::string(families::ModuleNamesOf(config.architecture).projections[static_cast<size_t>(p)]);
}

std::string ModuleName(const ModelConfig& config, Projection p) {
  return std::string(LastPart(families::ModuleNamesOf(config.architecture).projections[static_cast<size_t>(p)]));
}

bool StoresTransposed(const ModelConfig& config) { return families::ModuleNamesOf(config.architecture).conv1d; }

std::string TargetModuleName(const ModelConfig& config, Projection p) {
  const std::string name = ModuleName(config, p);
  for (Projection other : ModelProjections(config)) {
    if (other != p && ModuleName(config, other) == name) return ProjectionPath(config, p);  // GPT-2's two c_proj
  }
  return name;
}

std::vector<Projection> ProjectionsOfModule(const ModelConfig& config, std::string_view name) {
  std::vector<Projection> out;
  for (Projection p : ModelProjections(config)) {
    const std::string path = ProjectionPath(config, p);
    // PEFT's rule: a key names every module whose full name is it or ends with "." + it.
    const bool match = path == name || path.ends_with(StrCat(".", name)) || name.ends_with(StrCat(".", path));
    if (match) out.push_back(p);
  }
  if (out.empty()) {
    if (const std::optional<Projection> p = ProjectionFromName(LastPart(name))) out.push_back(*p);
  }
  return out;
}

std::optional<Projection> ProjectionOfAnyModule(std::string_view name) {
  if (const std::optional<Projection> p = ProjectionFromName(name)) return p;
  std::optional<Projection> found;
  for (const families::FamilySpec& f : families::Families()) {
    if (f.names == nullptr) continue;
    for (Projection p : kAllProjections) {
      const std::string_view path = f.names->projections[static_cast<size_t>(p)];
      if (path.empty() || (path != name && LastPart(path) != name)) continue;
      if (found && *found != p) return std::nullopt;  // the name means different projections in two families
      found = p;
    }
  }
  return found;
}

}  // namespace seedling::model
