#include "model/dataset.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>

#include "base/file.h"
#include "base/strings.h"
#include "model/eval.h"
#include "model/kernels.h"

namespace seedling::model {
namespace {

std::unique_ptr<Tokenizer> SmallTokenizer() {
  BpeTrainerOptions o;
  o.vocab_size = 400;
  auto json = TrainByteLevelBpeTokenizerJson(
      "the cat sat on the mat. the dog sat on the log. instruction response input output\n", o);
  REQUIRE(json.ok());
  auto tok = ParseTokenizerJson(*json);
  REQUIRE(tok.ok());
  return std::move(tok).value();
}

std::string WriteTemp(const std::string& name, const std::string& contents) {
  const std::string path = std::filesystem::temp_directory_path() / (name + std::to_string(getpid()));
  REQUIRE(WriteFileAtomic(path, contents).ok());
  return path;
}

TEST_CASE("A text row scores every token and ends with EOS", "[model][dataset]") {
  auto tok = SmallTokenizer();
  DatasetOptions o;
  o.eos_id = 0;
  auto ex = TokenizeRow(R"({"text": "the cat sat"})", *tok, o);
  REQUIRE(ex.ok());
  auto plain = tok->Encode("the cat sat");
  REQUIRE(plain.ok());
  std::vector<int32_t> expected = *plain;
  expected.push_back(0);
  CHECK(ex->tokens == expected);
  CHECK(ex->labels == expected);
  CHECK(ex->ScoredTokens() == static_cast<int64_t>(expected.size()) - 1);
}

TEST_CASE("An instruction row masks the prompt and scores the output", "[model][dataset]") {
  auto tok = SmallTokenizer();
  DatasetOptions o;
  o.eos_id = 0;
  auto ex = TokenizeRow(R"({"instruction": "name an animal", "input": "", "output": "the cat"})", *tok, o);
  REQUIRE(ex.ok());
  auto prompt = tok->Encode(InstructionPrompt("name an animal", ""));
  auto output = tok->Encode("the cat");
  REQUIRE(prompt.ok());
  REQUIRE(output.ok());
  REQUIRE(ex->tokens.size() == prompt->size() + output->size() + 1);
  for (size_t i = 0; i < prompt->size(); ++i) CHECK(ex->labels[i] == kIgnoreIndex);
  for (size_t i = 0; i < output->size(); ++i) CHECK(ex->labels[prompt->size() + i] == (*output)[i]);
  CHECK(ex->labels.back() == 0);
  CHECK(ex->ScoredTokens() == static_cast<int64_t>(output->size()) + 1);
  CHECK(InstructionPrompt("a", "b") == "### Instruction:\na\n\n### Input:\nb\n\n### Response:\n");
}

TEST_CASE("Examples longer than max_seq_len are truncated", "[model][dataset]") {
  auto tok = SmallTokenizer();
  DatasetOptions o;
  o.max_seq_len = 3;
  auto ex = TokenizeRow(R"({"text": "the cat sat on the mat the dog sat on the log"})", *tok, o);
  REQUIRE(ex.ok());
  CHECK(ex->tokens.size() == 3);
  CHECK(ex->labels.size() == 3);
}

TEST_CASE("Malformed JSONL rows are errors naming the file and line", "[model][dataset]") {
  auto tok = SmallTokenizer();
  const std::string path = WriteTemp("seedling_bad_rows_", "{\"text\": \"ok\"}\n\n{\"output\": \"no instruction\"}\n");
  auto r = LoadJsonlExamples(path, *tok, {});
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(r.status().message()).find(":3:") != std::string::npos);
  CHECK(std::string(r.status().message()).find("instruction") != std::string::npos);
  for (const char* bad : {"[1, 2]", "{\"text\": 5}", "not json", "{\"title\": \"x\"}"}) {
    INFO(bad);
    CHECK(TokenizeRow(bad, *tok, {}).status().code() == absl::StatusCode::kInvalidArgument);
  }
  std::filesystem::remove(path);
  CHECK(LoadJsonlExamples("/nonexistent.jsonl", *tok, {}).status().code() == absl::StatusCode::kNotFound);

