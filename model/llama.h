#pragma once

// The causal decoder of every supported family (model/families/: Llama, TinyLlama, SmolLM/SmolLM2, MobileLLM,
// Qwen2/2.5, Qwen3, Mistral, OLMo 2, Gemma 2/3, Phi-1/1.5/2, Phi-3, GPT-NeoX, GPT-2, OPT) on LibTorch, CPU, fp32
// compute, composed as ModelConfig describes the block: RMSNorm or LayerNorm and where the block normalizes,
// RoPE (whole or partial heads) or learned positions, grouped-query attention with windows and soft-caps, a gated
// or plain MLP, sequential or parallel residual, biases, fused projections, a tied or untied LM head (with a bias).
//
// Three ways to run it:
//   * Hidden / Logits / Loss: the full sequence, for training and evaluation. Loss uses the chunked
//     cross-entropy (never the whole tokens × vocab logits) and, with ForwardOptions::recompute, keeps only
//     each decoder layer's input for backward.
//   * ForwardCached with a KvCache: incremental decoding for generation.
// The model knows nothing about federation or LoRA; an adapter (lora/) plugs in through ProjectionAdapter.
//
// Thread-safety: a const LlamaModel may be used by many threads at once (each with its own KvCache).
// Autograd graphs built from it reference its weights: the model must outlive them.

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/frozen_linear.h"
#include "model/kernels.h"
#include "model/weights.h"

namespace seedling::model {

// Adds a learned delta to projections (LoRA and friends live in lora/, not here).
class ProjectionAdapter {
 public:
  virtual ~ProjectionAdapter() = default;
  // Returns base_out plus this adapter's contribution for projection `p` of decoder layer `layer`.
  //   x (B, T, in), base_out (B, T, out). Must be deterministic (it is re-run under recomputation).
  virtual at::Tensor Apply(int64_t layer, Projection p, const at::Tensor& x, const at::Tensor& base_out) const = 0;
  // Every tensor Apply uses for `layer` that may require grad (recomputation needs the list).
  virtual std::vector<at::Tensor> LayerTensors(int64_t layer) const = 0;
  // Whether the adapter changes any projection of `layer`. Below the lowest layer it adapts, the model
  // runs as the base model: no tangents to carry, no graph to record, and every perturbed copy of a batch
  // computes the same values there. The default (every layer) is always correct.
  virtual bool AdaptsLayer(int64_t layer) const { return true; }

  // Forward mode with stacked tangents (model/kernels.h): the adapter's parameters move along
  // TangentCount() = K directions of its own (set through the adapter's API). x (1+K, ..., in) and
  // base_out (1+K, ..., out) hold the primal in slice 0 and in slice k the tangent along direction k;
  // returns base_out plus this adapter's contribution, differentiated along each direction.
  virtual int64_t TangentCount() const = 0;
  virtual at::Tensor ApplyTangents(int64_t layer, Projection p, const at::Tensor& x,
                                   const at::Tensor& base_out) const = 0;
};

// The base model's output after its first `layers` decoder layers for `tokens` (LlamaModel::BaseLayers).
struct BasePrefix {
  int64_t layers = 0;  // 0 = none
  at::Tensor tokens;   // (B, T) the prefix was computed for
  at::Tensor hidden;   // (B, T, H)
};

struct ForwardOptions {
  const ProjectionAdapter* adapter = nullptr;  // borrowed; null = base model only
  bool recompute = false;  // per-layer activation checkpointing (matters only when autograd records)
  // With recompute: this many of the last layers keep their activations instead (partial checkpointing,
  // for a budget between all and none); the first num_hidden_layers - stored_layers are recomputed.
  int64_t stored_layers = 0;
  int64_t ce_chunk_tokens = 0;  // rows of the cross-entropy per chunk; 0 = all (memory is bounded by tiles)
  // Forward-mode AD level whose tangents the frozen projections propagate (model/frozen_linear.h); -1 =
  // none. LossDirectionalDerivative sets it.
  int64_t forward_level = -1;
  // Without autograd (inference, zeroth-order probes), run the MLP over chunks of this many tokens so its
  // (tokens × intermediate) transients stay small; 0 = all tokens at once (fastest).
  int64_t mlp_chunk_tokens = 0;
  // Hidden / Loss: added to the embeddings (B, T, hidden_size) before the first decoder layer, e.g. PEPITA's
  // error-modulated input (optim/pepita.h); undefined = none. Must have the embeddings' shape.
  at::Tensor input_offset;
  // Hidden / Loss without input_offset, on exactly base_prefix.tokens: start after the prefix's layers from
  // its output instead of running them. For several forwards on one batch whose adapter leaves those
  // layers alone (each in-place zeroth-order probe's two forwards); other tokens ignore it.
  BasePrefix base_prefix;
};

// Keys and values of past positions, for ForwardCached. Preallocated to `max_length` positions.
class KvCache {
 public:
  KvCache(const ModelConfig& config, int64_t batch, int64_t max_length);
  int64_t length() const { return length_; }
  int64_t max_length() const { return max_length_; }
  int64_t batch() const { return batch_; }
  void Reset() { length_ = 0; }
  int64_t bytes() const;

