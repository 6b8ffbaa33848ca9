// Phi3ForCausalLM (Phi-3, Phi-3.5): the Llama block (pre-RMSNorms, SwiGLU, no biases) with q, k and v stored
// as one qkv_proj (rows q | k | v) and gate and up as one gate_up_proj (rows gate | up), every layer windowed
// when sliding_window is set, and LongRoPE ("longrope", early configs "su") for the long-context models
// (read with rope_scaling, model/config.cpp). partial_rotary_factor below 1 (Phi-4-mini) rotates the first
// share of each head, its LongRoPE factors one per rotated pair.

#include "base/status.h"
#include "model/families/family.h"

namespace seedling::model::families {
namespace {

using internal::GetDouble;
using internal::Json;

absl::Status ReadPhi3(const Json& j, ModelConfig& c) {
  c.fused = {.qkv = true, .gate_up = true};
  // Validate() names the field when the share does not rotate an even number of dimensions.
  SEEDLING_ASSIGN_OR_RETURN(c.partial_rotary_factor, GetDouble(j, "partial_rotary_factor", 1.0));
  return Mistral().read(j, c);  // every layer windowed, as Mistral's
}

void WritePhi3(const ModelConfig& c, Json& j) {
  Mistral().write(c, j);
  if (!c.sliding_window) j["sliding_window"] = nullptr;
  if (c.partial_rotary_factor != 1.0) j["partial_rotary_factor"] = c.partial_rotary_factor;
  if (c.rope_scaling.type != RopeScaling::Type::kLongRope) {
    j["original_max_position_embeddings"] = c.max_position_embeddings;
  }
}

}  // namespace

const FamilySpec& Phi3() {
  static const FamilySpec kSpec{"Phi3ForCausalLM", "phi3",    "phi3",
                                ReadPhi3,          WritePhi3, TokenizerStyle::kSentencePieceBpeWithPrefix};
  return kSpec;
}

}  // namespace seedling::model::families
