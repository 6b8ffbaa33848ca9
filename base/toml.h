#pragma once

// Reading TOML files (server.toml, sim.toml, the client's config) through toml++ with a bound on key
// depth. toml++ limits nested arrays and inline tables (256) but not dotted keys: `a.b.b.b... = 1` or a
// `[a.b.b...]` header 50,000 parts long builds a table chain whose recursive handling overflows the
// stack. Every TOML document goes through ParseToml.

#include <toml++/toml.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

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

// A value of type T (bool, std::string, a floating point type, std::vector<std::string>, or an integer type
// via TomlInteger). InvalidArgument "must be true or false", "must be a string", "must be a number" (an
// integer converts), "must be an array of strings", or TomlInteger's messages. Callers prefix the table and key.
template <typename T>
absl::StatusOr<T> TomlValue(const toml::node& node) {
  if constexpr (std::is_same_v<T, bool>) {
    std::optional<bool> v = node.value<bool>();
    if (!v) return absl::InvalidArgumentError("must be true or false");
    return *v;
  } else if constexpr (std::is_same_v<T, std::string>) {
    std::optional<std::string> v = node.value<std::string>();
    if (!v) return absl::InvalidArgumentError("must be a string");
    return *v;
  } else if constexpr (std::is_floating_point_v<T>) {
    std::optional<double> v = node.value<double>();  // integers convert too
    if (!v) return absl::InvalidArgumentError("must be a number");
    return static_cast<T>(*v);
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    const toml::array* array = node.as_array();
    if (array == nullptr) return absl::InvalidArgumentError("must be an array of strings");
    std::vector<std::string> out;
    for (const toml::node& e : *array) {
      std::optional<std::string> v = e.value<std::string>();
      if (!v) return absl::InvalidArgumentError("must be an array of strings");
      out.push_back(*v);
    }
    return out;
  } else {
    return TomlInteger<T>(node);
  }
}

// Reads typed values from one TOML table and remembers which keys it read, so that unknown keys (typos) can
// be refused. Errors read "[table] key: problem". A null table reads as empty.
class TomlSection {
 public:
  TomlSection(const toml::table* table, std::string name) : table_(table), name_(std::move(name)) {}

  // Sets `out` from `key` when present (else leaves it); InvalidArgument with TomlValue's problem.
  template <typename T>
  absl::Status Get(const char* key, T& out) {
    known_.insert(key);
    const toml::node* node = table_ != nullptr ? table_->get(key) : nullptr;
    if (node == nullptr) return absl::OkStatus();
    absl::StatusOr<T> v = TomlValue<T>(*node);
    if (!v.ok()) return Error(key, std::string_view(v.status().message().data(), v.status().message().size()));
    out = *std::move(v);
    return absl::OkStatus();
  }

  // Accepts `key` without reading it here (a sub-table its caller reads itself).
  void MarkKnown(std::string key) { known_.insert(std::move(key)); }

  // "[table] key: problem".
  absl::Status Error(std::string_view key, std::string_view problem) const;
  // InvalidArgument "[table] key: is not a known key" for the first key no Get asked for.
  absl::Status CheckNoUnknownKeys() const;

 private:
  const toml::table* table_;
  std::string name_;
  std::set<std::string> known_;
};

}  // namespace seedling
