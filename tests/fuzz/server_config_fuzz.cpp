// Fuzz target: server.toml (server/config.h ParseServerConfig): TOML syntax, then every section and key.

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "server/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)seedling::server::ParseServerConfig(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
