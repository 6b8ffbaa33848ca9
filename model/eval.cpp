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
    const Batch batch = CollateRightPadded(std::span<const Example* const>(order.data() + start, static_cast<size_t>(len)));
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

}  // namespace seedling::model
