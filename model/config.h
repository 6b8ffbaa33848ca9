#pragma once

// The model configuration, parsed from a Hugging Face config.json (the families of model/families/), and
// the presets `seedling init-model` writes.
//
// The decoder block is described by the config's fields, never by the family's name: which projections have
// biases (qkv_bias, o_bias, mlp_bias), where the block normalizes (norms), whether and how q and k are
// RMS-normed (qk_norm), a sliding window. The parser maps each family's config.json onto them; the forward
// (model/llama.h) composes the block from them, and the tensor names follow from them (model/weights.h).

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace seedling::model {

// RoPE frequency scaling (config.json "rope_scaling").
struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3, kLongRope };
  Type type = Type::kNone;
  double factor = 1.0;  // linear and llama3
  // llama3 only (Llama 3.1 defaults).
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  // llama3: the context the ramp is measured against. longrope (Phi-3): the pre-trained context; a forward
  // reaching beyond it takes long_factor, otherwise short_factor (config.json's top-level field).
  int64_t original_max_position_embeddings = 8192;
  // longrope ("su" in early Phi-3 configs): per-pair divisors of the inverse frequencies, head_dim / 2 each,
  // and the factor cos and sin are scaled by (the scores by its square); 0 = the LongRoPE paper's
  // sqrt(1 + ln(s) / ln(original)) with s = max_position_embeddings / original, 1 when s <= 1.
  std::vector<double> short_factor, long_factor;
  double attention_factor = 0.0;
};

// The largest sizes a config may give (ModelConfig::Validate). Real models sit far below: Gemma's
// 262,144-token vocabulary, Llama 3.1 405B's 16,384 hidden size and 126 layers. The bounds keep every
// product the loader and the memory planner form out of them (vocab x hidden x 4 bytes, tokens x
// hidden x layers) inside int64, so a hostile config.json gets an error, not a wrapped size.
inline constexpr int64_t kMaxVocabSize = int64_t{1} << 22;
inline constexpr int64_t kMaxHiddenSize = int64_t{1} << 16;
inline constexpr int64_t kMaxIntermediateSize = int64_t{1} << 20;
inline constexpr int64_t kMaxLayers = 512;
inline constexpr int64_t kMaxHeads = 1024;
inline constexpr int64_t kMaxHeadDim = 4096;
inline constexpr int64_t kMaxPositions = int64_t{1} << 24;

// Where a decoder block applies its norms (each one of hidden_size weights). Llama-style blocks normalize
// before attention and before the MLP; OLMo 2 normalizes each sub-block's output before its residual add
// instead; Gemma 2 and 3 do both. ModelConfig::norm_after_residual moves the first and third after their
// sub-block's residual add (post-LN).
struct NormPlacement {
  bool pre_attention = true;      // input_layernorm: on the block's input, before attention
  bool attention_output = false;  // post_attention_layernorm: on attention's output, before the residual add
  bool pre_mlp = true;            // Llama's post_attention_layernorm, Gemma's pre_feedforward_layernorm
  bool mlp_output = false;        // post_feedforward_layernorm: on the MLP's output, before the residual add
  bool final = true;              // the model's norm after the last block (not counted by count())
  bool operator==(const NormPlacement&) const = default;
  int64_t count() const { return int64_t{pre_attention} + attention_output + pre_mlp + mlp_output; }
};

// RMSNorm of the queries and keys before RoPE.
enum class QkNorm {
  kNone,
  kPerHead,        // over each head's head_dim values, weights of head_dim (Qwen3)
  kPerProjection,  // over the whole q / k projection, weights of q_dim / kv_dim (OLMo 2)
};

// Projections stored as one fused matrix: q, k and v as qkv_proj (rows q | k | v, Phi-3; or per head, rows
// q_h | k_h | v_h for each head h in turn, GPT-NeoX's query_key_value), gate and up as gate_up_proj (rows
// gate | up). The forward multiplies the fused matrix once and LoRA adapts the fused module, as PEFT does.
struct FusedProjections {
  bool qkv = false;
  bool qkv_per_head = false;  // with qkv: the rows interleaved per head (needs as many KV heads as heads)
  bool gate_up = false;
  bool operator==(const FusedProjections&) const = default;
};

// The MLP's activation: of the gate in a gated MLP, act(gate) · up; of the first projection in a plain one.
enum class MlpActivation {
  kSilu,      // SwiGLU (Llama, Qwen, OLMo 2)
  kGeluTanh,  // GELU's tanh approximation, "gelu_pytorch_tanh" / "gelu_new" (Gemma's GeGLU, GPT-2, Phi)
  kGelu,      // exact (erf) GELU, "gelu" (GPT-NeoX / Pythia)
  kRelu,      // "relu" (OPT)
};

