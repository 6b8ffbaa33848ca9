#pragma once

// Export to GGUF v3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), the single-file
// format llama.cpp loads: the config as `<arch>.*` metadata, the tokenizer as `tokenizer.ggml.*`,
// and the weights under llama.cpp's tensor names, laid out the way its loader expects.
//
// Mapping, as llama.cpp's convert_hf_to_gguf.py does it:
//   * LlamaForCausalLM and MistralForCausalLM become architecture "llama". GGML's llama RoPE
//   rotates
//     interleaved pairs (x0, x1), (x2, x3), ... while Hugging Face rotates halves (x_i, x_{i +
//     D/2}), so the rows of every q_proj / k_proj weight (and bias) are permuted within each head:
//     row h*D + 2i + j of the export is row h*D + j*D/2 + i of the original (i < D/2, j in {0, 1}).
//   * Qwen2ForCausalLM becomes "qwen2" (rotate-half "NEOX" RoPE, no permutation) with its q/k/v
//   biases.
//   * Llama 3 RoPE scaling becomes a `rope_freqs.weight` tensor (llama arch only): per frequency
//   pair, the
//     factor GGML divides the rotation angle by. Linear scaling becomes rope.scaling.{type,factor}.
//   * A tied LM head is not written (llama.cpp reuses token_embd.weight).
//   * The vocabulary is padded to config.vocab_size with "[PAD<id>]" tokens of type UNUSED.
// Mistral's sliding window is not expressible for llama.cpp's "llama" architecture (as with
// convert): the export attends to the whole context, which matches the original only up to
// `sliding_window` tokens.

#include <string>

#include "absl/status/status.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "model/weights.h"

namespace seedling::model {

// GGUF's alignment of the data section and of every tensor (the format's default, written
// explicitly).
inline constexpr uint32_t kGgufAlignment = 32;

struct GgufOptions {
  // Type of the 2-D weight matrices (embedding, projections, LM head): kF32 or kF16 (round to
  // nearest even). 1-D tensors (norm weights, biases, rope_freqs) are always F32, as llama.cpp
  // expects.
  DType dtype = DType::kF16;
  std::string name;  // general.name; empty = config.architecture
  // tokenizer.ggml.pre for a byte-level BPE tokenizer whose pre-tokenizer is not one WriteGguf
  // recognizes (llama.cpp names such as "gpt-2", "llama-bpe", "qwen2", "smollm"); empty = detect,
  // refuse if unknown.
  std::string tokenizer_pre;
};

// Writes `config`, `weights` and `tokenizer` to `path` as one GGUF file that llama.cpp loads and
// runs. Atomic (the file appears complete or not at all) and streamed: tensors are converted and
// written one at a time, so at most one converted tensor exists besides `weights`. Weights may be
// F32, F16, BF16 (or F64) tensors (e.g. WeightPrecision::kStored); they are converted as needed and
// never modified.
//
// Errors, all before anything is written:
//   InvalidArgument: options.dtype not F32 / F16; an architecture other than Llama / Mistral /
//   Qwen2; Llama 3
//     RoPE scaling on Qwen2 (llama.cpp's qwen2 has no frequency factors); Qwen2 without q/k/v
//     biases, with o_proj or MLP biases, or with head_dim * heads != hidden_size (llama.cpp's qwen2
//     cannot load those); a weight missing or of the wrong shape; a tokenizer with more ids than
//     config.vocab_size, duplicate token strings (llama.cpp requires them unique), merges llama.cpp
//     cannot parse, or a byte-level pre-tokenizer that is not recognized (set
//     options.tokenizer_pre).
//   I/O errors from the file system; Internal / ResourceExhausted if LibTorch fails converting a
//   tensor.
// Thread-safe with respect to other readers of `weights` and `tokenizer`.
absl::Status WriteGguf(const std::string& path, const ModelConfig& config,
                       const ModelWeights& weights, const Tokenizer& tokenizer,
                       const GgufOptions& options = {});

}  // namespace seedling::model