 private:
  friend class LlamaModel;
  int64_t batch_;
  int64_t max_length_;
  int64_t length_ = 0;
  std::vector<at::Tensor> k_, v_;  // per layer (B, Hkv, max_length, D)
};

// Summed next-token loss and the number of tokens it covers (mean = sum / tokens).
struct LossOutput {
  at::Tensor sum;      // scalar, differentiable
  int64_t tokens = 0;  // positions with a label
  at::Tensor mean() const { return tokens > 0 ? sum / static_cast<double>(tokens) : sum; }
};

class LlamaModel {
 public:
  // Loads <dir>/config.json and the safetensors weights (single file or sharded). The weights are mapped
  // copy-on-write: writing a weight in place never changes the file.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& dir, const LoadOptions& options = {});
  // Takes ownership of `weights` after checking their shapes against `config`.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(ModelConfig config, ModelWeights weights);

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }

  // Streamed weights: every multiply releases each tile of a frozen matrix once it is decoded, so the
  // process keeps about one tile of each matrix resident instead of all of them (WeightPages); the pages
  // stay in the OS page cache and fault back in on the next pass. Only weights mapped read-only can be
  // streamed (streamable()): a q8_0 / q4_0 weight cache, or a GGUF file loaded with any precision but fp32
  // (its matrices in a 16-bit or block format that are used in place); elsewhere the setting does nothing. The
  // LM head (a tied embedding too) streams with the layers' matrices in the cross-entropy's vocabulary
  // walk; an untied embedding is only gathered by row, and norms and biases stay resident. Streaming changes
  // what stays resident, never a result, so models shared by threads (the simulator's devices) may set it
  // at any time.
  bool streamable() const { return pages_ != nullptr && !pages_->empty(); }
  // const: it changes what stays resident, never a result (see above).
  void set_stream_weights(bool on) const { stream_weights_.store(on, std::memory_order_relaxed); }
  bool stream_weights() const { return stream_weights_.load(std::memory_order_relaxed) && streamable(); }
  ModelWeights& mutable_weights() { return weights_; }

  // tokens (B, T) int64. Returns the final-normed hidden states (B, T, H).
  // InvalidArgument for a wrong rank/dtype or a token id outside [0, vocab_size).
  absl::StatusOr<at::Tensor> Hidden(const at::Tensor& tokens, const ForwardOptions& options = {}) const;

  // Logits (B, T, V) for every position. Materializes the full logits: for short sequences, tests and
  // generation; training and evaluation use Loss.
  absl::StatusOr<at::Tensor> Logits(const at::Tensor& tokens, const ForwardOptions& options = {}) const;

  // Next-token cross-entropy. labels (B, T) int64 follow the Hugging Face convention: labels[b, t] is the
  // token expected at position t (usually tokens[b, t]) or -100 to exclude it; position t's hidden state
  // is scored against labels[b, t + 1]. Differentiable (w.r.t. whatever requires grad).
  absl::StatusOr<LossOutput> Loss(const at::Tensor& tokens, const at::Tensor& labels,
                                  const ForwardOptions& options = {}) const;

  // Loss of each of `groups` equal consecutive groups of sequences: tokens and labels (groups × B, T), e.g.
  // one batch repeated for an adapter's perturbed copies (lora::LoraAdapter::SetPerturbations). One forward
  // for all groups; each loss is computed as Loss computes it on its group alone. No autograd. When the
  // groups' tokens are equal and the adapter leaves the lowest layers alone (lora "top:N"), those layers
  // run once, on one group, and their output is copied to the others.
  absl::StatusOr<std::vector<LossOutput>> GroupLosses(const at::Tensor& tokens, const at::Tensor& labels,
                                                      int64_t groups, const ForwardOptions& options = {}) const;

  // The mean loss and its directional derivative, for forward-gradient methods: something in the forward
  // (typically the adapter's parameters) is a forward-mode dual tensor at `level`, and the derivative is
  // that of the mean loss along its tangent. The LM head and cross-entropy are differentiated by hand
  // (ChunkedCrossEntropyJvp), never materializing more than a chunk of logits and their tangent.
  struct LossJvp {
    double loss = 0;        // mean over scored tokens
    double derivative = 0;  // directional derivative of the mean
    int64_t tokens = 0;
  };
  absl::StatusOr<LossJvp> LossDirectionalDerivative(const at::Tensor& tokens, const at::Tensor& labels,
                                                    const ForwardOptions& options, uint64_t level) const;