// How tokens learn their positions.
enum class PositionKind {
  kRope,     // rotary embeddings on q and k in every layer
  kLearned,  // a table of position embeddings added to the token embeddings (GPT-2, OPT)
};

// The norm of the block's hidden states (and the final norm).
enum class NormKind {
  kRms,        // x / rms(x) · w (Llama and most later families)
  kLayerNorm,  // (x − mean(x)) / std(x) · w + b, with a bias beside each weight (GPT-2, GPT-NeoX, OPT, Phi)
};

// Architecture hyper-parameters. Field names follow config.json.
struct ModelConfig {
  // "LlamaForCausalLM", "Qwen2ForCausalLM", ... (model/families/families.cpp lists them)
  std::string architecture;
  std::string model_type;  // "llama", "qwen2", ...
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // < num_attention_heads means grouped-query attention
  int64_t head_dim = 0;             // default hidden_size / num_attention_heads
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;  // every block norm's eps (GPT-NeoX's layer_norm_eps too)
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;           // q/k/v projections have a bias (Qwen2 always; Llama with attention_bias)
  bool o_bias = false;             // o_proj has a bias (Llama with attention_bias)
  bool mlp_bias = false;           // gate/up/down have biases (Llama mlp_bias)
  NormPlacement norms;             // where the block normalizes
  QkNorm qk_norm = QkNorm::kNone;  // RMSNorm on q and k before RoPE (Qwen3, OLMo 2)
  MlpActivation mlp_activation = MlpActivation::kSilu;
  // A gated MLP computes down(act(gate(x)) · up(x)); a plain one down(act(up(x))), its first projection
  // being Projection::kUp (GPT-NeoX's dense_h_to_4h, GPT-2's c_fc, OPT's fc1).
  bool gated_mlp = true;
  NormKind norm_kind = NormKind::kRms;  // of the block's and the final norms (q/k norms are always RMS)
  // The share of each head's dimensions RoPE rotates (the first rotary_dim() of them); the rest pass through
  // (GPT-NeoX's rotary_pct, Phi's partial_rotary_factor).
  double partial_rotary_factor = 1.0;
  PositionKind positions = PositionKind::kRope;
  // kLearned: position t reads row t + position_offset of the table (OPT keeps 2 unused rows first), which has
  // max_position_embeddings + position_offset rows.
  int64_t position_offset = 0;
  // Attention and the MLP both read the block's input and add to it together, x + attn(n1(x)) + mlp(n2(x))
  // (GPT-NeoX's use_parallel_residual; with norms.pre_mlp off the MLP reads n1(x), as Phi does).
  bool parallel_residual = false;
  FusedProjections fused;     // which projections are stored fused (Phi-3, GPT-NeoX)
  bool lm_head_bias = false;  // the LM head adds a bias to the logits (Phi's lm_head.bias)
  // Post-LN (OPT-350m's do_layer_norm_before false): the block's two norms, in the norms.pre_attention and
  // norms.pre_mlp slots, normalize after each residual add, x = n1(x + attn(x)), x = n2(x + mlp(x)).
  bool norm_after_residual = false;
  // The width of the token embeddings and the LM head when it differs from hidden_size (OPT-350m's
  // word_embed_proj_dim), with project_in (hidden × this) after the embedding and project_out (this × hidden)
  // before the LM head; 0 = hidden_size, no projections.
  int64_t word_embed_proj_dim = 0;
  // Every RMSNorm scales by (norm_weight_offset + w): Gemma stores w - 1 and scales by (1 + w).
  double norm_weight_offset = 0.0;
  bool scale_embeddings = false;  // the embeddings are multiplied by sqrt(hidden_size) (Gemma)
  // The queries' scale in attention; 0 = 1 / sqrt(head_dim). Gemma: query_pre_attn_scalar^-0.5.
  double attention_scale = 0.0;
  std::optional<int64_t> sliding_window;  // Mistral / Qwen2 with use_sliding_window: attend to the last N
  // With a sliding window: 0 = every layer is windowed; N > 0 = every Nth layer (l + 1 divisible by N) is global,
  // the others windowed ("local"), as Gemma 2 (N = 2) and Gemma 3 (N = 6) alternate.
  int64_t sliding_window_pattern = 0;
  // RoPE base of the local layers; 0 = rope_theta. Local layers take no rope_scaling (Gemma 3).
  double rope_local_theta = 0.0;
  // Logit soft-capping, z' = cap · tanh(z / cap), as Gemma 2 bounds its logits; 0 = none. On the attention
  // scores after scaling, before the mask (attn_logit_softcapping), and on the LM head's logits
  // (final_logit_softcapping).
  double attention_softcap = 0.0;
  double final_logit_softcap = 0.0;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;   // config.json allows one id or a list
  std::string torch_dtype = "float32";  // dtype of the stored weights ("bfloat16", "float16", "float32")

  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  // The width of the embeddings and of the LM head's input (word_embed_proj_dim, else hidden_size).
  int64_t embedding_dim() const { return word_embed_proj_dim > 0 ? word_embed_proj_dim : hidden_size; }
  bool projects_embeddings() const { return word_embed_proj_dim > 0 && word_embed_proj_dim != hidden_size; }
  // Rows of the learned position table (0 with RoPE).
  int64_t position_rows() const {
    return positions == PositionKind::kLearned ? max_position_embeddings + position_offset : 0;
  }
  // The dimensions of each head RoPE rotates (partial_rotary_factor of head_dim, rounded down as Hugging Face does).
  int64_t rotary_dim() const { return static_cast<int64_t>(static_cast<double>(head_dim) * partial_rotary_factor); }
  int64_t q_dim() const { return num_attention_heads * head_dim; }
  // Weights of the q and k norms: head_dim each per head, q_dim / kv_dim per projection, 0 without.
  int64_t q_norm_size() const { return QkNormSize(q_dim()); }
  int64_t k_norm_size() const { return QkNormSize(kv_dim()); }
  // Whether layer `l` is windowed (local), and the window it attends through (nullopt = the whole context).
  bool LayerIsLocal(int64_t l) const {
    return sliding_window.has_value() && (sliding_window_pattern <= 0 || (l + 1) % sliding_window_pattern != 0);
  }
  std::optional<int64_t> LayerWindow(int64_t l) const { return LayerIsLocal(l) ? sliding_window : std::nullopt; }
  // Number of parameters the architecture implies (counting a tied LM head once).
  int64_t NumParameters() const;

