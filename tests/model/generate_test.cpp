#include "model/generate.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <map>

#include "model/init.h"
#include "tests/test_util.h"

namespace seedling::model {
namespace {

std::unique_ptr<LlamaModel> TinyModel(uint64_t seed) {
  auto c = PresetConfig("tiny");
  REQUIRE(c.ok());
  c->num_hidden_layers = 2;
  c->vocab_size = 50;
  c->eos_token_ids = {0};
  ModelWeights w = RandomWeights(*c, seed);
  for (const NamedWeight& nw : NamedWeights(w, *c)) {
    if (nw.name.find("norm") == std::string::npos) nw.tensor.mul_(25.0);  // peaky next-token distributions
  }
  auto m = LlamaModel::Create(*c, std::move(w));
  REQUIRE(m.ok());
  return std::move(m).value();
}

TEST_CASE("Greedy sampling picks the argmax, top-k 1 and a tiny top-p do too", "[model][generate]") {
  const at::Tensor logits = at::tensor({0.1f, 2.0f, -1.0f, 1.9f});
  Rng rng(1, rng_stream::kSampling);
  GenerateOptions greedy;
  greedy.temperature = 0;
  CHECK(SampleToken(logits, greedy, rng) == 1);
  GenerateOptions k1;
  k1.top_k = 1;
  GenerateOptions p_small;
  p_small.top_p = 1e-6;
  for (int i = 0; i < 20; ++i) {
    CHECK(SampleToken(logits, k1, rng) == 1);
    CHECK(SampleToken(logits, p_small, rng) == 1);
  }
}

TEST_CASE("Sampling follows the softmax and top-p removes the tail", "[model][generate]") {
  // Probabilities 0.5, 0.3, 0.15, 0.05.
  const at::Tensor logits = at::log(at::tensor({0.5f, 0.3f, 0.15f, 0.05f}));
  Rng rng(2, rng_stream::kSampling);
  GenerateOptions full;
  std::map<int64_t, int> counts;
  const int n = 20000;
  for (int i = 0; i < n; ++i) counts[SampleToken(logits, full, rng)]++;
  CHECK(std::abs(counts[0] / double(n) - 0.5) < 0.02);
  CHECK(std::abs(counts[1] / double(n) - 0.3) < 0.02);
  CHECK(std::abs(counts[3] / double(n) - 0.05) < 0.01);
  GenerateOptions nucleus;
  nucleus.top_p = 0.8;  // keeps {0, 1}: 0.5 + 0.3 reaches 0.8
  counts.clear();
  for (int i = 0; i < n; ++i) counts[SampleToken(logits, nucleus, rng)]++;
  CHECK(counts[2] == 0);
  CHECK(counts[3] == 0);
  CHECK(std::abs(counts[0] / double(n) - 0.5 / 0.8) < 0.02);
}

TEST_CASE("Greedy generation equals repeated argmax of the full forward", "[model][generate]") {
  auto m = TinyModel(3);
  GenerateOptions o;
  o.temperature = 0;
  o.max_new_tokens = 6;
  o.stop_at_eos = false;
  auto r = GenerateTokens(*m, {5, 9, 17}, o);
  REQUIRE(r.ok());
  REQUIRE(r->tokens.size() == 6);
  std::vector<int64_t> seq = {5, 9, 17};
  for (int step = 0; step < 6; ++step) {
    auto logits = m->Logits(at::tensor(seq, at::kLong).view({1, -1}));
    REQUIRE(logits.ok());
    const int64_t next = (*logits)[0][-1].argmax().item<int64_t>();
    CHECK(next == r->tokens[static_cast<size_t>(step)]);
    seq.push_back(next);
  }
}

TEST_CASE("Sampled generation is reproducible per seed", "[model][generate]") {
  auto m = TinyModel(4);
  GenerateOptions o;
  o.temperature = 1.5;
  o.max_new_tokens = 12;
  o.stop_at_eos = false;
  o.seed = 11;
  auto a = GenerateTokens(*m, {1, 2, 3}, o);
  auto b = GenerateTokens(*m, {1, 2, 3}, o);
  o.seed = 12;
  auto c = GenerateTokens(*m, {1, 2, 3}, o);
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(c.ok());
  CHECK(a->tokens == b->tokens);
  CHECK(a->tokens != c->tokens);
}

TEST_CASE("Generation stops at EOS and reports why", "[model][generate]") {
  auto m = TinyModel(5);
  GenerateOptions o;
  o.temperature = 0;
  o.max_new_tokens = 4;
  o.stop_at_eos = false;
  auto free_run = GenerateTokens(*m, {7}, o);
  REQUIRE(free_run.ok());
  // Make the first greedy token an EOS id: generation must stop right there.
  m = TinyModel(5);
  auto c = m->config();
  ModelConfig with_eos = c;
  with_eos.eos_token_ids = {free_run->tokens[0]};
  auto m2 = LlamaModel::Create(with_eos, m->weights());
  REQUIRE(m2.ok());
  o.stop_at_eos = true;
  auto stopped = GenerateTokens(**m2, {7}, o);
  REQUIRE(stopped.ok());
  CHECK(stopped->stop == StopReason::kEos);
  CHECK(stopped->tokens.size() == 1);
  CHECK(free_run->stop == StopReason::kMaxTokens);
}

TEST_CASE("Generation from a model with learned positions stops when the table is full", "[model][generate]") {
  auto c = PresetConfig("tiny-gpt2");
  REQUIRE(c.ok());
  c->max_position_embeddings = 8;
  auto m = LlamaModel::Create(*c, RandomWeights(*c, 3));
  REQUIRE(m.ok());
  GenerateOptions o;
  o.temperature = 0;
  o.stop_at_eos = false;
  o.max_new_tokens = 20;
  auto full = GenerateTokens(**m, {5, 6, 7}, o);
  REQUIRE(full.ok());
  CHECK(full->stop == StopReason::kContext);
  CHECK(full->tokens.size() == 6);  // positions 3..7 run forwards; the sixth token needs none
  o.max_new_tokens = 6;
  auto fits = GenerateTokens(**m, {5, 6, 7}, o);
  REQUIRE(fits.ok());
  CHECK(fits->stop == StopReason::kMaxTokens);
  CHECK(fits->tokens == full->tokens);
  // A prompt longer than the table is refused before anything is generated.
  CHECK(GenerateTokens(**m, std::vector<int32_t>(9, 1), o).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Generation samples only the ids asked for, and Generate only ids its tokenizer decodes",
          "[model][generate]") {
  auto m = TinyModel(7);
  GenerateOptions o;
  o.temperature = 0;
  o.stop_at_eos = false;
  o.max_new_tokens = 12;
  auto free_run = GenerateTokens(*m, {7}, o);
  REQUIRE(free_run.ok());
  // Greedy picks ids from the whole vocabulary; bounded below the largest of them, it never picks that one.
  const int32_t largest = *std::max_element(free_run->tokens.begin(), free_run->tokens.end());
  REQUIRE(largest > 1);
  o.sampled_ids = largest;
  auto bounded = GenerateTokens(*m, {7}, o);
  REQUIRE(bounded.ok());
  CHECK(*std::max_element(bounded->tokens.begin(), bounded->tokens.end()) < largest);
  o.sampled_ids = -1;
  CHECK(GenerateTokens(*m, {7}, o).status().code() == absl::StatusCode::kInvalidArgument);
  // A model whose vocabulary is padded past its tokenizer's (init-model's random ones, Phi-2, Qwen2.5) generates
  // only ids the tokenizer can decode.
  InitModelOptions init;
  init.tokenizer_vocab = 400;  // the tiny preset's model has 2,048 rows
  testing::TempDir dir;
  REQUIRE(InitModel(dir.path, init).ok());
  auto tok = LoadTokenizer(dir.path);
  REQUIRE(tok.ok());
  auto big = PresetConfig("tiny");
  REQUIRE(big.ok());
  big->num_hidden_layers = 1;
  ModelWeights w = RandomWeights(*big, 8);
  // Every padding row outscores every real one: unbounded greedy would pick one at once.
  w.embed.narrow(0, (*tok)->vocab_size(), big->vocab_size - (*tok)->vocab_size()).mul_(100.0);
  auto padded = LlamaModel::Create(*big, w);
  REQUIRE(padded.ok());
  REQUIRE((*tok)->vocab_size() < big->vocab_size);
  GenerateOptions g;
  g.temperature = 0;
  g.stop_at_eos = false;
  g.max_new_tokens = 6;
  auto result = Generate(**padded, **tok, "the fox", g);
  REQUIRE(result.ok());
  for (int32_t id : result->tokens) CHECK(id < (*tok)->vocab_size());
}

TEST_CASE("Bad generation options are InvalidArgument", "[model][generate]") {
  auto m = TinyModel(6);
  GenerateOptions o;
  o.top_p = 0;
  CHECK(GenerateTokens(*m, {1}, o).status().code() == absl::StatusCode::kInvalidArgument);
  o.top_p = 1;
  CHECK(GenerateTokens(*m, {}, o).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(GenerateTokens(*m, {1, 999}, o).status().code() == absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace seedling::model
