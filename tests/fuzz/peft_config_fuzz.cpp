// Fuzz target: a PEFT adapter_config.json (lora/adapter.h LoadPeft) for the "tiny" preset model. The input
// is written as the adapter's config; there are no weights, so an accepted config ends in NotFound for
// adapter_model.safetensors after the adapter was sized from it (the rank is bounded before that).

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>

#include "lora/adapter.h"
#include "model/config.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const seedling::model::ModelConfig model = [] {
    auto preset = seedling::model::PresetConfig("tiny");
    if (!preset.ok()) std::abort();
    return *preset;
  }();
  const std::string path = seedling::fuzz::WriteInputFile(data, size, "adapter_config.json");
  (void)seedling::lora::LoadPeft(std::filesystem::path(path).parent_path().string(), model);
  return 0;
}
