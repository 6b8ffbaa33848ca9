#include "model/config.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace seedling::model {
namespace {

bool Contains(const absl::Status& s, const std::string& needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

// SmolLM2-135M's published config.json.
constexpr const char* kSmolLm2 = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 0, "eos_token_id": 0, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
  "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": true,
  "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9,
  "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": true, "vocab_size": 49152})";

TEST_CASE("SmolLM2-135M's config.json parses to its shapes and 134.5M parameters", "[model][config]") {
  auto c = ParseModelConfig(kSmolLm2);
  REQUIRE(c.ok());
  CHECK(c->architecture == "LlamaForCausalLM");
  CHECK(c->hidden_size == 576);
  CHECK(c->num_hidden_layers == 30);
  CHECK(c->num_attention_heads == 9);
  CHECK(c->num_key_value_heads == 3);
  CHECK(c->head_dim == 64);
  CHECK(c->intermediate_size == 1536);
  CHECK(c->vocab_size == 49152);
  CHECK(c->tie_word_embeddings);
  CHECK(c->rope_theta == 100000.0);
  CHECK(c->rms_norm_eps == 1e-5);
  CHECK(c->torch_dtype == "bfloat16");
  CHECK(c->eos_token_ids == std::vector<int64_t>{0});
  CHECK(c->NumParameters() == 134515008);
}

TEST_CASE("The smollm2-135m preset has exactly the published shapes", "[model][config]") {
  auto preset = PresetConfig("smollm2-135m");
  auto published = ParseModelConfig(kSmolLm2);
  REQUIRE(preset.ok());
  REQUIRE(published.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*published));
}

TEST_CASE("Qwen2 configs get q/k/v biases and honour use_sliding_window", "[model][config]") {
  auto c = ParseModelConfig(R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "vocab_size": 151936, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": true,
    "sliding_window": 32768, "use_sliding_window": false, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "torch_dtype": "bfloat16"})");
  REQUIRE(c.ok());
  CHECK(c->qkv_bias);
  CHECK_FALSE(c->o_bias);
  CHECK_FALSE(c->sliding_window.has_value());
  CHECK(c->head_dim == 64);
  CHECK(c->NumParameters() == 494032768);  // Qwen2.5-0.5B
}

// Qwen3-0.6B's published config.json.
constexpr const char* kQwen3 = R"({
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
  "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
  "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
  "use_sliding_window": false, "vocab_size": 151936})";

TEST_CASE("Qwen3-0.6B's config.json parses to q/k norms, head_dim 128 and 596M parameters", "[model][config]") {
  auto c = ParseModelConfig(kQwen3);
  REQUIRE(c.ok());
  CHECK(c->model_type == "qwen3");
  CHECK(c->qk_norm == QkNorm::kPerHead);
  CHECK(c->q_norm_size() == 128);
  CHECK(c->norms == NormPlacement{});  // Llama's pre-norms
  CHECK_FALSE(c->qkv_bias);
  CHECK_FALSE(c->o_bias);
  CHECK(c->head_dim == 128);
  CHECK(c->q_dim() == 2048);  // not hidden_size
  CHECK_FALSE(c->sliding_window.has_value());
  CHECK(c->NumParameters() == 596049920);
  auto preset = PresetConfig("qwen3-0.6b");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
}

TEST_CASE("A Qwen3 config with per-layer sliding windows is refused naming the field", "[model][config]") {
  std::string text = kQwen3;
  text.replace(text.find("\"use_sliding_window\": false"), 27, "\"use_sliding_window\": true ");
  auto c = ParseModelConfig(text);
  REQUIRE_FALSE(c.ok());
  CHECK(c.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(Contains(c.status(), "use_sliding_window"));
}

// OLMo-2-0425-1B's config.json (the fields that shape the model).
constexpr const char* kOlmo2 = R"({
  "architectures": ["Olmo2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "eos_token_id": 100257,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
  "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 16, "num_hidden_layers": 16,
  "num_key_value_heads": 16, "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": null,
  "rope_theta": 500000, "tie_word_embeddings": false, "torch_dtype": "float32", "use_cache": true,
  "vocab_size": 100352})";

TEST_CASE("OLMo 2 1B's config.json parses to output norms, q/k norms over the projections and 1.48B parameters",
          "[model][config]") {
  auto c = ParseModelConfig(kOlmo2);
  REQUIRE(c.ok());
  CHECK(c->model_type == "olmo2");
  CHECK_FALSE(c->norms.pre_attention);
  CHECK(c->norms.attention_output);
  CHECK_FALSE(c->norms.pre_mlp);
  CHECK(c->norms.mlp_output);
  CHECK(c->qk_norm == QkNorm::kPerProjection);
  CHECK(c->q_norm_size() == 2048);
  CHECK(c->k_norm_size() == 2048);
  CHECK_FALSE(c->qkv_bias);
  CHECK_FALSE(c->tie_word_embeddings);
  CHECK(c->NumParameters() == 1484916736);
  auto preset = PresetConfig("olmo-2-1b");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
  // Written back, it reads as the same block.
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(round_trip->norms == c->norms);
  CHECK(round_trip->qk_norm == QkNorm::kPerProjection);
}

