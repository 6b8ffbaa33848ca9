#pragma once

// Training / evaluation examples from JSONL, one JSON object per line:
//   {"text": "..."}                                        plain text, every token scored
//   {"instruction": "...", "input": "...", "output": "..."}  prompt tokens excluded from the loss
// ("input" is optional). Instruction rows are formatted with the template of InstructionPrompt().

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace seedling::model {

// Tokens and per-token labels (same length). labels[t] is tokens[t], or -100 (kIgnoreIndex) for tokens
// that are not predicted (the prompt of an instruction row).
struct Example {
  std::vector<int32_t> tokens;
  std::vector<int32_t> labels;
  int64_t ScoredTokens() const;  // labels that are not -100, excluding position 0 (nothing predicts it)
};

struct DatasetOptions {
  int64_t max_seq_len = 512;                 // longer examples are truncated (the start is kept); <= 0: no limit
  std::optional<int32_t> eos_id;             // appended to every example's text/output when set
  int64_t max_row_bytes = int64_t{1} << 28;  // LoadJsonlExamples refuses longer rows, naming the line
};

// The prompt for an instruction row:
//   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
// with the Input section left out when `input` is empty.
std::string InstructionPrompt(std::string_view instruction, std::string_view input);

// Tokenizes one JSONL row (the line's text). InvalidArgument if it is not a JSON object with either a
// string "text" or string "instruction" and "output" fields.
absl::StatusOr<Example> TokenizeRow(std::string_view line, const Tokenizer& tokenizer, const DatasetOptions& options);

// Reads a JSONL file (blank lines skipped), streaming it a line at a time. Errors name the file and line:
// "data.jsonl:17: ...". NotFound if the file does not exist.
absl::StatusOr<std::vector<Example>> LoadJsonlExamples(const std::string& path, const Tokenizer& tokenizer,
                                                       const DatasetOptions& options);

// Right-padded batch: tokens (B, T) int64 padded with 0, labels (B, T) int64 padded with -100. Right
// padding never changes the real tokens' outputs (attention is causal).
struct Batch {
  at::Tensor tokens;
  at::Tensor labels;
};
Batch CollateRightPadded(std::span<const Example* const> examples);

}  // namespace seedling::model
