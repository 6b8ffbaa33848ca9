#pragma once

// Evaluation: token-weighted mean next-token loss and perplexity over a set of examples.

#include <cstdint>
#include <functional>
#include <span>

#include "absl/status/statusor.h"
#include "model/dataset.h"
#include "model/llama.h"

namespace seedling::model {

struct EvalOptions {
  int64_t batch_size = 8;  // examples per forward (sorted by length, right-padded)
  ForwardOptions forward;  // adapter etc.
  // Called after each batch with (examples done, examples total).
  std::function<void(int64_t, int64_t)> progress;
};

struct EvalResult {
  int64_t examples = 0;
  int64_t tokens = 0;     // scored tokens
  double loss = 0;        // mean cross-entropy per scored token (nats)
  double perplexity = 0;  // exp(loss)
  double seconds = 0;
};

// No gradients are recorded. InvalidArgument if no example has a scored token or a token is outside the
// model's vocabulary.
absl::StatusOr<EvalResult> Evaluate(const LlamaModel& model, std::span<const Example> examples,
                                    const EvalOptions& options = {});

// Classification by likelihood (multiple choice, as lm-evaluation-harness scores it): an item's prediction
// is the candidate whose scored (response) tokens have the lowest total negative log-likelihood under the
// model; accuracy is the fraction of items predicted right.
struct ChoiceItem {
  std::vector<Example> candidates;  // the same prompt with each candidate answer as the response
  int64_t answer = 0;               // index of the right candidate
};

// Returns the accuracy in [0, 1]. InvalidArgument for no items, an item without candidates, an answer index
// out of range, or a candidate with no scored token. No gradients are recorded.
absl::StatusOr<double> ChoiceAccuracy(const LlamaModel& model, std::span<const ChoiceItem> items,
                                      const EvalOptions& options = {});

}  // namespace seedling::model
