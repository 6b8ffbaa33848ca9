#pragma once

// Parsing JSON from outside the process (model and tokenizer files, configs, data rows, adapter
// configs) with a bound on nesting. nlohmann's parser itself is iterative, but copying, comparing,
// dumping and the project's own recursive readers (a tokenizer's Sequence normalizers) recurse once per
// level, so a document nested 20,000 deep would overflow the stack long after it parsed. Every JSON
// document read from a file, a device or the network goes through ParseJson.

#include <cstddef>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace seedling {

// Deeper than any real config.json, tokenizer.json or adapter config (they nest under 10 levels) and
// far below what the recursive code paths can take on an 8 MiB (or a phone's 1 MiB) stack.
inline constexpr int kMaxJsonDepth = 128;

// The deepest nesting of arrays and objects in `text`, found by a scan that skips strings. Stops
// counting at `limit` + 1, so the scan costs one pass whatever the input.
int JsonNestingDepth(std::string_view text, int limit = kMaxJsonDepth);

// Parses `text`; an error names `what` (a path; empty for none) and says why: not valid JSON, or nested
// deeper than `max_depth`.
absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, std::string_view what, int max_depth = kMaxJsonDepth);

}  // namespace seedling
