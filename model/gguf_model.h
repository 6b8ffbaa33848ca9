#pragma once

// Seedling's model from a GGUF file (`--model file.gguf`): the config from the `<arch>.*` keys, the
// weights from llama.cpp's tensor names, the tokenizer from `tokenizer.ggml.*`. The inverse of
// model/gguf.h's WriteGguf: a file it writes reads back to the same config, weights and token ids.
//
// Architectures: "llama" (LlamaForCausalLM; also what Mistral exports as), "qwen2", "qwen3", "olmo2", "gemma2",
// "gemma3" and "phi3", as model/families/ lists them. Tensor types: F32, F16,
// BF16, Q8_0 and Q4_0; files of other types (Q4_K, Q6_K, IQ*, ...) are refused, naming the tensor and its type. All
// errors name the file and the key or tensor concerned.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/gguf_config.h"
#include "model/gguf_reader.h"
#include "model/tokenizer.h"
#include "model/weights.h"

namespace seedling::model {

// Whether q / k rows sit in GGML's interleaved RoPE layout in a GGUF file of `config`'s architecture: only
// llama.cpp's "llama" architecture (Llama, Mistral) rotates interleaved pairs, so only its q / k weights and
// biases are permuted on export and un-permuted on import; the others rotate halves like Hugging Face.
bool GgufPermutesQk(const ModelConfig& config);

// One weight tensor of a GGUF file: llama.cpp's name, its shape in PyTorch order (a block matrix's logical
// (rows, cols)) and the slot of ModelWeights it is read into or written from.
struct GgufWeightSlot {
  std::string name;
  std::vector<int64_t> shape;
  at::Tensor* slot = nullptr;
  int64_t rope_heads = 0;  // > 0: the file holds the rows in GGML's interleaved RoPE order within this many heads
  bool norm = false;       // a norm weight: the file holds its scale, w + ModelConfig::norm_weight_offset
  // > 0: Hugging Face holds the rows per head, q_h | k_h | v_h for this many heads (GPT-NeoX's query_key_value),
  // the file in blocks q | k | v, as llama.cpp's converter reorders them.
  int64_t qkv_heads = 0;
  bool f32 = false;  // written F32 whatever the matrix format (position_embd, as llama.cpp's converter keeps it)
};

// The rows of a fused per-head q | k | v tensor (weight (3 heads D, ...) or bias) reordered from Hugging Face's
// per-head layout to llama.cpp's blocks, and back. Rows move whole, so block matrices reorder without decoding.
at::Tensor QkvRowsToBlocks(const at::Tensor& t, int64_t heads);
at::Tensor QkvRowsToHeads(const at::Tensor& t, int64_t heads);
// Every weight tensor a GGUF file of `config`'s architecture holds, in the order the export writes them, pointing
// into `weights` (whose layers it sizes): the one list both WriteGguf (model/gguf.h) and WeightsFromGguf follow.
// Tensors computed from the config (rope_freqs.weight, rope_factors_*.weight) are not weights and not listed.
std::vector<GgufWeightSlot> GgufWeightSlots(const ModelConfig& config, ModelWeights& weights);

// The weights of `file` for `config` (normally ConfigFromGguf(file)), under llama.cpp's names
// (token_embd.weight, blk.N.attn_norm.weight, blk.N.attn_{q,k,v,output}.weight, attn_{q,k,v}.bias,
// blk.N.ffn_norm.weight, blk.N.ffn_{gate,up,down}.weight, output_norm.weight, output.weight).
//   * Matrices (embedding, projections, LM head) follow model/quant.h: F32 / F16 / BF16 as
//     (rows, cols) tensors of that dtype, Q8_0 / Q4_0 as uint8 (rows, cols / 32, 34 or 18), viewing
//     the mapping without a copy (each tensor's deleter keeps the file mapped; a tensor whose bytes
//     are not aligned for its dtype is copied).
//   * For "llama" the q / k rows (weights and biases) are un-permuted from GGML's interleaved RoPE
//     layout back to Hugging Face's (model/gguf.h): a copy of q and k only; block rows move whole,
//     nothing is requantized.
//   * Norm weights and biases are always fp32 (copied if stored as F16 / BF16).
//   * precision kFloat32 converts every matrix to fp32 (DequantizeMatrix); kStored keeps the
//     file's formats; kQ8_0 / kQ4_0 also return the file's formats: converting is the caller's
//     (LlamaModel's quantized base) business.
//   * A tied config gets lm_head = embed.
// The pages of a source that was copied (converted or un-permuted) are released from RSS.
// NotFound lists missing tensors; InvalidArgument names a tensor of the wrong shape, of a type
// Seedling does not load (with the `llama-quantize --pure` hint), a 1-D tensor that is not float,
// or tensors the architecture does not have (rope_freqs.weight is expected exactly when the config
// has Llama 3 scaling). Gemma norms are read back as w from the file's 1 + w
// (ModelConfig::norm_weight_offset). Internal / ResourceExhausted if LibTorch fails.
absl::StatusOr<ModelWeights> WeightsFromGguf(const GgufFile& file, const ModelConfig& config,
                                             WeightPrecision precision);

// The tokenizer of `file`, built as llama.cpp interprets tokenizer.ggml.* (see
// TokenizerFromVocabulary in model/tokenizer.h):
//   model "gpt2": byte-level BPE from tokens, merges ("a b") and token_type, with the
//     pre-tokenizer tokenizer.ggml.pre names: gpt-2, smollm, llama-bpe (llama3, llama-v3), qwen2
//     (deepseek-r1-qwen);
//   model "llama": SentencePiece-style BPE from tokens, scores and token_type (byte tokens
//     "<0xXX>" give byte fallback), with tokenizer.ggml.add_space_prefix (default true).
// Control and unknown tokens (types 3, 2) are matched in text as special tokens, user-defined ones
// (4) as plain added tokens. add_bos_token (default true for "llama", false for "gpt2") and
// add_eos_token decide what Encode(text, true) adds; bos / eos / unknown / padding ids come from
// their keys.
// InvalidArgument naming the key for another tokenizer model, an unknown or missing pre-tokenizer,
// arrays of different lengths, a malformed merge, duplicate tokens or ids out of range.
absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromGguf(const GgufFile& file);

// The decoder layers' and the LM head's (the embedding, when tied) matrices that a model loaded from
// `file` with `precision` keeps viewing the file's
// mapping in a format decoded tile by tile (F16, BF16, Q8_0, Q4_0), so they can be streamed (model/weights.h
// StreamedWeightBytes): none for kFloat32 (converted, or F32 used in place, which is never released); with
// kQ8_0 / kQ4_0 those the file already holds in the format MatrixFormatFor gives them; never the llama
// architecture's q / k matrices (un-permuted into copies), nor a tensor copied for its alignment. Matrices
// the file lacks are skipped (loading reports them).
std::vector<HeldMatrix> GgufStreamableMatrices(const GgufFile& file, const ModelConfig& config,
                                               WeightPrecision precision);

struct GgufModel {
  ModelConfig config;
  ModelWeights weights;  // keep the file mapped (see WeightsFromGguf)
  std::unique_ptr<Tokenizer> tokenizer;
};

// Opens `path` and builds all three. The file is mapped copy-on-write, like LlamaModel::Load's
// safetensors, so weights viewing it may be written in place (an adapter merge) without touching
// the file. Errors as from GgufFile::Open and the three functions above.
absl::StatusOr<GgufModel> LoadGgufModel(const std::string& path, WeightPrecision precision = WeightPrecision::kFloat32);

}  // namespace seedling::model
