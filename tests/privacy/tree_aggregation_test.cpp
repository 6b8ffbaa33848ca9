// DP-FTRL's tree aggregation (privacy/tree_aggregation.h) against a naive binary tree built explicitly in
// the test: which nodes cover a prefix, the noise variance of each release, the noise consecutive releases
// share, and node noise that a new instance regenerates exactly (a restarted server).

#include "privacy/tree_aggregation.h"

#include <algorithm>
#include <array>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <tuple>
#include <vector>

namespace seedling::privacy {
namespace {

// The naive tree: every node of a complete binary tree over leaves [1, 2^levels], with its leaf range, found
// by descending from the root (a segment-tree query for [1, t]).
struct NaiveNode {
  uint32_t level;
  uint64_t first, last;  // leaves [first, last]
};

void NaiveCover(uint32_t level, uint64_t first, uint64_t last, uint64_t t, std::vector<NaiveNode>& out) {
  if (first > t) return;
  if (last <= t) {
    out.push_back({level, first, last});
    return;
  }
  const uint64_t mid = first + (last - first + 1) / 2 - 1;
  NaiveCover(level - 1, first, mid, t, out);
  NaiveCover(level - 1, mid + 1, last, t, out);
}

std::vector<NaiveNode> NaiveCoverOf(uint64_t t) {
  std::vector<NaiveNode> out;
  NaiveCover(10, 1, 1024, t, out);  // a tree of 1024 leaves, enough for the positions tested
  return out;
}

// A node noise whose vectors are drawn explicitly per node (std::mt19937_64) and kept in a table, the
// naive tree's nodes keyed by (tree, level, first leaf).
class TableNodeNoise final : public NodeNoise {
 public:
  explicit TableNodeNoise(size_t dim) : dim_(dim) {}
  std::string_view kind() const override { return "table"; }
  bool cryptographically_secure() const override { return false; }
  absl::Status AddNodeNoise(const TreeNode& node, double scale, std::span<double> inout) override {
    REQUIRE(inout.size() == dim_);
    const std::vector<double>& z = Vector(node.tree, node.level, node.index * (uint64_t{1} << node.level) + 1);
    for (size_t i = 0; i < dim_; ++i) inout[i] += scale * z[i];
    ++calls_;
    return absl::OkStatus();
  }
  const std::vector<double>& Vector(uint64_t tree, uint32_t level, uint64_t first) {
    auto [it, inserted] = table_.try_emplace(std::make_tuple(tree, level, first));
    if (inserted) {
      std::normal_distribution<double> normal;
      it->second.resize(dim_);
      for (double& v : it->second) v = normal(gen_);
    }
    return it->second;
  }
  int calls() const { return calls_; }

