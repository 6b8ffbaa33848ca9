#pragma once

// lora-bp: LoRA trained by backpropagation with AdamW (Loshchilov & Hutter 2019), global-norm gradient
// clipping and gradient accumulation over micro-batches. Memory is bounded by the engine's chunked
// cross-entropy and, when asked, per-layer recomputation. Gradients and both moments live in flat
// buffers the size of the adapter's.

#include <memory>

#include "lora/adapter.h"
#include "optim/trainer.h"

namespace seedling::optim {

struct LoraBpOptions {
  double lr = 2e-4;             // AdamW learning rate (the published LoRA starting point, docs/methods.md)
  double beta1 = 0.9;           // first-moment decay
  double beta2 = 0.999;         // second-moment decay
  double eps = 1e-8;            // AdamW epsilon
  double weight_decay = 0.0;    // decoupled weight decay
  double max_grad_norm = 1.0;   // clip the global gradient norm to this; 0 = no clipping
  int64_t micro_batch = 0;      // rows per forward/backward (gradient accumulation); 0 = the whole batch
  bool recompute = false;       // per-layer recomputation in backward
  int64_t stored_layers = 0;    // with recompute, the last layers that keep their activations instead
  int64_t ce_chunk_tokens = 0;  // cross-entropy rows per chunk; 0 = all (tiles bound the memory)
  uint64_t seed = 0;            // LoRA dropout masks
};

class LoraBpTrainer : public LocalTrainer {
 public:
  // `model` and `adapter` must outlive the trainer. InvalidArgument for bad options.
  static absl::StatusOr<std::unique_ptr<LoraBpTrainer>> Create(const model::LlamaModel& model,
                                                               lora::LoraAdapter& adapter,
                                                               const LoraBpOptions& options);
  Method method() const override { return Method::kLoraBp; }
  absl::StatusOr<StepResult> Step(const model::Batch& batch) override;

  // Optimizer state, for checkpointing a run: first and second moments and the AdamW step count.
  const at::Tensor& first_moment() const { return m_; }
  const at::Tensor& second_moment() const { return v_; }
  int64_t adam_steps() const { return t_; }
  double last_grad_norm() const { return last_grad_norm_; }
  TrainerState SaveState() const override;  // + AdamW moments "m", "v" and its step count
  absl::Status RestoreState(const TrainerState& state) override;

 private:
  LoraBpTrainer(const model::LlamaModel& model, lora::LoraAdapter& adapter, const LoraBpOptions& options);

  const model::LlamaModel& model_;
  lora::LoraAdapter& adapter_;
  const LoraBpOptions options_;
  at::Tensor m_, v_;  // (P) AdamW moments
  int64_t t_ = 0;
  double last_grad_norm_ = 0;
};

}  // namespace seedling::optim
