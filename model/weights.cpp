#include "model/weights.h"

#include <cmath>
#include <cstring>
#include <set>
#include <span>

#include "base/check.h"
#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::model {
namespace {

enum class Kind { kMatrix, kNorm, kBias, kEmbedding };

// Visits every weight slot of the architecture in checkpoint order: fn(name, shape, kind, slot).
template <typename Fn>
void ForEachWeight(ModelWeights& w, const ModelConfig& c, bool include_tied_head, Fn fn) {
  const int64_t h = c.hidden_size, i = c.intermediate_size;
  fn("model.embed_tokens.weight", std::vector<int64_t>{c.vocab_size, h}, Kind::kEmbedding, w.embed);
  w.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    const std::string p = StrCat("model.layers.", l, ".");
    fn(p + "input_layernorm.weight", std::vector<int64_t>{h}, Kind::kNorm, lw.input_norm);
    fn(p + "self_attn.q_proj.weight", std::vector<int64_t>{c.q_dim(), h}, Kind::kMatrix, lw.q);
    if (c.qkv_bias) fn(p + "self_attn.q_proj.bias", std::vector<int64_t>{c.q_dim()}, Kind::kBias, lw.q_bias);
    fn(p + "self_attn.k_proj.weight", std::vector<int64_t>{c.kv_dim(), h}, Kind::kMatrix, lw.k);
    if (c.qkv_bias) fn(p + "self_attn.k_proj.bias", std::vector<int64_t>{c.kv_dim()}, Kind::kBias, lw.k_bias);
    fn(p + "self_attn.v_proj.weight", std::vector<int64_t>{c.kv_dim(), h}, Kind::kMatrix, lw.v);
    if (c.qkv_bias) fn(p + "self_attn.v_proj.bias", std::vector<int64_t>{c.kv_dim()}, Kind::kBias, lw.v_bias);
    fn(p + "self_attn.o_proj.weight", std::vector<int64_t>{h, c.q_dim()}, Kind::kMatrix, lw.o);
    if (c.o_bias) fn(p + "self_attn.o_proj.bias", std::vector<int64_t>{h}, Kind::kBias, lw.o_bias);
    fn(p + "post_attention_layernorm.weight", std::vector<int64_t>{h}, Kind::kNorm, lw.post_norm);
    fn(p + "mlp.gate_proj.weight", std::vector<int64_t>{i, h}, Kind::kMatrix, lw.gate);
    if (c.mlp_bias) fn(p + "mlp.gate_proj.bias", std::vector<int64_t>{i}, Kind::kBias, lw.gate_bias);
    fn(p + "mlp.up_proj.weight", std::vector<int64_t>{i, h}, Kind::kMatrix, lw.up);
    if (c.mlp_bias) fn(p + "mlp.up_proj.bias", std::vector<int64_t>{i}, Kind::kBias, lw.up_bias);
    fn(p + "mlp.down_proj.weight", std::vector<int64_t>{h, i}, Kind::kMatrix, lw.down);
    if (c.mlp_bias) fn(p + "mlp.down_proj.bias", std::vector<int64_t>{h}, Kind::kBias, lw.down_bias);
  }
  fn("model.norm.weight", std::vector<int64_t>{h}, Kind::kNorm, w.final_norm);
  if (!c.tie_word_embeddings || include_tied_head) {
    fn("lm_head.weight", std::vector<int64_t>{c.vocab_size, h}, Kind::kMatrix, w.lm_head);
  }
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
    default:
      return at::kFloat;  // unreachable: callers accept only float dtypes
  }
}

// A tensor over the mapped bytes (no copy when aligned); the deleter keeps the mapping alive.
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

}  // namespace

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

std::vector<std::pair<std::string, std::vector<int64_t>>> ExpectedTensors(const ModelConfig& config) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  ModelWeights scratch;
  ForEachWeight(scratch, config, /*include_tied_head=*/false,
                [&](const std::string& name, const std::vector<int64_t>& shape, Kind, at::Tensor&) {
                  out.emplace_back(name, shape);
                });
  return out;
}

