// LlamaForCausalLM and MistralForCausalLM: the default block (pre-norms, SwiGLU, no q/k norm).

#include "base/status.h"
#include "model/families/family.h"

namespace seedling::model::families {
namespace {

using internal::GetBool;
using internal::GetInt;
using internal::Json;

absl::Status ReadLlama(const Json& j, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(const bool attention_bias, GetBool(j, "attention_bias", false));
  c.qkv_bias = c.o_bias = attention_bias;
  SEEDLING_ASSIGN_OR_RETURN(c.mlp_bias, GetBool(j, "mlp_bias", false));
  return absl::OkStatus();
}

void WriteLlama(const ModelConfig& c, Json& j) {
  j["attention_bias"] = c.qkv_bias;
  j["mlp_bias"] = c.mlp_bias;
}

// Mistral windows every layer whenever sliding_window is set.
absl::Status ReadMistral(const Json& j, ModelConfig& c) {
  auto sw = j.find("sliding_window");
  if (sw != j.end() && !sw->is_null()) {
    SEEDLING_ASSIGN_OR_RETURN(const int64_t window, GetInt(j, "sliding_window", std::nullopt));
    c.sliding_window = window;
  }
  return absl::OkStatus();
}

void WriteMistral(const ModelConfig& c, Json& j) {
  if (c.sliding_window) j["sliding_window"] = *c.sliding_window;
}

}  // namespace

const FamilySpec& Llama() {
  static const FamilySpec kSpec{"LlamaForCausalLM", "llama", "llama", ReadLlama, WriteLlama};
  return kSpec;
}

const FamilySpec& Mistral() {
  static const FamilySpec kSpec{"MistralForCausalLM", "mistral", "llama", ReadMistral, WriteMistral};
  return kSpec;
}

}  // namespace seedling::model::families