// gemma-3-270m's config.json (the fields that shape the model).
constexpr const char* kGemma3 = R"({
  "architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "attn_logit_softcapping": null, "bos_token_id": 2, "eos_token_id": 1, "final_logit_softcapping": null,
  "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640, "initializer_range": 0.02,
  "intermediate_size": 2048,
  "layer_types": [
    "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention",
    "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention",
    "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
  "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 18,
  "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
  "rope_local_base_freq": 10000.0, "rope_scaling": null, "rope_theta": 1000000.0, "sliding_window": 512,
  "torch_dtype": "bfloat16", "use_bidirectional_attention": false, "use_cache": true, "vocab_size": 262144})";

TEST_CASE("Gemma 3 270M's config.json parses to its block and 268M parameters", "[model][config]") {
  auto c = ParseModelConfig(kGemma3);
  REQUIRE(c.ok());
  CHECK(c->model_type == "gemma3_text");
  CHECK(c->norms ==
        NormPlacement{.pre_attention = true, .attention_output = true, .pre_mlp = true, .mlp_output = true});
  CHECK(c->qk_norm == QkNorm::kPerHead);
  CHECK(c->mlp_activation == MlpActivation::kGeluTanh);
  CHECK(c->norm_weight_offset == 1.0);
  CHECK(c->scale_embeddings);
  CHECK(c->attention_scale == 1.0 / 16.0);
  CHECK(c->tie_word_embeddings);  // Gemma's default, not written in its config.json
  CHECK(c->sliding_window == 512);
  CHECK(c->sliding_window_pattern == 6);
  CHECK(c->LayerIsLocal(4));
  CHECK_FALSE(c->LayerIsLocal(5));
  CHECK(c->rope_local_theta == 10000.0);
  CHECK(c->NumParameters() == 268098176);
  auto preset = PresetConfig("gemma-3-270m");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
  auto one_b = PresetConfig("gemma-3-1b");
  REQUIRE(one_b.ok());
  CHECK(one_b->NumParameters() == 999885952);
}

TEST_CASE("Gemma 3 options the block cannot express, or bad values, are refused naming the field", "[model][config]") {
  const std::string text = kGemma3;
  auto with = [&](const std::string& from, const std::string& to) {
    std::string t = text;
    const size_t at = t.find(from);
    REQUIRE(at != std::string::npos);
    t.replace(at, from.size(), to);
    return ParseModelConfig(t);
  };
  for (const auto& [from, to, field] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"\"final_logit_softcapping\": null", "\"final_logit_softcapping\": -30.0", "final_logit_softcapping"},
           {"\"attn_logit_softcapping\": null", "\"attn_logit_softcapping\": \"50\"", "attn_logit_softcapping"},
           {"\"gelu_pytorch_tanh\"", "\"relu\"", "hidden_activation"},
           {"\"full_attention\",", "\"sliding_attention\",", "layer_types"},  // globals at 12, 18
           {"\"query_pre_attn_scalar\": 256", "\"query_pre_attn_scalar\": -1", "query_pre_attn_scalar"}}) {
    INFO(from << " -> " << to);
    auto c = with(from, to);
    REQUIRE_FALSE(c.ok());
    CHECK(c.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(Contains(c.status(), field));
  }
}

// gemma-2-2b's config.json (the fields that shape the model; no layer_types, as transformers 4.42 wrote it).
constexpr const char* kGemma2 = R"({
  "architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
  "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
  "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
  "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
  "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
  "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
  "use_cache": true, "vocab_size": 256000})";