  // A row beyond max_row_bytes is refused by line, without being held whole.
  const std::string long_path =
      WriteTemp("seedling_long_row_", "{\"text\": \"ok\"}\n{\"text\": \"" + std::string(200, 'a') + "\"}\n");
  DatasetOptions capped;
  capped.max_row_bytes = 64;
  auto too_long = LoadJsonlExamples(long_path, *tok, capped);
  REQUIRE_FALSE(too_long.ok());
  CHECK(too_long.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(too_long.status().message()).find(":2:") != std::string::npos);
  CHECK(std::string(too_long.status().message()).find("max_row_bytes") != std::string::npos);
  REQUIRE(LoadJsonlExamples(long_path, *tok, {}).ok());
  std::filesystem::remove(long_path);
}

TEST_CASE("Right-padded batches pad tokens with 0 and labels with -100", "[model][dataset]") {
  Example a{{5, 6, 7}, {5, 6, 7}}, b{{8}, {kIgnoreIndex}};
  const Example* batch[] = {&a, &b};
  const Batch out = CollateRightPadded(batch);
  CHECK(out.tokens.sizes() == at::IntArrayRef({2, 3}));
  CHECK(out.tokens[1][1].item<int64_t>() == 0);
  CHECK(out.labels[1][2].item<int64_t>() == kIgnoreIndex);
  CHECK(out.labels[0][2].item<int64_t>() == 7);
}

// A 2-layer tiny model over SmallTokenizer's vocabulary, with weights scaled up so that losses differ
// clearly between inputs.
absl::StatusOr<std::unique_ptr<LlamaModel>> SharpTinyModel(uint64_t seed) {
  auto config = PresetConfig("tiny");
  REQUIRE(config.ok());
  config->num_hidden_layers = 2;
  config->vocab_size = 400;
  ModelWeights w = RandomWeights(*config, seed);
  for (const NamedWeight& nw : NamedWeights(w, *config)) {
    if (nw.name.find("norm") == std::string::npos) nw.tensor.mul_(20.0);
  }
  auto model = LlamaModel::Create(*config, std::move(w));
  REQUIRE(model.ok());
  return model;
}

TEST_CASE("Evaluation does not depend on the batch size (padding is exact)", "[model][eval]") {
  auto tok = SmallTokenizer();
  auto model = SharpTinyModel(8);
  DatasetOptions o;
  o.eos_id = 0;
  std::vector<Example> examples;
  for (const char* row : {R"({"text": "the cat sat on the mat"})", R"({"text": "the dog"})",
                          R"({"instruction": "where", "output": "on the log"})", R"({"text": "sat"})"}) {
    auto ex = TokenizeRow(row, *tok, o);
    REQUIRE(ex.ok());
    examples.push_back(*ex);
  }
  EvalOptions one, three;
  one.batch_size = 1;
  three.batch_size = 3;
  auto r1 = Evaluate(**model, examples, one);
  auto r3 = Evaluate(**model, examples, three);
  REQUIRE(r1.ok());
  REQUIRE(r3.ok());
  int64_t scored = 0;
  for (const Example& ex : examples) scored += ex.ScoredTokens();
  CHECK(r1->tokens == scored);
  CHECK(r3->tokens == scored);
  CHECK(std::abs(r1->loss - r3->loss) < 1e-5);
  CHECK(std::abs(r1->perplexity - std::exp(r1->loss)) < 1e-6 * r1->perplexity);
}

TEST_CASE("Choice accuracy picks the candidate of lowest total NLL, as a naive evaluation does", "[model][eval]") {
  auto tok = SmallTokenizer();
  auto model = SharpTinyModel(9);
  DatasetOptions o;
  o.eos_id = 0;
  const std::vector<std::string> labels = {"cat", "dog", "the mat", "log"};
  std::vector<ChoiceItem> items;
  std::vector<int64_t> naive_best;
  for (const char* prompt : {"where sat the cat", "the dog", "on the", "instruction"}) {
    ChoiceItem item;
    int64_t best = -1;
    double best_nll = 0;
    for (const std::string& label : labels) {
      auto ex = TokenizeRow(StrCat(R"({"instruction": ")", prompt, R"(", "output": ")", label, R"("})"), *tok, o);
      REQUIRE(ex.ok());
      // Naive: the mean loss of the candidate alone, times its scored tokens.
      auto r = Evaluate(**model, std::span<const Example>(&*ex, 1));
      REQUIRE(r.ok());
      const double nll = r->loss * static_cast<double>(r->tokens);
      if (best < 0 || nll < best_nll) {
        best = static_cast<int64_t>(item.candidates.size());
        best_nll = nll;
      }
      item.candidates.push_back(*ex);
    }
    naive_best.push_back(best);
    items.push_back(std::move(item));
  }
  // Right answers for items 0 and 2, wrong ones for 1 and 3: accuracy 1/2 exactly.
  for (size_t i = 0; i < items.size(); ++i) {
    items[i].answer = i % 2 == 0 ? naive_best[i] : (naive_best[i] + 1) % static_cast<int64_t>(labels.size());
  }
  auto acc = ChoiceAccuracy(**model, items);
  REQUIRE(acc.ok());
  CHECK(*acc == 0.5);
  items[1].answer = naive_best[1];
  items[3].answer = naive_best[3];
  CHECK(*ChoiceAccuracy(**model, items) == 1.0);
  // Bad input is named.
  items[0].answer = 7;
  CHECK(ChoiceAccuracy(**model, items).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(ChoiceAccuracy(**model, {}).status().code() == absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace seedling::model
