#include "model/weights.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <set>
#include <span>

#include "base/check.h"
#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"
#include "model/frozen_linear.h"
#include "model/gguf_model.h"
#include "model/quant.h"

namespace seedling::model {
namespace {

// kConv1D: a layer's projection the checkpoint stores (in, out); kPositions: the learned position table.
enum class Kind { kMatrix, kConv1D, kNorm, kBias, kEmbedding, kPositions };

// Matrices a block format may hold; norms, biases and the position table stay fp32.
bool Quantizable(Kind k) { return k == Kind::kMatrix || k == Kind::kConv1D || k == Kind::kEmbedding; }

// Visits every weight slot of the architecture in checkpoint order: fn(name, shape, kind, slot), with the
// family's names (families::ModuleNames).
template <typename Fn>
void ForEachWeight(ModelWeights& w, const ModelConfig& c, bool include_tied_head, Fn fn) {
  const families::ModuleNames& names = families::ModuleNamesOf(c.architecture);
  const int64_t h = c.hidden_size;
  const bool layer_norm = c.norm_kind == NormKind::kLayerNorm;
  // A norm's weight and, for a LayerNorm, its bias.
  auto norm = [&](const std::string& module, at::Tensor& weight, at::Tensor& bias) {
    fn(module + ".weight", std::vector<int64_t>{h}, Kind::kNorm, weight);
    if (layer_norm) fn(module + ".bias", std::vector<int64_t>{h}, Kind::kBias, bias);
  };
  const int64_t e = c.embedding_dim();
  fn(std::string(names.embed), std::vector<int64_t>{c.vocab_size, e}, Kind::kEmbedding, w.embed);
  if (c.positions == PositionKind::kLearned) {
    fn(std::string(names.positions), std::vector<int64_t>{c.position_rows(), h}, Kind::kPositions, w.positions);
  }
  if (c.projects_embeddings()) {
    fn(std::string(names.project_out), std::vector<int64_t>{e, h}, Kind::kMatrix, w.project_out);
    fn(std::string(names.project_in), std::vector<int64_t>{h, e}, Kind::kMatrix, w.project_in);
  }
  w.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    const std::string p = LayerPrefix(c, l);
    // A projection's weight and, when the block gives it one, its bias.
    auto projection = [&](Projection proj, bool has_bias, at::Tensor& weight, at::Tensor& bias) {
      const ProjectionFeatures f = FeaturesOf(c, proj);
      const std::string module = p + ProjectionPath(c, proj);
      fn(module + ".weight", std::vector<int64_t>{f.out, f.in}, names.conv1d ? Kind::kConv1D : Kind::kMatrix, weight);
      if (has_bias) fn(module + ".bias", std::vector<int64_t>{f.out}, Kind::kBias, bias);
    };
    if (c.norms.pre_attention) norm(p + std::string(names.input_norm), lw.input_norm, lw.input_norm_bias);
    if (c.fused.qkv) {
      projection(Projection::kQkv, c.qkv_bias, lw.qkv, lw.qkv_bias);
    } else {
      projection(Projection::kQ, c.qkv_bias, lw.q, lw.q_bias);
      projection(Projection::kK, c.qkv_bias, lw.k, lw.k_bias);
      projection(Projection::kV, c.qkv_bias, lw.v, lw.v_bias);
    }
    projection(Projection::kO, c.o_bias, lw.o, lw.o_bias);
    if (c.qk_norm != QkNorm::kNone) {
      fn(p + "self_attn.q_norm.weight", std::vector<int64_t>{c.q_norm_size()}, Kind::kNorm, lw.q_norm);
      fn(p + "self_attn.k_norm.weight", std::vector<int64_t>{c.k_norm_size()}, Kind::kNorm, lw.k_norm);
    }
    // Llama's post_attention_layernorm is the MLP's input norm; blocks that also normalize attention's output
    // (OLMo 2, Gemma) give that name to the output norm and call the MLP's input norm pre_feedforward_layernorm.
    if (c.norms.attention_output) {
      norm(p + "post_attention_layernorm", lw.attention_output_norm, lw.attention_output_norm_bias);
    }
    if (c.norms.pre_mlp) {
      const std::string name = c.norms.attention_output ? "pre_feedforward_layernorm" : std::string(names.pre_mlp_norm);
      norm(p + name, lw.pre_mlp_norm, lw.pre_mlp_norm_bias);
    }
    if (c.fused.gate_up) {
      projection(Projection::kGateUp, c.mlp_bias, lw.gate_up, lw.gate_up_bias);
    } else {
      if (c.gated_mlp) projection(Projection::kGate, c.mlp_bias, lw.gate, lw.gate_bias);
      projection(Projection::kUp, c.mlp_bias, lw.up, lw.up_bias);
    }
    projection(Projection::kDown, c.mlp_bias, lw.down, lw.down_bias);
    if (c.norms.mlp_output) norm(p + "post_feedforward_layernorm", lw.mlp_output_norm, lw.mlp_output_norm_bias);
  }
  if (c.norms.final) norm(std::string(names.final_norm), w.final_norm, w.final_norm_bias);
  if (!c.tie_word_embeddings || include_tied_head) {
    fn(std::string(names.lm_head), std::vector<int64_t>{c.vocab_size, e}, Kind::kMatrix, w.lm_head);
  }
  if (c.lm_head_bias)
    fn(std::string(names.lm_head_bias), std::vector<int64_t>{c.vocab_size}, Kind::kBias, w.lm_head_bias);
}

std::string ShapeString(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += StrCat(i ? ", " : "", shape[i]);
  return s + "]";
}

at::ScalarType TorchType(DType d) {
  switch (d) {
    case DType::kF32:
      return at::kFloat;
    case DType::kF16:
      return at::kHalf;
    case DType::kBF16:
      return at::kBFloat16;
    case DType::kU8:
      return at::kByte;  // GGUF blocks in a weight cache
    default:
      return at::kFloat;  // unreachable: callers accept only float dtypes and U8 blocks
  }
}

// Buffers old checkpoints saved beside the weights: RoPE's inverse frequencies, and the family's own
// (families::ModuleNames::buffers).
bool IsSkippedBuffer(std::string_view name, const ModelConfig& config) {
  if (name.ends_with("rotary_emb.inv_freq")) return true;
  for (std::string_view buffer : families::ModuleNamesOf(config.architecture).buffers) {
    if (!buffer.empty() && name.ends_with(StrCat(".", buffer))) return true;
  }
  return false;
}

}  // namespace