TEST_CASE("Gemma 2 2B's config.json parses to soft-caps, alternating layers and 2.6B parameters", "[model][config]") {
  auto c = ParseModelConfig(kGemma2);
  REQUIRE(c.ok());
  CHECK(c->architecture == "Gemma2ForCausalLM");
  CHECK(c->norms ==
        NormPlacement{.pre_attention = true, .attention_output = true, .pre_mlp = true, .mlp_output = true});
  CHECK(c->qk_norm == QkNorm::kNone);
  CHECK(c->mlp_activation == MlpActivation::kGeluTanh);
  CHECK(c->norm_weight_offset == 1.0);
  CHECK(c->scale_embeddings);
  CHECK(c->attention_scale == 1.0 / 16.0);
  CHECK(c->attention_softcap == 50.0);
  CHECK(c->final_logit_softcap == 30.0);
  CHECK(c->tie_word_embeddings);
  CHECK(c->sliding_window == 4096);
  CHECK(c->sliding_window_pattern == 2);  // Gemma 2's default: layers 0, 2, ... local
  CHECK(c->LayerIsLocal(0));
  CHECK_FALSE(c->LayerIsLocal(1));
  CHECK(c->rope_local_theta == 0.0);  // one RoPE base
  CHECK(c->NumParameters() == 2614341888);
  auto preset = PresetConfig("gemma-2-2b");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
  // Caps written as null are off; absent ones take Gemma 2's defaults.
  std::string text = kGemma2;
  text.replace(text.find("50.0"), 4, "null");
  auto uncapped = ParseModelConfig(text);
  REQUIRE(uncapped.ok());
  CHECK(uncapped->attention_softcap == 0.0);
  CHECK(uncapped->final_logit_softcap == 30.0);
  text.replace(text.find("\"final_logit_softcapping\": 30.0, "), 33, "");
  auto defaulted = ParseModelConfig(text);
  REQUIRE(defaulted.ok());
  CHECK(defaulted->final_logit_softcap == 30.0);
  text = kGemma2;
  text.replace(text.find("50.0"), 4, "0");
  auto zero = ParseModelConfig(text);
  REQUIRE_FALSE(zero.ok());
  CHECK(Contains(zero.status(), "attn_logit_softcapping"));
}

// microsoft/Phi-3-mini-4k-instruct's config.json (the fields that shape the model).
constexpr const char* kPhi3 = R"({
  "architectures": ["Phi3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1,
  "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
  "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
  "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
  "sliding_window": 2047, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
  "vocab_size": 32064})";

TEST_CASE("Phi-3-mini's config.json parses to fused projections, a window and 3.8B parameters", "[model][config]") {
  auto c = ParseModelConfig(kPhi3);
  REQUIRE(c.ok());
  CHECK(c->architecture == "Phi3ForCausalLM");
  CHECK(c->fused == FusedProjections{.qkv = true, .gate_up = true});
  const bool fused_projections =
      ModelProjections(*c) ==
      std::vector<Projection>{Projection::kQkv, Projection::kO, Projection::kGateUp, Projection::kDown};
  CHECK(fused_projections);
  CHECK(c->sliding_window == 2047);
  CHECK(c->sliding_window_pattern == 0);  // every layer
  CHECK(c->rope_scaling.type == RopeScaling::Type::kNone);
  CHECK(RopeAttentionFactor(*c) == 1.0);
  CHECK(c->NumParameters() == 3821079552);
  auto preset = PresetConfig("phi-3-mini");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
}

// A Phi-3-mini-128k-style config: LongRoPE with 48 short and long factors (head_dim 96), a pre-trained context
// of 4,096 stretched to 131,072.
std::string LongRopePhi3(std::string_view type, int short_count) {
  nlohmann::json j = nlohmann::json::parse(kPhi3);
  j["max_position_embeddings"] = 131072;
  j["sliding_window"] = 262144;
  nlohmann::json short_factor = nlohmann::json::array(), long_factor = nlohmann::json::array();
  for (int i = 0; i < short_count; ++i) short_factor.push_back(1.0 + 0.01 * i);
  for (int i = 0; i < 48; ++i) long_factor.push_back(1.0 + 0.5 * i);
  j["rope_scaling"] = {{"type", type}, {"short_factor", short_factor}, {"long_factor", long_factor}};
  return j.dump();
}

