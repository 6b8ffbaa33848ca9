#pragma once

// The memory planner (ggml's gallocr_reserve idea, docs/contributing.md, "Memory and numbers"): before anything is
// allocated, it estimates from shapes the peak resident memory of a local training step for a method and picks the
// fastest settings that fit a byte budget: micro-batch, per-layer recomputation, cross-entropy chunk, and the method's
// variant (fwdgrad: batched-jvp or central-difference; mezo/kseed: batched probes, or exact-restore (kseed) or
// in-place-restore; pepita: "pepita" keeping the clean outputs or MEMPEPITA's "mem"). It never switches methods: the
// server assigns the method; a device that cannot fit it declines with ResourceExhausted and the smallest budget that
// would fit.
//
// The estimate is of process RSS, as the OS counts it when it decides to kill an app:
//   runtime   measured: what the process holds before the model (code, LibTorch, BLAS buffers)
//   weights   resident model weights (fp32: 4 bytes/parameter; 16-bit as stored: 2; q8_0: 34/32; q4_0: 18/32)
//   trainable the trained parameters and their optimizer state (LoRA: a few MiB)
//   activation the step's peak tensor memory: saved activations, the largest transient, cross-entropy chunk
//   slack     heap fragmentation and small objects (measured per heap allocator: with the system's glibc heap
//             75-90% of the activations + 16 MiB; with tcmalloc, which the programs link, 16 MiB)
// See client/memory_planner.cpp for each formula and the measurements behind it.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/memory.h"
#include "comms/transport.h"
#include "lora/adapter.h"
#include "model/config.h"
#include "optim/trainer.h"

namespace seedling::client {

// Bounds on a plan's inputs (PlanMemory refuses more): with ModelConfig's own bounds they keep every
// byte count the planner multiplies out within int64.
inline constexpr int64_t kMaxPlanTokens = int64_t{1} << 18;  // seq_len x batch per step
inline constexpr int64_t kMaxPlanPerturbations = comms::kMaxTaskPerturbations;

struct PlanRequest {
  model::ModelConfig model;
  optim::Method method = optim::Method::kLoraBp;
  lora::LoraConfig lora;                  // the adapter (ignored with full_parameters)
  bool full_parameters = false;           // mezo / kseed on every weight instead of an adapter
  int64_t seq_len = 256;                  // tokens per sequence
  int64_t batch = 1;                      // sequences per step
  int64_t budget_bytes = 0;               // 0 = unlimited: plan the fastest settings
  int64_t runtime_bytes = -1;             // RSS outside the model; -1 = measure now (CurrentRssBytes)
  int64_t data_bytes = 0;                 // what loading the local data holds and takes (DataFootprint::total_bytes)
  int64_t weight_bytes = -1;              // resident weight bytes (model::ResidentWeightBytes); -1 = 4 per parameter
  bool weights_decoded_per_tile = false;  // matrices in 16-bit or block formats: each multiply decodes
                                          // one tile at a time (model/frozen_linear.h)
  int64_t streamed_weight_bytes = -1;     // resident weight bytes when streamed (model::StreamedWeightBytes);
                                          // -1 = these weights cannot be streamed
  int64_t perturbations = 8;              // per step: fwdgrad's K (tangents), mezo / kseed's q (2q batched copies)
  HeapAllocator heap = CurrentHeapAllocator();  // sizes the slack for fragmentation
};

struct MemoryPlan {
  optim::Method method = optim::Method::kLoraBp;
  std::string variant;            // "batched-jvp" / "central-difference" (fwdgrad), "batched" / "exact-restore" /
                                  // "in-place-restore" (mezo, kseed), "pepita" / "mem" (pepita), "" (lora-bp)
  int64_t micro_batch = 1;        // sequences per forward/backward (lora-bp accumulates)
  bool recompute = false;         // per-layer recomputation
  int64_t stored_layers = 0;      // with recompute: the last layers that keep their activations instead
  int64_t ce_chunk_tokens = 0;    // cross-entropy rows per chunk; 0 = all
  int64_t mlp_chunk_tokens = 0;   // mezo / kseed / fwdgrad: MLP tokens per chunk without autograd; 0 = all
  int64_t tangents_per_pass = 0;  // fwdgrad batched-jvp: tangents one forward carries; 0 otherwise
  bool stream_weights = false;    // release the layers' weight pages after each tile (model::LlamaModel)

  int64_t runtime_bytes = 0;
  int64_t data_bytes = 0;
  int64_t weight_bytes = 0;
  int64_t trainable_bytes = 0;
  int64_t activation_bytes = 0;
  int64_t slack_bytes = 0;
  HeapAllocator heap = HeapAllocator::kSystem;  // the allocator the slack was sized for
  int64_t total_bytes() const {
    return runtime_bytes + data_bytes + weight_bytes + trainable_bytes + activation_bytes + slack_bytes;
  }

  // "lora-bp: micro-batch 2, recompute on, CE chunk 85 tokens; 812.3 MiB = runtime 160.1 + weights 513.0 + ..."
  std::string Describe() const;
  // One JSON object with every field above.
  std::string ToJson() const;
};

// The variants PlanMemory considers for a method, fastest first: "" (lora-bp); "batched-jvp",
// "central-difference" (fwdgrad); "batched" (adapter runs only), "exact-restore" (kseed),
// "in-place-restore" (mezo, kseed); "pepita", "mem" (pepita).
std::vector<std::string> PlanVariants(optim::Method method, bool full_parameters);

// Estimates one configuration (no search, no budget check).
// `stream_weights` counts request.streamed_weight_bytes instead of request.weight_bytes (ignored when the
// request's weights cannot be streamed).
// `tangents_per_pass` matters for fwdgrad's batched-jvp only (<= 0: all of request.perturbations).
// `stored_layers` matters for lora-bp with recompute only (clamped to [0, layers]).
MemoryPlan EstimatePlan(const PlanRequest& request, const std::string& variant, int64_t micro_batch, bool recompute,
                        int64_t ce_chunk_tokens, int64_t mlp_chunk_tokens = 0, int64_t tangents_per_pass = 0,
                        int64_t stored_layers = 0, bool stream_weights = false);

// The fastest configuration whose estimate fits the budget. At each setting, resident weights come first,
// then streamed ones (when the request's weights can be streamed): streaming costs page faults, less than
// any other setting. ResourceExhausted when none does: the message
// gives the smallest budget that would fit and the plan it would use. InvalidArgument for a bad request
// (non-positive sizes, a LoRA config that does not fit the model, fwdgrad on full parameters).
absl::StatusOr<MemoryPlan> PlanMemory(const PlanRequest& request);

}  // namespace seedling::client
