#include "lora/adapter.h"

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <span>

#include "base/check.h"
#include "base/file.h"
#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/safetensors.h"
#include "model/torch_status.h"

namespace seedling::lora {
namespace {

using model::ModelConfig;
using model::Projection;

std::string PeftName(const ModelConfig& model, int64_t layer, Projection p, bool is_a) {
  return StrCat("base_model.model.", model::LayerPrefix(model, layer), model::ProjectionPath(model, p),
                is_a ? ".lora_A.weight" : ".lora_B.weight");
}

std::string BiasName(const ModelConfig& model, int64_t layer, Projection p) {
  return StrCat("base_model.model.", model::LayerPrefix(model, layer), model::ProjectionPath(model, p), ".bias");
}

// The shape a view has in adapter_model.safetensors: a bias is 1-D, as the projection's own bias.
std::vector<int64_t> FileShape(const LoraView& v) {
  return v.is_bias ? std::vector<int64_t>{v.cols} : std::vector<int64_t>{v.rows, v.cols};
}

// The weight and bias members of projection `p` in a layer's weights.
struct ProjectionSlots {
  at::Tensor model::LayerWeights::*weight;
  at::Tensor model::LayerWeights::*bias;
};
ProjectionSlots SlotsOf(Projection p) {
  using LW = model::LayerWeights;
  switch (p) {
    case Projection::kQ:
      return {&LW::q, &LW::q_bias};
    case Projection::kK:
      return {&LW::k, &LW::k_bias};
    case Projection::kV:
      return {&LW::v, &LW::v_bias};
    case Projection::kO:
      return {&LW::o, &LW::o_bias};
    case Projection::kGate:
      return {&LW::gate, &LW::gate_bias};
    case Projection::kUp:
      return {&LW::up, &LW::up_bias};
    case Projection::kDown:
      return {&LW::down, &LW::down_bias};
    case Projection::kQkv:
      return {&LW::qkv, &LW::qkv_bias};
    case Projection::kGateUp:
      return {&LW::gate_up, &LW::gate_up_bias};
  }
  return {&LW::q, &LW::q_bias};
}

at::Tensor& BaseWeight(model::ModelWeights& w, int64_t layer, Projection p) {
  return w.layers[static_cast<size_t>(layer)].*SlotsOf(p).weight;
}

at::Tensor& BaseBias(model::ModelWeights& w, int64_t layer, Projection p) {
  return w.layers[static_cast<size_t>(layer)].*SlotsOf(p).bias;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// scale · (x Aᵀ) Bᵀ, whose backward recomputes the rank-sized h = x Aᵀ instead of keeping it (MeSP,
// "Memory-efficient Structured Backpropagation"): it keeps only x, A and B, which live anyway.
struct LoraDeltaFunction : public torch::autograd::Function<LoraDeltaFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                            double scale) {
    ctx->save_for_backward({x, a, b});
    ctx->saved_data["scale"] = scale;
    return at::linear(at::linear(x, a), b) * scale;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& a = saved[1];                                                                         // (r, in)
    const at::Tensor& b = saved[2];                                                                         // (out, r)
    const at::Tensor x = saved[0].reshape({-1, a.size(1)});                                                 // (N, in)
    const at::Tensor g = (grad_outputs[0] * ctx->saved_data["scale"].toDouble()).reshape({-1, b.size(0)});  // (N, out)
    const at::Tensor h = at::mm(x, a.t());  // (N, r), recomputed
    const at::Tensor dh = at::mm(g, b);     // (N, r)
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) dx = at::mm(dh, a).view(saved[0].sizes());
    return {dx, ctx->needs_input_grad(1) ? at::mm(dh.t(), x) : at::Tensor(),
            ctx->needs_input_grad(2) ? at::mm(g.t(), h) : at::Tensor(), at::Tensor()};
  }
};

// The adapter's contribution; through the recomputing function when reverse-mode autograd records it
// (forward-mode duals and no-grad probes take the plain expression).
at::Tensor LoraDelta(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, double scale) {
  if (at::GradMode::is_enabled() && (x.requires_grad() || a.requires_grad() || b.requires_grad())) {
    return LoraDeltaFunction::apply(x, a, b, scale);
  }
  return at::linear(at::linear(x, a), b) * scale;
}

}  // namespace