TEST_CASE("Phi-3 LongRoPE: short factors within the pre-trained context, long ones past it", "[model][config]") {
  for (const char* type : {"longrope", "su"}) {
    INFO(type);
    auto c = ParseModelConfig(LongRopePhi3(type, 48));
    REQUIRE(c.ok());
    CHECK(c->rope_scaling.type == RopeScaling::Type::kLongRope);
    CHECK(c->rope_scaling.original_max_position_embeddings == 4096);
    CHECK_FALSE(RopeLongContext(*c, 4096));
    CHECK(RopeLongContext(*c, 4097));
    // The LongRoPE paper's attention factor for a 32x stretch of 4,096 positions.
    CHECK(std::abs(RopeAttentionFactor(*c) - std::sqrt(1.0 + std::log(32.0) / std::log(4096.0))) < 1e-12);
    ModelConfig plain = *c;
    plain.rope_scaling = RopeScaling{};
    const std::vector<double> base = RopeInverseFrequencyValues(plain);
    const std::vector<double> short_inv = RopeInverseFrequencyValues(*c);
    const std::vector<double> long_inv = RopeInverseFrequencyValues(*c, /*long_context=*/true);
    REQUIRE(base.size() == 48);
    for (size_t i = 0; i < 48; ++i) {
      CHECK(std::abs(short_inv[i] * (1.0 + 0.01 * static_cast<double>(i)) - base[i]) < 1e-15);
      CHECK(std::abs(long_inv[i] * (1.0 + 0.5 * static_cast<double>(i)) - base[i]) < 1e-15);
    }
    auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
    REQUIRE(round_trip.ok());
    CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
  }
  auto short_list = ParseModelConfig(LongRopePhi3("longrope", 47));
  CHECK(Contains(short_list.status(), "rope_scaling.short_factor"));
  nlohmann::json j = nlohmann::json::parse(LongRopePhi3("longrope", 48));
  j["rope_scaling"].erase("long_factor");
  CHECK(Contains(ParseModelConfig(j.dump()).status(), "rope_scaling.long_factor"));
  j = nlohmann::json::parse(LongRopePhi3("longrope", 48));
  j["rope_scaling"]["short_factor"][3] = -1.0;
  CHECK(Contains(ParseModelConfig(j.dump()).status(), "rope_scaling.short_factor"));
  // Phi-4-mini rotates 3/4 of each head (72 of 96 dimensions here), with one LongRoPE factor per rotated pair.
  j = nlohmann::json::parse(LongRopePhi3("longrope", 36));
  j["rope_scaling"]["long_factor"] = std::vector<double>(36, 2.0);
  j["partial_rotary_factor"] = 0.75;
  auto partial = ParseModelConfig(j.dump());
  REQUIRE(partial.ok());
  CHECK(partial->rotary_dim() == 72);
  CHECK(RopeInverseFrequencyValues(*partial).size() == 36);
  auto partial_round_trip = ParseModelConfig(ModelConfigToJson(*partial));
  REQUIRE(partial_round_trip.ok());
  CHECK(ModelConfigToJson(*partial_round_trip) == ModelConfigToJson(*partial));
  j["rope_scaling"] = nullptr;
  j["partial_rotary_factor"] = 0.01;  // rotates no dimension
  CHECK(Contains(ParseModelConfig(j.dump()).status(), "partial_rotary_factor"));
}

// EleutherAI/pythia-160m's config.json.
constexpr const char* kPythia = R"({
  "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
  "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
  "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 12, "num_hidden_layers": 12,
  "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": false, "torch_dtype": "float16",
  "transformers_version": "4.24.0", "use_cache": true, "use_parallel_residual": true, "vocab_size": 50304})";

TEST_CASE("Pythia-160m's config.json parses to the GPT-NeoX block and 162M parameters", "[model][config]") {
  auto c = ParseModelConfig(kPythia);
  REQUIRE(c.ok());
  CHECK(c->architecture == "GPTNeoXForCausalLM");
  CHECK(c->norm_kind == NormKind::kLayerNorm);
  CHECK(c->rms_norm_eps == 1e-5);
  CHECK_FALSE(c->gated_mlp);
  CHECK(c->mlp_activation == MlpActivation::kGelu);
  CHECK(c->parallel_residual);
  CHECK(c->rotary_dim() == 16);  // a quarter of head_dim 64
  CHECK(c->fused == FusedProjections{.qkv = true, .qkv_per_head = true});
  CHECK((c->qkv_bias && c->o_bias && c->mlp_bias));
  const bool projections = ModelProjections(*c) == std::vector<Projection>{Projection::kQkv, Projection::kO,
                                                                           Projection::kUp, Projection::kDown};
  CHECK(projections);
  CHECK(ModuleName(*c, Projection::kQkv) == "query_key_value");
  CHECK(LayerPrefix(*c, 3) == "gpt_neox.layers.3.");
  CHECK(RopeInverseFrequencyValues(*c).size() == 8);
  CHECK(c->NumParameters() == 162322944);
  auto preset = PresetConfig("pythia-160m");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
  // Later transformers releases: rope_theta and partial_rotary_factor; sequential residual; no attention biases.
  nlohmann::json j = nlohmann::json::parse(kPythia);
  j.erase("rotary_emb_base");
  j.erase("rotary_pct");
  j["rope_theta"] = 500.0;
  j["partial_rotary_factor"] = 0.5;
  j["use_parallel_residual"] = false;
  j["attention_bias"] = false;
  auto later = ParseModelConfig(j.dump());
  REQUIRE(later.ok());
  CHECK(later->rope_theta == 500.0);
  CHECK(later->rotary_dim() == 32);
  CHECK_FALSE(later->parallel_residual);
  CHECK_FALSE(later->qkv_bias);
  CHECK(later->mlp_bias);
}

