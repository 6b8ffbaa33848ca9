#pragma once

// LoRA adapters (Hu et al. 2021): for each targeted projection W (out × in) of each decoder layer,
//   y = W x + (alpha / r) · B (A dropout(x)),   A (r × in), B (out × r), B = 0 at initialization,
// so a fresh adapter leaves the model unchanged. With use_rslora the scale is alpha / sqrt(r).
// With LoraConfig::kind = AdapterKind::kBias (BitFit) the adapter holds one bias b (out), zero at
// initialization, per targeted projection instead: y = W x + bias + b.
//
// All trainable numbers live in one flat fp32 buffer (llm.c style) with named views, so an optimizer,
// a perturbation (base/philox.h) or a codec sees one contiguous vector. The order of the views is the wire
// order: layers ascending, then projections in q, k, v, o, gate, up, down order, A before B.
//
// Save/load uses the PEFT format (adapter_config.json + adapter_model.safetensors with names like
// "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), readable by Hugging Face PEFT and
// llama.cpp's convert_lora_to_gguf.py.

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lora/lora_config.h"
#include "model/config.h"
#include "model/llama.h"

namespace seedling::lora {

// One A or B matrix (LoRA) or one bias vector (BitFit, AdapterKind::kBias) inside the flat buffer.
struct LoraView {
  std::string name;  // PEFT name, e.g. "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"
  int64_t layer = 0;
  model::Projection projection = model::Projection::kQ;
  bool is_a = true;  // lora_A (r × in) or lora_B (out × r); false for a bias
  int64_t rows = 0, cols = 0;
  int64_t offset = 0;    // first element in the flat buffer
  bool is_bias = false;  // BitFit: a (1 × out) bias, saved as the 1-D "<projection>.bias"
  int64_t numel() const { return rows * cols; }
};

class LoraAdapter : public model::ProjectionAdapter {
 public:
  // A new adapter for `model` (A random from config.init_seed, B zero), on the projections TargetsFor maps
  // config.targets to (config() holds them). InvalidArgument for a bad config.
  static absl::StatusOr<std::unique_ptr<LoraAdapter>> Create(const model::ModelConfig& model, const LoraConfig& config);

  const LoraConfig& config() const { return config_; }
  const model::ModelConfig& model() const { return model_; }
  const std::vector<LoraView>& views() const { return views_; }
  int64_t numel() const { return flat_.numel(); }

  // The flat fp32 buffer (1-D). Set requires_grad on it to train by backprop; write it in place to perturb.
  at::Tensor& flat() { return flat_; }
  const at::Tensor& flat() const { return flat_; }
  // A view of one matrix (shares storage with flat()); between BeginGradients and TakeGradients, the
  // matrix's own autograd leaf.
  at::Tensor Matrix(const LoraView& view) const;

  // Backprop: makes each A and B its own autograd leaf sharing flat()'s storage, so a use's backward
  // produces a gradient of the matrix's size. Through views of a flat leaf, every use's backward built a
  // gradient the size of the whole buffer and added it (SliceBackward; 4% of a SmolLM2-135M step).
  // Gradients accumulate over backward calls (micro-batches) until TakeGradients.
  void BeginGradients();
  // The accumulated gradients in flat()'s layout (zeros where a matrix got none); ends the leaves.
  at::Tensor TakeGradients();
  // Ends the leaves, discarding their gradients (after a failed step).
  void EndGradients() { leaves_.clear(); }

  // Temporarily computes with `replacement` (same shape, e.g. a forward-mode dual of flat()) instead of
  // flat(); pass an undefined tensor to go back. Not thread-safe with concurrent forwards.
  void SetFlatOverride(at::Tensor replacement) { override_ = std::move(replacement); }

  // Forward-mode directions for LossTangents (model/llama.h): direction k is z(seeds[k]), the standard
  // normal perturbation stream (base/philox.h, rng_stream::kPerturbation) over the flat buffer, the same
  // z that optim's AddSeededNormal adds. Each layer's slice of the K directions is generated when a
  // forward reaches the layer, so at most one layer's K tangents exist. An empty list clears them.
  void SetTangentSeeds(std::vector<uint64_t> seeds);

  // Perturbed copies for batched zeroth-order probes (MobiZO-style): with n = seeds.size() > 0, a forward's
  // batch is n equal groups of sequences, and group i is computed with θ + scales[i] · z(seeds[i]) (the
  // same stream and arithmetic as optim::ParameterSet::AddNormal: θ + float(scale · z)), while θ itself
  // is never written. Each layer's n perturbed slices are built when a forward reaches the layer. Empty
  // lists switch it off. Not together with tangents.
  void SetPerturbations(std::vector<uint64_t> seeds, std::vector<float> scales);
  int64_t PerturbationCount() const {
    return slice_mode_ == SliceMode::kPerturbations ? static_cast<int64_t>(slice_seeds_.size()) : 0;
  }

  // Dropout is active only in training mode. Masks come from Philox keyed by (dropout_seed, step, layer,
  // projection), so recomputation in backward regenerates the same mask; call SetStep before each step.
  void SetTraining(bool training) { training_ = training; }
  void SetStep(uint64_t dropout_seed, uint64_t step) {
    dropout_seed_ = dropout_seed;
    step_ = step;
  }

