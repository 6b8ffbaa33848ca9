#include "model/frozen_linear.h"

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

#include "base/check.h"
#include "model/quant.h"

namespace seedling::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool IsDense(const at::Tensor& w) { return w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble; }

// y (N, out) = x (N, in) Wᵀ, without autograd.
at::Tensor LinearNoGrad(const at::Tensor& x, const at::Tensor& w, const WeightPages* stream) {
  if (IsDense(w)) return at::mm(x, w.t());
  WeightTiles tiles(w, 0, stream);
  at::Tensor y = at::empty({x.size(0), tiles.rows()}, x.options());
  for (int64_t r0 = 0; r0 < tiles.rows(); r0 += tiles.tile_rows()) {
    const int64_t n = std::min(tiles.tile_rows(), tiles.rows() - r0);
    at::Tensor slice = y.narrow(1, r0, n);  // (N, n), row stride out: BLAS writes it in place
    at::mm_out(slice, x, tiles.Tile(r0, n).t());
  }
  return y;
}

// dx (N, in) = dy (N, out) W, without autograd.
at::Tensor InputGradient(const at::Tensor& dy, const at::Tensor& w, const WeightPages* stream) {
  if (IsDense(w)) return at::mm(dy, w);
  WeightTiles tiles(w, 0, stream);
  at::Tensor dx = at::empty({dy.size(0), tiles.cols()}, dy.options());
  for (int64_t r0 = 0; r0 < tiles.rows(); r0 += tiles.tile_rows()) {
    const int64_t n = std::min(tiles.tile_rows(), tiles.rows() - r0);
    const at::Tensor tile = tiles.Tile(r0, n);  // (n, in)
    if (r0 == 0) {
      at::mm_out(dx, dy.narrow(1, 0, n), tile);
    } else {
      dx.addmm_(dy.narrow(1, r0, n), tile);
    }
  }
  return dx;
}

