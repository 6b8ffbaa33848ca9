#include "privacy/tree_aggregation.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <string>

#include "base/check.h"
#include "base/philox.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "privacy/dp.h"

namespace seedling::privacy {
namespace {

// Draws per chunk (even, so every chunk but the last consumes whole Box–Muller pairs).
constexpr size_t kChunk = 4096;
// Domain separation of the seeded stream's Philox key from the other users of the run's seed.
constexpr uint64_t kSeededTreeTag = 0x44504654524C5452ull;  // "DPFTRLTR"

uint64_t Mix64(uint64_t x) {  // SplitMix64's finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

void AppendLe64(std::string& out, uint64_t v) {
  for (int b = 0; b < 8; ++b) out.push_back(static_cast<char>((v >> (8 * b)) & 0xFF));
}

absl::Status CheckScale(double scale) {
  if (!std::isfinite(scale)) return absl::InvalidArgumentError(StrCat("node noise scale must be finite, got ", scale));
  return absl::OkStatus();
}

absl::Status CheckRelease(uint64_t tree, uint64_t t, double stddev) {
  if (!(stddev >= 0) || !std::isfinite(stddev)) {
    return absl::InvalidArgumentError(StrCat("tree noise standard deviation must be finite and >= 0, got ", stddev));
  }
  if (t > kMaxTreeLeaves) {
    return absl::InvalidArgumentError(
        StrCat("tree position ", t, " exceeds the ", kMaxTreeLeaves, " leaves of a tree"));
  }
  if (tree >= kMaxTrees) {
    return absl::InvalidArgumentError(StrCat("tree ", tree, " exceeds the ", kMaxTrees, " trees a run may use"));
  }
  return absl::OkStatus();
}

struct EvpCtxDeleter {
  void operator()(EVP_CIPHER_CTX* ctx) const { EVP_CIPHER_CTX_free(ctx); }
};

}  // namespace

int TreeLevels(uint64_t leaves) { return leaves == 0 ? 0 : std::bit_width(leaves); }

std::vector<TreeNode> CoveringNodes(uint64_t tree, uint64_t t) {
  SEEDLING_CHECK(t <= kMaxTreeLeaves);
  std::vector<TreeNode> nodes;
  uint64_t start = 0;  // leaves [1, start] are covered by the nodes so far
  for (int level = 63; level >= 0; --level) {
    const uint64_t size = uint64_t{1} << level;
    if ((t & size) == 0) continue;
    nodes.push_back({tree, static_cast<uint32_t>(level), start >> level});  // leaves [start + 1, start + size]
    start += size;
  }
  return nodes;
}

KeyedNodeNoise::~KeyedNodeNoise() { OPENSSL_cleanse(key_.data(), key_.size()); }

absl::Status KeyedNodeNoise::AddNodeNoise(const TreeNode& node, double scale, std::span<double> inout) {
  SEEDLING_RETURN_IF_ERROR(CheckScale(scale));
  // The node's key: SHA-256(key ‖ tag ‖ tree ‖ level ‖ index).
  std::string material(reinterpret_cast<const char*>(key_.data()), key_.size());
  material += "seedling dp-ftrl node";
  AppendLe64(material, node.tree);
  AppendLe64(material, node.level);
  AppendLe64(material, node.index);
  std::string node_key = Sha256(material);
  OPENSSL_cleanse(material.data(), material.size());

  std::unique_ptr<EVP_CIPHER_CTX, EvpCtxDeleter> ctx(EVP_CIPHER_CTX_new());
  const std::array<unsigned char, 16> iv{};  // counter 0
  const bool init =
      ctx != nullptr && EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_ctr(), nullptr,
                                           reinterpret_cast<const unsigned char*>(node_key.data()), iv.data()) == 1;
  OPENSSL_cleanse(node_key.data(), node_key.size());
  if (!init) return absl::InternalError("AES-256-CTR setup for the tree's node noise failed");