at::Tensor TensorFromView(const TensorView& view) {
  const at::ScalarType type = TorchType(view.dtype);
  const size_t elem = DTypeSize(view.dtype);
  void* data = const_cast<uint8_t*>(view.data);
  if (reinterpret_cast<uintptr_t>(data) % elem != 0 || view.nbytes == 0) {
    at::Tensor t = at::empty(view.shape, at::TensorOptions().dtype(type));
    if (view.nbytes > 0) std::memcpy(t.data_ptr(), view.data, view.nbytes);
    return t;
  }
  std::shared_ptr<MappedFile> keep = view.file;
  return at::from_blob(
      data, view.shape, [keep](void*) mutable { keep.reset(); }, at::TensorOptions().dtype(type));
}

std::vector<NamedWeight> NamedWeights(const ModelWeights& weights, const ModelConfig& config) {
  std::vector<NamedWeight> out;
  ModelWeights& w = const_cast<ModelWeights&>(weights);  // ForEachWeight only reads the slots here
  const size_t layers = w.layers.size();
  SEEDLING_CHECK(static_cast<int64_t>(layers) == config.num_hidden_layers);
  ForEachWeight(w, config, /*include_tied_head=*/false,
                [&](const std::string& name, const std::vector<int64_t>&, Kind, at::Tensor& slot) {
                  out.push_back({name, slot});
                });
  return out;
}

void ForEachWeightSlot(ModelWeights& weights, const ModelConfig& config,
                       const std::function<void(const std::string& name, at::Tensor& slot)>& fn) {
  SEEDLING_CHECK(static_cast<int64_t>(weights.layers.size()) == config.num_hidden_layers);
  ForEachWeight(weights, config, /*include_tied_head=*/false,
                [&](const std::string& name, const std::vector<int64_t>&, Kind, at::Tensor& slot) { fn(name, slot); });
}

std::vector<ExpectedTensor> ExpectedTensors(const ModelConfig& config) {
  std::vector<ExpectedTensor> out;
  ModelWeights scratch;
  ForEachWeight(scratch, config, /*include_tied_head=*/false,
                [&](const std::string& name, const std::vector<int64_t>& shape, Kind kind, at::Tensor&) {
                  out.push_back({name, shape, Quantizable(kind), kind == Kind::kConv1D});
                });
  return out;
}

