#pragma once

// Compute on frozen matrices in any weight format (model/quant.h: fp32, f16, bf16, Q8_0, Q4_0) without
// ever converting a whole matrix: a tile of rows is decoded into a small fp32 buffer that stays in
// cache, multiplied (BLAS), and overwritten by the next tile.
//
//  * FrozenLinear: y = x Wᵀ + b. Under autograd a custom function whose backward computes the input
//    gradient dx = dy W tile by tile; it saves only the reference to W (which is frozen, so there is no
//    dW and no need to keep x). fp32 matrices are multiplied whole, in place.
//  * FrozenEmbedding: rows of the embedding matrix gathered and decoded per token.
//  * WeightTiles: the tile iterator the two above and the cross-entropy's LM head (model/kernels.h) share.
//
// Numbers: a tile holds exactly the decoded weights (model/quant.h), so results equal decoding the
// whole matrix and multiplying, up to the summation order of the matrix multiply.

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "base/file.h"

namespace seedling::model {

// The read-only file mappings that frozen matrices view (a q8_0 / q4_0 weight cache). When weights are
// streamed (LlamaModel::set_stream_weights), each tile's source pages are released once decoded: they
// stay in the OS page cache, clean, and fault back in on the next pass, so the process holds about a
// tile of each matrix instead of all its weights. Release never touches memory outside these mappings:
// MADV_DONTNEED on anonymous memory would zero it.
class WeightPages {
 public:
  explicit WeightPages(std::vector<std::shared_ptr<const MappedFile>> files);  // keeps the kReadOnly ones
  // Drops the pages wholly inside [p, p + n) if that range lies in one of the mappings; else nothing.
  void Release(const void* p, size_t n) const;
  bool empty() const { return files_.empty(); }

 private:
  std::vector<std::shared_ptr<const MappedFile>> files_;
};

// fp32 bytes of one decoded tile (the tile's rows × the matrix's columns ≈ this). Each tile is one BLAS
// call that packs the activations again, so tiles are large: on Qwen2.5-0.5B shapes (2 cores, 2 MiB L2,
// 32 MiB L3) eval with q4_0 weights took 28.2 s with 256 KiB tiles, 18.8 s with 512 KiB, 13.5 s with 2 MiB,
// 13.3 s with 4-8 MiB, against 14.8 s for fp32 weights used in place.
inline constexpr int64_t kWeightTileBytes = 2 << 20;

// Rows per tile for a (rows, cols) matrix: about kWeightTileBytes of fp32, at least 16 rows, at most all.
int64_t DefaultTileRows(int64_t rows, int64_t cols);

// Visits a frozen matrix (logical (rows, cols)) as consecutive row tiles. fp32 and fp64 matrices are
// handed out as views (no copy); other formats are decoded into one reused fp32 buffer, so a tile is
// valid only until the next call. Not thread-safe; cheap to construct. With `stream`, each decoded tile's
// source pages are released (WeightPages); dense matrices are used in place and never released.
class WeightTiles {
 public:
  // tile_rows <= 0 picks about kWeightTileBytes of fp32 per tile (at least 16 rows).
  explicit WeightTiles(const at::Tensor& w, int64_t tile_rows = 0, const WeightPages* stream = nullptr);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t tile_rows() const { return tile_rows_; }
  // Rows [row0, row0 + count) as a (count, cols) tensor; count <= tile_rows().
  at::Tensor Tile(int64_t row0, int64_t count);

 private:
  at::Tensor w_;
  int64_t rows_ = 0, cols_ = 0, tile_rows_ = 0;
  bool decode_ = false;  // false: tiles are views of w_
  at::Tensor buffer_;    // (tile_rows, cols) fp32 when decoding
  const WeightPages* stream_ = nullptr;
};

// y = x Wᵀ (+ bias).
//   x (..., in) fp32 (fp64 with an fp64 W, for tests); w logical (out, in) in any weight format; bias (out)
//   fp32 or undefined. Returns (..., out).
// Autograd: differentiable w.r.t. x; a W or bias that requires grad (dense, e.g. full backprop in tests)
// goes through LibTorch's own linear instead. For forward-mode AD,
// pass the dual level: when x carries a tangent at `forward_level`, the result carries tangent Wᵀ·dx.
// `stream` (may be null) releases W's pages tile by tile, in forward and in backward (WeightPages); it
// must outlive the autograd graph.
at::Tensor FrozenLinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t forward_level = -1,
                        const WeightPages* stream = nullptr);

// FrozenLinear's graph without its product, for recomputation in backward, where a layer's last
// projection is re-run only so that gradients flow through it and its output is never read: under
// reverse-mode autograd (x requires grad, W and bias frozen) the result is zeros of the output's shape
// with FrozenLinear's backward (dx = dy W), and the multiply is skipped. Otherwise FrozenLinear(x, w, bias).
at::Tensor FrozenLinearGraph(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                             const WeightPages* stream = nullptr);

// Rows of a frozen embedding matrix: (..., H) fp32 for token ids (...) int64, ids already validated.
at::Tensor FrozenEmbedding(const at::Tensor& w, const at::Tensor& tokens);

}  // namespace seedling::model
