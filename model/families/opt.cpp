// OPTForCausalLM (OPT): learned positions from a table whose first two rows are unused (position t reads row
// t + 2), LayerNorms with biases before attention (self_attn_layer_norm) and the MLP (final_layer_norm, per
// layer), q, k, v and out_proj with biases (enable_bias), a plain MLP fc1 → ReLU → fc2, a final LayerNorm, and
// the LM head tied to the embeddings. The post-norm block (do_layer_norm_before false) and an embedding narrower
// than the block (word_embed_proj_dim != hidden_size, with project_in / project_out), which OPT-350m has, are
// refused by name; every other OPT model has neither.

#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"

namespace seedling::model::families {
namespace {

using internal::FieldError;
using internal::GetBool;
using internal::GetInt;
using internal::Json;

absl::Status PrepareOpt(Json& j) {
  if (!j.contains("intermediate_size") && j.contains("ffn_dim")) j["intermediate_size"] = j["ffn_dim"];
  return absl::OkStatus();
}

absl::Status ReadOpt(const Json& j, ModelConfig& c) {
  c.norm_kind = NormKind::kLayerNorm;
  c.gated_mlp = false;
  c.positions = PositionKind::kLearned;
  c.position_offset = 2;  // OPTLearnedPositionalEmbedding's offset
  SEEDLING_ASSIGN_OR_RETURN(c.mlp_activation,
                            internal::ParseActivation(j, "activation_function", MlpActivation::kRelu));
  SEEDLING_ASSIGN_OR_RETURN(const bool bias, GetBool(j, "enable_bias", true));
  c.qkv_bias = c.o_bias = c.mlp_bias = bias;
  c.rms_norm_eps = 1e-5;  // nn.LayerNorm's default; OPT's config has no field for it
  SEEDLING_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(j, "tie_word_embeddings", true));
  SEEDLING_ASSIGN_OR_RETURN(const bool pre_norm, GetBool(j, "do_layer_norm_before", true));
  if (!pre_norm) {
    return FieldError("do_layer_norm_before",
                      "is false (norms after each residual add, as OPT-350m has), which this block does not compute");
  }
  SEEDLING_ASSIGN_OR_RETURN(const bool affine, GetBool(j, "layer_norm_elementwise_affine", true));
  if (!affine)
    return FieldError("layer_norm_elementwise_affine", "is false: LayerNorms without weights are not supported");
  SEEDLING_ASSIGN_OR_RETURN(const bool removed, GetBool(j, "_remove_final_layer_norm", false));
  if (removed)
    return FieldError("_remove_final_layer_norm", "is true: a model without its final LayerNorm is not supported");
  if (c.hidden_size > 0) {  // (a GGUF file's config starts from an empty object)
    SEEDLING_ASSIGN_OR_RETURN(const int64_t embed_dim, GetInt(j, "word_embed_proj_dim", c.hidden_size));
    if (embed_dim != c.hidden_size) {
      return FieldError("word_embed_proj_dim", StrCat("is ", embed_dim, ", not hidden_size ", c.hidden_size,
                                                      ": embeddings projected in and out are not supported"));
    }
  }
  return absl::OkStatus();
}

void WriteOpt(const ModelConfig& c, Json& j) {
  j["activation_function"] = internal::ActivationName(c.mlp_activation);
  j.erase("hidden_act");
  j["ffn_dim"] = c.intermediate_size;
  j["word_embed_proj_dim"] = c.hidden_size;
  j["do_layer_norm_before"] = true;
  j["enable_bias"] = c.qkv_bias;
}

const ModuleNames kNames{
    .embed = "model.decoder.embed_tokens.weight",
    .positions = "model.decoder.embed_positions.weight",
    .layers = "model.decoder.layers",
    .final_norm = "model.decoder.final_layer_norm",
    .lm_head = "lm_head.weight",
    .projections = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "", "fc1", "fc2",
                    "", ""},
    .input_norm = "self_attn_layer_norm",
    .pre_mlp_norm = "final_layer_norm",
    // Checkpoints saved from OPTModel (the original facebook/opt files) name tensors "decoder.…".
    .optional_prefix = "model.",
};

}  // namespace

const FamilySpec& Opt() {
  static const FamilySpec kSpec{"OPTForCausalLM", "opt",     "", ReadOpt, WriteOpt, TokenizerStyle::kByteLevelBpe,
                                &kNames,          PrepareOpt};
  return kSpec;
}

}  // namespace seedling::model::families