TEST_CASE("GPT-NeoX options the block cannot express, or bad values, are refused naming the field", "[model][config]") {
  auto refused = [](const char* key, const nlohmann::json& value) {
    nlohmann::json j = nlohmann::json::parse(kPythia);
    j[key] = value;
    return ParseModelConfig(j.dump()).status();
  };
  CHECK(Contains(refused("hidden_act", "silu"), "hidden_act"));
  CHECK(Contains(refused("hidden_act", "quick_gelu"), "hidden_act"));
  CHECK(Contains(refused("rotary_pct", 0.0), "rotary_pct"));
  CHECK(Contains(refused("rotary_pct", 1.5), "rotary_pct"));
  CHECK(Contains(refused("rotary_pct", 0.3), "rotary_pct"));  // 19 of 64 dimensions: odd
  CHECK(Contains(refused("use_parallel_residual", "yes"), "use_parallel_residual"));
  CHECK(Contains(refused("layer_norm_eps", "small"), "layer_norm_eps"));
  CHECK(Contains(refused("num_key_value_heads", 4), "num_key_value_heads"));  // query_key_value is per head
  nlohmann::json relu = nlohmann::json::parse(kPythia);
  relu["hidden_act"] = "relu";
  auto parsed = ParseModelConfig(relu.dump());
  REQUIRE(parsed.ok());
  CHECK(parsed->mlp_activation == MlpActivation::kRelu);
}

// openai-community/gpt2's config.json: GPT-2's own names for the sizes, no n_inner (4 x n_embd), tied.
constexpr const char* kGpt2 = R"({
  "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
  "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
  "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
  "resid_pdrop": 0.1, "summary_activation": null, "summary_first_dropout": 0.1, "summary_proj_to_labels": true,
  "summary_type": "cls_index", "summary_use_proj": true, "vocab_size": 50257})";

TEST_CASE("GPT-2's config.json parses to learned positions, a fused c_attn and 124M parameters", "[model][config]") {
  auto c = ParseModelConfig(kGpt2);
  REQUIRE(c.ok());
  CHECK(c->architecture == "GPT2LMHeadModel");
  CHECK(c->hidden_size == 768);
  CHECK(c->intermediate_size == 3072);
  CHECK(c->max_position_embeddings == 1024);
  CHECK(c->positions == PositionKind::kLearned);
  CHECK(c->position_rows() == 1024);
  CHECK(c->norm_kind == NormKind::kLayerNorm);
  CHECK(c->mlp_activation == MlpActivation::kGeluTanh);
  CHECK(c->tie_word_embeddings);
  CHECK(c->attention_scale == 0.0);
  CHECK(c->fused == FusedProjections{.qkv = true});
  CHECK(StoresTransposed(*c));
  CHECK(TargetModuleName(*c, Projection::kQkv) == "c_attn");
  CHECK(TargetModuleName(*c, Projection::kO) == "attn.c_proj");  // mlp.c_proj is a c_proj too
  const bool both = ProjectionsOfModule(*c, "c_proj") == std::vector<Projection>{Projection::kO, Projection::kDown};
  CHECK(both);
  const bool down = ProjectionsOfModule(*c, "mlp.c_proj") == std::vector<Projection>{Projection::kDown};
  CHECK(down);
  CHECK(c->NumParameters() == 124439808);
  auto preset = PresetConfig("gpt2");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
  // Cerebras-GPT-111M: exact GELU, an explicit n_inner, 2,048 positions, 10 layers.
  nlohmann::json j = nlohmann::json::parse(kGpt2);
  j["activation_function"] = "gelu";
  j["n_inner"] = 3072;
  j["n_positions"] = 2048;
  j["n_layer"] = 10;
  auto cerebras = ParseModelConfig(j.dump());
  REQUIRE(cerebras.ok());
  CHECK(cerebras->NumParameters() == 111050496);
  auto cerebras_preset = PresetConfig("cerebras-gpt-111m");
  REQUIRE(cerebras_preset.ok());
  CHECK(ModelConfigToJson(*cerebras_preset) == ModelConfigToJson(*cerebras));
  // Unscaled attention scores are a block option.
  j["scale_attn_weights"] = false;
  auto unscaled = ParseModelConfig(j.dump());
  REQUIRE(unscaled.ok());
  CHECK(unscaled->attention_scale == 1.0);
}

TEST_CASE("GPT-2 options the block cannot express, or bad values, are refused naming the field", "[model][config]") {
  auto refused = [](const char* key, const nlohmann::json& value) {
    nlohmann::json j = nlohmann::json::parse(kGpt2);
    j[key] = value;
    return ParseModelConfig(j.dump()).status();
  };
  CHECK(Contains(refused("scale_attn_by_inverse_layer_idx", true), "scale_attn_by_inverse_layer_idx"));
  CHECK(Contains(refused("add_cross_attention", true), "add_cross_attention"));
  CHECK(Contains(refused("activation_function", "swish"), "activation_function"));
  CHECK(Contains(refused("n_embd", "wide"), "hidden_size"));
  CHECK(Contains(refused("n_inner", -5), "intermediate_size"));
  CHECK(Contains(refused("layer_norm_epsilon", "tiny"), "layer_norm_epsilon"));
}

// facebook/opt-125m's config.json.
constexpr const char* kOpt = R"({
  "_name_or_path": "facebook/opt-125m", "activation_dropout": 0.0, "activation_function": "relu",
  "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": true,
  "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 3072, "hidden_size": 768, "init_std": 0.02, "layerdrop": 0.0,
  "max_position_embeddings": 2048, "model_type": "opt", "num_attention_heads": 12, "num_hidden_layers": 12,
  "pad_token_id": 1, "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.21.0.dev0",
  "use_cache": true, "vocab_size": 50272, "word_embed_proj_dim": 768})";

