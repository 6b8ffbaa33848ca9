#include "model/kernels.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <vector>

#include "base/check.h"
#include "model/frozen_linear.h"
#include "model/quant.h"

namespace seedling::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Token chunk of the cross-entropy: all rows unless asked otherwise. Memory is bounded by the vocabulary
// tiles, not by the chunk: a chunk holds (chunk × tile rows) logits at a time.
int64_t PickChunk(int64_t chunk_tokens, int64_t rows) {
  return chunk_tokens > 0 ? chunk_tokens : std::max<int64_t>(rows, 1);
}

// Rows [start, start + len) of the loss inputs; ignored targets are replaced by 0 (masked out by `valid`).
struct CeChunk {
  at::Tensor h;       // (c, H)
  at::Tensor valid;   // (c) bool
  at::Tensor safe_t;  // (c) int64
};

CeChunk SliceChunk(const at::Tensor& hidden, const at::Tensor& targets, int64_t start, int64_t len) {
  const at::Tensor t = targets.narrow(0, start, len);
  const at::Tensor valid = t.ne(kIgnoreIndex);
  return {hidden.narrow(0, start, len), valid, t.masked_fill(~valid, 0)};
}

// Which rows of a chunk have their target inside vocabulary tile [v0, v0 + n), and its column there.
struct TileTargets {
  at::Tensor column;   // (c, 1) int64, clamped into the tile
  at::Tensor present;  // (c) in the logits' dtype: 1 where the target is in the tile
};

TileTargets TargetsInTile(const CeChunk& c, int64_t v0, int64_t n, at::ScalarType dtype) {
  const at::Tensor in_tile = c.safe_t.ge(v0).logical_and(c.safe_t.lt(v0 + n));
  return {(c.safe_t - v0).clamp(0, n - 1).unsqueeze(1), in_tile.to(dtype)};
}

// Online log-sum-exp over vocabulary tiles (Milakov & Gimelshein 2018): per row the running max m, the
// sum of exp(z - m), and optionally the sum of exp(z - m) · dz for a tangent dz of the logits, and the sum
// of exp(z - m) · W_v over the vocabulary rows (for the gradient, as flash attention accumulates its output).
struct RowStats {
  at::Tensor max, sum, tangent_sum, target, target_tangent;  // (c) each
  at::Tensor weighted_rows;                                  // (c, H) when the gradient is accumulated, else undefined

  RowStats(int64_t c, const at::TensorOptions& options)
      : max(at::full({c}, -std::numeric_limits<double>::infinity(), options)),
        sum(at::zeros({c}, options)),
        tangent_sum(at::zeros({c}, options)),
        target(at::zeros({c}, options)),
        target_tangent(at::zeros({c}, options)) {}

  // z (c, n) logits of one tile, dz its tangent or undefined, tile (n, H) the LM-head rows behind z, slope
  // the soft-cap's dz/d(raw logits) (undefined without a cap), which weighs the rows of the gradient.
  void Add(const at::Tensor& z, const at::Tensor& dz, const TileTargets& t, const at::Tensor& tile,
           const at::Tensor& slope) {
    const at::Tensor new_max = at::maximum(max, std::get<0>(z.max(1)));
    const at::Tensor rescale = (max - new_max).exp_();
    const at::Tensor e = (z - new_max.unsqueeze(1)).exp_();  // (c, n)
    sum.mul_(rescale).add_(e.sum(1));
    if (weighted_rows.defined()) {
      weighted_rows.mul_(rescale.unsqueeze(1)).addmm_(slope.defined() ? e * slope : e, tile);
    }
    target.add_(z.gather(1, t.column).squeeze(1) * t.present);
    if (dz.defined()) {
      tangent_sum.mul_(rescale).add_((e * dz).sum(1));
      target_tangent.add_(dz.gather(1, t.column).squeeze(1) * t.present);
    }
    max = new_max;
  }
  at::Tensor LogSumExp() const { return max + sum.log(); }
};