  // Checks internal consistency (positive sizes, heads divisible by KV heads, even head_dim, ...).
  absl::Status Validate() const;

 private:
  int64_t QkNormSize(int64_t projection) const {
    if (qk_norm == QkNorm::kNone) return 0;
    return qk_norm == QkNorm::kPerHead ? head_dim : projection;
  }
};

// Parses config.json text. InvalidArgument naming the field for missing required fields, wrong types,
// unknown architectures, activations other than the family's, or unsupported rope_scaling types.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text);

// Reads <model_dir>/config.json, or the config of a GGUF file when `model_dir` is one (model/gguf_model.h).
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// RoPE inverse frequencies (rotary_dim() / 2 of them), with the config's rope_scaling applied: pair i turns
// by 1 / theta^(2i / rotary_dim) per position, divided as linear, Llama 3 or LongRoPE scaling says. LongRoPE
// divides by its long factors when `long_context` (a forward reaching past original_max_position_embeddings),
// by its short ones otherwise; other scalings ignore it.
std::vector<double> RopeInverseFrequencyValues(const ModelConfig& config, bool long_context = false);
// Whether a forward over positions [0, end) takes LongRoPE's long factors.
bool RopeLongContext(const ModelConfig& config, int64_t end);
// What cos and sin are multiplied by: LongRoPE's attention factor, 1 for every other scaling.
double RopeAttentionFactor(const ModelConfig& config);
// What the config's rope_scaling divides each pair's angle by: the unscaled inverse frequency over the
// scaled one (a GGUF file's rope_freqs.weight; all 1 without scaling).
std::vector<double> RopeScalingFactors(const ModelConfig& config);

// Serializes to a config.json that Hugging Face transformers loads.
std::string ModelConfigToJson(const ModelConfig& config);

// The base model's id that the server sends with each task and a device compares with its own copy: the
// lower-case hex SHA-256 of `config`'s architecture (ModelConfigToJson without torch_dtype and the bos / eos
// token ids, which do not change the adapter's shapes or the arithmetic). So a model directory, a GGUF file
// converted from it and any `--weights` representation share one id, and two models of different shapes never do.
std::string ModelId(const ModelConfig& config);