TEST_CASE("OPT-125m's config.json parses to learned positions with two unused rows, ReLU and 125M parameters",
          "[model][config]") {
  auto c = ParseModelConfig(kOpt);
  REQUIRE(c.ok());
  CHECK(c->architecture == "OPTForCausalLM");
  CHECK(c->intermediate_size == 3072);
  CHECK(c->positions == PositionKind::kLearned);
  CHECK(c->position_offset == 2);
  CHECK(c->position_rows() == 2050);
  CHECK(c->mlp_activation == MlpActivation::kRelu);
  CHECK(c->tie_word_embeddings);
  CHECK((c->qkv_bias && c->o_bias && c->mlp_bias));
  CHECK(TargetModuleName(*c, Projection::kO) == "out_proj");
  CHECK(LayerPrefix(*c, 0) == "model.decoder.layers.0.");
  CHECK(c->NumParameters() == 125239296);
  auto preset = PresetConfig("opt-125m");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
  // What the block cannot compute is refused by name.
  for (const auto& [key, value] : {std::pair<const char*, nlohmann::json>{"word_embed_proj_dim", -5},
                                   std::pair<const char*, nlohmann::json>{"layer_norm_elementwise_affine", false},
                                   std::pair<const char*, nlohmann::json>{"activation_function", "silu"}}) {
    nlohmann::json j = nlohmann::json::parse(kOpt);
    j[key] = value;
    CHECK(Contains(ParseModelConfig(j.dump()).status(), key));
  }
}

// microsoft/phi-2's config.json.
constexpr const char* kPhi2 = R"({
  "_name_or_path": "microsoft/phi-2", "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0,
  "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256, "hidden_act": "gelu_new", "hidden_size": 2560,
  "initializer_range": 0.02, "intermediate_size": 10240, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
  "model_type": "phi", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
  "partial_rotary_factor": 0.4, "qk_layernorm": false, "resid_pdrop": 0.1, "rope_scaling": null,
  "rope_theta": 10000.0, "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.37.0",
  "use_cache": true, "vocab_size": 51200})";

TEST_CASE("Phi-2's config.json parses to one LayerNorm for a parallel block, partial rotary and an LM head bias",
          "[model][config]") {
  auto c = ParseModelConfig(kPhi2);
  REQUIRE(c.ok());
  CHECK(c->architecture == "PhiForCausalLM");
  CHECK(c->norm_kind == NormKind::kLayerNorm);
  CHECK(c->parallel_residual);
  CHECK((c->norms.pre_attention && !c->norms.pre_mlp && !c->norms.attention_output && !c->norms.mlp_output));
  CHECK(c->rotary_dim() == 32);  // 0.4 of head_dim 80
  CHECK(c->mlp_activation == MlpActivation::kGeluTanh);
  CHECK(!c->gated_mlp);
  CHECK((c->qkv_bias && c->o_bias && c->mlp_bias && c->lm_head_bias));
  CHECK(!c->tie_word_embeddings);
  CHECK(TargetModuleName(*c, Projection::kO) == "dense");
  CHECK(TargetModuleName(*c, Projection::kUp) == "fc1");
  CHECK(TargetModuleName(*c, Projection::kDown) == "fc2");
  CHECK(LayerPrefix(*c, 3) == "model.layers.3.");
  CHECK(c->NumParameters() == 2779683840);
  auto preset = PresetConfig("phi-2");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
  // Phi-1.5: null token ids and key/value heads, as its config.json has them; 1,418,270,720 parameters.
  nlohmann::json phi15 = nlohmann::json::parse(kPhi2);
  for (const auto& [key, value] : {std::pair<const char*, nlohmann::json>{"hidden_size", 2048},
                                   std::pair<const char*, nlohmann::json>{"intermediate_size", 8192},
                                   std::pair<const char*, nlohmann::json>{"num_hidden_layers", 24},
                                   std::pair<const char*, nlohmann::json>{"partial_rotary_factor", 0.5},
                                   std::pair<const char*, nlohmann::json>{"num_key_value_heads", nullptr},
                                   std::pair<const char*, nlohmann::json>{"bos_token_id", nullptr},
                                   std::pair<const char*, nlohmann::json>{"eos_token_id", nullptr}}) {
    phi15[key] = value;
  }
  auto c15 = ParseModelConfig(phi15.dump());
  REQUIRE(c15.ok());
  CHECK(c15->num_key_value_heads == 32);
  CHECK(!c15->bos_token_id.has_value());
  CHECK(c15->NumParameters() == 1418270720);
  CHECK(c15->NumParameters() == PresetConfig("phi-1.5")->NumParameters());
  // What the block cannot compute is refused by name.
  for (const auto& [key, value] : {std::pair<const char*, nlohmann::json>{"qk_layernorm", true},
                                   std::pair<const char*, nlohmann::json>{"partial_rotary_factor", 0.01},
                                   std::pair<const char*, nlohmann::json>{"hidden_act", "silu"},
                                   std::pair<const char*, nlohmann::json>{"model_type", "phi-msft"}}) {
    nlohmann::json j = nlohmann::json::parse(kPhi2);
    j[key] = value;
    INFO(key);
    CHECK(Contains(ParseModelConfig(j.dump()).status(), key));
  }
}

