// Accuracy of the quantized base on a model with real structure: the `tiny` model is trained (all
// weights, Adam) on the bundled corpus until its loss is far below a random model's, saved, and
// evaluated on held-out text with fp32, q8_0 and q4_0 weights.

#include <ATen/ATen.h>
#include <torch/optim/adam.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <string>
#include <vector>

#include "base/file.h"
#include "model/config.h"
#include "model/eval.h"
#include "model/init.h"
#include "model/llama.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tests/test_util.h"

namespace seedling::model {
namespace {

using testing::TempDir;

constexpr int64_t kSeq = 64;

// The corpus as one token stream.
std::vector<int32_t> CorpusTokens(const Tokenizer& tokenizer) {
  auto ids = tokenizer.Encode(BundledSampleCorpus(), false);
  REQUIRE(ids.ok());
  return *ids;
}

// Examples of kSeq tokens from `tokens[begin, end)`.
std::vector<Example> Windows(const std::vector<int32_t>& tokens, size_t begin, size_t end) {
  std::vector<Example> out;
  for (size_t i = begin; i + kSeq <= end; i += kSeq) {
    Example e;
    e.tokens.assign(tokens.begin() + static_cast<std::ptrdiff_t>(i),
                    tokens.begin() + static_cast<std::ptrdiff_t>(i + kSeq));
    e.labels = e.tokens;
    out.push_back(std::move(e));
  }
  return out;
}

// Trains every weight of the model in `dir` (fp32) with Adam on `train` and saves it back.
double TrainAndSave(const std::string& dir, const std::vector<Example>& train, int steps) {
  auto model = LlamaModel::Load(dir, {});
  REQUIRE(model.ok());
  std::vector<at::Tensor> params;
  for (NamedWeight& w : NamedWeights((*model)->weights(), (*model)->config())) {
    // The mapped weights are copy-on-write views: train private copies.
    w.tensor.detach_().requires_grad_(true);
    params.push_back(w.tensor);
  }
  torch::optim::Adam adam(params, torch::optim::AdamOptions(3e-3));
  double loss = 0;
  for (int step = 0; step < steps; ++step) {
    std::vector<const Example*> batch;
    for (int b = 0; b < 4; ++b) batch.push_back(&train[static_cast<size_t>(step * 4 + b) % train.size()]);
    const Batch collated = CollateRightPadded(batch);
    adam.zero_grad();
    auto out = (*model)->Loss(collated.tokens, collated.labels);
    REQUIRE(out.ok());
    at::Tensor mean = out->mean();
    mean.backward();
    adam.step();
    loss = mean.item<double>();
  }
  at::NoGradGuard no_grad;
  REQUIRE(SaveWeights(JoinPath(dir, "model.safetensors"), (*model)->weights(), (*model)->config(), DType::kF32).ok());
  return loss;
}

double HeldoutLoss(const std::string& dir, WeightPrecision precision, const std::string& cache_dir,
                   const std::vector<Example>& heldout) {
  LoadOptions options;
  options.precision = precision;
  options.cache_dir = cache_dir;
  auto model = LlamaModel::Load(dir, options);
  REQUIRE(model.ok());
  auto result = Evaluate(**model, heldout);
  REQUIRE(result.ok());
  return result->loss;
}

TEST_CASE("Quantized weights keep a trained model's loss: q8_0 within 0.5%, q4_0 within 5%",
          "[model][quant][accuracy]") {
  at::manual_seed(0);
  TempDir tmp;
  const std::string dir = JoinPath(tmp.path, "tiny");
  REQUIRE(InitModel(dir, {}).ok());
  auto tokenizer = LoadTokenizer(dir);
  REQUIRE(tokenizer.ok());
  const std::vector<int32_t> tokens = CorpusTokens(**tokenizer);
  const size_t split = tokens.size() * 9 / 10;
  const std::vector<Example> train = Windows(tokens, 0, split);
  const std::vector<Example> heldout = Windows(tokens, split, tokens.size());
  REQUIRE(heldout.size() >= 8);

  const double random_loss = HeldoutLoss(dir, WeightPrecision::kFloat32, "", heldout);
  const double train_loss = TrainAndSave(dir, train, 300);
  const double fp32 = HeldoutLoss(dir, WeightPrecision::kFloat32, "", heldout);
  const double q8 = HeldoutLoss(dir, WeightPrecision::kQ8_0, JoinPath(tmp.path, "cache"), heldout);
  const double q4 = HeldoutLoss(dir, WeightPrecision::kQ4_0, JoinPath(tmp.path, "cache"), heldout);
  INFO("random " << random_loss << ", train " << train_loss << ", held-out fp32 " << fp32 << ", q8_0 " << q8
                 << ", q4_0 " << q4);
  // The model learned something, so quantization has structure to damage.
  REQUIRE(fp32 < random_loss - 1.0);
  CHECK(std::abs(q8 - fp32) <= 0.005 * fp32);
  CHECK(std::abs(q4 - fp32) <= 0.05 * fp32);
  // q4_0 is coarser than q8_0: if the two came out equal, quantization would not be happening.
  CHECK(std::abs(q4 - fp32) > std::abs(q8 - fp32));
}

}  // namespace
}  // namespace seedling::model