// Saves only W: the input gradient needs W, and W is frozen, so x is never kept. Without `values` the
// forward skips the multiply and returns zeros (FrozenLinearGraph). `stream` (may be null) is kept as an
// address for backward: it belongs to the model, which outlives every graph built from it.
struct FrozenLinearFunction : public torch::autograd::Function<FrozenLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, bool values,
                            const WeightPages* stream) {
    ctx->save_for_backward({w});
    ctx->saved_data["stream"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(stream));
    if (!values) return at::zeros({x.size(0), LogicalShape(w)[0]}, x.options());
    return LinearNoGrad(x, w, stream);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor w = ctx->get_saved_variables()[0];
    const auto* stream = reinterpret_cast<const WeightPages*>(static_cast<intptr_t>(ctx->saved_data["stream"].toInt()));
    return {InputGradient(grad_outputs[0].contiguous(), w, stream), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// x (N, in) -> (N, out), through autograd when x requires grad.
at::Tensor Linear2d(const at::Tensor& x, const at::Tensor& w, const WeightPages* stream) {
  if (at::GradMode::is_enabled() && x.requires_grad()) return FrozenLinearFunction::apply(x, w, true, stream);
  return LinearNoGrad(x, w, stream);
}

}  // namespace

int64_t DefaultTileRows(int64_t rows, int64_t cols) {
  const int64_t rows_for_bytes = std::max<int64_t>(16, kWeightTileBytes / (4 * std::max<int64_t>(cols, 1)) / 16 * 16);
  return std::max<int64_t>(1, std::min(rows_for_bytes, rows));
}

WeightPages::WeightPages(std::vector<std::shared_ptr<const MappedFile>> files) {
  for (auto& file : files) {
    if (file != nullptr && file->mode() == MappedFile::Mode::kReadOnly) files_.push_back(std::move(file));
  }
}

void WeightPages::Release(const void* p, size_t n) const {
  const auto* bytes = static_cast<const uint8_t*>(p);
  for (const auto& file : files_) {
    if (bytes >= file->data() && bytes + n <= file->data() + file->size()) {
      file->Release(bytes, n);
      return;
    }
  }
}

WeightTiles::WeightTiles(const at::Tensor& w, int64_t tile_rows, const WeightPages* stream)
    : w_(w.detach()), stream_(stream) {
  const std::vector<int64_t> shape = LogicalShape(w);
  SEEDLING_CHECK(shape.size() == 2, "a frozen matrix is 2-D");
  rows_ = shape[0];
  cols_ = shape[1];
  decode_ = !IsDense(w);
  if (decode_) w_ = w_.contiguous();
  tile_rows_ = tile_rows <= 0 ? DefaultTileRows(rows_, cols_) : std::max<int64_t>(1, std::min(tile_rows, rows_));
  if (decode_) buffer_ = at::empty({tile_rows_, cols_}, at::kFloat);
}

at::Tensor WeightTiles::Tile(int64_t row0, int64_t count) {
  SEEDLING_CHECK(count >= 1 && count <= tile_rows_ && row0 >= 0 && row0 + count <= rows_);
  if (!decode_) return w_.narrow(0, row0, count);
  DequantizeRows(w_, row0, count, buffer_.data_ptr<float>());
  if (stream_ != nullptr) {
    const size_t row_bytes = w_.nbytes() / static_cast<size_t>(rows_);
    stream_->Release(static_cast<const uint8_t*>(w_.data_ptr()) + row0 * row_bytes, count * row_bytes);
  }
  return buffer_.narrow(0, 0, count);
}

at::Tensor FrozenLinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t forward_level,
                        const WeightPages* stream) {
  if (w.requires_grad() || (bias.defined() && bias.requires_grad())) {
    // Trained weights (full backprop in tests) are dense: LibTorch's own linear differentiates them.
    return at::linear(x, w, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
  }
  const std::vector<int64_t> shape = LogicalShape(w);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = shape[0];
  if (forward_level >= 0 && x._fw_grad(static_cast<uint64_t>(forward_level)).defined()) {
    // Forward-mode AD by hand: primal and tangent go through the same tiles in one multiply.
    auto [primal, tangent] = at::_unpack_dual(x, forward_level);
    const int64_t n = primal.numel() / shape[1];
    const at::Tensor both = at::cat({primal.reshape({n, shape[1]}), tangent.reshape({n, shape[1]})}, 0);
    const at::Tensor y = LinearNoGrad(both, w, stream);
    at::Tensor y_primal = y.narrow(0, 0, n).view(out_sizes);
    if (bias.defined()) y_primal = y_primal + bias;
    return at::_make_dual(y_primal, y.narrow(0, n, n).view(out_sizes), forward_level);
  }
  at::Tensor y = Linear2d(x.reshape({-1, shape[1]}), w, stream).view(out_sizes);
  if (bias.defined()) y = y + bias;
  return y;
}

at::Tensor FrozenLinearGraph(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                             const WeightPages* stream) {
  if (!at::GradMode::is_enabled() || !x.requires_grad() || w.requires_grad() ||
      (bias.defined() && bias.requires_grad())) {
    return FrozenLinear(x, w, bias, -1, stream);
  }
  const int64_t in = LogicalShape(w)[1];
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = LogicalShape(w)[0];
  // No bias: the output's value is unspecified, and the bias has no gradient here.
  return FrozenLinearFunction::apply(x.reshape({-1, in}), w, false, stream).view(out_sizes);
}

at::Tensor FrozenEmbedding(const at::Tensor& w, const at::Tensor& tokens) {
  if (IsDense(w) || w.requires_grad()) return at::embedding(w, tokens);
  const std::vector<int64_t> shape = LogicalShape(w);
  const at::Tensor ids = tokens.contiguous();
  const at::Tensor contiguous = w.contiguous();
  std::vector<int64_t> out_sizes = tokens.sizes().vec();
  out_sizes.push_back(shape[1]);
  at::Tensor out = at::empty(out_sizes, at::kFloat);
  const int64_t* id = ids.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < ids.numel(); ++i) DequantizeRows(contiguous, id[i], 1, dst + i * shape[1]);
  return out;
}

}  // namespace seedling::model
