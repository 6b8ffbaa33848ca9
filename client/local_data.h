#pragma once

// The on-device example store: a phone's local JSONL data, tokenized once, split into train and
// held-out examples, and served as an endless, resumable, deterministic stream of training batches.
//
// Row formats (one JSON object per line, blank lines ignored):
//   {"text": "..."}                                   every token scored
//   {"instruction", "input", "output"}                Alpaca ("input" optional): prompt not scored
//   {"instruction", "context", "response"}            Dolly: read as context → input,
//                                                     response → output
// An Alpaca row whose "output" is null ({"instruction": ..., "output": null}) is unlabelled: kept apart
// (LocalDataset::unlabelled(), never trained on or held out) for pseudo-labelling (client/pseudo_label.h).
// Rows go through model::TokenizeRow, so tokens and the prompt mask are exactly those of
// `seedling eval` (as there, a row with "text" is a text row whatever else it holds). A row mixing
// Alpaca and Dolly names ("output" with "response", "input" with "context", ...) is ambiguous and
// skipped. Other fields are ignored, except "topic" and "user", kept per example (strings, or
// integers as decimal text) so the simulator can split data by them.
//
// Bad rows are skipped and counted, never fatal (a phone's data is whatever the app collected):
// not UTF-8, not JSON, not an object, a field of the wrong type or missing, an empty "text" /
// "output" / "response", or a row with no token left to score (including an instruction whose
// prompt fills all of seq_len). Error messages never quote row contents: they are user data and
// end up in logs.

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/file.h"
#include "client/row_limits.h"
#include "model/dataset.h"
#include "model/tokenizer.h"

namespace seedling::client {

struct LocalDataOptions {
  // Tokens per example; longer examples are truncated, keeping the start (as model::DatasetOptions
  // does). Also the packed block length. Must be >= 2. Default 256.
  int64_t seq_len = 256;
  // Pack training examples end to end into blocks of exactly seq_len tokens (the last block of an
  // epoch may be shorter). Attention crosses example boundaries inside a block, as in GPT-style
  // pretraining; set eos_id so examples stay separated. Held-out examples are never packed.
  // Default true.
  bool pack = true;
  // Fraction of usable rows held out for evaluation, in [0, 1): round(fraction × rows), at least
  // 1 when fraction > 0 and there are >= 2 rows, at most rows - 1 (training is never empty).
  // Default 0.1.
  double heldout_fraction = 0.1;
  // Seeds the held-out split and the per-epoch shuffles (Philox stream rng_stream::kData).
  // Default 0.
  uint64_t seed = 0;
  // Examples (or packed blocks) per batch. Must be >= 1. Default 1.
  int64_t batch_size = 1;
  // Appended to every example's text / output before truncation, as model::DatasetOptions::eos_id.
  // Must be a valid id of the tokenizer. Default unset.
  std::optional<int32_t> eos_id;
  // Rows longer than this many bytes are skipped and counted (LoadStats::too_long), never held in
  // memory: what loading holds stays bounded whatever the file (tokenizing a row briefly takes
  // about kRowTokenizeBytesPerByte times its size). In [kMinMaxRowBytes, kMaxMaxRowBytes].
  // Default 256 KiB: over 50,000 tokens of text, far beyond any seq_len (a row is cut to seq_len
  // tokens), so only broken or hostile rows hit it; raise it for corpora of long documents.
  int64_t max_row_bytes = kDefaultMaxRowBytes;
};

// One usable row.
struct LocalExample {
  model::Example example;  // tokens and labels, at most seq_len long
  std::string topic;       // the row's "topic" field, "" if absent or neither a string nor an integer
  std::string user;        // the row's "user" field, same rules
  int64_t line = 0;        // 1-based line number in the file
};

// What loading saw. Rows are non-blank lines; rows = usable + skipped.
struct LoadStats {
  int64_t rows = 0;
  int64_t skipped = 0;
  int64_t first_bad_line = 0;  // 0 when nothing was skipped
  std::string first_error;     // the first skipped row's reason, "" when nothing was skipped
  int64_t truncated = 0;       // usable rows cut to seq_len
  int64_t too_long = 0;        // skipped rows longer than LocalDataOptions::max_row_bytes (in `skipped`)
  int64_t unlabelled = 0;      // usable rows with "output": null (LocalDataset::unlabelled())

