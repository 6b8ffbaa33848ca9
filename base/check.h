#pragma once

// Invariant checks that abort loudly with file:line (docs/contributing.md, "Errors"). Use them for broken invariants
// (programming errors); errors caused by input, the environment or a peer return an absl::Status instead.

#include <cstdio>
#include <cstdlib>

namespace seedling::check_internal {
[[noreturn]] inline void Fail(const char* file, int line, const char* expr, const char* msg) {
  std::fprintf(stderr, "%s:%d: check failed: %s%s%s\n", file, line, expr, msg[0] ? ": " : "", msg);
  std::fflush(stderr);
  std::abort();
}
}  // namespace seedling::check_internal

// SEEDLING_CHECK(cond) or SEEDLING_CHECK(cond, "message"): aborts when `cond` is false, in every build type.
#define SEEDLING_CHECK(cond, ...)                                                  \
  do {                                                                             \
    if (!(cond)) [[unlikely]]                                                      \
      ::seedling::check_internal::Fail(__FILE__, __LINE__, #cond, "" __VA_ARGS__); \
  } while (0)