const TensorView* FindWeight(const SafetensorsCollection& files, const ModelConfig& config, const std::string& name) {
  if (const TensorView* view = files.Find(name)) return view;
  const std::string_view prefix = families::ModuleNamesOf(config.architecture).optional_prefix;
  if (prefix.empty() || !name.starts_with(prefix)) return nullptr;
  return files.Find(std::string_view(name).substr(prefix.size()));
}

absl::StatusOr<ModelWeights> LoadWeights(const SafetensorsCollection& files, const ModelConfig& config,
                                         const LoadOptions& options) {
  // q8_0 / q4_0 read a weight cache (model/weight_cache.h), whose matrices are U8 GGUF blocks.
  const bool cached = options.precision == WeightPrecision::kQ8_0 || options.precision == WeightPrecision::kQ4_0;
  ModelWeights w;
  std::vector<std::string> missing;
  absl::Status error;
  std::set<std::string, std::less<>> used;
  ForEachWeight(
      w, config, /*include_tied_head=*/false,
      [&](const std::string& name, const std::vector<int64_t>& shape, Kind kind, at::Tensor& slot) {
        if (!error.ok()) return;
        const TensorView* view = FindWeight(files, config, name);
        if (view == nullptr) {
          missing.push_back(name);
          return;
        }
        used.insert(view->name);
        const bool blocks = cached && view->dtype == DType::kU8 && Quantizable(kind);
        // A Conv1D matrix is stored (in, out); a weight cache holds it transposed already, as blocks.
        const bool transposed = kind == Kind::kConv1D && !blocks;
        if (view->dtype != DType::kF32 && view->dtype != DType::kF16 && view->dtype != DType::kBF16 && !blocks) {
          error = absl::InvalidArgumentError(
              StrCat("tensor '", name, "' has dtype ", DTypeName(view->dtype), "; expected F32, F16 or BF16"));
          return;
        }
        std::vector<int64_t> stored_shape = blocks && view->shape.size() == 3
                                                ? std::vector<int64_t>{view->shape[0], view->shape[1] * kQuantBlock}
                                                : view->shape;
        if (transposed) std::reverse(stored_shape.begin(), stored_shape.end());
        if (stored_shape != shape || (blocks && view->shape.size() != 3) ||
            (blocks && view->shape[2] != BlockBytes(WeightFormat::kQ8_0) &&
             view->shape[2] != BlockBytes(WeightFormat::kQ4_0))) {
          error = absl::InvalidArgumentError(StrCat("tensor '", name, "' has shape ", ShapeString(view->shape),
                                                    ", config implies ", ShapeString(shape)));
          return;
        }
        at::Tensor t = TensorFromView(*view);
        if (transposed) {
          t = t.t().contiguous();  // a copy in the stored dtype: the mapped pages are no longer needed
          view->file->Release(view->data, view->nbytes);
        }
        const bool keep_stored = (options.precision != WeightPrecision::kFloat32) && Quantizable(kind);
        if (t.scalar_type() != at::kFloat && !keep_stored) {
          t = t.to(at::kFloat);
          // The 16-bit source pages are no longer needed: without this, loading a BF16
          // checkpoint peaks at 6 bytes per parameter instead of 4.
          view->file->Release(view->data, view->nbytes);
        }
        slot = std::move(t);
      });
  SEEDLING_RETURN_IF_ERROR(error);
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 5; ++i) list += StrCat(i ? ", " : "", "'", missing[i], "'");
    if (missing.size() > 5) list += StrCat(" and ", missing.size() - 5, " more");
    return absl::NotFoundError(
        StrCat(missing.size(), " tensor(s) the ", config.architecture, " config requires are missing: ", list));
  }
  std::vector<std::string> unexpected;
  const families::ModuleNames& names = families::ModuleNamesOf(config.architecture);
  for (const std::string& name : files.names()) {
    if (used.count(name)) continue;
    if (IsSkippedBuffer(name, config)) continue;
    if (name == names.lm_head && config.tie_word_embeddings) continue;  // redundant copy when tied
    unexpected.push_back(name);
  }
  if (!unexpected.empty()) {
    std::string list;
    for (size_t i = 0; i < unexpected.size() && i < 5; ++i) list += StrCat(i ? ", " : "", "'", unexpected[i], "'");
    if (unexpected.size() > 5) list += StrCat(" and ", unexpected.size() - 5, " more");
    return absl::InvalidArgumentError(
        StrCat(unexpected.size(), " tensor(s) are not part of a ", config.architecture, " with this config: ", list));
  }
  if (config.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

namespace {

// Bytes of every matrix as stored in the file at `model_path`, by Hugging Face name for safetensors; for a
// GGUF file (whose names differ) the sum over its 2-D tensors under the key "".
absl::StatusOr<std::map<std::string, int64_t>> StoredMatrixBytes(const std::string& model_path) {
  std::map<std::string, int64_t> bytes;
  if (IsGgufPath(model_path)) {
    SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(model_path));
    for (const GgufTensorInfo& t : file->tensors()) {
      if (t.shape.size() == 2) bytes[""] += static_cast<int64_t>(t.nbytes);
    }
    return bytes;
  }
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsCollection> files, SafetensorsCollection::Open(model_path));
  for (const std::string& name : files->names()) {
    const TensorView* view = files->Find(name);
    if (view->shape.size() == 2) bytes[name] = static_cast<int64_t>(view->nbytes);
  }
  return bytes;
}

}  // namespace

