// Fuzz target: a device's config (client/client_config.h ClientConfig), which comes as JSON through the C ABI and
// as TOML from `seedling client --config`: both parsers see every input.

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "client/client_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  (void)seedling::client::ClientConfig::FromJson(text);
  (void)seedling::client::ClientConfig::FromToml(text);
  return 0;
}
