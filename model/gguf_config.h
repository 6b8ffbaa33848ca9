#pragma once

// The model config a GGUF file describes, read from its metadata alone (no weight is decoded, no
// LibTorch), so config.json's and a GGUF file's configs come from code that builds without LibTorch
// (the fuzz targets build it with clang). Weights and tokenizer: model/gguf_model.h.

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/gguf_reader.h"

namespace seedling::model {

// The config a GGUF file describes:
//   sizes from <arch>.{context_length, embedding_length, block_count, feed_forward_length,
//     attention.head_count, attention.head_count_kv (default head_count), attention.key_length
//     (default embedding_length / head_count)}; vocab_size from <arch>.vocab_size, else the length
//     of tokenizer.ggml.tokens, else the rows of token_embd.weight (the first two must agree);
//   rms_norm_eps, rope_theta (default 10000) from float32 keys, widened through their shortest
//     decimal form so that 1e-5 written as float32 reads back as the double 1e-5;
//   RoPE scaling: rope.scaling.type "linear" with rope.scaling.factor (or the legacy
//     rope.scale_linear); Llama 3 scaling from the rope_freqs.weight tensor (llama only), whose
//     per-pair factors are matched to Llama 3's formula: low / high frequency factors 1 and 4 (as
//     every Llama 3.x uses) with the original context length solved for, else a general fit; the
//     reconstruction is verified against every factor;
//   tie_word_embeddings when there is no output.weight; qkv_bias / o_bias / mlp_bias from the
//     presence of blk.0.attn_q.bias / attn_output.bias / ffn_{gate,up,down}.bias;
//   bos_token_id from tokenizer.ggml.bos_token_id; eos_token_ids from eos_token_id, then eot / eom
//     when different;
//   torch_dtype from token_embd.weight's type (f32 -> float32, bf16 -> bfloat16, else float16);
//   gemma2 / gemma3: the window from <arch>.attention.sliding_window, gemma2's soft-caps from
//     <arch>.attn_logit_softcapping / final_logit_softcapping (default 50 / 30), and what the graph fixes
//     (GgufGemmaGraph below);
//   phi3: fused attn_qkv and ffn_up (gate | up), the window of every layer from attention.sliding_window
//     (0 = none), LongRoPE from the rope_factors_short / _long.weight tensors with
//     rope.scaling.original_context_length and rope.scaling.attn_factor.
// InvalidArgument for another architecture, a key of the wrong type, a head_dim llama.cpp would
// rotate only partly (rope.dimension_count != key length), value_length != key_length, experts
// (MoE), an unsupported scaling type (yarn), rope_freqs.weight that is not Llama 3
// scaling or on qwen2, or a config that fails ModelConfig::Validate. NotFound for a missing
// required key.
absl::StatusOr<ModelConfig> ConfigFromGguf(const GgufFile& file);

// What llama.cpp's Gemma graphs fix instead of reading it from the file, which export checks a config
// against (model/gguf.h) and import sets: gemma2 makes every 2nd layer global and always soft-caps (the
// caps it reads, 50 and 30 by default); gemma3 makes every 6th layer global, gives the local layers RoPE
// base 10,000 and never soft-caps. Both scale queries by 1 / sqrt(head_dim), but by
// 1 / sqrt(hidden_size / heads) for the 27B models, which llama.cpp recognizes by their layer count.
struct GgufGemmaGraph {
  std::string_view arch;
  int64_t pattern;         // every pattern-th layer is global
  double local_theta;      // the local layers' RoPE base; 0 = rope_theta
  bool softcaps;           // soft-caps attention scores and the final logits
  int64_t default_window;  // the window when the file gives none; 0 = the key is required
  int64_t layers_27b;      // the layer count llama.cpp takes for the 27B model
  // The query scale llama.cpp uses for `c`.
  double QueryScale(const ModelConfig& c) const;
};
// The graph of a GGUF architecture name; null for any other.
const GgufGemmaGraph* GemmaGraphOf(std::string_view arch);

// The key (after "<arch>.") of the norms' epsilon: "attention.layer_norm_epsilon" for LayerNorms (gptneox),
// "attention.layer_norm_rms_epsilon" for RMSNorms.
std::string GgufNormEpsilonKey(const ModelConfig& config);

// True if `path` names a GGUF file: it ends in ".gguf", or it is a regular file starting with the
// magic "GGUF". Never fails (an unreadable file is simply not recognized).
bool IsGgufPath(const std::string& path);

}  // namespace seedling::model
