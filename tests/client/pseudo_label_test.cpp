// Pseudo-labelling on the device (client/pseudo_label.h), unlabelled rows in the data loader (client/local_data.h)
// and the task fields that carry it (client/task_spec.h).

#include "client/pseudo_label.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "base/file.h"
#include "base/strings.h"
#include "client/task_spec.h"
#include "model/eval.h"
#include "model/init.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace seedling::client {
namespace {

using seedling::testing::TempDir;

struct Tiny {
  std::unique_ptr<model::LlamaModel> model;
  std::unique_ptr<model::Tokenizer> tokenizer;
};

const Tiny& TinyModel() {
  static const Tiny tiny = [] {
    const std::string& path = seedling::testing::TinyModelDir(3);
    Tiny t;
    auto m = model::LlamaModel::Load(path, {});
    REQUIRE(m.ok());
    auto tok = model::LoadTokenizer(path);
    REQUIRE(tok.ok());
    t.model = std::move(m).value();
    t.tokenizer = std::move(tok).value();
    return t;
  }();
  return tiny;
}

LocalDataOptions Options() {
  LocalDataOptions o;
  o.seq_len = 64;
  o.heldout_fraction = 0;
  return o;
}

TEST_CASE("Confidences are the softmax of the candidates' negative log-likelihoods", "[client][pseudo_label]") {
  const std::vector<double> nlls = {2.0, 1.0, 4.5};
  const std::vector<double> p = ChoiceConfidences(nlls);
  REQUIRE(p.size() == 3);
  double z = 0;
  for (double n : nlls) z += std::exp(-n);
  for (size_t k = 0; k < nlls.size(); ++k) CHECK(p[k] == Approx(std::exp(-nlls[k]) / z));
  // Huge likelihoods do not overflow: only differences matter.
  const std::vector<double> far = ChoiceConfidences(std::vector<double>{1000.0, 1001.0});
  CHECK(far[0] == Approx(1 / (1 + std::exp(-1.0))));
  CHECK(ChoiceConfidences({}).empty());
}

TEST_CASE("The filter keeps confident rows, the most confident first, up to the curriculum's share",
          "[client][pseudo_label]") {
  // Two candidates: confidence of the winner = 1 / (1 + e^-|Δ|).
  const std::vector<std::vector<double>> nlls = {
      {1.0, 1.1},  // row 0: 0.525 for choice 0
      {3.0, 0.0},  // row 1: 0.953 for choice 1
      {},          // row 2: not scored
      {0.0, 2.0},  // row 3: 0.881 for choice 0
      {5.0, 4.0},  // row 4: 0.731 for choice 1
      {2.0, 2.0},  // row 5: a tie, 0.5 for the first choice
  };
  SECTION("a threshold drops the unsure rows") {
    const std::vector<PseudoLabel> kept = SelectPseudoLabels(nlls, 1.0, 0.7);
    REQUIRE(kept.size() == 3);
    CHECK(kept[0].row == 1);
    CHECK(kept[0].choice == 1);
    CHECK(kept[1].row == 3);
    CHECK(kept[1].choice == 0);
    CHECK(kept[2].row == 4);
    CHECK(kept[2].confidence == Approx(1 / (1 + std::exp(-1.0))));
  }
  SECTION("the share caps them, keeping the most confident (round(0.34 x 6) = 2)") {
    const std::vector<PseudoLabel> kept = SelectPseudoLabels(nlls, 0.34, 0.0);
    REQUIRE(kept.size() == 2);
    CHECK(kept[0].row == 1);
    CHECK(kept[1].row == 3);
  }
  SECTION("threshold 0 and share 1 keep every scored row, ties going to the first choice") {
    const std::vector<PseudoLabel> kept = SelectPseudoLabels(nlls, 1.0, 0.0);
    REQUIRE(kept.size() == 5);
    CHECK(kept[4].row == 5);
    CHECK(kept[4].choice == 0);
  }
  CHECK(SelectPseudoLabels(nlls, 0.0, 0.0).empty());
}

TEST_CASE("Rows with a null output are unlabelled: kept apart, never trained on or held out",
          "[client][pseudo_label]") {
  const Tiny& tiny = TinyModel();
  const std::string jsonl =
      "{\"instruction\": \"ball goal team\", \"output\": \"sports\"}\n"
      "{\"instruction\": \"band song drum\", \"output\": null}\n"
      "{\"instruction\": \"soup bread\", \"output\": null, \"user\": \"u\"}\n"
      "{\"instruction\": \"\", \"output\": null}\n";  // an empty instruction is skipped
  LocalDataOptions o = Options();
  o.heldout_fraction = 0.5;
  auto data = LocalDataset::Parse(jsonl, "d.jsonl", *tiny.tokenizer, o);
  REQUIRE(data.ok());
  CHECK(data->train().size() == 1);
  CHECK(data->heldout().empty());  // one labelled row: nothing is held out
  REQUIRE(data->unlabelled().size() == 2);
  CHECK(data->unlabelled()[0].line == 2);
  CHECK(data->unlabelled()[1].line == 3);
  CHECK(data->stats().unlabelled == 2);
  CHECK(data->stats().skipped == 1);
  // Only unlabelled rows: the data loads, with nothing to train on, and training refuses it.
  auto only = LocalDataset::Parse("{\"instruction\": \"band song\", \"output\": null}\n", "u.jsonl", *tiny.tokenizer,
                                  Options());
  REQUIRE(only.ok());
  CHECK(only->train().empty());
  CHECK(only->unlabelled().size() == 1);
}

TEST_CASE("Pseudo-labels are the global model's most likely choice, as a naive scorer finds it",
          "[client][pseudo_label]") {
  const Tiny& tiny = TinyModel();
  const std::vector<std::string> prompts = {"ball goal team", "band song drum", "soup bread rice", "coach score",
                                            "album choir tune"};
  std::string jsonl = "{\"instruction\": \"match\", \"output\": \"sports\"}\n";
  for (const std::string& p : prompts) jsonl += StrCat("{\"instruction\": \"", p, "\", \"output\": null}\n");
  auto data = LocalDataset::Parse(jsonl, "d.jsonl", *tiny.tokenizer, Options());
  REQUIRE(data.ok());
  PseudoLabelOptions o;
  o.choices = {"sports", "music", "food"};
  o.share = 1.0;
  o.threshold = 0.0;
  auto labelled = PseudoLabelRows(*tiny.model, nullptr, *data, *tiny.tokenizer, o);
  REQUIRE(labelled.ok());
  CHECK(labelled->scored == 5);
  CHECK(labelled->forwards == 15);
  REQUIRE(labelled->examples.size() == 5);
  // The naive reference: each candidate's mean loss × its scored tokens, minus that candidate's mean over the
  // rows (the calibration); the lowest wins.
  model::DatasetOptions dataset;
  dataset.max_seq_len = 64;
  std::vector<std::vector<double>> nll(prompts.size());
  std::vector<std::vector<model::Example>> candidates(prompts.size());
  std::vector<double> mean(o.choices.size(), 0.0);
  for (size_t r = 0; r < prompts.size(); ++r) {
    for (size_t k = 0; k < o.choices.size(); ++k) {
      auto ex =
          model::TokenizeRow(StrCat("{\"instruction\": \"", prompts[r], "\", \"output\": \"", o.choices[k], "\"}"),
                             *tiny.tokenizer, dataset);
      REQUIRE(ex.ok());
      auto eval = model::Evaluate(*tiny.model, std::vector<model::Example>{*ex});
      REQUIRE(eval.ok());
      nll[r].push_back(eval->loss * static_cast<double>(eval->tokens));
      mean[k] += nll[r].back() / static_cast<double>(prompts.size());
      candidates[r].push_back(*ex);
    }
  }
  for (size_t r = 0; r < prompts.size(); ++r) {
    size_t best = 0;
    for (size_t k = 1; k < o.choices.size(); ++k) {
      if (nll[r][k] - mean[k] < nll[r][best] - mean[best]) best = k;
    }
    INFO("row " << r);
    CHECK(labelled->examples[r].example.tokens == candidates[r][best].tokens);
    CHECK(labelled->examples[r].example.labels == candidates[r][best].labels);
    CHECK(labelled->examples[r].line == static_cast<int64_t>(r) + 2);
  }
  // The pseudo-labelled rows join the training examples, and the stream's fingerprint changes with them.
  const LocalDataset extended = data->WithExtraTraining(labelled->examples);
  CHECK(extended.train().size() == 6);
  CHECK(extended.fingerprint() != data->fingerprint());
  CHECK(extended.train_tokens() > data->train_tokens());
}

TEST_CASE("Nothing is pseudo-labelled without choices, share or unlabelled rows", "[client][pseudo_label]") {
  const Tiny& tiny = TinyModel();
  auto data = LocalDataset::Parse(
      "{\"instruction\": \"match\", \"output\": \"sports\"}\n{\"instruction\": \"band\", \"output\": null}\n",
      "d.jsonl", *tiny.tokenizer, Options());
  auto labelled_only = LocalDataset::Parse("{\"instruction\": \"match\", \"output\": \"sports\"}\n", "l.jsonl",
                                           *tiny.tokenizer, Options());
  REQUIRE(data.ok());
  REQUIRE(labelled_only.ok());
  PseudoLabelOptions on;
  on.choices = {"sports", "music"};
  on.share = 1;
  PseudoLabelOptions no_choices = on;
  no_choices.choices = {"sports"};
  PseudoLabelOptions no_share = on;
  no_share.share = 0;
  for (const auto& [dataset, options] : std::vector<std::pair<const LocalDataset*, PseudoLabelOptions>>{
           {&*data, no_choices}, {&*data, no_share}, {&*labelled_only, on}}) {
    auto r = PseudoLabelRows(*tiny.model, nullptr, *dataset, *tiny.tokenizer, options);
    REQUIRE(r.ok());
    CHECK(r->examples.empty());
    CHECK(r->forwards == 0);
  }
  PseudoLabelOptions bad = on;
  bad.threshold = 1.0;
  CHECK(PseudoLabelRows(*tiny.model, nullptr, *data, *tiny.tokenizer, bad).status().code() ==
        absl::StatusCode::kInvalidArgument);
  bad = on;
  bad.share = 1.5;
  CHECK(PseudoLabelRows(*tiny.model, nullptr, *data, *tiny.tokenizer, bad).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("A task carries pseudo-labelling, without it the spec has it off, and bad values are refused",
          "[client][pseudo_label]") {
  v1::Task task;
  task.set_method("lora-bp");
  task.mutable_lora()->set_rank(4);
  task.mutable_lora()->set_alpha(8);
  task.mutable_lora()->add_targets("q_proj");
  auto plain = TaskSpecFromTask(task);
  REQUIRE(plain.ok());
  CHECK(plain->pseudo_label.share == 0);
  CHECK(plain->pseudo_label.choices.empty());
  task.add_pseudo_label_choices("a");
  task.add_pseudo_label_choices("b");
  (*task.mutable_hyperparameters())["pseudo_label_share"] = 0.3;
  (*task.mutable_hyperparameters())["pseudo_label_threshold"] = 0.6;
  auto on = TaskSpecFromTask(task);
  REQUIRE(on.ok());
  CHECK(on->pseudo_label.share == 0.3);
  CHECK(on->pseudo_label.threshold == 0.6);
  CHECK(on->pseudo_label.choices == std::vector<std::string>{"a", "b"});
  for (const auto& [key, value] : std::vector<std::pair<std::string, double>>{
           {"pseudo_label_share", 1.5}, {"pseudo_label_share", -0.1}, {"pseudo_label_threshold", 1.0}}) {
    v1::Task bad = task;
    (*bad.mutable_hyperparameters())[key] = value;
    auto spec = TaskSpecFromTask(bad);
    INFO(key << " = " << value);
    REQUIRE_FALSE(spec.ok());
    CHECK_THAT(std::string(spec.status().message()), Catch::Contains(key));
  }
}

}  // namespace
}  // namespace seedling::client