// Presets for `init-model`: "tiny" (about 3.5M parameters, GQA, tied), "tiny-qwen2" (q/k/v bias, untied
// LM head, llama3 RoPE scaling), "tiny-qwen3" (q/k norms per head, head_dim x heads != hidden_size),
// "tiny-olmo2" (post-norm block, q/k norms over the projections, GQA), "tiny-gemma2" (soft-capping, local and
// global layers alternating), "tiny-gemma3" (q/k norms, every 6th layer global), "tiny-phi3" (fused qkv and
// gate_up projections, LongRoPE), "tiny-gptneox" (LayerNorms, parallel residual, partial rotary, plain GELU
// MLP), "tiny-gpt2" (learned positions, Conv1D-stored projections, a 256-position table), and the exact shapes
// of published models: "smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "qwen3-0.6b", "tinyllama-1.1b",
// "olmo-2-1b", "gemma-2-2b", "gemma-3-270m", "gemma-3-1b", "phi-3-mini", "pythia-160m", "gpt2",
// "cerebras-gpt-111m", "opt-125m", "opt-350m", "phi-1.5", "phi-2" (and "tiny-opt": OPT's position table with two unused
// rows, ReLU; "tiny-phi": one LayerNorm feeding attention and MLP in parallel, half of each head rotated, an LM
// head with a bias).
// NotFound lists the valid names.
absl::StatusOr<ModelConfig> PresetConfig(std::string_view name);
std::vector<std::string> PresetNames();

// The linear projections of a decoder layer, in Hugging Face naming; kQkv and kGateUp are the fused modules of
// ModelConfig::fused (Phi-3's qkv_proj and gate_up_proj).
enum class Projection { kQ, kK, kV, kO, kGate, kUp, kDown, kQkv, kGateUp };
inline constexpr int kNumProjections = 9;
// Every projection in canonical order (an adapter's wire order): q, k, v, qkv, o, gate, up, gate_up, down.
inline constexpr Projection kAllProjections[] = {Projection::kQ,   Projection::kK,      Projection::kV,
                                                 Projection::kQkv, Projection::kO,      Projection::kGate,
                                                 Projection::kUp,  Projection::kGateUp, Projection::kDown};
// "q_proj", "k_proj", ..., "down_proj", "qkv_proj", "gate_up_proj".
const char* ProjectionName(Projection p);
// The projection of a name ProjectionName gives; nullopt for any other.
std::optional<Projection> ProjectionFromName(std::string_view name);
// The projections a decoder layer of `config` has, in canonical order: q, k, v or qkv; o; gate, up or
// gate_up; down.
std::vector<Projection> ModelProjections(const ModelConfig& config);
// Whether `config`'s layers have projection `p`.
bool HasProjection(const ModelConfig& config, Projection p);
// The projection of `config` that computes `p`'s output: the fused module for q, k, v (gate, up) when they are
// fused, and p itself otherwise. A fused projection on a model that stores the parts apart has no single one.
std::optional<Projection> ProjectionIn(const ModelConfig& config, Projection p);
// A projection's (in, out) features.
struct ProjectionFeatures {
  int64_t in = 0, out = 0;
};
ProjectionFeatures FeaturesOf(const ModelConfig& config, Projection p);
// Weights of a decoder layer's projections (Σ in · out over ModelProjections), for parameter and FLOP counts.
int64_t LayerMatrixParameters(const ModelConfig& config);

// Hugging Face's names for the family's modules (model/families/family.h ModuleNames): a layer's prefix
// ("model.layers.3.", "gpt_neox.layers.3."), a projection's path in the layer ("self_attn.q_proj",
// "attention.query_key_value") and its module name (the path's last part, what PEFT's target_modules lists).
std::string LayerPrefix(const ModelConfig& config, int64_t layer);
std::string ProjectionPath(const ModelConfig& config, Projection p);
std::string ModuleName(const ModelConfig& config, Projection p);
// Whether the family's checkpoints store the layers' projections (in, out), as GPT-2's Conv1D modules do.
bool StoresTransposed(const ModelConfig& config);
// The name PEFT's target_modules gives projection `p`: its module name, or its path in the layer where the module
// name is not unique (GPT-2's "attn.c_proj" and "mlp.c_proj").
std::string TargetModuleName(const ModelConfig& config, Projection p);
// The projections of `config` a target_modules key denotes, as PEFT matches them (a module whose name is the key
// or ends with "." + key: GPT-2's "c_proj" is both attn.c_proj and mlp.c_proj), or the one Seedling's canonical
// name (ProjectionName, of the key's last part) denotes; empty for any other.
std::vector<Projection> ProjectionsOfModule(const ModelConfig& config, std::string_view name);
// The same without a model: a canonical name, or a module name or path that denotes one projection in every
// family that has it ("query_key_value", "dense_h_to_4h", "attn.c_proj"); nullopt for any other.
std::optional<Projection> ProjectionOfAnyModule(std::string_view name);

}  // namespace seedling::model
