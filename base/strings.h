#pragma once

// String helpers. Debian's Abseil (20220623) has its own absl::string_view that std::string_view does not
// convert to, so seedling::StrCat forwards std::string_view arguments to absl::StrCat explicitly. Use it
// instead of absl::StrCat in Seedling code.

#include <string>
#include <string_view>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace seedling {
namespace strings_internal {
template <typename T>
decltype(auto) ToAlphaNumArg(const T& v) {
  if constexpr (std::is_convertible_v<const T&, std::string_view> &&
                !std::is_convertible_v<const T&, absl::string_view>) {
    const std::string_view s(v);
    return absl::string_view(s.data(), s.size());
  } else {
    return (v);
  }
}
}  // namespace strings_internal

// Concatenates numbers and strings (std::string, std::string_view, const char*, absl::string_view).
template <typename... Args>
std::string StrCat(const Args&... args) {
  return absl::StrCat(strings_internal::ToAlphaNumArg(args)...);
}

// Converts to the Abseil string_view (for Abseil APIs such as absl::Status's constructor).
inline absl::string_view ToAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }
inline std::string_view FromAbsl(absl::string_view s) { return std::string_view(s.data(), s.size()); }

// Escapes & < > " ' for HTML text and attribute values (the dashboard, the simulator's report).
inline std::string HtmlEscape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

}  // namespace seedling
