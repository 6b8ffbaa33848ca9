#include "model/llama.h"

#include <ATen/ATen.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <numbers>
#include <vector>

#include "model/memory_tracker.h"

namespace seedling::model {
namespace {

// The block's variants the forward composes: Llama (tied, GQA), Qwen2 (q/k/v biases, untied, head_dim x heads
// != hidden), Qwen3 (per-head q/k RMSNorm, no biases, head_dim x heads != hidden) and OLMo 2 (norms on the
// outputs of attention and MLP instead of their inputs, q/k RMSNorm over the whole projections), and the block
// options Gemma 2 and 3 add (GeGLU, norms scaling by 1 + w before and after each sub-block, embeddings scaled by
// sqrt(hidden), a query scale of its own, local windowed layers with their own RoPE base alternating with
// global ones), Gemma 2's block (no q/k norms, one RoPE base, attention scores and logits soft-capped), and
// Phi-3's (q, k, v and gate, up each one fused matrix, LongRoPE, every layer windowed), and GPT-NeoX's
// (LayerNorms with biases, attention and MLP in parallel, half of each head rotated, query_key_value fused per
// head, a plain exact-GELU MLP, biases everywhere), GPT-2's (learned positions added to the embeddings, no
// RoPE, c_attn fused as q | k | v, tanh-GELU MLP, LayerNorms), and Phi's (one LayerNorm whose output both
// attention and the MLP read, in parallel, half of each head rotated, biases everywhere, the LM head's too), and
// OPT-350m's (post-LN: each residual sum normalized, no final norm, embeddings narrower than the blocks projected
// in and out, OPT's position table, ReLU).
enum class Family { kLlama, kQwen2, kQwen3, kOlmo2, kGemmaBlock, kGemma2Block, kPhi3, kGptNeoX, kGpt2, kPhi, kOpt350 };
constexpr Family kFamilies[] = {Family::kLlama,      Family::kQwen2,       Family::kQwen3, Family::kOlmo2,
                                Family::kGemmaBlock, Family::kGemma2Block, Family::kPhi3,  Family::kGptNeoX,
                                Family::kGpt2,       Family::kPhi,         Family::kOpt350};

const char* FamilyName(Family f) {
  switch (f) {
    case Family::kLlama:
      return "llama (tied, GQA)";
    case Family::kQwen2:
      return "qwen2 (q/k/v bias, untied head, head_dim != hidden/heads)";
    case Family::kQwen3:
      return "qwen3 (q/k norms per head, untied head, head_dim != hidden/heads)";
    case Family::kOlmo2:
      return "olmo2 (output norms, q/k norms per projection, GQA, head_dim != hidden/heads)";
    case Family::kGemmaBlock:
      return "gemma-style block (GeGLU, 1 + w norms before and after, scaled embeddings and queries, local/global)";
    case Family::kGemma2Block:
      return "gemma2-style block (as gemma's without q/k norms, soft-capped attention scores and logits)";
    case Family::kPhi3:
      return "phi3 (fused qkv_proj and gate_up_proj, LongRoPE, GQA, every layer windowed)";
    case Family::kGptNeoX:
      return "gpt_neox (LayerNorm, parallel residual, partial rotary, per-head query_key_value, GELU MLP)";
    case Family::kGpt2:
      return "gpt2 (learned positions, LayerNorm, fused c_attn, tanh-GELU MLP)";
    case Family::kPhi:
      return "phi (one LayerNorm for parallel attention and MLP, partial rotary, LM head bias)";
    case Family::kOpt350:
      return "opt-350m (post-LN, no final norm, projected embeddings, learned positions offset by 2, ReLU)";
  }
  return "?";
}

ModelConfig TwoLayerConfig(Family f) {
  const bool llama = f == Family::kLlama;
  ModelConfig c;
  const char* const architectures[] = {"LlamaForCausalLM", "Qwen2ForCausalLM",   "Qwen3ForCausalLM",
                                       "Olmo2ForCausalLM", "Gemma3ForCausalLM",  "Gemma2ForCausalLM",
                                       "Phi3ForCausalLM",  "GPTNeoXForCausalLM", "GPT2LMHeadModel",
                                       "PhiForCausalLM",   "OPTForCausalLM"};
  const char* const model_types[] = {"llama", "qwen2",    "qwen3", "olmo2", "gemma3_text", "gemma2",
                                     "phi3",  "gpt_neox", "gpt2",  "phi",   "opt"};
  c.architecture = architectures[static_cast<int>(f)];
  c.model_type = model_types[static_cast<int>(f)];
  c.vocab_size = 13;
  c.hidden_size = 12;
  c.intermediate_size = 20;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 6;
  c.num_key_value_heads = llama ? 3 : 2;
  c.head_dim = llama ? 2 : 4;  // the others: q_dim (24) differs from hidden (12)
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 100.0;
  c.tie_word_embeddings = llama;
  c.qkv_bias = f == Family::kQwen2;
  c.qk_norm = f == Family::kQwen3 ? QkNorm::kPerHead : f == Family::kOlmo2 ? QkNorm::kPerProjection : QkNorm::kNone;
  if (f == Family::kOlmo2) {
    c.norms = {.pre_attention = false, .attention_output = true, .pre_mlp = false, .mlp_output = true};
  }
  if (f == Family::kGemmaBlock || f == Family::kGemma2Block) {
    c.norms = {.pre_attention = true, .attention_output = true, .pre_mlp = true, .mlp_output = true};
    c.qk_norm = f == Family::kGemmaBlock ? QkNorm::kPerHead : QkNorm::kNone;
    c.mlp_activation = MlpActivation::kGeluTanh;
    c.norm_weight_offset = 1.0;
    c.scale_embeddings = true;
    c.attention_scale = 1.0 / std::sqrt(6.0);  // query_pre_attn_scalar 6 != head_dim 4
    c.sliding_window = 3;
    c.sliding_window_pattern = 2;  // layer 0 local (window 3, RoPE base 10), layer 1 global (base 100)
    c.rope_local_theta = 10.0;
  }
  if (f == Family::kGemma2Block) {
    c.rope_local_theta = 0.0;   // one base for both kinds of layer
    c.attention_softcap = 2.0;  // low enough that the scaled-up weights' scores and logits reach past the caps
    c.final_logit_softcap = 3.0;
  }
  if (f == Family::kPhi3) {
    c.fused = {.qkv = true, .gate_up = true};
    c.sliding_window = 3;  // every layer
    c.max_position_embeddings = 64;
    c.rope_scaling.type = RopeScaling::Type::kLongRope;
    c.rope_scaling.original_max_position_embeddings = 4;  // 7 tokens take the long factors
    c.rope_scaling.short_factor = {1.0, 1.7};
    c.rope_scaling.long_factor = {2.0, 5.0};
  }
  if (f == Family::kGptNeoX) {
    c.num_key_value_heads = 6;  // query_key_value is per head: no GQA
    c.head_dim = 4;             // q_dim 24 != hidden 12, so the fused rows' layout matters
    c.norm_kind = NormKind::kLayerNorm;
    c.gated_mlp = false;
    c.mlp_activation = MlpActivation::kGelu;
    c.partial_rotary_factor = 0.5;  // 2 of each head's 4 dimensions rotated
    c.parallel_residual = true;
    c.fused = {.qkv = true, .qkv_per_head = true};
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
  }
  if (f == Family::kGpt2) {
    c.num_key_value_heads = 6;
    c.head_dim = 2;  // q_dim = hidden, as GPT-2 has
    c.norm_kind = NormKind::kLayerNorm;
    c.gated_mlp = false;
    c.mlp_activation = MlpActivation::kGeluTanh;
    c.positions = PositionKind::kLearned;
    c.max_position_embeddings = 16;
    c.fused = {.qkv = true};
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
    c.tie_word_embeddings = true;
  }
  if (f == Family::kPhi) {
    c.num_key_value_heads = 3;  // GQA: q_dim 24 != hidden 12, k and v 12 each
    c.norm_kind = NormKind::kLayerNorm;
    c.norms = {.pre_attention = true, .attention_output = false, .pre_mlp = false, .mlp_output = false};
    c.parallel_residual = true;
    c.gated_mlp = false;
    c.mlp_activation = MlpActivation::kGeluTanh;
    c.partial_rotary_factor = 0.5;
    c.qkv_bias = c.o_bias = c.mlp_bias = c.lm_head_bias = true;
  }
  if (f == Family::kOpt350) {
    c.num_key_value_heads = 6;
    c.head_dim = 2;
    c.norm_kind = NormKind::kLayerNorm;
    c.gated_mlp = false;
    c.mlp_activation = MlpActivation::kRelu;
    c.positions = PositionKind::kLearned;
    c.position_offset = 2;
    c.max_position_embeddings = 16;
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
    c.tie_word_embeddings = true;
    c.norm_after_residual = true;
    c.norms.final = false;
    c.word_embed_proj_dim = 8;  // embeddings and LM head 8 wide, blocks 12
  }
  return c;
}

// LongRoPE's factors and attention factor as Phi-3's modeling code computes them, for a forward of T tokens:
// the long factors past the pre-trained context, cos and sin scaled by sqrt(1 + ln(max / original) / ln(original)).
struct RopeRefScaling {
  std::vector<double> divisors;  // per pair; empty = none
  double scale = 1.0;
};
RopeRefScaling LongRopeRef(const ModelConfig& c, size_t T) {
  if (c.rope_scaling.type != RopeScaling::Type::kLongRope) return {};
  const double original = static_cast<double>(c.rope_scaling.original_max_position_embeddings);
  const double s = static_cast<double>(c.max_position_embeddings) / original;
  return {static_cast<double>(T) > original ? c.rope_scaling.long_factor : c.rope_scaling.short_factor,
          s > 1 ? std::sqrt(1.0 + std::log(s) / std::log(original)) : 1.0};
}

std::unique_ptr<LlamaModel> MakeModel(const ModelConfig& c, uint64_t seed) {
  auto model = LlamaModel::Create(c, RandomWeights(c, seed));
  REQUIRE(model.ok());
  // Random init is too gentle to exercise much; scale weights up so attention is far from uniform, and
  // give the norms (initialized to 1) weights of their own.
  at::manual_seed(static_cast<int64_t>(seed));
  for (const NamedWeight& nw : NamedWeights((*model)->weights(), c)) {
    if (nw.name.find("norm") == std::string::npos) {
      nw.tensor.mul_(15.0);
    } else {
      nw.tensor.copy_(at::rand(nw.tensor.sizes()) + 0.5);
    }
  }
  return std::move(model).value();
}

// ---- A naive reference decoder written for clarity: plain loops over floats, double accumulation. ----
using Mat = std::vector<std::vector<double>>;

double At(const at::Tensor& t, int64_t i, int64_t j) { return t[i][j].item<double>(); }

Mat Linear(const Mat& x, const at::Tensor& w, const at::Tensor& b) {
  const int64_t out = w.size(0), in = w.size(1);
  Mat y(x.size(), std::vector<double>(static_cast<size_t>(out)));
  for (size_t t = 0; t < x.size(); ++t) {
    for (int64_t o = 0; o < out; ++o) {
      double s = b.defined() ? b[o].item<double>() : 0.0;
      for (int64_t i = 0; i < in; ++i) s += At(w, o, i) * x[t][static_cast<size_t>(i)];
      y[t][static_cast<size_t>(o)] = s;
    }
  }
  return y;
}

// Columns [first, first + n) of every row.
Mat Columns(const Mat& x, int64_t first, int64_t n) {
  Mat y;
  for (const auto& row : x) y.emplace_back(row.begin() + first, row.begin() + first + n);
  return y;
}

Mat RmsNormRef(const Mat& x, const at::Tensor& w, double eps, double offset = 0.0) {
  Mat y = x;
  for (size_t t = 0; t < x.size(); ++t) {
    double ms = 0;
    for (double v : x[t]) ms += v * v;
    ms /= static_cast<double>(x[t].size());
    for (size_t i = 0; i < x[t].size(); ++i)
      y[t][i] = x[t][i] / std::sqrt(ms + eps) * (offset + w[static_cast<int64_t>(i)].item<double>());
  }
  return y;
}

// (x − mean) / sqrt(var + eps) · w + b over each row, the biased variance (torch.nn.LayerNorm).
Mat LayerNormRef(const Mat& x, const at::Tensor& w, const at::Tensor& b, double eps) {
  Mat y = x;
  for (size_t t = 0; t < x.size(); ++t) {
    const auto n = static_cast<double>(x[t].size());
    double mean = 0, var = 0;
    for (double v : x[t]) mean += v / n;
    for (double v : x[t]) var += (v - mean) * (v - mean) / n;
    for (size_t i = 0; i < x[t].size(); ++i) {
      const auto j = static_cast<int64_t>(i);
      y[t][i] = (x[t][i] - mean) / std::sqrt(var + eps) * w[j].item<double>() + b[j].item<double>();
    }
  }
  return y;
}

// The block's norm of the config's kind.
Mat NormRef(const ModelConfig& c, const Mat& x, const at::Tensor& w, const at::Tensor& b) {
  if (c.norm_kind == NormKind::kLayerNorm) return LayerNormRef(x, w, b, c.rms_norm_eps);
  return RmsNormRef(x, w, c.rms_norm_eps, c.norm_weight_offset);
}

// RMSNorm over each head's d values (Qwen3's q/k norm), with the same weights for every head.
void HeadRmsNormRef(Mat& x, int64_t heads, int64_t d, const at::Tensor& w, double eps, double offset) {
  for (size_t t = 0; t < x.size(); ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      double ms = 0;
      for (int64_t i = 0; i < d; ++i) ms += x[t][static_cast<size_t>(h * d + i)] * x[t][static_cast<size_t>(h * d + i)];
      ms /= static_cast<double>(d);
      for (int64_t i = 0; i < d; ++i) {
        x[t][static_cast<size_t>(h * d + i)] *= (offset + w[i].item<double>()) / std::sqrt(ms + eps);
      }
    }
  }
}

// Rotates the first `r` dimensions of each head (pairs i, i + r/2 at angle t / theta^(2i / r)); the rest stay.
void RopeRef(Mat& x, int64_t heads, int64_t d, int64_t r, double theta, const RopeRefScaling& scaling = {}) {
  for (size_t t = 0; t < x.size(); ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < r / 2; ++i) {
        const double divisor = scaling.divisors.empty() ? 1.0 : scaling.divisors[static_cast<size_t>(i)];
        const double angle =
            static_cast<double>(t) / (divisor * std::pow(theta, 2.0 * static_cast<double>(i) / static_cast<double>(r)));
        const double cos = std::cos(angle) * scaling.scale, sin = std::sin(angle) * scaling.scale;
        double& a = x[t][static_cast<size_t>(h * d + i)];
        double& b = x[t][static_cast<size_t>(h * d + i + r / 2)];
        const double na = a * cos - b * sin;
        const double nb = b * cos + a * sin;
        a = na;
        b = nb;
      }
    }
  }
}