// Forward of the loss sum (and, with a tangent, its directional derivative) over token chunks and
// vocabulary tiles. `lse_out`, when given, receives each row's log-sum-exp (N) for the backward.
// `grad_out`, when given, receives d loss / d hidden (N, H), computed in the same pass: with p = softmax(z),
// d/dh (lse(z) - z_t) = Σ_v p_v W_v - W_t, and Σ_v exp(z_v - m) W_v is accumulated tile by tile with the
// running max, so the gradient costs one more multiply per tile instead of recomputing the logits.
// A soft-capped head (LogitHead::softcap) scales the gradient's rows and the tangent by the cap's slope, the
// target row's by the slope at the target's logit. The bias shifts the logits, not their tangent.
std::pair<at::Tensor, at::Tensor> ChunkedCeForward(const at::Tensor& hidden, const at::Tensor& tangent,
                                                   const LogitHead& head, const at::Tensor& targets, int64_t chunk,
                                                   at::Tensor* lse_out, at::Tensor* grad_out = nullptr) {
  const at::Tensor& weight = head.weight;
  const double softcap = head.softcap;
  const at::Tensor bias = head.bias.defined() ? head.bias.to(hidden.scalar_type()) : at::Tensor();
  WeightTiles tiles(weight, 0, head.stream);
  const int64_t n_rows = hidden.size(0);
  at::Tensor loss = at::zeros({}, hidden.options());
  at::Tensor derivative = at::zeros({}, hidden.options());
  if (lse_out != nullptr) *lse_out = at::empty({n_rows}, hidden.options());
  if (grad_out != nullptr) *grad_out = at::empty_like(hidden);
  for (int64_t start = 0; start < n_rows; start += chunk) {
    const int64_t len = std::min(chunk, n_rows - start);
    const CeChunk c = SliceChunk(hidden, targets, start, len);
    // Primal and tangent rows share each tile's multiply.
    const at::Tensor rows = tangent.defined() ? at::cat({c.h, tangent.narrow(0, start, len)}, 0) : c.h;
    RowStats stats(len, hidden.options());
    if (grad_out != nullptr) stats.weighted_rows = at::zeros({len, hidden.size(1)}, hidden.options());
    for (int64_t v0 = 0; v0 < tiles.rows(); v0 += tiles.tile_rows()) {
      const int64_t n = std::min(tiles.tile_rows(), tiles.rows() - v0);
      const at::Tensor tile = tiles.Tile(v0, n);
      const at::Tensor z = at::mm(rows, tile.t());  // (c or 2c, n)
      at::Tensor logits = tangent.defined() ? z.narrow(0, 0, len) : z;
      if (bias.defined()) logits = logits + bias.narrow(0, v0, n);
      at::Tensor dz = tangent.defined() ? z.narrow(0, len, len) : at::Tensor();
      at::Tensor slope;
      if (softcap > 0) {
        SoftCapped capped = SoftCap(logits, softcap, dz.defined() || grad_out != nullptr);
        logits = std::move(capped.value);
        slope = std::move(capped.slope);
        if (dz.defined()) dz = dz * slope;
      }
      stats.Add(logits, dz, TargetsInTile(c, v0, n, z.scalar_type()), tile, slope);
    }
    const at::Tensor valid = c.valid.to(hidden.scalar_type());
    const at::Tensor lse = stats.LogSumExp();
    loss = loss + ((lse - stats.target) * valid).sum();
    if (grad_out != nullptr) {
      at::Tensor target_rows = FrozenEmbedding(weight, c.safe_t).to(hidden.scalar_type());  // (c, H)
      if (softcap > 0) target_rows.mul_((1 - (stats.target / softcap).square()).unsqueeze(1));
      grad_out->narrow(0, start, len)
          .copy_((stats.weighted_rows / stats.sum.unsqueeze(1) - target_rows) * valid.unsqueeze(1));
    }
    if (tangent.defined())
      derivative = derivative + ((stats.tangent_sum / stats.sum - stats.target_tangent) * valid).sum();
    if (lse_out != nullptr) lse_out->narrow(0, start, len).copy_(lse);
  }
  return {loss, derivative};
}

