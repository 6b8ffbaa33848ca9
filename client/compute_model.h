#pragma once

// The compute model of local training: how many FLOPs each method's steps take, for the simulator's
// device time and for the MFU (achieved FLOP/s over the in-run sgemm figure) that `finetune` and the
// benchmarks report next to tokens/s.

#include <cstdint>
#include <string_view>

#include "model/config.h"

namespace seedling::client {

// Training methods LocalTrainingFlops knows: "lora-bp", "fwdgrad", "mezo", "kseed", "pepita", "mempepita" (pepita
// with its "mem" variant).
bool IsKnownTrainingMethod(std::string_view method);

// FLOPs of one device's local run of `steps` steps on `batch` sequences of `seq_len` tokens, counted
// per token in three parts (tokens = batch × seq_len; norms, RoPE, softmax and the optimizer ignored):
//
//   P = 2 × the non-embedding matmul parameters (q, k, v, o, gate, up, down over all layers)
//   A = 4 × seq_len × q_dim × layers: QKᵀ and AV over the full square (the causal halving ignored)
//   H = 2 × hidden × vocab: the LM head
//   forward F = P + A + H
//
//   "lora-bp"  2P + 3A + 2H per step: the forward, and the backward's activation gradients through the
//              frozen weights (one more multiply per projection, two per attention product); the
//              cross-entropy's hidden-state gradient is accumulated in its forward pass (one more
//              LM-head multiply). The frozen weights get no weight gradient and the rank-r LoRA
//              gradients are negligible, so about 2F, not the 6-per-parameter (3F) of full training.
//   "fwdgrad"  (1 + K) P + (1 + 2K) A + 2H per step with K = perturbations: one batched pass carries
//              the primal and K tangents through every projection, a tangent's attention takes four
//              products to the primal's two, and the LM head runs once for the loss and once for its
//              gradient, whose dot product with each tangent gives the derivatives.
//   "mezo", "kseed"  2 × perturbations forwards per step (+z and −z; MeZO's 2F for one).
//   "pepita"   2P + 2A + 2H per step: the clean forward with the LM head, the error's image F e (a
//              hidden × vocab product per scored token, as large as the head's), and the modulated forward
//              through the layers only. The update's rank-r products (4 r (in + out) per adapted projection and
//              token) and generating F are not counted.
//   "mempepita"  3P + 3A + 2H: as pepita, plus the third forward that recomputes the clean layers.
//
// An adapter on the upper layers only (lora "top:N", `first_adapted_layer` = f of L layers) changes what
// runs below f, the layers' P and A scaled by f / L: lora-bp's backward and fwdgrad's tangents stop there
// (lora-bp P + A + 2H + u (P + 2A), fwdgrad P + A + 2H + u K (P + 2A) with u = (L − f) / L), and mezo's
// and kseed's probes run those layers once per step for all 2q perturbations, batched or in place
// ((1 − u + 2q u)(P + A) + 2q H).
// pepita and mempepita run every layer either way.
//
// perturbations < 1 counts as 1. Linear in steps and in batch. An unknown method is a programming error
// (aborts): check IsKnownTrainingMethod first.
double LocalTrainingFlops(const model::ModelConfig& config, std::string_view method, int64_t steps, int64_t batch,
                          int64_t seq_len, int64_t perturbations, int64_t first_adapted_layer = 0);

// Model FLOP utilization of a run that processed `processed_tokens` in `seconds` with the given shape:
// LocalTrainingFlops scaled to the tokens actually processed (rows can be shorter than seq_len), per
// second, over `sgemm_gflops` (model::MeasureSgemmGflops, measured in the same process). 0 when any
// figure is missing. Model FLOPs, not hardware FLOPs: recomputation's extra forward is not counted.
double TrainingMfu(const model::ModelConfig& config, std::string_view method, int64_t steps, int64_t batch,
                   int64_t seq_len, int64_t perturbations, int64_t processed_tokens, double seconds,
                   double sgemm_gflops, int64_t first_adapted_layer = 0);

// The MFU of plain forwards (F = P + A + H per token, at sequence length `seq_len`) that processed
// `processed_tokens` in `seconds`, over `sgemm_gflops`. 0 when any figure is missing.
double ForwardMfu(const model::ModelConfig& config, int64_t seq_len, int64_t processed_tokens, double seconds,
                  double sgemm_gflops);

}  // namespace seedling::client
