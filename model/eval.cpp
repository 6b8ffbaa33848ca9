#include "model/eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "base/status.h"
#include "base/strings.h"

namespace seedling::model {

absl::StatusOr<EvalResult> Evaluate(const LlamaModel& model, std::span<const Example> examples,
                                    const EvalOptions& options) {
  if (options.batch_size <= 0) return absl::InvalidArgumentError("batch_size must be positive");
  const auto t0 = std::chrono::steady_clock::now();
  // Sort by length so each batch pads little.
  std::vector<const Example*> order;
  for (const Example& ex : examples) {
    if (!ex.tokens.empty()) order.push_back(&ex);
  }
  std::stable_sort(order.begin(), order.end(),
                   [](const Example* a, const Example* b) { return a->tokens.size() < b->tokens.size(); });
  at::NoGradGuard no_grad;
  double loss_sum = 0;
  int64_t tokens = 0;
  const auto n = static_cast<int64_t>(order.size());
  for (int64_t start = 0; start < n; start += options.batch_size) {
    const int64_t len = std::min(options.batch_size, n - start);
    const Batch batch =
        CollateRightPadded(std::span<const Example* const>(order.data() + start, static_cast<size_t>(len)));
    SEEDLING_ASSIGN_OR_RETURN(LossOutput out, model.Loss(batch.tokens, batch.labels, options.forward));
    loss_sum += out.sum.item<double>();
    tokens += out.tokens;
    if (options.progress) options.progress(start + len, n);
  }
  if (tokens == 0) return absl::InvalidArgumentError("no example has a token to score");
  EvalResult r;
  r.examples = static_cast<int64_t>(examples.size());
  r.tokens = tokens;
  r.loss = loss_sum / static_cast<double>(tokens);
  r.perplexity = std::exp(r.loss);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

absl::StatusOr<double> ChoiceAccuracy(const LlamaModel& model, std::span<const ChoiceItem> items,
                                      const EvalOptions& options) {
  if (items.empty()) return absl::InvalidArgumentError("no item to classify");
  at::NoGradGuard no_grad;
  int64_t right = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const ChoiceItem& item = items[i];
    if (item.candidates.empty() || item.answer < 0 || item.answer >= static_cast<int64_t>(item.candidates.size())) {
      return absl::InvalidArgumentError(
          StrCat("item ", i, ": answer ", item.answer, " is not one of its ", item.candidates.size(), " candidates"));
    }
    int64_t best = -1;
    double best_nll = 0;
    for (size_t k = 0; k < item.candidates.size(); ++k) {
      const Example& c = item.candidates[k];
      if (c.ScoredTokens() == 0) {
        return absl::InvalidArgumentError(StrCat("item ", i, ", candidate ", k, ": no scored token"));
      }
      // One candidate per forward: the loss sum is then that candidate's total NLL.
      const Example* one[] = {&c};
      const Batch batch = CollateRightPadded(std::span<const Example* const>(one, 1));
      SEEDLING_ASSIGN_OR_RETURN(LossOutput out, model.Loss(batch.tokens, batch.labels, options.forward));
      const double nll = out.sum.item<double>();
      if (best < 0 || nll < best_nll) {  // ties: the first candidate
        best = static_cast<int64_t>(k);
        best_nll = nll;
      }
    }
    right += best == item.answer;
    if (options.progress) options.progress(static_cast<int64_t>(i) + 1, static_cast<int64_t>(items.size()));
  }
  return static_cast<double>(right) / static_cast<double>(items.size());
}

}  // namespace seedling::model