struct ChunkedCeFunction : public torch::autograd::Function<ChunkedCeFunction> {
  // `weight` and `bias` are head.weight and head.bias, passed apart so that autograd sees them (a bias-less head
  // passes an empty tensor: apply takes no undefined ones). The head's stream serves the forward pass only: a
  // head that requires grad (the only case whose backward reads the weight again) is dense and never streamed.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& bias, const LogitHead& head, const at::Tensor& targets, int64_t chunk) {
    if (!weight.requires_grad() && !bias.requires_grad()) {
      // The common case (a frozen LM head): the hidden states' gradient comes out of the forward pass, and
      // backward only scales it: two multiplies per tile in all instead of three.
      at::Tensor grad_hidden;
      at::Tensor loss = ChunkedCeForward(hidden, at::Tensor(), head, targets, chunk, nullptr, &grad_hidden).first;
      ctx->save_for_backward({grad_hidden});
      return loss;
    }
    at::Tensor lse;
    const LogitHead dense{weight, head.bias, head.softcap};
    at::Tensor loss = ChunkedCeForward(hidden, at::Tensor(), dense, targets, chunk, &lse).first;
    ctx->save_for_backward({hidden, weight, targets, lse, bias});
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["softcap"] = head.softcap;
    return loss;
  }

  // d loss / d logits = softmax(logits) - onehot(target), zero for ignored rows, times the soft-cap's slope;
  // each tile's logits are recomputed and turned into their gradient in place. The bias's gradient is its
  // column sums.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    if (saved.size() == 1) {
      return {saved[0] * grad_outputs[0], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const at::Tensor& hidden = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& targets = saved[2];
    const at::Tensor& lse = saved[3];
    const bool has_bias = saved[4].numel() > 0;
    const at::Tensor bias = has_bias ? saved[4].to(hidden.scalar_type()) : at::Tensor();
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const double softcap = ctx->saved_data["softcap"].toDouble();
    const at::Tensor g = grad_outputs[0];  // scalar
    const bool need_h = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    WeightTiles tiles(weight);
    at::Tensor grad_h = need_h ? at::zeros_like(hidden) : at::Tensor();
    at::Tensor grad_w = need_w ? at::zeros(LogicalShape(weight), hidden.options()) : at::Tensor();
    at::Tensor grad_b = need_b ? at::zeros({tiles.rows()}, hidden.options()) : at::Tensor();
    const int64_t n_rows = hidden.size(0);
    for (int64_t start = 0; start < n_rows; start += chunk) {
      const int64_t len = std::min(chunk, n_rows - start);
      const CeChunk c = SliceChunk(hidden, targets, start, len);
      const at::Tensor row_lse = lse.narrow(0, start, len).unsqueeze(1);                 // (c, 1)
      const at::Tensor row_scale = (c.valid.to(hidden.scalar_type()) * g).unsqueeze(1);  // (c, 1)
      for (int64_t v0 = 0; v0 < tiles.rows(); v0 += tiles.tile_rows()) {
        const int64_t n = std::min(tiles.tile_rows(), tiles.rows() - v0);
        const at::Tensor tile = tiles.Tile(v0, n);
        at::Tensor p = at::mm(c.h, tile.t());  // (c, n) logits
        if (has_bias) p.add_(bias.narrow(0, v0, n));
        at::Tensor slope;
        if (softcap > 0) {
          SoftCapped capped = SoftCap(p, softcap, /*with_slope=*/true);
          p = std::move(capped.value);
          slope = std::move(capped.slope);
        }
        p.sub_(row_lse).exp_();  // softmax, in place
        const TileTargets t = TargetsInTile(c, v0, n, p.scalar_type());
        p.scatter_add_(1, t.column, -t.present.unsqueeze(1));
        if (slope.defined()) p.mul_(slope);
        p.mul_(row_scale);
        if (need_h) grad_h.narrow(0, start, len).addmm_(p, tile);  // (c, H)
        if (need_w) grad_w.narrow(0, v0, n).addmm_(p.t(), c.h);    // (n, H)
        if (need_b) grad_b.narrow(0, v0, n).add_(p.sum(0));
      }
    }
    if (need_w && grad_w.scalar_type() != weight.scalar_type()) grad_w = grad_w.to(weight.scalar_type());
    if (need_b && grad_b.scalar_type() != saved[4].scalar_type()) grad_b = grad_b.to(saved[4].scalar_type());
    return {grad_h, grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Backward node of Checkpoint(): re-runs the layer with autograd on, then backpropagates through it.
class CheckpointNode : public torch::autograd::Node {
 public:
  CheckpointNode(LayerFn fn, at::Tensor input, std::vector<at::Tensor> params)
      : fn_(std::move(fn)), input_(std::move(input)), params_(std::move(params)) {}

  std::string name() const override { return "seedling::CheckpointNode"; }

  variable_list apply(variable_list&& grads) override {
    SEEDLING_CHECK(grads.size() == 1);
    const bool input_needs_grad = task_should_compute_output(0);
    at::Tensor x = input_.detach();
    if (input_needs_grad) x.requires_grad_(true);
    at::Tensor y;
    {
      at::AutoGradMode enable_grad(true);
      y = fn_(x);
    }
    // Collect the inputs of the recomputed graph whose gradients the outer graph wants.
    variable_list wrt;
    std::vector<size_t> slot;  // edge index of each entry of wrt
    if (input_needs_grad) {
      wrt.push_back(x);
      slot.push_back(0);
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      if (params_[i].requires_grad() && task_should_compute_output(i + 1)) {
        wrt.push_back(params_[i]);
        slot.push_back(i + 1);
      }
    }
    variable_list out(1 + params_.size());
    if (wrt.empty() || !y.requires_grad()) return out;
    variable_list g = torch::autograd::grad({y}, wrt, {grads[0]}, /*retain_graph=*/false,
                                            /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < wrt.size(); ++i) out[slot[i]] = g[i];
    return out;
  }

 private:
  void release_variables() override {
    input_.reset();
    params_.clear();
    fn_ = nullptr;
  }

  LayerFn fn_;  // the recomputation: builds the layer's graph (its output's value is not read)
  at::Tensor input_;
  std::vector<at::Tensor> params_;
};

}  // namespace

at::Tensor ChunkedCrossEntropy(const at::Tensor& hidden, const LogitHead& head, const at::Tensor& targets,
                               int64_t chunk_tokens) {
  SEEDLING_CHECK(hidden.dim() == 2 && targets.dim() == 1);
  SEEDLING_CHECK(hidden.size(0) == targets.size(0) && hidden.size(1) == LogicalShape(head.weight)[1]);
  const int64_t chunk = PickChunk(chunk_tokens, hidden.size(0));
  const bool trains_bias = head.bias.defined() && head.bias.requires_grad();
  const bool needs_autograd =
      at::GradMode::is_enabled() && (hidden.requires_grad() || head.weight.requires_grad() || trains_bias);
  if (needs_autograd) {
    const at::Tensor bias = head.bias.defined() ? head.bias : at::empty({0}, hidden.options());
    return ChunkedCeFunction::apply(hidden, head.weight, bias, head, targets, chunk);
  }
  return ChunkedCeForward(hidden, at::Tensor(), head, targets, chunk, nullptr).first;
}

std::pair<at::Tensor, at::Tensor> ChunkedCrossEntropyJvp(const at::Tensor& hidden, const at::Tensor& hidden_tangent,
                                                         const LogitHead& head, const at::Tensor& targets,
                                                         int64_t chunk_tokens) {
  SEEDLING_CHECK(hidden.sizes() == hidden_tangent.sizes() && hidden.dim() == 2 && targets.dim() == 1);
  at::NoGradGuard no_grad;
  return ChunkedCeForward(hidden, hidden_tangent, head, targets, PickChunk(chunk_tokens, hidden.size(0)), nullptr);
}

std::pair<at::Tensor, at::Tensor> ChunkedCrossEntropyWithGrad(const at::Tensor& hidden, const LogitHead& head,
                                                              const at::Tensor& targets, int64_t chunk_tokens) {
  SEEDLING_CHECK(hidden.dim() == 2 && targets.dim() == 1 && hidden.size(0) == targets.size(0));
  at::NoGradGuard no_grad;
  at::Tensor grad;
  at::Tensor loss =
      ChunkedCeForward(hidden, at::Tensor(), head, targets, PickChunk(chunk_tokens, hidden.size(0)), nullptr, &grad)
          .first;
  return {loss, grad};
}

at::Tensor Checkpoint(LayerFn fn, const at::Tensor& x, std::vector<at::Tensor> params, LayerFn recompute) {
  bool any_grad = x.requires_grad();
  for (const at::Tensor& p : params) any_grad = any_grad || p.requires_grad();
  if (!at::GradMode::is_enabled() || !any_grad) return fn(x);
  at::Tensor y;
  {
    at::NoGradGuard no_grad;
    y = fn(x);
  }
  torch::autograd::variable_list inputs;
  inputs.reserve(1 + params.size());
  inputs.push_back(x);
  for (const at::Tensor& p : params) inputs.push_back(p);
  if (!recompute) recompute = std::move(fn);
  auto node = std::shared_ptr<CheckpointNode>(new CheckpointNode(std::move(recompute), x.detach(), std::move(params)),
                                              torch::autograd::deleteNode);
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  torch::autograd::create_gradient_edge(y, node);
  return y;
}

namespace {

// LibTorch 1.13 has a single forward-AD level, 0: a dual tensor takes the plain expressions, whose
// operations LibTorch differentiates in forward mode itself.
bool IsDual(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

// True when reverse-mode autograd would record an operation on these inputs (and none is a dual).
bool RecordsBackward(std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  bool any = false;
  for (const at::Tensor& t : inputs) {
    if (IsDual(t)) return false;
    any = any || (t.defined() && t.requires_grad());
  }
  return any;
}

at::Tensor InverseRms(const at::Tensor& x, double eps) {
  return at::rsqrt(x.pow(2).mean({-1}, /*keepdim=*/true) + eps);
}

// RmsNorm under reverse-mode autograd, keeping x and the per-row 1/rms only (the plain expression also
// keeps x · 1/rms): with g = dy ⊙ w, dx = r (g − x r² mean(g ⊙ x)), dw = Σ_rows dy ⊙ x r.
struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    at::NoGradGuard no_grad;
    const at::Tensor inv_rms = InverseRms(x, eps);
    ctx->save_for_backward({x, weight, inv_rms});
    return x * inv_rms * weight;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &inv_rms = saved[2];
    const at::Tensor& dy = grad_outputs[0];
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor g = dy * weight;
      const at::Tensor coefficient = (g * x).mean({-1}, /*keepdim=*/true).mul_(inv_rms.pow(2));
      dx = g.sub_(x * coefficient).mul_(inv_rms);
    }
    if (ctx->needs_input_grad(1)) dw = (dy * x * inv_rms).reshape({-1, x.size(-1)}).sum(0);
    return {dx, dw, at::Tensor()};
  }
};

