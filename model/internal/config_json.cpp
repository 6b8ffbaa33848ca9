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
  switch (activation) {
    case MlpActivation::kSilu:
      return "silu";
    case MlpActivation::kGeluTanh:
      return "gelu_pytorch_tanh";
    case MlpActivation::kGelu:
      return "gelu";
    case MlpActivation::kRelu:
      return "relu";
  }
  return "?";
}

const char* GeluNewActivationName(MlpActivation activation) {
  return activation == MlpActivation::kGeluTanh ? "gelu_new" : ActivationName(activation);
}

namespace {

// The activation a config.json name denotes; nullopt for names this block does not compute.
std::optional<MlpActivation> ActivationOfName(std::string_view name) {
  if (name == "silu" || name == "swish") return MlpActivation::kSilu;
  // gelu_new and gelu_fast are the same tanh approximation, written two ways.
  if (name == "gelu_pytorch_tanh" || name == "gelu_new" || name == "gelu_fast") return MlpActivation::kGeluTanh;
  if (name == "gelu") return MlpActivation::kGelu;
  if (name == "relu") return MlpActivation::kRelu;
  return std::nullopt;
}

}  // namespace

absl::Status CheckActivation(const Json& j, const char* key, MlpActivation activation) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (it->is_string() && ActivationOfName(it->get<std::string>()) == activation) return absl::OkStatus();
  return FieldError(key, StrCat("is ", it->dump(), "; this architecture's MLP uses ", ActivationName(activation)));
}

absl::StatusOr<MlpActivation> ParseActivation(const Json& j, const char* key, MlpActivation fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  const std::optional<MlpActivation> a = it->is_string() ? ActivationOfName(it->get<std::string>()) : std::nullopt;
  if (!a || *a == MlpActivation::kSilu) {
    return FieldError(key,
                      StrCat("is ", it->dump(), "; supported: gelu, gelu_new (gelu_pytorch_tanh, gelu_fast), relu"));
  }
  return *a;
}

}  // namespace seedling::model::internal
