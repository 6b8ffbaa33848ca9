#include "client/memory_planner.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <optional>
#include <vector>

#include "absl/strings/str_format.h"
#include "base/memory.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/frozen_linear.h"

namespace seedling::client {
namespace {

using model::Projection;
using optim::Method;

constexpr int64_t kFloat = 4;  // bytes per fp32 element
// A step's RSS exceeds its tensor high-water mark by what the heap keeps resident in holes that short-lived
// tensors leave between long-lived ones. Slack is 16 MiB for small objects plus fractions of the activation
// estimate, measured per allocator (RSS over runtime + weights + trainable + activations, as a fraction of
// the activation estimate; seq 256).
struct SlackFractions {
  double temporaries;  // the step's activations without recomputation
  double recompute;    // with recomputation (the backward re-runs each layer, interleaving its temporaries
                       // with the gradients)
  double stored;       // the saved sets of the layers a partial plan stores: long-lived, few holes
};
// glibc's heap does not reuse those holes well. With recomputation: SmolLM2-135M 2 x 256 fp32 0.53 and q8_0
// 0.73, Qwen2.5-0.5B q4_0 0.74, TinyLlama-1.1B q4_0 0.60; without, Qwen2.5-0.5B q4_0 lora-bp stays 1% under
// the estimate with 0.75. Stored layers: on SmolLM2-135M fp32, 1 x 256, each raised the peak RSS by 1.45
// times its saved set (0.45, from 0 to 20 stored layers).
constexpr SlackFractions kSystemHeapSlack{0.75, 0.9, 0.5};
// tcmalloc's size classes reuse the holes: every measured step stayed under its estimate without slack
// (fractions -0.58 to -0.04: SmolLM2-135M fp32 lora-bp with 0, 10, 20 and all 30 layers stored, Qwen2.5-0.5B
// q4_0 and q8_0 lora-bp with and without recomputation, q4_0 mezo; TinyLlama-1.1B q4_0 lora-bp), so only the
// fixed part remains.
constexpr SlackFractions kTcmallocSlack{0.0, 0.0, 0.0};
constexpr int64_t kSlackFixed = 16 << 20;

const SlackFractions& SlackFor(HeapAllocator allocator) {
  return allocator == HeapAllocator::kTcmalloc ? kTcmallocSlack : kSystemHeapSlack;
}

bool Has(const lora::LoraConfig& c, Projection p) {
  return std::find(c.targets.begin(), c.targets.end(), p) != c.targets.end();
}

// Number of trainable adapter parameters (A and B, or BitFit's bias, of every adapted projection of every
// adapted layer).
int64_t LoraParameters(const model::ModelConfig& m, const lora::LoraConfig& c) {
  const int64_t layers = c.layers.empty() ? m.num_hidden_layers : static_cast<int64_t>(c.layers.size());
  int64_t per_layer = 0;
  for (Projection p : c.targets) {
    const model::ProjectionFeatures f = model::FeaturesOf(m, p);
    per_layer += c.kind == lora::AdapterKind::kBias ? f.out : c.rank * (f.in + f.out);
  }
  return layers * per_layer;
}

// Element counts of one decoder layer's activations for n tokens in sequences of t (model/llama.cpp).
struct LayerShapes {
  int64_t n, t, rows;   // tokens, sequence length, sequences
  int64_t h, q, kv, i;  // hidden, q_dim, kv_dim, intermediate
  int64_t scores;       // attention scores: rows × heads × t × t
  int64_t capped;       // score-sized tensors a soft-cap adds (z / cap and its tanh, or tanh and the slope)
  bool qk_norm;         // q and k are RMS-normed (one more copy of each)
  int64_t norms;        // RMSNorms of hidden states in the block (ModelConfig::norms), each keeping its input
  int64_t mlp_inputs;   // (tokens × intermediate) tensors the MLP's activation keeps: gate and up, or one
};

LayerShapes Shapes(const model::ModelConfig& m, int64_t rows, int64_t t) {
  return {rows * t,
          t,
          rows,
          m.hidden_size,
          m.q_dim(),
          m.kv_dim(),
          m.intermediate_size,
          rows * m.num_attention_heads * t * t,
          m.attention_softcap > 0 ? 2 * rows * m.num_attention_heads * t * t : 0,
          m.qk_norm != model::QkNorm::kNone,
          m.norms.count(),
          m.gated_mlp ? 2 : 1};
}

// Largest set of tensors alive at once inside one layer's forward without autograd. Attention: the
// residual input, the normed input and an adapter's sum, q/k/v, their RoPE copies and halves, the folded
// q, plus three score-sized tensors (scores, masked scores, probabilities: measured with 4 batched copies
// on the tiny model, where attention is the peak). MLP: gate, up, silu(gate), their product and one more
// tensor of that size (measured: 8 batched copies of 256 tokens on Qwen2.5-0.5B q4_0 peaked at 205 MiB of
// tensors, 4 such tensors would be 160 MiB) next to the residual.
// `mlp_rows` > 0: the MLP runs that many tokens at a time (ForwardOptions::mlp_chunk_tokens).
int64_t InferenceLayerPeak(const LayerShapes& s, int64_t mlp_rows = 0) {
  const int64_t qk_norm = s.qk_norm ? s.n * (s.q + s.kv) : 0;  // the normed q and k beside the projected ones
  const int64_t attention = s.n * (3 * s.h + 4 * s.q + 4 * s.kv) + qk_norm + 3 * s.scores + s.capped;
  const int64_t rows = mlp_rows > 0 ? std::min(mlp_rows, s.n) : s.n;
  const int64_t mlp = s.n * (2 * s.h) + 5 * rows * s.i;
  return std::max(attention, mlp);
}

// What autograd keeps per layer when a LoRA adapter trains on a frozen base (counted from the saved
// tensors of each op in model/llama.cpp and model/kernels.cpp): each RmsNorm's input (Llama: the layer input
// and the post-attention residual), the rotated q and k and v (attention rebuilds its probabilities in
// backward), q and k before their norms (Qwen3, OLMo 2), gate and up (SwiGLU), and each adapted projection's input
// (once per distinct input) and rank-sized middle.
int64_t SavedPerLayer(const LayerShapes& s, const lora::LoraConfig& c) {
  int64_t per_token = s.norms * s.h + s.q + 2 * s.kv + s.mlp_inputs * s.i;
  if (s.qk_norm) per_token += s.q + s.kv;
  if (Has(c, Projection::kQ) || Has(c, Projection::kK) || Has(c, Projection::kV) || Has(c, Projection::kQkv)) {
    per_token += s.h;
  }
  if (Has(c, Projection::kO)) per_token += s.q;
  if (Has(c, Projection::kGate) || Has(c, Projection::kUp) || Has(c, Projection::kGateUp)) per_token += s.h;
  if (Has(c, Projection::kDown)) per_token += s.i;
  if (c.kind == lora::AdapterKind::kLora) per_token += c.rank * static_cast<int64_t>(c.targets.size());
  return s.n * per_token;
}

// Transients of one layer's backward besides its saved set: the gradients flowing through it (about a
// saved set's worth) and attention's rebuilt probabilities, their gradient and one product of the two.
int64_t LayerBackwardTransient(const LayerShapes& s, int64_t saved) { return saved + 3 * s.scores + s.capped; }

// Rows of one decoded weight tile (model/frozen_linear.h) of a matrix with `cols` columns.
int64_t TileRows(int64_t cols) {
  return std::max<int64_t>(16, model::kWeightTileBytes / (kFloat * std::max<int64_t>(cols, 1)) / 16 * 16);
}

// Cross-entropy (model/kernels.cpp), which runs after the last layer's transients are freed: the
// flattened hidden states it reads, and per vocabulary tile the decoded LM-head tile, its logits and
// their exponentials for a chunk of rows (two more with a final soft-cap: the tanh and its slope), plus the
// hidden states' gradient (backward). The
// forward-gradient version stacks primal and tangent rows, so its logits are twice as tall.
int64_t CrossEntropyPeak(const model::ModelConfig& m, int64_t n, int64_t chunk, bool backward) {
  const int64_t rows = std::min(chunk > 0 ? chunk : n, n);
  const int64_t e = m.embedding_dim();  // the LM head's input width
  const int64_t tile = std::min(TileRows(e), m.vocab_size);
  const int64_t logit_copies = m.final_logit_softcap > 0 ? 5 : 3;
  return tile * e + logit_copies * rows * tile + (backward ? 3 : 1) * n * e;
}

// PEPITA's output error and modulation (optim/pepita.cpp): the clean final hidden states, the offset F e, and per
// chunk of scored rows the logits with their log-softmax (the error overwrites it), one generated block of F's
// columns (1 MiB) and the chunk's F e. `chunk` 0 = the trainer's automatic size (16 MiB of logits).
int64_t PepitaErrorPeak(const model::ModelConfig& m, int64_t n, int64_t chunk) {
  const int64_t rows =
      std::min(chunk > 0 ? chunk : std::max<int64_t>(1, (int64_t{16} << 20) / (kFloat * m.vocab_size)), n);
  return 2 * n * m.hidden_size + 2 * rows * m.vocab_size + (int64_t{1} << 20) / kFloat + rows * m.hidden_size;
}

// Elements of every adapted projection's output for n tokens: what PEPITA keeps from its clean pass.
int64_t AdaptedOutputs(const model::ModelConfig& m, const lora::LoraConfig& c, int64_t n) {
  const int64_t layers = c.layers.empty() ? m.num_hidden_layers : static_cast<int64_t>(c.layers.size());
  int64_t per_token = 0;
  for (Projection p : c.targets) per_token += model::FeaturesOf(m, p).out;
  return layers * n * per_token;
}

// One decoder layer with stacked tangents (model/kernels.h), `slices` = 1 + tangents per pass. Attention:
// the normed input, q/k/v with their RoPE copies and the output, per slice, and the primal scores and
// probabilities next to one direction's score tangent and its product with them. MLP (over `mlp_rows`
// tokens at a time): gate, up and their SwiGLU per slice, σ, silu and silu'·up of the primal, and two
// products per direction.
int64_t TangentLayerPeak(const LayerShapes& s, int64_t slices, int64_t mlp_rows) {
  const int64_t attention = slices * s.n * (2 * s.h + 4 * s.q + 4 * s.kv) + 5 * s.scores + s.capped;
  const int64_t rows = mlp_rows > 0 ? std::min(mlp_rows, s.n) : s.n;
  const int64_t mlp = slices * s.n * 2 * s.h + (5 * slices + 4) * rows * s.i;
  return std::max(attention, mlp);
}

// The batched forward gradient's loss: the stacked final hidden states, the loss's gradient and the
// per-direction products, next to the primal cross-entropy.
int64_t CrossEntropyPeakTangents(const model::ModelConfig& m, int64_t n, int64_t chunk, int64_t slices) {
  return 2 * slices * n * m.hidden_size + CrossEntropyPeak(m, n, chunk, false);
}

// The decoded tile of the widest frozen matrix a layer multiplies by (none for fp32 weights, which are
// used in place).
int64_t LinearTile(const model::ModelConfig& m) {
  const int64_t widest = std::max({m.hidden_size, m.intermediate_size, m.q_dim()});
  return TileRows(widest) * widest;
}

std::string Mib(int64_t bytes) { return absl::StrFormat("%.1f", static_cast<double>(bytes) / (1 << 20)); }

}  // namespace

MemoryPlan EstimatePlan(const PlanRequest& r, const std::string& variant, int64_t micro_batch, bool recompute,
                        int64_t ce_chunk_tokens, int64_t mlp_chunk_tokens, int64_t tangents_per_pass,
                        int64_t stored_layers, bool stream_weights) {
  const model::ModelConfig& m = r.model;
  MemoryPlan plan;
  plan.method = r.method;
  plan.variant = variant;
  plan.micro_batch = micro_batch;
  plan.recompute = recompute;
  plan.stored_layers =
      r.method == Method::kLoraBp && recompute ? std::clamp<int64_t>(stored_layers, 0, r.model.num_hidden_layers) : 0;
  plan.ce_chunk_tokens = ce_chunk_tokens;
  const bool batched_jvp = r.method == Method::kFwdGrad && variant == "batched-jvp";
  plan.mlp_chunk_tokens =
      (r.method == Method::kMezo || r.method == Method::kKSeed || r.method == Method::kPepita || batched_jvp)
          ? mlp_chunk_tokens
          : 0;
  const int64_t perturbations = std::max<int64_t>(r.perturbations, 1);
  plan.tangents_per_pass =
      batched_jvp ? (tangents_per_pass > 0 ? std::min(tangents_per_pass, perturbations) : perturbations) : 0;
  plan.runtime_bytes = r.runtime_bytes >= 0 ? r.runtime_bytes : CurrentRssBytes();
  plan.heap = r.heap;
  plan.data_bytes = r.data_bytes;
  plan.weight_bytes = r.weight_bytes >= 0 ? r.weight_bytes : kFloat * m.NumParameters();
  plan.stream_weights = stream_weights && r.streamed_weight_bytes >= 0 && !r.full_parameters;
  if (plan.stream_weights) plan.weight_bytes = r.streamed_weight_bytes;

  // The projections the adapter will have (PlanMemory maps them too; a caller forcing settings may not have):
  // "all" lists the fused q|k|v and gate|up beside the parts, which a model has one way or the other.
  lora::LoraConfig adapter = r.lora;
  if (!r.full_parameters) adapter.targets = lora::TargetsFor(m, r.lora.targets);
  const int64_t p = r.full_parameters ? 0 : LoraParameters(m, adapter);
  const LayerShapes s = Shapes(m, micro_batch, r.seq_len);
  const int64_t layers = m.num_hidden_layers;
  int64_t elements = 0;         // activation elements at the peak
  int64_t stored_elements = 0;  // of which the stored layers' saved sets of a partial plan
  switch (r.method) {
    case Method::kLoraBp: {
      // Flat parameters, gradient, two AdamW moments, and the update's temporary.
      plan.trainable_bytes = kFloat * 5 * p;
      const int64_t saved = SavedPerLayer(s, adapter);
      const int64_t ce = CrossEntropyPeak(m, s.n, ce_chunk_tokens, true);
      const int64_t transient = LayerBackwardTransient(s, saved);
      // Layers below the lowest adapted one record no graph: nothing there requires grad.
      const int64_t graph_layers = layers - std::clamp<int64_t>(lora::FirstAdaptedLayer(adapter), 0, layers);
      const int64_t stored = std::min(plan.stored_layers, graph_layers);
      if (recompute && stored == 0) {
        // Every layer's input; in backward either one layer's rebuilt saved set next to its transients or
        // the cross-entropy's backward, whichever is larger.
        elements = graph_layers * s.n * s.h + std::max(saved + transient, ce);
      } else if (recompute) {
        // The recomputed layers' inputs and the stored layers' saved sets; in backward the stored layers
        // go first (the cross-entropy's backward next to their transients), then one rebuilt layer at a
        // time next to its transients.
        const int64_t recomputed = graph_layers - stored;
        stored_elements = stored * saved;
        elements = recomputed * s.n * s.h + stored_elements + std::max(transient + ce, saved + transient);
      } else {
        // Every layer's saved set, the transients of one layer's backward, and the cross-entropy backward.
        elements = graph_layers * saved + transient + ce;
      }
      break;
    }
    case Method::kFwdGrad: {
      // Flat, tangent, the step's dense estimate, the run's accumulated estimate and one regenerated z.
      plan.trainable_bytes = kFloat * 5 * p;
      if (batched_jvp) {
        // The residual stream with its tangents, then the larger of a layer's and the loss's transients.
        const int64_t slices = 1 + plan.tangents_per_pass;
        elements = slices * s.n * s.h + std::max(TangentLayerPeak(s, slices, plan.mlp_chunk_tokens),
                                                 CrossEntropyPeakTangents(m, s.n, ce_chunk_tokens, slices));
      } else {
        elements = s.n * s.h + std::max(InferenceLayerPeak(s), CrossEntropyPeak(m, s.n, ce_chunk_tokens, false));
      }
      break;
    }
    case Method::kMezo:
    case Method::kKSeed: {
      const int64_t params = r.full_parameters ? m.NumParameters() : p;
      if (variant == "batched") {
        // 2q copies of the batch in one forward (optim::BatchedSpsa): the copies' residual stream and a
        // layer's transients for all of them, or the copies' final hidden states next to one copy's loss.
        const int64_t copies = 2 * std::max<int64_t>(r.perturbations, 1);
        const LayerShapes all = Shapes(m, micro_batch * copies, r.seq_len);
        plan.trainable_bytes = kFloat * p;
        elements = all.n * all.h + std::max(InferenceLayerPeak(all, plan.mlp_chunk_tokens),
                                            all.n * all.h + CrossEntropyPeak(m, s.n, ce_chunk_tokens, false));
        break;
      }
      // The parameters (already counted with the weights when they are the weights) and, for an exact
      // restore, one copy of them.
      plan.trainable_bytes = kFloat * ((r.full_parameters ? 0 : p) + (variant == "exact-restore" ? params : 0));
      // The residual stream, then the larger of a layer's transients and the cross-entropy; with an
      // upper-layer adapter, also the lower layers' output kept for the step's probes (LlamaModel::BaseLayers).
      const bool base_prefix = !r.full_parameters && lora::FirstAdaptedLayer(adapter) > 0;
      elements = (base_prefix ? 2 : 1) * s.n * s.h + std::max(InferenceLayerPeak(s, plan.mlp_chunk_tokens),
                                                              CrossEntropyPeak(m, s.n, ce_chunk_tokens, false));
      break;
    }
    case Method::kPepita: {
      // Flat parameters, the update and its scaled copy.
      plan.trainable_bytes = kFloat * 3 * p;
      const int64_t widest_out = std::max({m.hidden_size, m.q_dim(), m.kv_dim(), m.intermediate_size});
      const int64_t error = PepitaErrorPeak(m, s.n, ce_chunk_tokens);
      if (variant == "mem") {
        // MEMPEPITA: pass 1 keeps nothing but the error's inputs; passes 2 and 3 run as one forward over the
        // batch twice (clean rows, modulated rows): the offset and its zero-padded copy, the doubled residual
        // stream, a doubled layer's transients and one projection's δ.
        const LayerShapes both = Shapes(m, micro_batch * 2, r.seq_len);
        const int64_t paired =
            3 * s.n * s.h + both.n * both.h + InferenceLayerPeak(both, plan.mlp_chunk_tokens) + s.n * widest_out;
        elements = std::max(s.n * s.h + std::max(InferenceLayerPeak(s, plan.mlp_chunk_tokens), error), paired);
      } else {
        // PEPITA: every adapted projection's clean output, kept from pass 1 to pass 2, next to the larger of the
        // error's peak and pass 2's (the offset, the residual stream, a layer's transients and one δ).
        stored_elements = AdaptedOutputs(m, adapter, s.n);
        elements = stored_elements +
                   std::max(error, 2 * s.n * s.h + InferenceLayerPeak(s, plan.mlp_chunk_tokens) + s.n * widest_out);
      }
      break;
    }
  }
  // Slack scales with the step's own temporaries.
  const SlackFractions& slack = SlackFor(r.heap);
  const double fraction = recompute ? slack.recompute : slack.temporaries;
  const double slack_elements =
      fraction * static_cast<double>(elements - stored_elements) + slack.stored * static_cast<double>(stored_elements);
  plan.slack_bytes = kSlackFixed + static_cast<int64_t>(kFloat * slack_elements);
  if (r.weights_decoded_per_tile) elements += LinearTile(m);
  plan.activation_bytes = kFloat * elements;
  return plan;
}

std::vector<std::string> PlanVariants(Method method, bool full_parameters) {
  switch (method) {
    case Method::kLoraBp:
      return {""};
    case Method::kFwdGrad:
      // Forward-mode AD one tangent at a time (FwdGradOptions::Mode::kForwardAD) is slower than a batched
      // pass of one tangent and needs more memory, so the planner never picks it.
      return {"batched-jvp", "central-difference"};
    case Method::kMezo:
      // Batched probes (an adapter's perturbed copies, never writing θ), then MeZO's own in-place restore;
      // exact restore is not needed for MeZO.
      if (full_parameters) return {"in-place-restore"};
      return {"batched", "in-place-restore"};
    case Method::kKSeed:
      if (full_parameters) return {"exact-restore", "in-place-restore"};
      return {"batched", "exact-restore", "in-place-restore"};
    case Method::kPepita:
      // PEPITA keeps the clean outputs (two forwards); MEMPEPITA recomputes them (three forwards, less memory).
      return {"pepita", "mem"};
  }
  return {""};
}

namespace {

// The settings PlanMemory tries, each list fastest first.
struct SearchSpace {
  struct Recompute {
    bool on;
    int64_t stored_layers;
  };
  std::vector<std::string> variants;
  std::vector<Recompute> recompute_options;
  std::vector<int64_t> micro_batches;
  std::vector<int64_t> tangent_groups;
  std::vector<int64_t> mlp_chunks;
  std::vector<int64_t> ce_chunks;
  std::vector<bool> stream_weights;
};

SearchSpace BuildSearchSpace(const PlanRequest& r) {
  SearchSpace space;
  space.variants = PlanVariants(r.method, r.full_parameters);
  // lora-bp can accumulate over smaller micro-batches (halving); the other methods run the whole batch.
  space.micro_batches = {r.batch};
  while (r.method == Method::kLoraBp && space.micro_batches.back() > 1) {
    space.micro_batches.push_back(space.micro_batches.back() / 2);
  }
  // The cross-entropy's memory is bounded by its vocabulary tiles: all rows in one chunk, then halves.
  space.ce_chunks = {0};
  for (int64_t c = r.seq_len * r.batch / 2; c >= 16; c /= 2) space.ce_chunks.push_back(c);
  // mezo / kseed can run the MLP a chunk of tokens at a time, at some speed (15-30% on Qwen2.5-0.5B).
  space.mlp_chunks = {0};
  if (r.method == Method::kMezo || r.method == Method::kKSeed || r.method == Method::kFwdGrad ||
      r.method == Method::kPepita) {
    for (int64_t c = 128; c >= 32 && c < r.seq_len * r.batch; c /= 2) space.mlp_chunks.push_back(c);
  }
  // fwdgrad's batched pass carries all tangents, then halves (each pass re-runs the primal).
  space.tangent_groups = {0};
  if (r.method == Method::kFwdGrad) {
    space.tangent_groups = {std::max<int64_t>(r.perturbations, 1)};
    while (space.tangent_groups.back() > 1) space.tangent_groups.push_back(space.tangent_groups.back() / 2);
  }
  // Streamed weights last at each setting: page faults on every pass cost Qwen2.5-0.5B q4_0 0-7% (mezo)
  // and 8-12% (lora-bp, which reads the weights again in backward), less than any setting above.
  space.stream_weights = {false};
  if (r.streamed_weight_bytes >= 0 && !r.full_parameters) space.stream_weights.push_back(true);
  // lora-bp: no recomputation, then recomputation of more and more layers (the last ones keep their
  // activations: partial checkpointing spends a budget between the two on speed), then of all of them.
  space.recompute_options = {{false, 0}};
  if (r.method == Method::kLoraBp) {
    for (int64_t stored = r.model.num_hidden_layers - 1; stored >= 0; --stored) {
      space.recompute_options.push_back({true, stored});
    }
  }
  return space;
}

// The first configuration of `space` that fits the budget; tracks the lightest one seen in `smallest` for
// the refusal's message.
std::optional<MemoryPlan> FirstFit(const PlanRequest& r, const SearchSpace& space,
                                   std::optional<MemoryPlan>& smallest) {
  for (const std::string& variant : space.variants) {
    for (const SearchSpace::Recompute& recompute : space.recompute_options) {
      for (int64_t mb : space.micro_batches) {
        for (int64_t tangents : variant == "batched-jvp" ? space.tangent_groups : std::vector<int64_t>{0}) {
          for (int64_t mlp : space.mlp_chunks) {
            for (int64_t chunk : space.ce_chunks) {
              for (bool stream : space.stream_weights) {
                MemoryPlan plan =
                    EstimatePlan(r, variant, mb, recompute.on, chunk, mlp, tangents, recompute.stored_layers, stream);
                if (r.budget_bytes == 0 || plan.total_bytes() <= r.budget_bytes) return plan;
                if (!smallest || plan.total_bytes() < smallest->total_bytes()) smallest = plan;
              }
            }
          }
        }
      }
    }
  }
  return std::nullopt;
}

}  // namespace

absl::StatusOr<MemoryPlan> PlanMemory(const PlanRequest& r) {
  if (r.seq_len < 2 || r.batch < 1) return absl::InvalidArgumentError("plan needs seq_len >= 2 and batch >= 1");
  if (r.seq_len > kMaxPlanTokens / r.batch) {
    return absl::InvalidArgumentError(StrCat("plan: seq_len x batch (", r.seq_len, " x ", r.batch, ") is more than ",
                                             kMaxPlanTokens, " tokens per step"));
  }
  if (r.perturbations < 0 || r.perturbations > kMaxPlanPerturbations) {
    return absl::InvalidArgumentError(
        StrCat("plan: perturbations must be in [0, ", kMaxPlanPerturbations, "], got ", r.perturbations));
  }
  if (r.budget_bytes < 0) return absl::InvalidArgumentError("the memory budget must be >= 0");
  if (r.data_bytes < 0 || r.data_bytes > kMaxByteSize) {
    return absl::InvalidArgumentError(StrCat("plan: data_bytes must be in [0, 2^50], got ", r.data_bytes));
  }
  // The sizes below multiply the model's dimensions: they are only bounded once the config is valid.
  SEEDLING_RETURN_IF_ERROR(r.model.Validate());
  if (r.full_parameters &&
      (r.method == Method::kLoraBp || r.method == Method::kFwdGrad || r.method == Method::kPepita)) {
    return absl::InvalidArgumentError(
        StrCat(optim::MethodName(r.method), " trains a LoRA adapter; full parameters are for mezo and kseed"));
  }
  PlanRequest request = r;
  if (!r.full_parameters) {
    // The projections the adapter will have (lora::LoraAdapter::Create maps the targets the same way).
    request.lora.targets = lora::TargetsFor(r.model, r.lora.targets);
    SEEDLING_RETURN_IF_ERROR(request.lora.Validate(r.model));
  }
  if (request.runtime_bytes < 0) request.runtime_bytes = CurrentRssBytes();

  std::optional<MemoryPlan> smallest;
  std::optional<MemoryPlan> fit = FirstFit(request, BuildSearchSpace(request), smallest);
  if (fit) return *fit;
  return absl::ResourceExhaustedError(StrCat(optim::MethodName(r.method), " does not fit a budget of ",
                                             Mib(r.budget_bytes), " MiB: the lightest plan needs ",
                                             Mib(smallest->total_bytes()), " MiB (", smallest->Describe(), ")"));
}

std::string MemoryPlan::Describe() const {
  std::string settings = optim::MethodName(method);
  if (!variant.empty()) settings += StrCat(" (", variant, ")");
  settings +=
      StrCat(": micro-batch ", micro_batch, ", recompute ", recompute ? "on" : "off",
             stored_layers > 0 ? StrCat(" (the last ", stored_layers, " layers stored)") : std::string(), ", CE chunk ",
             ce_chunk_tokens > 0 ? StrCat(ce_chunk_tokens, " tokens") : std::string("all tokens"),
             mlp_chunk_tokens > 0 ? StrCat(", MLP chunk ", mlp_chunk_tokens, " tokens") : std::string(),
             tangents_per_pass > 0 ? StrCat(", ", tangents_per_pass, " tangents per pass") : std::string(),
             stream_weights ? ", weights streamed" : "", "; ", Mib(total_bytes()), " MiB = runtime ",
             Mib(runtime_bytes), data_bytes > 0 ? StrCat(" + data ", Mib(data_bytes)) : std::string(), " + weights ",
             Mib(weight_bytes), " + trainable ", Mib(trainable_bytes), " + activations ", Mib(activation_bytes),
             " + slack ", Mib(slack_bytes), " (", HeapAllocatorName(heap), " heap)");
  return settings;
}

std::string MemoryPlan::ToJson() const {
  return absl::StrFormat(
      R"({"method":"%s","variant":"%s","micro_batch":%d,"recompute":%s,"stored_layers":%d,"ce_chunk_tokens":%d,)"
      R"("mlp_chunk_tokens":%d,)"
      R"("tangents_per_pass":%d,"stream_weights":%s,)"
      R"("runtime_bytes":%d,"data_bytes":%d,"weight_bytes":%d,"trainable_bytes":%d,"activation_bytes":%d,"slack_bytes":%d,)"
      R"("total_bytes":%d,"heap":"%s"})",
      optim::MethodName(method), variant, micro_batch, recompute ? "true" : "false", stored_layers, ce_chunk_tokens,
      mlp_chunk_tokens, tangents_per_pass, stream_weights ? "true" : "false", runtime_bytes, data_bytes, weight_bytes,
      trainable_bytes, activation_bytes, slack_bytes, total_bytes(), HeapAllocatorName(heap));
}

}  // namespace seedling::client
