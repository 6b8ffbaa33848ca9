// Gemma3ForCausalLM (Gemma 3 text models: gemma-3-270m, gemma-3-1b; model_type gemma3_text). The block:
// GeGLU (gelu_pytorch_tanh), RMSNorms that scale by (1 + w) before and after attention and the MLP, per-head
// q/k norms, embeddings scaled by sqrt(hidden_size), queries scaled by query_pre_attn_scalar^-0.5, and local
// layers (a sliding window, RoPE base rope_local_base_freq, no scaling) with every Nth layer global (RoPE
// base rope_theta with rope_scaling). Gemma 2's logit soft-capping is refused by name.

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

absl::Status RefuseSoftCapping(const Json& j) {
  for (const char* key : {"attn_logit_softcapping", "final_logit_softcapping"}) {
    auto it = j.find(key);
    if (it != j.end() && !it->is_null()) return FieldError(key, "is set; logit soft-capping is not supported");
  }
  return absl::OkStatus();
}

absl::Status ReadGemma3(const Json& j, ModelConfig& c) {
  SEEDLING_RETURN_IF_ERROR(RefuseSoftCapping(j));
  SEEDLING_ASSIGN_OR_RETURN(const bool attention_bias, GetBool(j, "attention_bias", false));
  c.qkv_bias = c.o_bias = attention_bias;
  c.norms = {.pre_attention = true, .attention_output = true, .pre_mlp = true, .mlp_output = true};
  c.qk_norm = QkNorm::kPerHead;
  c.mlp_activation = MlpActivation::kGeluTanh;
  SEEDLING_RETURN_IF_ERROR(CheckActivation(j, "hidden_activation", c.mlp_activation));
  c.norm_weight_offset = 1.0;
  c.scale_embeddings = true;
  SEEDLING_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(j, "tie_word_embeddings", true));
  SEEDLING_ASSIGN_OR_RETURN(const double scalar, GetDouble(j, "query_pre_attn_scalar", 256.0));
  if (!(scalar > 0)) return FieldError("query_pre_attn_scalar", "must be positive");
  c.attention_scale = 1.0 / std::sqrt(scalar);
  SEEDLING_ASSIGN_OR_RETURN(c.rope_local_theta, GetDouble(j, "rope_local_base_freq", 10000.0));
  SEEDLING_ASSIGN_OR_RETURN(const int64_t window, GetInt(j, "sliding_window", 4096));
  c.sliding_window = window;
  auto types = j.find("layer_types");
  if (types != j.end() && !types->is_null()) {
    SEEDLING_ASSIGN_OR_RETURN(c.sliding_window_pattern, PatternFromLayerTypes(*types, c.num_hidden_layers));
  } else {
    SEEDLING_ASSIGN_OR_RETURN(c.sliding_window_pattern, GetInt(j, "sliding_window_pattern", 6));
  }
  return absl::OkStatus();
}

void WriteGemma3(const ModelConfig& c, Json& j) {
  j["hidden_activation"] = "gelu_pytorch_tanh";
  j["attention_bias"] = c.qkv_bias;
  j["attn_logit_softcapping"] = nullptr;
  j["final_logit_softcapping"] = nullptr;
  j["query_pre_attn_scalar"] = 1.0 / (c.attention_scale * c.attention_scale);
  j["rope_local_base_freq"] = c.rope_local_theta;
  if (c.sliding_window) j["sliding_window"] = *c.sliding_window;
  Json types = Json::array();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    types.push_back(c.LayerIsLocal(l) ? "sliding_attention" : "full_attention");
  }
  j["layer_types"] = types;
}

}  // namespace

const FamilySpec& Gemma3() {
  static const FamilySpec kSpec{"Gemma3ForCausalLM", "gemma3_text", "gemma3", ReadGemma3, WriteGemma3};
  return kSpec;
}

}  // namespace seedling::model::families