// facebook/opt-350m's config.json.
constexpr const char* kOpt350 = R"({
  "_name_or_path": "facebook/opt-350m", "activation_dropout": 0.0, "activation_function": "relu",
  "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": false,
  "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 4096, "hidden_size": 1024, "init_std": 0.02, "layerdrop": 0.0,
  "max_position_embeddings": 2048, "model_type": "opt", "num_attention_heads": 16, "num_hidden_layers": 24,
  "pad_token_id": 1, "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.20.0.dev0",
  "use_cache": true, "vocab_size": 50272, "word_embed_proj_dim": 512})";

TEST_CASE("OPT-350m's config.json parses to post-LN blocks without a final norm and 512-wide projected embeddings",
          "[model][config]") {
  auto c = ParseModelConfig(kOpt350);
  REQUIRE(c.ok());
  CHECK(c->norm_after_residual);
  CHECK(!c->norms.final);
  CHECK((c->norms.pre_attention && c->norms.pre_mlp));  // the two norms' slots, applied after the adds
  CHECK(c->embedding_dim() == 512);
  CHECK(c->projects_embeddings());
  CHECK(c->NumParameters() == 331196416);
  auto preset = PresetConfig("opt-350m");
  REQUIRE(preset.ok());
  CHECK(ModelConfigToJson(*preset) == ModelConfigToJson(*c));
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
  // A pre-norm OPT without its final LayerNorm (_remove_final_layer_norm) round-trips as such.
  nlohmann::json removed = nlohmann::json::parse(kOpt);
  removed["_remove_final_layer_norm"] = true;
  auto r = ParseModelConfig(removed.dump());
  REQUIRE(r.ok());
  CHECK((!r->norms.final && !r->norm_after_residual));
  CHECK(r->NumParameters() == 125239296 - 2 * 768);
  auto r2 = ParseModelConfig(ModelConfigToJson(*r));
  REQUIRE(r2.ok());
  CHECK(!r2->norms.final);
  // word_embed_proj_dim equal to hidden_size means no projections.
  nlohmann::json same = nlohmann::json::parse(kOpt350);
  same["word_embed_proj_dim"] = 1024;
  auto s = ParseModelConfig(same.dump());
  REQUIRE(s.ok());
  CHECK(!s->projects_embeddings());
}

TEST_CASE("A config without architectures finds its family by model_type, or names both", "[model][config]") {
  std::string text = kOlmo2;
  text.replace(text.find("\"architectures\": [\"Olmo2ForCausalLM\"], "), 39, "");
  auto c = ParseModelConfig(text);
  REQUIRE(c.ok());
  CHECK(c->architecture == "Olmo2ForCausalLM");
  text.replace(text.find("\"olmo2\""), 7, "\"olmo9\"");
  auto unknown = ParseModelConfig(text);
  REQUIRE_FALSE(unknown.ok());
  CHECK(Contains(unknown.status(), "architectures"));
  CHECK(Contains(unknown.status(), "olmo9"));
  CHECK(Contains(unknown.status(), "Olmo2ForCausalLM"));
}

TEST_CASE("Llama 3 rope_scaling and an eos_token_id list are parsed", "[model][config]") {
  auto c = ParseModelConfig(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "rope_theta": 500000.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": true,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}})");
  REQUIRE(c.ok());
  CHECK(c->rope_scaling.type == RopeScaling::Type::kLlama3);
  CHECK(c->rope_scaling.factor == 32.0);
  CHECK(c->eos_token_ids == std::vector<int64_t>{128001, 128008, 128009});
  auto round_trip = ParseModelConfig(ModelConfigToJson(*c));
  REQUIRE(round_trip.ok());
  CHECK(ModelConfigToJson(*round_trip) == ModelConfigToJson(*c));
}

TEST_CASE("The model id covers the architecture, not the stored dtype or the bos / eos ids", "[model][config]") {
  auto base = PresetConfig("qwen2.5-0.5b");
  REQUIRE(base.ok());
  const std::string id = ModelId(*base);
  CHECK(id.size() == 64);
  ModelConfig same = *base;
  same.torch_dtype = "float16";
  same.bos_token_id = 7;
  same.eos_token_ids = {1, 2};
  CHECK(ModelId(same) == id);
  ModelConfig wider = *base;
  wider.intermediate_size += 32;
  CHECK(ModelId(wider) != id);
  ModelConfig untied = *base;
  untied.tie_word_embeddings = false;
  CHECK(ModelId(untied) != id);
  ModelConfig theta = *base;
  theta.rope_theta = 10000.0;
  CHECK(ModelId(theta) != id);
}

