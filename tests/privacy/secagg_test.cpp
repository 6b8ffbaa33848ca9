#include "privacy/secagg.h"

#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "privacy/internal/secagg_crypto.h"
#include "privacy/internal/shamir.h"

namespace seedling::privacy {
namespace {

// ---- Helpers
// ------------------------------------------------------------------------------------------------

SecAggParams Params(uint32_t n, uint32_t k, uint32_t t, double delta, uint32_t m = 1000) {
  SecAggParams p;
  p.num_clients = n;
  p.num_neighbors = k;
  p.threshold = t;
  p.max_dropout_fraction = delta;
  p.vector_length = m;
  p.quantization_levels = 1u << 16;
  p.max_weight = 1;
  p.clipping_range = 1.0f;
  return p;
}

SessionConfig Config(const SecAggParams& params, uint64_t round = 7) {
  SessionConfig c;
  c.params = params;
  c.round_index = round;
  c.model_hash = "sha256:5eed";
  // Ids are not 0..n−1 on purpose: ids are arbitrary distinct numbers.
  for (uint32_t i = 0; i < params.num_clients; ++i) c.cohort.push_back(1000 + 3 * i);
  return c;
}

// n = 10: the complete graph (SecAgg); n = 100: a sparse SecAgg+ graph. Both tolerate a third
// dropping.
SessionConfig ConfigFor(uint32_t n) {
  if (n == 10) return Config(Params(10, 9, 5, 0.34));
  return Config(Params(n, 80, 41, 0.34));
}

enum class Drop { kNone, kBeforeAdvertise, kAfterAdvertise, kAfterShareKeys, kAfterMaskedInput };

// Fault hooks on the serialized messages, by recipient (server → client) or sender (client →
// server).
using BytesHook = std::function<void(uint32_t client, std::string& bytes)>;

struct Faults {
  std::map<uint32_t, Drop> drops;
  BytesHook to_client;
  BytesHook to_server;
  std::set<uint32_t> out_of_order;               // call Unmask where ShareKeys is due
  std::map<uint32_t, std::string> model_hashes;  // a client's own (different) model hash
  std::optional<uint32_t> corrupt_input;         // this client's input gets an entry above W·(Q − 1)
};

struct Outcome {
  absl::StatusOr<AggregateResult> result = absl::UnknownError("not run");
  std::map<uint32_t, std::vector<uint32_t>> inputs;
  std::map<uint32_t, absl::Status> client_errors;
  std::map<uint32_t, absl::Status> server_rejections;
  absl::Status server_abort;  // first Close*/Finish error
  size_t unmask_responses = 0;
  // The clients that should be in the sum: sent a masked input and never errored.
  std::set<uint32_t> expected_survivors;

