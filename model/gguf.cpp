#include "model/gguf.h"

#include <ATen/ATen.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <set>
#include <span>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/check.h"
#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/families/family.h"
#include "model/gguf_model.h"
#include "model/internal/config_json.h"
#include "model/internal/gguf_format.h"
#include "model/kernels.h"
#include "model/torch_status.h"

namespace seedling::model {
namespace {

using internal::GgmlType;
using internal::GgufValueType;

// GGUF stores everything little-endian; so does every target Seedling builds for, so values are
// copied as they are in memory.
static_assert(std::endian::native == std::endian::little, "the GGUF writer assumes a little-endian host");
static_assert(kGgufAlignment == internal::kGgufDefaultAlignment);

// general.quantization_version of files with block-quantized tensors (ggml's GGML_QNT_VERSION).
constexpr uint32_t kQuantizationVersion = 2;

uint64_t AlignUp(uint64_t n) { return (n + kGgufAlignment - 1) / kGgufAlignment * kGgufAlignment; }

// Bytes in GGUF's encoding: fixed-width little-endian scalars, strings as uint64 length + bytes.
class Encoder {
 public:
  void U32(uint32_t v) { Raw(&v, sizeof(v)); }
  void U64(uint64_t v) { Raw(&v, sizeof(v)); }
  void I32(int32_t v) { Raw(&v, sizeof(v)); }
  void F32(float v) { Raw(&v, sizeof(v)); }
  void Bool(bool v) { bytes_.push_back(v ? '\1' : '\0'); }
  void Str(std::string_view s) {
    U64(s.size());
    bytes_.append(s);
  }
  void Raw(const void* p, size_t n) { bytes_.append(static_cast<const char*>(p), n); }
  void PadTo(uint64_t size) { bytes_.resize(size, '\0'); }
  std::string& bytes() { return bytes_; }

 private:
  std::string bytes_;
};

// The key-value section. llama.cpp checks every value's type against the one it expects (a uint64
// where it reads uint32 fails the load), so each key is written with the exact type llama.cpp's
// loader reads.
class Metadata {
 public:
  void U32(std::string_view key, uint64_t v) {
    Key(key, GgufValueType::kUint32);
    out_.U32(static_cast<uint32_t>(v));
  }
  void F32(std::string_view key, double v) {
    Key(key, GgufValueType::kFloat32);
    out_.F32(static_cast<float>(v));
  }
  void Bool(std::string_view key, bool v) {
    Key(key, GgufValueType::kBool);
    out_.Bool(v);
  }
  void Str(std::string_view key, std::string_view v) {
    Key(key, GgufValueType::kString);
    out_.Str(v);
  }
  void StrArray(std::string_view key, const std::vector<std::string>& v) {
    ArrayHeader(key, GgufValueType::kString, v.size());
    for (const std::string& s : v) out_.Str(s);
  }
  void I32Array(std::string_view key, std::span<const int32_t> v) {
    ArrayHeader(key, GgufValueType::kInt32, v.size());
    for (int32_t x : v) out_.I32(x);
  }
  void F32Array(std::string_view key, std::span<const float> v) {
    ArrayHeader(key, GgufValueType::kFloat32, v.size());
    for (float x : v) out_.F32(x);
  }
  uint64_t count() const { return count_; }
  std::string& bytes() { return out_.bytes(); }

 private:
  void Key(std::string_view key, GgufValueType type) {
    out_.Str(key);
    out_.U32(static_cast<uint32_t>(type));
    ++count_;
  }
  void ArrayHeader(std::string_view key, GgufValueType element, uint64_t n) {
    Key(key, GgufValueType::kArray);
    out_.U32(static_cast<uint32_t>(element));
    out_.U64(n);
  }

  Encoder out_;
  uint64_t count_ = 0;
};

// One tensor of the file: where its data comes from and how the file stores it.
struct TensorPlan {
  std::string name;                          // llama.cpp name, e.g. "blk.3.attn_q.weight"
  at::Tensor source;                         // shares storage with the caller's tensor; never written to
  std::vector<int64_t> shape;                // logical, PyTorch order; GGUF stores it reversed (ne[0] fastest)
  WeightFormat format = WeightFormat::kF32;  // in the file: kF32, kF16, kQ8_0 or kQ4_0
  int64_t rope_heads = 0;                    // > 0: permute rows for GGML's interleaved RoPE, in this many heads
  int64_t qkv_heads = 0;                     // > 0: per-head q | k | v rows to blocks (GgufWeightSlot::qkv_heads)
};

// How GGUF names a weight format: the ggml type of its tensors and the general.file_type
// (llama_ftype) of a model whose matrices were requested in it.
struct GgufCodes {
  GgmlType type;
  uint32_t file_type;
};
GgufCodes CodesOf(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32:
      return {GgmlType::kF32, internal::kFileTypeAllF32};
    case WeightFormat::kF16:
      return {GgmlType::kF16, internal::kFileTypeMostlyF16};
    case WeightFormat::kBF16:
      return {GgmlType::kBF16, internal::kFileTypeMostlyBF16};
    case WeightFormat::kQ8_0:
      return {GgmlType::kQ8_0, internal::kFileTypeMostlyQ8_0};
    case WeightFormat::kQ4_0:
      return {GgmlType::kQ4_0, internal::kFileTypeMostlyQ4_0};
  }
  SEEDLING_CHECK(false, "unknown weight format");
  return {};
}

// Bytes of the tensor in the file (rows of the last dimension, each RowBytes long).
uint64_t FileBytes(const TensorPlan& p) {
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < p.shape.size(); ++d) rows *= p.shape[d];
  return static_cast<uint64_t>(rows * RowBytes(p.format, p.shape.back()));
}

