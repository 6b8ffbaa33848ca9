// Gemma2ForCausalLM (gemma-2-2b; model_type gemma2) and Gemma3ForCausalLM (Gemma 3 text models:
// gemma-3-270m, gemma-3-1b; model_type gemma3_text). The block both share: GeGLU (gelu_pytorch_tanh),
// RMSNorms that scale by (1 + w) before and after attention and the MLP, embeddings scaled by
// sqrt(hidden_size), queries scaled by query_pre_attn_scalar^-0.5, windowed local layers with every Nth layer
// global, and optional logit soft-capping of the attention scores and the final logits.
//   Gemma 2: local and global layers alternate (N = 2), one RoPE base, soft-capping on by default (50 and 30).
//   Gemma 3: per-head q/k norms, every 6th layer global, the local layers' own RoPE base
//            (rope_local_base_freq, no scaling), soft-capping off by default.

#include <cmath>
#include <string>

#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"

namespace seedling::model::families {
namespace {

using internal::CheckActivation;
using internal::FieldError;
using internal::GetBool;
using internal::GetDouble;
using internal::GetInt;
using internal::Json;

// The global layers' period from layer_types ("sliding_attention" / "full_attention" per layer): every Nth
// layer full, the others sliding, is what the block describes; any other layout is refused.
absl::StatusOr<int64_t> PatternFromLayerTypes(const Json& types, int64_t layers) {
  if (!types.is_array() || static_cast<int64_t>(types.size()) != layers) {
    return FieldError("layer_types", StrCat("must list one type per layer (", layers, ")"));
  }
  int64_t period = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const Json& t = types[static_cast<size_t>(l)];
    if (!t.is_string() || (t != "sliding_attention" && t != "full_attention")) {
      return FieldError("layer_types", StrCat("[", l, "] must be \"sliding_attention\" or \"full_attention\""));
    }
    if (t == "full_attention" && period == 0) period = l + 1;
  }
  if (period == 0) period = layers + 1;  // no global layer
  for (int64_t l = 0; l < layers; ++l) {
    const bool full = (l + 1) % period == 0;
    if (full != (types[static_cast<size_t>(l)] == "full_attention")) {
      return FieldError("layer_types", "must make every Nth layer full_attention and the others sliding_attention");
    }
  }
  return period;
}

// A soft-cap: absent gives the family's default, null none, else a positive number.
absl::StatusOr<double> GetSoftCap(const Json& j, const char* key, double family_default) {
  auto it = j.find(key);
  if (it == j.end()) return family_default;
  if (it->is_null()) return 0.0;
  SEEDLING_ASSIGN_OR_RETURN(const double cap, GetDouble(j, key, family_default));
  if (!(cap > 0) || !std::isfinite(cap)) return FieldError(key, "must be a positive number or null");
  return cap;
}

// What Gemma 2 and 3 share; `pattern` and the caps are the family's defaults.
absl::Status ReadGemmaBlock(const Json& j, ModelConfig& c, int64_t pattern, double attention_cap, double final_cap) {
  SEEDLING_ASSIGN_OR_RETURN(const bool attention_bias, GetBool(j, "attention_bias", false));
  c.qkv_bias = c.o_bias = attention_bias;
  c.norms = {.pre_attention = true, .attention_output = true, .pre_mlp = true, .mlp_output = true};
  c.mlp_activation = MlpActivation::kGeluTanh;
  SEEDLING_RETURN_IF_ERROR(CheckActivation(j, "hidden_activation", c.mlp_activation));
  c.norm_weight_offset = 1.0;
  c.scale_embeddings = true;
  SEEDLING_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(j, "tie_word_embeddings", true));
  SEEDLING_ASSIGN_OR_RETURN(const double scalar, GetDouble(j, "query_pre_attn_scalar", 256.0));
  if (!(scalar > 0)) return FieldError("query_pre_attn_scalar", "must be positive");
  c.attention_scale = 1.0 / std::sqrt(scalar);
  SEEDLING_ASSIGN_OR_RETURN(c.attention_softcap, GetSoftCap(j, "attn_logit_softcapping", attention_cap));
  SEEDLING_ASSIGN_OR_RETURN(c.final_logit_softcap, GetSoftCap(j, "final_logit_softcapping", final_cap));
  SEEDLING_ASSIGN_OR_RETURN(const int64_t window, GetInt(j, "sliding_window", 4096));
  c.sliding_window = window;
  auto types = j.find("layer_types");
  if (types != j.end() && !types->is_null()) {
    SEEDLING_ASSIGN_OR_RETURN(c.sliding_window_pattern, PatternFromLayerTypes(*types, c.num_hidden_layers));
  } else {
    SEEDLING_ASSIGN_OR_RETURN(c.sliding_window_pattern, GetInt(j, "sliding_window_pattern", pattern));
  }
  return absl::OkStatus();
}

// query_pre_attn_scalar from the query scale; a whole number (as every Gemma config gives) is written as one,
// not with the rounding 1 / scale² leaves.
double QueryPreAttnScalar(const ModelConfig& c) {
  const double scalar = 1.0 / (c.attention_scale * c.attention_scale);
  const double whole = std::round(scalar);
  return std::abs(scalar - whole) <= 1e-9 * scalar ? whole : scalar;
}

void WriteGemmaBlock(const ModelConfig& c, Json& j) {
  j["hidden_activation"] = "gelu_pytorch_tanh";
  j["attention_bias"] = c.qkv_bias;
  auto cap = [](double v) { return v > 0 ? Json(v) : Json(nullptr); };
  j["attn_logit_softcapping"] = cap(c.attention_softcap);
  j["final_logit_softcapping"] = cap(c.final_logit_softcap);
  j["query_pre_attn_scalar"] = QueryPreAttnScalar(c);
  if (c.sliding_window) j["sliding_window"] = *c.sliding_window;
  Json types = Json::array();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    types.push_back(c.LayerIsLocal(l) ? "sliding_attention" : "full_attention");
  }
  j["layer_types"] = types;
}

absl::Status ReadGemma2(const Json& j, ModelConfig& c) {
  return ReadGemmaBlock(j, c, /*pattern=*/2, /*attention_cap=*/50.0, /*final_cap=*/30.0);
}

absl::Status ReadGemma3(const Json& j, ModelConfig& c) {
  SEEDLING_RETURN_IF_ERROR(ReadGemmaBlock(j, c, /*pattern=*/6, /*attention_cap=*/0.0, /*final_cap=*/0.0));
  c.qk_norm = QkNorm::kPerHead;
  SEEDLING_ASSIGN_OR_RETURN(c.rope_local_theta, GetDouble(j, "rope_local_base_freq", 10000.0));
  return absl::OkStatus();
}

void WriteGemma3(const ModelConfig& c, Json& j) {
  WriteGemmaBlock(c, j);
  j["rope_local_base_freq"] = c.rope_local_theta;
}

}  // namespace

const FamilySpec& Gemma2() {
  static const FamilySpec kSpec{"Gemma2ForCausalLM", "gemma2",        "gemma2",
                                ReadGemma2,          WriteGemmaBlock, TokenizerStyle::kSentencePieceBpe};
  return kSpec;
}

const FamilySpec& Gemma3() {
  static const FamilySpec kSpec{"Gemma3ForCausalLM", "gemma3_text", "gemma3",
                                ReadGemma3,          WriteGemma3,   TokenizerStyle::kSentencePieceBpe};
  return kSpec;
}

}  // namespace seedling::model::families