double GeluTanh(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x)));
}

double Act(MlpActivation a, double x) {
  switch (a) {
    case MlpActivation::kSilu:
      return x / (1.0 + std::exp(-x));
    case MlpActivation::kGeluTanh:
      return GeluTanh(x);
    case MlpActivation::kGelu:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case MlpActivation::kRelu:
      return std::max(x, 0.0);
  }
  return x;
}

Mat NaiveLogits(const ModelConfig& c, const ModelWeights& w, const std::vector<int64_t>& tokens) {
  const size_t T = tokens.size();
  const int64_t H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const double eps = c.rms_norm_eps, off = c.norm_weight_offset;
  const double embed_scale = c.scale_embeddings ? std::sqrt(static_cast<double>(H)) : 1.0;
  const double score_scale = c.attention_scale > 0 ? c.attention_scale : 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t E = c.embedding_dim();
  Mat x(T, std::vector<double>(static_cast<size_t>(E)));
  for (size_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < E; ++i) x[t][static_cast<size_t>(i)] = At(w.embed, tokens[t], i) * embed_scale;
  }
  if (c.projects_embeddings()) x = Linear(x, w.project_in, at::Tensor());  // (T, E) -> (T, H)
  for (size_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < H; ++i) {
      // Learned positions: row t + offset of the table (OPT keeps two unused rows first).
      if (c.positions == PositionKind::kLearned) {
        x[t][static_cast<size_t>(i)] += At(w.positions, static_cast<int64_t>(t) + c.position_offset, i);
      }
    }
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    // Local layers: a window (sliding_window_pattern 2: every second layer is global) and their own base.
    const bool local = c.sliding_window.has_value() && (c.sliding_window_pattern == 0 || (l + 1) % 2 != 0);
    const double theta = local && c.rope_local_theta > 0 ? c.rope_local_theta : c.rope_theta;
    // Post-LN normalizes the residual sums below instead of the sub-blocks' inputs.
    const bool pre_norms = !c.norm_after_residual;
    const Mat h = c.norms.pre_attention && pre_norms ? NormRef(c, x, lw.input_norm, lw.input_norm_bias) : x;
    Mat q, k, v;
    if (c.fused.qkv_per_head) {  // rows q_h | k_h | v_h for each head h
      const Mat qkv = Linear(h, lw.qkv, lw.qkv_bias);
      q = k = v = Mat(T, std::vector<double>(static_cast<size_t>(Hq * D)));
      for (size_t t = 0; t < T; ++t) {
        for (int64_t head = 0; head < Hq; ++head) {
          for (int64_t i = 0; i < D; ++i) {
            const auto at = static_cast<size_t>(head * D + i);
            q[t][at] = qkv[t][static_cast<size_t>((3 * head) * D + i)];
            k[t][at] = qkv[t][static_cast<size_t>((3 * head + 1) * D + i)];
            v[t][at] = qkv[t][static_cast<size_t>((3 * head + 2) * D + i)];
          }
        }
      }
    } else if (c.fused.qkv) {  // rows q | k | v of one matrix
      const Mat qkv = Linear(h, lw.qkv, lw.qkv_bias);
      q = Columns(qkv, 0, Hq * D);
      k = Columns(qkv, Hq * D, Hkv * D);
      v = Columns(qkv, (Hq + Hkv) * D, Hkv * D);
    } else {
      q = Linear(h, lw.q, lw.q_bias), k = Linear(h, lw.k, lw.k_bias), v = Linear(h, lw.v, lw.v_bias);
    }
    if (c.qk_norm == QkNorm::kPerHead) {
      HeadRmsNormRef(q, Hq, D, lw.q_norm, eps, off);
      HeadRmsNormRef(k, Hkv, D, lw.k_norm, eps, off);
    } else if (c.qk_norm == QkNorm::kPerProjection) {
      q = RmsNormRef(q, lw.q_norm, eps, off);
      k = RmsNormRef(k, lw.k_norm, eps, off);
    }
    const int64_t rotary = static_cast<int64_t>(static_cast<double>(D) * c.partial_rotary_factor);
    if (c.positions == PositionKind::kRope) {
      RopeRef(q, Hq, D, rotary, theta, LongRopeRef(c, T));
      RopeRef(k, Hkv, D, rotary, theta, LongRopeRef(c, T));
    }
    Mat attn(T, std::vector<double>(static_cast<size_t>(Hq * D), 0.0));
    for (int64_t head = 0; head < Hq; ++head) {
      const int64_t kvh = head / (Hq / Hkv);
      for (size_t t = 0; t < T; ++t) {
        // Keys at positions first..t: all before, or the last `window` with a sliding window.
        const size_t window = local ? static_cast<size_t>(*c.sliding_window) : t + 1;
        const size_t first = t + 1 > window ? t + 1 - window : 0;
        std::vector<double> score(t + 1, 0.0);
        double mx = -1e300;
        for (size_t s = first; s <= t; ++s) {
          double dot = 0;
          for (int64_t i = 0; i < D; ++i)
            dot += q[t][static_cast<size_t>(head * D + i)] * k[s][static_cast<size_t>(kvh * D + i)];
          score[s] = dot * score_scale;
          if (c.attention_softcap > 0) score[s] = c.attention_softcap * std::tanh(score[s] / c.attention_softcap);
          mx = std::max(mx, score[s]);
        }
        double z = 0;
        for (size_t s = first; s <= t; ++s) z += (score[s] = std::exp(score[s] - mx));
        for (size_t s = first; s <= t; ++s) {
          for (int64_t i = 0; i < D; ++i) {
            attn[t][static_cast<size_t>(head * D + i)] += score[s] / z * v[s][static_cast<size_t>(kvh * D + i)];
          }
        }
      }
    }
    Mat o = Linear(attn, lw.o, lw.o_bias);
    if (c.norms.attention_output) o = NormRef(c, o, lw.attention_output_norm, lw.attention_output_norm_bias);
    // Parallel residual: the MLP reads the block's input (through its own norm), and both add to it at the end.
    const Mat block_input = x;
    if (!c.parallel_residual) {
      for (size_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < H; ++i) x[t][static_cast<size_t>(i)] += o[t][static_cast<size_t>(i)];
      }
      if (!pre_norms) x = NormRef(c, x, lw.input_norm, lw.input_norm_bias);  // x = n1(x + attn(x))
    }
    // Without a norm of its own, a parallel MLP reads attention's normed input (Phi), a sequential one x.
    const Mat& mlp_input = c.parallel_residual ? block_input : x;
    const Mat h2 = c.norms.pre_mlp && pre_norms ? NormRef(c, mlp_input, lw.pre_mlp_norm, lw.pre_mlp_norm_bias)
                   : c.parallel_residual        ? h
                                                : mlp_input;
    const int64_t I = c.intermediate_size;
    Mat act;
    if (c.gated_mlp) {
      const Mat gate_up = c.fused.gate_up ? Linear(h2, lw.gate_up, lw.gate_up_bias) : Mat();  // rows gate | up
      const Mat g = c.fused.gate_up ? Columns(gate_up, 0, I) : Linear(h2, lw.gate, lw.gate_bias);
      const Mat u = c.fused.gate_up ? Columns(gate_up, I, I) : Linear(h2, lw.up, lw.up_bias);
      act = g;
      for (size_t t = 0; t < T; ++t) {
        for (size_t i = 0; i < g[t].size(); ++i) act[t][i] = Act(c.mlp_activation, g[t][i]) * u[t][i];
      }
    } else {  // down(act(up(x)))
      act = Linear(h2, lw.up, lw.up_bias);
      for (auto& row : act) {
        for (double& a : row) a = Act(c.mlp_activation, a);
      }
    }
    Mat down = Linear(act, lw.down, lw.down_bias);
    if (c.norms.mlp_output) down = NormRef(c, down, lw.mlp_output_norm, lw.mlp_output_norm_bias);
    for (size_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < H; ++i) {
        const auto j = static_cast<size_t>(i);
        x[t][j] += down[t][j] + (c.parallel_residual ? o[t][j] : 0.0);
      }
    }
    if (!pre_norms) x = NormRef(c, x, lw.pre_mlp_norm, lw.pre_mlp_norm_bias);  // x = n2(x + mlp(x))
  }
  if (c.norms.final) x = NormRef(c, x, w.final_norm, w.final_norm_bias);
  if (c.projects_embeddings()) x = Linear(x, w.project_out, at::Tensor());  // (T, H) -> (T, E)
  Mat logits = Linear(x, w.lm_head, w.lm_head_bias);
  if (c.final_logit_softcap > 0) {
    for (auto& row : logits) {
      for (double& z : row) z = c.final_logit_softcap * std::tanh(z / c.final_logit_softcap);
    }
  }
  return logits;
}

