#pragma once

// Small helpers the GGUF config reader (model/gguf_config.cpp) and the GGUF weight and tokenizer reader
// (model/gguf_model.cpp) share. No LibTorch.

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/strings.h"
#include "model/gguf_reader.h"

namespace seedling::model::internal {

// InvalidArgument naming the file: "GGUF file '<path>': <message>".
inline absl::Status FileError(const GgufFile& f, std::string_view message) {
  return absl::InvalidArgumentError(StrCat("GGUF file '", f.path(), "': ", message));
}

// A getter's value, or nullopt when the key is absent; a wrong type stays an error.
template <typename T>
absl::StatusOr<std::optional<T>> Optional(absl::StatusOr<T> value) {
  if (value.ok()) return std::optional<T>(*std::move(value));
  if (absl::IsNotFound(value.status())) return std::optional<T>();
  return value.status();
}

// "[2, 3]".
inline std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += StrCat(i > 0 ? ", " : "", shape[i]);
  return s + "]";
}

}  // namespace seedling::model::internal
