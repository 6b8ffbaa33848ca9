#pragma once

// A LoRA adapter's configuration and its PEFT form (adapter_config.json), without LibTorch, so the PEFT
// reader can be fuzzed with clang (lora/adapter.h holds the adapter itself; the memory planner, the
// coordinator and the trainers take a LoraConfig).

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace seedling::lora {

// Ranks above this are refused: beyond any use, and they would multiply into absurd sizes.
inline constexpr int64_t kMaxLoraRank = 4096;

// What an adapter trains on each targeted projection.
enum class AdapterKind {
  kLora,  // low-rank matrices A and B (Hu et al. 2021)
  // BitFit (Ben Zaken et al. 2022), FeS's bias-only option: a bias vector b (out) added to the projection's
  // output, zero at initialization. On a projection with a bias it trains that bias (as a delta); on one
  // without (Llama, SmolLM, Gemma) it adds one. rank, alpha, dropout and use_rslora do not apply.
  kBias,
};
// "lora", "bitfit".
const char* AdapterKindName(AdapterKind kind);
// InvalidArgument names a bad value.
absl::StatusOr<AdapterKind> ParseAdapterKind(std::string_view name);

struct LoraConfig {
  AdapterKind kind = AdapterKind::kLora;
  int64_t rank = 8;         // r
  double alpha = 16.0;      // scale numerator
  double dropout = 0.0;     // probability of zeroing an input element of A (training only)
  bool use_rslora = false;  // scale alpha / sqrt(r) instead of alpha / r
  std::vector<model::Projection> targets = {model::Projection::kQ, model::Projection::kV};
  std::vector<int64_t> layers;  // layers to adapt; empty = all
  uint64_t init_seed = 0;       // A ~ U(-1/sqrt(in), 1/sqrt(in)) from this seed (PEFT's Kaiming init)

  double scale() const;
  absl::Status Validate(const model::ModelConfig& model) const;
};

// The projections of `model` that `targets` name, in canonical order without repeats: a projection the model
// has stands for itself; q_proj, k_proj, v_proj (gate_proj, up_proj) stand for the fused qkv_proj (gate_up_proj)
// of a model that fuses them (Phi-3), and a fused name for its parts on a model that keeps them apart. So
// "q_proj,v_proj" adapts Phi-3's qkv_proj, and "all" every projection of any model.
std::vector<model::Projection> TargetsFor(const model::ModelConfig& model,
                                          const std::vector<model::Projection>& targets);

// Parses "q_proj,v_proj" (or "q,v", or "all", or a family's module names such as "query_key_value") into
// projections. InvalidArgument names a bad entry.
absl::StatusOr<std::vector<model::Projection>> ParseTargets(std::string_view list);

// Which decoder layers an adapter covers, as configs write it: "all", "top:N" (the N layers nearest the
// output: FeS's capacity option, the cheapest for backprop since the backward stops at the lowest adapted
// layer), or indices "0,5,11".
struct LayerSelection {
  int64_t top = 0;            // > 0: the last `top` layers
  std::vector<int64_t> list;  // top == 0: these layers, ascending; empty = all
};
// InvalidArgument names what is wrong ("top:0", "top:x", "-1", a repeated index).
absl::StatusOr<LayerSelection> ParseLayerSelection(std::string_view text);
// The layer indices `selection` picks in a model of `num_layers` layers, ascending; empty = all.
// InvalidArgument when top exceeds num_layers or an index is not a layer.
absl::StatusOr<std::vector<int64_t>> ResolveLayers(const LayerSelection& selection, int64_t num_layers);
// The lowest layer `config` adapts (0 when it adapts every layer): where lora-bp's backward and the
// forward gradient's tangents stop (client/compute_model.h).
int64_t FirstAdaptedLayer(const LoraConfig& config);

// A LoraConfig from the parts a server config or a task carries (target module names as ParseTargets reads
// them; `layers` as ResolveLayers gives them, empty = all). InvalidArgument names a bad target; the rest is
// checked by Validate against a model.
absl::StatusOr<LoraConfig> MakeLoraConfig(int64_t rank, double alpha, const std::vector<std::string>& targets,
                                          uint64_t init_seed, std::vector<int64_t> layers = {},
                                          AdapterKind kind = AdapterKind::kLora);

// Parses a PEFT adapter_config.json for `model` (or Seedling's BitFit form of it, peft_type "BITFIT": PEFT has
// no bias-only adapter): target_modules as a list of module names (or
// "all-linear"), optional layers_to_transform, use_rslora, any rank. InvalidArgument names what does not fit:
// a target this model lacks, a bad value, or an unsupported option (rank_pattern, alpha_pattern, DoRA, a
// regex target_modules, bias other than "none", fan_in_fan_out, modules_to_save).
absl::StatusOr<LoraConfig> ParsePeftConfig(std::string_view json_text, const model::ModelConfig& model);

// The adapter_config.json PEFT writes for `config` on `model` (target_modules in the family's module names,
// pretty-printed, newline-terminated); `base_model` goes to base_model_name_or_path.
std::string PeftConfigJson(const LoraConfig& config, const model::ModelConfig& model, const std::string& base_model);

}  // namespace seedling::lora