at::Tensor Tokens(std::vector<int64_t> ids) {
  return at::tensor(ids, at::kLong).view({1, static_cast<int64_t>(ids.size())});
}

// With LongRoPE: the 7 tokens reach past a pre-trained context of 4 (long factors), or stay within 64 (short ones).
// GPT-NeoX: with use_parallel_residual off too, and with ReLU (OPT's activation) in its plain MLP.
std::vector<ModelConfig> ReferenceConfigs(Family f) {
  std::vector<ModelConfig> out = {TwoLayerConfig(f)};
  if (out[0].rope_scaling.type == RopeScaling::Type::kLongRope) {
    out.push_back(out[0]);
    out[1].rope_scaling.original_max_position_embeddings = 64;
    // Phi-4-mini: half of each head rotated, one LongRoPE factor per rotated pair.
    out.push_back(out[0]);
    out[2].partial_rotary_factor = 0.5;
    out[2].rope_scaling.short_factor = {1.7};
    out[2].rope_scaling.long_factor = {5.0};
  }
  if (out[0].parallel_residual) {
    out.push_back(out[0]);
    out[1].parallel_residual = false;
    out[1].mlp_activation = MlpActivation::kRelu;
  }
  if (out[0].positions == PositionKind::kLearned) {  // OPT's table: two unused rows before position 0
    out.push_back(out[0]);
    out[1].position_offset = 2;
  }
  return out;
}

