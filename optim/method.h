#pragma once

// The local training methods by name, without LibTorch (configuration parsers use it).

#include <string_view>

#include "absl/status/statusor.h"

namespace seedling::optim {

enum class Method {
  kLoraBp,   // LoRA + backprop (AdamW)
  kFwdGrad,  // forward gradient (FwdLLM): directional derivatives along seeded perturbations
  kMezo,     // zeroth-order SPSA (MeZO)
  kKSeed,    // zeroth-order with a finite seed pool (FedKSeed)
  kPepita,   // forward-only PEPITA / MEMPEPITA: error-driven input modulation, no backward
};

// "lora-bp", "fwdgrad", "mezo", "kseed", "pepita".
const char* MethodName(Method m);
absl::StatusOr<Method> ParseMethod(std::string_view name);

// True for the methods whose upload is a dense parameter delta the fedavg family averages (lora-bp, mezo,
// pepita); fwdgrad uploads gradient estimates and kseed seed scalars. The one home of that list: secure
// aggregation and robust aggregation accept exactly these.
bool UploadsDenseDelta(Method m);
// The same by name; false for an unknown name.
bool UploadsDenseDelta(std::string_view name);

}  // namespace seedling::optim
