// GPT2LMHeadModel (GPT-2, Cerebras-GPT): learned absolute positions (wpe) added to the token embeddings,
// LayerNorms with biases before attention and the MLP, q, k and v fused as c_attn (rows q | k | v), biases on
// every projection, a plain MLP c_fc → GELU (gelu_new; Cerebras-GPT's exact gelu) → c_proj, the LM head tied to
// wte. The projections are Conv1D modules, stored (in, out) and transposed at load. config.json names the sizes
// GPT-2's way (n_embd, n_layer, n_head, n_positions, n_inner); they are copied onto the shared names first.

#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"

namespace seedling::model::families {
namespace {

using internal::FieldError;
using internal::GetBool;
using internal::GetDouble;
using internal::GetInt;
using internal::Json;

absl::Status PrepareGpt2(Json& j) {
  for (const auto& [shared, own] :
       {std::pair{"hidden_size", "n_embd"}, std::pair{"num_hidden_layers", "n_layer"},
        std::pair{"num_attention_heads", "n_head"}, std::pair{"max_position_embeddings", "n_positions"}}) {
    if (!j.contains(shared) && j.contains(own)) j[shared] = j[own];
  }
  if (!j.contains("intermediate_size")) {
    // n_inner null (or absent) means 4 × n_embd.
    SEEDLING_ASSIGN_OR_RETURN(const int64_t hidden, GetInt(j, "hidden_size", std::nullopt));
    SEEDLING_ASSIGN_OR_RETURN(const int64_t inner, GetInt(j, "n_inner", 4 * hidden));
    j["intermediate_size"] = inner;
  }
  if (!j.contains("max_position_embeddings")) j["max_position_embeddings"] = 1024;  // GPT2Config's n_positions
  return absl::OkStatus();
}

absl::Status ReadGpt2(const Json& j, ModelConfig& c) {
  c.norm_kind = NormKind::kLayerNorm;
  c.gated_mlp = false;
  c.positions = PositionKind::kLearned;
  c.fused = {.qkv = true};
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  SEEDLING_ASSIGN_OR_RETURN(c.mlp_activation,
                            internal::ParseActivation(j, "activation_function", MlpActivation::kGeluTanh));
  SEEDLING_ASSIGN_OR_RETURN(c.rms_norm_eps, GetDouble(j, "layer_norm_epsilon", 1e-5));
  SEEDLING_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(j, "tie_word_embeddings", true));  // GPT-2 ties
  // scale_attn_weights false: scores q · k without 1 / sqrt(head_dim).
  SEEDLING_ASSIGN_OR_RETURN(const bool scaled, GetBool(j, "scale_attn_weights", true));
  c.attention_scale = scaled ? 0.0 : 1.0;
  for (const char* unsupported : {"scale_attn_by_inverse_layer_idx", "add_cross_attention"}) {
    SEEDLING_ASSIGN_OR_RETURN(const bool on, GetBool(j, unsupported, false));
    if (on) return FieldError(unsupported, "is true, which this block does not compute");
  }
  return absl::OkStatus();
}

void WriteGpt2(const ModelConfig& c, Json& j) {
  j["activation_function"] = internal::GeluNewActivationName(c.mlp_activation);
  j.erase("hidden_act");
  j["n_embd"] = c.hidden_size;
  j["n_layer"] = c.num_hidden_layers;
  j["n_head"] = c.num_attention_heads;
  j["n_positions"] = c.max_position_embeddings;
  j["n_inner"] = c.intermediate_size;
  j["layer_norm_epsilon"] = c.rms_norm_eps;
  j["scale_attn_weights"] = c.attention_scale == 0.0;
}

const ModuleNames kNames{
    .embed = "transformer.wte.weight",
    .positions = "transformer.wpe.weight",
    .layers = "transformer.h",
    .final_norm = "transformer.ln_f",
    .lm_head = "lm_head.weight",
    // q, k, v, gate and gate_up do not exist in this block.
    .projections = {"", "", "", "attn.c_proj", "", "mlp.c_fc", "mlp.c_proj", "attn.c_attn", ""},
    .input_norm = "ln_1",
    .pre_mlp_norm = "ln_2",
    // The causal mask and its fill value, kept as buffers by older checkpoints.
    .buffers = {"attn.bias", "attn.masked_bias"},
    // The original GPT-2 checkpoints were saved from GPT2Model: "h.0.attn.c_attn.weight", "wte.weight".
    .optional_prefix = "transformer.",
    .conv1d = true,
};

}  // namespace

const FamilySpec& Gpt2() {
  static const FamilySpec kSpec{
      "GPT2LMHeadModel", "gpt2", "gpt2", ReadGpt2, WriteGpt2, TokenizerStyle::kByteLevelBpe, &kNames, PrepareGpt2};
  return kSpec;
}

}  // namespace seedling::model::families
