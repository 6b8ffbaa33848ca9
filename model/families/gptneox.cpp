// GPTNeoXForCausalLM (Pythia, GPT-NeoX): LayerNorms with biases, attention and MLP side by side on the block's
// input (use_parallel_residual), RoPE on the first rotary_pct of each head, q, k and v fused as query_key_value
// with the rows of each head together (q_h | k_h | v_h), biases on every projection (attention_bias), a plain
// MLP dense_h_to_4h → GELU → dense_4h_to_h, and an untied LM head named embed_out.

#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"

namespace seedling::model::families {
namespace {

using internal::FieldError;
using internal::GetBool;
using internal::GetDouble;
using internal::Json;

absl::Status ReadGptNeoX(const Json& j, ModelConfig& c) {
  c.norm_kind = NormKind::kLayerNorm;
  c.gated_mlp = false;
  c.mlp_bias = true;
  c.fused = {.qkv = true, .qkv_per_head = true};
  SEEDLING_ASSIGN_OR_RETURN(c.mlp_activation, internal::ParseActivation(j, "hidden_act", MlpActivation::kGelu));
  SEEDLING_ASSIGN_OR_RETURN(c.rms_norm_eps, GetDouble(j, "layer_norm_eps", 1e-5));
  // rotary_pct and rotary_emb_base; later configs name them as other families do.
  SEEDLING_ASSIGN_OR_RETURN(const double rotary, GetDouble(j, "partial_rotary_factor", 0.25));
  SEEDLING_ASSIGN_OR_RETURN(c.partial_rotary_factor, GetDouble(j, "rotary_pct", rotary));
  // (A GGUF file's config starts from an empty object, before the head size is known.)
  const auto rotated = static_cast<int64_t>(static_cast<double>(c.head_dim) * c.partial_rotary_factor);
  const bool even = c.head_dim == 0 || (rotated >= 2 && rotated % 2 == 0);
  if (!(c.partial_rotary_factor > 0 && c.partial_rotary_factor <= 1) || !even) {
    return FieldError(j.contains("rotary_pct") ? "rotary_pct" : "partial_rotary_factor",
                      StrCat("is ", c.partial_rotary_factor, ": it must rotate an even number of each head's ",
                             c.head_dim, " dimensions, at least 2"));
  }
  SEEDLING_ASSIGN_OR_RETURN(c.rope_theta, GetDouble(j, "rotary_emb_base", c.rope_theta));
  SEEDLING_ASSIGN_OR_RETURN(c.parallel_residual, GetBool(j, "use_parallel_residual", true));
  SEEDLING_ASSIGN_OR_RETURN(const bool attention_bias, GetBool(j, "attention_bias", true));
  c.qkv_bias = c.o_bias = attention_bias;
  return absl::OkStatus();
}

void WriteGptNeoX(const ModelConfig& c, Json& j) {
  j["hidden_act"] = internal::ActivationName(c.mlp_activation);
  j["layer_norm_eps"] = c.rms_norm_eps;
  j["rotary_pct"] = c.partial_rotary_factor;
  j["rotary_emb_base"] = c.rope_theta;
  j["use_parallel_residual"] = c.parallel_residual;
  j["attention_bias"] = c.qkv_bias;
}

const ModuleNames kNames{
    .embed = "gpt_neox.embed_in.weight",
    .layers = "gpt_neox.layers",
    .final_norm = "gpt_neox.final_layer_norm",
    .lm_head = "embed_out.weight",
    // q, k, v, gate and gate_up do not exist in this block.
    .projections = {"", "", "", "attention.dense", "", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                    "attention.query_key_value", ""},
    // The causal mask and its fill value, kept as buffers by checkpoints of transformers before 4.3x.
    .buffers = {"attention.bias", "attention.masked_bias"},
};

}  // namespace

const FamilySpec& GptNeoX() {
  static const FamilySpec kSpec{"GPTNeoXForCausalLM",          "gpt_neox", "gptneox", ReadGptNeoX, WriteGptNeoX,
                                TokenizerStyle::kByteLevelBpe, &kNames};
  return kSpec;
}

}  // namespace seedling::model::families
