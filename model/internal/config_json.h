#pragma once

// Reading config.json fields with errors that name the field: shared by the config parser
// (model/config.cpp) and the model families (model/families/). No LibTorch.

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace seedling::model::internal {

using Json = nlohmann::json;

// InvalidArgument "config.json: field '<field>' <problem>".
absl::Status FieldError(std::string_view field, std::string_view problem);

// The field's value; `fallback` when it is missing or null (an error naming the field when there is none).
// An integer written as a whole float (2048.0) is accepted.
absl::StatusOr<int64_t> GetInt(const Json& j, const char* key, std::optional<int64_t> fallback);
absl::StatusOr<double> GetDouble(const Json& j, const char* key, double fallback);
absl::StatusOr<bool> GetBool(const Json& j, const char* key, bool fallback);

// The names config.json gives `activation` ("silu" / "swish"; "gelu_pytorch_tanh" / "gelu_new" / "gelu_fast";
// "gelu"; "relu"), and a check that field `key`, when present, names it: InvalidArgument naming the field and
// what the block computes.
const char* ActivationName(MlpActivation activation);
// The name for families whose own configs write GELU's tanh approximation as "gelu_new" (GPT-2, Phi).
const char* GeluNewActivationName(MlpActivation activation);
absl::Status CheckActivation(const Json& j, const char* key, MlpActivation activation);
// The plain MLP's activation field `key` names (`fallback` when absent): gelu, the tanh GELUs or relu;
// InvalidArgument naming the field for anything else.
absl::StatusOr<MlpActivation> ParseActivation(const Json& j, const char* key, MlpActivation fallback);

}  // namespace seedling::model::internal