TEST_CASE("The model's forward equals a naive loop-based reference on a 2-layer model", "[model][llama]") {
  for (Family f : kFamilies) {
    for (const ModelConfig& c : ReferenceConfigs(f)) {
      INFO(FamilyName(f) << ", original context " << c.rope_scaling.original_max_position_embeddings
                         << ", parallel residual " << c.parallel_residual << ", position offset " << c.position_offset
                         << ", rotary share " << c.partial_rotary_factor);
      auto model = MakeModel(c, 11);
      if (f == Family::kQwen2) {
        for (LayerWeights& lw : model->mutable_weights().layers) lw.q_bias.add_(0.5);  // biases must matter
      }
      if (c.lm_head_bias) model->mutable_weights().lm_head_bias.add_(at::linspace(-2.0, 2.0, c.vocab_size));
      const std::vector<int64_t> ids = {1, 5, 12, 0, 7, 7, 3};
      auto logits = model->Logits(Tokens(ids));
      REQUIRE(logits.ok());
      const Mat ref = NaiveLogits(c, model->weights(), ids);
      double max_diff = 0, max_ref = 0;
      for (size_t t = 0; t < ids.size(); ++t) {
        for (int64_t v = 0; v < c.vocab_size; ++v) {
          max_diff = std::max(max_diff, std::abs((*logits)[0][static_cast<int64_t>(t)][v].item<double>() -
                                                 ref[t][static_cast<size_t>(v)]));
          max_ref = std::max(max_ref, std::abs(ref[t][static_cast<size_t>(v)]));
        }
      }
      CHECK(max_ref > 0.5);  // the comparison is not trivially between near-zero numbers
      CHECK(max_diff < 1e-4 * std::max(1.0, max_ref));
      if (c.attention_softcap > 0) {  // both caps bend the logits: without either the reference moves
        ModelConfig uncapped = c;
        uncapped.attention_softcap = 0;
        const Mat no_attention_cap = NaiveLogits(uncapped, model->weights(), ids);
        uncapped = c;
        uncapped.final_logit_softcap = 0;
        const Mat no_final_cap = NaiveLogits(uncapped, model->weights(), ids);
        double attention_moves = 0, final_moves = 0;
        for (size_t t = 0; t < ids.size(); ++t) {
          for (size_t v = 0; v < ref[t].size(); ++v) {
            attention_moves = std::max(attention_moves, std::abs(no_attention_cap[t][v] - ref[t][v]));
            final_moves = std::max(final_moves, std::abs(no_final_cap[t][v] - ref[t][v]));
          }
        }
        CHECK(attention_moves > 1e-2);
        CHECK(final_moves > 1e-2);
      }
    }
  }
}