  // "skipped 3 of 120 rows; first at line 17: field \"output\" must be a string", or "" when
  // nothing was skipped.
  std::string SkipMessage() const;
};

// Where a BatchIterator is: a plain struct of integers that an app persists and restores. See
// BatchIterator.
struct IteratorPosition {
  uint64_t epoch = 0;        // epoch of the next batch
  uint64_t offset = 0;       // index, in that epoch's order, of the next example / block
  uint64_t fingerprint = 0;  // LocalDataset::fingerprint() of the data the position belongs to

  bool operator==(const IteratorPosition&) const = default;
};

// A row without a label ("output": null): its JSON object as read, for a labeller to fill in.
struct UnlabelledRow {
  std::string json;  // the row's line (no BOM, no trailing '\r')
  int64_t line = 0;  // 1-based line number in the file
};

class LocalDataset;

// The training items of one epoch: the training examples in a shuffled order, packed into blocks
// when LocalDataOptions::pack is set. Holds only the order and, when packing, one offset per
// example; items are materialized on demand. Immutable; thread-safe. The dataset must outlive it.
class EpochPlan {
 public:
  EpochPlan(const LocalDataset& data, uint64_t epoch);

  uint64_t epoch() const { return epoch_; }
  // Indices into LocalDataset::train(), in this epoch's order: a permutation that depends only on
  // (seed, epoch, number of training examples), the same on every machine: Fisher-Yates
  // (for i = n-1 down to 1, swap i with j = Rng::UniformInt(i + 1)) with Rng(s_e, kData), where
  // s_e = words 2-3 of Philox4x32 block `epoch` of stream (seed, rng_stream::kData). Unlike
  // seed + epoch, this gives seeds s and s + 1 unrelated orders.
  std::span<const uint32_t> order() const { return order_; }
  // Examples per epoch, or packed blocks: ceil(train tokens / seq_len). The same for every epoch.
  int64_t num_items() const;
  // Item i (0 <= i < num_items()): the example order()[i], or packed block i = tokens and labels
  // [i × seq_len, (i + 1) × seq_len) of the concatenation of the examples in order().
  model::Example Item(int64_t i) const;

 private:
  const LocalDataset* data_;
  uint64_t epoch_;
  std::vector<uint32_t> order_;
  // When packing: starts_[j] = offset of order_[j] in the concatenation; starts_[n] = total.
  std::vector<int64_t> starts_;
};

class LocalDataset {
 public:
  // Reads and tokenizes a JSONL file. NotFound if it does not exist; InvalidArgument for invalid
  // options, or if no row is usable ("data.jsonl: no usable row: skipped 3 of 3 rows; first at line
  // 1: ..."). Unlabelled rows count as usable, so train() is empty when every usable row is
  // unlabelled. Skipped rows are reported in stats(). The tokenizer is only used during the call.
  static absl::StatusOr<LocalDataset> Load(const std::string& path, const model::Tokenizer& tokenizer,
                                           const LocalDataOptions& options);
  // Same, from JSONL text already in memory; `name` stands for the file in messages.
  static absl::StatusOr<LocalDataset> Parse(std::string_view jsonl, std::string_view name,
                                            const model::Tokenizer& tokenizer, const LocalDataOptions& options);

  const LocalDataOptions& options() const { return options_; }
  const LoadStats& stats() const { return stats_; }

  // The held-out split, each in file order. A row is held out when its key is among the k smallest,
  // where k follows LocalDataOptions::heldout_fraction and the key is words 0-1 of Philox4x32 block
  // FNV-1a-64(the row's line, without a UTF-8 BOM or trailing '\r') of stream (seed,
  // rng_stream::kData), ties broken by file order. So the split depends only on the seed and the
  // set of usable rows, not on their order in the file, and is the same on every machine. Identical
  // duplicate rows may land on both sides.
  std::span<const LocalExample> train() const { return train_; }
  std::span<const LocalExample> heldout() const { return heldout_; }
  // Rows with "output": null, in file order.
  std::span<const UnlabelledRow> unlabelled() const { return unlabelled_; }

  // A copy whose training examples are train() followed by `extra` (pseudo-labelled rows), with
  // train_tokens() and fingerprint() recomputed; held-out and unlabelled rows unchanged.
  LocalDataset WithExtraTraining(std::vector<LocalExample> extra) const;

  int64_t train_tokens() const { return train_tokens_; }
  int64_t heldout_tokens() const { return heldout_tokens_; }
  // Training items per epoch (examples, or packed blocks).
  int64_t items_per_epoch() const;