// What llama.cpp's graph for one architecture can express (an unexpected or missing tensor fails its load).
struct GgufGraphRules {
  std::string_view arch;
  bool rope_freqs = false;         // Llama 3 RoPE scaling as rope_freqs.weight factors (llama only)
  bool qkv_bias = false;           // has q/k/v bias slots
  bool requires_qkv_bias = false;  // ... and requires them (qwen2)
  bool o_mlp_bias = false;         // has o_proj and MLP bias slots (llama)
  bool q_is_hidden = false;        // sizes q_proj as hidden x hidden (qwen2, olmo2)
  bool tied_only = false;          // always reads the output projection from token_embd.weight (gemma2)
  bool untied_only = false;        // requires output.weight (olmo2, phi3, gptneox, phi2)
  // Reads q | k | v as one attn_qkv (phi3, gptneox) and gate | up as one ffn_up (phi3); the others read the parts.
  bool fused_qkv = false;
  bool fused_gate_up = false;
  bool longrope = false;  // LongRoPE as rope_factors_{short,long}.weight and rope.scaling.attn_factor (phi3)
  // LayerNorms with biases and a plain GELU MLP (gptneox, gpt2, phi2); the others have RMSNorms and a gated MLP.
  bool layer_norm_block = false;
  bool partial_rotary = false;        // rotates rope.dimension_count of each head's dimensions (gptneox, phi2)
  bool learned_positions = false;     // position_embd.weight instead of RoPE (gpt2)
  bool requires_o_mlp_bias = false;   // requires attn_output and ffn biases (gptneox, gpt2, phi2)
  bool shared_norm_parallel = false;  // attention and the MLP side by side from one attn_norm (phi2)
  bool output_bias = false;           // requires output.bias (phi2); the others have none
};

constexpr GgufGraphRules kGraphRules[] = {
    {"llama", true, true, false, true, false},
    {"qwen2", false, true, true, false, true},
    {"qwen3", false, false, false, false, false},
    {"olmo2", false, false, false, false, true, false, true},
    {"gemma2", false, false, false, false, false, true},
    {"gemma3", false, false, false, false, false},
    {.arch = "phi3",
     .q_is_hidden = true,
     .untied_only = true,
     .fused_qkv = true,
     .fused_gate_up = true,
     .longrope = true},
    {.arch = "gptneox",
     .qkv_bias = true,
     .requires_qkv_bias = true,
     .o_mlp_bias = true,
     .untied_only = true,
     .fused_qkv = true,
     .layer_norm_block = true,
     .partial_rotary = true,
     .requires_o_mlp_bias = true},
    {.arch = "gpt2",
     .qkv_bias = true,
     .requires_qkv_bias = true,
     .o_mlp_bias = true,
     .fused_qkv = true,
     .layer_norm_block = true,
     .learned_positions = true,
     .requires_o_mlp_bias = true},
    {.arch = "phi2",
     .qkv_bias = true,
     .requires_qkv_bias = true,
     .o_mlp_bias = true,
     .q_is_hidden = true,
     .untied_only = true,
     .layer_norm_block = true,
     .partial_rotary = true,
     .requires_o_mlp_bias = true,
     .shared_norm_parallel = true,
     .output_bias = true},
};

// What llama.cpp's Gemma graphs fix (model/gguf_config.h GgufGemmaGraph) must be what `c` says.
absl::Status CheckGemmaExport(const ModelConfig& c, const GgufGemmaGraph& g) {
  const std::string why = StrCat(" cannot be exported: llama.cpp's ", g.arch, " architecture ");
  if (!c.sliding_window || c.sliding_window_pattern != g.pattern) {
    return absl::InvalidArgumentError(StrCat(c.architecture, " without windowed layers and one global layer in every ",
                                             g.pattern, why, "fixes that pattern"));
  }
  if (c.rope_local_theta != g.local_theta) {
    return absl::InvalidArgumentError(StrCat(c.architecture, " with rope_local_base_freq ", c.rope_local_theta, why,
                                             g.local_theta > 0
                                                 ? StrCat("fixes the local layers' RoPE base at ", g.local_theta)
                                                 : std::string("has one RoPE base for all layers")));
  }
  const double scale = g.QueryScale(c);
  if (std::abs(c.attention_scale - scale) > 1e-9 * scale) {
    return absl::InvalidArgumentError(
        StrCat(c.architecture, " with query_pre_attn_scalar ", 1.0 / (c.attention_scale * c.attention_scale), why,
               "fixes the query scale at ", scale, " (query_pre_attn_scalar ", 1.0 / (scale * scale), ")"));
  }
  const bool capped = c.attention_softcap > 0 && c.final_logit_softcap > 0;
  const bool uncapped = c.attention_softcap == 0 && c.final_logit_softcap == 0;
  if (g.softcaps ? !capped : !uncapped) {
    return absl::InvalidArgumentError(StrCat(c.architecture, " with attn_logit_softcapping ", c.attention_softcap,
                                             " and final_logit_softcapping ", c.final_logit_softcap, why,
                                             g.softcaps ? "always soft-caps both" : "soft-caps neither"));
  }
  return absl::OkStatus();
}