LoraAdapter::LoraAdapter(ModelConfig model, LoraConfig config) : model_(std::move(model)), config_(std::move(config)) {}

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoraAdapter::Create(const ModelConfig& model,
                                                                 const LoraConfig& requested) {
  LoraConfig config = requested;
  config.targets = TargetsFor(model, requested.targets);
  SEEDLING_RETURN_IF_ERROR(config.Validate(model));
  std::unique_ptr<LoraAdapter> a(new LoraAdapter(model, config));
  std::vector<int64_t> layers = config.layers;
  if (layers.empty()) {
    for (int64_t l = 0; l < model.num_hidden_layers; ++l) layers.push_back(l);
  }
  std::sort(layers.begin(), layers.end());
  layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
  a->index_.assign(static_cast<size_t>(model.num_hidden_layers * model::kNumProjections), -1);
  int64_t offset = 0;
  for (int64_t l : layers) {
    for (Projection p : model::kAllProjections) {
      if (std::find(config.targets.begin(), config.targets.end(), p) == config.targets.end()) continue;
      const auto [in, out] = model::FeaturesOf(model, p);
      a->index_[static_cast<size_t>(l * model::kNumProjections + static_cast<int>(p))] =
          static_cast<int32_t>(a->views_.size());
      if (config.kind == AdapterKind::kBias) {
        a->views_.push_back({BiasName(model, l, p), l, p, false, 1, out, offset, true});
        offset += out;
        continue;
      }
      a->views_.push_back({PeftName(model, l, p, true), l, p, true, config.rank, in, offset});
      offset += config.rank * in;
      a->views_.push_back({PeftName(model, l, p, false), l, p, false, out, config.rank, offset});
      offset += out * config.rank;
    }
  }
  return model::CatchTorch("creating the adapter", [&]() -> absl::StatusOr<std::unique_ptr<LoraAdapter>> {
    a->flat_ = at::zeros({offset}, at::kFloat);
    // PEFT's default init: A ~ Kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0.
    float* data = a->flat_.data_ptr<float>();
    for (const LoraView& v : a->views_) {
      if (!v.is_a) continue;
      std::span<float> span(data + v.offset, static_cast<size_t>(v.numel()));
      FillUniform({config.init_seed, rng_stream::kInit}, static_cast<uint64_t>(v.offset), span);
      const float bound = 1.0f / std::sqrt(static_cast<float>(v.cols));
      for (float& x : span) x = (2.0f * x - 1.0f) * bound;
    }
    return std::move(a);
  });
}

at::Tensor LoraAdapter::Matrix(const LoraView& view) const {
  if (!leaves_.empty() && !override_.defined()) {
    // std::less orders any two pointers (the built-in < is unspecified across arrays): `view` may be a copy.
    const std::less<const LoraView*> before;
    if (!before(&view, views_.data()) && before(&view, views_.data() + views_.size())) {
      return leaves_[static_cast<size_t>(&view - views_.data())];
    }
  }
  const at::Tensor& src = override_.defined() ? override_ : flat_;
  return src.narrow(0, view.offset, view.numel()).view({view.rows, view.cols});
}

void LoraAdapter::BeginGradients() {
  SEEDLING_CHECK(!flat_.requires_grad(), "BeginGradients with a flat buffer that requires grad");
  leaves_.clear();
  leaves_.reserve(views_.size());
  for (const LoraView& v : views_) {
    leaves_.push_back(flat_.narrow(0, v.offset, v.numel()).view({v.rows, v.cols}).detach().requires_grad_(true));
  }
}

at::Tensor LoraAdapter::TakeGradients() {
  at::Tensor grad = at::zeros_like(flat_);
  for (size_t i = 0; i < leaves_.size() && i < views_.size(); ++i) {
    const at::Tensor& g = leaves_[i].grad();
    if (g.defined()) grad.narrow(0, views_[i].offset, views_[i].numel()).copy_(g.reshape({-1}));
  }
  leaves_.clear();
  return grad;
}

