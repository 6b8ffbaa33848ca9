// Fuzz target: a model's config.json (model/config.h ParseModelConfig). A config it accepts must also
// pass Validate() and survive a round trip through ModelConfigToJson.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace seedling::model;
  auto config = ParseModelConfig(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!config.ok()) return 0;
  if (!config->Validate().ok()) std::abort();
  (void)config->NumParameters();
  if (!ParseModelConfig(ModelConfigToJson(*config)).ok()) std::abort();
  return 0;
}