  std::vector<uint32_t> ExpectedSum() const {
    std::vector<uint32_t> sum(inputs.begin()->second.size(), 0);
    for (uint32_t id : expected_survivors) {
      const auto& x = inputs.at(id);
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += x[i];
    }
    return sum;
  }
};

// Runs one session in process, every message through Serialize/Parse.
Outcome RunSession(const SessionConfig& config, const Faults& faults = {}, uint64_t seed = 1) {
  Outcome out;
  SeededRandomSourceForSimulation random(seed);
  auto server = SecAggServer::Create(config);
  REQUIRE(server.ok());
  std::map<uint32_t, SecAggClient> clients;
  std::mt19937 gen(static_cast<uint32_t>(seed));
  const uint32_t max_entry = config.params.max_weight * (config.params.quantization_levels - 1);
  std::uniform_int_distribution<uint32_t> dist(0, max_entry);
  for (uint32_t id : config.cohort) {
    SessionConfig mine = config;
    if (auto it = faults.model_hashes.find(id); it != faults.model_hashes.end()) {
      mine.model_hash = it->second;
    }
    auto client = SecAggClient::Create(mine, id, random);
    REQUIRE(client.ok());
    clients.emplace(id, std::move(*client));
    auto& x = out.inputs[id];
    x.resize(config.params.vector_length);
    for (uint32_t& v : x) v = dist(gen);
    if (faults.corrupt_input == id) x[x.size() / 2] = max_entry + 1;
  }
  auto drop = [&](uint32_t id) {
    auto it = faults.drops.find(id);
    return it == faults.drops.end() ? Drop::kNone : it->second;
  };
  auto up = [&](uint32_t id, std::string bytes) {
    if (faults.to_server) faults.to_server(id, bytes);
    return bytes;
  };
  auto down = [&](uint32_t id, std::string bytes) {
    if (faults.to_client) faults.to_client(id, bytes);
    return bytes;
  };
  auto client_error = [&](uint32_t id, const absl::Status& s) {
    out.client_errors.emplace(id, s);
    return false;
  };
  auto server_reject = [&](uint32_t id, const absl::Status& s) {
    if (!s.ok()) out.server_rejections.emplace(id, s);
  };

  // Stage 0.
  for (auto& [id, c] : clients) {
    if (drop(id) == Drop::kBeforeAdvertise) continue;
    auto msg = c.AdvertiseKeys();
    if (!msg.ok()) {
      client_error(id, msg.status());
      continue;
    }
    auto parsed = AdvertiseKeysMessage::Parse(up(id, msg->Serialize()));
    REQUIRE(parsed.ok());
    server_reject(id, server->AddAdvertiseKeys(*parsed));
  }
  auto directories = server->CloseAdvertiseKeys();
  if (!directories.ok()) {
    out.server_abort = directories.status();
    out.result = directories.status();
    return out;
  }
  // Stage 1.
  for (auto& [id, d] : *directories) {
    if (drop(id) == Drop::kAfterAdvertise) continue;
    SecAggClient& c = clients.at(id);
    auto parsed = KeyDirectoryMessage::Parse(down(id, d.Serialize()));
    REQUIRE(parsed.ok());
    if (faults.out_of_order.count(id)) {
      auto wrong = c.Unmask(UnmaskRequestMessage{parsed->session_id, {}, {}});
      REQUIRE_FALSE(wrong.ok());
      client_error(id, wrong.status());
      continue;
    }
    auto msg = c.ShareKeys(*parsed);
    if (!msg.ok()) {
      client_error(id, msg.status());
      continue;
    }
    auto up_parsed = ShareKeysMessage::Parse(up(id, msg->Serialize()));
    REQUIRE(up_parsed.ok());
    server_reject(id, server->AddShareKeys(*up_parsed));
  }
  auto relays = server->CloseShareKeys();
  if (!relays.ok()) {
    out.server_abort = relays.status();
    out.result = relays.status();
    return out;
  }
  // Stage 2.
  for (auto& [id, r] : *relays) {
    if (drop(id) == Drop::kAfterShareKeys) continue;
    SecAggClient& c = clients.at(id);
    auto parsed = ShareRelayMessage::Parse(down(id, r.Serialize()));
    REQUIRE(parsed.ok());
    auto msg = c.MaskInput(*parsed, out.inputs.at(id));
    if (!msg.ok()) {
      client_error(id, msg.status());
      continue;
    }
    auto up_parsed = MaskedInputMessage::Parse(up(id, msg->Serialize()));
    REQUIRE(up_parsed.ok());
    const absl::Status s = server->AddMaskedInput(*up_parsed);
    server_reject(id, s);
    if (s.ok()) out.expected_survivors.insert(id);
  }
  auto requests = server->CloseMaskedInput();
  if (!requests.ok()) {
    out.server_abort = requests.status();
    out.result = requests.status();
    return out;
  }
  // Stage 3.
  for (auto& [id, r] : *requests) {
    if (drop(id) == Drop::kAfterMaskedInput) continue;
    SecAggClient& c = clients.at(id);
    auto parsed = UnmaskRequestMessage::Parse(down(id, r.Serialize()));
    REQUIRE(parsed.ok());
    auto msg = c.Unmask(*parsed);
    if (!msg.ok()) {
      client_error(id, msg.status());
      continue;
    }
    ++out.unmask_responses;
    auto up_parsed = UnmaskResponseMessage::Parse(up(id, msg->Serialize()));
    REQUIRE(up_parsed.ok());
    server_reject(id, server->AddUnmaskResponse(*up_parsed));
  }
  out.result = server->Finish();
  if (!out.result.ok()) out.server_abort = out.result.status();
  return out;
}

// `count` cohort members chosen by a seeded shuffle.
std::vector<uint32_t> Pick(const SessionConfig& config, size_t count, uint32_t seed) {
  std::vector<uint32_t> ids = config.cohort;
  std::shuffle(ids.begin(), ids.end(), std::mt19937(seed));
  ids.resize(count);
  return ids;
}

void RequireExactSum(const Outcome& o) {
  INFO("server: " << o.server_abort.ToString());
  REQUIRE(o.result.ok());
  REQUIRE(std::set<uint32_t>(o.result->survivors.begin(), o.result->survivors.end()) == o.expected_survivors);
  const std::vector<uint32_t> expected = o.ExpectedSum();
  REQUIRE(o.result->sum.size() == expected.size());
  size_t mismatches = 0;
  for (size_t i = 0; i < expected.size(); ++i) mismatches += o.result->sum[i] != expected[i];
  REQUIRE(mismatches == 0);
}

// ---- Shamir
// -------------------------------------------------------------------------------------------------

std::vector<uint8_t> Secret32(uint8_t first) {
  std::vector<uint8_t> s(32);
  std::iota(s.begin(), s.end(), first);
  s[31] = 0xff;  // the top chunk is partial: exercise the padding
  return s;
}

TEST_CASE("Shamir reconstructs a 32-byte secret from any t of k shares", "[privacy][secagg][shamir]") {
  SeededRandomSourceForSimulation random(3);
  const std::vector<uint8_t> secret = Secret32(200);
  const std::vector<uint64_t> xs = {2, 5, 9, 11, 12, 40, 77};
  const int t = 4;
  auto shares = internal::ShamirSplit(secret, t, xs, random);
  REQUIRE(shares.ok());
  REQUIRE(shares->size() == xs.size());
  // Every 4-subset of the 7 shares.
  for (uint32_t mask = 0; mask < (1u << xs.size()); ++mask) {
    if (std::popcount(mask) != t) continue;
    std::vector<internal::ShamirShare> subset;
    for (size_t i = 0; i < xs.size(); ++i) {
      if (mask & (1u << i)) subset.push_back((*shares)[i]);
    }
    std::reverse(subset.begin(), subset.end());  // order does not matter
    auto back = internal::ShamirReconstruct(subset, t, secret.size());
    REQUIRE(back.ok());
    REQUIRE(*back == secret);
  }
}

TEST_CASE("Shamir with t − 1 shares gives a wrong value", "[privacy][secagg][shamir]") {
  SeededRandomSourceForSimulation random(4);
  const std::vector<uint8_t> secret = Secret32(1);
  const std::vector<uint64_t> xs = {1, 2, 3, 4, 5, 6};
  const int t = 4;
  auto shares = internal::ShamirSplit(secret, t, xs, random);
  REQUIRE(shares.ok());
  std::vector<internal::ShamirShare> few(shares->begin(), shares->begin() + (t - 1));
  auto interpolated = internal::ShamirInterpolateAtZero(few);
  REQUIRE(interpolated.ok());
  auto exact = internal::ShamirInterpolateAtZero(std::span(*shares).first(t));
  REQUIRE(exact.ok());
  for (size_t e = 0; e < exact->size(); ++e) REQUIRE((*interpolated)[e] != (*exact)[e]);
  // And the checked entry point refuses outright.
  REQUIRE(internal::ShamirReconstruct(few, t, secret.size()).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Shamir does not detect a tampered share, it yields a wrong secret", "[privacy][secagg][shamir]") {
  // This is why shares travel under AES-GCM: authentication, not Shamir, catches tampering.
  SeededRandomSourceForSimulation random(5);
  const std::vector<uint8_t> secret = Secret32(9);
  auto shares = internal::ShamirSplit(secret, 3, std::vector<uint64_t>{1, 2, 3}, random);
  REQUIRE(shares.ok());
  (*shares)[1].y[0] = ((*shares)[1].y[0] + 1) % internal::kShamirPrime;
  auto chunks = internal::ShamirInterpolateAtZero(*shares);
  REQUIRE(chunks.ok());
  uint64_t first = 0;
  for (int b = 6; b >= 0; --b) first = (first << 8) | secret[b];
  REQUIRE((*chunks)[0] != first);
}

TEST_CASE("Shamir split refuses bad thresholds and evaluation points", "[privacy][secagg][shamir]") {
  SeededRandomSourceForSimulation random(6);
  const std::vector<uint8_t> secret = Secret32(0);
  REQUIRE_FALSE(internal::ShamirSplit(secret, 4, std::vector<uint64_t>{1, 2, 3}, random).ok());
  REQUIRE_FALSE(internal::ShamirSplit(secret, 2, std::vector<uint64_t>{0, 1, 2}, random).ok());
  REQUIRE_FALSE(internal::ShamirSplit(secret, 2, std::vector<uint64_t>{1, 1, 2}, random).ok());
  REQUIRE_FALSE(internal::ShamirSplit(secret, 2, std::vector<uint64_t>{1, internal::kShamirPrime}, random).ok());
}

// ---- Crypto pieces
// ------------------------------------------------------------------------------------------

TEST_CASE("AES-GCM rejects a flipped bit, a wrong key and wrong associated data", "[privacy][secagg][crypto]") {
  internal::Bytes32 key{}, other{};
  key[0] = 1;
  other[0] = 2;
  const std::vector<uint8_t> aad = {1, 2, 3}, bad_aad = {1, 2, 4}, plain(88, 7);
  auto ct = internal::AesGcmSeal(key, aad, plain);
  REQUIRE(ct.ok());
  REQUIRE(ct->size() == plain.size() + internal::kGcmTagBytes);
  auto back = internal::AesGcmOpen(key, aad, *ct);
  REQUIRE(back.ok());
  REQUIRE(*back == plain);
  std::vector<uint8_t> flipped = *ct;
  flipped[10] ^= 0x01;
  REQUIRE(internal::AesGcmOpen(key, aad, flipped).status().code() == absl::StatusCode::kUnauthenticated);
  REQUIRE(internal::AesGcmOpen(other, aad, *ct).status().code() == absl::StatusCode::kUnauthenticated);
  REQUIRE(internal::AesGcmOpen(key, bad_aad, *ct).status().code() == absl::StatusCode::kUnauthenticated);
}

TEST_CASE("X25519 agreement is symmetric and pairwise mask keys agree", "[privacy][secagg][crypto]") {
  SeededRandomSourceForSimulation random(7);
  internal::Bytes32 a{}, b{}, session{};
  REQUIRE(random.Fill(a).ok());
  REQUIRE(random.Fill(b).ok());
  auto pa = internal::X25519PublicKey(a);
  auto pb = internal::X25519PublicKey(b);
  REQUIRE((pa.ok() && pb.ok()));
  auto ab = internal::X25519Agree(a, *pb);
  auto ba = internal::X25519Agree(b, *pa);
  REQUIRE((ab.ok() && ba.ok()));
  REQUIRE(*ab == *ba);
  auto k1 = internal::PairMaskKey(session, 3, 9, *ab);
  auto k2 = internal::PairMaskKey(session, 9, 3, *ba);
  REQUIRE((k1.ok() && k2.ok()));
  REQUIRE(*k1 == *k2);
  // Directional encryption keys differ per direction and per session.
  auto e1 = internal::ShareEncryptionKey(session, 3, 9, *ab);
  auto e2 = internal::ShareEncryptionKey(session, 9, 3, *ab);
  internal::Bytes32 other_session{};
  other_session[0] = 1;
  auto e3 = internal::ShareEncryptionKey(other_session, 3, 9, *ab);
  REQUIRE((e1.ok() && e2.ok() && e3.ok()));
  REQUIRE(*e1 != *e2);
  REQUIRE(*e1 != *e3);
  // A low-order point is refused (the all-zero key is one).
  REQUIRE_FALSE(internal::X25519Agree(a, internal::Bytes32{}).ok());
}

TEST_CASE("The mask PRG streams across chunk boundaries and cancels exactly", "[privacy][secagg][crypto]") {
  auto prg = internal::MaskPrg::Create();
  REQUIRE(prg.ok());
  internal::Bytes16 key{};
  key[5] = 42;
  std::vector<uint32_t> long_mask(10000, 0), short_mask(4097, 0);
  REQUIRE(prg->AddMask(key, false, long_mask).ok());
  REQUIRE(prg->AddMask(key, false, short_mask).ok());
  REQUIRE(std::equal(short_mask.begin(), short_mask.end(), long_mask.begin()));
  // Words look random: not all equal, not zero.
  REQUIRE(std::set<uint32_t>(long_mask.begin(), long_mask.end()).size() > 9990);
  std::vector<uint32_t> x(10000);
  std::iota(x.begin(), x.end(), 0xfffff000u);  // wraps mod 2^32
  const std::vector<uint32_t> original = x;
  REQUIRE(prg->AddMask(key, false, x).ok());
  REQUIRE(x != original);
  REQUIRE(prg->AddMask(key, true, x).ok());
  REQUIRE(x == original);
}

// ---- Parameters and graph
// -----------------------------------------------------------------------------------

TEST_CASE("Parameter validation refuses configurations that can overflow", "[privacy][secagg][params]") {
  SecAggParams p = Params(100, 80, 41, 0.34);
  REQUIRE(ValidateParams(p).ok());
  // Flower's quantization range 2^22 with max weight 1000 cannot fit 100 clients in 2^32.
  p.quantization_levels = 1u << 22;
  p.max_weight = 1000;
  const absl::Status s = ValidateParams(p);
  REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
  const std::string msg(s.message());
  INFO(msg);
  REQUIRE(msg.find("overflow") != std::string::npos);
  REQUIRE(msg.find("2^32") != std::string::npos);
  // The boundary is exact: n·W·(Q − 1) ≤ 2^32 − 1.
  p.max_weight = 1;
  p.quantization_levels = MaxQuantizationLevels(100, 1);
  REQUIRE(ValidateParams(p).ok());
  p.quantization_levels += 1;
  REQUIRE_FALSE(ValidateParams(p).ok());
}

TEST_CASE("Parameter validation refuses thresholds that break correctness or security", "[privacy][secagg][params]") {
  REQUIRE(ValidateParams(Params(10, 9, 5, 0.34)).ok());
  REQUIRE_FALSE(ValidateParams(Params(10, 9, 4, 0.34)).ok());      // t ≤ k/2
  REQUIRE_FALSE(ValidateParams(Params(10, 9, 10, 0.0)).ok());      // t > k
  REQUIRE_FALSE(ValidateParams(Params(10, 9, 7, 0.34)).ok());      // 3 dropouts leave 6 < 7
  REQUIRE_FALSE(ValidateParams(Params(100, 80, 41, 0.5)).ok());    // δ ≥ 1/2
  REQUIRE_FALSE(ValidateParams(Params(100, 80, 60, 0.34)).ok());   // 80 − ⌈27.2⌉ = 52 < 60
  REQUIRE_FALSE(ValidateParams(Params(100, 81, 41, 0.34)).ok());   // odd sparse degree
  REQUIRE_FALSE(ValidateParams(Params(100, 100, 51, 0.34)).ok());  // k > n − 1
  REQUIRE_FALSE(ValidateParams(Params(100, 10, 6, 0.0)).ok());     // below 2·ceil(log2 100) = 14
  REQUIRE_FALSE(ValidateParams(Params(2, 1, 1, 0.0)).ok());        // two clients
  SecAggParams p = Params(10, 9, 5, 0.34);
  p.clipping_range = std::nanf("");
  REQUIRE_FALSE(ValidateParams(p).ok());
  p = Params(10, 9, 5, 0.34, 0);
  REQUIRE_FALSE(ValidateParams(p).ok());
}

TEST_CASE("The neighbour graph is k-regular, symmetric and a function of the session", "[privacy][secagg][graph]") {
  const SessionConfig config = Config(Params(100, 20, 11, 0.1));
  auto id = ComputeSessionId(config);
  REQUIRE(id.ok());
  auto g = NeighborGraph::Build(config, *id);
  REQUIRE(g.ok());
  for (uint32_t u : config.cohort) {
    const auto nb = g->Neighbors(u);
    REQUIRE(nb.size() == 20);
    for (uint32_t v : nb) {
      REQUIRE(v != u);
      REQUIRE(g->AreNeighbors(v, u));
    }
  }
  // Another round gives another graph; the same session gives the same one.
  SessionConfig other = config;
  other.round_index += 1;
  auto other_id = ComputeSessionId(other);
  REQUIRE(other_id.ok());
  auto g2 = NeighborGraph::Build(other, *other_id);
  auto g3 = NeighborGraph::Build(config, *id);
  REQUIRE((g2.ok() && g3.ok()));
  size_t differ = 0;
  for (uint32_t u : config.cohort) {
    const auto a = g->Neighbors(u), b = g2->Neighbors(u), c = g3->Neighbors(u);
    differ += !std::equal(a.begin(), a.end(), b.begin(), b.end());
    REQUIRE(std::equal(a.begin(), a.end(), c.begin(), c.end()));
  }
  REQUIRE(differ > 50);
}

TEST_CASE("The session id binds round, model hash, cohort and parameters", "[privacy][secagg][session]") {
  const SessionConfig base = Config(Params(10, 9, 5, 0.34));
  auto id = ComputeSessionId(base);
  REQUIRE(id.ok());
  SessionConfig shuffled = base;
  std::reverse(shuffled.cohort.begin(), shuffled.cohort.end());
  REQUIRE(*ComputeSessionId(shuffled) == *id);  // order-free
  SessionConfig c = base;
  c.model_hash += "x";
  REQUIRE(*ComputeSessionId(c) != *id);
  c = base;
  c.round_index++;
  REQUIRE(*ComputeSessionId(c) != *id);
  c = base;
  c.cohort[3] += 1;
  REQUIRE(*ComputeSessionId(c) != *id);
  c = base;
  c.params.threshold = 6;
  REQUIRE(*ComputeSessionId(c) != *id);
  c = base;
  c.cohort[1] = c.cohort[0];
  REQUIRE_FALSE(ComputeSessionId(c).ok());
}

// ---- Quantization
// -------------------------------------------------------------------------------------------

TEST_CASE("Quantized inputs decode to the weighted sum within half a step per client", "[privacy][secagg][quantize]") {
  SecAggParams p = Params(10, 9, 5, 0.34, 1 + 257);
  p.max_weight = 100;
  p.quantization_levels = 1u << 12;
  p.clipping_range = 2.0f;
  REQUIRE(ValidateParams(p).ok());
  std::vector<uint32_t> sum(p.vector_length, 0);
  std::vector<double> expected(p.vector_length - 1, 0.0);
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);  // some entries get clipped
  uint64_t total_weight = 0;
  for (uint32_t client = 0; client < 10; ++client) {
    std::vector<float> x(p.vector_length - 1);
    for (float& v : x) v = dist(gen);
    const uint32_t w = 1 + client * 7;
    total_weight += w;
    auto enc = EncodeInput(x, w, p, Rounding::kNearest);
    REQUIRE(enc.ok());
    REQUIRE((*enc)[0] == w);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += (*enc)[i];
    for (size_t i = 0; i < x.size(); ++i) expected[i] += w * std::clamp(x[i], -2.0f, 2.0f);
  }
  auto dec = DecodeAggregate(sum, p);
  REQUIRE(dec.ok());
  REQUIRE(dec->total_weight == total_weight);
  const double half_step = 2.0 * 2.0 / (p.quantization_levels - 1) / 2.0;
  for (size_t i = 0; i < expected.size(); ++i) {
    REQUIRE(std::abs(dec->weighted_sum[i] - expected[i]) <= total_weight * half_step + 1e-3);
  }
  // Refusals: a NaN, a weight above W, the wrong length.
  std::vector<float> bad(p.vector_length - 1, 0.0f);
  bad[3] = std::nanf("");
  REQUIRE_FALSE(EncodeInput(bad, 1, p, Rounding::kNearest).ok());
  REQUIRE_FALSE(EncodeInput(std::vector<float>(p.vector_length - 1), 101, p, Rounding::kNearest).ok());
  REQUIRE_FALSE(EncodeInput(std::vector<float>(p.vector_length), 1, p, Rounding::kNearest).ok());
}

TEST_CASE("Stochastic rounding is unbiased", "[privacy][secagg][quantize]") {
  SecAggParams p = Params(10, 9, 5, 0.34, 1 + 100000);
  p.quantization_levels = 3;  // levels −1, 0, 1: rounding error is large, so bias would show
  const std::vector<float> x(p.vector_length - 1, 0.3f);
  auto stochastic = EncodeInput(x, 1, p, Rounding::kStochastic, RngKey{99, 0});
  auto nearest = EncodeInput(x, 1, p, Rounding::kNearest);
  REQUIRE((stochastic.ok() && nearest.ok()));
  double mean_s = 0, mean_n = 0;
  for (size_t i = 1; i < p.vector_length; ++i) {
    mean_s += (*stochastic)[i] - 1.0;  // level 1 is value 0
    mean_n += (*nearest)[i] - 1.0;
  }
  mean_s /= (p.vector_length - 1);
  mean_n /= (p.vector_length - 1);
  REQUIRE(std::abs(mean_s - 0.3) < 0.01);
  REQUIRE(mean_n == 0.0);  // 0.3 rounds to 0 every time
}

// ---- Serialization
// ------------------------------------------------------------------------------------------

SessionId TestSession() {
  SessionId id;
  for (size_t i = 0; i < id.size(); ++i) id[i] = static_cast<uint8_t>(i * 7);
  return id;
}

template <typename M>
void RequireRejectsCorruption(const std::string& bytes) {
  REQUIRE(M::Parse(bytes).ok());
  for (size_t cut = 0; cut < bytes.size(); cut += std::max<size_t>(1, bytes.size() / 97)) {
    INFO("truncated to " << cut);
    REQUIRE(M::Parse(bytes.substr(0, cut)).status().code() == absl::StatusCode::kInvalidArgument);
  }
  REQUIRE(M::Parse(bytes + '\0').status().code() == absl::StatusCode::kInvalidArgument);
  std::string wrong_version = bytes;
  wrong_version[2] = 2;
  REQUIRE_FALSE(M::Parse(wrong_version).ok());
  std::string wrong_type = bytes;
  wrong_type[3] ^= 0x40;
  REQUIRE_FALSE(M::Parse(wrong_type).ok());
  std::mt19937 gen(1);
  for (int trial = 0; trial < 50; ++trial) {
    std::string garbage(1 + gen() % 200, '\0');
    for (char& c : garbage) c = static_cast<char>(gen());
    REQUIRE_FALSE(M::Parse(garbage).ok());
  }
}

TEST_CASE("Every message survives a serialization round trip", "[privacy][secagg][wire]") {
  SetupMessage setup{Config(Params(10, 9, 5, 0.34))};
  auto setup2 = SetupMessage::Parse(setup.Serialize());
  REQUIRE(setup2.ok());
  REQUIRE(*ComputeSessionId(setup2->config) == *ComputeSessionId(setup.config));
  REQUIRE(setup2->config.params.max_dropout_fraction == 0.34);
  REQUIRE(setup2->config.params.clipping_range == 1.0f);

  AdvertiseKeysMessage adv{TestSession(), 17, {}, {}};
  adv.encryption_key[0] = 1;
  adv.mask_key[31] = 2;
  auto adv2 = AdvertiseKeysMessage::Parse(adv.Serialize());
  REQUIRE(adv2.ok());
  REQUIRE((adv2->session_id == adv.session_id && adv2->sender == 17 && adv2->encryption_key == adv.encryption_key &&
           adv2->mask_key == adv.mask_key));

  KeyDirectoryMessage dir{TestSession(), {{4, {}, {}}, {9, {}, {}}}};
  dir.entries[1].mask_key[3] = 5;
  auto dir2 = KeyDirectoryMessage::Parse(dir.Serialize());
  REQUIRE(dir2.ok());
  REQUIRE(dir2->entries.size() == 2);
  REQUIRE((dir2->entries[1].id == 9 && dir2->entries[1].mask_key == dir.entries[1].mask_key));

  ShareKeysMessage share{TestSession(), 3, {{8, std::string(kShareCiphertextBytes, 'a')}}};
  auto share2 = ShareKeysMessage::Parse(share.Serialize());
  REQUIRE(share2.ok());
  REQUIRE((share2->sender == 3 && share2->shares.size() == 1 && share2->shares[0].peer == 8 &&
           share2->shares[0].ciphertext == share.shares[0].ciphertext));

  ShareRelayMessage relay{TestSession(), {{8, std::string(kShareCiphertextBytes, 'b')}}};
  auto relay2 = ShareRelayMessage::Parse(relay.Serialize());
  REQUIRE(relay2.ok());
  REQUIRE(relay2->shares[0].ciphertext == relay.shares[0].ciphertext);

  MaskedInputMessage masked{TestSession(), 5, {0, 1, 0xffffffffu, 0x12345678u}};
  auto masked2 = MaskedInputMessage::Parse(masked.Serialize());
  REQUIRE(masked2.ok());
  REQUIRE(masked2->masked == masked.masked);
  REQUIRE(masked.Serialize().size() == 4 + 32 + 4 + 4 + 4 * 4);

  UnmaskRequestMessage req{TestSession(), {1, 2, 3}, {4}};
  auto req2 = UnmaskRequestMessage::Parse(req.Serialize());
  REQUIRE(req2.ok());
  REQUIRE((req2->survivors == req.survivors && req2->dropped == req.dropped));

  UnmaskResponseMessage resp{TestSession(), 6, {{1, ShareKind::kMaskKey, {1, 2, 3, 4, 5}}}};
  auto resp2 = UnmaskResponseMessage::Parse(resp.Serialize());
  REQUIRE(resp2.ok());
  REQUIRE((resp2->entries[0].owner == 1 && resp2->entries[0].kind == ShareKind::kMaskKey &&
           resp2->entries[0].share == resp.entries[0].share));
}

TEST_CASE("An empty masked input round-trips, the server, not the parser, refuses its length",
          "[privacy][secagg][wire]") {
  // Found by fuzzing: a count of 0 made Parse memcpy into an empty vector's null data().
  MaskedInputMessage empty{TestSession(), 5, {}};
  auto parsed = MaskedInputMessage::Parse(empty.Serialize());
  REQUIRE(parsed.ok());
  REQUIRE(parsed->masked.empty());
}

TEST_CASE("Parse rejects truncated, oversized and garbage input", "[privacy][secagg][wire]") {
  RequireRejectsCorruption<SetupMessage>(SetupMessage{Config(Params(10, 9, 5, 0.34))}.Serialize());
  RequireRejectsCorruption<AdvertiseKeysMessage>(AdvertiseKeysMessage{TestSession(), 1}.Serialize());
  RequireRejectsCorruption<KeyDirectoryMessage>(
      KeyDirectoryMessage{TestSession(), {{4, {}, {}}, {9, {}, {}}}}.Serialize());
  RequireRejectsCorruption<ShareKeysMessage>(
      ShareKeysMessage{TestSession(), 3, {{8, std::string(kShareCiphertextBytes, 'a')}}}.Serialize());
  RequireRejectsCorruption<ShareRelayMessage>(
      ShareRelayMessage{TestSession(), {{8, std::string(kShareCiphertextBytes, 'a')}}}.Serialize());
  RequireRejectsCorruption<MaskedInputMessage>(
      MaskedInputMessage{TestSession(), 5, std::vector<uint32_t>(300, 9)}.Serialize());
  RequireRejectsCorruption<UnmaskRequestMessage>(UnmaskRequestMessage{TestSession(), {1, 2}, {3}}.Serialize());
  RequireRejectsCorruption<UnmaskResponseMessage>(
      UnmaskResponseMessage{TestSession(), 6, {{1, ShareKind::kSelfMaskSeed, {}}}}.Serialize());

  // A forged count larger than the bytes present is refused before any allocation.
  std::string forged = MaskedInputMessage{TestSession(), 5, {1, 2}}.Serialize();
  forged[40] = '\xff';
  forged[41] = '\xff';
  forged[42] = '\xff';
  forged[43] = '\x0f';
  REQUIRE(MaskedInputMessage::Parse(forged).status().code() == absl::StatusCode::kInvalidArgument);
  // A share ciphertext of the wrong size, and an unknown share kind.
  REQUIRE_FALSE(ShareKeysMessage::Parse(ShareKeysMessage{TestSession(), 3, {{8, "short"}}}.Serialize()).ok());
  std::string kind = UnmaskResponseMessage{TestSession(), 6, {{1, ShareKind::kSelfMaskSeed, {}}}}.Serialize();
  kind[4 + 32 + 4 + 4 + 4] = 3;
  REQUIRE_FALSE(UnmaskResponseMessage::Parse(kind).ok());
}

// ---- The protocol end to end
// --------------------------------------------------------------------------------

TEST_CASE("The unmasked sum equals the survivors' exact modular sum under dropouts at every stage",
          "[privacy][secagg][protocol]") {
  const uint32_t n = GENERATE(10u, 100u);
  const Drop stage =
      GENERATE(Drop::kBeforeAdvertise, Drop::kAfterAdvertise, Drop::kAfterShareKeys, Drop::kAfterMaskedInput);
  const double fraction = GENERATE(0.0, 0.1, 0.2, 0.33);
  if (fraction == 0.0 && stage != Drop::kBeforeAdvertise) return;  // one no-dropout run per n
  const SessionConfig config = ConfigFor(n);
  const auto count = static_cast<size_t>(std::lround(fraction * n));
  Faults faults;
  for (uint32_t id : Pick(config, count, 1 + n + static_cast<uint32_t>(stage))) {
    faults.drops[id] = stage;
  }
  INFO("n = " << n << ", stage " << static_cast<int>(stage) << ", dropped " << count);
  const Outcome o = RunSession(config, faults, 100 + n);
  REQUIRE(o.client_errors.empty());
  REQUIRE(o.server_rejections.empty());
  const size_t in_sum = stage == Drop::kAfterMaskedInput ? n : n - count;
  REQUIRE(o.expected_survivors.size() == in_sum);
  RequireExactSum(o);
}

TEST_CASE("Too many dropouts abort the session and release no unmask share", "[privacy][secagg][protocol]") {
  const SessionConfig config = ConfigFor(10);  // tolerates 3 of 10
  Faults faults;
  for (uint32_t id : Pick(config, 4, 77)) faults.drops[id] = Drop::kAfterShareKeys;
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.server_abort.code() == absl::StatusCode::kAborted);
  REQUIRE_FALSE(o.result.ok());
  REQUIRE(o.unmask_responses == 0);
}

TEST_CASE("Too many dropouts during unmasking abort without a sum", "[privacy][secagg][protocol]") {
  const SessionConfig config = ConfigFor(10);
  Faults faults;
  for (uint32_t id : Pick(config, 4, 78)) faults.drops[id] = Drop::kAfterMaskedInput;
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.server_abort.code() == absl::StatusCode::kAborted);
  REQUIRE_FALSE(o.result.ok());
}

