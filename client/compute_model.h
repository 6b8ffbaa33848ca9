#pragma once

// The compute model of local training: how many FLOPs each method's steps take, for the simulator's
// device time and for the MFU (achieved FLOP/s over the in-run sgemm figure) that `finetune` and the
// benchmarks report next to tokens/s.

#include <cstdint>
#include <string_view>

#include "model/config.h"

namespace seedling::client {

// Training methods LocalTrainingFlops knows: "lora-bp", "fwdgrad", "mezo", "kseed".
bool IsKnownTrainingMethod(std::string_view method);

// FLOPs of one device's local run of `steps` steps on `batch` sequences of `seq_len` tokens.
// Assumptions (tokens = batch × seq_len; norms, RoPE, softmax and the optimizer are ignored):
//
//   forward F = tokens × (2 × the non-embedding matmul parameters: q, k, v, o, gate, up and down
//               over all layers
//               + 4 × seq_len × q_dim × layers: QKᵀ and AV over the full square, the causal mask's
//               halving ignored
//               + 2 × hidden × vocab: the LM head)
//   "lora-bp"  3F per step: the forward, the backward for activation gradients through the frozen
//              weights (about F), and the LoRA gradients plus the elementwise backward (counted as
//              another F; the frozen weights get no weight gradient, so this is an upper bound, the
//              usual 6-FLOPs-per-parameter-per-token training estimate).
//   "fwdgrad"  (1 + perturbations) F per step: one primal pass plus one tangent pass per
//              perturbation (forward-mode AD costs about 1.5-2 forwards; we count the tangent as a
//              full forward, so 2F for one perturbation).
//   "mezo", "kseed"  2 × perturbations forwards per step (+z and -z; MeZO's 2F for one).
//
// perturbations < 1 counts as 1. With one perturbation: mezo = kseed = fwdgrad = 2F < lora-bp = 3F.
// Linear in steps and in batch. An unknown method is a programming error (aborts): check
// IsKnownTrainingMethod first.
double LocalTrainingFlops(const model::ModelConfig& config, std::string_view method, int64_t steps,
                          int64_t batch, int64_t seq_len, int64_t perturbations);

// Model FLOP utilization of a run that processed `processed_tokens` in `seconds` with the given shape:
// LocalTrainingFlops scaled to the tokens actually processed (rows can be shorter than seq_len), per
// second, over `sgemm_gflops` (model::MeasureSgemmGflops, measured in the same process). 0 when any
// figure is missing. Model FLOPs, not hardware FLOPs: recomputation's extra forward is not counted.
double TrainingMfu(const model::ModelConfig& config, std::string_view method, int64_t steps, int64_t batch,
                   int64_t seq_len, int64_t perturbations, int64_t processed_tokens, double seconds,
                   double sgemm_gflops);

}  // namespace seedling::client
