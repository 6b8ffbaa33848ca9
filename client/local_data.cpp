#include "client/local_data.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <utility>

#include "base/check.h"
#include "base/file.h"
#include "base/json.h"
#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/kernels.h"

namespace seedling::client {
namespace {

using Json = nlohmann::json;

constexpr std::string_view kUtf8Bom = "\xEF\xBB\xBF";
constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001b3ULL;
// Bumped when the batch stream changes for the same data, so positions saved by an older version
// are refused.
constexpr uint64_t kStreamVersion = 1;

uint64_t Fnv1aBytes(uint64_t h, std::string_view bytes) {
  for (const char c : bytes) {
    h ^= static_cast<uint8_t>(c);
    h *= kFnvPrime;
  }
  return h;
}

// Little-endian bytes, so the fingerprint a phone persists does not depend on the host's byte
// order.
uint64_t Fnv1aU64(uint64_t h, uint64_t v) {
  for (int i = 0; i < 8; ++i) {
    h ^= (v >> (8 * i)) & 0xff;
    h *= kFnvPrime;
  }
  return h;
}

// Philox4x32 block `block` of stream (seed, rng_stream::kData): the same addressing as
// base/philox.h's streams.
std::array<uint32_t, 4> DataBlock(uint64_t seed, uint64_t block) {
  constexpr uint64_t kStream = rng_stream::kData;
  return Philox4x32({static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), static_cast<uint32_t>(kStream),
                     static_cast<uint32_t>(kStream >> 32)},
                    {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
}

// The split key of a row (see LocalDataset::heldout()). Keyed by content, so file order does not
// matter.
uint64_t HeldoutKey(std::string_view line, uint64_t seed) {
  const auto w = DataBlock(seed, Fnv1aBytes(kFnvOffset, line));
  return (static_cast<uint64_t>(w[1]) << 32) | w[0];
}

// The shuffle seed of an epoch (see EpochPlan::order()). Words 2-3, so that a row whose hash
// happens to equal an epoch number does not share words with that epoch's seed.
uint64_t EpochSeed(uint64_t seed, uint64_t epoch) {
  const auto w = DataBlock(seed, epoch);
  return (static_cast<uint64_t>(w[3]) << 32) | w[2];
}

// Index of the first byte that does not start a valid UTF-8 sequence (overlong forms, surrogates
// and code points above U+10FFFF are invalid), or npos. Checked before JSON parsing so the message
// can name a byte offset instead of echoing the bytes, as nlohmann's message would.
size_t FirstInvalidUtf8(std::string_view s) {
  static constexpr uint32_t kMinCodePoint[5] = {0, 0, 0x80, 0x800, 0x10000};
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<uint8_t>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07;
    } else {
      return i;
    }
    if (s.size() - i < len) return i;
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<uint8_t>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < kMinCodePoint[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

// "topic" / "user": strings, or integers (user ids often are) as their decimal text; anything else
// is ignored like any other extra field.
std::string Tag(const Json& row, const char* key) {
  const auto it = row.find(key);
  if (it == row.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_number_integer()) return it->dump();
  return "";
}

// A Dolly row ({"instruction", "context", "response"}) rewritten as the Alpaca row TokenizeRow
// reads. Type errors name Dolly's fields, which are the ones the user wrote.
absl::StatusOr<std::string> DollyAsAlpaca(const Json& row) {
  Json alpaca = Json::object();
  if (const auto it = row.find("instruction"); it != row.end()) alpaca["instruction"] = *it;
  const auto context = row.find("context");
  if (context != row.end() && !context->is_null()) {
    if (!context->is_string()) return absl::InvalidArgumentError(R"(field "context" must be a string)");
    alpaca["input"] = *context;
  }
  const auto response = row.find("response");
  if (response == row.end() || response->is_null()) return absl::InvalidArgumentError(R"(missing field "response")");
  if (!response->is_string()) return absl::InvalidArgumentError(R"(field "response" must be a string)");
  alpaca["output"] = *response;
  return alpaca.dump();
}

// Parses and tokenizes one non-blank row; any error is the reason to skip it. Sets `truncated` when
// the example was cut to seq_len.
absl::StatusOr<LocalExample> TokenizeLocalRow(std::string_view line, const model::Tokenizer& tokenizer,
                                              const LocalDataOptions& options, bool& truncated) {
  if (const size_t bad = FirstInvalidUtf8(line); bad != std::string_view::npos) {
    return absl::InvalidArgumentError(StrCat("not valid UTF-8 (byte ", bad + 1, ")"));
  }
  SEEDLING_ASSIGN_OR_RETURN(const Json row, ParseJson(line, ""));
  if (!row.is_object()) return absl::InvalidArgumentError("each line must be a JSON object");

  LocalExample out;
  out.topic = Tag(row, "topic");
  out.user = Tag(row, "user");

  // Which field carries the scored text, and the row TokenizeRow should see.
  const char* scored_field = "text";
  std::string dolly_row;
  std::string_view row_text = line;
  if (!row.contains("text")) {
    const bool dolly = row.contains("context") || row.contains("response");
    const bool alpaca = row.contains("input") || row.contains("output");
    if (dolly && alpaca) {
      return absl::InvalidArgumentError(
          R"(row mixes Alpaca ("input"/"output") and Dolly ("context"/"response") field names)");
    }
    if (!dolly && !alpaca && !row.contains("instruction")) {
      return absl::InvalidArgumentError(
          R"(expected a "text" field, "instruction"/"input"/"output" fields or "instruction"/"context"/"response" fields)");
    }
    if (dolly) {
      SEEDLING_ASSIGN_OR_RETURN(dolly_row, DollyAsAlpaca(row));
      row_text = dolly_row;
      scored_field = "response";
    } else {
      scored_field = "output";
    }
  }

  // No truncation here: first tell "nothing to score at all" from "truncation cut the response
  // off".
  model::DatasetOptions dataset_options;
  dataset_options.max_seq_len = std::numeric_limits<int64_t>::max();
  dataset_options.eos_id = options.eos_id;
  SEEDLING_ASSIGN_OR_RETURN(out.example, model::TokenizeRow(row_text, tokenizer, dataset_options));

  // TokenizeRow accepted the row, so the scored field is a string.
  if (row.find(scored_field)->get_ref<const std::string&>().empty()) {
    return absl::InvalidArgumentError(StrCat("field \"", scored_field, "\" is empty"));
  }
  model::Example& ex = out.example;
  if (ex.ScoredTokens() == 0) {
    return absl::InvalidArgumentError(StrCat("row has no token to score (", ex.tokens.size(), " tokens)"));
  }
  const auto seq_len = static_cast<size_t>(options.seq_len);
  truncated = ex.tokens.size() > seq_len;
  if (truncated) {
    const auto prompt_len = static_cast<int64_t>(
        std::find_if(ex.labels.begin(), ex.labels.end(), [](int32_t l) { return l != model::kIgnoreIndex; }) -
        ex.labels.begin());
    ex.tokens.resize(seq_len);
    ex.labels.resize(seq_len);
    // Kept rows always have a scored token of their own, so no unpacked batch row is all -100
    // (a 0/0 loss).
    if (ex.ScoredTokens() == 0) {
      return absl::InvalidArgumentError(StrCat("the prompt is ", prompt_len, " tokens; seq_len ", options.seq_len,
                                               " leaves no response token to score"));
    }
  }
  return out;
}

// {"instruction": ..., "output": null} (no "text"): a row waiting for a label. Cheap for other rows: only
// lines mentioning null are parsed here.
bool IsUnlabelledRow(std::string_view line) {
  if (line.find("null") == std::string_view::npos || FirstInvalidUtf8(line) != std::string_view::npos) return false;
  absl::StatusOr<Json> parsed = ParseJson(line, "");
  if (!parsed.ok()) return false;
  const Json& row = *parsed;
  if (!row.is_object() || row.contains("text") || row.contains("context") || row.contains("response")) return false;
  const auto output = row.find("output");
  const auto instruction = row.find("instruction");
  return output != row.end() && output->is_null() && instruction != row.end() && instruction->is_string() &&
         !instruction->get_ref<const std::string&>().empty();
}

absl::Status ValidateOptions(const LocalDataOptions& o, const model::Tokenizer& tokenizer) {
  if (o.seq_len < 2) return absl::InvalidArgumentError(StrCat("seq_len must be >= 2, got ", o.seq_len));
  if (o.batch_size < 1) return absl::InvalidArgumentError(StrCat("batch_size must be >= 1, got ", o.batch_size));
  if (o.max_row_bytes < kMinMaxRowBytes || o.max_row_bytes > kMaxMaxRowBytes) {
    return absl::InvalidArgumentError(
        StrCat("max_row_bytes must be in [", kMinMaxRowBytes, ", ", kMaxMaxRowBytes, "], got ", o.max_row_bytes));
  }
  if (!(o.heldout_fraction >= 0.0 && o.heldout_fraction < 1.0)) {
    return absl::InvalidArgumentError(StrCat("heldout_fraction must be in [0, 1), got ", o.heldout_fraction));
  }
  if (o.eos_id && (*o.eos_id < 0 || *o.eos_id >= tokenizer.vocab_size())) {
    return absl::InvalidArgumentError(
        StrCat("eos_id ", *o.eos_id, " is not a token id of the tokenizer (vocab size ", tokenizer.vocab_size(), ")"));
  }
  return absl::OkStatus();
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::string LoadStats::SkipMessage() const {
  if (skipped == 0) return "";
  return StrCat("skipped ", skipped, " of ", rows, " rows; first at line ", first_bad_line, ": ", first_error);
}

// ---- LocalDataset ----

absl::StatusOr<LocalDataset> LocalDataset::Load(const std::string& path, const model::Tokenizer& tokenizer,
                                                const LocalDataOptions& options) {
  // Streamed: at most one row (of at most max_row_bytes) is in memory besides the tokens kept.
  return FromLines(path, tokenizer, options,
                   [&](const LineFn& fn) { return ForEachLine(path, options.max_row_bytes, fn); });
}

absl::StatusOr<LocalDataset> LocalDataset::Parse(std::string_view jsonl, std::string_view name,
                                                 const model::Tokenizer& tokenizer, const LocalDataOptions& options) {
  return FromLines(name, tokenizer, options,
                   [&](const LineFn& fn) { return ForEachLineIn(jsonl, options.max_row_bytes, fn); });
}

absl::StatusOr<LocalDataset> LocalDataset::FromLines(std::string_view name, const model::Tokenizer& tokenizer,
                                                     const LocalDataOptions& options,
                                                     const std::function<absl::Status(const LineFn&)>& lines) {
  SEEDLING_RETURN_IF_ERROR(ValidateOptions(options, tokenizer));
  LocalDataset data;
  data.options_ = options;
  data.name_ = std::string(name);
  LoadStats& stats = data.stats_;

  std::vector<LocalExample> usable;
  std::vector<uint64_t> keys;
  auto skip = [&](int64_t line_no, std::string why) {
    if (stats.skipped++ == 0) {
      stats.first_bad_line = line_no;
      stats.first_error = std::move(why);
    }
  };
  SEEDLING_RETURN_IF_ERROR(lines([&](const Line& l) -> absl::Status {
    if (l.too_long) {
      ++stats.rows;
      ++stats.too_long;
      skip(l.number, StrCat("row of ", l.bytes, " bytes is longer than max_row_bytes (", options.max_row_bytes, ")"));
      return absl::OkStatus();
    }
    std::string_view line = l.text;
    if (l.number == 1 && line.starts_with(kUtf8Bom)) line.remove_prefix(kUtf8Bom.size());
    if (line.ends_with('\r')) line.remove_suffix(1);
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) return absl::OkStatus();
    ++stats.rows;

    if (IsUnlabelledRow(line)) {
      ++stats.unlabelled;
      data.unlabelled_.push_back({std::string(line), l.number});
      return absl::OkStatus();
    }
    bool truncated = false;
    absl::StatusOr<LocalExample> ex = absl::InternalError("unset");
    try {
      ex = TokenizeLocalRow(line, tokenizer, options, truncated);
    } catch (const Json::exception& e) {
      // Only parse errors are expected (and handled inside); this keeps any other nlohmann throw a
      // skipped row rather than a crash of the app.
      ex = absl::InvalidArgumentError(StrCat("JSON error ", e.id));
    }
    if (!ex.ok()) {
      skip(l.number, std::string(FromAbsl(ex.status().message())));
      return absl::OkStatus();
    }
    ex->line = l.number;
    ex->example.tokens.shrink_to_fit();  // truncation to seq_len left the full row's capacity
    ex->example.labels.shrink_to_fit();
    stats.truncated += truncated;
    keys.push_back(HeldoutKey(line, options.seed));
    usable.push_back(std::move(ex).value());
    return absl::OkStatus();
  }));

  if (stats.rows == 0) return absl::InvalidArgumentError(StrCat(name, ": no rows"));
  if (usable.empty() && data.unlabelled_.empty()) {
    return absl::InvalidArgumentError(StrCat(name, ": no usable row: ", stats.SkipMessage()));
  }
  if (usable.size() > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(StrCat(name, ": ", usable.size(), " rows, more than 2^32 - 1"));
  }

  // Held-out split: the k rows of smallest key.
  const auto n = static_cast<int64_t>(usable.size());
  int64_t k = 0;
  if (n >= 2 && options.heldout_fraction > 0) {
    k = std::clamp<int64_t>(std::llround(options.heldout_fraction * static_cast<double>(n)), 1, n - 1);
  }
  std::vector<uint32_t> by_key(static_cast<size_t>(n));
  std::iota(by_key.begin(), by_key.end(), 0u);
  std::nth_element(by_key.begin(), by_key.begin() + k, by_key.end(),
                   [&](uint32_t a, uint32_t b) { return std::pair(keys[a], a) < std::pair(keys[b], b); });
  std::vector<bool> held(static_cast<size_t>(n), false);
  for (int64_t i = 0; i < k; ++i) held[by_key[static_cast<size_t>(i)]] = true;

  for (int64_t i = 0; i < n; ++i) {
    LocalExample& ex = usable[static_cast<size_t>(i)];
    const auto tokens = static_cast<int64_t>(ex.example.tokens.size());
    if (held[static_cast<size_t>(i)]) {
      data.heldout_tokens_ += tokens;
      data.heldout_.push_back(std::move(ex));
    } else {
      data.train_tokens_ += tokens;
      data.train_.push_back(std::move(ex));
    }
  }

  data.Fingerprint();
  return data;
}

void LocalDataset::Fingerprint() {
  uint64_t h = Fnv1aU64(kFnvOffset, kStreamVersion);
  h = Fnv1aU64(h, static_cast<uint64_t>(options_.seq_len));
  h = Fnv1aU64(h, static_cast<uint64_t>(options_.pack));
  h = Fnv1aU64(h, options_.seed);
  h = Fnv1aU64(h, static_cast<uint64_t>(train_.size()));
  for (const LocalExample& ex : train_) {
    h = Fnv1aU64(h, static_cast<uint64_t>(ex.example.tokens.size()));
    for (const int32_t t : ex.example.tokens) h = Fnv1aU64(h, static_cast<uint64_t>(static_cast<uint32_t>(t)));
    for (const int32_t l : ex.example.labels) h = Fnv1aU64(h, static_cast<uint64_t>(static_cast<uint32_t>(l)));
  }
  fingerprint_ = h;
}

LocalDataset LocalDataset::WithExtraTraining(std::vector<LocalExample> extra) const {
  LocalDataset out = *this;
  for (LocalExample& ex : extra) {
    out.train_tokens_ += static_cast<int64_t>(ex.example.tokens.size());
    out.train_.push_back(std::move(ex));
  }
  out.Fingerprint();
  return out;
}

int64_t LocalDataset::items_per_epoch() const {
  return options_.pack ? CeilDiv(train_tokens_, options_.seq_len) : static_cast<int64_t>(train_.size());
}

std::string LocalDataset::Summary() const {
  std::string s = StrCat(name_, ": ", stats_.rows, " rows");
  if (stats_.skipped > 0) {
    s += StrCat(" (", stats_.skipped, " skipped, first at line ", stats_.first_bad_line, ": ", stats_.first_error, ")");
  }
  if (stats_.truncated > 0) s += StrCat(", ", stats_.truncated, " truncated to ", options_.seq_len);
  s += StrCat("; train ", train_.size(), " examples, ", train_tokens_, " tokens");
  if (options_.pack) s += StrCat(", ", items_per_epoch(), " blocks of ", options_.seq_len);
  s += StrCat("; held out ", heldout_.size(), " examples, ", heldout_tokens_, " tokens");
  if (!unlabelled_.empty()) s += StrCat("; ", unlabelled_.size(), " unlabelled");
  return s;
}

// ---- EpochPlan ----

EpochPlan::EpochPlan(const LocalDataset& data, uint64_t epoch) : data_(&data), epoch_(epoch) {
  const size_t n = data.train().size();
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0u);
  Rng rng(EpochSeed(data.options().seed, epoch), rng_stream::kData);
  for (size_t i = n; i > 1; --i) {
    const auto j = static_cast<size_t>(rng.UniformInt(i));
    std::swap(order_[i - 1], order_[j]);
  }
  if (data.options().pack) {
    starts_.resize(n + 1);
    starts_[0] = 0;
    for (size_t j = 0; j < n; ++j) {
      starts_[j + 1] = starts_[j] + static_cast<int64_t>(data.train()[order_[j]].example.tokens.size());
    }
  }
}

int64_t EpochPlan::num_items() const { return data_->items_per_epoch(); }

model::Example EpochPlan::Item(int64_t i) const {
  SEEDLING_CHECK(i >= 0 && i < num_items(), "EpochPlan::Item index out of range");
  const auto train = data_->train();
  if (!data_->options().pack) return train[order_[static_cast<size_t>(i)]].example;

  const int64_t seq_len = data_->options().seq_len;
  const int64_t begin = i * seq_len;
  const int64_t end = std::min(begin + seq_len, starts_.back());
  model::Example block;
  block.tokens.reserve(static_cast<size_t>(end - begin));
  block.labels.reserve(static_cast<size_t>(end - begin));
  // The example holding position `begin`: every example is non-empty, so starts_ is strictly
  // increasing.
  auto j = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin() - 1);
  for (int64_t pos = begin; pos < end; ++j) {
    const model::Example& ex = train[order_[j]].example;
    const int64_t from = pos - starts_[j];
    const int64_t take = std::min(static_cast<int64_t>(ex.tokens.size()) - from, end - pos);
    block.tokens.insert(block.tokens.end(), ex.tokens.begin() + from, ex.tokens.begin() + from + take);
    block.labels.insert(block.labels.end(), ex.labels.begin() + from, ex.labels.begin() + from + take);
    pos += take;
  }
  return block;
}

// ---- BatchIterator ----

BatchIterator::BatchIterator(const LocalDataset& data) : data_(data) {}

absl::Status BatchIterator::Restore(const IteratorPosition& position) {
  if (position.fingerprint != data_.fingerprint()) {
    return absl::InvalidArgumentError(StrCat("iterator position was saved for other data or options (fingerprint ",
                                             absl::Hex(position.fingerprint), ", this data has ",
                                             absl::Hex(data_.fingerprint()), ")"));
  }
  const auto items = static_cast<uint64_t>(data_.items_per_epoch());
  if (position.offset >= items) {
    return absl::InvalidArgumentError(
        StrCat("iterator position offset ", position.offset, " is not below the epoch's ", items, " items"));
  }
  epoch_ = position.epoch;
  offset_ = position.offset;
  return absl::OkStatus();
}

IteratorPosition BatchIterator::position() const { return {epoch_, offset_, data_.fingerprint()}; }

LocalBatch BatchIterator::Next() {
  if (!plan_ || plan_->epoch() != epoch_) plan_.emplace(data_, epoch_);
  const auto n = static_cast<uint64_t>(plan_->num_items());
  const uint64_t end = std::min(offset_ + static_cast<uint64_t>(data_.options().batch_size), n);

  std::vector<model::Example> items;
  items.reserve(static_cast<size_t>(end - offset_));
  LocalBatch out;
  for (uint64_t i = offset_; i < end; ++i) {
    items.push_back(plan_->Item(static_cast<int64_t>(i)));
    out.scored_tokens += items.back().ScoredTokens();
    out.tokens += static_cast<int64_t>(items.back().tokens.size());
  }
  std::vector<const model::Example*> rows;
  rows.reserve(items.size());
  for (const model::Example& ex : items) rows.push_back(&ex);
  out.batch = model::CollateRightPadded(rows);
  out.epoch = epoch_;
  out.offset = offset_;
  out.items = static_cast<int64_t>(items.size());

  offset_ = end;
  if (offset_ == n) {
    ++epoch_;
    offset_ = 0;
  }
  return out;
}

absl::StatusOr<DataFootprint> ScanDataFootprint(const std::string& path, const LocalDataOptions& options) {
  // Tokens per row: byte-level BPE and SentencePiece's byte fallback give at most one token per byte, plus
  // the instruction template's text and BOS / EOS.
  constexpr int64_t kTemplateBytes = 64;
  constexpr int64_t kPerExample = static_cast<int64_t>(sizeof(LocalExample)) + 16;  // + held-out key, order
  DataFootprint f;
  SEEDLING_RETURN_IF_ERROR(ForEachLine(path, options.max_row_bytes, [&](const Line& l) {
    if (l.too_long || l.text.find_first_not_of(" \t\r") == std::string_view::npos) return absl::OkStatus();
    ++f.rows;
    f.longest_row_bytes = std::max(f.longest_row_bytes, l.bytes);
    const int64_t tokens = std::min(l.bytes + kTemplateBytes, options.seq_len);
    f.held_bytes += kPerExample + tokens * 2 * static_cast<int64_t>(sizeof(int32_t));
    return absl::OkStatus();
  }));
  f.transient_bytes = f.longest_row_bytes * kRowTokenizeBytesPerByte;
  return f;
}

}  // namespace seedling::client