absl::Status CheckExpressible(const ModelConfig& c, const GgufGraphRules& r) {
  const std::string who = StrCat(c.architecture, " ");
  const std::string why = StrCat(" cannot be exported: llama.cpp's ", r.arch, " architecture ");
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3 && !r.rope_freqs) {
    return absl::InvalidArgumentError(
        StrCat(who, "with llama3 rope_scaling", why,
               "has no RoPE frequency factors (rope_freqs.weight); only 'linear' scaling or none is supported"));
  }
  if (c.rope_scaling.type == RopeScaling::Type::kLongRope && !r.longrope) {
    return absl::InvalidArgumentError(StrCat(who, "with longrope rope_scaling", why, "has no LongRoPE factors"));
  }
  if (c.fused.qkv != r.fused_qkv || c.fused.gate_up != r.fused_gate_up) {
    return absl::InvalidArgumentError(StrCat(
        who, "with q, k, v ", c.fused.qkv ? "fused" : "apart", " and gate, up ", c.fused.gate_up ? "fused" : "apart",
        why, "reads q, k, v ", r.fused_qkv ? "fused" : "apart", " and gate, up ", r.fused_gate_up ? "fused" : "apart"));
  }
  const bool layer_norm_block = c.norm_kind == NormKind::kLayerNorm && !c.gated_mlp;
  if (layer_norm_block != r.layer_norm_block) {
    return absl::InvalidArgumentError(
        StrCat(who, "with its norms and MLP", why,
               r.layer_norm_block ? "has LayerNorms and a plain MLP" : "has RMSNorms and a gated MLP"));
  }
  if ((c.positions == PositionKind::kLearned) != r.learned_positions) {
    return absl::InvalidArgumentError(StrCat(who, "with its position embeddings", why,
                                             r.learned_positions ? "learns positions" : "rotates q and k (RoPE)"));
  }
  if (!r.partial_rotary && c.positions == PositionKind::kRope && c.rotary_dim() != c.head_dim) {
    return absl::InvalidArgumentError(StrCat(who, "with partial rotary embeddings", why, "rotates whole heads"));
  }
  if (r.layer_norm_block && c.mlp_activation != MlpActivation::kGelu && c.mlp_activation != MlpActivation::kGeluTanh) {
    return absl::InvalidArgumentError(
        StrCat(who, "with hidden_act ", internal::ActivationName(c.mlp_activation), why, "applies GELU"));
  }
  if ((c.parallel_residual && !c.norms.pre_mlp) != r.shared_norm_parallel) {
    return absl::InvalidArgumentError(StrCat(who, "with its residual layout", why,
                                             r.shared_norm_parallel
                                                 ? "runs attention and the MLP side by side from one norm"
                                                 : "gives the MLP a norm of its own"));
  }
  // No llama.cpp architecture here has post-LN blocks, drops the final norm or projects the embeddings.
  if (c.norm_after_residual) {
    return absl::InvalidArgumentError(StrCat(who, "with norms after each residual add", why, "normalizes first"));
  }
  if (!c.norms.final) {
    return absl::InvalidArgumentError(StrCat(who, "without a final norm", why, "requires output_norm"));
  }
  if (c.projects_embeddings()) {
    return absl::InvalidArgumentError(
        StrCat(who, "with embeddings narrower than its blocks", why, "has no project_in / project_out"));
  }
  if (c.lm_head_bias != r.output_bias) {
    return absl::InvalidArgumentError(StrCat(who, c.lm_head_bias ? "with" : "without", " an LM head bias", why,
                                             r.output_bias ? "requires output.bias" : "has no output.bias"));
  }
  if (r.requires_o_mlp_bias && !(c.o_bias && c.mlp_bias)) {
    return absl::InvalidArgumentError(StrCat(who, "without o_proj and MLP biases", why, "requires them"));
  }
  if (c.qkv_bias && !r.qkv_bias) {
    return absl::InvalidArgumentError(StrCat(who, "with attention biases", why, "has no such tensors"));
  }
  if (!c.qkv_bias && r.requires_qkv_bias) {
    return absl::InvalidArgumentError(StrCat(who, "without q/k/v biases", why, "requires blk.N.attn_{q,k,v}.bias"));
  }
  if ((c.o_bias || c.mlp_bias) && !r.o_mlp_bias) {
    return absl::InvalidArgumentError(StrCat(who, "with o_proj or MLP biases", why, "has no such tensors"));
  }
  if (r.tied_only && !c.tie_word_embeddings) {
    return absl::InvalidArgumentError(StrCat(who, "with an untied LM head", why, "has no output.weight"));
  }
  // Writing the embedding as output.weight would load, but read back as an untied model: another model id.
  if (r.untied_only && c.tie_word_embeddings) {
    return absl::InvalidArgumentError(StrCat(who, "with tied embeddings", why, "requires output.weight"));
  }
  if (r.q_is_hidden && c.q_dim() != c.hidden_size) {
    return absl::InvalidArgumentError(StrCat(who, "with head_dim * num_attention_heads = ", c.q_dim(),
                                             " != hidden_size ", c.hidden_size, why,
                                             "sizes q_proj as hidden x hidden"));
  }
  return absl::OkStatus();
}

