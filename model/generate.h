#pragma once

// Text generation with a KV cache: greedy, or temperature + top-p (nucleus) sampling from a seeded Philox
// stream, so the same (model, prompt, seed) gives the same text on every machine.

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "base/philox.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace seedling::model {

struct GenerateOptions {
  int64_t max_new_tokens = 32;  // tokens to generate at most
  double temperature = 1.0;     // <= 0 means greedy (argmax)
  double top_p = 1.0;           // nucleus: sample among the smallest set with probability >= top_p; (0, 1]
  int64_t top_k = 0;            // keep only the k most likely tokens first; 0 = no limit
  uint64_t seed = 0;            // seeds the sampling stream
  bool stop_at_eos = true;      // stop at any of the config's eos_token_ids
  // Only ids below this are sampled; 0 = every id of the model's vocabulary. Generate() sets it to the
  // tokenizer's size when the model's vocabulary is padded past it (Phi-2: 51,200 rows, 50,295 tokens), so a
  // padding row, which the tokenizer cannot decode, is never picked.
  int64_t sampled_ids = 0;
  ForwardOptions forward;  // adapter etc.
};

// kContext: a model with learned positions (GPT-2, OPT) has no position left for another token.
enum class StopReason { kMaxTokens, kEos, kContext };

// "max tokens", "eos", "context full".
const char* StopReasonName(StopReason reason);

struct GenerateResult {
  std::vector<int32_t> prompt_tokens;
  std::vector<int32_t> tokens;  // generated tokens (without the prompt; includes the final EOS if any)
  std::string text;             // decoded generated tokens, special tokens skipped
  StopReason stop = StopReason::kMaxTokens;
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

// Picks the next token from logits (V) fp32 with the options' temperature / top-k / top-p, drawing from
// `rng`. Exposed for tests.
int64_t SampleToken(const at::Tensor& logits, const GenerateOptions& options, Rng& rng);

// Called after each generated token with all tokens generated so far; `last` is true for the final one.
// A non-OK status stops generation and is returned.
using TokenCallback = std::function<absl::Status(const std::vector<int32_t>& generated, bool last)>;

// Generates from token ids. InvalidArgument for an empty prompt, ids outside the vocabulary or bad
// options (top_p outside (0, 1], negative max_new_tokens).
absl::StatusOr<GenerateResult> GenerateTokens(const LlamaModel& model, std::vector<int32_t> prompt,
                                              const GenerateOptions& options, const TokenCallback& on_token = nullptr);

// Encodes `prompt` (with the tokenizer's special tokens, e.g. BOS), generates, and decodes. `on_text`, if
// set, receives the text as it is produced (only complete UTF-8 sequences).
absl::StatusOr<GenerateResult> Generate(const LlamaModel& model, const Tokenizer& tokenizer, std::string_view prompt,
                                        const GenerateOptions& options,
                                        const std::function<void(std::string_view)>& on_text = nullptr);

}  // namespace seedling::model
