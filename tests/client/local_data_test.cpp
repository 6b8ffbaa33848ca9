#include "client/local_data.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <filesystem>
#include <map>
#include <set>

#include "base/file.h"
#include "base/memory.h"
#include "base/strings.h"
#include "model/kernels.h"
#include "tests/test_util.h"

namespace seedling::client {
namespace {

using model::Example;

const model::Tokenizer& SmallTokenizer() {
  static const std::unique_ptr<model::Tokenizer> tokenizer = [] {
    model::BpeTrainerOptions o;
    o.vocab_size = 400;
    auto json = model::TrainByteLevelBpeTokenizerJson(
        "the cat sat on the mat. the dog sat on the log. instruction response input output\n", o);
    REQUIRE(json.ok());
    auto tok = model::ParseTokenizerJson(*json);
    REQUIRE(tok.ok());
    return std::move(tok).value();
  }();
  return *tokenizer;
}

constexpr int32_t kEos = 0;  // "<|endoftext|>", the trainer's first special token

// `contents` as <name>.jsonl in a directory removed when the test process exits.
std::string WriteTemp(const std::string& name, const std::string& contents) {
  static const testing::TempDir dir;
  const std::string path = std::filesystem::path(dir.path) / StrCat(name, ".jsonl");
  REQUIRE(WriteFileAtomic(path, contents).ok());
  return path;
}

// n distinct text rows, one per line.
std::string TextRows(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += StrCat(R"({"text": "row )", i, R"(: the cat sat on the mat"})", "\n");
  return s;
}

LocalDataOptions Opts() {
  LocalDataOptions o;
  o.eos_id = kEos;
  return o;
}

Example Tokenized(std::string_view row) {
  model::DatasetOptions o;
  o.eos_id = kEos;
  auto ex = model::TokenizeRow(row, SmallTokenizer(), o);
  REQUIRE(ex.ok());
  return std::move(ex).value();
}

LocalDataset MustParse(std::string_view jsonl, const LocalDataOptions& o) {
  auto data = LocalDataset::Parse(jsonl, "mem.jsonl", SmallTokenizer(), o);
  INFO(data.status().ToString());
  REQUIRE(data.ok());
  return std::move(data).value();
}

std::set<int64_t> HeldoutLines(const LocalDataset& d) {
  std::set<int64_t> lines;
  for (const LocalExample& ex : d.heldout()) lines.insert(ex.line);
  return lines;
}

std::vector<int64_t> Flatten(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

TEST_CASE("Instruction rows keep their prompt masked exactly as seedling eval does", "[client][data]") {
  const std::string row = R"({"instruction": "name an animal", "input": "a pet", "output": "the cat"})";
  LocalDataOptions o = Opts();
  o.heldout_fraction = 0;
  const std::string path = WriteTemp("masking", StrCat(row, "\n", R"({"text": "the dog sat"})", "\n"));
  auto data = LocalDataset::Load(path, SmallTokenizer(), o);
  REQUIRE(data.ok());
  REQUIRE(data->train().size() == 2);

  const Example expected = Tokenized(row);
  const Example& got = data->train()[0].example;
  CHECK(got.tokens == expected.tokens);
  CHECK(got.labels == expected.labels);
  const auto prompt = SmallTokenizer().Encode(model::InstructionPrompt("name an animal", "a pet"));
  REQUIRE(prompt.ok());
  for (size_t i = 0; i < prompt->size(); ++i) CHECK(got.labels[i] == model::kIgnoreIndex);
  CHECK(got.labels.back() == kEos);
  CHECK(data->train()[1].example.labels == data->train()[1].example.tokens);
}

TEST_CASE("Bad rows are skipped and counted with the first bad line and its reason", "[client][data]") {
  const std::string jsonl = StrCat(TextRows(2),                                   // lines 1-2
                                   "\n",                                          // line 3: blank, not a row
                                   R"({"instruction": "a", "output": 5})", "\n",  // line 4
                                   "not json\n",                                  // line 5
                                   TextRows(1));                                  // line 6
  const std::string path = WriteTemp("bad_rows", jsonl);
  auto data = LocalDataset::Load(path, SmallTokenizer(), Opts());
  REQUIRE(data.ok());
  CHECK(data->stats().rows == 5);
  CHECK(data->stats().skipped == 2);
  CHECK(data->stats().first_bad_line == 4);
  CHECK(data->stats().SkipMessage() == R"(skipped 2 of 5 rows; first at line 4: field "output" must be a string)");
  CHECK(data->train().size() + data->heldout().size() == 3);
}

TEST_CASE("Each kind of bad row is skipped with a reason that does not quote the row", "[client][data]") {
  LocalDataOptions o = Opts();
  o.seq_len = 8;
  const std::string long_prompt = R"({"instruction": "the cat sat on the mat the dog sat on the log", "output": "x"})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"text\": \"caf\xC3\"}", "not valid UTF-8 (byte 14)"},
      {"{\"text\": \"\xED\xA0\x80\"}", "not valid UTF-8 (byte 11)"},  // an encoded surrogate
      {R"({"text": "secret", )", "not valid JSON"},
      {R"(["text", "secret"])", "each line must be a JSON object"},
      {R"({"text": 3})", R"(field "text" must be a string)"},
      {R"({"output": "no instruction"})", R"(missing field "instruction")"},
      {R"({"instruction": "no output"})", R"(missing field "output")"},
      {R"({"prompt": "p", "completion": "c"})", R"(expected a "text" field)"},
      {R"({"text": ""})", R"(field "text" is empty)"},
      {R"({"instruction": "a", "output": ""})", R"(field "output" is empty)"},
      {R"({"instruction": "a", "input": "b", "response": "c"})", "mixes Alpaca"},
      {R"({"instruction": "a", "context": 1, "response": "c"})", R"(field "context" must be a string)"},
      {long_prompt, "leaves no response token to score"},
  };
  for (const auto& [row, reason] : cases) {
    INFO(row);
    const LocalDataset data = MustParse(StrCat(TextRows(1), row, "\n"), o);
    CHECK(data.stats().skipped == 1);
    CHECK(data.stats().first_bad_line == 2);
    CHECK_THAT(data.stats().first_error, Catch::Contains(reason));
    CHECK_THAT(data.stats().first_error, !Catch::Contains("secret"));
  }
}

TEST_CASE("A text row with nothing to predict is skipped", "[client][data]") {
  LocalDataOptions o = Opts();
  o.eos_id.reset();
  const auto one = SmallTokenizer().Encode("x");
  REQUIRE(one.ok());
  REQUIRE(one->size() == 1);  // a single token: nothing predicts it
  const LocalDataset data = MustParse(StrCat(TextRows(1), R"({"text": "x"})", "\n"), o);
  CHECK(data.stats().skipped == 1);
  CHECK_THAT(data.stats().first_error, Catch::Contains("no token to score"));
}

TEST_CASE("A file with no usable row is InvalidArgument with the skip message", "[client][data]") {
  const std::string path = WriteTemp("all_bad", "{\"text\": 1}\n\nnope\n");
  auto data = LocalDataset::Load(path, SmallTokenizer(), Opts());
  REQUIRE_FALSE(data.ok());
  CHECK(data.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(data.status().message()),
             Catch::EndsWith(R"(no usable row: skipped 2 of 2 rows; first at line 1: field "text" must be a string)"));
  CHECK_THAT(std::string(data.status().message()), Catch::StartsWith(path));

  auto empty = LocalDataset::Parse("\n  \n", "empty.jsonl", SmallTokenizer(), Opts());
  CHECK(empty.status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("A missing file is NotFound", "[client][data]") {
  auto data = LocalDataset::Load("/nonexistent/seedling/data.jsonl", SmallTokenizer(), Opts());
  CHECK(data.status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("Invalid options are refused with a message naming the option", "[client][data]") {
  const auto refused = [](LocalDataOptions o, const char* what) {
    auto data = LocalDataset::Parse(TextRows(3), "mem.jsonl", SmallTokenizer(), o);
    CHECK(data.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(data.status().message()), Catch::Contains(what));
  };
  LocalDataOptions o = Opts();
  o.seq_len = 1;
  refused(o, "seq_len");
  o = Opts();
  o.batch_size = 0;
  refused(o, "batch_size");
  o = Opts();
  o.heldout_fraction = 1.0;
  refused(o, "heldout_fraction");
  o.heldout_fraction = std::nan("");
  refused(o, "heldout_fraction");
  o = Opts();
  o.eos_id = 400;
  refused(o, "eos_id");
}

TEST_CASE("The held-out split is deterministic and takes the documented fraction", "[client][data]") {
  LocalDataOptions o = Opts();
  const LocalDataset a = MustParse(TextRows(40), o);
  const LocalDataset b = MustParse(TextRows(40), o);
  CHECK(a.heldout().size() == 4);  // round(0.1 × 40)
  CHECK(a.train().size() == 36);
  CHECK(HeldoutLines(a) == HeldoutLines(b));
  o.seed = 1;
  CHECK(HeldoutLines(MustParse(TextRows(40), o)) != HeldoutLines(a));

  o = Opts();
  CHECK(MustParse(TextRows(1), o).heldout().empty());      // one row: all of it trains
  CHECK(MustParse(TextRows(2), o).heldout().size() == 1);  // at least one once there are two
  CHECK(MustParse(TextRows(3), o).heldout().size() == 1);
  o.heldout_fraction = 0.25;
  CHECK(MustParse(TextRows(10), o).heldout().size() == 3);  // round(2.5) = 3
  o.heldout_fraction = 0.9;
  CHECK(MustParse(TextRows(2), o).train().size() == 1);  // training is never empty
  o.heldout_fraction = 0;
  CHECK(MustParse(TextRows(10), o).heldout().empty());
}

TEST_CASE("The held-out split does not depend on the order of rows in the file", "[client][data]") {
  std::vector<std::string> rows;
  for (int i = 0; i < 30; ++i) rows.push_back(StrCat(R"({"text": "row )", i, R"( the dog sat"})"));
  std::string forward, backward;
  for (const std::string& r : rows) forward += r + "\n";
  for (auto it = rows.rbegin(); it != rows.rend(); ++it) backward += *it + "\r\n";  // and CRLF line ends
  const LocalDataset a = MustParse(forward, Opts());
  const LocalDataset b = MustParse(backward, Opts());
  REQUIRE(a.heldout().size() == 3);
  std::set<std::vector<int32_t>> held_a, held_b;
  for (const LocalExample& ex : a.heldout()) held_a.insert(ex.example.tokens);
  for (const LocalExample& ex : b.heldout()) held_b.insert(ex.example.tokens);
  CHECK(held_a == held_b);
  // Both halves stay in file order.
  for (size_t i = 1; i < b.train().size(); ++i) CHECK(b.train()[i - 1].line < b.train()[i].line);
}

TEST_CASE("Split and epoch order match the recorded cross-machine values", "[client][data]") {
  // Recorded once; a change here breaks resuming and comparing held-out losses between app
  // versions.
  LocalDataOptions o = Opts();
  o.seed = 42;
  const LocalDataset data = MustParse(TextRows(20), o);
  CHECK(HeldoutLines(data) == std::set<int64_t>{19, 20});
  const EpochPlan plan(data, 3);
  CHECK(std::vector<uint32_t>(plan.order().begin(), plan.order().end()) ==
        std::vector<uint32_t>{12, 1, 8, 7, 6, 0, 3, 10, 9, 2, 5, 16, 4, 17, 13, 11, 14, 15});
}

TEST_CASE("Examples are truncated to seq_len keeping the start", "[client][data]") {
  LocalDataOptions o = Opts();
  o.seq_len = 4;
  o.heldout_fraction = 0;
  const std::string row = R"({"text": "the cat sat on the mat"})";
  const LocalDataset data = MustParse(row + "\n", o);
  const Example full = Tokenized(row);
  REQUIRE(full.tokens.size() > 4);
  CHECK(data.train()[0].example.tokens == std::vector<int32_t>(full.tokens.begin(), full.tokens.begin() + 4));
  CHECK(data.train()[0].example.labels.size() == 4);
  CHECK(data.stats().truncated == 1);
}

TEST_CASE("Packed blocks are seq_len long and concatenate to the shuffled examples", "[client][data]") {
  LocalDataOptions o = Opts();
  o.seq_len = 23;
  o.batch_size = 1;
  std::string jsonl = TextRows(12);
  jsonl += R"({"instruction": "name an animal", "output": "the cat"})"
           "\n";
  const LocalDataset data = MustParse(jsonl, o);
  REQUIRE(data.stats().truncated == 0);  // so blocks really straddle examples
  for (uint64_t epoch : {0u, 1u}) {
    const EpochPlan plan(data, epoch);
    std::vector<int32_t> want_tokens, want_labels;
    for (uint32_t i : plan.order()) {
      const Example& ex = data.train()[i].example;
      want_tokens.insert(want_tokens.end(), ex.tokens.begin(), ex.tokens.end());
      want_labels.insert(want_labels.end(), ex.labels.begin(), ex.labels.end());
    }
    REQUIRE(plan.num_items() == (data.train_tokens() + 22) / 23);
    REQUIRE(data.train_tokens() % 23 != 0);  // so the last block is a partial one
    std::vector<int32_t> got_tokens, got_labels;
    for (int64_t b = 0; b < plan.num_items(); ++b) {
      const Example block = plan.Item(b);
      const size_t want_len = b + 1 < plan.num_items() ? 23 : static_cast<size_t>(data.train_tokens() % 23);
      CHECK(block.tokens.size() == want_len);
      CHECK(block.labels.size() == want_len);
      got_tokens.insert(got_tokens.end(), block.tokens.begin(), block.tokens.end());
      got_labels.insert(got_labels.end(), block.labels.begin(), block.labels.end());
    }
    CHECK(got_tokens == want_tokens);
    CHECK(got_labels == want_labels);
  }
}

TEST_CASE("The batch iterator serves the packed blocks of each epoch in order", "[client][data]") {
  LocalDataOptions o = Opts();
  o.seq_len = 16;
  const LocalDataset data = MustParse(TextRows(10), o);
  BatchIterator it(data);
  for (uint64_t epoch : {0u, 1u}) {
    const EpochPlan plan(data, epoch);
    for (int64_t b = 0; b < plan.num_items(); ++b) {
      const LocalBatch batch = it.Next();
      CHECK(batch.epoch == epoch);
      CHECK(batch.offset == static_cast<uint64_t>(b));
      const Example block = plan.Item(b);
      CHECK(Flatten(batch.batch.tokens) == std::vector<int64_t>(block.tokens.begin(), block.tokens.end()));
      CHECK(Flatten(batch.batch.labels) == std::vector<int64_t>(block.labels.begin(), block.labels.end()));
      CHECK(batch.scored_tokens == block.ScoredTokens());
    }
  }
}

TEST_CASE("Held-out examples are never packed", "[client][data]") {
  LocalDataOptions o = Opts();
  o.seq_len = 64;
  const std::string jsonl = TextRows(20);
  const LocalDataset data = MustParse(jsonl, o);
  REQUIRE(data.heldout().size() == 2);
  for (const LocalExample& ex : data.heldout()) {
    const std::string row = StrCat(R"({"text": "row )", ex.line - 1, R"(: the cat sat on the mat"})");
    CHECK(ex.example.tokens == Tokenized(row).tokens);
  }
}

TEST_CASE("Epoch order is deterministic per seed and epoch and changes across epochs", "[client][data]") {
  LocalDataOptions o = Opts();
  const LocalDataset data = MustParse(TextRows(50), o);
  const auto order = [&](const LocalDataset& d, uint64_t epoch) {
    const EpochPlan plan(d, epoch);
    return std::vector<uint32_t>(plan.order().begin(), plan.order().end());
  };
  const std::vector<uint32_t> e0 = order(data, 0);
  CHECK(order(data, 0) == e0);
  CHECK(order(data, 1) != e0);
  CHECK(order(data, 2) != order(data, 1));
  std::vector<uint32_t> sorted = e0;
  std::sort(sorted.begin(), sorted.end());
  for (uint32_t i = 0; i < sorted.size(); ++i) CHECK(sorted[i] == i);  // a permutation
  // Seeds s and s + 1 do not share an epoch's order (a plain seed + epoch would).
  o.seed = 1;
  o.heldout_fraction = 0;
  LocalDataOptions o0 = Opts();
  o0.heldout_fraction = 0;
  CHECK(order(MustParse(TextRows(50), o), 0) != order(MustParse(TextRows(50), o0), 1));
}

TEST_CASE("Unpacked batches never span epochs and serve every example once per epoch", "[client][data]") {
  LocalDataOptions o = Opts();
  o.pack = false;
  o.batch_size = 4;
  o.heldout_fraction = 0;
  const LocalDataset data = MustParse(TextRows(10), o);
  BatchIterator it(data);
  std::vector<int64_t> sizes;
  std::multiset<std::vector<int64_t>> seen;
  for (int i = 0; i < 3; ++i) {
    const LocalBatch b = it.Next();
    CHECK(b.epoch == 0);
    sizes.push_back(b.items);
    for (int64_t r = 0; r < b.items; ++r) {
      std::vector<int64_t> row = Flatten(b.batch.tokens[r]);
      while (row.size() > 1 && row.back() == 0 && Flatten(b.batch.labels[r])[row.size() - 1] == model::kIgnoreIndex) {
        row.pop_back();  // right padding
      }
      seen.insert(row);
    }
  }
  CHECK(sizes == std::vector<int64_t>{4, 4, 2});
  CHECK(it.position().epoch == 1);
  CHECK(it.position().offset == 0);
  std::multiset<std::vector<int64_t>> all;
  for (const LocalExample& ex : data.train())
    all.insert(std::vector<int64_t>(ex.example.tokens.begin(), ex.example.tokens.end()));
  CHECK(seen == all);
  CHECK(it.Next().epoch == 1);
}

TEST_CASE("An iterator restored from a saved position yields the same next batches", "[client][data]") {
  LocalDataOptions o = Opts();
  o.seq_len = 16;
  o.batch_size = 3;
  const LocalDataset data = MustParse(TextRows(25), o);
  REQUIRE(data.items_per_epoch() % 3 != 0);  // epoch ends with a short batch
  BatchIterator original(data);
  for (int i = 0; i < 5; ++i) original.Next();
  const IteratorPosition saved = original.position();

  BatchIterator resumed(data);  // a fresh process: only the saved integers survive
  REQUIRE(resumed.Restore(saved).ok());
  CHECK(resumed.position() == saved);
  bool crossed_epoch = false;
  for (int64_t i = 0; i < 3 * data.items_per_epoch(); ++i) {
    const LocalBatch want = original.Next();
    const LocalBatch got = resumed.Next();
    CHECK(got.epoch == want.epoch);
    CHECK(got.offset == want.offset);
    CHECK(got.scored_tokens == want.scored_tokens);
    CHECK(got.batch.tokens.equal(want.batch.tokens));
    CHECK(got.batch.labels.equal(want.batch.labels));
    crossed_epoch |= want.epoch > saved.epoch;
  }
  CHECK(crossed_epoch);
}

TEST_CASE("A position saved from other data or options is refused", "[client][data]") {
  LocalDataOptions o = Opts();
  o.seq_len = 16;
  const LocalDataset data = MustParse(TextRows(25), o);
  BatchIterator it(data);
  it.Next();
  const IteratorPosition saved = it.position();

  const LocalDataset more = MustParse(TextRows(26), o);  // the user collected one more row
  BatchIterator other(more);
  const absl::Status s = other.Restore(saved);
  CHECK(s.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(s.message()), Catch::Contains("fingerprint"));
  CHECK(other.position().offset == 0);  // unchanged

  o.seed = 7;
  CHECK_FALSE(BatchIterator(MustParse(TextRows(25), o)).Restore(saved).ok());

  IteratorPosition past_end = saved;
  past_end.offset = static_cast<uint64_t>(data.items_per_epoch());
  CHECK(BatchIterator(data).Restore(past_end).code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Dolly rows are read as instruction rows with context as input", "[client][data]") {
  LocalDataOptions o = Opts();
  o.heldout_fraction = 0;
  const LocalDataset data =
      MustParse(R"({"instruction": "name an animal", "context": "a pet", "response": "the cat", "category": "qa"})"
                "\n"
                R"({"instruction": "name an animal", "response": "the dog"})"
                "\n",
                o);
  REQUIRE(data.train().size() == 2);
  const Example want0 = Tokenized(R"({"instruction": "name an animal", "input": "a pet", "output": "the cat"})");
  const Example want1 = Tokenized(R"({"instruction": "name an animal", "output": "the dog"})");
  CHECK(data.train()[0].example.tokens == want0.tokens);
  CHECK(data.train()[0].example.labels == want0.labels);
  CHECK(data.train()[1].example.tokens == want1.tokens);
  CHECK(data.train()[1].example.labels == want1.labels);
}

TEST_CASE("Topic and user are kept per example", "[client][data]") {
  LocalDataOptions o = Opts();
  o.heldout_fraction = 0;
  const LocalDataset data = MustParse(R"({"text": "the cat", "topic": "pets", "user": "ana"})"
                                      "\n"
                                      R"({"instruction": "a", "output": "the dog", "topic": "dogs", "user": 42})"
                                      "\n"
                                      R"({"text": "the mat", "topic": ["not", "a", "string"]})"
                                      "\n",
                                      o);
  REQUIRE(data.train().size() == 3);
  CHECK(data.train()[0].topic == "pets");
  CHECK(data.train()[0].user == "ana");
  CHECK(data.train()[1].topic == "dogs");
  CHECK(data.train()[1].user == "42");
  CHECK(data.train()[2].topic.empty());
  CHECK(data.train()[2].user.empty());
  CHECK(data.train()[2].line == 3);
}

TEST_CASE("A row longer than max_row_bytes is skipped and counted, never held whole", "[client][data]") {
  // A 40 MB row used to be read, parsed and tokenized whole: 1.4 GB for a device with a 400M budget.
  std::string huge = R"({"text": ")";
  huge.append(3 << 20, 'a');
  huge += "\"}";
  const std::string path = WriteTemp("long", StrCat(huge, "\n", TextRows(3), huge));  // first and last rows
  LocalDataOptions o = Opts();
  o.max_row_bytes = 64 << 10;
  auto data = LocalDataset::Load(path, SmallTokenizer(), o);
  REQUIRE(data.ok());
  CHECK(data->stats().rows == 5);
  CHECK(data->stats().skipped == 2);
  CHECK(data->stats().too_long == 2);
  CHECK(data->stats().first_bad_line == 1);
  CHECK(data->stats().first_error == StrCat("row of ", huge.size(), " bytes is longer than max_row_bytes (65536)"));
  CHECK(data->train().size() + data->heldout().size() == 3);
  // The same from memory, and the bound is validated.
  auto parsed = LocalDataset::Parse(StrCat(huge, "\n", TextRows(3)), "mem", SmallTokenizer(), o);
  REQUIRE(parsed.ok());
  CHECK(parsed->stats().too_long == 1);
  o.max_row_bytes = 10;
  CHECK_THAT(std::string(LocalDataset::Load(path, SmallTokenizer(), o).status().message()),
             Catch::Contains("max_row_bytes must be in [1024, "));
  std::filesystem::remove(path);
}

TEST_CASE("Streamed and in-memory loading agree line for line", "[client][data]") {
  // Lines across the reader's 64 KiB buffer, a BOM, CRLF, blank lines and no final newline.
  std::string rows = "\xEF\xBB\xBF" + TextRows(2) + "\r\n\n";
  std::string pad(70000, 'b');
  rows += StrCat(R"({"text": ")", pad, R"("})", "\r\n", TextRows(4), R"({"text": "last row"})");
  const std::string path = WriteTemp("stream", rows);
  auto streamed = LocalDataset::Load(path, SmallTokenizer(), Opts());
  auto in_memory = LocalDataset::Parse(rows, path, SmallTokenizer(), Opts());
  REQUIRE(streamed.ok());
  REQUIRE(in_memory.ok());
  CHECK(streamed->stats().rows == 8);
  CHECK(streamed->stats().skipped == 0);
  CHECK(streamed->fingerprint() == in_memory->fingerprint());
  CHECK(streamed->Summary() == in_memory->Summary());
  std::filesystem::remove(path);
}

TEST_CASE("The data footprint bounds what loading holds and what tokenizing a row takes", "[client][data]") {
  // The worst row measured: one token per two bytes.
  std::string row = R"({"text": ")";
  for (int i = 0; i < 100000; ++i) row += "a ";
  row += "\"}";
  const std::string path = WriteTemp("footprint", StrCat(row, "\n", TextRows(50), "\n\n"));
  LocalDataOptions o = Opts();
  o.seq_len = 64;
  auto f = ScanDataFootprint(path, o);
  REQUIRE(f.ok());
  CHECK(f->rows == 51);
  CHECK(f->longest_row_bytes == static_cast<int64_t>(row.size()));
  CHECK(f->transient_bytes == f->longest_row_bytes * kRowTokenizeBytesPerByte);
  CHECK(f->held_bytes >= 51 * 64 * 2 * 4);  // the one long row at seq_len, the short ones by their bytes
  CHECK(f->held_bytes <= 51 * (64 * 8 + static_cast<int64_t>(sizeof(LocalExample)) + 16));

  // The transient bound holds where RSS can be measured: the peak while loading, over the row's size.
  if (ResetPeakRss()) {
    const int64_t before = CurrentRssBytes();
    auto data = LocalDataset::Load(path, SmallTokenizer(), o);
    REQUIRE(data.ok());
    const int64_t grew = PeakRssBytes() - before;
    INFO("peak growth " << grew << " bytes for a row of " << row.size());
    CHECK(grew <= f->total_bytes());
  } else {
    WARN("peak RSS cannot be reset here: the measured bound was not rechecked");
  }
  std::filesystem::remove(path);
}

TEST_CASE("The summary names rows, skipped, train blocks, held-out examples and tokens", "[client][data]") {
  LocalDataOptions o = Opts();
  o.seq_len = 16;
  const LocalDataset data = MustParse(StrCat(TextRows(20), "oops\n"), o);
  const std::string s = data.Summary();
  INFO(s);
  CHECK_THAT(s, Catch::StartsWith("mem.jsonl: 21 rows (1 skipped, first at line 21: not valid JSON"));
  CHECK_THAT(s, Catch::Contains(StrCat("train 18 examples, ", data.train_tokens(), " tokens, ", data.items_per_epoch(),
                                       " blocks of 16")));
  CHECK_THAT(s, Catch::EndsWith(StrCat("held out 2 examples, ", data.heldout_tokens(), " tokens")));
}

TEST_CASE("The bundled topic-labelled instructions load whole, with a topic on every row", "[client][data]") {
  const std::string path = StrCat(SEEDLING_SOURCE_DIR, "/data/sample/instructions.jsonl");
  auto data = LocalDataset::Load(path, SmallTokenizer(), Opts());
  INFO(data.status().ToString());
  REQUIRE(data.ok());
  INFO(data->Summary());
  CHECK(data->stats().rows == 600);
  CHECK(data->stats().skipped == 0);
  CHECK(data->heldout().size() == 60);
  std::set<std::string> topics;
  for (const LocalExample& ex : data->train()) topics.insert(ex.topic);
  CHECK(topics.size() == 6);
  CHECK(topics.count("") == 0);
}

}  // namespace
}  // namespace seedling::client