// A dishonest server: the first client it asks to unmask is told only t − 1 neighbours survived.
TEST_CASE("A client refuses to unmask when fewer than t neighbours survived", "[privacy][secagg][protocol]") {
  const SessionConfig config = ConfigFor(10);
  const uint32_t victim = config.cohort[2];
  Faults faults;
  faults.to_client = [&](uint32_t id, std::string& bytes) {
    if (id != victim || bytes[3] != 6) return;  // UnmaskRequest
    auto req = UnmaskRequestMessage::Parse(bytes);
    REQUIRE(req.ok());
    while (req->survivors.size() >= config.params.threshold) {
      req->dropped.push_back(req->survivors.back());
      req->survivors.pop_back();
    }
    std::sort(req->dropped.begin(), req->dropped.end());
    bytes = req->Serialize();
  };
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.client_errors.count(victim));
  REQUIRE(o.client_errors.at(victim).code() == absl::StatusCode::kAborted);
  REQUIRE(o.unmask_responses == config.cohort.size() - 1);  // the victim sent nothing
}

TEST_CASE("A client refuses to reveal both secrets of the same neighbour", "[privacy][secagg][protocol]") {
  const SessionConfig config = ConfigFor(10);
  const uint32_t victim = config.cohort[4];
  Faults faults;
  faults.to_client = [&](uint32_t id, std::string& bytes) {
    if (id != victim || bytes[3] != 6) return;
    auto req = UnmaskRequestMessage::Parse(bytes);
    REQUIRE(req.ok());
    req->dropped.push_back(req->survivors.front());
    bytes = req->Serialize();
  };
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.client_errors.count(victim));
  REQUIRE(o.client_errors.at(victim).code() == absl::StatusCode::kAborted);
  // The others still finish: 9 responses are enough.
  RequireExactSum(o);
}