const LoraView* LoraAdapter::Find(int64_t layer, Projection p, bool is_a) const {
  if (layer < 0 || layer >= model_.num_hidden_layers) return nullptr;
  const int32_t i = index_[static_cast<size_t>(layer * model::kNumProjections + static_cast<int>(p))];
  if (i < 0) return nullptr;
  return &views_[static_cast<size_t>(is_a ? i : i + 1)];
}

at::Tensor LoraAdapter::Dropout(int64_t layer, Projection p, const at::Tensor& x, at::IntArrayRef mask_shape) const {
  if (!training_ || config_.dropout <= 0) return x;
  // Counter-based mask: (seed, step, layer, projection) -> the same mask when recomputed in backward.
  at::Tensor u = at::empty(mask_shape, at::kFloat);
  const uint64_t offset = ((step_ * static_cast<uint64_t>(model_.num_hidden_layers) + static_cast<uint64_t>(layer)) *
                               model::kNumProjections +
                           static_cast<uint64_t>(p))
                          << 32;
  FillUniform({dropout_seed_, rng_stream::kDropout}, offset,
              std::span<float>(u.data_ptr<float>(), static_cast<size_t>(u.numel())));
  const double keep = 1.0 - config_.dropout;
  return x * (u.ge(config_.dropout).to(at::kFloat) * (1.0 / keep));
}

at::Tensor LoraAdapter::Apply(int64_t layer, Projection p, const at::Tensor& x, const at::Tensor& base_out) const {
  if (slice_mode_ == SliceMode::kPerturbations) return ApplyPerturbed(layer, p, x, base_out);
  const LoraView* va = Find(layer, p, true);
  if (va == nullptr) return base_out;
  if (va->is_bias) return ApplyBias(*va, base_out);
  const LoraView* vb = va + 1;
  const at::Tensor input = Dropout(layer, p, x, x.sizes());
  const at::Tensor a = Matrix(*va);  // (r, in)
  const at::Tensor b = Matrix(*vb);  // (out, r)
  return base_out + LoraDelta(input, a, b, config_.scale());
}

void LoraAdapter::SetTangentSeeds(std::vector<uint64_t> seeds) {
  slice_mode_ = seeds.empty() ? SliceMode::kNone : SliceMode::kTangents;
  slice_seeds_ = std::move(seeds);
  slice_scales_.clear();
  slices_ = LayerSlices{};
}

void LoraAdapter::SetPerturbations(std::vector<uint64_t> seeds, std::vector<float> scales) {
  SEEDLING_CHECK(seeds.size() == scales.size());
  slice_mode_ = seeds.empty() ? SliceMode::kNone : SliceMode::kPerturbations;
  slice_seeds_ = std::move(seeds);
  slice_scales_ = std::move(scales);
  slices_ = LayerSlices{};
}

const LoraAdapter::LayerSlices& LoraAdapter::SlicesOf(int64_t layer) const {
  if (slices_.layer == layer) return slices_;
  // The layer's views are consecutive in the flat buffer (layers ascending, then projections).
  int64_t begin = -1, end = -1;
  for (Projection p : model::kAllProjections) {
    const LoraView* va = Find(layer, p, true);
    if (va == nullptr) continue;
    const LoraView* last = va + (ViewsPerProjection() - 1);
    if (begin < 0) begin = va->offset;
    end = last->offset + last->numel();
  }
  SEEDLING_CHECK(begin >= 0);
  const int64_t n = static_cast<int64_t>(slice_seeds_.size()), span = end - begin;
  slices_.layer = layer;
  slices_.offset = begin;
  slices_.values = at::empty({n, span}, at::kFloat);
  const at::Tensor theta = (override_.defined() ? override_ : flat_).narrow(0, begin, span);
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor row = slices_.values.select(0, i);
    FillNormal({slice_seeds_[static_cast<size_t>(i)], rng_stream::kPerturbation}, static_cast<uint64_t>(begin),
               std::span<float>(row.data_ptr<float>(), static_cast<size_t>(span)));
    // θ + float(scale · z), as AddNormal computes it in place.
    if (slice_mode_ == SliceMode::kPerturbations) row.mul_(slice_scales_[static_cast<size_t>(i)]).add_(theta);
  }
  return slices_;
}