TEST_CASE("KV-cache decoding gives the full-forward logits at every position", "[model][llama]") {
  for (Family f : kFamilies) {
    INFO(FamilyName(f));
    ModelConfig c = TwoLayerConfig(f);
    // LongRoPE picks its factors per forward by how far it reaches, as Hugging Face's does: a cached decode
    // matches the full forward while both stay within the pre-trained context.
    if (c.rope_scaling.type == RopeScaling::Type::kLongRope) c.rope_scaling.original_max_position_embeddings = 64;
    auto model = MakeModel(c, 12);
    const at::Tensor tokens = at::tensor({3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3}, at::kLong).view({2, 8});
    auto full = model->Logits(tokens);
    REQUIRE(full.ok());
    KvCache cache(c, 2, 16);
    // A 3-token prefill, then one token at a time.
    auto prefill = model->ForwardCached(tokens.narrow(1, 0, 3), cache);
    REQUIRE(prefill.ok());
    CHECK((*prefill - full->narrow(1, 0, 3)).abs().max().item<double>() < 1e-4);
    for (int64_t t = 3; t < 8; ++t) {
      auto step = model->ForwardCached(tokens.narrow(1, t, 1), cache, /*last_only=*/true);
      REQUIRE(step.ok());
      INFO("position " << t);
      CHECK((*step - full->narrow(1, t, 1)).abs().max().item<double>() < 1e-4);
    }
    CHECK(cache.length() == 8);
  }
}

