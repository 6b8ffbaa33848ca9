#include "model/weights.h"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "base/file.h"
#include "model/init.h"
#include "model/llama.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "tests/test_util.h"

namespace seedling::model {
namespace {

using seedling::testing::TempDir;

ModelConfig SmallConfig() {
  auto c = PresetConfig("tiny-qwen2");  // untied head, q/k/v biases
  REQUIRE(c.ok());
  c->num_hidden_layers = 2;
  c->vocab_size = 64;
  return *c;
}

void WriteModel(const std::string& dir, const ModelConfig& c, const ModelWeights& w, DType dtype) {
  REQUIRE(WriteFileAtomic(JoinPath(dir, "config.json"), ModelConfigToJson(c)).ok());
  REQUIRE(SaveWeights(JoinPath(dir, "model.safetensors"), w, c, dtype).ok());
}

at::Tensor SomeTokens() { return at::tensor({1, 7, 3, 63, 0, 12}, at::kLong).view({1, 6}); }

// Writes every weight of `named` but the one called `skip` to an F32 safetensors file at `path`.
void WriteWithout(const std::string& path, const std::vector<NamedWeight>& named, std::string_view skip) {
  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> tensors;
  for (const NamedWeight& nw : named) {
    if (nw.name == skip) continue;
    keep.push_back(nw.tensor.contiguous());
    tensors.push_back(
        {nw.name,
         DType::kF32,
         nw.tensor.sizes().vec(),
         {static_cast<const uint8_t*>(keep.back().data_ptr()), static_cast<size_t>(keep.back().nbytes())}});
  }
  REQUIRE(WriteSafetensors(path, tensors).ok());
}

// Writes (c, w) to `dir` as config.json and an F32 model.safetensors and loads it back; the loaded model gives
// the logits of the one built from `w` directly.
std::unique_ptr<LlamaModel> SaveAndLoad(const std::string& dir, const ModelConfig& c, const ModelWeights& w) {
  WriteModel(dir, c, w, DType::kF32);
  auto m = LlamaModel::Load(dir);
  REQUIRE(m.ok());
  auto direct = LlamaModel::Create(c, w);
  REQUIRE(direct.ok());
  CHECK(at::equal(*(*m)->Logits(SomeTokens()), *(*direct)->Logits(SomeTokens())));
  return std::move(m).value();
}

TEST_CASE("init-model trains the family's tokenizer style, with the special ids in config.json", "[model][init]") {
  struct Case {
    const char* preset;
    const char* pre_tokenizer;  // tokenizer.json "pre_tokenizer" type, or "" for none (SentencePiece style)
    int64_t bos, eos;
    bool prepends_bos;
    bool space_prefix;  // SentencePiece's dummy prefix: the first word's token starts with "▁" (Llama 2, Phi-3)
  };
  for (const Case& c :
       {Case{"tiny", "ByteLevel", 0, 0, false, false}, Case{"tiny-gemma2", "", 2, 1, true, false},
        Case{"tiny-gemma3", "", 2, 1, true, false}, Case{"tiny-phi3", "", 1, 3, true, true},
        Case{"tiny-opt", "ByteLevel", 0, 0, false, false}, Case{"tiny-gptneox", "ByteLevel", 0, 0, false, false},
        Case{"tiny-gpt2", "ByteLevel", 0, 0, false, false}, Case{"tiny-phi", "ByteLevel", 0, 0, false, false}}) {
    INFO(c.preset);
    TempDir dir;
    InitModelOptions options;
    options.preset = c.preset;
    REQUIRE(InitModel(dir.path, options).ok());
    auto config = LoadModelConfig(dir.path);
    REQUIRE(config.ok());
    CHECK(config->bos_token_id == c.bos);
    CHECK(config->eos_token_ids == std::vector<int64_t>{c.eos});
    auto text = ReadFile(JoinPath(dir.path, "tokenizer.json"));
    REQUIRE(text.ok());
    const nlohmann::json doc = nlohmann::json::parse(*text);
    CHECK((doc["pre_tokenizer"].is_null() ? std::string() : doc["pre_tokenizer"]["type"].get<std::string>()) ==
          c.pre_tokenizer);
    auto tok = LoadTokenizer(dir.path);
    REQUIRE(tok.ok());
    auto ids = (*tok)->Encode("federated learning on phones", /*add_special_tokens=*/true);
    REQUIRE(ids.ok());
    CHECK((ids->front() == c.bos) == c.prepends_bos);
    if (c.prepends_bos) {
      REQUIRE(ids->size() > 1);
      CHECK((*tok)->IdToToken((*ids)[1]).value_or("").starts_with("\xE2\x96\x81") == c.space_prefix);
    }
    auto decoded = (*tok)->Decode(*ids, /*skip_special_tokens=*/true);
    REQUIRE(decoded.ok());
    CHECK(*decoded == "federated learning on phones");
  }
}

TEST_CASE("A model saved as F32 loads back with identical logits", "[model][weights]") {
  TempDir dir;
  const ModelConfig c = SmallConfig();
  auto original = LlamaModel::Create(c, RandomWeights(c, 3));
  REQUIRE(original.ok());
  WriteModel(dir.path, c, (*original)->weights(), DType::kF32);
  auto loaded = LlamaModel::Load(dir.path);
  REQUIRE(loaded.ok());
  auto a = (*original)->Logits(SomeTokens());
  auto b = (*loaded)->Logits(SomeTokens());
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(at::equal(*a, *b));
}

TEST_CASE("BF16 weights load as fp32 by default and stay bf16 with kStored", "[model][weights]") {
  TempDir dir;
  const ModelConfig c = SmallConfig();
  ModelWeights w = RandomWeights(c, 4);
  WriteModel(dir.path, c, w, DType::kBF16);
  // Reference: the same weights rounded to bf16 and back.
  for (const NamedWeight& nw : NamedWeights(w, c)) nw.tensor.copy_(nw.tensor.to(at::kBFloat16).to(at::kFloat));
  auto reference = LlamaModel::Create(c, std::move(w));
  REQUIRE(reference.ok());

  auto fp32 = LlamaModel::Load(dir.path);
  REQUIRE(fp32.ok());
  CHECK((*fp32)->weights().layers[0].q.scalar_type() == at::kFloat);
  LoadOptions stored_options;
  stored_options.precision = WeightPrecision::kStored;
  auto stored = LlamaModel::Load(dir.path, stored_options);
  REQUIRE(stored.ok());
  CHECK((*stored)->weights().layers[0].q.scalar_type() == at::kBFloat16);
  CHECK((*stored)->weights().layers[0].input_norm.scalar_type() == at::kFloat);  // norms always fp32

  const at::Tensor ref = *(*reference)->Logits(SomeTokens());
  CHECK(at::allclose(*(*fp32)->Logits(SomeTokens()), ref, 1e-5, 1e-5));
  CHECK(at::allclose(*(*stored)->Logits(SomeTokens()), ref, 1e-5, 1e-5));
}

TEST_CASE("Writing a loaded F32 weight in place never changes the file", "[model][weights]") {
  TempDir dir;
  const ModelConfig c = SmallConfig();
  WriteModel(dir.path, c, RandomWeights(c, 5), DType::kF32);
  {
    auto m = LlamaModel::Load(dir.path);
    REQUIRE(m.ok());
    (*m)->mutable_weights().layers[0].q.fill_(42.0f);  // copy-on-write mapping
  }
  auto again = LlamaModel::Load(dir.path);
  REQUIRE(again.ok());
  CHECK((*again)->weights().layers[0].q.abs().max().item<float>() < 1.0f);
}

TEST_CASE("A missing tensor is NotFound naming it", "[model][weights]") {
  TempDir dir;
  const ModelConfig c = SmallConfig();
  const ModelWeights w = RandomWeights(c, 6);
  REQUIRE(WriteFileAtomic(JoinPath(dir.path, "config.json"), ModelConfigToJson(c)).ok());
  WriteWithout(JoinPath(dir.path, "model.safetensors"), NamedWeights(w, c), "model.layers.1.mlp.up_proj.weight");
  auto m = LlamaModel::Load(dir.path);
  REQUIRE_FALSE(m.ok());
  CHECK(m.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(m.status().message()).find("model.layers.1.mlp.up_proj.weight") != std::string::npos);
}

TEST_CASE("A tensor with the wrong shape or an unexpected tensor is rejected by name", "[model][weights]") {
  TempDir dir;
  ModelConfig c = SmallConfig();
  const ModelWeights w = RandomWeights(c, 7);
  REQUIRE(SaveWeights(JoinPath(dir.path, "model.safetensors"), w, c, DType::kF32).ok());
  // The same file under a config with a different intermediate size: shapes disagree.
  ModelConfig wider = c;
  wider.intermediate_size += 8;
  REQUIRE(WriteFileAtomic(JoinPath(dir.path, "config.json"), ModelConfigToJson(wider)).ok());
  auto shape = LlamaModel::Load(dir.path);
  REQUIRE_FALSE(shape.ok());
  CHECK(std::string(shape.status().message()).find("mlp.gate_proj.weight' has shape") != std::string::npos);
  // Under a config with one layer fewer: layer 1's tensors are unexpected.
  ModelConfig shallower = c;
  shallower.num_hidden_layers = 1;
  REQUIRE(WriteFileAtomic(JoinPath(dir.path, "config.json"), ModelConfigToJson(shallower)).ok());
  auto extra = LlamaModel::Load(dir.path);
  REQUIRE_FALSE(extra.ok());
  CHECK(std::string(extra.status().message()).find("model.layers.1.") != std::string::npos);
}

TEST_CASE("A GPT-NeoX checkpoint loads under its own names, skipping the old mask buffers", "[model][weights]") {
  TempDir dir;
  auto c = PresetConfig("tiny-gptneox");
  REQUIRE(c.ok());
  const ModelWeights w = RandomWeights(*c, 8);
  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> tensors;
  auto add = [&](const std::string& name, const at::Tensor& t) {
    keep.push_back(t.contiguous());
    tensors.push_back(
        {name,
         DType::kF32,
         t.sizes().vec(),
         {static_cast<const uint8_t*>(keep.back().data_ptr()), static_cast<size_t>(keep.back().nbytes())}});
  };
  const std::vector<NamedWeight> named = NamedWeights(w, *c);
  for (const NamedWeight& nw : named) add(nw.name, nw.tensor);
  CHECK(named.front().name == "gpt_neox.embed_in.weight");
  CHECK(named.back().name == "embed_out.weight");
  CHECK(named[named.size() - 2].name == "gpt_neox.final_layer_norm.bias");
  // What checkpoints of transformers before 4.3x carry beside the weights.
  add("gpt_neox.layers.0.attention.bias", at::ones({1, 1, 8, 8}));
  add("gpt_neox.layers.0.attention.masked_bias", at::full({}, -1e9));
  add("gpt_neox.layers.0.attention.rotary_emb.inv_freq", at::ones({4}));
  REQUIRE(WriteFileAtomic(JoinPath(dir.path, "config.json"), ModelConfigToJson(*c)).ok());
  REQUIRE(WriteSafetensors(JoinPath(dir.path, "model.safetensors"), tensors).ok());
  auto m = LlamaModel::Load(dir.path);
  REQUIRE(m.ok());
  CHECK(at::equal((*m)->weights().layers[1].pre_mlp_norm_bias, w.layers[1].pre_mlp_norm_bias));
  auto direct = LlamaModel::Create(*c, w);
  REQUIRE(direct.ok());
  CHECK(at::equal(*(*m)->Logits(SomeTokens()), *(*direct)->Logits(SomeTokens())));
  // Any other stray tensor is still refused by name.
  add("gpt_neox.layers.0.attention.extra", at::ones({2}));
  REQUIRE(WriteSafetensors(JoinPath(dir.path, "model.safetensors"), tensors).ok());
  auto stray = LlamaModel::Load(dir.path);
  REQUIRE_FALSE(stray.ok());
  CHECK(std::string(stray.status().message()).find("gpt_neox.layers.0.attention.extra") != std::string::npos);
}

TEST_CASE("A GPT-2 checkpoint's Conv1D matrices load transposed, with or without the transformer. prefix",
          "[model][weights]") {
  auto c = PresetConfig("tiny-gpt2");
  REQUIRE(c.ok());
  const ModelWeights w = RandomWeights(*c, 9);
  auto direct = LlamaModel::Create(*c, w);
  REQUIRE(direct.ok());
  const at::Tensor want = *(*direct)->Logits(SomeTokens());
  // As the original GPT-2 files hold them: saved from GPT2Model (no "transformer."), Conv1D weights (in, out).
  TempDir bare;
  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> tensors;
  for (const NamedWeight& nw : NamedWeights(w, *c)) {
    const bool conv1d = nw.tensor.dim() == 2 && nw.name.find(".h.") != std::string::npos;
    keep.push_back((conv1d ? nw.tensor.t() : nw.tensor).contiguous());
    tensors.push_back(
        {nw.name.substr(std::string("transformer.").size()),
         DType::kF32,
         keep.back().sizes().vec(),
         {static_cast<const uint8_t*>(keep.back().data_ptr()), static_cast<size_t>(keep.back().nbytes())}});
  }
  CHECK(tensors[0].name == "wte.weight");
  CHECK(tensors[1].name == "wpe.weight");
  CHECK(tensors[4].name == "h.0.attn.c_attn.weight");
  CHECK(tensors[4].shape == std::vector<int64_t>{c->hidden_size, 3 * c->hidden_size});  // (in, out)
  tensors.push_back({"h.0.attn.masked_bias", DType::kF32, {}, {static_cast<const uint8_t*>(keep[0].data_ptr()), 4}});
  REQUIRE(WriteFileAtomic(JoinPath(bare.path, "config.json"), ModelConfigToJson(*c)).ok());
  REQUIRE(WriteSafetensors(JoinPath(bare.path, "model.safetensors"), tensors).ok());
  auto loaded = LlamaModel::Load(bare.path);
  REQUIRE(loaded.ok());
  CHECK(at::equal(*(*loaded)->Logits(SomeTokens()), want));
  // A q8_0 weight cache built from it holds the matrices (out, in), as one quantized in memory does.
  LoadOptions q8;
  q8.precision = WeightPrecision::kQ8_0;
  auto cached = LlamaModel::Load(bare.path, q8);
  REQUIRE(cached.ok());
  ModelWeights quantized = w;
  REQUIRE(QuantizeMatrices(quantized, *c, WeightFormat::kQ8_0).ok());
  auto in_memory = LlamaModel::Create(*c, quantized);
  REQUIRE(in_memory.ok());
  CHECK(at::equal(*(*cached)->Logits(SomeTokens()), *(*in_memory)->Logits(SomeTokens())));
  // SaveWeights writes Cerebras-GPT's layout (with the prefix, Conv1D (in, out)), which loads back alike.
  TempDir saved;
  WriteModel(saved.path, *c, w, DType::kF32);
  auto header = SafetensorsCollection::Open(saved.path);
  REQUIRE(header.ok());
  const TensorView* c_fc = (*header)->Find("transformer.h.1.mlp.c_fc.weight");
  REQUIRE(c_fc != nullptr);
  CHECK(c_fc->shape == std::vector<int64_t>{c->hidden_size, c->intermediate_size});
  auto reloaded = LlamaModel::Load(saved.path);
  REQUIRE(reloaded.ok());
  CHECK(at::equal(*(*reloaded)->Logits(SomeTokens()), want));
}

TEST_CASE("A Phi checkpoint loads under its own names with the LM head's bias, which it requires", "[model][weights]") {
  TempDir dir;
  auto c = PresetConfig("tiny-phi");
  REQUIRE(c.ok());
  ModelWeights w = RandomWeights(*c, 8);
  w.lm_head_bias.uniform_(-1, 1);
  const std::vector<NamedWeight> named = NamedWeights(w, *c);
  CHECK(named[named.size() - 1].name == "lm_head.bias");
  CHECK(named[named.size() - 2].name == "lm_head.weight");
  CHECK(named[named.size() - 3].name == "model.final_layernorm.bias");
  std::vector<std::string> names;
  for (const NamedWeight& nw : named) names.push_back(nw.name);
  for (const char* name : {"model.layers.0.input_layernorm.bias", "model.layers.0.self_attn.dense.bias",
                           "model.layers.1.mlp.fc1.weight", "model.layers.1.mlp.fc2.bias"}) {
    CHECK(std::find(names.begin(), names.end(), name) != names.end());
  }
  // One norm per block: no post_attention_layernorm.
  CHECK(std::none_of(names.begin(), names.end(), [](const std::string& n) { return n.find("post_") != n.npos; }));
  const std::unique_ptr<LlamaModel> m = SaveAndLoad(dir.path, *c, w);
  CHECK(at::equal(m->weights().lm_head_bias, w.lm_head_bias));
  // Without lm_head.bias the checkpoint is not a Phi model.
  WriteWithout(JoinPath(dir.path, "model.safetensors"), named, "lm_head.bias");
  auto missing = LlamaModel::Load(dir.path);
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(missing.status().message()).find("'lm_head.bias'") != std::string::npos);
}

TEST_CASE("An OPT-350m checkpoint loads with project_in and project_out and without a final LayerNorm",
          "[model][weights]") {
  TempDir dir;
  auto c = PresetConfig("opt-350m");
  REQUIRE(c.ok());
  c->num_hidden_layers = 1;  // the real widths, one block
  c->vocab_size = 64;
  const ModelWeights w = RandomWeights(*c, 8);
  std::vector<std::string> names;
  for (const NamedWeight& nw : NamedWeights(w, *c)) names.push_back(nw.name);
  CHECK(names[0] == "model.decoder.embed_tokens.weight");
  CHECK(names[2] == "model.decoder.project_out.weight");
  CHECK(names[3] == "model.decoder.project_in.weight");
  CHECK(names.back() == "model.decoder.layers.0.fc2.bias");  // tied head, and no model.decoder.final_layer_norm
  CHECK(std::count(names.begin(), names.end(), "model.decoder.layers.0.final_layer_norm.weight") == 1);
  CHECK(w.embed.sizes() == std::vector<int64_t>{64, 512});
  CHECK(w.project_in.sizes() == std::vector<int64_t>{1024, 512});
  CHECK(w.project_out.sizes() == std::vector<int64_t>{512, 1024});
  const std::unique_ptr<LlamaModel> m = SaveAndLoad(dir.path, *c, w);
  CHECK(at::equal(m->weights().project_in, w.project_in));
  CHECK(m->Logits(SomeTokens())->size(2) == 64);
}

TEST_CASE("RandomWeights is deterministic per seed", "[model][weights]") {
  const ModelConfig c = SmallConfig();
  const ModelWeights a = RandomWeights(c, 9), b = RandomWeights(c, 9), d = RandomWeights(c, 10);
  CHECK(at::equal(a.layers[1].down, b.layers[1].down));
  CHECK_FALSE(at::equal(a.layers[1].down, d.layers[1].down));
  CHECK(std::abs(a.embed.std().item<double>() - 0.02) < 0.002);
}

}  // namespace
}  // namespace seedling::model