// silu(gate) · up under reverse-mode autograd, keeping gate and up (the plain expression also keeps
// silu(gate)): dgate = silu'(gate) (dy ⊙ up), dup = dy ⊙ silu(gate), silu recomputed.
struct SwiGluFunction : public torch::autograd::Function<SwiGluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    at::NoGradGuard no_grad;
    ctx->save_for_backward({gate, up});
    return at::silu(gate).mul_(up);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &gate = saved[0], &up = saved[1];
    const at::Tensor& dy = grad_outputs[0];
    return {ctx->needs_input_grad(0) ? at::silu_backward(dy * up, gate) : at::Tensor(),
            ctx->needs_input_grad(1) ? at::silu(gate).mul_(dy) : at::Tensor()};
  }
};

// GeGLU under reverse-mode autograd: keeps gate and up, recomputes GELU in backward.
struct GeGluFunction : public torch::autograd::Function<GeGluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    at::NoGradGuard no_grad;
    ctx->save_for_backward({gate, up});
    return at::gelu(gate, "tanh").mul_(up);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &gate = saved[0], &up = saved[1];
    const at::Tensor& dy = grad_outputs[0];
    return {ctx->needs_input_grad(0) ? at::gelu_backward(dy * up, gate, "tanh") : at::Tensor(),
            ctx->needs_input_grad(1) ? at::gelu(gate, "tanh").mul_(dy) : at::Tensor()};
  }
};