absl::StatusOr<int64_t> ResidentWeightBytes(const std::string& model_path, const ModelConfig& config,
                                            WeightPrecision precision) {
  std::map<std::string, int64_t> stored;
  if (precision == WeightPrecision::kStored) {
    SEEDLING_ASSIGN_OR_RETURN(stored, StoredMatrixBytes(model_path));
  }
  int64_t total = stored.count("") ? stored[""] : 0;  // a GGUF file's matrices, counted as a whole
  const std::string_view prefix = families::ModuleNamesOf(config.architecture).optional_prefix;
  for (const auto& [name, shape, quantizable, transposed] : ExpectedTensors(config)) {
    const int64_t numel = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
    if (!quantizable || precision == WeightPrecision::kFloat32) {
      total += 4 * numel;
    } else if (precision == WeightPrecision::kStored) {
      // Under its name, or without the family's optional prefix (FindWeight).
      const std::string bare = name.starts_with(prefix) ? name.substr(prefix.size()) : name;
      const std::string& key = stored.count(name) || prefix.empty() ? name : bare;
      if (!stored.count("")) total += stored.count(key) ? stored[key] : 4 * numel;
    } else {
      total += shape[0] * RowBytes(MatrixFormatFor(*BlockFormatOf(precision), shape[1]), shape[1]);
    }
  }
  return total;
}

namespace {

// The streamable matrices of a q8_0 / q4_0 weight cache: all of them are read-only mapped; the decoder
// layers' and the LM head's (the embedding, when tied) are walked tile by tile.
std::vector<HeldMatrix> CacheStreamableMatrices(const ModelConfig& config, WeightFormat format) {
  const families::ModuleNames& names = families::ModuleNamesOf(config.architecture);
  const std::string layers = StrCat(names.layers, ".");
  std::vector<HeldMatrix> out;
  for (const auto& [name, shape, quantizable, transposed] : ExpectedTensors(config)) {
    const bool head = name == names.lm_head || (config.tie_word_embeddings && name == names.embed);
    if (!quantizable || (!head && !name.starts_with(layers))) continue;
    out.push_back(
        {shape[0], shape[1], shape[0] * RowBytes(MatrixFormatFor(format, shape[1]), shape[1]), name == names.embed});
  }
  return out;
}

}  // namespace

absl::StatusOr<int64_t> StreamedWeightBytes(const std::string& model_path, const ModelConfig& config,
                                            WeightPrecision precision, int64_t resident_bytes) {
  std::vector<HeldMatrix> matrices;
  if (IsGgufPath(model_path)) {
    SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(model_path));
    matrices = GgufStreamableMatrices(*file, config, precision);
  } else if (const std::optional<WeightFormat> block = BlockFormatOf(precision)) {
    matrices = CacheStreamableMatrices(config, *block);
  }
  if (matrices.empty()) return -1;
  const auto page = static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
  // A tied embedding streamed as the LM head still has the rows of a batch's tokens gathered between two
  // walks of the head: about a page each, for up to kGatheredRows tokens.
  constexpr int64_t kGatheredRows = 256;
  int64_t streamed = 0, kept_pages = 0, largest_tile = 0;
  for (const HeldMatrix& m : matrices) {
    const int64_t tile_rows = DefaultTileRows(m.rows, m.cols);
    streamed += m.bytes;
    kept_pages += (m.rows + tile_rows - 1) / tile_rows + 1 + (m.gathered ? kGatheredRows : 0);
    largest_tile = std::max(largest_tile, m.bytes / m.rows * tile_rows);
  }
  return resident_bytes - streamed + kept_pages * page + largest_tile;
}

