#pragma once

// Model weights as LibTorch tensors, loaded from (and saved to) Hugging Face safetensors with the
// architecture's tensor names, and random initialization for `init-model`.
//
// What stays in memory: an F32 checkpoint is used in place from its copy-on-write memory map (no copy; the
// page cache shares it between processes and simulated clients). F16/BF16 weights are converted to fp32 at
// load by default (fast compute, 2x the file's size in RAM); with WeightPrecision::kStored the large matrices
// stay in their stored dtype (also mapped in place) and are converted per use, halving memory at some speed
// cost. Norm weights and biases are always fp32.

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/quant.h"
#include "model/safetensors.h"
#include "model/weight_format.h"

namespace seedling::model {

// One decoder layer. Shapes follow nn.Linear: weight (out, in). Optional biases are undefined tensors
// when the architecture has none.
// Norms are (H) and defined where ModelConfig::norms places them.
struct LayerWeights {
  at::Tensor input_norm;  // before attention
  at::Tensor q, k, v, o;  // (Hq*D, H), (Hkv*D, H), (Hkv*D, H), (H, Hq*D)
  at::Tensor q_bias, k_bias, v_bias, o_bias;
  at::Tensor q_norm, k_norm;         // ModelConfig::q_norm_size() / k_norm_size() each, with qk_norm
  at::Tensor attention_output_norm;  // on attention's output
  at::Tensor pre_mlp_norm;           // before the MLP
  at::Tensor gate, up, down;         // (I, H), (I, H), (H, I)
  at::Tensor gate_bias, up_bias, down_bias;
  at::Tensor mlp_output_norm;  // on the MLP's output
  // ModelConfig::fused: qkv (Hq*D + 2*Hkv*D, H) with rows q | k | v in place of q, k, v; gate_up (2*I, H) with
  // rows gate | up in place of gate, up (the parts' tensors and biases are then undefined).
  at::Tensor qkv, qkv_bias;
  at::Tensor gate_up, gate_up_bias;
  // NormKind::kLayerNorm: each norm's bias, (H), beside its weight.
  at::Tensor input_norm_bias, attention_output_norm_bias, pre_mlp_norm_bias, mlp_output_norm_bias;

  // Every slot above, defined or not, for code that walks them all.
  std::array<at::Tensor*, 28> Slots() { return SlotsOf<at::Tensor>(*this); }
  std::array<const at::Tensor*, 28> Slots() const { return SlotsOf<const at::Tensor>(*this); }

