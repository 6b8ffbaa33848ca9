// Fuzz target: a GGUF file (model/gguf_reader.h), parsed in memory (MappedFile::FromBytes; Open runs the same
// parser on a mapping): the whole header is validated first, then the typed
// getters read metadata values out of the mapping, and the model config is read from it
// (model/gguf_config.h): a config it accepts must pass Validate().

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "base/file.h"
#include "model/gguf_config.h"
#include "model/gguf_reader.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = seedling::model::GgufFile::FromMapping(
      seedling::MappedFile::FromBytes("input.gguf", std::string(reinterpret_cast<const char*>(data), size)));
  if (!file.ok()) return 0;
  uint64_t sum = 0;
  for (const auto& [key, value] : (*file)->metadata()) {
    (void)(*file)->GetString(key);
    (void)(*file)->GetU32(key);
    (void)(*file)->GetF32(key);
    (void)(*file)->GetStringArray(key);
    (void)(*file)->GetI32Array(key);
    (void)(*file)->GetF32Array(key);
  }
  // Every tensor's bytes must lie inside the mapping: touch the first and last.
  for (const auto& tensor : (*file)->tensors()) {
    if (tensor.nbytes > 0) sum += tensor.data[0] + tensor.data[tensor.nbytes - 1];
  }
  auto config = seedling::model::ConfigFromGguf(**file);
  if (config.ok() && !config->Validate().ok()) std::abort();
  seedling::fuzz::Consume(sum);
  return 0;
}
