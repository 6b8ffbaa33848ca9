#pragma once

// Status glue on top of Abseil: early-return macros used at every module boundary (docs/contributing.md, "Errors").

#include <exception>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/strings.h"

namespace seedling {

// Internal helpers for the macros below; not part of the public surface.
namespace status_internal {
inline const absl::Status& AsStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& AsStatus(const absl::StatusOr<T>& s) {
  return s.status();
}
}  // namespace status_internal

// Returns a copy of `status` with `context` prepended to its message ("context: message").
inline absl::Status Annotate(const absl::Status& status, std::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), StrCat(context, ": ", status.message()));
}

}  // namespace seedling

#define SEEDLING_STATUS_CONCAT_INNER(a, b) a##b
#define SEEDLING_STATUS_CONCAT(a, b) SEEDLING_STATUS_CONCAT_INNER(a, b)

// Evaluates `expr` (a Status or StatusOr) and returns its status from the enclosing function if not OK.
#define SEEDLING_RETURN_IF_ERROR(expr)                                               \
  do {                                                                               \
    ::absl::Status _seedling_status = ::seedling::status_internal::AsStatus((expr)); \
    if (!_seedling_status.ok()) return _seedling_status;                             \
  } while (0)

// `SEEDLING_ASSIGN_OR_RETURN(auto x, MakeX());` assigns the value or returns the error.
#define SEEDLING_ASSIGN_OR_RETURN(lhs, expr) \
  SEEDLING_ASSIGN_OR_RETURN_IMPL(SEEDLING_STATUS_CONCAT(_seedling_or_, __LINE__), lhs, expr)
#define SEEDLING_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return std::move(tmp).status();       \
  lhs = std::move(tmp).value()
