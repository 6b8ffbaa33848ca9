// OPTForCausalLM (OPT): learned positions from a table whose first two rows are unused (position t reads row
// t + 2), LayerNorms with biases before attention (self_attn_layer_norm) and the MLP (final_layer_norm, per
// layer), q, k, v and out_proj with biases (enable_bias), a plain MLP fc1 → ReLU → fc2, a final LayerNorm, and
// the LM head tied to the embeddings. OPT-350m normalizes after each residual add instead (do_layer_norm_before
// false, which also drops the final LayerNorm, as _remove_final_layer_norm does) and has embeddings narrower than
// its blocks (word_embed_proj_dim, with project_in after the embedding and project_out before the LM head).

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
  c.norm_after_residual = !pre_norm;
  SEEDLING_ASSIGN_OR_RETURN(const bool affine, GetBool(j, "layer_norm_elementwise_affine", true));
  if (!affine)
    return FieldError("layer_norm_elementwise_affine", "is false: LayerNorms without weights are not supported");
  SEEDLING_ASSIGN_OR_RETURN(const bool removed, GetBool(j, "_remove_final_layer_norm", false));
  c.norms.final = pre_norm && !removed;  // OPTDecoder keeps final_layer_norm only for a pre-norm block
  SEEDLING_ASSIGN_OR_RETURN(const int64_t embed_dim, GetInt(j, "word_embed_proj_dim", c.hidden_size));
  if (embed_dim <= 0) return FieldError("word_embed_proj_dim", StrCat("must be positive, got ", embed_dim));
  c.word_embed_proj_dim = embed_dim == c.hidden_size ? 0 : embed_dim;
  return absl::OkStatus();
}

void WriteOpt(const ModelConfig& c, Json& j) {
  j["activation_function"] = internal::ActivationName(c.mlp_activation);
  j.erase("hidden_act");
  j["ffn_dim"] = c.intermediate_size;
  j["word_embed_proj_dim"] = c.embedding_dim();
  j["do_layer_norm_before"] = !c.norm_after_residual;
  // A pre-norm block without its final norm is what _remove_final_layer_norm describes.
  if (!c.norm_after_residual && !c.norms.final) j["_remove_final_layer_norm"] = true;
  j["enable_bias"] = c.qkv_bias;
}

const ModuleNames kNames{
    .embed = "model.decoder.embed_tokens.weight",
    .positions = "model.decoder.embed_positions.weight",
    .layers = "model.decoder.layers",
    .final_norm = "model.decoder.final_layer_norm",
    .lm_head = "lm_head.weight",
    .project_in = "model.decoder.project_in.weight",
    .project_out = "model.decoder.project_out.weight",
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