TEST_CASE("A tampered share aborts its receiver only, the others finish", "[privacy][secagg][protocol]") {
  const uint32_t n = GENERATE(10u, 100u);
  const SessionConfig config = ConfigFor(n);
  const uint32_t victim = config.cohort[n / 2];
  Faults faults;
  faults.to_client = [&](uint32_t id, std::string& bytes) {
    if (id != victim || bytes[3] != 4) return;  // ShareRelay
    bytes[bytes.size() - 20] ^= 0x01;           // inside the last ciphertext
  };
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.client_errors.size() == 1);
  REQUIRE(o.client_errors.at(victim).code() == absl::StatusCode::kUnauthenticated);
  REQUIRE_FALSE(o.expected_survivors.count(victim));
  RequireExactSum(o);
}

TEST_CASE("An out-of-order message aborts that client only", "[privacy][secagg][protocol]") {
  const SessionConfig config = ConfigFor(10);
  const uint32_t victim = config.cohort[7];
  Faults faults;
  faults.out_of_order.insert(victim);
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.client_errors.size() == 1);
  REQUIRE(o.client_errors.at(victim).code() == absl::StatusCode::kFailedPrecondition);
  RequireExactSum(o);
}

TEST_CASE("A client stays aborted and refuses every later stage", "[privacy][secagg][protocol]") {
  const SessionConfig config = ConfigFor(10);
  SeededRandomSourceForSimulation random(1);
  auto client = SecAggClient::Create(config, config.cohort[0], random);
  REQUIRE(client.ok());
  REQUIRE(client->ShareKeys(KeyDirectoryMessage{client->session_id(), {}}).status().code() ==
          absl::StatusCode::kFailedPrecondition);
  REQUIRE(client->state() == SecAggClient::State::kAborted);
  REQUIRE_FALSE(client->AdvertiseKeys().ok());
  // And a second AdvertiseKeys on a fresh client is out of order too.
  auto fresh = SecAggClient::Create(config, config.cohort[1], random);
  REQUIRE(fresh.ok());
  REQUIRE(fresh->AdvertiseKeys().ok());
  REQUIRE_FALSE(fresh->AdvertiseKeys().ok());
  REQUIRE(fresh->state() == SecAggClient::State::kAborted);
}

