#pragma once

// Memory-bounded kernels and the decoder's building blocks, as free functions on tensors so tests can check
// each against a naive version.
//
//  * ChunkedCrossEntropy: next-token loss over a large vocabulary without ever holding the (tokens × vocab)
//    logits: forward and backward walk the tokens in chunks and recompute each chunk's logits.
//  * Checkpoint: per-layer recomputation (activation checkpointing). The forward keeps only the layer input;
//    the backward re-runs the layer with autograd on and backpropagates through it.
//  * RmsNorm, rotary embeddings (RoPE with linear / llama3 scaling), grouped-query causal attention.
//  * Logit soft-capping (Gemma 2): z' = cap · tanh(z / cap), on attention scores and on the final logits,
//    inside the kernels that walk them (a cap of 0 means none).
//
// All tensors are fp32 unless noted. Functions assume validated shapes (callers validate external input);
// a shape mismatch here is a programming error and LibTorch will throw.

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "model/config.h"

namespace seedling::model {

class WeightPages;  // model/frozen_linear.h

inline constexpr int64_t kIgnoreIndex = -100;

// The LM head as the loss reads it: logits z = h Wᵀ + b, soft-capped when `softcap` > 0.
struct LogitHead {
  at::Tensor weight;  // logical (V, H), in any weight format (model/quant.h)
  at::Tensor bias;    // (V), or undefined (Phi's LM head has one)
  // z' = softcap · tanh(z / softcap) before the softmax, as Gemma 2's final_logit_softcapping; 0 = none.
  // Each tile's gradient is then scaled by dz'/dz = 1 − (z'/cap)².
  double softcap = 0.0;
  // May be null: releases each decoded tile's pages of a weight mapped read-only (model/frozen_linear.h
  // WeightPages), the LM head of a model whose weights are streamed.
  const WeightPages* stream = nullptr;
};

// Sum over rows n with targets[n] != kIgnoreIndex of -log softmax(z[n])[targets[n]], z the logits of
// `head` at hidden[n].
//   hidden  (N, H) fp32 (or fp64 with an fp64 weight); targets (N) int64.
// The logits never exist whole: the vocabulary is walked in tiles of the LM head (model/frozen_linear.h,
// about 2 MiB of decoded weights each) with an online log-sum-exp, for `chunk_tokens` rows at a time
// (<= 0: all rows), so at most (chunk × tile rows) logits exist, in forward and backward. Differentiable
// w.r.t. hidden (and an fp32 weight or bias that requires grad, as a full fine-tune has) through a custom autograd
// function. With a frozen weight the hidden states' gradient is computed in the forward pass,
// Σ_v softmax(z)_v W_v − W_t accumulated tile by tile under the running max (as flash attention accumulates
// its output), and backward only scales it by the upstream gradient: two multiplies per tile instead of
// three. A weight that requires grad keeps each row's log-sum-exp instead and recomputes the tiles' logits in
// backward.
at::Tensor ChunkedCrossEntropy(const at::Tensor& hidden, const LogitHead& head, const at::Tensor& targets,
                               int64_t chunk_tokens = 0);

// The chunked cross-entropy sum (as above) and its directional derivative along a tangent of the hidden
// states, computed by hand per vocabulary tile with an online log-sum-exp: with dz = dh Wᵀ,
// d(lse(z) − z_t) = Σ_v softmax(z)_v dz_v − dz_t. Used by forward-gradient methods instead of LibTorch's
// forward-mode AD through the LM head. Primal and tangent rows share each tile's multiply. No autograd.
//   hidden and hidden_tangent (N, H); targets (N). Returns {loss sum, derivative sum}.
std::pair<at::Tensor, at::Tensor> ChunkedCrossEntropyJvp(const at::Tensor& hidden, const at::Tensor& hidden_tangent,
                                                         const LogitHead& head, const at::Tensor& targets,
                                                         int64_t chunk_tokens = 0);

// The chunked cross-entropy sum (as above) and its gradient with respect to the hidden states, (N, H),
// zero on ignored rows, from one pass over the LM head (Σ_v softmax(z)_v W_v − W_t accumulated tile by
// tile). No autograd. The batched forward gradient uses it: the directional derivative of the loss along
// any tangent dh of the hidden states is then Σ grad · dh, so K tangents need no LM-head multiplies.
std::pair<at::Tensor, at::Tensor> ChunkedCrossEntropyWithGrad(const at::Tensor& hidden, const LogitHead& head,
                                                              const at::Tensor& targets, int64_t chunk_tokens = 0);

// Runs y = fn(x) such that, under autograd, only `x` is kept for backward; the backward re-runs fn with
// autograd on and propagates to `x` and to every tensor in `params` that requires grad (fn must use no other
// tensor that requires grad, and must be deterministic). `fn` and what it captures must outlive backward.
// Without grad mode, or when neither x nor params require grad, this is just fn(x).
// `recompute`, when given, is what backward re-runs instead of fn: it must build fn's graph, but the value
// of its output is never read, so it may skip work that only produces that value (FrozenLinearGraph).
using LayerFn = std::function<at::Tensor(const at::Tensor&)>;
at::Tensor Checkpoint(LayerFn fn, const at::Tensor& x, std::vector<at::Tensor> params, LayerFn recompute = nullptr);

// x * rsqrt(mean(x², -1) + eps) * weight, over the last dimension. Under reverse-mode autograd it keeps
// only x and the rows' 1/rms for backward.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps);

// LayerNorm over the last dimension, (x − mean(x)) · rsqrt(var(x) + eps) · weight + bias with the biased
// variance, as torch.nn.LayerNorm (LibTorch's kernel, which keeps x and each row's mean and 1/std for backward).
at::Tensor LayerNorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

// The block's norm as `kind` says: RmsNorm (which has no bias) or LayerNorm.
at::Tensor Norm(NormKind kind, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

// act(x), the plain MLP's activation (LibTorch's kernels, which keep x for backward).
at::Tensor Activation(const at::Tensor& x, MlpActivation activation);

// silu(gate) · up, the gated MLP's activation. Under reverse-mode autograd it keeps only gate and up
// (backward recomputes silu).
at::Tensor SwiGlu(const at::Tensor& gate, const at::Tensor& up);

// Logit soft-capping, z' = cap · tanh(z / cap) (Gemma 2), and, when asked, its slope dz'/dz = 1 − (z'/cap)²
// (undefined otherwise). Out of place, so forward-mode AD differentiates it too. The attention and
// cross-entropy kernels apply it to each tile of scores or logits; LlamaModel::LmHead to whole logits.
struct SoftCapped {
  at::Tensor value, slope;
};
SoftCapped SoftCap(const at::Tensor& z, double cap, bool with_slope = false);

// act(gate) · up for the config's MLP activation: SwiGlu for kSilu; for kGeluTanh (GeGLU) GELU's tanh
// approximation, under reverse-mode autograd keeping only gate and up as SwiGlu does.
at::Tensor GatedActivation(const at::Tensor& gate, const at::Tensor& up, MlpActivation activation);

// RoPE inverse frequencies (head_dim / 2), with the config's rope_scaling applied
// (RopeInverseFrequencyValues in model/config.h), as a double-precision tensor.
at::Tensor RopeInverseFrequencies(const ModelConfig& config, bool long_context = false);

// cos and sin tables for positions [start, start + length): each (length, head_dim / 2), fp64 (ApplyRope
// casts them to the activations' dtype).
struct RopeTables {
  at::Tensor cos;
  at::Tensor sin;
};
RopeTables MakeRopeTables(const at::Tensor& inv_freq, int64_t start, int64_t length);

// Applies RoPE in the Hugging Face "rotate half" layout (first half / second half of the rotated dimensions,
// not interleaved) to x (B, heads, T, D), writing both halves into one output. Tables narrower than D / 2
// (ModelConfig::partial_rotary_factor) rotate the first 2 · cols dimensions and pass the rest through. Under
// reverse-mode autograd a custom function whose backward rotates the gradient back (it keeps no slices of x).
at::Tensor ApplyRope(const at::Tensor& x, const RopeTables& rope);

// Causal grouped-query attention.
//   q (B, Hq, T, D), k and v (B, Hkv, S, D) with Hq % Hkv == 0; query t sits at absolute position
//   q_start + t and may attend to keys at positions <= its own (keys occupy positions [0, S)), and, with a
//   sliding window w, only to the last w of them. Returns (B, Hq, T, D).
// The query heads of each KV group are folded into the row dimension, so K and V are never repeated.
// Queries go in blocks of 64 positions, each against the keys up to its last position, so most of the
// masked upper triangle is never computed (5/8 of the scores at T = S = 256). Under reverse-mode autograd
// only q, k and v are kept: backward rebuilds the probabilities block by block. The scores are q kᵀ · `scale`
// (0 = 1/√D; Gemma's query_pre_attn_scalar^-½ otherwise). `softcap` > 0 soft-caps the scaled scores before
// the mask and the softmax (Gemma 2's attn_logit_softcapping).
at::Tensor GroupedQueryAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_start,
                                 std::optional<int64_t> sliding_window = std::nullopt, double softcap = 0.0,
                                 double scale = 0.0);

// Stacked tangents (forward mode by hand, for the batched forward gradient). A stacked tensor has a
// leading dimension 1 + K: slice 0 is the primal value, slice k the tangent along the k-th direction. Each
// function returns the stacked output: slice 0 equals the plain function of slice 0 (the same operations),
// slice k its derivative along slice k of the input. Linear maps (projections, RoPE, residual additions)
// need no rule: they act on every slice alike; a bias belongs to slice 0 only.

// RmsNorm: d/dx [x r g] · dx = g r (dx − x r² mean(x dx)), r = rsqrt(mean(x²) + eps).
at::Tensor RmsNormTangents(const at::Tensor& x, const at::Tensor& weight, double eps);

// LayerNorm: with x̂ = (x − mean(x)) r, r = rsqrt(var(x) + eps): d = g r (dx − mean(dx) − x̂ mean(x̂ dx)); the
// bias belongs to slice 0.
at::Tensor LayerNormTangents(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

// Norm on stacked tangents: RmsNormTangents or LayerNormTangents.
at::Tensor NormTangents(NormKind kind, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        double eps);

// Activation on stacked x: d = act'(x) dx.
at::Tensor ActivationTangents(const at::Tensor& x, MlpActivation activation);

// silu(gate) · up, for gate and up stacked alike: d = silu'(g) dg · u + silu(g) · du,
// silu'(g) = σ(g) (1 + g (1 − σ(g))).
at::Tensor SwiGluTangents(const at::Tensor& gate, const at::Tensor& up);

// GatedActivation on stacked gate and up: d = act'(g) dg · u + act(g) · du.
at::Tensor GatedActivationTangents(const at::Tensor& gate, const at::Tensor& up, MlpActivation activation);

// GroupedQueryAttention (q_start 0, full causal self-attention) on stacked q (1+K, B, Hq, T, D), k and v
// (1+K, B, Hkv, T, D): with scores S = c q kᵀ (c = `scale`, 0 = 1/√D) and P = softmax(S), dS = c (dq kᵀ + q dkᵀ),
// dP = P ⊙ (dS − rowsum(P ⊙ dS)), dO = dP v + P dv. The primal probabilities are computed once and the
// tangents are walked one at a time, so at most three score-sized tensors exist (four with a soft-cap,
// whose slope 1 − (S'/cap)² scales dS).
at::Tensor GroupedQueryAttentionTangents(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         std::optional<int64_t> sliding_window = std::nullopt, double softcap = 0.0,
                                         double scale = 0.0);

// The compute dtype of a weight: 16-bit weights (kept in their stored dtype) are upcast to fp32; fp32 and
// fp64 (used by tests that need exact references) are returned as they are.
inline at::Tensor AsCompute(const at::Tensor& t) {
  if (!t.defined()) return t;
  const at::ScalarType s = t.scalar_type();
  return (s == at::kFloat || s == at::kDouble) ? t : t.to(at::kFloat);
}

}  // namespace seedling::model
