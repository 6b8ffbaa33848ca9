// Robust aggregation (server/robust_strategy.h, server/internal/robust_aggregation.h): the rules against hand-made
// sets with known answers and against naive references written here for clarity, the wrapper's handling of bad
// updates, and the config rules that keep it where it can work.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "base/strings.h"
#include "comms/codec.h"
#include "server/config.h"
#include "server/internal/robust_aggregation.h"
#include "server/robust_strategy.h"
#include "server/strategy_stack.h"

namespace seedling::server {
namespace {

using internal::UpdateRows;

std::vector<std::span<const float>> Rows(const std::vector<std::vector<float>>& m) { return {m.begin(), m.end()}; }

// ---- Naive references: sort everything, look at every pair.

std::vector<float> NaiveMedian(const std::vector<std::vector<float>>& m) {
  std::vector<float> out(m[0].size());
  for (size_t j = 0; j < out.size(); ++j) {
    std::vector<double> c;
    for (const auto& row : m) c.push_back(row[j]);
    std::sort(c.begin(), c.end());
    const size_t n = c.size();
    out[j] = static_cast<float>(n % 2 == 1 ? c[n / 2] : (c[n / 2 - 1] + c[n / 2]) / 2);
  }
  return out;
}

std::vector<float> NaiveTrimmedMean(const std::vector<std::vector<float>>& m, size_t b) {
  std::vector<float> out(m[0].size());
  for (size_t j = 0; j < out.size(); ++j) {
    std::vector<double> c;
    for (const auto& row : m) c.push_back(row[j]);
    std::sort(c.begin(), c.end());
    double sum = 0;
    for (size_t i = b; i < c.size() - b; ++i) sum += c[i];
    out[j] = static_cast<float>(sum / static_cast<double>(c.size() - 2 * b));
  }
  return out;
}

std::vector<double> NaiveKrumScores(const std::vector<std::vector<float>>& m, int64_t f) {
  const size_t n = m.size();
  std::vector<double> scores;
  for (size_t i = 0; i < n; ++i) {
    std::vector<double> d;
    for (size_t k = 0; k < n; ++k) {
      if (k == i) continue;
      double s = 0;
      for (size_t j = 0; j < m[i].size(); ++j) s += (double(m[i][j]) - m[k][j]) * (double(m[i][j]) - m[k][j]);
      d.push_back(s);
    }
    std::sort(d.begin(), d.end());
    double score = 0;
    for (size_t k = 0; k < n - static_cast<size_t>(f) - 2; ++k) score += d[k];
    scores.push_back(score);
  }
  return scores;
}

// n honest updates around `centre` (spread 0.1) and `bad` hostile ones far away, shuffled by `rng`; returns the
// rows and which are hostile.
std::vector<std::vector<float>> Cluster(std::mt19937& rng, int honest, int bad, size_t p, std::vector<bool>* hostile) {
  std::normal_distribution<float> noise(0.0f, 0.1f);
  std::vector<std::vector<float>> rows;
  hostile->clear();
  for (int i = 0; i < honest + bad; ++i) {
    std::vector<float> r(p);
    const bool is_bad = i >= honest;
    for (size_t j = 0; j < p; ++j) r[j] = is_bad ? -20.0f + 5.0f * noise(rng) : 1.0f + noise(rng);
    rows.push_back(std::move(r));
    hostile->push_back(is_bad);
  }
  // A fixed shuffle so the hostile rows are not simply the last ones.
  std::vector<size_t> order(rows.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<std::vector<float>> shuffled;
  std::vector<bool> h;
  for (size_t i : order) {
    shuffled.push_back(rows[i]);
    h.push_back((*hostile)[i]);
  }
  *hostile = h;
  return shuffled;
}

TEST_CASE("Coordinate-wise median of odd and even counts gives the known answers", "[server][robust]") {
  // Odd: the middle value per coordinate, whatever the extremes.
  const std::vector<std::vector<float>> odd = {{1, -5, 0}, {100, 2, 0}, {3, 3, 7}, {-2, 1e6f, 7}, {2, 0, 7}};
  std::vector<float> out(3);
  internal::CoordinateMedian(Rows(odd), out);
  CHECK(out == std::vector<float>{2, 2, 7});
  // Even: the mean of the two middle values.
  const std::vector<std::vector<float>> even = {{1, 10}, {4, -10}, {2, 0}, {100, 1}};
  std::vector<float> out2(2);
  internal::CoordinateMedian(Rows(even), out2);
  CHECK(out2 == std::vector<float>{3, 0.5f});
  // One row: itself.
  const std::vector<std::vector<float>> one = {{4, -1}};
  internal::CoordinateMedian(Rows(one), out2);
  CHECK(out2 == std::vector<float>{4, -1});
}

TEST_CASE("Coordinate-wise median and trimmed mean equal the naive sort-everything references", "[server][robust]") {
  std::mt19937 rng(7);
  std::normal_distribution<float> d(0.0f, 3.0f);
  for (int n : {1, 2, 3, 4, 7, 10, 11}) {
    std::vector<std::vector<float>> m(static_cast<size_t>(n), std::vector<float>(17));
    for (auto& row : m)
      for (float& x : row) x = d(rng);
    std::vector<float> out(17);
    internal::CoordinateMedian(Rows(m), out);
    CHECK(out == NaiveMedian(m));
    for (int64_t b = 0; 2 * b < n; ++b) {
      INFO("n = " << n << ", b = " << b);
      internal::TrimmedMean(Rows(m), b, out);
      const std::vector<float> ref = NaiveTrimmedMean(m, static_cast<size_t>(b));
      for (size_t j = 0; j < out.size(); ++j) CHECK(out[j] == Approx(ref[j]).epsilon(1e-6).margin(1e-6));
    }
  }
}

TEST_CASE("Trimmed mean drops the extremes of each coordinate: known answers", "[server][robust]") {
  // Per coordinate {−100, 1, 2, 3, 1000}: trimming one at each end leaves the mean of 1, 2, 3.
  const std::vector<std::vector<float>> m = {{1000, 2}, {1, -100}, {-100, 3}, {3, 1000}, {2, 1}};
  std::vector<float> out(2);
  internal::TrimmedMean(Rows(m), 1, out);
  CHECK(out == std::vector<float>{2, 2});
  // No trimming is the mean.
  internal::TrimmedMean(Rows(m), 0, out);
  CHECK(out[0] == Approx((1000 + 1 - 100 + 3 + 2) / 5.0));
  // b = ⌈β·n⌉, at most ⌊(n − 1)/2⌋.
  CHECK(internal::TrimmedCount(10, 0.1) == 1);
  CHECK(internal::TrimmedCount(30, 0.1) == 3);
  CHECK(internal::TrimmedCount(11, 0.1) == 2);
  CHECK(internal::TrimmedCount(4, 0.1) == 1);
  CHECK(internal::TrimmedCount(2, 0.4) == 0);
  CHECK(internal::TrimmedCount(3, 0.49) == 1);
  CHECK(internal::TrimmedCount(10, 0.0) == 0);
}

TEST_CASE("Krum scores equal the naive all-pairs reference and multi-Krum keeps the honest cluster",
          "[server][robust]") {
  std::mt19937 rng(3);
  for (int bad : {1, 2, 3}) {
    const int honest = 2 * bad + 3 + 2;
    std::vector<bool> hostile;
    const std::vector<std::vector<float>> m = Cluster(rng, honest, bad, 9, &hostile);
    const std::vector<double> scores = internal::KrumScores(Rows(m), bad);
    const std::vector<double> ref = NaiveKrumScores(m, bad);
    REQUIRE(scores.size() == ref.size());
    for (size_t i = 0; i < ref.size(); ++i) CHECK(scores[i] == Approx(ref[i]).epsilon(1e-12));
    // Krum (m = 1): an honest row, the naive argmin.
    const std::vector<size_t> krum = internal::MultiKrumSelect(Rows(m), bad, 1);
    REQUIRE(krum.size() == 1);
    CHECK(krum[0] == static_cast<size_t>(std::min_element(ref.begin(), ref.end()) - ref.begin()));
    CHECK_FALSE(hostile[krum[0]]);
    // Multi-Krum with m = n − f: exactly the honest rows.
    const int64_t keep = honest + bad - bad;
    const std::vector<size_t> selected = internal::MultiKrumSelect(Rows(m), bad, keep);
    REQUIRE(static_cast<int64_t>(selected.size()) == keep);
    for (size_t i : selected) CHECK_FALSE(hostile[i]);
    // Selected in ascending score order.
    for (size_t k = 1; k < selected.size(); ++k) CHECK(scores[selected[k - 1]] <= scores[selected[k]]);
    std::vector<float> mean(9);
    internal::MeanOfRows(Rows(m), selected, mean);
    for (float x : mean) CHECK(x == Approx(1.0).margin(0.15));
  }
}

// ---- The wrapper, through the Strategy interface.

std::string Fp32(const std::vector<float>& v) {
  auto p = comms::EncodeDense(v, {.codec = v1::CODEC_FP32}, 0);
  REQUIRE(p.ok());
  return *p;
}

// A fedavg (η = 1) wrapped by the robust rule: the applied change is the robust aggregate itself.
std::unique_ptr<Strategy> Robust(const RobustOptions& robust, int64_t max_updates = 16, double max_norm = 0) {
  StrategyOptions o;
  o.name = "fedavg";
  auto inner = MakeStrategy(o);
  REQUIRE(inner.ok());
  auto s = MakeRobustStrategy(*std::move(inner), robust, max_norm, max_updates, 3);
  REQUIRE(s.ok());
  return *std::move(s);
}

// Runs one round from zero params over `updates` (fp32, num_examples = 1 + index) and returns the new params.
std::vector<float> RoundOf(Strategy& s, const std::vector<std::vector<float>>& updates,
                           std::map<std::string, double>* metrics = nullptr) {
  GlobalModel g;
  g.params.assign(3, 0.0f);
  REQUIRE(s.BeginRound(g).ok());
  for (size_t i = 0; i < updates.size(); ++i) {
    const std::string payload = Fp32(updates[i]);
    REQUIRE(s.Accumulate({StrCat("d", i), 1 + i, payload}).ok());
  }
  auto outcome = s.FinishRound(g);
  REQUIRE(outcome.ok());
  if (metrics != nullptr) *metrics = outcome->metrics;
  return g.params;
}

const std::vector<std::vector<float>> kFiveWithOutlier = {
    {1, 2, 3}, {1.2f, 2.2f, 2.8f}, {0.8f, 1.9f, 3.1f}, {1.1f, 2.1f, 3.0f}, {-100, 500, 40}};

TEST_CASE("The robust wrapper applies the median, trimmed mean or multi-Krum of the round to the model",
          "[server][robust]") {
  std::vector<float> expected(3);
  SECTION("median") {
    std::map<std::string, double> metrics;
    const std::vector<float> got = RoundOf(*Robust({.rule = "median"}), kFiveWithOutlier, &metrics);
    CHECK(got == NaiveMedian(kFiveWithOutlier));
    CHECK(metrics["clients"] == 5);
    CHECK(metrics["examples"] == 15);  // counted, not used as weights
  }
  SECTION("trimmed-mean") {
    std::map<std::string, double> metrics;
    const std::vector<float> got =
        RoundOf(*Robust({.rule = "trimmed-mean", .trim_fraction = 0.2}), kFiveWithOutlier, &metrics);
    const std::vector<float> ref = NaiveTrimmedMean(kFiveWithOutlier, 1);
    for (size_t j = 0; j < 3; ++j) CHECK(got[j] == Approx(ref[j]).epsilon(1e-6));
    CHECK(metrics["robust_trimmed"] == 1);
  }
  SECTION("krum: the mean of the four close updates, the outlier left out") {
    std::map<std::string, double> metrics;
    const std::vector<float> got = RoundOf(*Robust({.rule = "krum", .krum_f = 1}), kFiveWithOutlier, &metrics);
    const std::vector<std::vector<float>> honest(kFiveWithOutlier.begin(), kFiveWithOutlier.begin() + 4);
    for (size_t j = 0; j < 3; ++j) {
      double mean = 0;
      for (const auto& r : honest) mean += r[j] / 4.0;
      CHECK(got[j] == Approx(mean).epsilon(1e-6));
    }
    CHECK(metrics["robust_selected"] == 4);
  }
  SECTION("none is fedavg itself: example-weighted, the outlier dominates") {
    StrategyOptions o;
    auto inner = MakeStrategy(o);
    REQUIRE(inner.ok());
    auto s = MakeRobustStrategy(*std::move(inner), {.rule = "none"}, 0, 16, 3);
    REQUIRE(s.ok());
    CHECK((*s)->name() == "fedavg");
    const std::vector<float> got = RoundOf(**s, kFiveWithOutlier);
    CHECK(got[0] < -30);  // the outlier has weight 5 of 15
  }
}

TEST_CASE("Norm bounding scales each update to the bound, fixed or the median of the round's norms",
          "[server][robust]") {
  // Norms 1, 2 and 10 along different axes.
  const std::vector<std::vector<float>> updates = {{1, 0, 0}, {0, 2, 0}, {0, 0, 10}};
  SECTION("fixed bound 2: streams") {
    std::map<std::string, double> metrics;
    const std::vector<float> got = RoundOf(*Robust({.rule = "norm", .norm_bound = 2}), updates, &metrics);
    CHECK(got[0] == Approx(1 / 3.0));
    CHECK(got[1] == Approx(2 / 3.0));
    CHECK(got[2] == Approx(2 / 3.0));
    CHECK(metrics["robust_bounded"] == 1);
    CHECK(metrics["robust_norm_bound"] == 2);
    CHECK(metrics["mean_client_norm"] == Approx(13 / 3.0));
  }
  SECTION("bound 0: the median norm, 2") {
    std::map<std::string, double> metrics;
    const std::vector<float> got = RoundOf(*Robust({.rule = "norm"}), updates, &metrics);
    CHECK(got[0] == Approx(1 / 3.0));
    CHECK(got[1] == Approx(2 / 3.0));
    CHECK(got[2] == Approx(2 / 3.0));
    CHECK(metrics["robust_norm_bound"] == Approx(2));
  }
}

TEST_CASE("Bad updates are refused with the reason and leave the robust aggregate unchanged", "[server][robust]") {
  for (const char* rule : {"median", "trimmed-mean", "krum", "norm"}) {
    INFO(rule);
    RobustOptions options{.rule = rule, .norm_bound = std::string(rule) == "norm" ? 50.0 : 0.0};
    auto s = Robust(options, 16, /*max_norm=*/1000);
    GlobalModel g;
    g.params.assign(3, 0.0f);
    REQUIRE(s->BeginRound(g).ok());
    for (size_t i = 0; i < kFiveWithOutlier.size(); ++i) {
      const std::string payload = Fp32(kFiveWithOutlier[i]);
      REQUIRE(s->Accumulate({StrCat("d", i), 1, payload}).ok());
      // Interleave the bad ones.
      std::string nan = Fp32({1, 2, 3});
      const float q = std::numeric_limits<float>::quiet_NaN();
      std::memcpy(nan.data() + comms::kPayloadHeaderBytes + 4, &q, 4);
      const std::string wrong_length = Fp32({1, 2});
      const std::string huge = Fp32({2000, 0, 0});
      const std::string seeds = comms::EncodeSeedIndexScalars(std::vector<comms::SeedIndexScalar>{{1, 0.5f}});
      auto refused = [&](const UpdateView& bad, const std::string& reason) {
        const absl::Status st = s->Accumulate(bad);
        CHECK(st.code() == absl::StatusCode::kInvalidArgument);
        CHECK_THAT(std::string(st.message()), Catch::Contains(reason));
      };
      refused({"nan", 1, nan}, "not finite");
      refused({"short", 1, wrong_length}, "2 elements");
      refused({"huge", 1, huge}, "max_update_norm");
      refused({"seeds", 1, seeds}, "dense codecs");
      refused({"none", 0, payload}, "num_examples");
      refused({"garbage", 1, "xyz"}, "device 'garbage'");
      s->RecordFailure("nan", "refused");
    }
    CHECK(s->accumulated() == 5);
    auto outcome = s->FinishRound(g);
    REQUIRE(outcome.ok());
    CHECK(outcome->metrics["failures"] == 5);
    // The same as a round of the good updates alone.
    const std::vector<float> clean = RoundOf(*Robust(options, 16, 1000), kFiveWithOutlier);
    CHECK(g.params == clean);
  }
}

TEST_CASE("The robust wrapper refuses sums, rounds over its cap and krum rounds too small", "[server][robust]") {
  auto s = Robust({.rule = "median"}, /*max_updates=*/2);
  GlobalModel g;
  g.params.assign(3, 0.0f);
  REQUIRE(s->BeginRound(g).ok());
  const std::vector<float> sum = {1, 1, 1};
  CHECK(s->AccumulateSum({.weighted_sum = sum, .total_weight = 1, .clients = 1}).code() ==
        absl::StatusCode::kUnimplemented);
  REQUIRE(s->Accumulate({"a", 1, Fp32({1, 2, 3})}).ok());
  REQUIRE(s->Accumulate({"b", 1, Fp32({1, 2, 3})}).ok());
  CHECK(s->Accumulate({"c", 1, Fp32({1, 2, 3})}).code() == absl::StatusCode::kResourceExhausted);
  CHECK(s->accumulated() == 2);

  // Krum with f = 1 needs 5 updates: 4 fail the round and apply nothing.
  auto krum = Robust({.rule = "krum", .krum_f = 1});
  REQUIRE(krum->BeginRound(g).ok());
  for (int i = 0; i < 4; ++i) REQUIRE(krum->Accumulate({StrCat("d", i), 1, Fp32({1, 2, 3})}).ok());
  auto outcome = krum->FinishRound(g);
  CHECK(outcome.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(outcome.status().message()), Catch::Contains("at least 5 updates"));
  CHECK(g.params == std::vector<float>{0, 0, 0});
}

TEST_CASE("MakeRobustStrategy refuses non-fedavg strategies, bad values and rounds that would hold too much",
          "[server][robust]") {
  auto make = [](const std::string& name, const RobustOptions& r, int64_t max_updates, int64_t params) {
    StrategyOptions o;
    o.name = name;
    auto inner = MakeStrategy(o);
    REQUIRE(inner.ok());
    return MakeRobustStrategy(*std::move(inner), r, 0, max_updates, params);
  };
  auto refused = [](const absl::StatusOr<std::unique_ptr<Strategy>>& s, const std::string& what) {
    REQUIRE_FALSE(s.ok());
    CHECK(s.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(s.status().message()), Catch::Contains(what));
  };
  refused(make("kseed", {.rule = "median"}, 10, 100), "fedavg family");
  refused(make("fwdgrad", {.rule = "norm", .norm_bound = 1}, 10, 100), "fedavg family");
  refused(make("fedavg", {.rule = "mean"}, 10, 100), "robust");
  refused(make("fedavg", {.rule = "trimmed-mean", .trim_fraction = 0.5}, 10, 100), "robust_trim_fraction");
  refused(make("fedavg", {.rule = "norm", .norm_bound = -1}, 10, 100), "robust_norm_bound");
  refused(make("fedavg", {.rule = "krum", .krum_f = 4}, 10, 100), "at least 11 updates");
  // 100 clients × 3M parameters × 4 bytes = 1.1 GiB: over the cap; the streaming norm bound is not held.
  refused(make("fedavg", {.rule = "median"}, 100, 3'000'000), "exceeds");
  CHECK(make("fedavg", {.rule = "norm", .norm_bound = 1}, 100, 3'000'000).ok());
  CHECK(make("fedadam", {.rule = "median"}, 10, 100).ok());
}

absl::StatusOr<ServerConfig> Parse(const std::string& text) {
  return ParseServerConfig(StrCat("[model]\ndir = \"m\"\n", text));
}

TEST_CASE("server.toml [strategy] robust keys are parsed, validated and refused where they cannot work",
          "[server][robust][config]") {
  auto ok = Parse(
      "[strategy]\nname = \"fedadam\"\nrobust = \"krum\"\nrobust_krum_f = 1\nrobust_krum_m = 3\n"
      "robust_trim_fraction = 0.2\nrobust_norm_bound = 0.5\n");
  INFO(ok.status().message());
  REQUIRE(ok.ok());
  CHECK(ok->robust.rule == "krum");
  CHECK(ok->robust.krum_f == 1);
  CHECK(ok->robust.krum_m == 3);
  CHECK(ok->robust.trim_fraction == 0.2);
  CHECK(ok->robust.norm_bound == 0.5);
  CHECK(Parse("")->robust.rule == "none");

  struct Case {
    std::string toml, expected;
  };
  for (const Case& c : std::vector<Case>{
           {"[strategy]\nrobust = \"average\"\n", "robust: must be"},
           {"[strategy]\nrobust = \"trimmed-mean\"\nrobust_trim_fraction = 0.6\n", "robust_trim_fraction"},
           {"[strategy]\nrobust = \"krum\"\nrobust_krum_f = -1\n", "robust_krum_f"},
           {"[strategy]\nrobust = \"median\"\n[secagg]\nenabled = true\n", "[secagg] enabled"},
           {"[strategy]\nrobust = \"norm\"\nrobust_norm_bound = 1\n[privacy]\ndp = true\nclip_norm = 1\n"
            "noise_multiplier = 1\ntarget_epsilon = 5\n",
            "[privacy] dp"},
           {"[training]\nmethod = \"kseed\"\n[strategy]\nrobust = \"median\"\n",
            "method must be lora-bp, mezo or pepita"},
           {"[training]\nmethod = \"fwdgrad\"\n[strategy]\nrobust = \"median\"\n",
            "method must be lora-bp, mezo or pepita"},
           {"[strategy]\nrobust = \"median\"\nmode = \"fedbuff\"\n", "mode = \"fedbuff\""},
           // clients_per_round 10: rounds may commit with 5 updates; krum with f = 2 needs 7.
           {"[strategy]\nrobust = \"krum\"\nrobust_krum_f = 2\n", "needs at least 7 updates"},
       }) {
    INFO(c.toml);
    auto parsed = Parse(c.toml);
    REQUIRE_FALSE(parsed.ok());
    CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(parsed.status().message()), Catch::Contains(c.expected));
  }
  // The same krum is fine once every committed round has 7 updates.
  CHECK(Parse("[training]\nmin_reports = 7\n[strategy]\nrobust = \"krum\"\nrobust_krum_f = 2\n").ok());
}

}  // namespace
}  // namespace seedling::server