at::Tensor LoraAdapter::SliceMatrices(const LayerSlices& slices, const LoraView& view, at::ScalarType dtype) const {
  const int64_t n = slices.values.size(0);
  return slices.values.narrow(1, view.offset - slices.offset, view.numel()).view({n, view.rows, view.cols}).to(dtype);
}

at::Tensor LoraAdapter::ApplyPerturbed(int64_t layer, Projection p, const at::Tensor& x,
                                       const at::Tensor& base_out) const {
  const LoraView* va = Find(layer, p, true);
  if (va == nullptr) return base_out;
  if (va->is_bias) return ApplyBiasPerturbed(layer, *va, base_out);
  const int64_t n = PerturbationCount(), in = va->cols;
  SEEDLING_CHECK(x.size(0) % n == 0);
  const LayerSlices& slices = SlicesOf(layer);
  const at::Tensor a = SliceMatrices(slices, *va, x.scalar_type());                  // (n, r, in)
  const at::Tensor b = SliceMatrices(slices, *(va + 1), x.scalar_type());            // (n, out, r)
  const at::Tensor input = Dropout(layer, p, x, x.sizes()).reshape({n, -1, in});     // (n, rows, in)
  at::Tensor delta = at::bmm(at::bmm(input, a.transpose(1, 2)), b.transpose(1, 2));  // (n, rows, out)
  return base_out + delta.mul_(config_.scale()).view(base_out.sizes());
}

at::Tensor LoraAdapter::ApplyTangents(int64_t layer, Projection p, const at::Tensor& x,
                                      const at::Tensor& base_out) const {
  const LoraView* va = Find(layer, p, true);
  if (va == nullptr) return base_out;
  if (va->is_bias) return ApplyBiasTangents(layer, *va, base_out);
  const LoraView* vb = va + 1;
  const int64_t k = TangentCount();
  SEEDLING_CHECK(x.size(0) == 1 + k && base_out.size(0) == 1 + k);
  const LayerSlices& t = SlicesOf(layer);
  auto direction = [&](const LoraView& v) { return SliceMatrices(t, v, x.scalar_type()); };  // (K, rows, cols)
  const at::Tensor input = Dropout(layer, p, x, x.select(0, 0).sizes());
  const at::Tensor a = Matrix(*va), b = Matrix(*vb);  // (r, in), (out, r)
  const double scale = config_.scale();
  // y = W x + s B A x, so with directions dA, dB: dy = W dx + s (B A dx + B dA x + dB A x).
  const int64_t in = a.size(1);
  const int64_t rows = input.numel() / ((1 + k) * in);
  at::Tensor mid = at::linear(input.reshape({1 + k, rows, in}), a);  // (1+K, N, r): A x and A dx
  const at::Tensor x0 = input.select(0, 0).reshape({rows, in});
  mid.narrow(0, 1, k).add_(at::matmul(x0, direction(*va).transpose(1, 2)));  // + dA x
  at::Tensor delta = at::linear(mid, b);  // (1+K, N, out): B A x, and B (A dx + dA x)
  delta.narrow(0, 1, k).add_(at::matmul(mid.select(0, 0), direction(*vb).transpose(1, 2)));  // + dB A x
  return base_out + delta.mul_(scale).view(base_out.sizes());
}

bool LoraAdapter::AdaptsLayer(int64_t layer) const {
  for (Projection p : model::kAllProjections) {
    if (Find(layer, p, true) != nullptr) return true;
  }
  return false;
}

std::vector<at::Tensor> LoraAdapter::LayerTensors(int64_t layer) const {
  if (!leaves_.empty() && !override_.defined()) {
    std::vector<at::Tensor> out;
    for (Projection p : model::kAllProjections) {
      const LoraView* va = Find(layer, p, true);
      if (va == nullptr) continue;
      for (int64_t i = 0; i < ViewsPerProjection(); ++i) out.push_back(Matrix(*(va + i)));
    }
    return out;
  }
  if (AdaptsLayer(layer)) return {override_.defined() ? override_ : flat_};
  return {};
}

