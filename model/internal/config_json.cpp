#include "model/internal/config_json.h"

#include <cmath>

#include "base/strings.h"

namespace seedling::model::internal {

absl::Status FieldError(std::string_view field, std::string_view problem) {
  return absl::InvalidArgumentError(StrCat("config.json: field '", field, "' ", problem));
}

absl::StatusOr<int64_t> GetInt(const Json& j, const char* key, std::optional<int64_t> fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return FieldError(key, "is required but missing");
  }
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_number_float()) {
    const double d = it->get<double>();
    // In range before the cast (casting 1e300 to an integer is undefined), then whole.
    if (std::abs(d) < 0x1p62 && d == std::trunc(d)) return static_cast<int64_t>(d);
  }
  return FieldError(key, StrCat("must be an integer, got ", it->dump()));
}

absl::StatusOr<double> GetDouble(const Json& j, const char* key, double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) return FieldError(key, StrCat("must be a number, got ", it->dump()));
  return it->get<double>();
}

absl::StatusOr<bool> GetBool(const Json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return FieldError(key, StrCat("must be true or false, got ", it->dump()));
  return it->get<bool>();
}

const char* ActivationName(MlpActivation activation) {
  return activation == MlpActivation::kGeluTanh ? "gelu_pytorch_tanh" : "silu";
}

absl::Status CheckActivation(const Json& j, const char* key, MlpActivation activation) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  const std::string name = it->is_string() ? it->get<std::string>() : "";
  const bool ok = activation == MlpActivation::kGeluTanh ? name == "gelu_pytorch_tanh" || name == "gelu_new"
                                                         : name == "silu" || name == "swish";
  if (ok) return absl::OkStatus();
  return FieldError(key, StrCat("is ", it->dump(), "; this architecture's MLP uses ", ActivationName(activation)));
}

}  // namespace seedling::model::internal
