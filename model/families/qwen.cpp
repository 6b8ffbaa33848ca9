// Qwen2ForCausalLM (Qwen2, Qwen2.5) and Qwen3ForCausalLM.

#include "base/status.h"
#include "model/families/family.h"

namespace seedling::model::families {
namespace {

using internal::FieldError;
using internal::GetBool;
using internal::GetInt;
using internal::Json;

// Qwen2 hard-codes q/k/v biases and no o_proj bias; it windows every layer only with use_sliding_window.
absl::Status ReadQwen2(const Json& j, ModelConfig& c) {
  c.qkv_bias = true;
  SEEDLING_ASSIGN_OR_RETURN(const bool use_window, GetBool(j, "use_sliding_window", false));
  auto sw = j.find("sliding_window");
  if (use_window && sw != j.end() && !sw->is_null()) {
    SEEDLING_ASSIGN_OR_RETURN(const int64_t window, GetInt(j, "sliding_window", std::nullopt));
    c.sliding_window = window;
  }
  return absl::OkStatus();
}

void WriteQwen2(const ModelConfig& c, Json& j) {
  j["use_sliding_window"] = c.sliding_window.has_value();
  if (c.sliding_window) j["sliding_window"] = *c.sliding_window;
}

// Qwen3: RMSNorm over each head's q and k; attention_bias gives q, k, v and o the same bias setting.
absl::Status ReadQwen3(const Json& j, ModelConfig& c) {
  SEEDLING_ASSIGN_OR_RETURN(const bool attention_bias, GetBool(j, "attention_bias", false));
  c.qkv_bias = c.o_bias = attention_bias;
  c.qk_norm = QkNorm::kPerHead;
  // Qwen3 windows only the layers from max_window_layers on (its layer_types); no published Qwen3 uses it.
  SEEDLING_ASSIGN_OR_RETURN(const bool use_window, GetBool(j, "use_sliding_window", false));
  if (use_window)
    return FieldError("use_sliding_window", "is true; per-layer sliding windows (Qwen3) are not supported");
  return absl::OkStatus();
}

void WriteQwen3(const ModelConfig& c, Json& j) {
  j["attention_bias"] = c.qkv_bias;
  j["use_sliding_window"] = false;
}

}  // namespace

const FamilySpec& Qwen2() {
  static const FamilySpec kSpec{"Qwen2ForCausalLM", "qwen2", "qwen2", ReadQwen2, WriteQwen2};
  return kSpec;
}

const FamilySpec& Qwen3() {
  static const FamilySpec kSpec{"Qwen3ForCausalLM", "qwen3", "qwen3", ReadQwen3, WriteQwen3};
  return kSpec;
}

}  // namespace seedling::model::families
