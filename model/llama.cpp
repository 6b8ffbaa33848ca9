#include "model/llama.h"

#include <torch/csrc/autograd/generated/variable_factories.h>

#include <algorithm>

#include "base/check.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/frozen_linear.h"
#include "model/gguf_model.h"
#include "model/quant.h"
#include "model/torch_status.h"
#include "model/weight_cache.h"

namespace seedling::model {
namespace {

std::string ShapeString(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += StrCat(i ? ", " : "", shape[i]);
  return s + "]";
}

// Next-token prediction reads the hidden states of positions 0..T-2 against the labels of positions
// 1..T-1. PredictingRows: (..., B, T, H) -> (..., B (T-1), H), leading dimensions (stacked tangents)
// kept; NextTokenTargets: (B, T) -> (B (T-1)); ScoredTokens counts the targets that are not ignored.
at::Tensor PredictingRows(const at::Tensor& hidden) {
  const int64_t d = hidden.dim(), b = hidden.size(d - 3), t = hidden.size(d - 2), h = hidden.size(d - 1);
  std::vector<int64_t> shape(hidden.sizes().begin(), hidden.sizes().end() - 3);
  shape.push_back(b * (t - 1));
  shape.push_back(h);
  return hidden.narrow(d - 2, 0, t - 1).reshape(shape);
}

at::Tensor NextTokenTargets(const at::Tensor& labels) { return labels.narrow(1, 1, labels.size(1) - 1).reshape({-1}); }

int64_t ScoredTokens(const at::Tensor& targets) { return targets.ne(kIgnoreIndex).sum().item<int64_t>(); }

}  // namespace

KvCache::KvCache(const ModelConfig& config, int64_t batch, int64_t max_length)
    : batch_(batch), max_length_(max_length) {
  SEEDLING_CHECK(batch > 0 && max_length > 0);
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    k_.push_back(at::zeros({batch, config.num_key_value_heads, max_length, config.head_dim}, at::kFloat));
    v_.push_back(at::zeros({batch, config.num_key_value_heads, max_length, config.head_dim}, at::kFloat));
  }
}

int64_t KvCache::bytes() const {
  int64_t total = 0;
  for (size_t i = 0; i < k_.size(); ++i) total += k_[i].nbytes() + v_[i].nbytes();
  return total;
}

namespace {

// The local layers' RoPE: their own base, no scaling (Gemma 3).
ModelConfig LocalRopeConfig(const ModelConfig& c) {
  ModelConfig local = c;
  local.rope_theta = c.rope_local_theta;
  local.rope_scaling = RopeScaling{};
  return local;
}

// The outputs of q, k and v (..., q_dim), (..., kv_dim), (..., kv_dim): three projections, or one multiply of
// the fused qkv_proj split by columns (ModelConfig::fused). project(p, weight, bias) runs one projection.
struct QkvOutputs {
  at::Tensor q, k, v;
};
template <typename ProjectFn>
QkvOutputs ProjectQkv(const ModelConfig& c, const LayerWeights& w, ProjectFn project) {
  if (!c.fused.qkv) {
    return {project(Projection::kQ, w.q, w.q_bias), project(Projection::kK, w.k, w.k_bias),
            project(Projection::kV, w.v, w.v_bias)};
  }
  const at::Tensor fused = project(Projection::kQkv, w.qkv, w.qkv_bias);
  if (c.fused.qkv_per_head) {
    // Rows q_h | k_h | v_h per head (GPT-NeoX): (..., heads, 3, D), each part gathered back to (..., heads * D).
    const std::vector<at::Tensor> parts = fused.unflatten(-1, {c.num_attention_heads, 3, c.head_dim}).unbind(-2);
    return {parts[0].flatten(-2), parts[1].flatten(-2), parts[2].flatten(-2)};
  }
  // split's backward concatenates the parts' gradients into one tensor (narrow's would zero-fill three).
  const std::vector<at::Tensor> parts = fused.split_with_sizes({c.q_dim(), c.kv_dim(), c.kv_dim()}, -1);
  return {parts[0], parts[1], parts[2]};
}

// The MLP's gate and up outputs (..., I) each, from two projections or the fused gate_up_proj.
template <typename ProjectFn>
std::pair<at::Tensor, at::Tensor> ProjectGateUp(const ModelConfig& c, const LayerWeights& w, ProjectFn project) {
  if (!c.fused.gate_up) {
    return {project(Projection::kGate, w.gate, w.gate_bias), project(Projection::kUp, w.up, w.up_bias)};
  }
  const std::vector<at::Tensor> parts = project(Projection::kGateUp, w.gate_up, w.gate_up_bias).chunk(2, -1);
  return {parts[0], parts[1]};
}

}  // namespace

LlamaModel::LlamaModel(ModelConfig config, ModelWeights weights)
    : config_(std::move(config)),
      weights_(std::move(weights)),
      inv_freq_(RopeInverseFrequencies(config_)),
      long_inv_freq_(config_.rope_scaling.type == RopeScaling::Type::kLongRope
                         ? RopeInverseFrequencies(config_, /*long_context=*/true)
                         : at::Tensor()),
      local_inv_freq_(config_.rope_local_theta > 0 ? RopeInverseFrequencies(LocalRopeConfig(config_)) : at::Tensor()) {}