  std::array<uint64_t, kChunk> zeros{};
  std::array<uint64_t, kChunk> words;
  std::array<double, kChunk> normals;
  absl::Status status = absl::OkStatus();
  for (size_t start = 0; start < inout.size(); start += kChunk) {
    const size_t n = std::min(kChunk, inout.size() - start);
    const int bytes = static_cast<int>((n + n % 2) * sizeof(uint64_t));  // whole pairs
    int written = 0;
    if (EVP_EncryptUpdate(ctx.get(), reinterpret_cast<unsigned char*>(words.data()), &written,
                          reinterpret_cast<const unsigned char*>(zeros.data()), bytes) != 1 ||
        written != bytes) {
      status = absl::InternalError("AES-256-CTR keystream for the tree's node noise failed");
      break;
    }
    StandardNormalsFromWords(std::span<const uint64_t>(words.data(), n + n % 2), std::span<double>(normals.data(), n));
    for (size_t i = 0; i < n; ++i) inout[start + i] += scale * normals[i];
  }
  OPENSSL_cleanse(words.data(), sizeof(words));  // the noise must not be recoverable from the stack
  OPENSSL_cleanse(normals.data(), sizeof(normals));
  return status;
}

absl::Status SeededNodeNoise::AddNodeNoise(const TreeNode& node, double scale, std::span<double> inout) {
  SEEDLING_RETURN_IF_ERROR(CheckScale(scale));
  SEEDLING_CHECK(node.tree < kMaxTrees && node.level <= 32 && node.index < kMaxTreeLeaves);
  // One Philox stream per node: tree (24 bits) ‖ level (8 bits) ‖ index (32 bits), distinct for distinct nodes.
  const uint64_t stream = (node.tree << 40) | (uint64_t{node.level} << 32) | node.index;
  seedling::Rng rng(Mix64(seed_ ^ kSeededTreeTag), stream);
  for (double& v : inout) v += scale * rng.Normal();
  return absl::OkStatus();
}

absl::StatusOr<std::array<uint8_t, KeyedNodeNoise::kKeyBytes>> NewTreeNoiseKey() {
  std::array<uint8_t, KeyedNodeNoise::kKeyBytes> key;
  if (RAND_bytes(key.data(), static_cast<int>(key.size())) != 1) {
    return absl::InternalError("OpenSSL RAND_bytes failed: no cryptographically secure randomness for the tree key");
  }
  return key;
}

absl::Status AddPrefixNoise(NodeNoise& noise, uint64_t tree, uint64_t t, double stddev, std::span<double> inout) {
  SEEDLING_RETURN_IF_ERROR(CheckRelease(tree, t, stddev));
  if (stddev == 0) return absl::OkStatus();
  for (const TreeNode& node : CoveringNodes(tree, t)) {
    SEEDLING_RETURN_IF_ERROR(noise.AddNodeNoise(node, stddev, inout));
  }
  return absl::OkStatus();
}

absl::Status AddPrefixNoiseIncrement(NodeNoise& noise, uint64_t tree, uint64_t t, double stddev,
                                     std::span<double> inout) {
  SEEDLING_RETURN_IF_ERROR(CheckRelease(tree, t, stddev));
  if (t == 0) return absl::InvalidArgumentError("tree positions start at 1, got 0");
  if (stddev == 0) return absl::OkStatus();
  const std::vector<TreeNode> now = CoveringNodes(tree, t);
  const std::vector<TreeNode> before = CoveringNodes(tree, t - 1);
  auto in = [](const std::vector<TreeNode>& nodes, const TreeNode& node) {
    return std::find(nodes.begin(), nodes.end(), node) != nodes.end();
  };
  for (const TreeNode& node : now) {
    if (!in(before, node)) SEEDLING_RETURN_IF_ERROR(noise.AddNodeNoise(node, stddev, inout));
  }
  for (const TreeNode& node : before) {
    if (!in(now, node)) SEEDLING_RETURN_IF_ERROR(noise.AddNodeNoise(node, -stddev, inout));
  }
  return absl::OkStatus();
}

}  // namespace seedling::privacy
