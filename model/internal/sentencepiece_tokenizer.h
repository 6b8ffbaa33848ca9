#pragma once

// A SentencePiece `tokenizer.model` (Llama-2 / TinyLlama style), run by libsentencepiece behind the
// dlopen'ed shim (model/internal/spm_library.h).

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace seedling::model::internal {

// Loads the model at `path`. Control pieces ("<s>", "</s>") and the unknown piece are special:
// Encode matches their text in the input as the tokens themselves, and Decode(skip_special_tokens)
// drops them. NotFound if the file does not exist, InvalidArgument if it is not a SentencePiece
// model, and OpenSpmLibrary's NotFound / FailedPrecondition if the shim cannot be loaded.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& path, bool add_bos, bool add_eos);

}  // namespace seedling::model::internal