// The architecture name in GGUF (the family's, model/families/) once llama.cpp's graph for it can express `c`.
absl::StatusOr<std::string> GgufArchitecture(const ModelConfig& c) {
  const families::FamilySpec* family = families::FamilyOfArchitecture(c.architecture);
  for (const GgufGraphRules& rules : kGraphRules) {
    if (family == nullptr || family->gguf_architecture != rules.arch) continue;
    SEEDLING_RETURN_IF_ERROR(CheckExpressible(c, rules));
    if (const GgufGemmaGraph* graph = GemmaGraphOf(rules.arch)) SEEDLING_RETURN_IF_ERROR(CheckGemmaExport(c, *graph));
    return std::string(rules.arch);
  }
  std::string names;
  for (const families::FamilySpec& f : families::Families()) {
    if (!f.gguf_architecture.empty()) names += StrCat(names.empty() ? "" : ", ", f.architecture);
  }
  return absl::InvalidArgumentError(
      StrCat("architecture '", c.architecture,
             "' cannot be exported to GGUF: llama.cpp has no graph for it (supported: ", names, ")"));
}

// llama.cpp's name of a decoder layer's projection weight: "blk.<layer>.attn_q.weight", ...
std::string ProjectionTensorName(int64_t layer, Projection p) {
  // Indexed by Projection; llama.cpp's phi3 keeps the fused gate | up rows under ffn_up.
  static constexpr const char* kNames[kNumProjections] = {"attn_q", "attn_k",   "attn_v",   "attn_output", "ffn_gate",
                                                          "ffn_up", "ffn_down", "attn_qkv", "ffn_up"};
  return StrCat("blk.", layer, ".", kNames[static_cast<int>(p)], ".weight");
}

// A projection's weight shape (out, in), as nn.Linear stores it.
std::vector<int64_t> ProjectionShape(const ModelConfig& c, Projection p) {
  const ProjectionFeatures f = FeaturesOf(c, p);
  return {f.out, f.in};
}

// The heads whose output rows are permuted for GGML's interleaved RoPE (GgufPermutesQk); 0 = none.
int64_t RopeHeads(const ModelConfig& c, Projection p) {
  if (!GgufPermutesQk(c)) return 0;
  if (p == Projection::kQ) return c.num_attention_heads;
  if (p == Projection::kK) return c.num_key_value_heads;
  return 0;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += StrCat(i > 0 ? ", " : "", shape[i]);
  return s + "]";
}

