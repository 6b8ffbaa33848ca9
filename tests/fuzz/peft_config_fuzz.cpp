// Fuzz target: a PEFT adapter_config.json (lora/lora_config.h ParsePeftConfig, which lora::LoadPeft reads
// before it sizes the adapter) for the "tiny" preset model. An accepted config must pass Validate against the
// model and give a finite, positive scale; anything else aborts (a finding).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "lora/lora_config.h"
#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const seedling::model::ModelConfig model = [] {
    auto preset = seedling::model::PresetConfig("tiny");
    if (!preset.ok()) std::abort();
    return *preset;
  }();
  auto config = seedling::lora::ParsePeftConfig(std::string_view(reinterpret_cast<const char*>(data), size), model);
  if (!config.ok()) return 0;
  if (!config->Validate(model).ok()) std::abort();
  const double scale = config->scale();
  if (!std::isfinite(scale) || !(scale > 0)) std::abort();
  return 0;
}