TEST_CASE("An honest server rejects a client whose model hash differs", "[privacy][secagg][session]") {
  const SessionConfig config = ConfigFor(10);
  const uint32_t victim = config.cohort[3];
  Faults faults;
  faults.model_hashes[victim] = "sha256:other";
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.server_rejections.count(victim));
  REQUIRE(o.server_rejections.at(victim).code() == absl::StatusCode::kFailedPrecondition);
  RequireExactSum(o);
}

TEST_CASE("A client given a different model hash aborts even if the server lets it in", "[privacy][secagg][session]") {
  const SessionConfig config = ConfigFor(10);
  const uint32_t victim = config.cohort[3];
  auto server_id = ComputeSessionId(config);
  REQUIRE(server_id.ok());
  Faults faults;
  faults.model_hashes[victim] = "sha256:other";
  // A server that ignores the session id of what the victim uploads.
  faults.to_server = [&](uint32_t id, std::string& bytes) {
    if (id == victim) std::memcpy(bytes.data() + 4, server_id->data(), 32);
  };
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.client_errors.count(victim));
  REQUIRE(o.client_errors.at(victim).code() == absl::StatusCode::kFailedPrecondition);
  RequireExactSum(o);
}

TEST_CASE("A server that rewrites session ids for a mismatched client makes honest clients abort",
          "[privacy][secagg][session]") {
  // The session id is the HKDF salt and in the GCM associated data, so shares made for one session
  // do not open in another: the victim cannot open its neighbours' shares and they cannot open the
  // victim's. Everyone involved aborts and nothing is released.
  const SessionConfig config = ConfigFor(10);
  const uint32_t victim = config.cohort[3];
  SessionConfig victim_config = config;
  victim_config.model_hash = "sha256:other";
  auto server_id = ComputeSessionId(config);
  auto victim_id = ComputeSessionId(victim_config);
  REQUIRE((server_id.ok() && victim_id.ok()));
  Faults faults;
  faults.model_hashes[victim] = "sha256:other";
  faults.to_server = [&](uint32_t id, std::string& bytes) {
    if (id == victim) std::memcpy(bytes.data() + 4, server_id->data(), 32);
  };
  faults.to_client = [&](uint32_t id, std::string& bytes) {
    if (id == victim) std::memcpy(bytes.data() + 4, victim_id->data(), 32);
  };
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.client_errors.size() == config.cohort.size());  // complete graph: all are neighbours
  for (const auto& [id, status] : o.client_errors) {
    REQUIRE(status.code() == absl::StatusCode::kUnauthenticated);
  }
  REQUIRE(o.unmask_responses == 0);
  REQUIRE(o.server_abort.code() == absl::StatusCode::kAborted);
}

