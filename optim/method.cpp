#include "optim/method.h"

#include "base/strings.h"

namespace seedling::optim {

const char* MethodName(Method m) {
  switch (m) {
    case Method::kLoraBp:
      return "lora-bp";
    case Method::kFwdGrad:
      return "fwdgrad";
    case Method::kMezo:
      return "mezo";
    case Method::kKSeed:
      return "kseed";
    case Method::kPepita:
      return "pepita";
  }
  return "?";
}

absl::StatusOr<Method> ParseMethod(std::string_view name) {
  for (Method m : {Method::kLoraBp, Method::kFwdGrad, Method::kMezo, Method::kKSeed, Method::kPepita}) {
    if (name == MethodName(m)) return m;
  }
  return absl::InvalidArgumentError(
      StrCat("unknown method '", name, "' (expected lora-bp, fwdgrad, mezo, kseed or pepita)"));
}

bool UploadsDenseDelta(Method m) { return m == Method::kLoraBp || m == Method::kMezo || m == Method::kPepita; }

bool UploadsDenseDelta(std::string_view name) {
  absl::StatusOr<Method> m = ParseMethod(name);
  return m.ok() && UploadsDenseDelta(*m);
}

}  // namespace seedling::optim