absl::Status QuantizeMatrices(ModelWeights& weights, const ModelConfig& config, WeightFormat format) {
  absl::Status error;
  ForEachWeight(weights, config, /*include_tied_head=*/false,
                [&](const std::string& name, const std::vector<int64_t>& shape, Kind kind, at::Tensor& slot) {
                  if (!error.ok() || !Quantizable(kind)) return;
                  const WeightFormat target = MatrixFormatFor(format, shape[1]);
                  if (FormatOf(slot) == target) return;
                  if (!IsBlockFormat(target)) {
                    slot = DequantizeMatrix(slot).to(at::kHalf);
                    return;
                  }
                  absl::StatusOr<at::Tensor> q = QuantizeMatrix(DequantizeMatrix(slot), target, name);
                  if (!q.ok()) {
                    error = q.status();
                    return;
                  }
                  slot = *std::move(q);
                });
  if (config.tie_word_embeddings) weights.lm_head = weights.embed;
  return error;
}

ModelWeights RandomWeights(const ModelConfig& config, uint64_t seed) {
  ModelWeights w;
  constexpr double kStd = 0.02;  // Hugging Face initializer_range
  const double out_std = kStd / std::sqrt(2.0 * static_cast<double>(config.num_hidden_layers));
  const std::string o = StrCat(ProjectionPath(config, Projection::kO), ".weight");
  const std::string down = StrCat(ProjectionPath(config, Projection::kDown), ".weight");
  uint64_t offset = 0;
  ForEachWeight(w, config, /*include_tied_head=*/false,
                [&](const std::string& name, const std::vector<int64_t>& shape, Kind kind, at::Tensor& slot) {
                  if (kind == Kind::kNorm) {  // scaling by 1 (Gemma stores w - 1)
                    slot = at::full(shape, 1.0 - config.norm_weight_offset, at::kFloat);
                    return;
                  }
                  slot = at::empty(shape, at::kFloat);
                  std::span<float> data(slot.data_ptr<float>(), static_cast<size_t>(slot.numel()));
                  FillNormal({seed, rng_stream::kInit}, offset, data);
                  offset += data.size();
                  // Residual-branch outputs get a smaller scale so activations stay O(1) in deep stacks.
                  const bool residual_out = name.ends_with(o) || name.ends_with(down);
                  slot.mul_(residual_out ? out_std : kStd);
                });
  if (config.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

absl::Status SaveWeights(const std::string& path, const ModelWeights& weights, const ModelConfig& config, DType dtype) {
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) {
    return absl::InvalidArgumentError(StrCat("cannot save weights as ", DTypeName(dtype)));
  }
  std::vector<at::Tensor> converted;
  std::vector<TensorToWrite> out;
  absl::Status error;
  ModelWeights& w = const_cast<ModelWeights&>(weights);  // ForEachWeight only reads the slots here
  SEEDLING_CHECK(static_cast<int64_t>(w.layers.size()) == config.num_hidden_layers);
  ForEachWeight(w, config, /*include_tied_head=*/false,
                [&](const std::string& name, const std::vector<int64_t>&, Kind kind, at::Tensor& slot) {
                  if (!error.ok()) return;
                  if (!slot.defined()) {
                    error = absl::FailedPreconditionError(StrCat("weight '", name, "' is unset"));
                    return;
                  }
                  const at::Tensor t = kind == Kind::kConv1D ? slot.detach().t() : slot.detach();  // stored (in, out)
                  converted.push_back(t.to(TorchType(dtype)).contiguous());
                  out.push_back({name, dtype, converted.back().sizes().vec(), {}});
                });
  SEEDLING_RETURN_IF_ERROR(error);
  for (size_t i = 0; i < out.size(); ++i) {
    const auto* bytes = static_cast<const uint8_t*>(converted[i].data_ptr());
    out[i].data = std::span<const uint8_t>(bytes, static_cast<size_t>(converted[i].nbytes()));
  }
  return WriteSafetensors(path, out, {{"format", "pt"}});
}

}  // namespace seedling::model