LlamaModel::LayerRopes LlamaModel::MakeRopes(int64_t start, int64_t length, at::ScalarType dtype) const {
  const double attention_factor = RopeAttentionFactor(config_);
  auto tables = [&](const at::Tensor& inv_freq) {
    const RopeTables t = MakeRopeTables(inv_freq, start, length);
    if (attention_factor != 1.0)
      return RopeTables{(t.cos * attention_factor).to(dtype), (t.sin * attention_factor).to(dtype)};
    return RopeTables{t.cos.to(dtype), t.sin.to(dtype)};  // once, not per layer
  };
  LayerRopes ropes;
  if (config_.positions != PositionKind::kRope) return ropes;  // learned positions: Rotate never reads them
  // LongRoPE takes its long factors once a forward reaches past the pre-trained context (as Hugging Face
  // decides per forward by the largest position).
  ropes.global = tables(RopeLongContext(config_, start + length) ? long_inv_freq_ : inv_freq_);
  if (local_inv_freq_.defined()) ropes.local = tables(local_inv_freq_);
  return ropes;
}

at::Tensor LlamaModel::NormWeight(const at::Tensor& w) const {
  return config_.norm_weight_offset == 0 ? w : w + config_.norm_weight_offset;
}

at::Tensor LlamaModel::FinalNorm(const at::Tensor& x, NormFn norm, int64_t forward_level) const {
  const at::Tensor h = MaybeNorm(config_.norms.final, x, weights_.final_norm, weights_.final_norm_bias, norm);
  if (!config_.projects_embeddings()) return h;
  return FrozenLinear(h, weights_.project_out, at::Tensor(), forward_level, Stream());
}

namespace {

// A GGUF file's weights and the mapping they view. Only fp32 weights (which --full trains in place) map the
// file copy-on-write; every other precision keeps its matrices frozen, so they view a read-only mapping whose
// pages can be streamed (WeightPages).
struct GgufWeights {
  ModelWeights weights;
  std::shared_ptr<const MappedFile> mapping;
};

absl::StatusOr<GgufWeights> LoadGgufWeights(const std::string& path, const ModelConfig& config,
                                            const LoadOptions& options) {
  const bool frozen = options.precision != WeightPrecision::kFloat32;
  SEEDLING_ASSIGN_OR_RETURN(
      std::unique_ptr<GgufFile> file,
      GgufFile::Open(path, frozen ? MappedFile::Mode::kReadOnly : MappedFile::Mode::kCopyOnWrite));
  GgufWeights out;
  SEEDLING_ASSIGN_OR_RETURN(out.weights, WeightsFromGguf(*file, config, options.precision));
  if (const std::optional<WeightFormat> block = BlockFormatOf(options.precision)) {
    SEEDLING_RETURN_IF_ERROR(QuantizeMatrices(out.weights, config, *block));
  }
  if (frozen) out.mapping = file->file();
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir, const LoadOptions& options) {
  SEEDLING_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  if (IsGgufPath(dir)) {
    auto loaded = CatchTorch("loading weights", [&] { return LoadGgufWeights(dir, config, options); });
    if (!loaded.ok()) return Annotate(loaded.status(), dir);
    SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model, Create(std::move(config), std::move(loaded->weights)));
    if (loaded->mapping != nullptr) {
      model->pages_ = std::make_shared<const WeightPages>(std::vector{std::move(loaded->mapping)});
    }
    return model;
  }
  const std::optional<WeightFormat> block = BlockFormatOf(options.precision);
  const bool quantized = block.has_value();
  SEEDLING_ASSIGN_OR_RETURN(
      std::unique_ptr<SafetensorsCollection> files,
      SafetensorsCollection::Open(dir, quantized ? MappedFile::Mode::kReadOnly : MappedFile::Mode::kCopyOnWrite));
  if (quantized) {
    // The matrices come from the weight cache; the source is read only to (re)build it.
    WeightCacheOptions cache_options{options.cache_dir, options.cache_progress};
    SEEDLING_ASSIGN_OR_RETURN(WeightCache cache, OpenWeightCache(*files, dir, config, *block, cache_options));
    files = std::move(cache.files);
  }
  auto weights = CatchTorch("loading weights", [&] { return LoadWeights(*files, config, options); });
  if (!weights.ok()) return Annotate(weights.status(), dir);
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model, Create(std::move(config), std::move(weights).value()));
  if (quantized) {
    std::vector<std::shared_ptr<const MappedFile>> mappings;
    for (const SafetensorsFile* file : files->files()) mappings.push_back(file->mapping());
    model->pages_ = std::make_shared<const WeightPages>(std::move(mappings));
  }
  return model;
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(ModelConfig config, ModelWeights weights) {
  SEEDLING_RETURN_IF_ERROR(config.Validate());
  if (static_cast<int64_t>(weights.layers.size()) != config.num_hidden_layers) {
    return absl::InvalidArgumentError(
        StrCat("weights have ", weights.layers.size(), " layers, config has ", config.num_hidden_layers));
  }
  if (!weights.lm_head.defined() && config.tie_word_embeddings) weights.lm_head = weights.embed;
  const auto expected = ExpectedTensors(config);
  const auto named = NamedWeights(weights, config);
  SEEDLING_CHECK(expected.size() == named.size());
  for (size_t i = 0; i < named.size(); ++i) {
    const at::Tensor& t = named[i].tensor;
    if (!t.defined()) return absl::InvalidArgumentError(StrCat("weight '", named[i].name, "' is missing"));
    if (LogicalShape(t) != expected[i].shape) {
      return absl::InvalidArgumentError(StrCat("weight '", named[i].name, "' has shape ", ShapeString(LogicalShape(t)),
                                               ", config implies ", ShapeString(expected[i].shape)));
    }
  }
  if (!weights.lm_head.defined()) return absl::InvalidArgumentError("weight 'lm_head.weight' is missing");
  return std::unique_ptr<LlamaModel>(new LlamaModel(std::move(config), std::move(weights)));
}

