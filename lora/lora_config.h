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

struct LoraConfig {
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

// A LoraConfig from the parts a server config or a task carries (target module names as ParseTargets reads
// them). InvalidArgument names a bad target; the rest is checked by Validate against a model.
absl::StatusOr<LoraConfig> MakeLoraConfig(int64_t rank, double alpha, const std::vector<std::string>& targets,
                                          uint64_t init_seed);

// Parses a PEFT adapter_config.json for `model`: target_modules as a list of module names (or
// "all-linear"), optional layers_to_transform, use_rslora, any rank. InvalidArgument names what does not fit:
// a target this model lacks, a bad value, or an unsupported option (rank_pattern, alpha_pattern, DoRA, a
// regex target_modules, bias other than "none", fan_in_fan_out, modules_to_save).
absl::StatusOr<LoraConfig> ParsePeftConfig(std::string_view json_text, const model::ModelConfig& model);

// The adapter_config.json PEFT writes for `config` on `model` (target_modules in the family's module names,
// pretty-printed, newline-terminated); `base_model` goes to base_model_name_or_path.
std::string PeftConfigJson(const LoraConfig& config, const model::ModelConfig& model, const std::string& base_model);

}  // namespace seedling::lora
