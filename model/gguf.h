#pragma once

// Export to GGUF v3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), the single-file
// format llama.cpp loads: a model (WriteGguf) with the config as `<arch>.*` metadata, the tokenizer
// as `tokenizer.ggml.*` and the weights (F32, F16, Q8_0 or Q4_0) under llama.cpp's tensor names,
// laid out the way its loader expects; or a LoRA adapter for such a model (WriteGgufLora).
//
// Mapping, as llama.cpp's convert_hf_to_gguf.py does it:
//   * LlamaForCausalLM and MistralForCausalLM become architecture "llama". GGML's llama RoPE
//     rotates interleaved pairs (x0, x1), (x2, x3), ... while Hugging Face rotates halves
//     (x_i, x_{i + D/2}), so the rows of every q_proj / k_proj weight (and bias) are permuted
//     within each head: row h*D + 2i + j of the export is row h*D + j*D/2 + i of the original
//     (i < D/2, j in {0, 1}).
//   * Qwen2ForCausalLM becomes "qwen2" (rotate-half "NEOX" RoPE, no permutation) with its q/k/v
//     biases; Qwen3ForCausalLM becomes "qwen3" (NEOX RoPE, no biases) with blk.N.attn_{q,k}_norm.weight;
//     Olmo2ForCausalLM becomes "olmo2" (NEOX RoPE, no biases, q sized hidden x hidden) with q/k norms of
//     q_dim / kv_dim values and the output norms blk.N.post_attention_norm / post_ffw_norm.weight in place
//     of attn_norm / ffn_norm.
//   * Llama 3 RoPE scaling becomes a `rope_freqs.weight` tensor (llama arch only): per frequency
//     pair, the factor GGML divides the rotation angle by. Linear scaling becomes
//     rope.scaling.{type,factor}.
//   * A tied LM head is not written (llama.cpp reuses token_embd.weight).
//   * The vocabulary is padded to config.vocab_size with "[PAD<id>]" tokens of type UNUSED.
// Mistral's sliding window is not expressible for llama.cpp's "llama" architecture (as with
// convert): the export attends to the whole context, which matches the original only up to
// `sliding_window` tokens.

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/quant.h"
#include "model/tokenizer.h"
#include "model/weights.h"

