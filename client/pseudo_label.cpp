#include "client/pseudo_label.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "base/json.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/dataset.h"

namespace seedling::client {
namespace {

// Row `json` ("output": null) with `label` as its output, tokenized as LocalDataset tokenizes training rows
// (model::TokenizeRow, cut to seq_len keeping the start). Not OK when the row has nothing left to score.
absl::StatusOr<model::Example> LabelledExample(nlohmann::json& row, const std::string& label,
                                               const model::Tokenizer& tokenizer, const LocalDataOptions& options) {
  row["output"] = label;
  model::DatasetOptions dataset;
  dataset.max_seq_len = options.seq_len;
  dataset.eos_id = options.eos_id;
  SEEDLING_ASSIGN_OR_RETURN(model::Example example, model::TokenizeRow(row.dump(), tokenizer, dataset));
  if (example.ScoredTokens() == 0) return absl::InvalidArgumentError("no token of the label is left to score");
  return example;
}

// Total negative log-likelihood of the example's scored tokens: one example per forward, so the loss sum is it.
absl::StatusOr<double> TotalNll(const model::LlamaModel& model, const lora::LoraAdapter* adapter,
                                const model::Example& example) {
  const model::Example* one[] = {&example};
  const model::Batch batch = model::CollateRightPadded(std::span<const model::Example* const>(one, 1));
  model::ForwardOptions forward;
  forward.adapter = adapter;
  SEEDLING_ASSIGN_OR_RETURN(model::LossOutput out, model.Loss(batch.tokens, batch.labels, forward));
  return out.sum.item<double>();
}

// Contextual calibration (Zhao et al., ICML'21): each candidate's nll minus its mean over the scored rows, so
// a label the model prefers whatever the prompt (a random or barely trained model's bias) does not win every
// row; what is left ranks the candidates by how much more likely this prompt makes them.
void CentreOnMeans(std::vector<std::vector<double>>& nlls) {
  std::vector<double> sum;
  int64_t rows = 0;
  for (const std::vector<double>& row : nlls) {
    if (row.empty()) continue;
    sum.resize(row.size(), 0.0);
    for (size_t k = 0; k < row.size(); ++k) sum[k] += row[k];
    ++rows;
  }
  for (std::vector<double>& row : nlls) {
    for (size_t k = 0; k < row.size(); ++k) row[k] -= sum[k] / static_cast<double>(rows);
  }
}

}  // namespace

std::vector<double> ChoiceConfidences(std::span<const double> nlls) {
  if (nlls.empty()) return {};
  const double lowest = *std::min_element(nlls.begin(), nlls.end());
  std::vector<double> p(nlls.size());
  double sum = 0;
  for (size_t k = 0; k < nlls.size(); ++k) sum += p[k] = std::exp(lowest - nlls[k]);  // the best candidate: 1
  for (double& x : p) x /= sum;
  return p;
}

std::vector<PseudoLabel> SelectPseudoLabels(std::span<const std::vector<double>> nlls, double share, double threshold) {
  // Step 1: each scored row's winner and its confidence; the low-confidence filter.
  std::vector<PseudoLabel> confident;
  for (size_t r = 0; r < nlls.size(); ++r) {
    const std::vector<double> p = ChoiceConfidences(nlls[r]);
    if (p.empty()) continue;
    const auto best = static_cast<int64_t>(std::max_element(p.begin(), p.end()) - p.begin());  // first of equals
    if (p[static_cast<size_t>(best)] > threshold) {
      confident.push_back({static_cast<int64_t>(r), best, p[static_cast<size_t>(best)]});
    }
  }
  // Step 2: the curriculum's cap, the most confident first.
  const auto cap = static_cast<size_t>(std::llround(std::clamp(share, 0.0, 1.0) * static_cast<double>(nlls.size())));
  std::stable_sort(confident.begin(), confident.end(),
                   [](const PseudoLabel& a, const PseudoLabel& b) { return a.confidence > b.confidence; });
  if (confident.size() > cap) confident.resize(cap);
  std::sort(confident.begin(), confident.end(),
            [](const PseudoLabel& a, const PseudoLabel& b) { return a.row < b.row; });
  return confident;
}

absl::StatusOr<PseudoLabelResult> PseudoLabelRows(const model::LlamaModel& model, const lora::LoraAdapter* adapter,
                                                  const LocalDataset& data, const model::Tokenizer& tokenizer,
                                                  const PseudoLabelOptions& options) {
  if (!(options.share >= 0 && options.share <= 1)) {
    return absl::InvalidArgumentError(StrCat("pseudo-label share must be in [0, 1], got ", options.share));
  }
  if (!(options.threshold >= 0 && options.threshold < 1)) {
    return absl::InvalidArgumentError(StrCat("pseudo-label threshold must be in [0, 1), got ", options.threshold));
  }
  PseudoLabelResult result;
  const std::span<const UnlabelledRow> rows = data.unlabelled();
  if (options.share == 0 || options.choices.size() < 2 || rows.empty()) return result;

  // Score: every candidate label of every row, one forward each.
  at::NoGradGuard no_grad;
  std::vector<std::vector<double>> nlls(rows.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    absl::StatusOr<nlohmann::json> row = ParseJson(rows[r].json, "");
    if (!row.ok()) continue;  // LocalDataset parsed it once; cannot happen
    std::vector<double> row_nlls;
    for (const std::string& label : options.choices) {
      absl::StatusOr<model::Example> example = LabelledExample(*row, label, tokenizer, data.options());
      if (!example.ok()) break;
      SEEDLING_ASSIGN_OR_RETURN(const double nll, TotalNll(model, adapter, *example));
      ++result.forwards;
      result.forward_tokens += static_cast<int64_t>(example->tokens.size());
      row_nlls.push_back(nll);
    }
    if (row_nlls.size() != options.choices.size()) continue;
    nlls[r] = std::move(row_nlls);
    ++result.scored;
  }

  CentreOnMeans(nlls);
  // Filter and cap, then tokenize the kept rows with their pseudo-label.
  for (const PseudoLabel& kept : SelectPseudoLabels(nlls, options.share, options.threshold)) {
    const UnlabelledRow& source = rows[static_cast<size_t>(kept.row)];
    SEEDLING_ASSIGN_OR_RETURN(nlohmann::json row, ParseJson(source.json, ""));
    SEEDLING_ASSIGN_OR_RETURN(
        model::Example example,
        LabelledExample(row, options.choices[static_cast<size_t>(kept.choice)], tokenizer, data.options()));
    LocalExample ex;
    ex.example = std::move(example);
    ex.line = source.line;
    result.examples.push_back(std::move(ex));
  }
  return result;
}

}  // namespace seedling::client
