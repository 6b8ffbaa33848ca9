#pragma once

// The parameters a local method trains, seen as one long fp32 vector: the LoRA adapter's flat buffer, or
// every weight of the model (full-parameter zeroth-order methods). Element i of the set is element i of a
// Philox stream (base/philox.h), so a perturbation z(seed) is defined over the whole set and regenerated
// anywhere from the seed alone.

#include <ATen/ATen.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lora/adapter.h"
#include "model/config.h"
#include "model/weights.h"

namespace seedling::optim {

class ParameterSet {
 public:
  struct Slice {
    std::string name;
    at::Tensor tensor;   // contiguous fp32; shares storage with the model / adapter
    int64_t offset = 0;  // first element of this slice in the set
  };

  // The adapter's flat buffer (one slice).
  static ParameterSet Adapter(lora::LoraAdapter& adapter);
  // Every weight of the model in checkpoint order (a tied LM head counted once). FailedPrecondition if a
  // weight is not fp32 or not contiguous (load with WeightPrecision::kFloat32).
  static absl::StatusOr<ParameterSet> AllWeights(const model::ModelWeights& weights, const model::ModelConfig& config);

  int64_t numel() const { return numel_; }
  const std::vector<Slice>& slices() const { return slices_; }

  // θ += scale · z(seed), z from the perturbation stream (rng_stream::kPerturbation), in place.
  void AddNormal(uint64_t seed, float scale) const;
  // θ += scale · v for a dense vector v of numel() fp32 values.
  void AddDense(const at::Tensor& v, float scale) const;
  // A copy of all values as one 1-D tensor.
  at::Tensor Flatten() const;
  // Overwrites all values from a 1-D tensor of numel() elements.
  void Assign(const at::Tensor& flat) const;
  bool AllFinite() const;

 private:
  std::vector<Slice> slices_;
  int64_t numel_ = 0;
};

// dst (1-D fp32) += scale · z(seed) over elements [0, dst.numel()) of the perturbation stream.
void AddSeededNormal(at::Tensor& dst, uint64_t seed, float scale);

// The seed of step `step` of a run: a fixed function of (run_seed, step), the same everywhere.
uint64_t StepSeed(uint64_t run_seed, uint64_t step);

}  // namespace seedling::optim
