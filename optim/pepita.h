#pragma once

// pepita: forward-only learning of a LoRA adapter by error-driven input modulation, PEPITA (Dellaferrera &
// Kreiman, ICML'22, Alg. 1) and its memory-saving variant MEMPEPITA (Pau & Aymone, "Forward Learning of Large
// Language Models by Consumer Devices", Electronics 2024). No backward pass, no autograd.
//
// PEPITA on a network h_l = σ(W_l h_{l−1}), with a fixed random feedback matrix F:
//   1. clean forward:     h_l, output error e = softmax(output) − onehot(target);
//   2. modulated forward: on the input x + F e, giving h_l^err;
//   3. update:            W_l ← W_l − η (h_l − h_l^err) (h_{l−1}^err)ᵀ       (hidden layers),
//                         W_L ← W_L − η e (h_{L−1}^err)ᵀ                      (the last layer).
// MEMPEPITA runs a third forward that recomputes the clean activations layer by layer next to the modulated
// ones, so nothing is stored between passes: activation memory is one layer's, at a third more compute.
//
// Our adaptation to a decoder LLM with LoRA (it is ours, not the papers'):
//   * The input is token ids: the modulation is added to the input embeddings (the residual stream after the
//     embedding, width hidden_size), x_t + F e_t at each position t, with e_t the error of position t's
//     next-token prediction (zero where the label is ignored). F (hidden_size × vocab) is never stored: column
//     v is generated when needed from Philox (seed, rng_stream::kFeedback), elements [v·H, (v+1)·H), as
//     F_hv = feedback_scale · sqrt(6 / H) · (2u − 1), u uniform in [0, 1): PEPITA's own initialization
//     (U[−sqrt(6/d_in), sqrt(6/d_in)] times 0.05, d_in the modulated input's width).
//   * Every LoRA-adapted projection y = W x + s B A x counts as a hidden layer: with δ = y_clean − y_err (its
//     output in the clean and the modulated pass) and x_err its input in the modulated pass, PEPITA's weight
//     update is G = Σ_tokens δ x_errᵀ (out × in), which the chain rule projects onto the trainable factors:
//     ΔB = s G Aᵀ, ΔA = s Bᵀ G (computed as s δᵀ(x_err Aᵀ) and s (δ B)ᵀ x_err, never forming G). Then
//     A ← A − η ΔA / N, B ← B − η ΔB / N, N the batch's scored tokens.
//   * The LM head is frozen and has no adapter, so PEPITA's last-layer rule (e (h_{L−1}^err)ᵀ) has nothing to
//     update; the error reaches the adapters only through the modulated input (passing e back through the LM
//     head transposed would be backpropagation, which this method avoids).
//   * LoRA dropout is off during both passes (the two passes must differ only by the modulation).
// Variants: kStored keeps every adapted projection's clean output from pass 1 (activation memory about that of
// backprop without recomputation: N · Σ out_features over the adapted projections); kMem runs passes 2 and 3 as
// one forward over the batch twice (clean rows, then modulated rows), so each projection's δ is formed and
// consumed where it is computed and nothing outlives a layer.

#include <memory>

#include "lora/adapter.h"
#include "optim/trainer.h"

namespace seedling::optim {

struct PepitaOptions {
  enum class Variant {
    kStored,  // PEPITA: two forwards, the clean projection outputs stored between them
    kMem,     // MEMPEPITA: three forwards, the clean activations recomputed next to the modulated ones
  };
  Variant variant = Variant::kStored;
  double lr = 0.1;                 // SGD step on the token-averaged update; PEPITA's own runs: 0.01 with
                                   // momentum 0.9, about 0.1 in effect
  double feedback_scale = 0.05;    // F's scale relative to sqrt(6 / hidden_size) (PEPITA's 0.05); > 0
  uint64_t feedback_seed = 0;      // F = F(feedback_seed): fixed for a run (a federation shares it)
  double max_update_norm = 1.0;    // clip the update's global L2 norm to this (the rule feeds back on B and
                                   // can grow without bound); 0 = off
  int64_t error_chunk_tokens = 0;  // rows of logits per chunk when forming e and F e; 0 = an automatic size
                                   // that keeps a chunk's logits near 16 MiB
  int64_t mlp_chunk_tokens = 0;    // ForwardOptions::mlp_chunk_tokens for the forwards; 0 = all
};

// "pepita" or "mem" (the --pepita-variant values); InvalidArgument otherwise.
absl::StatusOr<PepitaOptions::Variant> ParsePepitaVariant(std::string_view name);
const char* PepitaVariantName(PepitaOptions::Variant variant);

// The feedback matrix F (hidden_size × vocab_size) in full, as the trainer generates it block by block.
// For tests and small models: it is hidden_size · vocab_size floats.
at::Tensor FeedbackMatrix(const model::ModelConfig& config, uint64_t seed, double scale);

// What one PEPITA step computes before the learning rate: the update direction over the adapter's flat buffer
// (ΔA, ΔB of every adapted projection, already divided by the scored-token count), the clean loss, and the
// modulation's size.
struct PepitaUpdate {
  at::Tensor delta;        // (P), flat()'s layout: the step is flat −= lr · delta
  double loss = 0;         // mean clean next-token loss over the scored tokens
  int64_t tokens = 0;      // scored tokens
  double offset_norm = 0;  // ‖F e‖ over the batch (Frobenius)
};

// Runs PEPITA's passes on `batch` with `adapter` (whose parameters are only read) and returns the update.
// InvalidArgument for bad options or tokens; the adapter's training mode is left off.
absl::StatusOr<PepitaUpdate> ComputePepitaUpdate(const model::LlamaModel& model, const lora::LoraAdapter& adapter,
                                                 const model::Batch& batch, const PepitaOptions& options);

// The update for a given input modulation `offset` (B, T, hidden_size): passes 2 (and 3) only, with the clean
// pass as the variant runs it (kStored: one more clean forward here, which ComputePepitaUpdate shares with pass 1).
// ComputePepitaUpdate calls it with offset = F e; a zero offset gives a zero update. The sums are divided by
// `divisor` (the scored-token count, >= 1).
absl::StatusOr<at::Tensor> ModulatedUpdate(const model::LlamaModel& model, const lora::LoraAdapter& adapter,
                                           const at::Tensor& tokens, const at::Tensor& offset, int64_t divisor,
                                           const PepitaOptions& options);

class PepitaTrainer : public LocalTrainer {
 public:
  // `model` and `adapter` must outlive the trainer. InvalidArgument for bad options.
  static absl::StatusOr<std::unique_ptr<PepitaTrainer>> Create(const model::LlamaModel& model,
                                                               lora::LoraAdapter& adapter,
                                                               const PepitaOptions& options);
  Method method() const override { return Method::kPepita; }
  absl::StatusOr<StepResult> Step(const model::Batch& batch) override;
  // ‖delta‖ of the last step (before clipping and the learning rate).
  double last_update_norm() const { return last_update_norm_; }

 private:
  PepitaTrainer(const model::LlamaModel& model, lora::LoraAdapter& adapter, const PepitaOptions& options)
      : model_(model), adapter_(adapter), options_(options) {}

  const model::LlamaModel& model_;
  lora::LoraAdapter& adapter_;
  const PepitaOptions options_;
  double last_update_norm_ = 0;
};

// Options checks shared by the trainer and the free functions.
absl::Status ValidatePepitaOptions(const PepitaOptions& options);

}  // namespace seedling::optim
