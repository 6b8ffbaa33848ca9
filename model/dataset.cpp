#include "model/dataset.h"

#include <nlohmann/json.hpp>

#include "base/file.h"
#include "base/json.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/kernels.h"

namespace seedling::model {
namespace {

using Json = nlohmann::json;

void Truncate(Example& ex, int64_t max_len) {
  if (max_len > 0 && static_cast<int64_t>(ex.tokens.size()) > max_len) {
    ex.tokens.resize(static_cast<size_t>(max_len));
    ex.labels.resize(static_cast<size_t>(max_len));
  }
}

absl::StatusOr<std::string> StringField(const Json& row, const char* key, bool required) {
  auto it = row.find(key);
  if (it == row.end() || it->is_null()) {
    if (required) return absl::InvalidArgumentError(StrCat("missing field \"", key, "\""));
    return std::string();
  }
  if (!it->is_string()) return absl::InvalidArgumentError(StrCat("field \"", key, "\" must be a string"));
  return it->get<std::string>();
}

}  // namespace

int64_t Example::ScoredTokens() const {
  int64_t n = 0;
  for (size_t t = 1; t < labels.size(); ++t) n += labels[t] != kIgnoreIndex;
  return n;
}

std::string InstructionPrompt(std::string_view instruction, std::string_view input) {
  if (input.empty()) return StrCat("### Instruction:\n", instruction, "\n\n### Response:\n");
  return StrCat("### Instruction:\n", instruction, "\n\n### Input:\n", input, "\n\n### Response:\n");
}

absl::StatusOr<Example> TokenizeRow(std::string_view line, const Tokenizer& tokenizer, const DatasetOptions& options) {
  SEEDLING_ASSIGN_OR_RETURN(const Json row, ParseJson(line, ""));
  if (!row.is_object()) return absl::InvalidArgumentError("each line must be a JSON object");
  Example ex;
  if (row.contains("text")) {
    SEEDLING_ASSIGN_OR_RETURN(std::string text, StringField(row, "text", true));
    SEEDLING_ASSIGN_OR_RETURN(ex.tokens, tokenizer.Encode(text, /*add_special_tokens=*/true));
    if (options.eos_id) ex.tokens.push_back(*options.eos_id);
    ex.labels = ex.tokens;
  } else if (row.contains("instruction") || row.contains("output")) {
    SEEDLING_ASSIGN_OR_RETURN(std::string instruction, StringField(row, "instruction", true));
    SEEDLING_ASSIGN_OR_RETURN(std::string input, StringField(row, "input", false));
    SEEDLING_ASSIGN_OR_RETURN(std::string output, StringField(row, "output", true));
    // Prompt and response are tokenized separately so the boundary (and the mask) is exact.
    SEEDLING_ASSIGN_OR_RETURN(std::vector<int32_t> prompt,
                              tokenizer.Encode(InstructionPrompt(instruction, input), /*add_special_tokens=*/true));
    SEEDLING_ASSIGN_OR_RETURN(std::vector<int32_t> response, tokenizer.Encode(output, /*add_special_tokens=*/false));
    if (options.eos_id) response.push_back(*options.eos_id);
    ex.tokens = prompt;
    ex.tokens.insert(ex.tokens.end(), response.begin(), response.end());
    ex.labels.assign(prompt.size(), static_cast<int32_t>(kIgnoreIndex));
    ex.labels.insert(ex.labels.end(), response.begin(), response.end());
  } else {
    return absl::InvalidArgumentError(R"(expected a "text" field or "instruction"/"input"/"output" fields)");
  }
  Truncate(ex, options.max_seq_len);
  return ex;
}

absl::StatusOr<std::vector<Example>> LoadJsonlExamples(const std::string& path, const Tokenizer& tokenizer,
                                                       const DatasetOptions& options) {
  std::vector<Example> out;
  SEEDLING_RETURN_IF_ERROR(ForEachLine(path, options.max_row_bytes, [&](const Line& line) -> absl::Status {
    if (line.too_long) {
      return absl::InvalidArgumentError(StrCat(path, ":", line.number, ": the row is ", line.bytes,
                                               " bytes, more than max_row_bytes (", options.max_row_bytes, ")"));
    }
    if (line.text.find_first_not_of(" \t\r") == std::string_view::npos) return absl::OkStatus();
    auto ex = TokenizeRow(line.text, tokenizer, options);
    if (!ex.ok()) return Annotate(ex.status(), StrCat(path, ":", line.number));
    out.push_back(std::move(ex).value());
    return absl::OkStatus();
  }));
  return out;
}

Batch CollateRightPadded(std::span<const Example* const> examples) {
  size_t max_len = 1;
  for (const Example* ex : examples) max_len = std::max(max_len, ex->tokens.size());
  const auto b = static_cast<int64_t>(examples.size());
  Batch batch{at::zeros({b, static_cast<int64_t>(max_len)}, at::kLong),
              at::full({b, static_cast<int64_t>(max_len)}, kIgnoreIndex, at::kLong)};
  auto tok = batch.tokens.accessor<int64_t, 2>();
  auto lab = batch.labels.accessor<int64_t, 2>();
  for (int64_t i = 0; i < b; ++i) {
    const Example& ex = *examples[static_cast<size_t>(i)];
    for (size_t t = 0; t < ex.tokens.size(); ++t) {
      tok[i][static_cast<int64_t>(t)] = ex.tokens[t];
      lab[i][static_cast<int64_t>(t)] = ex.labels[t];
    }
  }
  return batch;
}

}  // namespace seedling::model
