#include "optim/parameters.h"

#include "base/check.h"
#include "base/philox.h"
#include "base/strings.h"

namespace seedling::optim {
namespace {

std::span<float> Span(const at::Tensor& t) {
  return std::span<float>(t.data_ptr<float>(), static_cast<size_t>(t.numel()));
}

}  // namespace

ParameterSet ParameterSet::Adapter(lora::LoraAdapter& adapter) {
  ParameterSet set;
  SEEDLING_CHECK(adapter.flat().is_contiguous() && adapter.flat().scalar_type() == at::kFloat);
  set.slices_.push_back({"lora", adapter.flat(), 0});
  set.numel_ = adapter.flat().numel();
  return set;
}

absl::StatusOr<ParameterSet> ParameterSet::AllWeights(const model::ModelWeights& weights,
                                                      const model::ModelConfig& config) {
  ParameterSet set;
  for (const model::NamedWeight& w : model::NamedWeights(weights, config)) {
    if (w.tensor.scalar_type() != at::kFloat || !w.tensor.is_contiguous()) {
      return absl::FailedPreconditionError(StrCat("full-parameter training needs contiguous fp32 weights; '", w.name,
                                                  "' is ", std::string(c10::toString(w.tensor.scalar_type())),
                                                  " (load with fp32 weights)"));
    }
    set.slices_.push_back({w.name, w.tensor, set.numel_});
    set.numel_ += w.tensor.numel();
  }
  return set;
}

void ParameterSet::AddNormal(uint64_t seed, float scale) const {
  at::NoGradGuard no_grad;
  for (const Slice& s : slices_) {
    seedling::AddNormal({seed, rng_stream::kPerturbation}, static_cast<uint64_t>(s.offset), scale, Span(s.tensor));
  }
}

void ParameterSet::AddDense(const at::Tensor& v, float scale) const {
  SEEDLING_CHECK(v.numel() == numel_);
  at::NoGradGuard no_grad;
  for (const Slice& s : slices_) {
    s.tensor.view({-1}).add_(v.narrow(0, s.offset, s.tensor.numel()), scale);
  }
}

at::Tensor ParameterSet::Flatten() const {
  at::NoGradGuard no_grad;
  at::Tensor out = at::empty({numel_}, at::kFloat);
  for (const Slice& s : slices_) out.narrow(0, s.offset, s.tensor.numel()).copy_(s.tensor.view({-1}));
  return out;
}

void ParameterSet::Assign(const at::Tensor& flat) const {
  SEEDLING_CHECK(flat.numel() == numel_);
  at::NoGradGuard no_grad;
  for (const Slice& s : slices_) s.tensor.view({-1}).copy_(flat.narrow(0, s.offset, s.tensor.numel()));
}

bool ParameterSet::AllFinite() const {
  for (const Slice& s : slices_) {
    if (!at::isfinite(s.tensor).all().item<bool>()) return false;
  }
  return true;
}

void AddSeededNormal(at::Tensor& dst, uint64_t seed, float scale) {
  SEEDLING_CHECK(dst.is_contiguous() && dst.scalar_type() == at::kFloat);
  seedling::AddNormal({seed, rng_stream::kPerturbation}, 0, scale, Span(dst));
}

uint64_t StepSeed(uint64_t run_seed, uint64_t step) {
  const auto w = Philox4x32({static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                             static_cast<uint32_t>(rng_stream::kStepSeeds), 0},
                            {static_cast<uint32_t>(run_seed), static_cast<uint32_t>(run_seed >> 32)});
  return w[0] | (static_cast<uint64_t>(w[1]) << 32);
}

}  // namespace seedling::optim