// RoPE's rotation by +θ (sign 1) or −θ (sign −1) in the "rotate half" layout, written into one output
// (no concatenation): out1 = x1 c − sign x2 s, out2 = x2 c + sign x1 s. No autograd.
at::Tensor Rotate(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s, double sign) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor o1 = out.narrow(-1, 0, half), o2 = out.narrow(-1, half, half);
  // Products rounded apart, then added, as the plain expression rounds them (a fused multiply-add would
  // round differently, and the stacked-tangent path must match forward-mode AD through the plain one).
  at::mul_out(o1, x1, c).sub_(x2 * s, sign);
  at::mul_out(o2, x2, c).add_(x1 * s, sign);
  return out;
}

// RoPE under reverse-mode autograd: the rotation is orthogonal, so backward rotates the gradient by −θ.
// Keeps only the cos and sin tables (no slices of x, no concatenation's pieces).
struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& c, const at::Tensor& s) {
    at::NoGradGuard no_grad;
    ctx->save_for_backward({c, s});
    return Rotate(x, c, s, 1.0);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    return {Rotate(grad_outputs[0], saved[0], saved[1], -1.0), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

SoftCapped SoftCap(const at::Tensor& z, double cap, bool with_slope) {
  const at::Tensor t = at::tanh(z / cap);
  return {t * cap, with_slope ? 1 - t * t : at::Tensor()};
}

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor w = AsCompute(weight);
  if (RecordsBackward({x, w})) return RmsNormFunction::apply(x, w, eps);
  return x * InverseRms(x, eps) * w;
}

at::Tensor LayerNorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  return at::layer_norm(x, {x.size(-1)}, AsCompute(weight), AsCompute(bias), eps);
}

at::Tensor Norm(NormKind kind, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  return kind == NormKind::kLayerNorm ? LayerNorm(x, weight, bias, eps) : RmsNorm(x, weight, eps);
}

at::Tensor Activation(const at::Tensor& x, MlpActivation activation) {
  switch (activation) {
    case MlpActivation::kSilu:
      return at::silu(x);
    case MlpActivation::kGeluTanh:
      return at::gelu(x, "tanh");
    case MlpActivation::kGelu:
      return at::gelu(x);
    case MlpActivation::kRelu:
      return at::relu(x);
  }
  return x;
}

at::Tensor SwiGlu(const at::Tensor& gate, const at::Tensor& up) {
  if (RecordsBackward({gate, up})) return SwiGluFunction::apply(gate, up);
  return at::silu(gate) * up;
}

at::Tensor GatedActivation(const at::Tensor& gate, const at::Tensor& up, MlpActivation activation) {
  if (activation == MlpActivation::kSilu) return SwiGlu(gate, up);
  if (activation != MlpActivation::kGeluTanh) return Activation(gate, activation) * up;
  if (RecordsBackward({gate, up})) return GeGluFunction::apply(gate, up);
  return at::gelu(gate, "tanh") * up;
}

at::Tensor RopeInverseFrequencies(const ModelConfig& c, bool long_context) {
  const std::vector<double> inv = RopeInverseFrequencyValues(c, long_context);
  return at::tensor(at::ArrayRef<double>(inv), at::kDouble);
}

RopeTables MakeRopeTables(const at::Tensor& inv_freq, int64_t start, int64_t length) {
  const at::Tensor pos = at::arange(start, start + length, at::kDouble);  // (T)
  const at::Tensor freqs = at::outer(pos, inv_freq);                      // (T, D/2)
  return {freqs.cos(), freqs.sin()};
}

at::Tensor ApplyRope(const at::Tensor& x, const RopeTables& rope) {
  const int64_t rotated = 2 * rope.cos.size(-1), d = x.size(-1);
  if (rotated < d) return at::cat({ApplyRope(x.narrow(-1, 0, rotated), rope), x.narrow(-1, rotated, d - rotated)}, -1);
  const at::Tensor c = rope.cos.to(x.scalar_type()), s = rope.sin.to(x.scalar_type());  // tables are fp64
  if (RecordsBackward({x})) return RopeFunction::apply(x, c, s);
  if (IsDual(x)) {  // forward-mode AD (reference mode): LibTorch differentiates the plain expression
    const int64_t half = x.size(-1) / 2;
    const at::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);  // (..., T, D/2)
    return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
  }
  return Rotate(x, c, s, 1.0);
}

namespace {

// The options every attention kernel takes from the layer: its sliding window, the scores' soft-cap and the
// queries' scale (0 = 1/√D).
struct AttentionShape {
  std::optional<int64_t> window;
  double softcap = 0;
  double scale = 0;
  double ScaleFor(int64_t head_dim) const { return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(head_dim)); }
};

