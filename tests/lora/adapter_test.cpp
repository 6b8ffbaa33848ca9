#include "lora/adapter.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "base/file.h"
#include "base/status.h"
#include "model/safetensors.h"
#include "tests/test_util.h"

namespace seedling::lora {
namespace {

using model::Projection;

using seedling::testing::TempDir;

// tiny-qwen2: 6 heads x 32 = 192 = hidden, GQA, q/k/v biases; tiny-qwen3: q/k norms, 4 heads x 48 = 192 != hidden
// 128 (so q_proj and o_proj are not square); tiny-olmo2: norms on the sub-blocks' outputs, q/k norms over the
// whole projections; tiny-gemma3: GeGLU, 1 + w norms before and after each sub-block, windowed local layers;
// tiny-gemma2: the same block without q/k norms, with soft-capped attention scores and logits.
model::ModelConfig SmallConfig(const char* preset = "tiny-qwen2") {
  auto c = model::PresetConfig(preset);
  REQUIRE(c.ok());
  c->num_hidden_layers = 2;
  c->vocab_size = 97;
  return *c;
}

// tiny-opt with OPT-350m's block: norms after each residual add, no final norm, 64-wide embeddings projected in
// and out.
model::ModelConfig PostLnOpt() {
  model::ModelConfig c = SmallConfig("tiny-opt");
  c.norm_after_residual = true;
  c.norms.final = false;
  c.word_embed_proj_dim = 64;
  return c;
}

std::unique_ptr<model::LlamaModel> SmallModel(const model::ModelConfig& c) {
  auto m = model::LlamaModel::Create(c, model::RandomWeights(c, 21));
  REQUIRE(m.ok());
  return std::move(m).value();
}

at::Tensor Tokens() { return at::tensor({3, 14, 15, 92, 65, 35, 89, 79}, at::kLong).view({2, 4}); }

LoraConfig AllTargets(int64_t rank) {
  LoraConfig lc;
  lc.rank = rank;
  lc.alpha = 2.0 * static_cast<double>(rank);
  lc.targets = {Projection::kQ,    Projection::kK,  Projection::kV,   Projection::kO,
                Projection::kGate, Projection::kUp, Projection::kDown};
  lc.init_seed = 5;
  return lc;
}

// Projection names, for comparisons Catch can print.
std::vector<std::string> Names(const std::vector<Projection>& projections) {
  std::vector<std::string> out;
  for (Projection p : projections) out.push_back(model::ProjectionName(p));
  return out;
}

// Gives B random values so the adapter changes the model.
void RandomizeB(LoraAdapter& a) {
  at::NoGradGuard g;
  for (const LoraView& v : a.views()) {
    if (!v.is_a) a.Matrix(v).copy_(at::randn({v.rows, v.cols}) * 0.05);
  }
}

// Gives `a` random B matrices, then checks that they change the logits, that merged = unmerged and that unmerge
// restores every weight; then a PEFT round trip that writes `modules` as target_modules and reads back exactly.
void CheckMergeAndPeft(const model::ModelConfig& c, model::LlamaModel& m, LoraAdapter& a, const char* base,
                       const nlohmann::json& modules) {
  RandomizeB(a);
  model::ForwardOptions fo;
  fo.adapter = &a;
  const at::Tensor unmerged = *m.Logits(Tokens(), fo);
  CHECK((unmerged - *m.Logits(Tokens())).abs().max().item<double>() > 1e-3);
  std::vector<at::Tensor> before;
  for (const model::NamedWeight& nw : model::NamedWeights(m.weights(), c)) before.push_back(nw.tensor.clone());
  REQUIRE(a.Merge(m.mutable_weights()).ok());
  CHECK((*m.Logits(Tokens()) - unmerged).abs().max().item<double>() < 1e-4);
  REQUIRE(a.Unmerge(m.mutable_weights()).ok());
  const std::vector<model::NamedWeight> after = model::NamedWeights(m.weights(), c);
  for (size_t i = 0; i < after.size(); ++i) {
    INFO(after[i].name);
    CHECK((after[i].tensor - before[i]).abs().max().item<double>() < 1e-6);
  }

  TempDir dir;
  REQUIRE(SavePeft(a, dir.path, base).ok());
  auto config = nlohmann::json::parse(*ReadFile(JoinPath(dir.path, "adapter_config.json")));
  CHECK(config["target_modules"] == modules);
  auto loaded = LoadPeft(dir.path, c);
  REQUIRE(loaded.ok());
  CHECK(at::equal((*loaded)->flat(), a.flat()));
}

TEST_CASE("A fresh adapter (B = 0) leaves the logits unchanged", "[lora]") {
  const auto c = SmallConfig();
  auto m = SmallModel(c);
  auto a = LoraAdapter::Create(c, AllTargets(4));
  REQUIRE(a.ok());
  model::ForwardOptions fo;
  fo.adapter = a->get();
  CHECK(at::equal(*m->Logits(Tokens(), fo), *m->Logits(Tokens())));
  CHECK((*a)->flat().abs().max().item<float>() > 0);  // A is initialized
}

TEST_CASE("The flat buffer holds every A and B in wire order with PEFT names", "[lora]") {
  const auto c = SmallConfig();
  LoraConfig lc;
  lc.rank = 3;
  auto a = LoraAdapter::Create(c, lc);  // default targets q and v
  REQUIRE(a.ok());
  const auto& v = (*a)->views();
  REQUIRE(v.size() == 2 * 2 * 2);  // layers x targets x {A, B}
  CHECK(v[0].name == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(v[1].name == "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
  CHECK(v[2].name == "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
  CHECK(v[0].rows == 3);
  CHECK(v[0].cols == c.hidden_size);
  CHECK(v[3].rows == c.kv_dim());
  int64_t offset = 0;
  for (const LoraView& view : v) {
    CHECK(view.offset == offset);
    offset += view.numel();
  }
  CHECK((*a)->numel() == offset);
}

TEST_CASE("Merged and unmerged models give the same logits, and unmerge restores the weights", "[lora]") {
  for (const char* preset : {"tiny-qwen2", "tiny-qwen3", "tiny-olmo2", "tiny-gemma3", "tiny-gemma2"}) {
    INFO(preset);
    const auto c = SmallConfig(preset);
    auto m = SmallModel(c);
    auto a = LoraAdapter::Create(c, AllTargets(4));
    REQUIRE(a.ok());
    RandomizeB(**a);
    model::ForwardOptions fo;
    fo.adapter = a->get();
    const at::Tensor unmerged = *m->Logits(Tokens(), fo);
    CHECK((unmerged - *m->Logits(Tokens())).abs().max().item<double>() > 1e-3);  // the adapter matters
    const at::Tensor q_before = m->weights().layers[1].q.clone();
    REQUIRE((*a)->Merge(m->mutable_weights()).ok());
    const at::Tensor merged = *m->Logits(Tokens());
    CHECK((merged - unmerged).abs().max().item<double>() < 1e-4);
    REQUIRE((*a)->Unmerge(m->mutable_weights()).ok());
    CHECK((m->weights().layers[1].q - q_before).abs().max().item<double>() < 1e-6);
  }
}

TEST_CASE("A Phi-3 adapter adapts the fused qkv_proj and gate_up_proj, as PEFT names them", "[lora]") {
  const auto c = SmallConfig("tiny-phi3");
  auto m = SmallModel(c);
  // q, k, v, gate and up stand for the fused modules that compute them.
  auto a = LoraAdapter::Create(c, AllTargets(4));
  REQUIRE(a.ok());
  CHECK(Names((*a)->config().targets) == std::vector<std::string>{"qkv_proj", "o_proj", "gate_up_proj", "down_proj"});
  const std::vector<LoraView>& views = (*a)->views();
  REQUIRE(views.size() == 2 * 4 * 2);
  CHECK(views[0].name == "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight");
  CHECK(views[1].rows == c.q_dim() + 2 * c.kv_dim());
  CHECK(views[5].name == "base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight");
  CHECK(views[5].rows == 2 * c.intermediate_size);

  // Merged = unmerged, unmerge restores the fused matrices; PEFT round trip with the fused names.
  CheckMergeAndPeft(c, *m, **a, "microsoft/Phi-3-mini-4k-instruct",
                    {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"});
}

TEST_CASE("LoRA targets map between fused and separate projections, and PEFT names must match the model", "[lora]") {
  const auto phi3 = SmallConfig("tiny-phi3");
  const auto qwen = SmallConfig("tiny-qwen2");
  CHECK(Names(TargetsFor(phi3, {Projection::kQ, Projection::kV})) == std::vector<std::string>{"qkv_proj"});
  CHECK(Names(TargetsFor(phi3, {Projection::kUp, Projection::kDown})) ==
        std::vector<std::string>{"gate_up_proj", "down_proj"});
  CHECK(Names(TargetsFor(qwen, {Projection::kQkv})) == std::vector<std::string>{"q_proj", "k_proj", "v_proj"});
  CHECK(Names(TargetsFor(qwen, {Projection::kGateUp, Projection::kO})) ==
        std::vector<std::string>{"o_proj", "gate_proj", "up_proj"});
  // "all" is every projection of the model at hand.
  CHECK(Names(TargetsFor(phi3, *ParseTargets("all"))) ==
        std::vector<std::string>{"qkv_proj", "o_proj", "gate_up_proj", "down_proj"});
  CHECK(TargetsFor(qwen, *ParseTargets("all")).size() == 7);
  // A PEFT file names tensors: an adapter of q_proj cannot be a Phi-3 one.
  const std::string peft = R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})";
  const auto refused = ParsePeftConfig(peft, phi3);
  REQUIRE_FALSE(refused.ok());
  CHECK(std::string(refused.status().message()).find("q_proj is not a projection of Phi3ForCausalLM") !=
        std::string::npos);
  CHECK(std::string(refused.status().message()).find("qkv_proj") != std::string::npos);
  const auto all_linear =
      ParsePeftConfig(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"})", phi3);
  REQUIRE(all_linear.ok());
  CHECK(Names(all_linear->targets) == Names(model::ModelProjections(phi3)));
}

TEST_CASE("A GPT-NeoX adapter adapts query_key_value, dense and the MLP under their own names", "[lora]") {
  const auto c = SmallConfig("tiny-gptneox");
  auto m = SmallModel(c);
  auto a = LoraAdapter::Create(c, AllTargets(4));  // q, k, v stand for query_key_value; the plain MLP has no gate
  REQUIRE(a.ok());
  CHECK(Names((*a)->config().targets) == std::vector<std::string>{"qkv_proj", "o_proj", "up_proj", "down_proj"});
  const std::vector<LoraView>& views = (*a)->views();
  REQUIRE(views.size() == 2 * 4 * 2);
  CHECK(views[0].name == "base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight");
  CHECK(views[1].rows == 3 * c.q_dim());
  CHECK(views[3].name == "base_model.model.gpt_neox.layers.0.attention.dense.lora_B.weight");
  CHECK(views[4].name == "base_model.model.gpt_neox.layers.0.mlp.dense_h_to_4h.lora_A.weight");
  CHECK(views[7].name == "base_model.model.gpt_neox.layers.0.mlp.dense_4h_to_h.lora_B.weight");

  // Merged = unmerged; PEFT round trip with GPT-NeoX's module names, which a hand-written config may use too.
  CheckMergeAndPeft(c, *m, **a, "EleutherAI/pythia-160m",
                    {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"});
  const auto fused_only =
      ParsePeftConfig(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query_key_value"]})", c);
  REQUIRE(fused_only.ok());
  CHECK(Names(fused_only->targets) == std::vector<std::string>{"qkv_proj"});
  const auto refused =
      ParsePeftConfig(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["gate_proj"]})", c);
  REQUIRE_FALSE(refused.ok());
  CHECK(std::string(refused.status().message()).find("gate_proj is not a projection of GPTNeoXForCausalLM") !=
        std::string::npos);
  CHECK(std::string(refused.status().message()).find("dense_h_to_4h") != std::string::npos);
  // Targets from a server or the command line may name the family's modules too.
  CHECK(Names(*ParseTargets("query_key_value,dense_4h_to_h")) == std::vector<std::string>{"qkv_proj", "down_proj"});
  CHECK(Names(TargetsFor(c, *ParseTargets("all"))) ==
        std::vector<std::string>{"qkv_proj", "o_proj", "up_proj", "down_proj"});
}

TEST_CASE("A GPT-2 adapter names c_attn and both c_proj by their paths, with fan_in_fan_out", "[lora]") {
  const auto c = SmallConfig("tiny-gpt2");
  auto m = SmallModel(c);
  auto a = LoraAdapter::Create(c, AllTargets(4));
  REQUIRE(a.ok());
  CHECK(Names((*a)->config().targets) == std::vector<std::string>{"qkv_proj", "o_proj", "up_proj", "down_proj"});
  const std::vector<LoraView>& views = (*a)->views();
  REQUIRE(views.size() == 2 * 4 * 2);
  CHECK(views[0].name == "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight");
  CHECK(views[1].rows == 3 * c.hidden_size);
  CHECK(views[2].name == "base_model.model.transformer.h.0.attn.c_proj.lora_A.weight");
  CHECK(views[6].name == "base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight");

  CheckMergeAndPeft(c, *m, **a, "openai-community/gpt2", {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"});
  TempDir dir;
  REQUIRE(SavePeft(**a, dir.path, "openai-community/gpt2").ok());
  auto config = nlohmann::json::parse(*ReadFile(JoinPath(dir.path, "adapter_config.json")));
  CHECK(config["fan_in_fan_out"] == true);  // as PEFT marks adapters of Conv1D modules
  // PEFT's suffix rule: "c_proj" names both of them.
  const auto both = ParsePeftConfig(
      R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "fan_in_fan_out": true, "target_modules": ["c_proj"]})", c);
  REQUIRE(both.ok());
  CHECK(Names(both->targets) == std::vector<std::string>{"o_proj", "down_proj"});
  // fan_in_fan_out on a model whose projections are stored (out, in) is a wrong adapter.
  const auto llama = ParsePeftConfig(
      R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "fan_in_fan_out": true, "target_modules": ["q_proj"]})",
      SmallConfig());
  REQUIRE_FALSE(llama.ok());
  CHECK(std::string(llama.status().message()).find("fan_in_fan_out") != std::string::npos);
  CHECK(Names(*ParseTargets("c_attn,mlp.c_proj")) == std::vector<std::string>{"qkv_proj", "down_proj"});
  CHECK_FALSE(ParseTargets("c_proj").ok());  // which one: attn.c_proj or mlp.c_proj
}

TEST_CASE("A Phi adapter adapts q_proj, k_proj, v_proj, dense, fc1 and fc2 under their own names", "[lora]") {
  const auto c = SmallConfig("tiny-phi");
  auto m = SmallModel(c);
  auto a = LoraAdapter::Create(c, AllTargets(4));  // the plain MLP has no gate
  REQUIRE(a.ok());
  CHECK(Names((*a)->config().targets) ==
        std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"});
  const std::vector<LoraView>& views = (*a)->views();
  REQUIRE(views.size() == 2 * 6 * 2);
  CHECK(views[0].name == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(views[6].name == "base_model.model.model.layers.0.self_attn.dense.lora_A.weight");
  CHECK(views[8].name == "base_model.model.model.layers.0.mlp.fc1.lora_A.weight");
  CHECK(views[9].rows == c.intermediate_size);
  CHECK(views[11].name == "base_model.model.model.layers.0.mlp.fc2.lora_B.weight");
  // Merged = unmerged (the LM head's bias untouched); PEFT round trip with Phi's module names.
  CheckMergeAndPeft(c, *m, **a, "microsoft/phi-2", {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"});
  // PEFT's default targets for Phi name them too, and the server's default q and v targets exist in this block.
  const auto peft_default = ParsePeftConfig(
      R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "fc1", "fc2"]})", c);
  REQUIRE(peft_default.ok());
  CHECK(Names(peft_default->targets) == std::vector<std::string>{"q_proj", "v_proj", "up_proj", "down_proj"});
  CHECK(Names(TargetsFor(c, {Projection::kQ, Projection::kV})) == std::vector<std::string>{"q_proj", "v_proj"});
  const auto refused =
      ParsePeftConfig(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["gate_proj"]})", c);
  REQUIRE_FALSE(refused.ok());
  CHECK(std::string(refused.status().message()).find("gate_proj is not a projection of PhiForCausalLM") !=
        std::string::npos);
  CHECK(Names(*ParseTargets("dense,fc1")) == std::vector<std::string>{"o_proj", "up_proj"});
}

TEST_CASE("An OPT adapter adapts q_proj, k_proj, v_proj, out_proj, fc1 and fc2 under OPT's paths", "[lora]") {
  for (const model::ModelConfig& c : {SmallConfig("tiny-opt"), PostLnOpt()}) {
    INFO("post-LN " << c.norm_after_residual);
    auto m = SmallModel(c);
    auto a = LoraAdapter::Create(c, AllTargets(4));  // the plain MLP has no gate
    REQUIRE(a.ok());
    const std::vector<LoraView>& views = (*a)->views();
    REQUIRE(views.size() == 2 * 6 * 2);
    CHECK(views[0].name == "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight");
    CHECK(views[6].name == "base_model.model.model.decoder.layers.0.self_attn.out_proj.lora_A.weight");
    CHECK(views[11].name == "base_model.model.model.decoder.layers.0.fc2.lora_B.weight");
    // Merged = unmerged (with OPT-350m's projected embeddings untouched); PEFT round trip with OPT's names.
    CheckMergeAndPeft(c, *m, **a, "facebook/opt-125m", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"});
  }
}

TEST_CASE("Merging into 16-bit stored weights is refused", "[lora]") {
  const auto c = SmallConfig();
  model::ModelWeights w = model::RandomWeights(c, 1);
  w.layers[0].q = w.layers[0].q.to(at::kBFloat16);
  auto a = LoraAdapter::Create(c, LoraConfig{});
  REQUIRE(a.ok());
  const absl::Status st = (*a)->Merge(w);
  CHECK(st.code() == absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("A BitFit adapter adds its bias to the targets' outputs as merging it into their biases does", "[lora]") {
  const auto c = SmallConfig("tiny-qwen2");  // q, k and v have biases, o and the MLP none
  auto m = SmallModel(c);
  LoraConfig lc;
  lc.kind = AdapterKind::kBias;
  lc.targets = {Projection::kQ, Projection::kV};
  auto a = LoraAdapter::Create(c, lc);
  REQUIRE(a.ok());
  const auto q_out = model::FeaturesOf(c, Projection::kQ).out, v_out = model::FeaturesOf(c, Projection::kV).out;
  CHECK((*a)->numel() == c.num_hidden_layers * (q_out + v_out));
  CHECK((*a)->views()[0].name == "base_model.model.model.layers.0.self_attn.q_proj.bias");
  model::ForwardOptions fo;
  fo.adapter = a->get();
  CHECK(at::equal(*m->Logits(Tokens(), fo), *m->Logits(Tokens())));  // zero at initialization
  at::manual_seed(4);
  (*a)->flat().copy_(at::randn({(*a)->numel()}) * 0.5);
  const at::Tensor adapted = *m->Logits(Tokens(), fo);
  CHECK((adapted - *m->Logits(Tokens())).abs().max().item<double>() > 1e-3);
  const at::Tensor v_bias_before = m->weights().layers[1].v_bias.clone();
  REQUIRE((*a)->Merge(m->mutable_weights()).ok());
  CHECK((*m->Logits(Tokens()) - adapted).abs().max().item<double>() < 1e-4);
  REQUIRE((*a)->Unmerge(m->mutable_weights()).ok());
  CHECK((m->weights().layers[1].v_bias - v_bias_before).abs().max().item<double>() < 1e-6);

  // o_proj has no bias to merge into: refused, nothing changed.
  const at::Tensor v_bias_unmerged = m->weights().layers[1].v_bias.clone();
  lc.targets = {Projection::kV, Projection::kO};
  auto o = LoraAdapter::Create(c, lc);
  REQUIRE(o.ok());
  (*o)->flat().fill_(1.0f);
  const absl::Status merged = (*o)->Merge(m->mutable_weights());
  CHECK(merged.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(merged.message().find("has no bias") != std::string_view::npos);
  CHECK(at::equal(m->weights().layers[1].v_bias, v_bias_unmerged));
}

TEST_CASE("A BitFit adapter saves as 1-D biases with a BITFIT config and loads back exactly", "[lora]") {
  TempDir dir;
  const auto c = SmallConfig();
  LoraConfig lc;
  lc.kind = AdapterKind::kBias;
  lc.targets = {Projection::kO, Projection::kDown};
  lc.layers = {1};
  auto a = LoraAdapter::Create(c, lc);
  REQUIRE(a.ok());
  at::manual_seed(2);
  (*a)->flat().copy_(at::randn({(*a)->numel()}));
  REQUIRE(SavePeft(**a, dir.path).ok());
  auto config = nlohmann::json::parse(*ReadFile(JoinPath(dir.path, "adapter_config.json")));
  CHECK(config["peft_type"] == "BITFIT");
  CHECK(config["layers_to_transform"] == nlohmann::json({1}));
  auto file = model::SafetensorsFile::Open(JoinPath(dir.path, "adapter_model.safetensors"));
  REQUIRE(file.ok());
  const auto& down = (*file)->tensors().at("base_model.model.model.layers.1.mlp.down_proj.bias");
  CHECK(down.shape == std::vector<int64_t>{c.hidden_size});
  auto back = LoadPeft(dir.path, c);
  REQUIRE(back.ok());
  CHECK((*back)->config().kind == AdapterKind::kBias);
  CHECK(at::equal((*back)->flat(), (*a)->flat()));
}

TEST_CASE("A PEFT save and load round trip restores the adapter exactly", "[lora]") {
  // Qwen3 and Gemma 3: q_proj's 192 outputs != hidden 128.
  for (const char* preset : {"tiny-qwen2", "tiny-qwen3", "tiny-olmo2", "tiny-gemma3", "tiny-gemma2"}) {
    INFO(preset);
    TempDir dir;
    const auto c = SmallConfig(preset);
    LoraConfig lc = AllTargets(2);
    lc.targets = {Projection::kQ, Projection::kDown};
    lc.layers = {1};
    lc.use_rslora = true;
    auto a = LoraAdapter::Create(c, lc);
    REQUIRE(a.ok());
    RandomizeB(**a);
    REQUIRE(SavePeft(**a, dir.path, "models/tiny").ok());
    auto config = nlohmann::json::parse(*ReadFile(JoinPath(dir.path, "adapter_config.json")));
    CHECK(config["peft_type"] == "LORA");
    CHECK(config["r"] == 2);
    CHECK(config["target_modules"] == nlohmann::json({"q_proj", "down_proj"}));
    CHECK(config["layers_to_transform"] == nlohmann::json({1}));
    CHECK(config["base_model_name_or_path"] == "models/tiny");
    auto file = model::SafetensorsFile::Open(JoinPath(dir.path, "adapter_model.safetensors"));
    REQUIRE(file.ok());
    CHECK((*file)->Find("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight") != nullptr);
    const model::TensorView* q_b = (*file)->Find("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
    REQUIRE(q_b != nullptr);
    CHECK(q_b->shape == std::vector<int64_t>{c.q_dim(), 2});
    CHECK((*file)->tensors().size() == 4);

    auto loaded = LoadPeft(dir.path, c);
    REQUIRE(loaded.ok());
    CHECK(at::equal((*loaded)->flat(), (*a)->flat()));
    CHECK((*loaded)->config().use_rslora);
    CHECK((*loaded)->config().scale() == (*a)->config().scale());
  }
}

// Writes an adapter the way Hugging Face PEFT does (F16 tensors, its usual config fields).
void WriteForeignAdapter(const std::string& dir, const model::ModelConfig& c, int64_t rank, int64_t a_rows,
                         const nlohmann::json& targets) {
  nlohmann::json config = {{"alpha_pattern", nlohmann::json::object()},
                           {"auto_mapping", nullptr},
                           {"base_model_name_or_path", "HuggingFaceTB/SmolLM2-135M"},
                           {"bias", "none"},
                           {"fan_in_fan_out", false},
                           {"inference_mode", true},
                           {"init_lora_weights", true},
                           {"layers_pattern", nullptr},
                           {"layers_to_transform", nullptr},
                           {"loftq_config", nlohmann::json::object()},
                           {"lora_alpha", 32},
                           {"lora_dropout", 0.05},
                           {"megatron_config", nullptr},
                           {"megatron_core", "megatron.core"},
                           {"modules_to_save", nullptr},
                           {"peft_type", "LORA"},
                           {"r", rank},
                           {"rank_pattern", nlohmann::json::object()},
                           {"revision", nullptr},
                           {"target_modules", targets},
                           {"task_type", "CAUSAL_LM"},
                           {"use_dora", false},
                           {"use_rslora", false}};
  REQUIRE(WriteFileAtomic(JoinPath(dir, "adapter_config.json"), config.dump()).ok());
  std::vector<at::Tensor> keep;
  std::vector<model::TensorToWrite> tensors;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (const char* proj : {"v_proj", "q_proj"}) {
      const int64_t out = std::string(proj) == "q_proj" ? c.q_dim() : c.kv_dim();
      for (bool is_a : {true, false}) {
        at::Tensor t = (is_a ? at::full({a_rows, c.hidden_size}, 0.25 + l) : at::full({out, rank}, -0.5)).to(at::kHalf);
        keep.push_back(t);
        tensors.push_back({"base_model.model.model.layers." + std::to_string(l) + ".self_attn." + proj +
                               (is_a ? ".lora_A.weight" : ".lora_B.weight"),
                           model::DType::kF16,
                           t.sizes().vec(),
                           {static_cast<const uint8_t*>(t.data_ptr()), static_cast<size_t>(t.nbytes())}});
      }
    }
  }
  REQUIRE(model::WriteSafetensors(JoinPath(dir, "adapter_model.safetensors"), tensors).ok());
}

TEST_CASE("A PEFT adapter written elsewhere (F16, extra config fields) loads", "[lora]") {
  TempDir dir;
  const auto c = SmallConfig();
  WriteForeignAdapter(dir.path, c, 8, 8, {"q_proj", "v_proj"});
  auto a = LoadPeft(dir.path, c);
  REQUIRE(a.ok());
  CHECK((*a)->config().rank == 8);
  CHECK((*a)->config().alpha == 32);
  for (const LoraView& v : (*a)->views()) {
    const double expected = v.is_a ? 0.25 + static_cast<double>(v.layer) : -0.5;
    INFO(v.name);
    CHECK(at::allclose((*a)->Matrix(v), at::full({v.rows, v.cols}, expected)));
  }
}

TEST_CASE("Mismatched PEFT adapters are clear errors", "[lora]") {
  const auto c = SmallConfig();
  {
    TempDir dir;  // rank 8 in the config, tensors of rank 16
    WriteForeignAdapter(dir.path, c, 8, 16, {"q_proj", "v_proj"});
    auto a = LoadPeft(dir.path, c);
    REQUIRE_FALSE(a.ok());
    CHECK(std::string(a.status().message()).find("lora_A.weight' has shape [16, 192], expected [8, 192]") !=
          std::string::npos);
  }
  {
    TempDir dir;  // a GPT-2 style target this architecture lacks
    WriteForeignAdapter(dir.path, c, 8, 8, {"c_attn"});
    auto a = LoadPeft(dir.path, c);
    REQUIRE_FALSE(a.ok());
    CHECK(std::string(a.status().message()).find("c_attn") != std::string::npos);
  }
  {
    TempDir dir;  // config names only q_proj: the v_proj tensors in the file are unexpected
    WriteForeignAdapter(dir.path, c, 8, 8, {"q_proj"});
    auto a = LoadPeft(dir.path, c);
    REQUIRE_FALSE(a.ok());
    CHECK(std::string(a.status().message()).find("v_proj") != std::string::npos);
  }
  {
    TempDir dir;  // config names o_proj too, the file lacks it
    WriteForeignAdapter(dir.path, c, 8, 8, {"q_proj", "v_proj", "o_proj"});
    auto a = LoadPeft(dir.path, c);
    REQUIRE_FALSE(a.ok());
    CHECK(a.status().code() == absl::StatusCode::kNotFound);
    CHECK(std::string(a.status().message()).find("o_proj.lora_A.weight") != std::string::npos);
  }
  CHECK(LoadPeft("/nonexistent/adapter", c).status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("Gradients reach only the flat buffer, and recomputation gives the same ones", "[lora]") {
  // OLMo 2 normalizes the MLP's output and OPT-350m's post-LN block the residual sum after it, so their
  // recomputation must multiply the down projection again, which the other blocks skip (its values feed only
  // the layer's output).
  const std::string preset =
      GENERATE(as<std::string>{}, "tiny-qwen2", "tiny-qwen3", "tiny-olmo2", "tiny-gemma3", "tiny-gemma2", "tiny-phi3",
               "tiny-gptneox", "tiny-gpt2", "tiny-opt", "tiny-phi", "tiny-opt post-LN");
  INFO(preset);
  const auto c = preset == "tiny-opt post-LN" ? PostLnOpt() : SmallConfig(preset.c_str());
  auto m = SmallModel(c);
  auto a = LoraAdapter::Create(c, AllTargets(2));
  REQUIRE(a.ok());
  RandomizeB(**a);
  auto grad = [&](bool recompute) {
    at::Tensor& flat = (*a)->flat();
    flat.requires_grad_(true);
    flat.mutable_grad() = at::Tensor();
    model::ForwardOptions fo;
    fo.adapter = a->get();
    fo.recompute = recompute;
    auto loss = m->Loss(Tokens(), Tokens(), fo);
    REQUIRE(loss.ok());
    loss->mean().backward();
    at::Tensor g = flat.grad().clone();
    flat.requires_grad_(false);
    flat.mutable_grad() = at::Tensor();
    return g;
  };
  const at::Tensor plain = grad(false), recomputed = grad(true);
  CHECK(plain.abs().max().item<double>() > 0);
  CHECK((plain - recomputed).abs().max().item<double>() < 1e-6);
  CHECK_FALSE(m->weights().layers[0].o.grad().defined());
}

TEST_CASE("Per-matrix gradient leaves give the flat buffer's gradients, accumulated over backward calls", "[lora]") {
  const auto c = SmallConfig();
  auto m = SmallModel(c);
  auto a = LoraAdapter::Create(c, AllTargets(2));
  REQUIRE(a.ok());
  RandomizeB(**a);
  at::Tensor& flat = (*a)->flat();
  model::ForwardOptions fo;
  fo.adapter = a->get();
  // Reference: gradients through views of the flat buffer, two backward calls accumulating.
  flat.requires_grad_(true);
  for (int i = 0; i < 2; ++i) m->Loss(Tokens(), Tokens(), fo)->mean().backward();
  const at::Tensor want = flat.grad().clone();
  flat.mutable_grad() = at::Tensor();
  flat.requires_grad_(false);
  REQUIRE(want.abs().max().item<double>() > 0);
  // Without recomputation, with every layer recomputed, and with the last layer stored.
  for (const auto& [recompute, stored] : {std::pair{false, 0}, std::pair{true, 0}, std::pair{true, 1}}) {
    INFO("recompute " << recompute << ", stored " << stored);
    fo.recompute = recompute;
    fo.stored_layers = stored;
    (*a)->BeginGradients();
    for (int i = 0; i < 2; ++i) m->Loss(Tokens(), Tokens(), fo)->mean().backward();
    const at::Tensor got = (*a)->TakeGradients();
    CHECK((got - want).abs().max().item<double>() < 1e-6);
    CHECK_FALSE(flat.grad().defined());                           // the flat buffer itself never took part
    CHECK_FALSE((*a)->Matrix((*a)->views()[0]).requires_grad());  // the leaves are gone
  }
}

TEST_CASE("The adapter's backward (recomputing x A) equals plain autograd through the LoRA expression", "[lora]") {
  const auto c = SmallConfig();
  auto a = LoraAdapter::Create(c, AllTargets(3));
  REQUIRE(a.ok());
  RandomizeB(**a);
  const LoraView* va = nullptr;
  for (const LoraView& v : (*a)->views()) {
    if (v.layer == 1 && v.projection == Projection::kUp && v.is_a) va = &v;
  }
  REQUIRE(va != nullptr);
  const LoraView& vb = *(va + 1);
  const at::Tensor x0 = at::randn({2, 5, c.hidden_size});
  const at::Tensor upstream = at::randn({2, 5, c.intermediate_size});
  // Through the adapter.
  at::Tensor& flat = (*a)->flat();
  flat.requires_grad_(true);
  at::Tensor x = x0.clone().requires_grad_(true);
  (*a)->Apply(1, Projection::kUp, x, at::zeros({2, 5, c.intermediate_size})).backward(upstream);
  const at::Tensor grad_a = flat.grad().narrow(0, va->offset, va->numel()).view({va->rows, va->cols}).clone();
  const at::Tensor grad_b = flat.grad().narrow(0, vb.offset, vb.numel()).view({vb.rows, vb.cols}).clone();
  flat.requires_grad_(false);
  flat.mutable_grad() = at::Tensor();
  // The same expression with LibTorch's own formulas.
  at::Tensor ra = (*a)->Matrix(*va).detach().clone().requires_grad_(true);
  at::Tensor rb = (*a)->Matrix(vb).detach().clone().requires_grad_(true);
  at::Tensor rx = x0.clone().requires_grad_(true);
  (at::linear(at::linear(rx, ra), rb) * (*a)->config().scale()).backward(upstream);
  CHECK(grad_b.abs().max().item<double>() > 0);
  CHECK((x.grad() - rx.grad()).abs().max().item<double>() < 1e-5);
  CHECK((grad_a - ra.grad()).abs().max().item<double>() < 1e-5);
  CHECK((grad_b - rb.grad()).abs().max().item<double>() < 1e-5);
}

TEST_CASE("Dropout masks depend on the step only in training mode", "[lora]") {
  const auto c = SmallConfig();
  auto m = SmallModel(c);
  LoraConfig lc = AllTargets(2);
  lc.dropout = 0.5;
  auto a = LoraAdapter::Create(c, lc);
  REQUIRE(a.ok());
  RandomizeB(**a);
  model::ForwardOptions fo;
  fo.adapter = a->get();
  const at::Tensor eval = *m->Logits(Tokens(), fo);
  (*a)->SetTraining(true);
  (*a)->SetStep(7, 1);
  const at::Tensor s1 = *m->Logits(Tokens(), fo);
  const at::Tensor s1_again = *m->Logits(Tokens(), fo);
  (*a)->SetStep(7, 2);
  const at::Tensor s2 = *m->Logits(Tokens(), fo);
  (*a)->SetTraining(false);
  CHECK(at::equal(s1, s1_again));
  CHECK_FALSE(at::equal(s1, s2));
  CHECK_FALSE(at::equal(s1, eval));
  CHECK(at::equal(*m->Logits(Tokens(), fo), eval));
}

TEST_CASE("LoRA targets parse from names, short names and 'all'", "[lora]") {
  auto t = ParseTargets("q_proj, v,down_proj");
  REQUIRE(t.ok());
  const bool expected_order = *t == std::vector<Projection>{Projection::kQ, Projection::kV, Projection::kDown};
  CHECK(expected_order);
  CHECK(ParseTargets("all")->size() == 9);  // every name; TargetsFor keeps the model's own
  CHECK(ParseTargets("lm_head").status().code() == absl::StatusCode::kInvalidArgument);
  LoraConfig bad;
  bad.rank = 0;
  CHECK(bad.Validate(SmallConfig()).code() == absl::StatusCode::kInvalidArgument);
  bad.rank = 4;
  bad.layers = {5};
  CHECK(bad.Validate(SmallConfig()).code() == absl::StatusCode::kInvalidArgument);
  bad.layers = {1, 1};
  CHECK(bad.Validate(SmallConfig()).code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Layer selections parse as all or top:N or indices and resolve against the model's layers", "[lora]") {
  auto resolve = [](std::string_view text, int64_t layers) -> absl::StatusOr<std::vector<int64_t>> {
    SEEDLING_ASSIGN_OR_RETURN(const LayerSelection s, ParseLayerSelection(text));
    return ResolveLayers(s, layers);
  };
  CHECK(resolve("all", 30)->empty());
  CHECK(resolve("", 30)->empty());
  CHECK(*resolve("top:3", 30) == std::vector<int64_t>{27, 28, 29});
  CHECK(*resolve("top:30", 30) == std::vector<int64_t>{0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14,
                                                       15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29});
  CHECK(*resolve(" 11,0, 5 ", 30) == std::vector<int64_t>{0, 5, 11});
  for (const char* bad : {"top:0", "top:", "top:x", "top:-2", "-1", "1,,2", "0,3,0", "first:2", "1.5"}) {
    INFO(bad);
    CHECK(ParseLayerSelection(bad).status().code() == absl::StatusCode::kInvalidArgument);
  }
  CHECK(resolve("top:31", 30).status().message() == "layers 'top:31': the model has 30 layers");
  CHECK(resolve("0,30", 30).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("An adapter on the top layers holds only their matrices and leaves the lower layers' outputs alone",
          "[lora]") {
  const model::ModelConfig config = SmallConfig();
  auto all = LoraAdapter::Create(config, LoraConfig{});
  LoraConfig top;
  top.layers = {config.num_hidden_layers - 1};
  auto one = LoraAdapter::Create(config, top);
  REQUIRE(all.ok());
  REQUIRE(one.ok());
  CHECK((*one)->numel() * config.num_hidden_layers == (*all)->numel());
  for (const LoraView& v : (*one)->views()) CHECK(v.layer == config.num_hidden_layers - 1);
  // Only the adapted layer's projections change their outputs.
  (*one)->flat().normal_();
  const at::Tensor x = at::randn({1, 3, config.hidden_size});
  const at::Tensor base = at::zeros({1, 3, config.hidden_size});
  CHECK(at::equal((*one)->Apply(0, Projection::kQ, x, base), base));
  CHECK_FALSE(at::equal((*one)->Apply(config.num_hidden_layers - 1, Projection::kQ, x, base), base));
}

}  // namespace
}  // namespace seedling::lora