  // Identifies what the batch stream depends on: the training examples (tokens, labels, order),
  // seq_len, pack and seed (not batch_size). Positions saved from other data are refused by
  // BatchIterator::Restore.
  uint64_t fingerprint() const { return fingerprint_; }

  // One line for logs, e.g. "data.jsonl: 120 rows (3 skipped, first at line 17: ...), 4 truncated
  // to 256; train 106 examples, 13012 tokens, 51 blocks of 256; held out 11 examples, 1311 tokens".
  std::string Summary() const;

 private:
  LocalDataset() = default;
  // Load and Parse: `lines` calls its argument for each line of the source.
  static absl::StatusOr<LocalDataset> FromLines(std::string_view name, const model::Tokenizer& tokenizer,
                                                const LocalDataOptions& options,
                                                const std::function<absl::Status(const LineFn&)>& lines);
  // Sets fingerprint_ from the options and train_.
  void Fingerprint();

  LocalDataOptions options_;
  std::string name_;
  LoadStats stats_;
  std::vector<LocalExample> train_;
  std::vector<LocalExample> heldout_;
  std::vector<UnlabelledRow> unlabelled_;
  int64_t train_tokens_ = 0;
  int64_t heldout_tokens_ = 0;
  uint64_t fingerprint_ = 0;
};

// One training batch and where it came from.
struct LocalBatch {
  model::Batch batch;   // tokens / labels (items, T), right-padded (model::CollateRightPadded)
  uint64_t epoch = 0;   // the epoch it belongs to
  uint64_t offset = 0;  // index of its first item in that epoch's order
  int64_t items = 0;    // rows in the batch
  int64_t tokens = 0;   // tokens in the rows, without padding: what a step processes
  // Sum of Example::ScoredTokens() over rows. Can be 0 when packing (a block whose only scored
  // label sits at its position 0, which nothing predicts): a step a trainer should skip.
  int64_t scored_tokens = 0;
};

// Cycles through the training data forever: epoch e serves EpochPlan(data, e)'s items in order,
// batch_size at a time. A batch never spans two epochs, so the last batch of an epoch holds the
// remainder (fewer items when items_per_epoch is not a multiple of batch_size); every item is
// served exactly once per epoch.
//
// Resume contract: position() is the position of the next batch. An iterator restored from a
// saved position, over the same data and options (same fingerprint), serves exactly the batches the
// original would have served next; with a different batch_size, the same items in the same order.
// Save the position atomically with what the batches trained (in the same checkpoint as the
// adapter), after the step that consumed the batch: saved apart, a crash between the two writes
// replays or skips a batch.
//
// Not thread-safe. The dataset must outlive the iterator and not move.
class BatchIterator {
 public:
  // Starts at epoch 0, offset 0.
  explicit BatchIterator(const LocalDataset& data);

  // Continues from `position`. InvalidArgument, leaving the iterator unchanged, if the position was
  // saved from other data or options (fingerprint mismatch) or its offset is not below
  // items_per_epoch().
  absl::Status Restore(const IteratorPosition& position);
  IteratorPosition position() const;

  LocalBatch Next();

 private:
  const LocalDataset& data_;
  uint64_t epoch_ = 0;
  uint64_t offset_ = 0;
  std::optional<EpochPlan> plan_;  // plan of epoch_, built when first needed
};

// What loading a data file will hold, bounded before loading it (one streaming pass, nothing parsed), so
// the memory planner can count data next to weights and activations.
struct DataFootprint {
  int64_t rows = 0;  // non-blank rows within max_row_bytes
  int64_t longest_row_bytes = 0;
  int64_t held_bytes = 0;       // examples kept: at most min(row bytes + template, seq_len) tokens a row
  int64_t transient_bytes = 0;  // tokenizing the longest row
  int64_t total_bytes() const { return held_bytes + transient_bytes; }
};

// Peak bytes tokenizing a row takes per byte of the row (its JSON document, the pre-tokenized words,
// the token and label vectors). Measured with `seedling finetune` on 1 MB rows: 29 for English-like
// words, 62 for random punctuation, 74 for "a a a ..." (one token per two bytes); the local_data test
// checks the bound on the worst of these.
inline constexpr int64_t kRowTokenizeBytesPerByte = 96;

absl::StatusOr<DataFootprint> ScanDataFootprint(const std::string& path, const LocalDataOptions& options);

}  // namespace seedling::client
