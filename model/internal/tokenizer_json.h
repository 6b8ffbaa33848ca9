#pragma once

// A Hugging Face tokenizer.json with a BPE model: added tokens, normalizer, pre-tokenizer, model,
// post-processor and decoder, applied in Hugging Face's order.

#include <memory>
#include <nlohmann/json.hpp>
#include <string_view>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace seedling::model::internal {

// The regexes of the Split stage of Llama 3 and Qwen2 tokenizer.json files (they differ only in how
// digits group: up to three, or one).
inline constexpr std::string_view kLlama3SplitRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kQwen2SplitRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Parses tokenizer.json contents. `source` names the document in error messages (its path, or
// "tokenizer.json"). InvalidArgument naming the field for malformed or unsupported content.
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(std::string_view json, std::string_view source);
// The same for a document already parsed (or built in memory, as model/gguf_model.cpp does).
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJsonDocument(const nlohmann::json& doc,
                                                                      std::string_view source);

}  // namespace seedling::model::internal