// Softmax probabilities of causal grouped-query attention with the `groups` query heads of each KV head
// folded into rows: qg (B, Hkv, groups*T, D), already scaled (FoldQueries); k (B, Hkv, S, D). Returns
// (B, Hkv, groups*T, S). With a soft-cap and `slope`, *slope receives the cap's dS'/dS, shaped as the result.
at::Tensor AttentionProbs(const at::Tensor& qg, const at::Tensor& k, int64_t groups, int64_t q_start,
                          const AttentionShape& shape, at::Tensor* slope = nullptr) {
  const int64_t b = qg.size(0), hkv = qg.size(1), t = qg.size(2) / groups, s = k.size(2);
  at::Tensor scores = at::matmul(qg, k.transpose(-1, -2)).view({b, hkv, groups, t, s});  // (B,Hkv,G,T,S)
  if (shape.softcap > 0) {  // before the mask, so the slope stays finite where the mask puts -inf
    SoftCapped capped = SoftCap(scores, shape.softcap, slope != nullptr);
    scores = std::move(capped.value);
    if (slope != nullptr) *slope = capped.slope.view({b, hkv, groups * t, s});
  }
  // Only keys after the first query's position can be in the future of some query, so without a window
  // the mask covers the columns from there on; it is applied in place.
  const int64_t first = shape.window ? 0 : std::clamp<int64_t>(q_start + 1, 0, s);
  if (first < s) {
    const at::Tensor q_pos = at::arange(q_start, q_start + t, at::kLong).unsqueeze(1);  // (T, 1)
    const at::Tensor k_pos = at::arange(first, s, at::kLong).unsqueeze(0);              // (1, S - first)
    at::Tensor masked = k_pos.gt(q_pos);
    if (shape.window) masked = masked.logical_or(k_pos.le(q_pos - *shape.window));
    scores.narrow(-1, first, s - first).masked_fill_(masked, -std::numeric_limits<float>::infinity());
  }
  return at::softmax(scores, -1).view({b, hkv, groups * t, s});
}

// q (B, Hq, T, D) scaled by shape.ScaleFor(D) and folded to (B, Hkv, groups*T, D): query head h uses KV head
// h / groups (Hugging Face repeat_kv order), so the `groups` query heads of a KV head are consecutive rows.
at::Tensor FoldQueries(const at::Tensor& q, int64_t hkv, const AttentionShape& shape) {
  const int64_t b = q.size(0), hq = q.size(1), t = q.size(2), d = q.size(3);
  return (q * shape.ScaleFor(d)).reshape({b, hkv, (hq / hkv) * t, d});
}

// Queries per block of causal attention: a block attends only to the keys up to its last position, so of
// the (T × S) scores only the blocks on or left of the diagonal are computed (5/8 of them at T = S = 256).
constexpr int64_t kAttentionQueryBlock = 64;

// Query positions [start, start + length) and the keys [0, keys) they may see.
struct QueryBlock {
  int64_t start, length, keys;
};

std::vector<QueryBlock> QueryBlocks(int64_t t, int64_t s, int64_t q_start) {
  std::vector<QueryBlock> blocks;
  for (int64_t start = 0; start < t; start += kAttentionQueryBlock) {
    const int64_t length = std::min(kAttentionQueryBlock, t - start);
    blocks.push_back({start, length, std::clamp<int64_t>(q_start + start + length, 1, s)});
  }
  return blocks;
}

// Causal GQA attention of every query against every key in one multiply each. Returns (B, Hq, T, D).
at::Tensor WholeAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_start,
                          const AttentionShape& shape) {
  const int64_t b = q.size(0), hq = q.size(1), t = q.size(2), d = q.size(3), hkv = k.size(1);
  return at::matmul(AttentionProbs(FoldQueries(q, hkv, shape), k, hq / hkv, q_start, shape), v).view({b, hq, t, d});
}

// Causal GQA attention, one query block at a time (one block for short inputs). Returns (B, Hq, T, D).
at::Tensor BlockedAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_start,
                            const AttentionShape& shape) {
  const int64_t b = q.size(0), hq = q.size(1), t = q.size(2), d = q.size(3), s = k.size(2);
  if (t <= kAttentionQueryBlock) return WholeAttention(q, k, v, q_start, shape);
  at::Tensor out = at::empty({b, hq, t, d}, q.options());
  for (const QueryBlock& blk : QueryBlocks(t, s, q_start)) {
    out.narrow(2, blk.start, blk.length)
        .copy_(WholeAttention(q.narrow(2, blk.start, blk.length), k.narrow(2, 0, blk.keys), v.narrow(2, 0, blk.keys),
                              q_start + blk.start, shape));
  }
  return out;
}

