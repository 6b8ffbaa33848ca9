#include <array>
#include <functional>

#include "model/families/family.h"

namespace seedling::model::families {
namespace {

const FamilySpec* Find(std::function<bool(const FamilySpec&)> match) {
  for (const FamilySpec& f : Families()) {
    if (match(f)) return &f;
  }
  return nullptr;
}

}  // namespace

std::span<const FamilySpec> Families() {
  static const std::array<FamilySpec, 6> kFamilies = {Llama(), Qwen2(), Qwen3(), Mistral(), Olmo2(), Gemma3()};
  return kFamilies;
}

const FamilySpec* FamilyOfArchitecture(std::string_view architecture) {
  return Find([&](const FamilySpec& f) { return f.architecture == architecture; });
}

const FamilySpec* FamilyOfModelType(std::string_view model_type) {
  return Find([&](const FamilySpec& f) { return f.model_type == model_type; });
}

const FamilySpec* FamilyOfGgufArchitecture(std::string_view gguf_architecture) {
  return Find([&](const FamilySpec& f) { return f.gguf_architecture == gguf_architecture; });
}

}  // namespace seedling::model::families
