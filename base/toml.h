#pragma once

// Reading TOML files (server.toml, sim.toml, the client's config) through toml++ with a bound on key
// depth. toml++ limits nested arrays and inline tables (256) but not dotted keys: `a.b.b.b... = 1` or a
// `[a.b.b...]` header 50,000 parts long builds a table chain whose recursive handling overflows the
// stack. Every TOML document goes through ParseToml.

#include <string_view>

#include "absl/status/statusor.h"
#include <toml++/toml.h>

namespace seedling {

// Far above any real config's dotted keys (they use two or three parts).
inline constexpr int kMaxTomlKeyParts = 64;

// The most parts in one dotted key or table header of `text` (outside strings and comments).
int TomlKeyParts(std::string_view text);

// Parses `text`; errors say "not valid TOML: <why> (line N)" or name the key depth bound.
absl::StatusOr<toml::table> ParseToml(std::string_view text);

}  // namespace seedling
