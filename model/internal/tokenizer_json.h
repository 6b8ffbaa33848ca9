#pragma once

// A Hugging Face tokenizer.json with a BPE model: added tokens, normalizer, pre-tokenizer, model,
// post-processor and decoder, applied in Hugging Face's order.

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace seedling::model::internal {

// Parses tokenizer.json contents. `source` names the document in error messages (its path, or
// "tokenizer.json"). InvalidArgument naming the field for malformed or unsupported content.
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view json,
                                                              std::string_view source);

}  // namespace seedling::model::internal
