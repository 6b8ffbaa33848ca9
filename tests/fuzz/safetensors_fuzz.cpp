// Fuzz target: a .safetensors file (model/safetensors.h): the header length, the JSON header and the
// tensor table are validated before any pointer is handed out. The bytes are parsed in memory
// (MappedFile::FromBytes, the same parser SafetensorsFile::Open runs on a file's mapping): writing and
// mapping a file per input made this target eight times slower.

#include <cstddef>
#include <cstdint>
#include <string>

#include "base/file.h"
#include "model/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = seedling::model::SafetensorsFile::FromMapping(
      seedling::MappedFile::FromBytes("input.safetensors", std::string(reinterpret_cast<const char*>(data), size)));
  if (!file.ok()) return 0;
  // Every view must lie inside the mapping: touch its first and last byte.
  uint64_t sum = 0;
  for (const auto& [name, view] : (*file)->tensors()) {
    if (view.nbytes > 0) sum += view.data[0] + view.data[view.nbytes - 1];
    sum += static_cast<uint64_t>(view.numel());
  }
  seedling::fuzz::Consume(sum);
  return 0;
}
