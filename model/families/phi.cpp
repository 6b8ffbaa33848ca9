// PhiForCausalLM (Phi-1, Phi-1.5, Phi-2): one LayerNorm (input_layernorm) feeds attention and the MLP side by
// side, x + attn(n(x)) + mlp(n(x)); RoPE on the first partial_rotary_factor of each head; q_proj, k_proj,
// v_proj and the output projection `dense` with biases; a plain MLP fc1 → GELU (gelu_new) → fc2 with biases;
// final_layernorm; an untied LM head with a bias of its own (lm_head.bias).
// qk_layernorm (LayerNorms on q and k, which no published checkpoint sets) is refused by name, as is the
// remote-code layout of the first releases (model_type "phi-msft": transformer.h.N.mixer.Wqkv ...).

#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"

namespace seedling::model::families {
namespace {

using internal::FieldError;
using internal::GetBool;
using internal::GetDouble;
using internal::Json;

absl::Status PreparePhi(Json& j) {
  auto type = j.find("model_type");
  if (type != j.end() && type->is_string() && type->get<std::string>() == "phi-msft") {
    return FieldError("model_type",
                      "is \"phi-msft\", the remote-code layout of Phi's first releases; load a checkpoint in "
                      "transformers' PhiForCausalLM layout (model_type \"phi\"), as the current Hub revisions are");
  }
  return absl::OkStatus();
}

absl::Status ReadPhi(const Json& j, ModelConfig& c) {
  c.norm_kind = NormKind::kLayerNorm;
  c.norms = {.pre_attention = true, .attention_output = false, .pre_mlp = false, .mlp_output = false};
  c.parallel_residual = true;
  c.gated_mlp = false;
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  c.lm_head_bias = true;
  SEEDLING_ASSIGN_OR_RETURN(c.mlp_activation, internal::ParseActivation(j, "hidden_act", MlpActivation::kGeluTanh));
  SEEDLING_ASSIGN_OR_RETURN(c.rms_norm_eps, GetDouble(j, "layer_norm_eps", 1e-5));
  // Validate() names the field when the share does not rotate an even number of dimensions.
  SEEDLING_ASSIGN_OR_RETURN(c.partial_rotary_factor, GetDouble(j, "partial_rotary_factor", 0.5));
  SEEDLING_ASSIGN_OR_RETURN(const bool qk_layernorm, GetBool(j, "qk_layernorm", false));
  if (qk_layernorm) return FieldError("qk_layernorm", "is true: LayerNorms on q and k are not supported");
  return absl::OkStatus();
}

void WritePhi(const ModelConfig& c, Json& j) {
  j["hidden_act"] = internal::GeluNewActivationName(c.mlp_activation);
  j["layer_norm_eps"] = c.rms_norm_eps;
  j["partial_rotary_factor"] = c.partial_rotary_factor;
  j["qk_layernorm"] = false;
}

const ModuleNames kNames{
    .final_norm = "model.final_layernorm",
    // gate and the fused projections do not exist in this block.
    .projections = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "", "mlp.fc1",
                    "mlp.fc2", "", ""},
};

}  // namespace

const FamilySpec& Phi() {
  static const FamilySpec kSpec{"PhiForCausalLM", "phi",     "phi2", ReadPhi, WritePhi, TokenizerStyle::kByteLevelBpe,
                                &kNames,          PreparePhi};
  return kSpec;
}

}  // namespace seedling::model::families
