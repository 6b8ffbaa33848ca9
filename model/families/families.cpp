#include <array>

#include "model/families/family.h"

namespace seedling::model::families {
namespace {

template <typename Match>
const FamilySpec* Find(const Match& match) {
  for (const FamilySpec& f : Families()) {
    if (match(f)) return &f;
  }
  return nullptr;
}

}  // namespace

std::span<const FamilySpec> Families() {
  static const std::array<FamilySpec, 12> kFamilies = {Llama(),  Qwen2(), Qwen3(),   Mistral(), Olmo2(), Gemma2(),
                                                       Gemma3(), Phi3(),  GptNeoX(), Gpt2(),    Opt(),   Phi()};
  return kFamilies;
}

std::string ArchitectureNames() {
  std::string names;
  for (const FamilySpec& f : Families()) {
    if (!names.empty()) names += ", ";
    names += f.architecture;
  }
  return names;
}

const FamilySpec* FamilyOfArchitecture(std::string_view architecture) {
  return Find([&](const FamilySpec& f) { return f.architecture == architecture; });
}

const FamilySpec* FamilyOfModelType(std::string_view model_type) {
  return Find([&](const FamilySpec& f) { return f.model_type == model_type; });
}

const FamilySpec* FamilyOfGgufArchitecture(std::string_view gguf_architecture) {
  if (gguf_architecture.empty()) return nullptr;
  return Find([&](const FamilySpec& f) { return f.gguf_architecture == gguf_architecture; });
}

const ModuleNames& ModuleNamesOf(std::string_view architecture) {
  static const ModuleNames kLlama;
  const FamilySpec* f = FamilyOfArchitecture(architecture);
  return f != nullptr && f->names != nullptr ? *f->names : kLlama;
}

}  // namespace seedling::model::families