// Causal grouped-query attention under reverse-mode autograd that keeps only q, k and v (not the
// (rows × keys) probabilities, the largest tensor of a layer at training lengths): backward rebuilds the
// probabilities P with one more score multiply, as flash attention's backward does, then
// dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = c dS K, dK = c dSᵀ Q (c the queries' scale), one query
// block at a time (a block's keys and values gather the gradients of every block that sees them). A
// soft-cap scales dS by its slope before dQ and dK.
struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            int64_t q_start, int64_t window, double softcap, double scale) {
    at::NoGradGuard no_grad;
    ctx->save_for_backward({q, k, v});
    ctx->saved_data["q_start"] = q_start;
    ctx->saved_data["window"] = window;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["scale"] = scale;
    return BlockedAttention(q, k, v, q_start, {Window(window), softcap, scale});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2];
    const int64_t b = q.size(0), hq = q.size(1), t = q.size(2), d = q.size(3), hkv = k.size(1), s = k.size(2);
    const int64_t q_start = ctx->saved_data["q_start"].toInt();
    const AttentionShape shape{Window(ctx->saved_data["window"].toInt()), ctx->saved_data["softcap"].toDouble(),
                               ctx->saved_data["scale"].toDouble()};
    const double scale = shape.ScaleFor(d);
    at::Tensor dq = at::empty({b, hq, t, d}, q.options());
    at::Tensor dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
    at::Tensor dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
    at::Tensor dk3 = dk.view({b * hkv, s, d}), dv3 = dv.view({b * hkv, s, d});
    for (const QueryBlock& blk : QueryBlocks(t, s, q_start)) {
      const at::Tensor kb = k.narrow(2, 0, blk.keys), vb = v.narrow(2, 0, blk.keys);
      const at::Tensor qg = FoldQueries(q.narrow(2, blk.start, blk.length), hkv, shape);  // (B, Hkv, G*len, D)
      at::Tensor slope;
      const at::Tensor probs =
          AttentionProbs(qg, kb, hq / hkv, q_start + blk.start, shape, &slope);  // (B, Hkv, G*len, keys)
      const at::Tensor d_out = grad_outputs[0].narrow(2, blk.start, blk.length).reshape({b, hkv, -1, d});
      // Accumulated in place, one (B·Hkv) batch of multiplies; summing over rows sums the group's heads.
      dv3.narrow(1, 0, blk.keys)
          .baddbmm_(probs.reshape({b * hkv, -1, blk.keys}).transpose(1, 2), d_out.reshape({b * hkv, -1, d}));
      at::Tensor ds = at::matmul(d_out, vb.transpose(-1, -2));  // dP, then dS in place
      ds.sub_((ds * probs).sum(-1, /*keepdim=*/true)).mul_(probs);
      if (slope.defined()) ds.mul_(slope);
      dq.narrow(2, blk.start, blk.length).copy_(at::matmul(ds, kb).mul_(scale).view({b, hq, blk.length, d}));
      dk3.narrow(1, 0, blk.keys)
          .baddbmm_(ds.reshape({b * hkv, -1, blk.keys}).transpose(1, 2),
                    qg.reshape({b * hkv, -1, d}));  // qg carries the scale
    }
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }

  static std::optional<int64_t> Window(int64_t w) { return w > 0 ? std::optional<int64_t>(w) : std::nullopt; }
};

}  // namespace

at::Tensor GroupedQueryAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_start,
                                 std::optional<int64_t> sliding_window, double softcap, double scale) {
  const int64_t hq = q.size(1), hkv = k.size(1), s = k.size(2);
  SEEDLING_CHECK(hq % hkv == 0 && v.size(1) == hkv && v.size(2) == s);
  if (RecordsBackward({q, k, v})) {
    return AttentionFunction::apply(q, k, v, q_start, sliding_window.value_or(0), softcap, scale);
  }
  if (IsDual(q) || IsDual(k) || IsDual(v)) {  // forward-mode AD (reference mode): LibTorch's own rules
    return WholeAttention(q, k, v, q_start, {sliding_window, softcap, scale});
  }
  return BlockedAttention(q, k, v, q_start, {sliding_window, softcap, scale});
}

at::Tensor RmsNormTangents(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t directions = x.size(0) - 1;
  const at::Tensor x0 = x.select(0, 0);
  const at::Tensor inv_rms = at::rsqrt(x0.pow(2).mean({-1}, /*keepdim=*/true) + eps);
  const at::Tensor w = AsCompute(weight);
  at::Tensor out = at::empty_like(x);
  out.select(0, 0).copy_(x0 * inv_rms * w);  // exactly RmsNorm(x0)
  if (directions > 0) {
    const at::Tensor dx = x.narrow(0, 1, directions);
    const at::Tensor dot = (dx * x0).mean({-1}, /*keepdim=*/true);  // mean(x dx), per direction
    out.narrow(0, 1, directions).copy_((dx - x0 * (inv_rms * inv_rms) * dot) * (inv_rms * w));
  }
  return out;
}

namespace {

// act'(x) · scale, elementwise.
at::Tensor ActivationSlope(const at::Tensor& x, MlpActivation activation, const at::Tensor& scale) {
  switch (activation) {
    case MlpActivation::kSilu:
      return at::silu_backward(scale, x);
    case MlpActivation::kGeluTanh:
      return at::gelu_backward(scale, x, "tanh");
    case MlpActivation::kGelu:
      return at::gelu_backward(scale, x);
    case MlpActivation::kRelu:
      return x.gt(0).to(x.scalar_type()).mul_(scale);
  }
  return scale;
}

}  // namespace