TEST_CASE("A missing required field is an error naming it", "[model][config]") {
  auto c = ParseModelConfig(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100})");
  REQUIRE_FALSE(c.ok());
  CHECK(c.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(Contains(c.status(), "intermediate_size"));
}

TEST_CASE("An unknown architecture is an error naming it and the supported ones", "[model][config]") {
  auto c = ParseModelConfig(R"({"architectures": ["BloomForCausalLM"], "model_type": "bloom"})");
  REQUIRE_FALSE(c.ok());
  CHECK(Contains(c.status(), "BloomForCausalLM"));
  CHECK(Contains(c.status(), "GPT2LMHeadModel"));
  CHECK(Contains(c.status(), "LlamaForCausalLM"));
  CHECK(Contains(c.status(), "Olmo2ForCausalLM"));
}

TEST_CASE("Unsupported rope_scaling, activations and inconsistent heads are rejected", "[model][config]") {
  const std::string base = R"("architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 100)";
  auto yarn = ParseModelConfig("{" + base + R"(, "num_attention_heads": 4,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})");
  CHECK(Contains(yarn.status(), "yarn"));
  auto gelu = ParseModelConfig("{" + base + R"(, "num_attention_heads": 4, "hidden_act": "gelu"})");
  CHECK(Contains(gelu.status(), "hidden_act"));
  auto heads = ParseModelConfig("{" + base + R"(, "num_attention_heads": 4, "num_key_value_heads": 3})");
  CHECK(Contains(heads.status(), "num_key_value_heads"));
  auto not_json = ParseModelConfig("{not json");
  CHECK(not_json.status().code() == absl::StatusCode::kInvalidArgument);
  auto wrong_type = ParseModelConfig("{" + base + R"(, "num_attention_heads": "four"})");
  CHECK(Contains(wrong_type.status(), "num_attention_heads"));
}

TEST_CASE("Sizes beyond their bounds are refused at parse time, not wrapped", "[model][config]") {
  // 2^62 used to pass and wrap to 0 in the memory planner's byte counts (SIGFPE on the division).
  const std::string base = R"("architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4)";
  auto vocab = ParseModelConfig("{" + base + R"(, "vocab_size": 4611686018427387904})");
  REQUIRE_FALSE(vocab.ok());
  CHECK(Contains(vocab.status(), "field 'vocab_size' is 4611686018427387904; at most 4194304 is supported"));
  auto layers = ParseModelConfig("{" + base + R"(, "vocab_size": 100, "num_hidden_layers": 100000})");
  CHECK(Contains(layers.status(), "num_hidden_layers"));
  // A float beyond int64 is not an integer (the cast alone would be undefined behaviour).
  auto huge = ParseModelConfig("{" + base + R"(, "vocab_size": 1e300})");
  CHECK(Contains(huge.status(), "field 'vocab_size' must be an integer"));
  std::string mistral = base;
  mistral.replace(mistral.find("LlamaForCausalLM"), 16, "MistralForCausalLM");
  auto window = ParseModelConfig("{" + mistral + R"(, "vocab_size": 100, "sliding_window": 1e18})");
  CHECK(Contains(window.status(), "sliding_window"));
  // The largest accepted sizes still give a parameter count that fits int64.
  ModelConfig max;
  max.vocab_size = kMaxVocabSize;
  max.hidden_size = kMaxHiddenSize;
  max.intermediate_size = kMaxIntermediateSize;
  max.num_hidden_layers = kMaxLayers;
  max.num_attention_heads = kMaxHeads;
  max.num_key_value_heads = kMaxHeads;
  max.head_dim = kMaxHeadDim;
  max.max_position_embeddings = kMaxPositions;
  REQUIRE(max.Validate().ok());
  CHECK(max.NumParameters() > 0);
  CHECK(max.NumParameters() < (int64_t{1} << 56));
}

TEST_CASE("Every preset validates and unknown presets list the valid names", "[model][config]") {
  for (const std::string& name : PresetNames()) {
    INFO(name);
    auto c = PresetConfig(name);
    REQUIRE(c.ok());
    CHECK(c->Validate().ok());
  }
  auto tiny = PresetConfig("tiny");
  CHECK(tiny->NumParameters() > 2'000'000);
  CHECK(tiny->NumParameters() < 6'000'000);
  auto bad = PresetConfig("gpt5");
  CHECK(bad.status().code() == absl::StatusCode::kNotFound);
  CHECK(Contains(bad.status(), "smollm2-135m"));
}

}  // namespace
}  // namespace seedling::model