absl::StatusOr<ModelWeights> LoadWeights(const SafetensorsCollection& files, const ModelConfig& config,
                                         const LoadOptions& options) {
  ModelWeights w;
  std::vector<std::string> missing;
  absl::Status error;
  std::set<std::string, std::less<>> used;
  ForEachWeight(w, config, /*include_tied_head=*/false,
                [&](const std::string& name, const std::vector<int64_t>& shape, Kind kind, at::Tensor& slot) {
                  if (!error.ok()) return;
                  const TensorView* view = files.Find(name);
                  if (view == nullptr) {
                    missing.push_back(name);
                    return;
                  }
                  used.insert(name);
                  if (view->dtype != DType::kF32 && view->dtype != DType::kF16 &&
                      view->dtype != DType::kBF16) {
                    error = absl::InvalidArgumentError(StrCat("tensor '", name, "' has dtype ",
                                                              DTypeName(view->dtype),
                                                              "; expected F32, F16 or BF16"));
                    return;
                  }
                  if (view->shape != shape) {
                    error = absl::InvalidArgumentError(
                        StrCat("tensor '", name, "' has shape ", ShapeString(view->shape),
                               ", config implies ", ShapeString(shape)));
                    return;
                  }
                  at::Tensor t = TensorFromView(*view);
                  const bool keep_stored = options.precision == WeightPrecision::kStored &&
                                           (kind == Kind::kMatrix || kind == Kind::kEmbedding);
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
    return absl::NotFoundError(StrCat(missing.size(), " tensor(s) the ", config.architecture,
                                      " config requires are missing: ", list));
  }
  std::vector<std::string> unexpected;
  for (const std::string& name : files.names()) {
    if (used.count(name)) continue;
    if (name.ends_with("rotary_emb.inv_freq")) continue;                    // old Llama buffers
    if (name == "lm_head.weight" && config.tie_word_embeddings) continue;  // redundant copy when tied
    unexpected.push_back(name);
  }
  if (!unexpected.empty()) {
    std::string list;
    for (size_t i = 0; i < unexpected.size() && i < 5; ++i) list += StrCat(i ? ", " : "", "'", unexpected[i], "'");
    if (unexpected.size() > 5) list += StrCat(" and ", unexpected.size() - 5, " more");
    return absl::InvalidArgumentError(StrCat(unexpected.size(), " tensor(s) are not part of a ",
                                             config.architecture, " with this config: ", list));
  }
  if (config.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

ModelWeights RandomWeights(const ModelConfig& config, uint64_t seed) {
  ModelWeights w;
  constexpr double kStd = 0.02;  // Hugging Face initializer_range
  const double out_std = kStd / std::sqrt(2.0 * static_cast<double>(config.num_hidden_layers));
  uint64_t offset = 0;
  ForEachWeight(w, config, /*include_tied_head=*/false,
                [&](const std::string& name, const std::vector<int64_t>& shape, Kind kind, at::Tensor& slot) {
                  if (kind == Kind::kNorm) {
                    slot = at::ones(shape, at::kFloat);
                    return;
                  }
                  slot = at::empty(shape, at::kFloat);
                  std::span<float> data(slot.data_ptr<float>(), static_cast<size_t>(slot.numel()));
                  FillNormal({seed, rng_stream::kInit}, offset, data);
                  offset += data.size();
                  // Residual-branch outputs get a smaller scale so activations stay O(1) in deep stacks.
                  const bool residual_out = name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight");
                  slot.mul_(residual_out ? out_std : kStd);
                });
  if (config.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

absl::Status SaveWeights(const std::string& path, const ModelWeights& weights, const ModelConfig& config,
                         DType dtype) {
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) {
    return absl::InvalidArgumentError(StrCat("cannot save weights as ", DTypeName(dtype)));
  }
  std::vector<NamedWeight> named = NamedWeights(weights, config);
  std::vector<at::Tensor> converted;
  std::vector<TensorToWrite> out;
  converted.reserve(named.size());
  out.reserve(named.size());
  for (const NamedWeight& nw : named) {
    if (!nw.tensor.defined()) return absl::FailedPreconditionError(StrCat("weight '", nw.name, "' is unset"));
    at::Tensor t = nw.tensor.detach().to(TorchType(dtype)).contiguous();
    converted.push_back(t);
    const auto* bytes = static_cast<const uint8_t*>(t.data_ptr());
    out.push_back({nw.name, dtype, t.sizes().vec(),
                   std::span<const uint8_t>(bytes, static_cast<size_t>(t.nbytes()))});
  }
  return WriteSafetensors(path, out, {{"format", "pt"}});
}

}  // namespace seedling::model