namespace seedling::model {

// GGUF's alignment of the data section and of every tensor (the format's default, written
// explicitly).
inline constexpr uint32_t kGgufAlignment = 32;

struct GgufOptions {
  // Format of the 2-D weight matrices (embedding, projections, LM head): kF32, kF16 (round to
  // nearest even), kQ8_0 or kQ4_0 (GGUF's blocks, model/quant.h). With a block format, a matrix
  // whose column count is not a multiple of 32 is written F16 (MatrixFormatFor), exactly as the
  // in-memory quantized base holds it. 1-D tensors (norm weights, biases, rope_freqs) are always
  // F32, as llama.cpp expects. Default kF16.
  WeightFormat format = WeightFormat::kF16;
  std::string name;  // general.name; empty = config.architecture
  // tokenizer.ggml.pre for a byte-level BPE tokenizer whose pre-tokenizer is not one WriteGguf
  // recognizes (llama.cpp names such as "gpt-2", "llama-bpe", "qwen2", "smollm"); empty = detect,
  // refuse if unknown.
  std::string tokenizer_pre;
};

// Writes `config`, `weights` and `tokenizer` to `path` as one GGUF file that llama.cpp loads and
// runs. Atomic (the file appears complete or not at all) and streamed: tensors are converted and
// written one at a time, so at most one converted tensor exists besides `weights`. Weights are
// never modified. They may be
//   * F32, F16, BF16 (or F64) tensors (e.g. WeightPrecision::kStored), converted as needed;
//   * matrices already in GGUF blocks (uint8 (rows, cols / 32, 34 or 18), model/quant.h). One
//     whose format is the one it is written in is copied block for block (q/k rows permuted for
//     the llama architecture); any other is dequantized to fp32 and then converted, so a Q4_0
//     weight exported as Q8_0 carries the rounding of both.
// Block formats quantize row by row (ggml's reference quantizer), so permuting q/k rows before or
// after quantization gives the same bytes; the writer permutes the smaller, converted tensor.
//
// Errors; none leaves a file (not even a temporary one) behind:
//   InvalidArgument, before anything is written: options.format BF16; an architecture other than
//     Llama / Mistral / Qwen2; Llama 3 RoPE scaling on Qwen2 (llama.cpp's qwen2 has no frequency
//     factors); Qwen2 without q/k/v biases, with o_proj or MLP biases, or with head_dim * heads !=
//     hidden_size (llama.cpp's qwen2 cannot load those); a weight missing, of the wrong shape, or
//     a uint8 tensor that is not GGUF blocks; a tokenizer with more ids than config.vocab_size,
//     duplicate token strings (llama.cpp requires them unique), merges llama.cpp cannot parse, or
//     a byte-level pre-tokenizer that is not recognized (set options.tokenizer_pre).
//   InvalidArgument, while streaming: a matrix that cannot be quantized (a non-finite weight, or a
//     block scale that overflows binary16).
//   I/O errors from the file system; Internal / ResourceExhausted if LibTorch fails converting a
//   tensor.
// Thread-safe with respect to other readers of `weights` and `tokenizer`.
absl::Status WriteGguf(const std::string& path, const ModelConfig& config, const ModelWeights& weights,
                       const Tokenizer& tokenizer, const GgufOptions& options = {});

// ---- LoRA adapters for llama.cpp (`llama-cli -m base.gguf --lora adapter.gguf`) -----------------
//
// The file llama.cpp's convert_lora_to_gguf.py writes and llama-adapter.cpp loads: keys
// general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (float32) and
// general.architecture (the base model's, checked by the loader); for every adapted projection the
// tensors "<base tensor>.lora_a" and ".lora_b", e.g. "blk.3.attn_q.weight.lora_a". GGUF stores
// shapes reversed: A (r, in) has ne = [in, r] and B (out, r) has ne = [r, out]. llama.cpp computes
// W x + (alpha / r) · B (A x), with r read from B. For the llama architecture the rows of B for
// q_proj / k_proj are permuted as the base model's q / k rows are (A is not: its rows are the rank
// dimension); qwen2 is not permuted.

// One adapted projection: delta W = scale · B A.
struct GgufLoraPair {
  int64_t layer = 0;                       // decoder layer
  Projection projection = Projection::kQ;  // which of its projections
  at::Tensor a;                            // (r, in), a float tensor
  at::Tensor b;                            // (out, r), a float tensor
};

struct GgufLoraOptions {
  WeightFormat format = WeightFormat::kF32;  // of A and B: kF32 (default, as convert) or kF16
};

// Writes `pairs` to `path` as a GGUF LoRA adapter for the GGUF export of a model with `config`.
// `scale` is the factor the pairs are applied with (alpha / r for LoRA, alpha / sqrt(r) for
// rsLoRA); the file carries it as adapter.lora.alpha = scale · r, since llama.cpp divides by r.
// Atomic and streamed like WriteGguf; A and B are never modified (thread-safe with respect to other
// readers of them).
// Errors, before anything is written, InvalidArgument: options.format not F32 / F16; an
// architecture WriteGguf refuses; no pairs; scale not > 0 (llama.cpp reads alpha 0 as "scale 1");
// pairs of different ranks (one alpha cannot give them the same scale); a layer outside the model,
// a projection given twice, or A / B of the wrong shape or dtype. I/O errors from the file system.
absl::Status WriteGgufLora(const std::string& path, const ModelConfig& config, const std::vector<GgufLoraPair>& pairs,
                           double scale, const GgufLoraOptions& options = {});

}  // namespace seedling::model