TEST_CASE("A KV cache that would overflow is an OutOfRange error and keeps its length", "[model][llama]") {
  const ModelConfig c = TwoLayerConfig(Family::kLlama);
  auto model = MakeModel(c, 13);
  KvCache cache(c, 1, 4);
  REQUIRE(model->ForwardCached(Tokens({1, 2, 3}), cache).ok());
  auto over = model->ForwardCached(Tokens({1, 2}), cache);
  CHECK(over.status().code() == absl::StatusCode::kOutOfRange);
  CHECK(cache.length() == 3);
}

TEST_CASE("Recomputation on, off and of some layers gives the same loss and gradients", "[model][llama]") {
  // Every weight gets a gradient: biases, q/k norms, OLMo 2's output norms (the MLP's one reads the down
  // projection's values, which a graph-only recomputation must not skip).
  for (Family f : {Family::kQwen2, Family::kQwen3, Family::kOlmo2, Family::kGemmaBlock, Family::kGemma2Block,
                   Family::kPhi3, Family::kGptNeoX, Family::kGpt2, Family::kPhi, Family::kOpt350}) {
    INFO(FamilyName(f));
    const ModelConfig c = TwoLayerConfig(f);
    auto model = MakeModel(c, 14);
    std::vector<NamedWeight> named = NamedWeights(model->weights(), c);
    for (NamedWeight& nw : named) nw.tensor.requires_grad_(true);
    const at::Tensor tokens = at::tensor({1, 5, 12, 0, 7, 7, 3, 2, 9, 4}, at::kLong).view({2, 5});
    at::Tensor labels = tokens.clone();
    labels[0][2] = kIgnoreIndex;

    auto run = [&](bool recompute, int64_t stored_layers) {
      for (NamedWeight& nw : named) nw.tensor.mutable_grad() = at::Tensor();
      ForwardOptions opts;
      opts.recompute = recompute;
      opts.stored_layers = stored_layers;
      opts.ce_chunk_tokens = 3;
      auto loss = model->Loss(tokens, labels, opts);
      REQUIRE(loss.ok());
      CHECK(loss->tokens == 7);
      loss->mean().backward();
      std::vector<at::Tensor> grads;
      for (NamedWeight& nw : named) grads.push_back(nw.tensor.grad().clone());
      return std::make_pair(loss->mean().item<double>(), grads);
    };
    const auto [loss_plain, grads_plain] = run(false, 0);
    for (int64_t stored : {0, 1}) {  // every layer recomputed, or only the first (the last one stored)
      INFO("stored layers " << stored);
      const auto [loss_recompute, grads_recompute] = run(true, stored);
      CHECK(std::abs(loss_plain - loss_recompute) < 1e-6);
      for (size_t i = 0; i < named.size(); ++i) {
        INFO(named[i].name);
        REQUIRE(grads_plain[i].defined());
        CHECK(grads_plain[i].abs().max().item<double>() > 0);
        CHECK((grads_plain[i] - grads_recompute[i]).abs().max().item<double>() < 1e-5);
      }
    }
  }
}