at::Tensor LayerNormTangents(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const int64_t directions = x.size(0) - 1, h = x.size(-1);
  const at::Tensor x0 = x.select(0, 0);
  const at::Tensor w = AsCompute(weight);
  auto [y0, mean, inv_std] = at::native_layer_norm(x0, {h}, w, AsCompute(bias), eps);
  at::Tensor out = at::empty_like(x);
  out.select(0, 0).copy_(y0);  // exactly LayerNorm(x0)
  if (directions > 0) {
    const at::Tensor xhat = (x0 - mean) * inv_std;
    at::Tensor dx = x.narrow(0, 1, directions);
    at::Tensor d = dx - dx.mean({-1}, /*keepdim=*/true);
    d.sub_(xhat * (xhat * dx).mean({-1}, /*keepdim=*/true));
    out.narrow(0, 1, directions).copy_(d.mul_(inv_std * w));
  }
  return out;
}

at::Tensor NormTangents(NormKind kind, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        double eps) {
  return kind == NormKind::kLayerNorm ? LayerNormTangents(x, weight, bias, eps) : RmsNormTangents(x, weight, eps);
}

at::Tensor ActivationTangents(const at::Tensor& x, MlpActivation activation) {
  const int64_t directions = x.size(0) - 1;
  const at::Tensor x0 = x.select(0, 0);
  at::Tensor out = at::empty_like(x);
  out.select(0, 0).copy_(Activation(x0, activation));
  if (directions > 0) {
    at::Tensor d = out.narrow(0, 1, directions);
    at::mul_out(d, x.narrow(0, 1, directions), ActivationSlope(x0, activation, at::ones_like(x0)));
  }
  return out;
}

at::Tensor SwiGluTangents(const at::Tensor& gate, const at::Tensor& up) {
  const int64_t directions = gate.size(0) - 1;
  const at::Tensor g0 = gate.select(0, 0), u0 = up.select(0, 0);
  const at::Tensor silu = at::silu(g0);
  at::Tensor out = at::empty_like(gate);
  out.select(0, 0).copy_(silu * u0);  // exactly at::silu(gate) * up
  if (directions > 0) {
    // In place, so the tangents add no temporaries of their own size.
    const at::Tensor sig = at::sigmoid(g0);
    at::Tensor dsilu_u = 1 - sig;
    dsilu_u.mul_(g0).add_(1).mul_(sig).mul_(u0);  // silu'(g) · u = σ (1 + g (1 − σ)) u
    at::Tensor d = out.narrow(0, 1, directions);
    at::mul_out(d, gate.narrow(0, 1, directions), dsilu_u);
    d.addcmul_(up.narrow(0, 1, directions), silu);
  }
  return out;
}

at::Tensor GatedActivationTangents(const at::Tensor& gate, const at::Tensor& up, MlpActivation activation) {
  if (activation == MlpActivation::kSilu) return SwiGluTangents(gate, up);
  const int64_t directions = gate.size(0) - 1;
  const at::Tensor g0 = gate.select(0, 0), u0 = up.select(0, 0);
  const at::Tensor act = Activation(g0, activation);
  at::Tensor out = at::empty_like(gate);
  out.select(0, 0).copy_(act * u0);  // exactly GatedActivation(gate, up)
  if (directions > 0) {
    const at::Tensor dact_u = ActivationSlope(g0, activation, u0);  // act'(g) · u
    at::Tensor d = out.narrow(0, 1, directions);
    at::mul_out(d, gate.narrow(0, 1, directions), dact_u);
    d.addcmul_(up.narrow(0, 1, directions), act);
  }
  return out;
}

at::Tensor GroupedQueryAttentionTangents(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         std::optional<int64_t> sliding_window, double softcap, double scale) {
  const int64_t slices = q.size(0), b = q.size(1), hq = q.size(2), t = q.size(3), d = q.size(4);
  const int64_t hkv = k.size(2);
  SEEDLING_CHECK(k.size(0) == slices && v.size(0) == slices && hq % hkv == 0 && k.size(3) == t);
  const AttentionShape shape{sliding_window, softcap, scale};
  const at::Tensor q0 = FoldQueries(q.select(0, 0), hkv, shape);  // (B, Hkv, G*T, D)
  const at::Tensor k0 = k.select(0, 0), v0 = v.select(0, 0);
  at::Tensor slope;
  const at::Tensor probs = AttentionProbs(q0, k0, hq / hkv, 0, shape, &slope);  // (B, Hkv, G*T, S)
  at::Tensor out = at::empty_like(q);
  out.select(0, 0).copy_(at::matmul(probs, v0).view({b, hq, t, d}));
  for (int64_t i = 1; i < slices; ++i) {
    // dS = dq kᵀ + q dkᵀ (both scaled through the folded queries); masked entries have P = 0, so dP = 0.
    at::Tensor ds = at::matmul(FoldQueries(q.select(0, i), hkv, shape), k0.transpose(-1, -2));
    ds.add_(at::matmul(q0, k.select(0, i).transpose(-1, -2)));
    if (slope.defined()) ds.mul_(slope);  // the tangent of the capped scores
    const at::Tensor row = (probs * ds).sum(-1, /*keepdim=*/true);
    ds.sub_(row).mul_(probs);  // dP
    at::Tensor dout = at::matmul(ds, v0);
    dout.add_(at::matmul(probs, v.select(0, i)));
    out.select(0, i).copy_(dout.view({b, hq, t, d}));
  }
  return out;
}

}  // namespace seedling::model
