#pragma once

// Pseudo-labelling on the device (FeS, Cai et al., MobiCom'23): before a round's training, the global model the
// device just downloaded labels the device's unlabelled rows ("output": null, client/local_data.h) by multiple
// choice over the task's candidate labels, and the confident ones join the training examples. The rows never
// leave the device. A curriculum grows the share of unlabelled rows that may be pseudo-labelled with the
// rounds (FeS "curriculum" mode, |U|·rate·round); the server computes it (server::ServerConfig::PseudoLabelShare)
// and sends it with the task, so a device only applies the share it is given.

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/local_data.h"
#include "lora/adapter.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace seedling::client {

struct PseudoLabelOptions {
  std::vector<std::string> choices;  // the task's candidate labels; fewer than 2: nothing is labelled
  // At most round(share × unlabelled rows) rows are kept, the most confident first. In [0, 1]; 0 = off.
  double share = 0;
  // A row is kept only when its winning label's confidence is above this. In [0, 1). Default 0.
  double threshold = 0;
};

// Confidences of the candidates of one row from their total negative log-likelihoods: softmax(−nll), computed
// stably (shifted by the smallest nll). Empty for no candidate.
std::vector<double> ChoiceConfidences(std::span<const double> nlls);

struct PseudoLabel {
  int64_t row = 0;        // index into the unlabelled rows
  int64_t choice = 0;     // index of the winning candidate (the first of equal ones)
  double confidence = 0;  // its softmax confidence
};

// The filter and the curriculum cap on scored rows: nlls[r] holds row r's candidate nlls (an empty entry is a
// row that could not be scored). Keeps rows whose winning confidence is above `threshold`, at most
// round(share × nlls.size()) of them, the most confident first (ties: the earlier row); returned in row order.
std::vector<PseudoLabel> SelectPseudoLabels(std::span<const std::vector<double>> nlls, double share, double threshold);

struct PseudoLabelResult {
  std::vector<LocalExample> examples;  // the kept rows with their label as "output", tokenized as training rows
  int64_t scored = 0;                  // unlabelled rows scored
  int64_t forwards = 0;                // candidate forwards run (rows × candidates): the device compute spent
  int64_t forward_tokens = 0;          // tokens those forwards processed
};

// Scores every unlabelled row of `data` with `model` (+ `adapter`, may be null), calibrates the scores
// (each candidate's nll minus its mean over the device's scored rows, so a label the model prefers whatever
// the prompt does not win every row: contextual calibration, Zhao et al. 2021), selects with
// SelectPseudoLabels and returns the kept rows as training examples, tokenized with data.options() (seq_len, eos).
// Nothing is scored (an empty result) with share 0, fewer than 2 choices or no unlabelled row. A row whose candidates
// cannot be tokenized or leave no token to score is not scored. InvalidArgument for a share or threshold out of range;
// model errors pass through. No gradients are recorded.
absl::StatusOr<PseudoLabelResult> PseudoLabelRows(const model::LlamaModel& model, const lora::LoraAdapter* adapter,
                                                  const LocalDataset& data, const model::Tokenizer& tokenizer,
                                                  const PseudoLabelOptions& options);

}  // namespace seedling::client