TEST_CASE("Recomputation lowers the peak tensor memory of a training step, partly with stored layers",
          "[model][llama]") {
  ModelConfig c = TwoLayerConfig(Family::kLlama);
  c.num_hidden_layers = 12;
  c.hidden_size = 32;
  c.intermediate_size = 96;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  auto model = LlamaModel::Create(c, RandomWeights(c, 17));
  REQUIRE(model.ok());
  // Only the embedding output needs gradients (as with an adapter): the peak is activations.
  const at::Tensor tokens = at::randint(0, c.vocab_size, {2, 128}, at::kLong);
  auto peak = [&](bool recompute, int64_t stored_layers) {
    for (const NamedWeight& nw : NamedWeights((*model)->weights(), c))
      nw.tensor.requires_grad_(nw.name.find("embed") != std::string::npos);
    TensorMemoryTracker tracker;
    ForwardOptions o;
    o.recompute = recompute;
    o.stored_layers = stored_layers;
    auto loss = (*model)->Loss(tokens, tokens, o);
    REQUIRE(loss.ok());
    loss->mean().backward();
    return tracker.peak_bytes();
  };
  const int64_t plain = peak(false, 0), recomputed = peak(true, 0), half = peak(true, 6);
  INFO("peak without recomputation " << plain << " B, with " << recomputed << " B, half the layers stored " << half
                                     << " B");
  CHECK(recomputed < plain / 2);
  CHECK(half > recomputed);
  CHECK(half < plain);
}