// InvalidArgument unless `t` is a tensor the writer can convert: floating point, or a matrix of
// GGUF blocks (FormatOf aborts on any other uint8 layout, so it is checked here first).
absl::Status CheckSourceType(const std::string& name, const at::Tensor& t) {
  const at::ScalarType st = t.scalar_type();
  if (st == at::kByte) {
    if (t.dim() == 3 &&
        (t.size(2) == BlockBytes(WeightFormat::kQ8_0) || t.size(2) == BlockBytes(WeightFormat::kQ4_0))) {
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(StrCat("weight for '", name, "' is a uint8 tensor of shape ",
                                             ShapeString(t.sizes().vec()),
                                             "; expected GGUF blocks (rows, cols / 32, 34 or 18)"));
  }
  if (st != at::kFloat && st != at::kHalf && st != at::kBFloat16 && st != at::kDouble) {
    return absl::InvalidArgumentError(StrCat("weight for '", name, "' has dtype ", c10::toString(st),
                                             "; expected a floating-point tensor or GGUF blocks"));
  }
  return absl::OkStatus();
}

// Collects the tensors in file order, checking each against the shape it must have.
class TensorPlanner {
 public:
  // `matrix_format`: the requested format of 2-D tensors (see GgufOptions::format).
  explicit TensorPlanner(WeightFormat matrix_format) : matrix_format_(matrix_format) {}

  // A tensor the file requires. 2-D tensors take MatrixFormatFor(matrix format, cols), 1-D ones
  // F32.
  absl::Status Add(std::string name, const at::Tensor& t, std::vector<int64_t> shape, int64_t rope_heads = 0,
                   int64_t qkv_heads = 0, bool f32 = false) {
    if (name.size() > internal::kGgufMaxTensorName) {
      return absl::InvalidArgumentError(
          StrCat("tensor name '", name, "' is longer than ", internal::kGgufMaxTensorName));
    }
    if (!t.defined()) return absl::InvalidArgumentError(StrCat("weight for '", name, "' is missing"));
    SEEDLING_RETURN_IF_ERROR(CheckSourceType(name, t));
    if (LogicalShape(t) != shape) {
      return absl::InvalidArgumentError(StrCat("weight for '", name, "' has shape ", ShapeString(LogicalShape(t)),
                                               ", config implies ", ShapeString(shape)));
    }
    TensorPlan p;
    p.name = std::move(name);
    p.source = t;
    p.shape = std::move(shape);
    p.format = p.shape.size() == 2 && !f32 ? MatrixFormatFor(matrix_format_, p.shape[1]) : WeightFormat::kF32;
    p.rope_heads = rope_heads;
    p.qkv_heads = qkv_heads;
    plans_.push_back(std::move(p));
    return absl::OkStatus();
  }

  std::vector<TensorPlan>& plans() { return plans_; }

 private:
  const WeightFormat matrix_format_;
  std::vector<TensorPlan> plans_;
};

// Weights that `c` has no place for (a bias the config does not declare, a split q_proj of a fused model) would
// be dropped from the file: InvalidArgument instead.
absl::Status CheckNoStrayWeights(const ModelConfig& c, ModelWeights& w, const std::vector<GgufWeightSlot>& slots) {
  std::set<const at::Tensor*> listed;
  for (const GgufWeightSlot& s : slots) listed.insert(s.slot);
  for (size_t i = 0; i < w.layers.size(); ++i) {
    for (const at::Tensor* t : w.layers[i].Slots()) {
      if (t->defined() && !listed.contains(t)) {
        return absl::InvalidArgumentError(StrCat("weights of layer ", i, " hold a tensor the ", c.architecture,
                                                 " config has no place for (a bias it does not declare?)"));
      }
    }
  }
  return absl::OkStatus();
}

// The tensors computed from the config rather than stored as weights: Llama 3 scaling as rope_freqs.weight,
// LongRoPE as rope_factors_{long,short}.weight.
absl::Status PlanRopeTensors(const ModelConfig& c, TensorPlanner& planner) {
  auto add = [&](const char* name, const std::vector<double>& values) {
    const at::Tensor factors = at::tensor(at::ArrayRef<double>(values), at::kDouble).to(at::kFloat);
    return planner.Add(name, factors, {c.head_dim / 2});
  };
  // llama.cpp implements Llama 3 scaling as per-pair factors that divide the rotation angle: the unscaled inverse
  // frequency over the scaled one (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors).
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) return add("rope_freqs.weight", RopeScalingFactors(c));
  // It divides each pair's frequency by LongRoPE's factor, as Hugging Face does.
  if (c.rope_scaling.type == RopeScaling::Type::kLongRope) {
    SEEDLING_RETURN_IF_ERROR(add("rope_factors_long.weight", c.rope_scaling.long_factor));
    return add("rope_factors_short.weight", c.rope_scaling.short_factor);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<TensorPlan>> PlanTensors(const ModelConfig& c, const ModelWeights& w,
                                                    WeightFormat matrix_format) {
  if (static_cast<int64_t>(w.layers.size()) != c.num_hidden_layers) {
    return absl::InvalidArgumentError(
        StrCat("weights have ", w.layers.size(), " layers, config has ", c.num_hidden_layers));
  }
  ModelWeights view = w;  // tensor handles sharing storage with `w`, for the slots to point into
  const std::vector<GgufWeightSlot> slots = GgufWeightSlots(c, view);
  SEEDLING_RETURN_IF_ERROR(CheckNoStrayWeights(c, view, slots));
  TensorPlanner planner(matrix_format);
  SEEDLING_RETURN_IF_ERROR(PlanRopeTensors(c, planner));
  for (const GgufWeightSlot& s : slots) {
    // llama.cpp's Gemma graphs scale by the stored norm weight, Hugging Face's by (1 + w): the file holds 1 + w.
    const bool offset = s.norm && s.slot->defined() && c.norm_weight_offset != 0;
    const at::Tensor source = offset ? s.slot->detach() + c.norm_weight_offset : *s.slot;
    SEEDLING_RETURN_IF_ERROR(planner.Add(s.name, source, s.shape, s.rope_heads, s.qkv_heads, s.f32));
  }
  return std::move(planner.plans());
}

// The source in the file's format, rows in the source's order. A block source already in that
// format is returned as is; any other is dequantized to fp32 first (see WriteGguf).
absl::StatusOr<at::Tensor> ToFileFormat(const TensorPlan& p) {
  const at::Tensor t = p.source.detach();
  const bool blocks = t.scalar_type() == at::kByte;
  if (blocks && FormatOf(t) == p.format) return t;
  const at::Tensor values = blocks ? DequantizeMatrix(t) : t;
  if (IsBlockFormat(p.format)) return QuantizeMatrix(values, p.format, p.name);
  return values.to(p.format == WeightFormat::kF32 ? at::kFloat : at::kHalf);
}

// convert_hf_to_gguf.py LlamaModel.permute: within each head, rows (i, i + D/2) of Hugging Face's
// rotate-half layout become the adjacent pair (2i, 2i + 1) that GGML's llama RoPE rotates
// together. Rows move whole, so this works on any representation of them (floats or blocks).
at::Tensor PermuteRopeRows(const at::Tensor& t, int64_t heads) {
  if (heads == 0) return t;
  std::vector<int64_t> split = {heads, 2, t.size(0) / heads / 2};
  split.insert(split.end(), t.sizes().begin() + 1, t.sizes().end());
  return t.reshape(split).transpose(1, 2).reshape(t.sizes());
}

// The tensor's bytes as the file stores them: converted, then permuted (quantization works per
// row, so permuting first would give the same bytes; the converted tensor is the smaller one). An
// F32 source that needs neither is returned as is, without a copy.
absl::StatusOr<at::Tensor> FileData(const TensorPlan& p) {
  SEEDLING_ASSIGN_OR_RETURN(const at::Tensor converted, ToFileFormat(p));
  const at::Tensor blocks = p.qkv_heads > 0 ? QkvRowsToBlocks(converted, p.qkv_heads) : converted;
  return PermuteRopeRows(blocks, p.rope_heads).contiguous();
}

// The header: magic, version, counts, `md` (consumed), the tensor infos with offsets packed in
// `plans` order, each tensor padded to the alignment, then zeros up to the aligned data section.
std::string EncodeHeader(Metadata& md, const std::vector<TensorPlan>& plans) {
  Encoder header;
  header.U32(internal::kGgufMagic);
  header.U32(internal::kGgufVersion);
  header.U64(plans.size());
  header.U64(md.count());
  header.bytes() += md.bytes();
  md.bytes().clear();
  md.bytes().shrink_to_fit();
  uint64_t offset = 0;  // from the start of the data section
  for (const TensorPlan& p : plans) {
    header.Str(p.name);
    header.U32(static_cast<uint32_t>(p.shape.size()));
    for (auto d = p.shape.rbegin(); d != p.shape.rend(); ++d) header.U64(static_cast<uint64_t>(*d));
    header.U32(static_cast<uint32_t>(CodesOf(p.format).type));
    header.U64(offset);
    offset = AlignUp(offset + FileBytes(p));
  }
  header.PadTo(AlignUp(header.bytes().size()));
  return std::move(header.bytes());
}

// The generic streaming writer behind both exports: EncodeHeader, then each tensor's FileData
// padded to the alignment, one at a time (memory stays at the sources plus the largest converted
// tensor). Goes through a temporary file that is fsynced and renamed (AtomicFileWriter): on any
// error no file is left behind. LibTorch may throw: call it inside CatchTorch.
absl::Status WriteGgufFile(const std::string& path, Metadata& md, const std::vector<TensorPlan>& plans) {
  const std::string header = EncodeHeader(md, plans);
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<AtomicFileWriter> file, AtomicFileWriter::Create(path));
  SEEDLING_RETURN_IF_ERROR(file->Append(header));
  static const char kZeros[kGgufAlignment] = {};
  for (const TensorPlan& p : plans) {
    SEEDLING_ASSIGN_OR_RETURN(const at::Tensor data, FileData(p));
    const uint64_t nbytes = FileBytes(p);
    SEEDLING_CHECK(static_cast<uint64_t>(data.nbytes()) == nbytes, "tensor bytes differ from the header");
    SEEDLING_RETURN_IF_ERROR(file->Append(std::string_view(static_cast<const char*>(data.data_ptr()), nbytes)));
    // Every tensor, the last included, is padded: llama.cpp checks each one lies within the file.
    SEEDLING_RETURN_IF_ERROR(file->Append(std::string_view(kZeros, AlignUp(nbytes) - nbytes)));
  }
  return file->Commit();
}

// tokenizer.ggml.pre for a byte-level tokenizer: the name llama.cpp's vocabulary loader maps to the
// same pre-tokenizer (llama-vocab.cpp).
absl::StatusOr<std::string> PreTokenizerName(const TokenizerVocabulary& v, const GgufOptions& options) {
  if (!options.tokenizer_pre.empty()) return options.tokenizer_pre;
  if (v.kind != TokenizerVocabulary::Kind::kByteLevelBpe) return std::string("default");
  switch (v.pre_tokenizer) {
    case TokenizerVocabulary::PreTokenizer::kGpt2:
      return std::string("gpt-2");
    case TokenizerVocabulary::PreTokenizer::kGpt2Digits:
      return std::string("smollm");
    case TokenizerVocabulary::PreTokenizer::kLlama3:
      return std::string("llama-bpe");
    case TokenizerVocabulary::PreTokenizer::kQwen2:
      return std::string("qwen2");
    case TokenizerVocabulary::PreTokenizer::kOther:
      break;
  }
  // llama.cpp would fall back to a "default" regex that splits text differently from this
  // tokenizer, and the model would see token sequences it was never trained on.
  return absl::InvalidArgumentError(
      "the tokenizer's pre-tokenizer is not one llama.cpp is known to implement the same way "
      "(recognized: GPT-2 "
      "ByteLevel, SmolLM Digits + ByteLevel, Llama 3 and Qwen2 Split + ByteLevel); set "
      "GgufOptions::tokenizer_pre "
      "to the llama.cpp name of an equivalent one");
}

// Writes the tokenizer.ggml.* keys. The vocabulary is padded to config.vocab_size, as llama.cpp
// sizes the embedding by the number of tokens.
absl::Status AddTokenizer(const ModelConfig& c, const Tokenizer& tokenizer, const GgufOptions& options, Metadata& md) {
  SEEDLING_ASSIGN_OR_RETURN(TokenizerVocabulary v, tokenizer.Vocabulary());
  const size_t n = v.tokens.size();
  if (v.scores.size() != n || v.types.size() != n) {
    return absl::InternalError(StrCat("tokenizer vocabulary has ", n, " tokens but ", v.scores.size(), " scores and ",
                                      v.types.size(), " types"));
  }
  if (static_cast<int64_t>(n) > c.vocab_size) {
    return absl::InvalidArgumentError(
        StrCat("the tokenizer has ", n, " ids but the model's vocab_size is ", c.vocab_size));
  }
  const bool spm = v.kind != TokenizerVocabulary::Kind::kByteLevelBpe;
  SEEDLING_ASSIGN_OR_RETURN(std::string pre, PreTokenizerName(v, options));

  // convert_hf_to_gguf.py pads with "[PAD<id>]" (score -1000 for SentencePiece) of type UNUSED.
  v.tokens.resize(c.vocab_size);
  v.scores.resize(c.vocab_size, -1000.0f);
  v.types.resize(c.vocab_size, TokenizerVocabulary::kUnused);
  for (int64_t id = 0; id < c.vocab_size; ++id) {
    if (!v.tokens[id].empty()) continue;
    if (id < static_cast<int64_t>(n) && v.types[id] != TokenizerVocabulary::kUnused) {
      return absl::InvalidArgumentError(StrCat("token id ", id, " has an empty string"));
    }
    v.tokens[id] = StrCat("[PAD", id, "]");
    v.scores[id] = -1000.0f;
    v.types[id] = TokenizerVocabulary::kUnused;
  }
  // llama.cpp maps strings to ids and aborts if two ids share one.
  std::unordered_map<std::string_view, int64_t> seen;
  seen.reserve(v.tokens.size());
  for (int64_t id = 0; id < c.vocab_size; ++id) {
    auto [it, inserted] = seen.emplace(v.tokens[id], id);
    if (!inserted) {
      return absl::InvalidArgumentError(StrCat("token '", v.tokens[id], "' has two ids, ", it->second, " and ", id,
                                               "; llama.cpp requires token strings to be unique"));
    }
  }

  md.Str("tokenizer.ggml.model", spm ? "llama" : "gpt2");
  md.Str("tokenizer.ggml.pre", pre);
  md.StrArray("tokenizer.ggml.tokens", v.tokens);
  md.I32Array("tokenizer.ggml.token_type", v.types);
  if (spm) {
    // llama.cpp's SentencePiece tokenizer merges by score; BPE merges are not used.
    md.F32Array("tokenizer.ggml.scores", v.scores);
  } else {
    std::vector<std::string> merges;
    merges.reserve(v.merges.size());
    for (size_t rank = 0; rank < v.merges.size(); ++rank) {
      const auto& [a, b] = v.merges[rank];
      // llama.cpp splits "a b" at the first space after the first byte.
      if (a.empty() || b.empty() || a.find(' ', 1) != std::string::npos) {
        return absl::InvalidArgumentError(
            StrCat("merge ", rank, " ('", a, "', '", b, "') cannot be written as the \"a b\" string llama.cpp parses"));
      }
      merges.push_back(StrCat(a, " ", b));
    }
    md.StrArray("tokenizer.ggml.merges", merges);
  }

  // Special ids the tokenizer does not define come from config.json, as convert's SpecialVocab
  // does.
  std::optional<int64_t> bos = v.bos_id, eos = v.eos_id;
  if (!bos.has_value()) bos = c.bos_token_id;
  if (!eos.has_value() && !c.eos_token_ids.empty()) eos = c.eos_token_ids.front();
  const std::pair<const char*, std::optional<int64_t>> ids[] = {{"tokenizer.ggml.bos_token_id", bos},
                                                                {"tokenizer.ggml.eos_token_id", eos},
                                                                {"tokenizer.ggml.unknown_token_id", v.unk_id},
                                                                {"tokenizer.ggml.padding_token_id", v.pad_id}};
  for (const auto& [key, id] : ids) {
    if (!id.has_value()) continue;
    if (*id < 0 || *id >= c.vocab_size) {
      return absl::InvalidArgumentError(StrCat(key, " ", *id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
    md.U32(key, static_cast<uint64_t>(*id));
  }
  md.Bool("tokenizer.ggml.add_bos_token", v.add_bos);
  md.Bool("tokenizer.ggml.add_eos_token", v.add_eos);
  // A tokenizer.json's dummy prefix is known (a tokenizer.model's is left to llama.cpp's default, true).
  if (v.kind == TokenizerVocabulary::Kind::kSentencePieceBpe) {
    md.Bool("tokenizer.ggml.add_space_prefix", v.add_space_prefix);
  }
  return absl::OkStatus();
}

absl::Status AddHyperparameters(const ModelConfig& c, const std::string& arch, const GgufOptions& options,
                                Metadata& md) {
  for (int64_t v : {c.vocab_size, c.max_position_embeddings, c.hidden_size, c.num_hidden_layers, c.intermediate_size,
                    c.num_attention_heads, c.num_key_value_heads, c.head_dim}) {
    if (v > std::numeric_limits<uint32_t>::max()) {
      return absl::InvalidArgumentError(StrCat("config value ", v, " does not fit GGUF's uint32 fields"));
    }
  }
  md.Str("general.architecture", arch);
  md.Str("general.name", options.name.empty() ? c.architecture : options.name);
  md.U32("general.file_type", CodesOf(options.format).file_type);
  // As llama-quantize writes it: the version of the block layouts.
  if (IsBlockFormat(options.format)) md.U32("general.quantization_version", kQuantizationVersion);
  md.U32("general.alignment", kGgufAlignment);
  const std::string p = arch + ".";
  md.U32(p + "vocab_size", c.vocab_size);
  md.U32(p + "context_length", c.max_position_embeddings);
  md.U32(p + "embedding_length", c.hidden_size);
  md.U32(p + "block_count", c.num_hidden_layers);
  md.U32(p + "feed_forward_length", c.intermediate_size);
  md.U32(p + "attention.head_count", c.num_attention_heads);
  md.U32(p + "attention.head_count_kv", c.num_key_value_heads);
  md.F32(p + GgufNormEpsilonKey(c), c.rms_norm_eps);
  if (c.positions == PositionKind::kRope) {
    md.U32(p + "rope.dimension_count", c.rotary_dim());
    md.F32(p + "rope.freq_base", c.rope_theta);
  }
  if (c.q_dim() != c.hidden_size) {
    // llama.cpp otherwise assumes head_dim = hidden_size / num_attention_heads.
    md.U32(p + "attention.key_length", c.head_dim);
    md.U32(p + "attention.value_length", c.head_dim);
  }
  // The Gemma graphs read the window and gemma2 its soft-caps (the llama architecture has no window).
  if (const GgufGemmaGraph* graph = GemmaGraphOf(arch)) {
    md.U32(p + "attention.sliding_window", *c.sliding_window);  // CheckGemmaExport required one
    if (graph->softcaps) {
      md.F32(p + "attn_logit_softcapping", c.attention_softcap);
      md.F32(p + "final_logit_softcapping", c.final_logit_softcap);
    }
  }
  if (arch == "phi3") md.U32(p + "attention.sliding_window", c.sliding_window.value_or(0));  // 0 = none
  if (arch == "gptneox") md.Bool(p + "use_parallel_residual", c.parallel_residual);
  if (c.rope_scaling.type == RopeScaling::Type::kLinear) {
    md.Str(p + "rope.scaling.type", "linear");
    md.F32(p + "rope.scaling.factor", c.rope_scaling.factor);
  }
  if (c.rope_scaling.type == RopeScaling::Type::kLongRope) {  // with the factor tensors (PlanTensors)
    md.F32(p + "rope.scaling.attn_factor", RopeAttentionFactor(c));
    md.U32(p + "rope.scaling.original_context_length", c.rope_scaling.original_max_position_embeddings);
  }
  return absl::OkStatus();
}

// The adapter's tensors, "<base>.lora_a" then "<base>.lora_b" per pair, checked against the model;
// sets `rank` to the pairs' common rank.
absl::StatusOr<std::vector<TensorPlan>> PlanLoraTensors(const ModelConfig& c, const std::string& arch,
                                                        const std::vector<GgufLoraPair>& pairs, WeightFormat format,
                                                        int64_t& rank) {
  if (pairs.empty()) return absl::InvalidArgumentError("the LoRA adapter has no tensors");
  TensorPlanner planner(format);
  std::set<std::pair<int64_t, Projection>> seen;
  rank = 0;
  for (const GgufLoraPair& pair : pairs) {
    if (pair.layer < 0 || pair.layer >= c.num_hidden_layers) {
      return absl::InvalidArgumentError(
          StrCat("LoRA pair for layer ", pair.layer, ", the model has ", c.num_hidden_layers, " layers"));
    }
    const std::string base = ProjectionTensorName(pair.layer, pair.projection);
    if (!seen.emplace(pair.layer, pair.projection).second) {
      return absl::InvalidArgumentError(StrCat("two LoRA pairs for '", base, "'"));
    }
    if (!pair.a.defined() || pair.a.dim() != 2 || pair.a.size(0) < 1) {
      return absl::InvalidArgumentError(
          StrCat("lora_a for '", base, "' must be a 2-D (rank, in) tensor with rank >= 1"));
    }
    if (rank == 0) rank = pair.a.size(0);
    if (pair.a.size(0) != rank) {
      return absl::InvalidArgumentError(StrCat("'", base, "' has rank ", pair.a.size(0),
                                               " but earlier pairs have rank ", rank,
                                               "; llama.cpp's single adapter.lora.alpha needs one rank"));
    }
    const std::vector<int64_t> shape = ProjectionShape(c, pair.projection);  // (out, in)
    SEEDLING_RETURN_IF_ERROR(planner.Add(base + ".lora_a", pair.a, {rank, shape[1]}));
    // B's rows are the projection's output rows, so q / k rows move as the base weight's do.
    const int64_t qkv_heads = pair.projection == Projection::kQkv && c.fused.qkv_per_head ? c.num_attention_heads : 0;
    SEEDLING_RETURN_IF_ERROR(
        planner.Add(base + ".lora_b", pair.b, {shape[0], rank}, RopeHeads(c, pair.projection), qkv_heads));
  }
  return std::move(planner.plans());
}

}  // namespace

absl::Status WriteGguf(const std::string& path, const ModelConfig& config, const ModelWeights& weights,
                       const Tokenizer& tokenizer, const GgufOptions& options) {
  if (options.format == WeightFormat::kBF16) {
    return absl::InvalidArgumentError("GGUF export writes f32, f16, q8_0 or q4_0 matrices, not bf16");
  }
  SEEDLING_RETURN_IF_ERROR(config.Validate());
  SEEDLING_ASSIGN_OR_RETURN(const std::string arch, GgufArchitecture(config));
  Metadata md;
  SEEDLING_RETURN_IF_ERROR(AddHyperparameters(config, arch, options, md));
  SEEDLING_RETURN_IF_ERROR(AddTokenizer(config, tokenizer, options, md));
  return CatchTorch("GGUF export", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(const std::vector<TensorPlan> plans, PlanTensors(config, weights, options.format));
    return WriteGgufFile(path, md, plans);
  });
}

absl::Status WriteGgufLora(const std::string& path, const ModelConfig& config, const std::vector<GgufLoraPair>& pairs,
                           double scale, const GgufLoraOptions& options) {
  if (options.format != WeightFormat::kF32 && options.format != WeightFormat::kF16) {
    return absl::InvalidArgumentError(
        StrCat("a GGUF LoRA adapter is written in f32 or f16, not ", WeightFormatName(options.format)));
  }
  if (!(scale > 0) || !std::isfinite(scale)) {
    return absl::InvalidArgumentError(
        StrCat("LoRA scale must be finite and > 0 (llama.cpp reads alpha 0 as scale 1), got ", scale));
  }
  SEEDLING_RETURN_IF_ERROR(config.Validate());
  SEEDLING_ASSIGN_OR_RETURN(const std::string arch, GgufArchitecture(config));
  return CatchTorch("GGUF LoRA export", [&]() -> absl::Status {
    int64_t rank = 0;
    SEEDLING_ASSIGN_OR_RETURN(const std::vector<TensorPlan> plans,
                              PlanLoraTensors(config, arch, pairs, options.format, rank));
    // llama-adapter.cpp checks general.type, general.architecture (against the base model) and
    // adapter.type; it scales B A by adapter.lora.alpha / rank.
    Metadata md;
    md.Str("general.architecture", arch);
    md.Str("general.type", "adapter");
    md.U32("general.alignment", kGgufAlignment);
    md.Str("adapter.type", "lora");
    md.F32("adapter.lora.alpha", scale * static_cast<double>(rank));
    return WriteGgufFile(path, md, plans);
  });
}

}  // namespace seedling::model
