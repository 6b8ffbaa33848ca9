#include "base/toml.h"

#include <algorithm>

#include "base/strings.h"

namespace seedling {
namespace {

bool IsKeyChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
         c == ' ' || c == '\t';
}

// The index just past the string that opens at `i` (a basic or literal string, single- or multi-line).
size_t SkipString(std::string_view text, size_t i) {
  const char quote = text[i];
  const bool multi = text.substr(i, 3) == std::string_view(quote == '"' ? "\"\"\"" : "'''");
  const std::string_view close = multi ? text.substr(i, 3) : text.substr(i, 1);
  for (size_t j = i + close.size(); j < text.size(); ++j) {
    if (quote == '"' && text[j] == '\\') {
      ++j;  // an escaped character cannot close the string
    } else if (text.substr(j, close.size()) == close) {
      return j + close.size();
    } else if (!multi && text[j] == '\n') {
      return j;  // an unterminated string: toml++ reports it
    }
  }
  return text.size();
}

}  // namespace

int TomlKeyParts(std::string_view text) {
  // A run of key characters, quoted key parts and dots; anything else ends it. Values cannot carry
  // more than one dot in a run (a float, a time), so the longest run bounds every dotted key.
  int most = 0;
  int dots = 0;
  for (size_t i = 0; i < text.size();) {
    const char c = text[i];
    if (c == '"' || c == '\'') {
      i = SkipString(text, i);
    } else if (c == '#') {
      while (i < text.size() && text[i] != '\n') ++i;
    } else if (c == '.') {
      most = std::max(most, ++dots);
      ++i;
    } else {
      if (!IsKeyChar(c)) dots = 0;
      ++i;
    }
  }
  return most + 1;
}

absl::StatusOr<toml::table> ParseToml(std::string_view text) {
  if (const int parts = TomlKeyParts(text); parts > kMaxTomlKeyParts) {
    return absl::InvalidArgumentError(ToAbsl(StrCat("not valid TOML: a dotted key or table header has ", parts,
                                                    " parts; at most ", kMaxTomlKeyParts, " are supported")));
  }
  try {
    return toml::parse(text);
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(
        ToAbsl(StrCat("not valid TOML: ", e.description(), " (line ", e.source().begin.line, ")")));
  }
}

absl::Status TomlSection::Error(std::string_view key, std::string_view problem) const {
  return absl::InvalidArgumentError(StrCat("[", name_, "] ", key, ": ", problem));
}

absl::Status TomlSection::CheckNoUnknownKeys() const {
  if (table_ == nullptr) return absl::OkStatus();
  for (const auto& [key, value] : *table_) {
    const std::string k(key.str());
    if (!known_.count(k)) return Error(k, "is not a known key");
  }
  return absl::OkStatus();
}

}  // namespace seedling
