#pragma once

// BPE training that writes a Hugging Face tokenizer.json: byte-level (GPT-2 / SmolLM style) or
// SentencePiece-style (Gemma style). The public entry points are in model/tokenizer.h.

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace seedling::model::internal {

// Counts the GPT-2 pre-tokens of `corpus`, then repeatedly merges the most frequent adjacent pair
// (ties: the pair with the smaller ids, as Hugging Face's trainer does) until the vocabulary
// reaches options.vocab_size or no pair occurs options.min_frequency times. Pair counts are updated
// incrementally, touching only the words that contain the merged pair. Deterministic.
// InvalidArgument for invalid UTF-8 in `corpus` or in a special token, duplicate or empty special
// tokens, a special token that is also a byte token, negative min_frequency, or vocab_size below
// 256 + the number of special tokens.
absl::StatusOr<std::string> TrainByteLevelBpe(std::string_view corpus, const BpeTrainerOptions& options);

// TrainSentencePieceBpeTokenizerJson (model/tokenizer.h): the same merge rule over the characters of
// "▁"-started words.
absl::StatusOr<std::string> TrainSentencePieceBpe(std::string_view corpus, const SentencePieceTrainerOptions& options);

}  // namespace seedling::model::internal
