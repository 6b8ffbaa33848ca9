// Fuzz target: tokenizer.json (model/tokenizer.h ParseTokenizerJson), then a round trip through the
// tokenizer it built, so the vocabulary, merges and added tokens it accepted are also exercised.

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "model/internal/tokenizer_json.h"
#include "model/tokenizer.h"

// The parser model::ParseTokenizerJson forwards to, called directly: tokenizer.cpp includes LibTorch headers,
// which the clang fuzzing build cannot compile (tests/fuzz/CMakeLists.txt).
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto tokenizer = seedling::model::internal::ParseTokenizerJson(
      std::string_view(reinterpret_cast<const char*>(data), size), "tokenizer.json");
  if (!tokenizer.ok()) return 0;
  auto ids = (*tokenizer)->Encode("The fox, the dog: 12 \xc3\xa9t\xc3\xa9 <|im_end|>\n", true);
  if (ids.ok()) (void)(*tokenizer)->Decode(*ids);
  (void)(*tokenizer)->Vocabulary();
  return 0;
}