  // The mean loss and its directional derivatives along the adapter's K = TangentCount() parameter
  // directions, from one batched forward in which every activation carries its K tangents as extra slices
  // (model/kernels.h, "stacked tangents"): each frozen matrix multiplies the primal and all tangents in one
  // call (one decode per tile for quantized weights), and the LM head is multiplied once, for the loss's
  // gradient w.r.t. the final hidden states, whose dot product with each hidden-state tangent is that
  // direction's derivative. Needs options.adapter with TangentCount() >= 1. mlp_chunk_tokens applies (the
  // MLP of a chunk of tokens runs with all its slices at once). Layers below the adapter's lowest adapted
  // layer (ProjectionAdapter::AdaptsLayer) run on the primal alone: their tangents are zero. No autograd.
  struct LossJvps {
    double loss = 0;                  // mean over scored tokens
    std::vector<double> derivatives;  // K directional derivatives of the mean
    int64_t tokens = 0;
  };
  absl::StatusOr<LossJvps> LossTangents(const at::Tensor& tokens, const at::Tensor& labels,
                                        const ForwardOptions& options) const;

  // Runs tokens (B, t) at positions [cache.length(), cache.length() + t), appends their keys and values to
  // the cache, and returns logits (B, t, V), or (B, 1, V) for the last position only with last_only.
  // OutOfRange if the cache would overflow; InvalidArgument for bad tokens or a batch mismatch.
  absl::StatusOr<at::Tensor> ForwardCached(const at::Tensor& tokens, KvCache& cache, bool last_only = false,
                                           const ForwardOptions& options = {}) const;

  // Final hidden states -> logits, for hidden (..., H).
  at::Tensor LmHead(const at::Tensor& hidden) const;

  // The base model's output after the layers below options.adapter's lowest adapted layer
  // (ProjectionAdapter::AdaptsLayer), for tokens (B, T): what every forward on these tokens computes
  // there whatever the adapter's values. layers = 0 (nothing computed) when the adapter adapts layer 0,
  // without an adapter, or with an input_offset. No autograd.
  absl::StatusOr<BasePrefix> BaseLayers(const at::Tensor& tokens, const ForwardOptions& options) const;

  // One decoder layer on x (B, T, H) at positions given by rope; exposed for tests and benchmarks.
  at::Tensor DecoderLayer(int64_t layer, const at::Tensor& x, const RopeTables& rope,
                          const ForwardOptions& options) const;

