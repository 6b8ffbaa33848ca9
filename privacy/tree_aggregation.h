#pragma once

// Tree aggregation for DP-FTRL (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep)
// Learning without Sampling or Shuffling", ICML 2021, §3 and Alg. 1; the binary-tree mechanism of Dwork et al.
// 2010 and Chan, Shi and Song 2011). docs/methods.md, "DP-FTRL (tree aggregation)".
//
// Round t = 1, 2, ... of one tree adds the clipped sum s_t to a stream. The server releases noisy prefix sums
//
//   S_t = Σ_{i ≤ t} s_i + Σ_{v ∈ cover(t)} n_v,      n_v ~ N(0, σ² I) independent per node,
//
// where the nodes of the (implicit, complete) binary tree over leaves 1, 2, ... are the dyadic intervals
// node(level l, index j) = leaves [j·2^l + 1, (j + 1)·2^l], and cover(t) is the dyadic decomposition of [1, t]:
// one node per set bit of t (so |cover(t)| = popcount(t) and the noise in S_t has variance σ²·popcount(t) per
// coordinate). Reading t's bits from the highest: the node of bit l starts right after the nodes of the higher
// bits. Two releases share exactly the nodes their covers have in common (S_6 and S_7 share [1,4] and [5,6]).
//
// A leaf i lies in one node per level; the releases S_1..S_τ use the levels 0..⌊log2 τ⌋, i.e. TreeLevels(τ) =
// ⌈log2(τ + 1)⌉ of them. That is what the accounting (privacy/accountant.h, TreeAggregationZcdp) counts.
//
// Node noise is a pure function of (key, tree, level, index): a server that restarts regenerates exactly the
// node noise it used before, so the tree continues and no released node is ever drawn twice with different
// values (two different noises for the same node would each be released and could be averaged). Two
// generators, one interface (NodeNoise):
//   * KeyedNodeNoise — for deployment. A 256-bit secret key (random, kept by the server: it is as secret as
//     the noise itself). Node v's key is SHA-256(key ‖ "seedling dp-ftrl node" ‖ tree ‖ level ‖ index), each
//     a little-endian uint64; its N(0, 1) draws are Box–Muller (privacy::StandardNormalsFromWords) on the
//     AES-256-CTR keystream of that node key from counter 0.
//   * SeededNodeNoise — NOT FOR DEPLOYMENT (anyone with the seed can subtract the noise): the simulator's
//     reproducible noise. Node v's draws are the Philox stream (Mix(seed), packed node id), base/philox.h.
//
// Thread safety: functions are pure; a NodeNoise instance is not thread-safe.

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace seedling::privacy {

// The leaves of one tree are 1 .. kMaxTreeLeaves (a larger tree_restart_rounds is refused by the caller).
inline constexpr uint64_t kMaxTreeLeaves = uint64_t{1} << 32;
// Trees are numbered 0 .. kMaxTrees − 1.
inline constexpr uint64_t kMaxTrees = uint64_t{1} << 24;

struct TreeNode {
  uint64_t tree = 0;   // which tree (DP-FTRL restarts the tree every tree_restart_rounds rounds)
  uint32_t level = 0;  // 0 = a leaf
  uint64_t index = 0;  // covers leaves [index·2^level + 1, (index + 1)·2^level]
  bool operator==(const TreeNode&) const = default;
};

// ⌈log2(leaves + 1)⌉: the levels the releases S_1..S_leaves use (0 for 0 leaves).
int TreeLevels(uint64_t leaves);

// cover(t) of tree `tree`: the popcount(t) nodes whose leaves partition [1, t], highest level first.
// Empty for t = 0. t must be ≤ kMaxTreeLeaves (checked).
std::vector<TreeNode> CoveringNodes(uint64_t tree, uint64_t t);

// A deterministic source of each node's noise: the same node gives the same N(0, 1) vector every time.
class NodeNoise {
 public:
  virtual ~NodeNoise() = default;
  // "keyed" or "seeded".
  virtual std::string_view kind() const = 0;
  virtual bool cryptographically_secure() const = 0;
  // inout[i] += scale · z_v[i] for the node's standard normal vector z_v (element i does not depend on the
  // span's length), in chunks without a temporary of the buffer's size. InvalidArgument unless scale is finite
  // (a negative scale subtracts the node's noise); Internal if the generator fails (then inout may be
  // partly changed: the caller must not release it).
  virtual absl::Status AddNodeNoise(const TreeNode& node, double scale, std::span<double> inout) = 0;
};

// For deployment (see above).
class KeyedNodeNoise final : public NodeNoise {
 public:
  static constexpr size_t kKeyBytes = 32;
  explicit KeyedNodeNoise(const std::array<uint8_t, kKeyBytes>& key) : key_(key) {}
  ~KeyedNodeNoise() override;
  std::string_view kind() const override { return "keyed"; }
  bool cryptographically_secure() const override { return true; }
  absl::Status AddNodeNoise(const TreeNode& node, double scale, std::span<double> inout) override;

 private:
  std::array<uint8_t, kKeyBytes> key_;
};

// NOT FOR DEPLOYMENT: reproducible noise for the simulator and tests (see above).
class SeededNodeNoise final : public NodeNoise {
 public:
  explicit SeededNodeNoise(uint64_t seed) : seed_(seed) {}
  std::string_view kind() const override { return "seeded"; }
  bool cryptographically_secure() const override { return false; }
  absl::Status AddNodeNoise(const TreeNode& node, double scale, std::span<double> inout) override;

 private:
  uint64_t seed_;
};

// A fresh 256-bit key from OpenSSL's CSPRNG (RAND_bytes). Internal if no secure randomness is available.
absl::StatusOr<std::array<uint8_t, KeyedNodeNoise::kKeyBytes>> NewTreeNoiseKey();

// inout += stddev · Σ_{v ∈ cover(t)} z_v: the noise of the release S_t of tree `tree`. InvalidArgument (nothing
// changed) unless stddev is finite and ≥ 0 and t ≤ kMaxTreeLeaves, tree < kMaxTrees.
absl::Status AddPrefixNoise(NodeNoise& noise, uint64_t tree, uint64_t t, double stddev, std::span<double> inout);

// inout += stddev · (Σ_{v ∈ cover(t)} z_v − Σ_{v ∈ cover(t−1)} z_v), for t ≥ 1: the noise of S_t − S_{t−1}.
// Nodes in both covers cancel and are not generated. A model updated by these increments from round 1 on
// carries exactly the noise of S_t. Errors as AddPrefixNoise, and InvalidArgument for t = 0.
absl::Status AddPrefixNoiseIncrement(NodeNoise& noise, uint64_t tree, uint64_t t, double stddev,
                                     std::span<double> inout);

}  // namespace seedling::privacy
