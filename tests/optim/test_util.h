#pragma once

// Small models and batches shared by the optim tests.

#include <ATen/ATen.h>

#include <catch2/catch.hpp>
#include <memory>
#include <vector>

#include "base/philox.h"
#include "lora/adapter.h"
#include "model/dataset.h"
#include "model/llama.h"

namespace seedling::optim::testing {

inline model::ModelConfig MicroConfig() {
  model::ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.vocab_size = 32;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = true;
  return c;
}

// MicroConfig with every optional part of the block: every bias (Qwen2's q/k/v, Llama's attention_bias and
// mlp_bias), which belongs to the primal only, as batched tangent and probe computations must respect; and
// Qwen3's per-head q/k RMSNorm, which every tangent passes through.
inline model::ModelConfig BiasedMicroConfig() {
  model::ModelConfig c = MicroConfig();
  c.qkv_bias = true;
  c.o_bias = true;
  c.mlp_bias = true;
  c.qk_norm = model::QkNorm::kPerHead;
  return c;
}

// MicroConfig with OLMo 2's block: norms on the outputs of attention and the MLP instead of their inputs, and
// q/k RMSNorm over the whole projections (weights of q_dim and kv_dim), which every tangent passes through.
inline model::ModelConfig PostNormMicroConfig() {
  model::ModelConfig c = MicroConfig();
  c.norms = {.pre_attention = false, .attention_output = true, .pre_mlp = false, .mlp_output = true};
  c.qk_norm = model::QkNorm::kPerProjection;
  return c;
}

// MicroConfig with the block options of Gemma 2 and 3: GeGLU, norms scaling by 1 + w before and after each
// sub-block, q/k norms per head, embeddings scaled by sqrt(hidden), a query scale of its own, and a local layer
// (window 5, its own RoPE base) before a global one.
inline model::ModelConfig GemmaStyleMicroConfig() {
  model::ModelConfig c = MicroConfig();
  c.norms = {.pre_attention = true, .attention_output = true, .pre_mlp = true, .mlp_output = true};
  c.qk_norm = model::QkNorm::kPerHead;
  c.mlp_activation = model::MlpActivation::kGeluTanh;
  c.norm_weight_offset = 1.0;
  c.scale_embeddings = true;
  c.attention_scale = 0.03;  // q and k are normed to RMS 2 per head: a small scale keeps softmax unsaturated
  c.sliding_window = 5;
  c.sliding_window_pattern = 2;
  c.rope_local_theta = 100.0;
  return c;
}

// GemmaStyleMicroConfig as Gemma 2 has it: no q/k norms, one RoPE base, and soft-caps low enough to bend
// the micro model's attention scores and logits.
inline model::ModelConfig Gemma2StyleMicroConfig() {
  model::ModelConfig c = GemmaStyleMicroConfig();
  c.qk_norm = model::QkNorm::kNone;
  c.rope_local_theta = 0.0;
  c.attention_scale = 0.0;  // 1 / sqrt(head_dim)
  c.attention_softcap = 0.3;
  c.final_logit_softcap = 0.5;
  return c;
}

// MicroConfig with Phi-3's fused projections (q | k | v and gate | up each one matrix, here with biases, which
// belong to the primal only) and LongRoPE (per-pair divisors, cos and sin scaled by its attention factor).
inline model::ModelConfig Phi3StyleMicroConfig() {
  model::ModelConfig c = MicroConfig();
  c.fused = {.qkv = true, .gate_up = true};
  c.qkv_bias = true;
  c.mlp_bias = true;
  c.max_position_embeddings = 256;
  c.rope_scaling.type = model::RopeScaling::Type::kLongRope;
  c.rope_scaling.original_max_position_embeddings = 32;
  c.rope_scaling.short_factor = {1.0, 1.5, 2.0, 4.0};
  c.rope_scaling.long_factor = {2.0, 3.0, 4.0, 8.0};
  return c;
}

// MicroConfig with GPT-NeoX's block: LayerNorms with biases, attention and MLP in parallel on the block's
// input, half of each head rotated, q, k, v fused per head (no GQA), a plain exact-GELU MLP, biases everywhere.
inline model::ModelConfig GptNeoXStyleMicroConfig() {
  model::ModelConfig c = MicroConfig();
  c.num_key_value_heads = c.num_attention_heads;
  c.norm_kind = model::NormKind::kLayerNorm;
  c.gated_mlp = false;
  c.mlp_activation = model::MlpActivation::kGelu;
  c.partial_rotary_factor = 0.5;
  c.parallel_residual = true;
  c.fused = {.qkv = true, .qkv_per_head = true};
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  return c;
}

// MicroConfig with GPT-2's block: learned positions added to the embeddings (no RoPE), LayerNorms, c_attn fused
// as q | k | v, a plain tanh-GELU MLP, biases everywhere.
inline model::ModelConfig Gpt2StyleMicroConfig() {
  model::ModelConfig c = MicroConfig();
  c.num_key_value_heads = c.num_attention_heads;
  c.norm_kind = model::NormKind::kLayerNorm;
  c.gated_mlp = false;
  c.mlp_activation = model::MlpActivation::kGeluTanh;
  c.positions = model::PositionKind::kLearned;
  c.max_position_embeddings = 32;
  c.fused = {.qkv = true};
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  return c;
}

// MicroConfig with Phi's block: one LayerNorm whose output attention and the MLP both read, in parallel, half
// of each head rotated, a plain tanh-GELU MLP, biases everywhere, the LM head's too.
inline model::ModelConfig PhiStyleMicroConfig() {
  model::ModelConfig c = MicroConfig();
  c.norm_kind = model::NormKind::kLayerNorm;
  c.norms = {.pre_attention = true, .attention_output = false, .pre_mlp = false, .mlp_output = false};
  c.parallel_residual = true;
  c.gated_mlp = false;
  c.mlp_activation = model::MlpActivation::kGeluTanh;
  c.partial_rotary_factor = 0.5;
  c.qkv_bias = c.o_bias = c.mlp_bias = c.lm_head_bias = true;
  return c;
}

// MicroConfig with OPT-350m's block: norms after each residual add, no final norm, 16-wide embeddings projected
// to the 32-wide blocks and back, OPT's position table with two unused rows, ReLU, biases everywhere.
inline model::ModelConfig Opt350StyleMicroConfig() {
  model::ModelConfig c = MicroConfig();
  c.architecture = "OPTForCausalLM";
  c.model_type = "opt";
  c.num_key_value_heads = c.num_attention_heads;
  c.norm_kind = model::NormKind::kLayerNorm;
  c.gated_mlp = false;
  c.mlp_activation = model::MlpActivation::kRelu;
  c.positions = model::PositionKind::kLearned;
  c.position_offset = 2;
  c.max_position_embeddings = 32;
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  c.norm_after_residual = true;
  c.norms.final = false;
  c.word_embed_proj_dim = 16;
  return c;
}

inline std::vector<model::Projection> EveryProjection() {
  return {model::Projection::kQ,    model::Projection::kK,  model::Projection::kV,   model::Projection::kO,
          model::Projection::kGate, model::Projection::kUp, model::Projection::kDown};
}

inline std::unique_ptr<model::LlamaModel> MakeModel(const model::ModelConfig& c, uint64_t seed, double scale = 10.0) {
  model::ModelWeights w = model::RandomWeights(c, seed);
  for (const model::NamedWeight& nw : model::NamedWeights(w, c)) {
    if (nw.name.find("norm") == std::string::npos) nw.tensor.mul_(scale);
  }
  auto m = model::LlamaModel::Create(c, std::move(w));
  REQUIRE(m.ok());
  return std::move(m).value();
}

// Sequences following t[i+1] = (t[i] + stride) mod vocab from seeded starts: a rule a model can learn.
inline model::Batch RuleBatch(int64_t rows, int64_t len, int64_t vocab, uint64_t seed, int64_t stride = 3) {
  at::Tensor tokens = at::empty({rows, len}, at::kLong);
  auto acc = tokens.accessor<int64_t, 2>();
  uint64_t state = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (int64_t r = 0; r < rows; ++r) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    int64_t t = static_cast<int64_t>((state >> 33) % static_cast<uint64_t>(vocab));
    for (int64_t i = 0; i < len; ++i) {
      acc[r][i] = t;
      t = (t + stride) % vocab;
    }
  }
  return {tokens, tokens.clone()};
}

// Sequences over a 16-token sub-vocabulary (ids 100..115) where each token is followed by the one three
// places further: a random model scores them near ln(2048) = 7.6 nats, the marginal alone gives ln(16) = 2.8
// and the rule gives ~0.
inline model::Batch TaskBatch(int64_t rows, int64_t len, uint64_t seed) {
  at::Tensor tokens = at::empty({rows, len}, at::kLong);
  auto acc = tokens.accessor<int64_t, 2>();
  Rng rng(seed, rng_stream::kData);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t t = static_cast<int64_t>(rng.UniformInt(16));
    for (int64_t i = 0; i < len; ++i) {
      acc[r][i] = 100 + t;
      t = (t + 3) % 16;
    }
  }
  return {tokens, tokens.clone()};
}

}  // namespace seedling::optim::testing
