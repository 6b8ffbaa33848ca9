#pragma once

// The tokenizer.json document equivalent to a TokenizerVocabulary (the inverse of
// Tokenizer::Vocabulary()), so that a vocabulary read from a GGUF file runs on the same tokenizer
// machinery as a Hugging Face tokenizer.json. See TokenizerFromVocabulary in model/tokenizer.h.

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace seedling::model::internal {

// Builds the document. InvalidArgument (without a source prefix: the caller adds it) for per-id
// vectors of different lengths, empty or duplicate token strings, an unknown token type, special
// ids outside the vocabulary, add_bos / add_eos without the id, or a byte-level vocabulary whose
// pre-tokenizer is kOther.
absl::StatusOr<nlohmann::json> TokenizerJsonFromVocabulary(const TokenizerVocabulary& vocab, bool add_space_prefix);

}  // namespace seedling::model::internal
