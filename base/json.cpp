#include "base/json.h"

#include <algorithm>
#include <string>

#include "base/strings.h"

namespace seedling {
namespace {

// "line 3, column 7" for the 1-based byte offset nlohmann reports.
std::string Where(std::string_view text, size_t byte) {
  const size_t end = std::min(byte == 0 ? 0 : byte - 1, text.size());
  size_t line = 1;
  size_t line_start = 0;
  for (size_t i = 0; i < end; ++i) {
    if (text[i] == '\n') {
      ++line;
      line_start = i + 1;
    }
  }
  return StrCat("line ", line, ", column ", end - line_start + 1);
}

std::string Prefix(std::string_view what) { return what.empty() ? std::string() : StrCat(what, ": "); }

}  // namespace

int JsonNestingDepth(std::string_view text, int limit) {
  int depth = 0;
  int deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        break;
      case '[':
      case '{':
        if (++depth > deepest) deepest = depth;
        if (deepest > limit) return deepest;
        break;
      case ']':
      case '}':
        if (depth > 0) --depth;
        break;
      default:
        break;
    }
  }
  return deepest;
}

absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, std::string_view what, int max_depth) {
  if (JsonNestingDepth(text, max_depth) > max_depth) {
    return absl::InvalidArgumentError(
        ToAbsl(StrCat(Prefix(what), "JSON nested deeper than ", max_depth, " levels; refusing to read it")));
  }
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    // Not e.what(): nlohmann quotes the text it read, and rows are user data that must not reach logs.
    return absl::InvalidArgumentError(
        ToAbsl(StrCat(Prefix(what), "not valid JSON (syntax error at ", Where(text, e.byte), ")")));
  } catch (const nlohmann::json::exception&) {
    return absl::InvalidArgumentError(ToAbsl(StrCat(Prefix(what), "not valid JSON")));
  }
}

}  // namespace seedling
