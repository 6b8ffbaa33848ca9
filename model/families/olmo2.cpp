// Olmo2ForCausalLM (OLMo 2): the block normalizes the outputs of attention and of the MLP before each
// residual add, never its inputs (post_attention_layernorm, post_feedforward_layernorm; no
// input_layernorm), and RMS-normalizes the whole q and k projections (weights of q_dim and kv_dim) before
// RoPE. attention_bias gives q, k, v and o biases alike.

#include "base/status.h"
#include "model/families/family.h"

namespace seedling::model::families {
namespace {

using internal::GetBool;
using internal::Json;

absl::Status ReadOlmo2(const Json& j, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(const bool attention_bias, GetBool(j, "attention_bias", false));
  c.qkv_bias = c.o_bias = attention_bias;
  c.norms = {.pre_attention = false, .attention_output = true, .pre_mlp = false, .mlp_output = true};
  c.qk_norm = QkNorm::kPerProjection;
  return absl::OkStatus();
}

void WriteOlmo2(const ModelConfig& c, Json& j) { j["attention_bias"] = c.qkv_bias; }

}  // namespace

const FamilySpec& Olmo2() {
  static const FamilySpec kSpec{"Olmo2ForCausalLM", "olmo2", "olmo2", ReadOlmo2, WriteOlmo2};
  return kSpec;
}

}  // namespace seedling::model::families
