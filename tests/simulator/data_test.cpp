#include "simulator/data.h"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "base/file.h"
#include "base/strings.h"

namespace seedling::simulator {
namespace {

std::string TempDir() {
  const std::string dir =
      std::filesystem::temp_directory_path() / ("seedling_sim_data_test_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  return dir;
}

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

// `n` text rows; row i has label "l<i % labels>" (none when labels == 0) and user "u<i % users>"
// (none when users == 0).
std::vector<DataRow> MakeRows(int n, int labels, int users) {
  std::vector<DataRow> rows;
  for (int i = 0; i < n; ++i) {
    DataRow r;
    r.json = StrCat("{\"text\": \"row ", i, "\"}");
    if (labels > 0) r.label = StrCat("l", i % labels);
    if (users > 0) r.user = StrCat("u", i % users);
    rows.push_back(std::move(r));
  }
  return rows;
}

// Every row index in [0, n) appears exactly once over all devices, and each device is ascending.
void CheckExactCover(const Partition& p, size_t n) {
  std::vector<int> seen(n, 0);
  for (const auto& d : p.device_rows) {
    CHECK(std::is_sorted(d.begin(), d.end()));
    for (const uint32_t i : d) {
      REQUIRE(i < n);
      ++seen[i];
    }
  }
  CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
}

Partition MustPartition(const std::vector<DataRow>& rows, int64_t devices, const PartitionOptions& o) {
  auto p = PartitionRows(rows, devices, o);
  INFO(p.status().ToString());
  REQUIRE(p.ok());
  return *std::move(p);
}

TEST_CASE("ReadRows skips non-object lines, counts them and names the first without quoting it", "[simulator][data]") {
  const std::string path = JoinPath(TempDir(), "bad.jsonl");
  {
    std::ofstream f(path, std::ios::binary);
    f << "\xEF\xBB\xBF{\"text\": \"fine\", \"topic\": 7, \"user\": \"alice\"}\r\n"      // line 1
      << "\n"                                                                           // 2: blank
      << "{\"text\": \"secret words of the user\n"                                      // 3: bad JSON
      << "[\"secret array\"]\n"                                                         // 4: not an object
      << "{\"instruction\": \"a\", \"output\": \"b\", \"user\": 42, \"topic\": 1.5}\n"  // 5
      << "   \n";                                                                       // 6: blank
  }
  auto got = ReadRows(path);
  REQUIRE(got.ok());
  REQUIRE(got->rows.size() == 2);
  CHECK(got->skipped == 2);
  CHECK(got->message.find("skipped 2 of 4 rows") != std::string::npos);
  CHECK(got->message.find("line 3") != std::string::npos);
  CHECK(got->message.find("secret") == std::string::npos);
  CHECK(got->rows[0].json == "{\"text\": \"fine\", \"topic\": 7, \"user\": \"alice\"}");
  CHECK(got->rows[0].label == "7");
  CHECK(got->rows[0].user == "alice");
  CHECK(got->rows[1].user == "42");
  CHECK(got->rows[1].label.empty());  // a float is not a label

  auto by_user = ReadRows(path, "user");
  REQUIRE(by_user.ok());
  CHECK(by_user->rows[1].label == "42");
  std::filesystem::remove(path);
}

TEST_CASE("ReadRows fails on a missing file and on a file without object rows", "[simulator][data]") {
  const std::string dir = TempDir();
  CHECK(ReadRows(JoinPath(dir, "missing.jsonl")).status().code() == absl::StatusCode::kNotFound);
  const std::string path = JoinPath(dir, "none.jsonl");
  REQUIRE(WriteFileAtomic(path, "1\n\"x\"\nnot json\n").ok());
  const auto got = ReadRows(path);
  REQUIRE(got.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(Msg(got.status()).find("line 1") != std::string::npos);
  std::filesystem::remove(path);
}

TEST_CASE("IID partition is balanced and assigns every row exactly once", "[simulator][data]") {
  const auto rows = MakeRows(1003, 5, 0);
  const Partition p = MustPartition(rows, 10, {.kind = PartitionKind::kIid, .seed = 3});
  REQUIRE(p.device_rows.size() == 10);
  CheckExactCover(p, rows.size());
  CHECK(p.stats.max_rows - p.stats.min_rows <= 1);
  CHECK(p.stats.rows == 1003);
  CHECK(p.stats.devices == 10);
  CHECK(p.stats.mean_rows == Approx(100.3));
  CHECK(p.stats.labels == 5);
  CHECK(p.stats.mean_label_tv_distance < 0.1);
}

TEST_CASE("IID partition is deterministic in the seed and changes with it", "[simulator][data]") {
  const auto rows = MakeRows(500, 0, 0);
  const auto a = MustPartition(rows, 7, {.seed = 11});
  const auto b = MustPartition(rows, 7, {.seed = 11});
  const auto c = MustPartition(rows, 7, {.seed = 12});
  CHECK(a.device_rows == b.device_rows);
  CHECK(a.device_rows != c.device_rows);
  // Not simply contiguous slices of the input.
  CHECK(a.device_rows[0].back() - a.device_rows[0].front() > 100);
}

TEST_CASE("ComputePartitionStats matches hand-computed figures", "[simulator][data]") {
  const auto rows = MakeRows(6, 3, 0);  // labels l0 l1 l2 l0 l1 l2
  // Device 0: l0 l0 (q = 1, 0, 0), device 1: l1 l2 l1 l2 (q = 0, .5, .5); p = 1/3 each.
  const PartitionStats s = ComputePartitionStats(rows, {{0, 3}, {1, 2, 4, 5}});
  CHECK(s.devices == 2);
  CHECK(s.rows == 6);
  CHECK(s.min_rows == 2);
  CHECK(s.median_rows == 2);
  CHECK(s.max_rows == 4);
  CHECK(s.labels == 3);
  CHECK(s.mean_labels_per_device == Approx(1.5));
  // TV_0 = ½ (2/3 + 1/3 + 1/3) = 2/3; TV_1 = ½ (1/3 + 1/6 + 1/6) = 1/3.
  CHECK(s.mean_label_tv_distance == Approx(0.5));
  CHECK(s.ToJson()["mean_label_tv_distance"].get<double>() == Approx(0.5));
  CHECK(s.ToString().find("2 devices, 6 rows") != std::string::npos);

  const PartitionStats unlabeled = ComputePartitionStats(MakeRows(4, 0, 0), {{0, 1}, {2, 3}});
  CHECK(unlabeled.labels == 0);
  CHECK(unlabeled.mean_label_tv_distance == 0);
}

TEST_CASE("Dirichlet with small alpha skews labels far more than large alpha or IID", "[simulator][data]") {
  const auto rows = MakeRows(4000, 10, 0);
  const auto skewed = MustPartition(rows, 40, {.kind = PartitionKind::kDirichlet, .alpha = 0.1});
  const auto mild = MustPartition(rows, 40, {.kind = PartitionKind::kDirichlet, .alpha = 100});
  const auto iid = MustPartition(rows, 40, {.kind = PartitionKind::kIid});
  CheckExactCover(skewed, rows.size());
  CheckExactCover(mild, rows.size());
  CHECK(skewed.stats.max_rows - skewed.stats.min_rows <= 1);
  INFO("alpha 0.1: " << skewed.stats.ToString());
  INFO("alpha 100: " << mild.stats.ToString());
  INFO("iid: " << iid.stats.ToString());
  CHECK(skewed.stats.mean_label_tv_distance > 0.5);
  CHECK(mild.stats.mean_label_tv_distance < 0.2);
  CHECK(skewed.stats.mean_label_tv_distance > 3 * mild.stats.mean_label_tv_distance);
  CHECK(skewed.stats.mean_label_tv_distance > 3 * iid.stats.mean_label_tv_distance);
  // Dir(0.1) over 10 labels still puts > 1% mass on ~4 labels, so ~5 labels show up in 100 rows.
  CHECK(skewed.stats.mean_labels_per_device < 0.6 * mild.stats.mean_labels_per_device);
  CHECK(mild.stats.mean_labels_per_device > 9);

  const auto again = MustPartition(rows, 40, {.kind = PartitionKind::kDirichlet, .alpha = 0.1});
  CHECK(again.device_rows == skewed.device_rows);
}

TEST_CASE("Power-law partition skews quantities and keeps min_rows on every device", "[simulator][data]") {
  const auto rows = MakeRows(5000, 4, 0);
  const auto p =
      MustPartition(rows, 100, {.kind = PartitionKind::kPowerLaw, .exponent = 1.2, .min_rows = 5, .seed = 2});
  REQUIRE(p.device_rows.size() == 100);
  CheckExactCover(p, rows.size());
  INFO(p.stats.ToString());
  CHECK(p.stats.min_rows >= 5);
  CHECK(p.stats.max_rows >= 5 * p.stats.median_rows);
  // Label mixes stay close to IID (only quantities are skewed) on devices with many rows.
  const auto iid = MustPartition(rows, 100, {.kind = PartitionKind::kIid, .min_rows = 5});
  CHECK(iid.stats.max_rows - iid.stats.min_rows <= 1);

  // Exactly min_rows everywhere when that uses every row.
  const auto tight = MustPartition(MakeRows(300, 0, 0), 100, {.kind = PartitionKind::kPowerLaw, .min_rows = 3});
  CHECK(tight.stats.min_rows == 3);
  CHECK(tight.stats.max_rows == 3);
}

TEST_CASE("User partition groups rows by user, one device per user", "[simulator][data]") {
  const auto rows = MakeRows(50, 0, 7);
  const auto p = MustPartition(rows, 10, {.kind = PartitionKind::kUser});
  REQUIRE(p.device_rows.size() == 7);  // devices is a maximum
  CheckExactCover(p, rows.size());
  for (size_t d = 0; d < p.device_rows.size(); ++d) {
    for (const uint32_t i : p.device_rows[d]) CHECK(rows[i].user == rows[p.device_rows[d][0]].user);
  }
  // In order of each user's first row.
  CHECK(rows[p.device_rows[0][0]].user == "u0");
  CHECK(rows[p.device_rows[6][0]].user == "u6");
}

TEST_CASE("PartitionRows rejects each bad option with a message saying what is wrong", "[simulator][data]") {
  const auto labeled = MakeRows(100, 4, 0);
  const auto bad = [](const absl::StatusOr<Partition>& p, std::string_view needle) {
    INFO(p.status().ToString());
    REQUIRE(p.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(Msg(p.status()).find(needle) != std::string::npos);
  };
  bad(PartitionRows(labeled, 0, {}), "devices must be >= 1");
  bad(PartitionRows(labeled, -3, {}), "devices must be >= 1");
  bad(PartitionRows({}, 2, {}), "no rows");
  bad(PartitionRows(labeled, 101, {}), "101 devices");
  bad(PartitionRows(labeled, 30, {.min_rows = 4}), "min_rows 4");
  bad(PartitionRows(labeled, 30, {.kind = PartitionKind::kPowerLaw, .min_rows = 4}), "min_rows 4");
  bad(PartitionRows(labeled, 2, {.min_rows = -1}), "min_rows must be >= 0");
  bad(PartitionRows(labeled, 2, {.kind = PartitionKind::kDirichlet, .alpha = 0}), "alpha");
  bad(PartitionRows(labeled, 2, {.kind = PartitionKind::kDirichlet, .alpha = -1}), "alpha");
  bad(PartitionRows(labeled, 2, {.kind = PartitionKind::kDirichlet, .alpha = std::nan("")}), "alpha");
  bad(PartitionRows(labeled, 2, {.kind = PartitionKind::kPowerLaw, .exponent = 0}), "exponent");
  bad(PartitionRows(labeled, 2, {.kind = PartitionKind::kPowerLaw, .exponent = INFINITY}), "exponent");

  auto partly = MakeRows(100, 4, 0);
  for (int i = 0; i < 100; i += 10) partly[static_cast<size_t>(i)].label.clear();
  bad(PartitionRows(partly, 2, {.kind = PartitionKind::kDirichlet}), "10 of 100 rows lack it");
  bad(PartitionRows(MakeRows(100, 0, 0), 2, {.kind = PartitionKind::kDirichlet}), "100 of 100 rows lack it");
  bad(PartitionRows(labeled, 2, {.kind = PartitionKind::kUser}), "100 of 100 rows lack it");
  bad(PartitionRows(MakeRows(100, 0, 8), 5, {.kind = PartitionKind::kUser}), "8 distinct users");
  bad(PartitionRows(MakeRows(20, 0, 8), 8, {.kind = PartitionKind::kUser, .min_rows = 3}),
      "4 of 8 users have fewer than min_rows = 3");

  CHECK(ParsePartitionKind("iid").value() == PartitionKind::kIid);
  CHECK(ParsePartitionKind("dirichlet").value() == PartitionKind::kDirichlet);
  CHECK(ParsePartitionKind("power-law").value() == PartitionKind::kPowerLaw);
  CHECK(ParsePartitionKind("user").value() == PartitionKind::kUser);
  const auto unknown = ParsePartitionKind("zipf");
  REQUIRE(unknown.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(Msg(unknown.status()).find("\"zipf\"") != std::string::npos);
}

TEST_CASE("WriteRowsJsonl writes the selected rows and round-trips through ReadRows", "[simulator][data]") {
  const std::string dir = TempDir();
  const std::string path = JoinPath(dir, "device.jsonl");
  std::vector<DataRow> rows = {
      {R"({"text": "a b", "topic": "x", "user": "u1"})", "u1", "x"},
      {R"({"instruction": "i", "input": "", "output": "o", "topic": 3})", "", "3"},
      {R"({"instruction": "i", "context": "c", "response": "r", "user": 9})", "9", ""},
  };
  const std::vector<uint32_t> pick = {2, 0};
  REQUIRE(WriteRowsJsonl(path, rows, pick).ok());
  auto got = ReadRows(path);
  REQUIRE(got.ok());
  CHECK(got->skipped == 0);
  REQUIRE(got->rows.size() == 2);
  for (size_t j = 0; j < pick.size(); ++j) {
    CHECK(got->rows[j].json == rows[pick[j]].json);
    CHECK(got->rows[j].user == rows[pick[j]].user);
    CHECK(got->rows[j].label == rows[pick[j]].label);
  }
  const std::vector<uint32_t> out_of_range = {0, 3};
  const absl::Status s = WriteRowsJsonl(path, rows, out_of_range);
  CHECK(s.code() == absl::StatusCode::kInvalidArgument);
  CHECK(ReadRows(path)->rows.size() == 2);  // the old file is untouched
  std::filesystem::remove_all(dir);
}

TEST_CASE("The bundled sample instructions partition by topic with Dirichlet", "[simulator][data]") {
  auto got = ReadRows(std::string(SEEDLING_SOURCE_DIR) + "/data/sample/instructions.jsonl");
  REQUIRE(got.ok());
  CHECK(got->skipped == 0);
  REQUIRE(got->rows.size() >= 600);
  const auto p = MustPartition(got->rows, 20, {.kind = PartitionKind::kDirichlet, .alpha = 0.1, .seed = 1});
  CheckExactCover(p, got->rows.size());
  INFO(p.stats.ToString());
  CHECK(p.stats.labels == 6);
  CHECK(p.stats.mean_label_tv_distance > 0.4);
  CHECK(p.stats.max_rows - p.stats.min_rows <= 1);
}

// --- Synthetic corpus ----------------------------------------------------------------------------

std::string RowText(const nlohmann::json& row) {
  return row.contains("text") ? row["text"].get<std::string>() : row["output"].get<std::string>();
}

std::vector<std::string> Words(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string w; in >> w;) {
    while (!w.empty() && (w.back() == '.' || w.back() == ',' || w.back() == '?')) w.pop_back();
    if (!w.empty()) out.push_back(w);
  }
  return out;
}

using Histogram = std::map<std::string, double>;

Histogram WordHistogram(const FederatedCorpus& c, std::span<const uint32_t> indices) {
  Histogram h;
  double total = 0;
  for (const uint32_t i : indices) {
    for (const auto& w : Words(RowText(nlohmann::json::parse(c.rows[i].json)))) {
      h[w] += 1;
      total += 1;
    }
  }
  for (auto& [w, n] : h) n /= total;
  return h;
}

double Tv(const Histogram& a, const Histogram& b) {
  std::set<std::string> keys;
  for (const auto& [w, _] : a) keys.insert(w);
  for (const auto& [w, _] : b) keys.insert(w);
  double sum = 0;
  for (const auto& w : keys) {
    const auto ia = a.find(w), ib = b.find(w);
    sum += std::abs((ia == a.end() ? 0 : ia->second) - (ib == b.end() ? 0 : ib->second));
  }
  return 0.5 * sum;
}

TEST_CASE("The synthetic corpus is deterministic in its seed", "[simulator][data][synthetic]") {
  const SyntheticCorpusOptions o{.devices = 20, .heldout_devices = 3, .rows_per_device = 5, .seed = 4};
  const FederatedCorpus a = MakeSyntheticCorpus(o);
  const FederatedCorpus b = MakeSyntheticCorpus(o);
  REQUIRE(a.rows.size() == b.rows.size());
  for (size_t i = 0; i < a.rows.size(); ++i) CHECK(a.rows[i].json == b.rows[i].json);
  SyntheticCorpusOptions other = o;
  other.seed = 5;
  const FederatedCorpus c = MakeSyntheticCorpus(other);
  int same = 0;
  for (size_t i = 0; i < a.rows.size(); ++i) same += a.rows[i].json == c.rows[i].json;
  CHECK(same == 0);
  // A device's rows do not depend on how many devices there are.
  SyntheticCorpusOptions more = o;
  more.devices = 40;
  const FederatedCorpus d = MakeSyntheticCorpus(more);
  for (size_t i = 0; i < 20 * 5; ++i) CHECK(d.rows[i].json == a.rows[i].json);
}

TEST_CASE("The synthetic corpus has the requested counts and well-formed rows", "[simulator][data][synthetic]") {
  const SyntheticCorpusOptions o{.devices = 30, .heldout_devices = 5, .rows_per_device = 12, .seed = 1};
  const FederatedCorpus c = MakeSyntheticCorpus(o);
  REQUIRE(c.rows.size() == 35 * 12);
  REQUIRE(c.train.device_rows.size() == 30);
  REQUIRE(c.heldout.size() == 5);
  CHECK(c.train.stats.devices == 30);
  CHECK(c.train.stats.rows == 30 * 12);
  CHECK(c.train.stats.min_rows == 12);
  CHECK(c.train.stats.max_rows == 12);
  CHECK(c.train.stats.labels >= 2);

  const auto topics = SyntheticTopics();
  int64_t text_rows = 0, min_words = 1000, max_words = 0;
  std::set<std::string> train_users, heldout_users;
  std::set<uint32_t> all;
  const auto check_device = [&](std::span<const uint32_t> indices, std::set<std::string>& users) {
    REQUIRE(indices.size() == 12);
    std::set<std::string> device_users, device_topics;
    for (const uint32_t i : indices) {
      CHECK(all.insert(i).second);
      const auto row = nlohmann::json::parse(c.rows[i].json);
      REQUIRE(row.is_object());
      REQUIRE(row.contains("topic"));
      REQUIRE(row.contains("user"));
      CHECK((row.contains("text") || (row.contains("instruction") && row.contains("output"))));
      text_rows += row.contains("text");
      const auto n = static_cast<int64_t>(Words(RowText(row)).size());
      min_words = std::min(min_words, n);
      max_words = std::max(max_words, n);
      CHECK(row["user"].get<std::string>() == c.rows[i].user);
      CHECK(row["topic"].get<std::string>() == c.rows[i].label);
      CHECK(std::find(topics.begin(), topics.end(), c.rows[i].label) != topics.end());
      device_users.insert(c.rows[i].user);
      device_topics.insert(c.rows[i].label);
    }
    CHECK(device_users.size() == 1);
    CHECK(device_topics.size() == 1);
    users.insert(*device_users.begin());
  };
  for (const auto& d : c.train.device_rows) check_device(d, train_users);
  for (const auto& d : c.heldout) check_device(d, heldout_users);
  CHECK(all.size() == c.rows.size());
  CHECK(train_users.size() == 30);
  CHECK(heldout_users.size() == 5);
  for (const auto& u : heldout_users) CHECK(train_users.count(u) == 0);
  CHECK(train_users.count("device-0") == 1);
  CHECK(heldout_users.count("device-30") == 1);
  CHECK(text_rows > static_cast<int64_t>(c.rows.size()) * 3 / 4);
  CHECK(text_rows < static_cast<int64_t>(c.rows.size()));  // some instruction rows by default
  CHECK(min_words >= 20);
  CHECK(max_words <= 60);

  // A user split of the corpus recovers the devices.
  const auto by_user = MustPartition(c.rows, 35, {.kind = PartitionKind::kUser});
  CHECK(by_user.device_rows.size() == 35);
  CHECK(by_user.device_rows[3] == c.train.device_rows[3]);
}

TEST_CASE("Synthetic devices differ in word use: topic, then persona", "[simulator][data][synthetic]") {
  const FederatedCorpus c =
      MakeSyntheticCorpus({.devices = 40, .heldout_devices = 0, .rows_per_device = 200, .seed = 9});
  // Device 0, another device with its topic, and one with a different topic.
  const auto& rows = c.rows;
  const auto topic_of = [&](size_t d) { return rows[c.train.device_rows[d][0]].label; };
  size_t same = 0, other = 0;
  for (size_t d = 1; d < c.train.device_rows.size(); ++d) {
    if (same == 0 && topic_of(d) == topic_of(0)) same = d;
    if (other == 0 && topic_of(d) != topic_of(0)) other = d;
  }
  REQUIRE(same != 0);
  REQUIRE(other != 0);
  const auto& d0 = c.train.device_rows[0];
  const std::span<const uint32_t> first_half(d0.data(), 100), second_half(d0.data() + 100, 100);
  const double within = Tv(WordHistogram(c, first_half), WordHistogram(c, second_half));
  const double same_topic = Tv(WordHistogram(c, d0), WordHistogram(c, c.train.device_rows[same]));
  const double other_topic = Tv(WordHistogram(c, d0), WordHistogram(c, c.train.device_rows[other]));
  INFO("within device " << within << ", same topic " << same_topic << ", other topic " << other_topic);
  CHECK(within < 0.15);
  CHECK(same_topic > 2 * within);
  CHECK(other_topic > 0.4);
  CHECK(other_topic > same_topic);
}

}  // namespace
}  // namespace seedling::simulator