 private:
  LlamaModel(ModelConfig config, ModelWeights weights);
  absl::Status ValidateTokens(const at::Tensor& tokens) const;
  absl::Status ValidateLabels(const at::Tensor& tokens, const at::Tensor& labels) const;
  // InvalidArgument when a forward would reach position `end` past a learned position table.
  absl::Status ValidatePositions(int64_t end) const;
  // The token embeddings of positions [start, start + T), with the learned positions added (GPT-2, OPT).
  at::Tensor Embed(const at::Tensor& tokens, int64_t start) const;
  // RoPE on q or k (B, heads, T, D) or stacked; identity for a model with learned positions.
  at::Tensor Rotate(const at::Tensor& x, const RopeTables& rope) const;
  // kGraphOnly: a recomputation in backward (Checkpoint), which reads only the layer's graph, so the last
  // projection skips its multiply (FrozenLinearGraph) and the layer's output values are unspecified.
  enum class LayerOutput { kValues, kGraphOnly };
  at::Tensor Project(int64_t layer, Projection p, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                     const ForwardOptions& options, LayerOutput output = LayerOutput::kValues) const;
  at::Tensor Mlp(int64_t layer, const at::Tensor& x, const ForwardOptions& options,
                 LayerOutput output = LayerOutput::kValues) const;
  at::Tensor MlpRows(int64_t layer, const at::Tensor& x, const ForwardOptions& options,
                     LayerOutput output = LayerOutput::kValues) const;
  // RoPE tables of the global layers and, with ModelConfig::rope_local_theta, of the local ones, in `dtype`.
  struct LayerRopes {
    RopeTables global, local;
    const RopeTables& For(const ModelConfig& c, int64_t layer) const {
      return local.cos.defined() && c.LayerIsLocal(layer) ? local : global;
    }
  };
  // RoPE tables for positions [start, start + length): empty for a model with learned positions.
  LayerRopes MakeRopes(int64_t start, int64_t length, at::ScalarType dtype) const;
  // Decoder layers [from, to) on x (B, T, H), with per-layer recomputation as options ask (Hidden).
  at::Tensor RunLayers(at::Tensor x, int64_t from, int64_t to, const LayerRopes& ropes,
                       const ForwardOptions& options) const;
  // The lowest layer options.adapter adapts; 0 without an adapter, num_hidden_layers if it adapts none.
  int64_t FirstAdaptedLayer(const ForwardOptions& options) const;
  // GroupLosses' hidden states: Hidden, or with a shared prefix of base layers run once for all groups.
  absl::StatusOr<at::Tensor> GroupHidden(const at::Tensor& tokens, int64_t groups, const ForwardOptions& options) const;
  // A norm's weight as the forward scales by it (ModelConfig::norm_weight_offset added).
  at::Tensor NormWeight(const at::Tensor& w) const;
  // The block's pieces that both forwards share, with the norm to use (Norm, or NormTangents on stacked
  // tangents): a norm of hidden states (config_.norm_kind) where config_.norms places one (`on`), and a q or
  // k projection (..., heads * D) split into heads (..., heads, D) with config_.qk_norm (an RMSNorm) applied.
  using NormFn = at::Tensor (*)(NormKind, const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
  at::Tensor MaybeNorm(bool on, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       NormFn norm) const;
  // The final norm where config_.norms places one, then project_out when the embeddings are narrower than the
  // blocks (`forward_level`: FrozenLinear's, for the dual numbers of forward-mode AD).
  at::Tensor FinalNorm(const at::Tensor& x, NormFn norm, int64_t forward_level = -1) const;
  // Whether the block normalizes the inputs of attention and the MLP (pre-LN), or their residual sums instead.
  bool NormsBeforeBranches() const { return !config_.norm_after_residual; }
  // Attention's input norm: the block's pre-attention norm, normalizing `x` itself only in a pre-LN block.
  at::Tensor AttentionInput(const at::Tensor& x, const LayerWeights& w, NormFn norm) const;
  // The residual layout both forwards share: attention's output `attended` is added to the block's input `x`
  // before the MLP branch reads it (through the MLP's norm), or beside it (parallel residual: the branch reads
  // `x` through its own norm, or `h`, attention's normed input, when the block has none), and the branch's
  // output `mlp(m)` is added last. Post-LN normalizes each of the two sums instead.
  template <typename MlpFn>
  at::Tensor Residual(const LayerWeights& w, const at::Tensor& x, const at::Tensor& h, const at::Tensor& attended,
                      NormFn norm, MlpFn mlp) const;
  at::Tensor QkHeads(const at::Tensor& projected, int64_t heads, const at::Tensor& norm, NormFn norm_fn) const;
  // With a cache, writes this step's keys/values at [q_start, q_start + T) and attends over [0, q_start + T).
  at::Tensor DecoderLayerImpl(int64_t layer, const at::Tensor& x, const RopeTables& rope, const ForwardOptions& options,
                              KvCache* cache, int64_t q_start, LayerOutput output = LayerOutput::kValues) const;
  std::vector<at::Tensor> LayerTensors(int64_t layer, const ForwardOptions& options) const;
  // Stacked-tangent versions of Project, Mlp and DecoderLayer (LossTangents): tensors (1+K, B, T, ...).
  at::Tensor ProjectTangents(int64_t layer, Projection p, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                             const ForwardOptions& options) const;
  at::Tensor MlpTangents(int64_t layer, const at::Tensor& x, const ForwardOptions& options) const;
  at::Tensor DecoderLayerTangents(int64_t layer, const at::Tensor& x, const RopeTables& rope,
                                  const ForwardOptions& options) const;

  // Constant after construction (weights may be changed in place by their owner, e.g. an adapter merge).
  // The layers' pages to release while streaming, or null.
  const WeightPages* Stream() const { return stream_weights() ? pages_.get() : nullptr; }
  // The LM head as the chunked cross-entropy reads it (weight, bias, final soft-cap, streaming).
  LogitHead Head() const { return {weights_.lm_head, weights_.lm_head_bias, config_.final_logit_softcap, Stream()}; }

  ModelConfig config_;
  ModelWeights weights_;
  at::Tensor inv_freq_;                       // RoPE inverse frequencies (D/2), double
  at::Tensor long_inv_freq_;                  // LongRoPE's long-context ones, or undefined
  at::Tensor local_inv_freq_;                 // the local layers' (rope_local_theta), or undefined
  std::shared_ptr<const WeightPages> pages_;  // the read-only mappings the matrices view (Load), or null
  mutable std::atomic<bool> stream_weights_{false};
};

}  // namespace seedling::model
