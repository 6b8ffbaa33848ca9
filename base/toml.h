#pragma once

// Reading TOML files (server.toml, sim.toml, the client's config) through toml++ with a bound on key
// depth. toml++ limits nested arrays and inline tables (256) but not dotted keys: `a.b.b.b... = 1` or a
// `[a.b.b...]` header 50,000 parts long builds a table chain whose recursive handling overflows the
// stack. Every TOML document goes through ParseToml.

#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>

#include "absl/status/statusor.h"
#include <toml++/toml.h>

namespace seedling {

// Far above any real config's dotted keys (they use two or three parts).
inline constexpr int kMaxTomlKeyParts = 64;

// The most parts in one dotted key or table header of `text` (outside strings and comments).
int TomlKeyParts(std::string_view text);

// Parses `text`; errors say "not valid TOML: <why> (line N)" or name the key depth bound.
absl::StatusOr<toml::table> ParseToml(std::string_view text);

// The value of an integer node as T. InvalidArgument "must be an integer" for any other node (a float
// too: toml++'s value<int64_t>() would cast 4.0e69 to an integer, which is undefined), "must not be
// negative" for an unsigned T, "is out of range" beyond T. Callers prefix the table and key.
template <typename T>
absl::StatusOr<T> TomlInteger(const toml::node& node) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>);
  const toml::value<int64_t>* integer = node.as_integer();
  if (integer == nullptr) return absl::InvalidArgumentError("must be an integer");
  const int64_t v = integer->get();
  if (std::is_unsigned_v<T> && v < 0) return absl::InvalidArgumentError("must not be negative");
  if (!std::in_range<T>(v)) return absl::InvalidArgumentError("is out of range");
  return static_cast<T>(v);
}

}  // namespace seedling