absl::Status LlamaModel::ValidateTokens(const at::Tensor& tokens) const {
  if (!tokens.defined() || tokens.dim() != 2) {
    return absl::InvalidArgumentError(StrCat("tokens must be a (batch, time) tensor, got ",
                                             tokens.defined() ? ShapeString(tokens.sizes()) : "undefined"));
  }
  if (tokens.scalar_type() != at::kLong) return absl::InvalidArgumentError("tokens must be int64");
  if (tokens.size(0) == 0 || tokens.size(1) == 0) {
    return absl::InvalidArgumentError(StrCat("tokens must be non-empty, got ", ShapeString(tokens.sizes())));
  }
  const int64_t lo = tokens.min().item<int64_t>();
  const int64_t hi = tokens.max().item<int64_t>();
  if (lo < 0 || hi >= config_.vocab_size) {
    return absl::InvalidArgumentError(
        StrCat("token id ", lo < 0 ? lo : hi, " is outside the vocabulary [0, ", config_.vocab_size, ")"));
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::ValidatePositions(int64_t end) const {
  if (config_.positions != PositionKind::kLearned || end <= config_.max_position_embeddings) return absl::OkStatus();
  return absl::InvalidArgumentError(StrCat("positions up to ", end, " exceed the ", config_.max_position_embeddings,
                                           " the model's position table holds"));
}

at::Tensor LlamaModel::Embed(const at::Tensor& tokens, int64_t start) const {
  at::Tensor x = FrozenEmbedding(weights_.embed, tokens);  // (B, T, E)
  if (config_.projects_embeddings()) x = FrozenLinear(x, weights_.project_in, at::Tensor(), -1, Stream());
  if (config_.scale_embeddings) x = x * std::sqrt(static_cast<double>(config_.hidden_size));
  if (config_.positions == PositionKind::kLearned) {
    x = x + AsCompute(weights_.positions).narrow(0, start + config_.position_offset, tokens.size(1));
  }
  return x;
}

at::Tensor LlamaModel::Rotate(const at::Tensor& x, const RopeTables& rope) const {
  return config_.positions == PositionKind::kRope ? ApplyRope(x, rope) : x;
}

at::Tensor LlamaModel::Project(int64_t layer, Projection p, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor& b, const ForwardOptions& options, LayerOutput output) const {
  at::Tensor y = output == LayerOutput::kGraphOnly ? FrozenLinearGraph(x, w, b, Stream())
                                                   : FrozenLinear(x, w, b, options.forward_level, Stream());
  if (options.adapter != nullptr) y = options.adapter->Apply(layer, p, x, y);
  return y;
}

at::Tensor LlamaModel::Mlp(int64_t layer, const at::Tensor& x, const ForwardOptions& options,
                           LayerOutput output) const {
  const int64_t rows = x.numel() / x.size(-1);
  const int64_t chunk = options.mlp_chunk_tokens;
  if (chunk <= 0 || rows <= chunk || at::GradMode::is_enabled() || options.forward_level >= 0 || x.dim() != 3) {
    return MlpRows(layer, x, options, output);
  }
  // Without autograd, a span of positions of every sequence at a time (about `chunk` tokens): the
  // (tokens × intermediate) transients stay small, and each chunk keeps the batch's sequences together
  // (an adapter with perturbed copies tells them apart by batch row).
  const int64_t batch = x.size(0), t = x.size(1);
  const int64_t span = std::max<int64_t>(1, chunk / batch);
  at::Tensor out = at::empty_like(x);
  for (int64_t start = 0; start < t; start += span) {
    const int64_t len = std::min(span, t - start);
    out.narrow(1, start, len).copy_(MlpRows(layer, x.narrow(1, start, len), options));
  }
  return out;
}

at::Tensor LlamaModel::MlpRows(int64_t layer, const at::Tensor& x, const ForwardOptions& options,
                               LayerOutput output) const {
  const LayerWeights& w = weights_.layers[static_cast<size_t>(layer)];
  at::Tensor hidden;  // (..., I)
  if (config_.gated_mlp) {
    const auto [gate, up] =
        ProjectGateUp(config_, w, [&](Projection p, const at::Tensor& weight, const at::Tensor& bias) {
          return Project(layer, p, x, weight, bias, options);
        });
    hidden = GatedActivation(gate, up, config_.mlp_activation);
  } else {
    hidden = Activation(Project(layer, Projection::kUp, x, w.up, w.up_bias, options), config_.mlp_activation);
  }
  return Project(layer, Projection::kDown, hidden, w.down, w.down_bias, options, output);  // (..., H)
}

at::Tensor LlamaModel::DecoderLayer(int64_t layer, const at::Tensor& x, const RopeTables& rope,
                                    const ForwardOptions& options) const {
  return DecoderLayerImpl(layer, x, rope, options, nullptr, 0);
}

at::Tensor LlamaModel::DecoderLayerImpl(int64_t layer, const at::Tensor& x, const RopeTables& rope,
                                        const ForwardOptions& options, KvCache* cache, int64_t q_start,
                                        LayerOutput output) const {
  const LayerWeights& w = weights_.layers[static_cast<size_t>(layer)];
  const int64_t b = x.size(0), t = x.size(1);
  const int64_t hq = config_.num_attention_heads, hkv = config_.num_key_value_heads, d = config_.head_dim;

  // Attention block.
  const at::Tensor h = AttentionInput(x, w, Norm);  // (B, T, H)
  const QkvOutputs qkv = ProjectQkv(config_, w, [&](Projection p, const at::Tensor& weight, const at::Tensor& bias) {
    return Project(layer, p, h, weight, bias, options);
  });
  at::Tensor q = QkHeads(qkv.q, hq, w.q_norm, Norm).transpose(1, 2);
  at::Tensor k = QkHeads(qkv.k, hkv, w.k_norm, Norm).transpose(1, 2);
  at::Tensor v = qkv.v.view({b, t, hkv, d}).transpose(1, 2);
  q = Rotate(q, rope);  // (B, Hq, T, D)
  k = Rotate(k, rope);  // (B, Hkv, T, D)
  if (cache != nullptr) {
    at::Tensor& ck = cache->k_[static_cast<size_t>(layer)];
    at::Tensor& cv = cache->v_[static_cast<size_t>(layer)];
    ck.narrow(2, q_start, t).copy_(k);
    cv.narrow(2, q_start, t).copy_(v);
    k = ck.narrow(2, 0, q_start + t);  // (B, Hkv, S, D)
    v = cv.narrow(2, 0, q_start + t);
  }
  const at::Tensor attn = GroupedQueryAttention(q, k, v, q_start, config_.LayerWindow(layer), config_.attention_softcap,
                                                config_.attention_scale)  // (B, Hq, T, D)
                              .transpose(1, 2)
                              .reshape({b, t, hq * d});
  const at::Tensor attended =
      MaybeNorm(config_.norms.attention_output, Project(layer, Projection::kO, attn, w.o, w.o_bias, options),
                w.attention_output_norm, w.attention_output_norm_bias, Norm);

  // MLP block. A norm after it (on its output, or post-LN on the residual sum) reads the down projection's
  // values, which a graph-only recomputation would otherwise skip.
  const bool normed_after = config_.norms.mlp_output || !NormsBeforeBranches();
  return Residual(w, x, h, attended, Norm, [&](const at::Tensor& m) {
    const at::Tensor y = Mlp(layer, m, options, normed_after ? LayerOutput::kValues : output);
    return MaybeNorm(config_.norms.mlp_output, y, w.mlp_output_norm, w.mlp_output_norm_bias, Norm);
  });
}

template <typename MlpFn>
at::Tensor LlamaModel::Residual(const LayerWeights& w, const at::Tensor& x, const at::Tensor& h,
                                const at::Tensor& attended, NormFn norm, MlpFn mlp) const {
  if (!NormsBeforeBranches()) {  // post-LN: x1 = n1(x + attn(x)), out = n2(x1 + mlp(x1))
    const at::Tensor x1 = MaybeNorm(true, x + attended, w.input_norm, w.input_norm_bias, norm);
    return MaybeNorm(true, x1 + mlp(x1), w.pre_mlp_norm, w.pre_mlp_norm_bias, norm);
  }
  const at::Tensor x1 = config_.parallel_residual ? x : x + attended;
  const at::Tensor m = config_.parallel_residual && !config_.norms.pre_mlp
                           ? h
                           : MaybeNorm(config_.norms.pre_mlp, x1, w.pre_mlp_norm, w.pre_mlp_norm_bias, norm);
  const at::Tensor out = mlp(m);
  return config_.parallel_residual ? x + attended + out : x1 + out;
}

at::Tensor LlamaModel::AttentionInput(const at::Tensor& x, const LayerWeights& w, NormFn norm) const {
  return MaybeNorm(config_.norms.pre_attention && NormsBeforeBranches(), x, w.input_norm, w.input_norm_bias, norm);
}

at::Tensor LlamaModel::MaybeNorm(bool on, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 NormFn norm) const {
  return on ? norm(config_.norm_kind, x, NormWeight(weight), bias, config_.rms_norm_eps) : x;
}

at::Tensor LlamaModel::QkHeads(const at::Tensor& projected, int64_t heads, const at::Tensor& norm,
                               NormFn norm_fn) const {
  std::vector<int64_t> shape(projected.sizes().begin(), projected.sizes().end() - 1);
  shape.push_back(heads);
  shape.push_back(config_.head_dim);
  switch (config_.qk_norm) {
    case QkNorm::kNone:
      break;
    case QkNorm::kPerProjection:
      return norm_fn(NormKind::kRms, projected, NormWeight(norm), at::Tensor(), config_.rms_norm_eps).view(shape);
    case QkNorm::kPerHead:
      return norm_fn(NormKind::kRms, projected.view(shape), NormWeight(norm), at::Tensor(), config_.rms_norm_eps);
  }
  return projected.view(shape);
}

at::Tensor LlamaModel::ProjectTangents(int64_t layer, Projection p, const at::Tensor& x, const at::Tensor& w,
                                       const at::Tensor& b, const ForwardOptions& options) const {
  at::Tensor y = FrozenLinear(x, w, at::Tensor(), -1, Stream());  // one multiply: primal and every tangent
  if (b.defined()) y.select(0, 0).add_(AsCompute(b));             // a constant: the tangents have no bias
  return options.adapter->ApplyTangents(layer, p, x, y);
}

at::Tensor LlamaModel::MlpTangents(int64_t layer, const at::Tensor& x, const ForwardOptions& options) const {
  const LayerWeights& w = weights_.layers[static_cast<size_t>(layer)];
  const int64_t slices = x.size(0), hidden = x.size(-1);
  const int64_t rows = x.numel() / (slices * hidden);
  const at::Tensor flat = x.reshape({slices, rows, hidden});  // (1+K, N, H)
  const int64_t chunk = options.mlp_chunk_tokens > 0 ? std::min(options.mlp_chunk_tokens, rows) : rows;
  at::Tensor out = chunk == rows ? at::Tensor() : at::empty_like(flat);
  for (int64_t start = 0; start < rows; start += chunk) {
    // The MLP acts on each token alone: a chunk of tokens with all its slices is a complete sub-problem.
    const at::Tensor in = chunk == rows ? flat : flat.narrow(1, start, std::min(chunk, rows - start));
    at::Tensor hidden;
    if (config_.gated_mlp) {
      const auto [gate, up] =
          ProjectGateUp(config_, w, [&](Projection p, const at::Tensor& weight, const at::Tensor& bias) {
            return ProjectTangents(layer, p, in, weight, bias, options);
          });
      hidden = GatedActivationTangents(gate, up, config_.mlp_activation);
    } else {
      hidden = ActivationTangents(ProjectTangents(layer, Projection::kUp, in, w.up, w.up_bias, options),
                                  config_.mlp_activation);
    }
    at::Tensor y = ProjectTangents(layer, Projection::kDown, hidden, w.down, w.down_bias, options);
    if (chunk == rows) return y.view(x.sizes());
    out.narrow(1, start, in.size(1)).copy_(y);
  }
  return out.view(x.sizes());
}

at::Tensor LlamaModel::DecoderLayerTangents(int64_t layer, const at::Tensor& x, const RopeTables& rope,
                                            const ForwardOptions& options) const {
  const LayerWeights& w = weights_.layers[static_cast<size_t>(layer)];
  const int64_t slices = x.size(0), b = x.size(1), t = x.size(2);
  const int64_t hq = config_.num_attention_heads, hkv = config_.num_key_value_heads, d = config_.head_dim;

  // Attention block. RoPE is linear: it rotates every slice alike.
  const at::Tensor h = AttentionInput(x, w, NormTangents);  // (1+K, B, T, H)
  const QkvOutputs qkv = ProjectQkv(config_, w, [&](Projection p, const at::Tensor& weight, const at::Tensor& bias) {
    return ProjectTangents(layer, p, h, weight, bias, options);
  });
  auto heads = [&](const at::Tensor& projected, int64_t n, const at::Tensor& norm) {
    return QkHeads(projected, n, norm, NormTangents).transpose(2, 3);
  };
  const at::Tensor q = Rotate(heads(qkv.q, hq, w.q_norm), rope);   // (1+K, B, Hq, T, D)
  const at::Tensor k = Rotate(heads(qkv.k, hkv, w.k_norm), rope);  // (1+K, B, Hkv, T, D)
  const at::Tensor v = qkv.v.view({slices, b, t, hkv, d}).transpose(2, 3);
  const at::Tensor attn = GroupedQueryAttentionTangents(q, k, v, config_.LayerWindow(layer), config_.attention_softcap,
                                                        config_.attention_scale)  // (1+K, B, Hq, T, D)
                              .transpose(2, 3)
                              .reshape({slices, b, t, hq * d});
  const at::Tensor attended =
      MaybeNorm(config_.norms.attention_output, ProjectTangents(layer, Projection::kO, attn, w.o, w.o_bias, options),
                w.attention_output_norm, w.attention_output_norm_bias, NormTangents);

  // MLP block.
  return Residual(w, x, h, attended, NormTangents, [&](const at::Tensor& m) {
    return MaybeNorm(config_.norms.mlp_output, MlpTangents(layer, m, options), w.mlp_output_norm,
                     w.mlp_output_norm_bias, NormTangents);
  });
}

std::vector<at::Tensor> LlamaModel::LayerTensors(int64_t layer, const ForwardOptions& options) const {
  const LayerWeights& w = weights_.layers[static_cast<size_t>(layer)];
  std::vector<at::Tensor> out;
  for (const at::Tensor* t : w.Slots()) {
    if (t->defined() && t->requires_grad()) out.push_back(*t);
  }
  if (options.adapter != nullptr) {
    for (at::Tensor& t : options.adapter->LayerTensors(layer)) out.push_back(std::move(t));
  }
  return out;
}

absl::StatusOr<at::Tensor> LlamaModel::Hidden(const at::Tensor& tokens, const ForwardOptions& options) const {
  SEEDLING_RETURN_IF_ERROR(ValidateTokens(tokens));
  SEEDLING_RETURN_IF_ERROR(ValidatePositions(tokens.size(1)));
  if (options.input_offset.defined() &&
      options.input_offset.sizes() != at::IntArrayRef({tokens.size(0), tokens.size(1), config_.hidden_size})) {
    return absl::InvalidArgumentError(StrCat("input offset has shape ", ShapeString(options.input_offset.sizes()),
                                             ", the embeddings [", tokens.size(0), ", ", tokens.size(1), ", ",
                                             config_.hidden_size, "]"));
  }
  return CatchTorch("forward", [&] {
    const BasePrefix& prefix = options.base_prefix;
    const bool from_prefix = prefix.layers > 0 && !options.input_offset.defined() &&
                             prefix.tokens.sizes() == tokens.sizes() && at::equal(prefix.tokens, tokens);
    at::Tensor x = from_prefix ? prefix.hidden : Embed(tokens, 0);  // (B, T, H)
    if (options.input_offset.defined()) x = x + options.input_offset.to(x.scalar_type());
    const LayerRopes ropes = MakeRopes(0, tokens.size(1), x.scalar_type());
    x = RunLayers(std::move(x), from_prefix ? prefix.layers : 0, config_.num_hidden_layers, ropes, options);
    return FinalNorm(x, Norm, options.forward_level);
  });
}

absl::StatusOr<BasePrefix> LlamaModel::BaseLayers(const at::Tensor& tokens, const ForwardOptions& options) const {
  SEEDLING_RETURN_IF_ERROR(ValidateTokens(tokens));
  SEEDLING_RETURN_IF_ERROR(ValidatePositions(tokens.size(1)));
  BasePrefix prefix;
  const int64_t first = FirstAdaptedLayer(options);
  if (first == 0 || options.adapter == nullptr || options.input_offset.defined()) return prefix;
  return CatchTorch("base layers", [&] {
    at::NoGradGuard no_grad;
    ForwardOptions base = options;
    base.adapter = nullptr;
    base.base_prefix = {};
    const at::Tensor embedded = Embed(tokens, 0);  // (B, T, H)
    const LayerRopes ropes = MakeRopes(0, tokens.size(1), embedded.scalar_type());
    prefix.layers = first;
    prefix.tokens = tokens;
    prefix.hidden = RunLayers(embedded, 0, first, ropes, base);
    return prefix;
  });
}

at::Tensor LlamaModel::RunLayers(at::Tensor x, int64_t from, int64_t to, const LayerRopes& ropes,
                                 const ForwardOptions& options) const {
  const bool recompute = options.recompute && at::GradMode::is_enabled();
  const int64_t layers = config_.num_hidden_layers;
  const int64_t recomputed = layers - std::clamp<int64_t>(options.stored_layers, 0, layers);
  for (int64_t l = from; l < to; ++l) {
    const RopeTables& rope = ropes.For(config_, l);
    if (recompute && l < recomputed) {
      // Backward re-runs the layer for its graph only: the MLP's down projection, whose product only
      // feeds the layer's output, is not multiplied again.
      x = Checkpoint([this, l, rope, options](const at::Tensor& in) { return DecoderLayer(l, in, rope, options); }, x,
                     LayerTensors(l, options),
                     [this, l, rope, options](const at::Tensor& in) {
                       return DecoderLayerImpl(l, in, rope, options, nullptr, 0, LayerOutput::kGraphOnly);
                     });
    } else {
      x = DecoderLayer(l, x, rope, options);
    }
  }
  return x;
}

int64_t LlamaModel::FirstAdaptedLayer(const ForwardOptions& options) const {
  if (options.adapter == nullptr) return 0;
  int64_t l = 0;
  while (l < config_.num_hidden_layers && !options.adapter->AdaptsLayer(l)) ++l;
  return l;
}

absl::StatusOr<at::Tensor> LlamaModel::GroupHidden(const at::Tensor& tokens, int64_t groups,
                                                   const ForwardOptions& options) const {
  if (FirstAdaptedLayer(options) == 0 || groups < 2 || options.input_offset.defined()) return Hidden(tokens, options);
  SEEDLING_RETURN_IF_ERROR(ValidateTokens(tokens));
  const int64_t b = tokens.size(0) / groups;
  const at::Tensor one = tokens.narrow(0, 0, b);
  if (!tokens.reshape({groups, b, tokens.size(1)}).eq(one).all().item<bool>()) return Hidden(tokens, options);
  // Below the adapter every group computes the same values: run them once, on one group.
  SEEDLING_ASSIGN_OR_RETURN(const BasePrefix prefix, BaseLayers(one, options));
  ForwardOptions shared = options;
  shared.base_prefix = {prefix.layers, tokens, prefix.hidden.repeat({groups, 1, 1})};
  return Hidden(tokens, shared);
}

at::Tensor LlamaModel::LmHead(const at::Tensor& hidden) const {
  const at::Tensor logits = FrozenLinear(hidden, weights_.lm_head, weights_.lm_head_bias, -1, Stream());
  const double cap = config_.final_logit_softcap;
  return cap > 0 ? SoftCap(logits, cap).value : logits;
}

absl::StatusOr<at::Tensor> LlamaModel::Logits(const at::Tensor& tokens, const ForwardOptions& options) const {
  SEEDLING_ASSIGN_OR_RETURN(at::Tensor hidden, Hidden(tokens, options));
  return CatchTorch("lm head", [&] { return LmHead(hidden); });
}

absl::Status LlamaModel::ValidateLabels(const at::Tensor& tokens, const at::Tensor& labels) const {
  if (!labels.defined() || labels.sizes() != tokens.sizes() || labels.scalar_type() != at::kLong) {
    return absl::InvalidArgumentError(StrCat("labels must be int64 with the tokens' shape ",
                                             ShapeString(tokens.sizes()), ", got ",
                                             labels.defined() ? ShapeString(labels.sizes()) : "undefined"));
  }
  const at::Tensor bad = labels.ne(kIgnoreIndex).logical_and(labels.lt(0).logical_or(labels.ge(config_.vocab_size)));
  if (bad.any().item<bool>()) {
    return absl::InvalidArgumentError(StrCat("labels must be -100 or in [0, ", config_.vocab_size, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<LlamaModel::LossJvp> LlamaModel::LossDirectionalDerivative(const at::Tensor& tokens,
                                                                          const at::Tensor& labels,
                                                                          const ForwardOptions& options,
                                                                          uint64_t level) const {
  SEEDLING_RETURN_IF_ERROR(ValidateLabels(tokens, labels));
  ForwardOptions dual_options = options;
  dual_options.forward_level = static_cast<int64_t>(level);
  SEEDLING_ASSIGN_OR_RETURN(at::Tensor hidden, Hidden(tokens, dual_options));
  return CatchTorch("loss derivative", [&] {
    LossJvp out;
    if (tokens.size(1) < 2) return out;
    auto [primal, tangent] = at::_unpack_dual(hidden, static_cast<int64_t>(level));
    const at::Tensor hs = PredictingRows(primal);  // (N, H)
    const at::Tensor dhs = tangent.defined() ? PredictingRows(tangent) : at::zeros_like(hs);
    const at::Tensor targets = NextTokenTargets(labels);  // (N)
    auto [loss, derivative] = ChunkedCrossEntropyJvp(hs, dhs, Head(), targets, options.ce_chunk_tokens);
    out.tokens = ScoredTokens(targets);
    const double denom = static_cast<double>(std::max<int64_t>(out.tokens, 1));
    out.loss = loss.item<double>() / denom;
    out.derivative = derivative.item<double>() / denom;
    return out;
  });
}

absl::StatusOr<LlamaModel::LossJvps> LlamaModel::LossTangents(const at::Tensor& tokens, const at::Tensor& labels,
                                                              const ForwardOptions& options) const {
  SEEDLING_RETURN_IF_ERROR(ValidateTokens(tokens));
  SEEDLING_RETURN_IF_ERROR(ValidatePositions(tokens.size(1)));
  SEEDLING_RETURN_IF_ERROR(ValidateLabels(tokens, labels));
  if (options.adapter == nullptr || options.adapter->TangentCount() < 1) {
    return absl::InvalidArgumentError("loss tangents need an adapter with at least one tangent direction");
  }
  // The embedding is frozen: the tangents start at zero and grow from the adapter's first projection, so
  // the layers below the lowest adapted one run on the primal alone.
  SEEDLING_ASSIGN_OR_RETURN(const BasePrefix prefix, BaseLayers(tokens, options));
  return CatchTorch("loss tangents", [&] {
    at::NoGradGuard no_grad;
    const int64_t directions = options.adapter->TangentCount();
    const int64_t b = tokens.size(0), t = tokens.size(1), h = config_.hidden_size;
    const at::Tensor primal = prefix.layers > 0 ? prefix.hidden : Embed(tokens, 0);  // (B, T, H)
    const LayerRopes ropes = MakeRopes(0, t, primal.scalar_type());
    at::Tensor x = at::zeros({1 + directions, b, t, h}, primal.options());
    x.select(0, 0).copy_(primal);
    for (int64_t l = prefix.layers; l < config_.num_hidden_layers; ++l) {
      x = DecoderLayerTangents(l, x, ropes.For(config_, l), options);
    }
    x = FinalNorm(x, NormTangents);
    LossJvps out;
    out.derivatives.assign(static_cast<size_t>(directions), 0.0);
    if (t < 2) return out;
    // One LM-head pass gives the loss and its gradient w.r.t. the hidden states; each direction's
    // derivative is that gradient dotted with the direction's hidden-state tangent.
    const at::Tensor hidden = PredictingRows(x);  // (1+K, N, H)
    const at::Tensor targets = NextTokenTargets(labels);
    auto [loss, grad] = ChunkedCrossEntropyWithGrad(hidden.select(0, 0), Head(), targets, options.ce_chunk_tokens);
    const at::Tensor dots = (hidden.narrow(0, 1, directions) * grad).sum({1, 2}).to(at::kDouble);  // (K)
    out.tokens = ScoredTokens(targets);
    const double denom = static_cast<double>(std::max<int64_t>(out.tokens, 1));
    out.loss = loss.item<double>() / denom;
    for (int64_t i = 0; i < directions; ++i) out.derivatives[static_cast<size_t>(i)] = dots[i].item<double>() / denom;
    return out;
  });
}

absl::StatusOr<LossOutput> LlamaModel::Loss(const at::Tensor& tokens, const at::Tensor& labels,
                                            const ForwardOptions& options) const {
  SEEDLING_RETURN_IF_ERROR(ValidateLabels(tokens, labels));
  SEEDLING_ASSIGN_OR_RETURN(at::Tensor hidden, Hidden(tokens, options));
  return CatchTorch("loss", [&] {
    LossOutput out;
    if (tokens.size(1) < 2) {
      out.sum = (hidden.sum() * 0.0);  // nothing to predict; keeps the graph connected
      return out;
    }
    const at::Tensor targets = NextTokenTargets(labels);  // (N)
    out.sum = ChunkedCrossEntropy(PredictingRows(hidden), Head(), targets, options.ce_chunk_tokens);
    out.tokens = ScoredTokens(targets);
    return out;
  });
}

absl::StatusOr<std::vector<LossOutput>> LlamaModel::GroupLosses(const at::Tensor& tokens, const at::Tensor& labels,
                                                                int64_t groups, const ForwardOptions& options) const {
  SEEDLING_RETURN_IF_ERROR(ValidateLabels(tokens, labels));
  if (groups < 1 || tokens.size(0) % groups != 0) {
    return absl::InvalidArgumentError(
        StrCat("a batch of ", tokens.size(0), " sequences is not ", groups, " equal groups"));
  }
  at::NoGradGuard no_grad;
  SEEDLING_ASSIGN_OR_RETURN(at::Tensor hidden, GroupHidden(tokens, groups, options));
  return CatchTorch("group losses", [&] {
    const int64_t b = tokens.size(0) / groups;
    std::vector<LossOutput> out(static_cast<size_t>(groups));
    for (int64_t g = 0; g < groups; ++g) {
      LossOutput& o = out[static_cast<size_t>(g)];
      if (tokens.size(1) < 2) {
        o.sum = at::zeros({}, hidden.options());
        continue;
      }
      const at::Tensor targets = NextTokenTargets(labels.narrow(0, g * b, b));
      o.sum = ChunkedCrossEntropy(PredictingRows(hidden.narrow(0, g * b, b)), Head(), targets, options.ce_chunk_tokens);
      o.tokens = ScoredTokens(targets);
    }
    return out;
  });
}

absl::StatusOr<at::Tensor> LlamaModel::ForwardCached(const at::Tensor& tokens, KvCache& cache, bool last_only,
                                                     const ForwardOptions& options) const {
  SEEDLING_RETURN_IF_ERROR(ValidateTokens(tokens));
  if (tokens.size(0) != cache.batch_) {
    return absl::InvalidArgumentError(StrCat("tokens have batch ", tokens.size(0), ", the cache ", cache.batch_));
  }
  if (static_cast<int64_t>(cache.k_.size()) != config_.num_hidden_layers) {
    return absl::InvalidArgumentError("the KV cache was made for a different model");
  }
  const int64_t t = tokens.size(1), start = cache.length_;
  if (start + t > cache.max_length_) {
    return absl::OutOfRangeError(
        StrCat("KV cache holds ", cache.max_length_, " positions; ", start, " used, ", t, " more requested"));
  }
  SEEDLING_RETURN_IF_ERROR(ValidatePositions(start + t));
  return CatchTorch("cached forward", [&] {
    at::NoGradGuard no_grad;
    at::Tensor x = Embed(tokens, start);  // (B, t, H)
    const LayerRopes ropes = MakeRopes(start, t, x.scalar_type());
    for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
      x = DecoderLayerImpl(l, x, ropes.For(config_, l), options, &cache, start);
    }
    cache.length_ = start + t;
    x = FinalNorm(x, Norm);
    if (last_only) x = x.narrow(1, t - 1, 1);
    return LmHead(x);
  });
}

}  // namespace seedling::model