TEST_CASE("Loss equals cross-entropy computed from the full logits", "[model][llama]") {
  // Gemma 2's block: the loss's chunked kernel and the logits both soft-cap, alike; Phi's: both add the LM
  // head's bias.
  for (Family f : {Family::kLlama, Family::kGemma2Block, Family::kPhi}) {
    INFO(FamilyName(f));
    const ModelConfig c = TwoLayerConfig(f);
    auto model = MakeModel(c, 15);
    if (c.lm_head_bias) model->mutable_weights().lm_head_bias.add_(at::linspace(-2.0, 2.0, c.vocab_size));
    const at::Tensor tokens = Tokens({4, 8, 11, 1, 6, 2});
    auto loss = model->Loss(tokens, tokens);
    auto logits = model->Logits(tokens);
    REQUIRE(loss.ok());
    REQUIRE(logits.ok());
    const at::Tensor logp = at::log_softmax(logits->narrow(1, 0, 5).reshape({5, 13}), 1);
    const at::Tensor targets = tokens.narrow(1, 1, 5).reshape({5});
    const double ref = -logp.gather(1, targets.unsqueeze(1)).mean().item<double>();
    CHECK(loss->tokens == 5);
    CHECK(std::abs(loss->mean().item<double>() - ref) < 1e-5);
  }
}

TEST_CASE("A forward past a learned position table is InvalidArgument, in full or through the KV cache",
          "[model][llama]") {
  const ModelConfig c = TwoLayerConfig(Family::kGpt2);  // 16 positions
  auto model = MakeModel(c, 18);
  const at::Tensor tokens = at::randint(0, c.vocab_size, {1, 17}, at::kLong);
  const auto too_long = model->Logits(tokens);
  REQUIRE_FALSE(too_long.ok());
  CHECK(too_long.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(too_long.status().message()).find("position table holds") != std::string::npos);
  CHECK(model->Logits(tokens.narrow(1, 0, 16)).ok());
  CHECK_FALSE(model->Loss(tokens, tokens).ok());
  KvCache cache(c, 1, 32);
  REQUIRE(model->ForwardCached(tokens.narrow(1, 0, 16), cache).ok());
  CHECK(model->ForwardCached(tokens.narrow(1, 16, 1), cache).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(cache.length() == 16);
}

TEST_CASE("Bad tokens and labels are rejected with InvalidArgument", "[model][llama]") {
  const ModelConfig c = TwoLayerConfig(Family::kLlama);
  auto model = MakeModel(c, 16);
  CHECK(model->Hidden(Tokens({1, 13})).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(model->Hidden(Tokens({-1, 2})).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(model->Hidden(at::zeros({3}, at::kLong)).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(model->Hidden(at::zeros({1, 3}, at::kFloat)).status().code() == absl::StatusCode::kInvalidArgument);
  auto bad_labels = model->Loss(Tokens({1, 2, 3}), Tokens({1, 2, 99}));
  CHECK(bad_labels.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad_labels.status().message()).find("labels") != std::string::npos);
}

TEST_CASE("Create rejects weights whose shapes disagree with the config", "[model][llama]") {
  const ModelConfig c = TwoLayerConfig(Family::kLlama);
  ModelWeights w = RandomWeights(c, 1);
  w.layers[1].k = at::zeros({5, 12});
  auto model = LlamaModel::Create(c, std::move(w));
  REQUIRE_FALSE(model.ok());
  CHECK(std::string(model.status().message()).find("model.layers.1.self_attn.k_proj.weight") != std::string::npos);
}

}  // namespace
}  // namespace seedling::model