at::Tensor LoraAdapter::ApplyBias(const LoraView& view, const at::Tensor& base_out) const {
  return base_out + Matrix(view).to(base_out.scalar_type());  // (1, out) broadcast over the rows
}

at::Tensor LoraAdapter::ApplyBiasPerturbed(int64_t layer, const LoraView& view, const at::Tensor& base_out) const {
  const int64_t n = PerturbationCount(), out = view.cols;
  SEEDLING_CHECK(base_out.size(0) % n == 0);
  const at::Tensor b = SliceMatrices(SlicesOf(layer), view, base_out.scalar_type());  // (n, 1, out)
  return (base_out.reshape({n, -1, out}) + b).view(base_out.sizes());
}

at::Tensor LoraAdapter::ApplyBiasTangents(int64_t layer, const LoraView& view, const at::Tensor& base_out) const {
  // y = W x + b, so dy = W dx + db: the primal slice gains b, tangent k gains its direction db_k.
  const int64_t k = TangentCount(), out = view.cols;
  SEEDLING_CHECK(base_out.size(0) == 1 + k);
  const at::Tensor directions = SliceMatrices(SlicesOf(layer), view, base_out.scalar_type());  // (K, 1, out)
  const at::Tensor b = at::cat({Matrix(view).to(base_out.scalar_type()).unsqueeze(0), directions});
  return (base_out.reshape({1 + k, -1, out}) + b).view(base_out.sizes());
}

absl::Status LoraAdapter::AddBiasDelta(model::ModelWeights& weights, double sign) const {
  for (const LoraView& v : views_) {
    const at::Tensor& bias = BaseBias(weights, v.layer, v.projection);
    if (!bias.defined() || bias.scalar_type() != at::kFloat) {
      return absl::FailedPreconditionError(
          StrCat("merging a BitFit adapter needs an fp32 bias to add to; layer ", v.layer, " ",
                 model::ProjectionName(v.projection), (bias.defined() ? " stores its bias as " : " has no bias"),
                 (bias.defined() ? std::string(c10::toString(bias.scalar_type())) : std::string()),
                 " (keep the adapter apart from the model)"));
    }
  }
  return model::CatchTorch("merging the adapter", [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    for (const LoraView& v : views_) {
      BaseBias(weights, v.layer, v.projection).add_(flat_.narrow(0, v.offset, v.numel()), sign);
    }
    return absl::OkStatus();
  });
}

absl::Status LoraAdapter::AddDelta(model::ModelWeights& weights, double sign) const {
  if (static_cast<int64_t>(weights.layers.size()) != model_.num_hidden_layers) {
    return absl::InvalidArgumentError("the weights belong to a different model than the adapter");
  }
  if (config_.kind == AdapterKind::kBias) return AddBiasDelta(weights, sign);
  for (size_t i = 0; i < views_.size(); i += 2) {
    const LoraView& va = views_[i];
    at::Tensor& w = BaseWeight(weights, va.layer, va.projection);
    if (w.scalar_type() != at::kFloat) {
      return absl::FailedPreconditionError(
          StrCat("merging needs fp32 weights; layer ", va.layer, " ", model::ProjectionName(va.projection),
                 " is stored as ", std::string(c10::toString(w.scalar_type())), " (load the model with fp32 weights)"));
    }
  }
  return model::CatchTorch("merging the adapter", [&]() -> absl::Status {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < views_.size(); i += 2) {
      const LoraView& va = views_[i];
      at::Tensor& w = BaseWeight(weights, va.layer, va.projection);
      // W (out, in) += sign * scale * B (out, r) @ A (r, in)
      w.add_(at::matmul(flat_.narrow(0, views_[i + 1].offset, views_[i + 1].numel())
                            .view({views_[i + 1].rows, views_[i + 1].cols}),
                        flat_.narrow(0, va.offset, va.numel()).view({va.rows, va.cols})),
             sign * config_.scale());
    }
    return absl::OkStatus();
  });
}

absl::Status LoraAdapter::Merge(model::ModelWeights& weights) const { return AddDelta(weights, 1.0); }
absl::Status LoraAdapter::Unmerge(model::ModelWeights& weights) const { return AddDelta(weights, -1.0); }