 private:
  template <typename T, typename Self>
  static std::array<T*, 28> SlotsOf(Self& w) {
    return {&w.input_norm,
            &w.q,
            &w.k,
            &w.v,
            &w.o,
            &w.q_bias,
            &w.k_bias,
            &w.v_bias,
            &w.o_bias,
            &w.q_norm,
            &w.k_norm,
            &w.attention_output_norm,
            &w.pre_mlp_norm,
            &w.gate,
            &w.up,
            &w.down,
            &w.gate_bias,
            &w.up_bias,
            &w.down_bias,
            &w.mlp_output_norm,
            &w.qkv,
            &w.qkv_bias,
            &w.gate_up,
            &w.gate_up_bias,
            &w.input_norm_bias,
            &w.attention_output_norm_bias,
            &w.pre_mlp_norm_bias,
            &w.mlp_output_norm_bias};
  }
};

struct ModelWeights {
  at::Tensor embed;      // (V, E), E = ModelConfig::embedding_dim() (H unless the embeddings are projected)
  at::Tensor positions;  // (ModelConfig::position_rows(), H): learned positions (GPT-2, OPT), fp32
  // (H, E) and (E, H) with E = ModelConfig::embedding_dim() != H (OPT-350m); undefined otherwise.
  at::Tensor project_in, project_out;
  std::vector<LayerWeights> layers;
  at::Tensor final_norm;       // (H); undefined without ModelConfig::norms.final
  at::Tensor final_norm_bias;  // (H), NormKind::kLayerNorm only
  at::Tensor lm_head;          // (V, E); the same tensor as `embed` when the config ties them
  at::Tensor lm_head_bias;     // (V), ModelConfig::lm_head_bias only (Phi)
};

struct LoadOptions {
  WeightPrecision precision = WeightPrecision::kFloat32;  // see the file comment
  // q8_0 / q4_0: directory of the weight cache (model/weight_cache.h); empty = <model_dir>/.seedling-cache.
  std::string cache_dir;
  // q8_0 / q4_0: called while the cache is built, (tensors done, tensors in all). May be empty.
  std::function<void(int64_t done, int64_t total)> cache_progress;
};

// A tensor over a safetensors view's mapped bytes (no copy when aligned for its dtype; the tensor keeps
// the mapping alive). F32 / F16 / BF16 views give tensors of that dtype, U8 gives uint8.
at::Tensor TensorFromView(const TensorView& view);

// A weight with its Hugging Face name ("model.layers.0.self_attn.q_proj.weight"). The tensor shares storage
// with the model's, so in-place operations on it change the model.
struct NamedWeight {
  std::string name;
  at::Tensor tensor;
};

// Every tensor of `weights` with its Hugging Face name, in checkpoint order (embed, layers, norm, lm_head).
// The tied lm_head is not listed; absent biases are skipped.
std::vector<NamedWeight> NamedWeights(const ModelWeights& weights, const ModelConfig& config);
// The same slots, for code that replaces tensors (a copy in another dtype) rather than changing them in place.
void ForEachWeightSlot(ModelWeights& weights, const ModelConfig& config,
                       const std::function<void(const std::string& name, at::Tensor& slot)>& fn);

// A tensor the architecture expects: its Hugging Face name, its shape in memory (nn.Linear's (out, in)) and how
// it is held.
struct ExpectedTensor {
  std::string name;
  std::vector<int64_t> shape;
  // A matrix a block format may hold (embedding, projections, LM head); norms, biases and the position table
  // always stay fp32.
  bool quantizable = false;
  bool transposed = false;  // the checkpoint stores it (in, out), as GPT-2's Conv1D modules do
};
// Every tensor the architecture expects, in checkpoint order.
std::vector<ExpectedTensor> ExpectedTensors(const ModelConfig& config);

// The view of weight `name` in `files`: under that name or, for a family whose checkpoints may lack a prefix of
// it (GPT-2's "transformer."), without the prefix. Null when neither is there.
const TensorView* FindWeight(const SafetensorsCollection& files, const ModelConfig& config, const std::string& name);

// Loads and validates weights: every expected name present with the expected shape and a float dtype
// (F32/F16/BF16), no unexpected tensors (rotary inv_freq buffers and a redundant lm_head.weight of a tied
// model are ignored). InvalidArgument names the tensor: "tensor 'model.layers.3.self_attn.k_proj.weight'
// has shape [192, 576], config implies [256, 576]"; NotFound lists missing names.
absl::StatusOr<ModelWeights> LoadWeights(const SafetensorsCollection& files, const ModelConfig& config,
                                         const LoadOptions& options = {});

// Bytes the model at `model_path` (a Hugging Face directory or a GGUF file) holds in memory once loaded with
// `precision`, from its headers alone (no weight is read): norms and biases as fp32, a tied LM head once,
// matrices in the format `precision` gives them (fp32: 4 bytes per weight; stored: the file's; q8_0 / q4_0:
// their blocks, MatrixFormatFor's F16 fallback included). For the memory planner. Errors from opening the
// files.
absl::StatusOr<int64_t> ResidentWeightBytes(const std::string& model_path, const ModelConfig& config,
                                            WeightPrecision precision);

// One frozen matrix as held in memory: logical (rows, cols) and its bytes.
struct HeldMatrix {
  int64_t rows = 0, cols = 0, bytes = 0;
  bool gathered = false;  // a tied embedding: the LM head whose rows are also gathered per token
};

// What stays resident of the weights of the model at `model_path` (loaded with `precision`, holding
// `resident_bytes` as ResidentWeightBytes says) when they are streamed (LlamaModel::set_stream_weights):
// everything but the streamable matrices of the decoder layers and the LM head (the embedding, when tied),
// of which only a page per tile (tile boundaries are not page-aligned), the tile being decoded and, for a
// tied embedding, a page per gathered token row (up to 256) remain. Streamable are the matrices viewing a read-only
// mapping in a format decoded tile by tile: a directory's q8_0 / q4_0 weight cache, and a GGUF file's
// matrices used in place (GgufStreamableMatrices). -1 when none is (fp32 weights, a directory's stored ones).
// Errors from opening a GGUF file.
absl::StatusOr<int64_t> StreamedWeightBytes(const std::string& model_path, const ModelConfig& config,
                                            WeightPrecision precision, int64_t resident_bytes);

// Brings every matrix (embedding, projections, LM head) to `format` in memory: matrices already in the
// format MatrixFormatFor (model/quant.h) gives them stay as they are; others are decoded and converted.
// For GGUF input, which has no weight cache. InvalidArgument for values that cannot be quantized.
absl::Status QuantizeMatrices(ModelWeights& weights, const ModelConfig& config, WeightFormat format);

// Random weights (initializer_range 0.02 normals from the seeded Philox init stream, norms scaling by 1, biases small
// normals), fp32. Deterministic for a given (config, seed).
ModelWeights RandomWeights(const ModelConfig& config, uint64_t seed);

// Writes `weights` as one .safetensors file in `dtype` (F32, F16 or BF16) with Hugging Face names.
absl::Status SaveWeights(const std::string& path, const ModelWeights& weights, const ModelConfig& config, DType dtype);

}  // namespace seedling::model