  // model::ProjectionAdapter
  at::Tensor Apply(int64_t layer, model::Projection p, const at::Tensor& x, const at::Tensor& base_out) const override;
  std::vector<at::Tensor> LayerTensors(int64_t layer) const override;
  bool AdaptsLayer(int64_t layer) const override;
  int64_t TangentCount() const override {
    return slice_mode_ == SliceMode::kTangents ? static_cast<int64_t>(slice_seeds_.size()) : 0;
  }
  at::Tensor ApplyTangents(int64_t layer, model::Projection p, const at::Tensor& x,
                           const at::Tensor& base_out) const override;

  // W += scale · B A for every adapted projection (Merge) or W -= ... (Unmerge), in place. The model's
  // targeted weights must be fp32 (FailedPrecondition otherwise, e.g. with WeightPrecision::kStored).
  // BitFit adds b to the projection's own bias, which must exist (FailedPrecondition otherwise).
  // After Merge, run the model without the adapter; Unmerge restores W up to fp32 rounding.
  absl::Status Merge(model::ModelWeights& weights) const;
  absl::Status Unmerge(model::ModelWeights& weights) const;

 private:
  LoraAdapter(model::ModelConfig model, LoraConfig config);
  const LoraView* Find(int64_t layer, model::Projection p, bool is_a) const;
  // Views per adapted projection: A and B (2), or the bias (1).
  int64_t ViewsPerProjection() const { return config_.kind == AdapterKind::kBias ? 1 : 2; }
  // Apply, ApplyPerturbed and ApplyTangents of a BitFit adapter: base_out plus the (perturbed, tangent) bias.
  at::Tensor ApplyBias(const LoraView& view, const at::Tensor& base_out) const;
  at::Tensor ApplyBiasPerturbed(int64_t layer, const LoraView& view, const at::Tensor& base_out) const;
  at::Tensor ApplyBiasTangents(int64_t layer, const LoraView& view, const at::Tensor& base_out) const;
  absl::Status AddBiasDelta(model::ModelWeights& weights, double sign) const;
  absl::Status AddDelta(model::ModelWeights& weights, double sign) const;
  // The dropout-masked input of projection `p` of `layer` (x itself outside training or without dropout);
  // `mask_shape` is the primal's shape, the mask is shared by all of x's slices when x is stacked.
  at::Tensor Dropout(int64_t layer, model::Projection p, const at::Tensor& x, at::IntArrayRef mask_shape) const;
  // The tangent directions z(seed_k) or the perturbed parameters θ + scale_k z(seed_k) of the views of
  // `layer`, one row per seed: (n, span) where span covers the layer's views.
  struct LayerSlices {
    int64_t layer = -1;
    int64_t offset = 0;  // flat offset of column 0
    at::Tensor values;   // (n, span)
  };
  const LayerSlices& SlicesOf(int64_t layer) const;
  // (n, rows, cols) of `view` within the current layer's slices.
  at::Tensor SliceMatrices(const LayerSlices& slices, const LoraView& view, at::ScalarType dtype) const;
  // Apply with perturbed copies: x (n·B, ..., in), group i through its own A_i, B_i.
  at::Tensor ApplyPerturbed(int64_t layer, model::Projection p, const at::Tensor& x, const at::Tensor& base_out) const;

  // Constant after construction.
  model::ModelConfig model_;
  LoraConfig config_;
  std::vector<LoraView> views_;
  // index_[layer * kNumProjections + projection] = index of the A view in views_, or -1.
  std::vector<int32_t> index_;

  at::Tensor flat_;
  at::Tensor override_;
  std::vector<at::Tensor> leaves_;  // one per view between BeginGradients and TakeGradients
  enum class SliceMode { kNone, kTangents, kPerturbations };
  SliceMode slice_mode_ = SliceMode::kNone;
  std::vector<uint64_t> slice_seeds_;
  std::vector<float> slice_scales_;  // kPerturbations
  mutable LayerSlices slices_;       // cache of the last layer's slices (not thread-safe, like override_)
  bool training_ = false;
  uint64_t dropout_seed_ = 0;
  uint64_t step_ = 0;
};

// Writes `adapter` in PEFT format into `dir` (created if missing): adapter_config.json and
// adapter_model.safetensors (F32). `base_model` goes to base_model_name_or_path.
absl::Status SavePeft(const LoraAdapter& adapter, const std::string& dir, const std::string& base_model = "");

// Loads a PEFT LoRA adapter for `model`. Accepts adapters written by PEFT: target_modules as a list of
// module names, optional layers_to_transform, use_rslora, any rank, F32/F16/BF16 tensors. Errors name what
// does not fit: a target this model lacks, a tensor whose shape disagrees with the model or the rank
// ("...q_proj.lora_A.weight has shape [16, 576], expected [8, 576]"), missing tensors, unsupported
// options (rank_pattern, alpha_pattern, DoRA, a regex target_modules, bias other than "none").
absl::StatusOr<std::unique_ptr<LoraAdapter>> LoadPeft(const std::string& dir, const model::ModelConfig& model);

}  // namespace seedling::lora