absl::Status SavePeft(const LoraAdapter& adapter, const std::string& dir, const std::string& base_model) {
  SEEDLING_RETURN_IF_ERROR(MakeDirs(dir));
  const at::Tensor flat = adapter.flat().detach().contiguous();
  const auto* bytes = static_cast<const uint8_t*>(flat.data_ptr());
  std::vector<model::TensorToWrite> tensors;
  for (const LoraView& v : adapter.views()) {
    tensors.push_back({v.name, model::DType::kF32, FileShape(v),
                       std::span<const uint8_t>(bytes + v.offset * 4, static_cast<size_t>(v.numel() * 4))});
  }
  SEEDLING_RETURN_IF_ERROR(
      model::WriteSafetensors(JoinPath(dir, "adapter_model.safetensors"), tensors, {{"format", "pt"}}));
  return WriteFileAtomic(JoinPath(dir, "adapter_config.json"),
                         PeftConfigJson(adapter.config(), adapter.model(), base_model));
}

namespace {

std::string Shape(int64_t r, int64_t c) { return StrCat("[", r, ", ", c, "]"); }

}  // namespace

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoadPeft(const std::string& dir, const ModelConfig& model) {
  const std::string config_path = JoinPath(dir, "adapter_config.json");
  SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(config_path));
  auto config = ParsePeftConfig(text, model);
  if (!config.ok()) return Annotate(config.status(), config_path);
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<LoraAdapter> adapter, LoraAdapter::Create(model, *config));

  const std::string weights_path = JoinPath(dir, "adapter_model.safetensors");
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<model::SafetensorsFile> file, model::SafetensorsFile::Open(weights_path));
  // PEFT drops the adapter name when saving; accept files that kept it (".lora_A.default.weight").
  std::map<std::string, const model::TensorView*> by_name;
  for (const auto& [name, view] : file->tensors()) {
    std::string key = name;
    if (const size_t pos = key.find(".default.weight"); pos != std::string::npos) key.replace(pos, 15, ".weight");
    by_name[key] = &view;
  }
  std::set<std::string> used;
  absl::Status st = model::CatchTorch("loading the adapter", [&]() -> absl::Status {
    for (const LoraView& v : adapter->views()) {
      auto it = by_name.find(v.name);
      if (it == by_name.end()) {
        return absl::NotFoundError(StrCat(weights_path, ": tensor '", v.name, "' is missing"));
      }
      const model::TensorView& tv = *it->second;
      if (tv.shape != FileShape(v)) {
        std::string shape = "[";
        for (size_t i = 0; i < tv.shape.size(); ++i) shape += StrCat(i ? ", " : "", tv.shape[i]);
        shape += "]";
        return absl::InvalidArgumentError(
            StrCat(weights_path, ": tensor '", v.name, "' has shape ", shape, ", expected ",
                   v.is_bias ? StrCat("[", v.cols, "]")
                             : StrCat(Shape(v.rows, v.cols), " (rank ", adapter->config().rank, ")")));
      }
      at::ScalarType type;
      switch (tv.dtype) {
        case model::DType::kF32:
          type = at::kFloat;
          break;
        case model::DType::kF16:
          type = at::kHalf;
          break;
        case model::DType::kBF16:
          type = at::kBFloat16;
          break;
        default:
          return absl::InvalidArgumentError(StrCat(weights_path, ": tensor '", v.name, "' has dtype ",
                                                   model::DTypeName(tv.dtype), "; expected F32, F16 or BF16"));
      }
      at::Tensor src = at::empty({v.rows, v.cols}, at::TensorOptions().dtype(type));
      std::memcpy(src.data_ptr(), tv.data, tv.nbytes);
      adapter->flat().narrow(0, v.offset, v.numel()).copy_(src.reshape({-1}));
      used.insert(it->first);
    }
    return absl::OkStatus();
  });
  SEEDLING_RETURN_IF_ERROR(st);
  for (const auto& [name, view] : by_name) {
    if (!used.count(name)) {
      return absl::InvalidArgumentError(
          StrCat(weights_path, ": tensor '", name, "' does not belong to a LoRA adapter with this configuration"));
    }
  }
  return adapter;
}

}  // namespace seedling::lora