 private:
  size_t dim_;
  std::mt19937_64 gen_{12345};
  std::map<std::tuple<uint64_t, uint32_t, uint64_t>, std::vector<double>> table_;
  int calls_ = 0;
};

double Variance(const std::vector<double>& v) {
  double mean = 0, m2 = 0;
  for (double x : v) mean += x;
  mean /= static_cast<double>(v.size());
  for (double x : v) m2 += (x - mean) * (x - mean);
  return m2 / static_cast<double>(v.size() - 1);
}

double Covariance(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s / static_cast<double>(a.size());
}

}  // namespace

TEST_CASE("The cover of [1, t] is the naive tree's decomposition: popcount(t) dyadic nodes", "[privacy][ftrl]") {
  for (uint64_t t = 0; t <= 300; ++t) {
    const std::vector<TreeNode> cover = CoveringNodes(7, t);
    const std::vector<NaiveNode> naive = NaiveCoverOf(t);
    REQUIRE(cover.size() == naive.size());
    CHECK(static_cast<int>(cover.size()) == std::popcount(t));
    std::set<std::tuple<uint32_t, uint64_t, uint64_t>> got, want;
    for (const TreeNode& n : cover) {
      CHECK(n.tree == 7);
      got.insert({n.level, n.index * (uint64_t{1} << n.level) + 1, (n.index + 1) * (uint64_t{1} << n.level)});
    }
    for (const NaiveNode& n : naive) want.insert({n.level, n.first, n.last});
    CHECK(got == want);
  }
  CHECK(CoveringNodes(0, uint64_t{1} << 32).size() == 1);
}

TEST_CASE("TreeLevels is ceil(log2(leaves + 1))", "[privacy][ftrl]") {
  CHECK(TreeLevels(0) == 0);
  CHECK(TreeLevels(1) == 1);
  CHECK(TreeLevels(2) == 2);
  CHECK(TreeLevels(3) == 2);
  CHECK(TreeLevels(4) == 3);
  CHECK(TreeLevels(7) == 3);
  CHECK(TreeLevels(8) == 4);
  CHECK(TreeLevels(1000) == 10);
  for (uint64_t n = 1; n < 5000; ++n) CHECK(TreeLevels(n) == static_cast<int>(std::ceil(std::log2(n + 1.0))));
}

TEST_CASE("Prefix noise is the sum of the naive tree's node vectors, and the increments add up to it",
          "[privacy][ftrl]") {
  const size_t dim = 16;
  const double sigma = 0.7;
  TableNodeNoise table(dim);
  std::vector<double> running(dim, 0.0);  // a model updated by the increments
  for (uint64_t t = 1; t <= 40; ++t) {
    std::vector<double> naive(dim, 0.0);
    for (const NaiveNode& n : NaiveCoverOf(t)) {
      const std::vector<double>& z = table.Vector(3, n.level, n.first);
      for (size_t i = 0; i < dim; ++i) naive[i] += sigma * z[i];
    }
    std::vector<double> prefix(dim, 0.0);
    REQUIRE(AddPrefixNoise(table, 3, t, sigma, prefix).ok());
    REQUIRE(AddPrefixNoiseIncrement(table, 3, t, sigma, running).ok());
    for (size_t i = 0; i < dim; ++i) {
      CHECK(prefix[i] == Approx(naive[i]).margin(1e-12));
      CHECK(running[i] == Approx(naive[i]).margin(1e-9));
    }
  }
  // Shared nodes cancel: t = 8 → cover {[1,8]}, t − 1 = 7 → {[1,4],[5,6],[7,7]}: 4 nodes; t = 6 → {[1,4],[5,6]}
  // vs {[1,4],[5,5]}: 2 nodes.
  const int before = table.calls();
  std::vector<double> scratch(dim, 0.0);
  REQUIRE(AddPrefixNoiseIncrement(table, 3, 8, sigma, scratch).ok());
  CHECK(table.calls() - before == 4);
  REQUIRE(AddPrefixNoiseIncrement(table, 3, 6, sigma, scratch).ok());
  CHECK(table.calls() - before == 6);
}

TEST_CASE("Release S_t carries noise variance sigma^2 popcount(t), and S_6 and S_7 share two nodes",
          "[privacy][ftrl]") {
  const size_t dim = 200000;
  const double sigma = 1.5;
  std::array<uint8_t, KeyedNodeNoise::kKeyBytes> key{};
  key[0] = 42;
  KeyedNodeNoise keyed(key);
  SeededNodeNoise seeded(9);
  for (NodeNoise* noise : {static_cast<NodeNoise*>(&keyed), static_cast<NodeNoise*>(&seeded)}) {
    INFO(noise->kind());
    std::map<uint64_t, std::vector<double>> release;
    for (uint64_t t : {1, 6, 7, 8, 11}) {
      release[t].assign(dim, 0.0);
      REQUIRE(AddPrefixNoise(*noise, 0, t, sigma, release[t]).ok());
      CHECK(Variance(release[t]) == Approx(sigma * sigma * std::popcount(t)).epsilon(0.02));
    }
    // cover(6) = {[1,4],[5,6]}, cover(7) = {[1,4],[5,6],[7,7]}: covariance 2σ²; cover(8) = {[1,8]} shares
    // nothing with cover(7); cover(11) = {[1,8],[9,10],[11,11]} shares [1,8] with cover(8).
    CHECK(Covariance(release[6], release[7]) == Approx(2 * sigma * sigma).epsilon(0.03));
    CHECK(std::abs(Covariance(release[7], release[8])) < 0.05 * sigma * sigma);
    CHECK(Covariance(release[8], release[11]) == Approx(sigma * sigma).epsilon(0.03));
    // Another tree's nodes are independent.
    std::vector<double> other(dim, 0.0);
    REQUIRE(AddPrefixNoise(*noise, 1, 6, sigma, other).ok());
    CHECK(std::abs(Covariance(release[6], other)) < 0.05 * sigma * sigma);
  }
}

TEST_CASE("Node noise is regenerated exactly by a new instance with the same key or seed", "[privacy][ftrl]") {
  std::array<uint8_t, KeyedNodeNoise::kKeyBytes> key{}, other_key{};
  key[5] = 1;
  other_key[5] = 2;
  const TreeNode node{2, 3, 5};
  auto draw = [&](NodeNoise& noise, size_t n) {
    std::vector<double> v(n, 0.0);
    REQUIRE(noise.AddNodeNoise(node, 1.0, v).ok());
    return v;
  };
  KeyedNodeNoise a(key), b(key), c(other_key);
  const std::vector<double> first = draw(a, 9000);
  CHECK(draw(b, 9000) == first);
  CHECK(draw(c, 9000) != first);
  // Element i does not depend on the buffer's length (a chunk boundary at 4096, an odd length).
  const std::vector<double> shorter = draw(b, 4097);
  CHECK(std::equal(shorter.begin(), shorter.end(), first.begin()));
  SeededNodeNoise s1(4), s2(4), s3(5);
  CHECK(draw(s1, 100) == draw(s2, 100));
  CHECK(draw(s1, 100) != draw(s3, 100));
}

TEST_CASE("Tree releases refuse bad arguments and change nothing", "[privacy][ftrl]") {
  SeededNodeNoise noise(1);
  std::vector<double> v(4, 0.0);
  CHECK(AddPrefixNoise(noise, 0, 3, -1.0, v).code() == absl::StatusCode::kInvalidArgument);
  CHECK(AddPrefixNoise(noise, 0, 3, NAN, v).code() == absl::StatusCode::kInvalidArgument);
  CHECK(AddPrefixNoise(noise, 0, (uint64_t{1} << 32) + 1, 1.0, v).code() == absl::StatusCode::kInvalidArgument);
  CHECK(AddPrefixNoise(noise, kMaxTrees, 3, 1.0, v).code() == absl::StatusCode::kInvalidArgument);
  CHECK(AddPrefixNoiseIncrement(noise, 0, 0, 1.0, v).code() == absl::StatusCode::kInvalidArgument);
  CHECK(noise.AddNodeNoise({0, 0, 0}, INFINITY, v).code() == absl::StatusCode::kInvalidArgument);
  CHECK(v == std::vector<double>(4, 0.0));
  CHECK(AddPrefixNoise(noise, 0, 3, 0.0, v).ok());  // σ = 0 adds nothing
  CHECK(v == std::vector<double>(4, 0.0));
}

}  // namespace seedling::privacy