TEST_CASE("The server rejects duplicates, strangers and out-of-stage messages without changing state",
          "[privacy][secagg][protocol]") {
  const SessionConfig config = ConfigFor(10);
  auto server = SecAggServer::Create(config);
  REQUIRE(server.ok());
  AdvertiseKeysMessage adv{server->session_id(), config.cohort[0], {}, {}};
  adv.encryption_key[0] = 1;
  REQUIRE(server->AddAdvertiseKeys(adv).ok());
  REQUIRE(server->AddAdvertiseKeys(adv).code() == absl::StatusCode::kAlreadyExists);
  adv.sender = 5;  // not in the cohort
  REQUIRE(server->AddAdvertiseKeys(adv).code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(server->AddMaskedInput(MaskedInputMessage{server->session_id(), config.cohort[0], {}}).code() ==
          absl::StatusCode::kFailedPrecondition);  // wrong stage
  // One advertiser of ten is below the 7 survivors required.
  REQUIRE(server->CloseAdvertiseKeys().status().code() == absl::StatusCode::kAborted);
  REQUIRE(server->state() == SecAggServer::State::kAborted);
}

TEST_CASE("A client aborts when fewer than t neighbours advertised keys", "[privacy][secagg][protocol]") {
  const SessionConfig config = ConfigFor(10);
  SeededRandomSourceForSimulation random(2);
  auto client = SecAggClient::Create(config, config.cohort[0], random);
  REQUIRE(client.ok());
  REQUIRE(client->AdvertiseKeys().ok());
  REQUIRE(client->ShareKeys(KeyDirectoryMessage{client->session_id(), {}}).status().code() ==
          absl::StatusCode::kAborted);
}

TEST_CASE("A client refuses an input entry that could overflow the modulus", "[privacy][secagg][protocol]") {
  const SessionConfig config = ConfigFor(10);
  const uint32_t victim = config.cohort[1];
  Faults faults;
  faults.corrupt_input = victim;
  const Outcome o = RunSession(config, faults);
  REQUIRE(o.client_errors.size() == 1);
  REQUIRE(o.client_errors.at(victim).code() == absl::StatusCode::kInvalidArgument);
  RequireExactSum(o);
}

}  // namespace
}  // namespace seedling::privacy
