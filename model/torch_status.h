#pragma once

// Converts exceptions thrown by LibTorch (c10::Error, std::bad_alloc) into absl::Status at module edges
// (docs/contributing.md, "Errors": no exception crosses a module boundary).

#include <c10/util/Exception.h>

#include <new>
#include <string>
#include <string_view>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/strings.h"

namespace seedling::model {

inline absl::Status TorchErrorStatus(std::string_view what, const std::exception& e) {
  const std::string msg = e.what();
  // First line only: c10 messages carry a long C++ backtrace.
  const std::string first = msg.substr(0, msg.find('\n'));
  if (first.find("can't allocate memory") != std::string::npos ||
      first.find("not enough memory") != std::string::npos) {
    return absl::ResourceExhaustedError(StrCat(what, ": out of memory: ", first));
  }
  return absl::InternalError(StrCat(what, ": ", first));
}

// Runs fn() and returns its result, or a Status if LibTorch threw. fn returns a value or an absl::Status /
// absl::StatusOr (passed through).
template <typename T>
struct IsStatusLike : std::false_type {};
template <>
struct IsStatusLike<absl::Status> : std::true_type {};
template <typename T>
struct IsStatusLike<absl::StatusOr<T>> : std::true_type {};

template <typename Fn>
auto CatchTorch(std::string_view what, Fn&& fn) {
  using R = std::decay_t<std::invoke_result_t<Fn>>;
  using Out = std::conditional_t<IsStatusLike<R>::value, R, absl::StatusOr<R>>;
  try {
    return Out(fn());
  } catch (const std::bad_alloc&) {
    return Out(absl::ResourceExhaustedError(StrCat(what, ": out of memory")));
  } catch (const c10::Error& e) {
    return Out(TorchErrorStatus(what, e));
  } catch (const std::exception& e) {
    return Out(TorchErrorStatus(what, e));
  }
}

}  // namespace seedling::model
