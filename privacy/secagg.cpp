// SecAgg+ shared pieces: randomness, parameter rules, session id, neighbour graph, quantization and
// the message encoding. The client and server state machines are in secagg_client.cpp and
// secagg_server.cpp.

#include "privacy/secagg.h"

#include <openssl/rand.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "base/status.h"
#include "base/strings.h"
#include "privacy/internal/secagg_crypto.h"
#include "privacy/internal/secagg_wire.h"

namespace seedling::privacy {
namespace {

using internal::WireReader;
using internal::WireWriter;

enum MessageType : uint8_t {
  kSetup = 0,
  kAdvertiseKeys = 1,
  kKeyDirectory = 2,
  kShareKeys = 3,
  kShareRelay = 4,
  kMaskedInput = 5,
  kUnmaskRequest = 6,
  kUnmaskResponse = 7,
};

constexpr uint32_t kMaxCohort = 1u << 24;
constexpr size_t kMaxModelHashBytes = 1024;

uint32_t CeilLog2(uint32_t n) { return n <= 1 ? 0 : 32 - std::countl_zero(n - 1); }

void WriteParams(WireWriter& w, const SecAggParams& p) {
  w.U32(p.num_clients);
  w.U32(p.num_neighbors);
  w.U32(p.threshold);
  w.U64(std::bit_cast<uint64_t>(p.max_dropout_fraction));
  w.U32(p.vector_length);
  w.U32(p.quantization_levels);
  w.U32(p.max_weight);
  w.U32(std::bit_cast<uint32_t>(p.clipping_range));
}

SecAggParams ReadParams(WireReader& r) {
  SecAggParams p;
  p.num_clients = r.U32();
  p.num_neighbors = r.U32();
  p.threshold = r.U32();
  p.max_dropout_fraction = std::bit_cast<double>(r.U64());
  p.vector_length = r.U32();
  p.quantization_levels = r.U32();
  p.max_weight = r.U32();
  p.clipping_range = std::bit_cast<float>(r.U32());
  return p;
}

void WriteShares(WireWriter& w, const std::vector<EncryptedShare>& shares) {
  w.U32(static_cast<uint32_t>(shares.size()));
  for (const EncryptedShare& s : shares) {
    w.U32(s.peer);
    w.Bytes(s.ciphertext);
  }
}

std::vector<EncryptedShare> ReadShares(WireReader& r) {
  const uint32_t n = r.Count(kMaxCohort, 8 + kShareCiphertextBytes);
  std::vector<EncryptedShare> shares(n);
  for (EncryptedShare& s : shares) {
    s.peer = r.U32();
    s.ciphertext = r.Bytes(kShareCiphertextBytes);
    if (r.ok() && s.ciphertext.size() != kShareCiphertextBytes) {
      r.Fail(StrCat("share ciphertext of ", s.ciphertext.size(), " bytes, expected ", kShareCiphertextBytes));
    }
  }
  return shares;
}

void WriteIds(WireWriter& w, const std::vector<uint32_t>& ids) {
  w.U32(static_cast<uint32_t>(ids.size()));
  for (uint32_t id : ids) w.U32(id);
}

std::vector<uint32_t> ReadIds(WireReader& r) {
  const uint32_t n = r.Count(kMaxCohort, 4);
  std::vector<uint32_t> ids(n);
  for (uint32_t& id : ids) id = r.U32();
  return ids;
}

template <typename T>
absl::StatusOr<T> Done(WireReader& r, T value) {
  SEEDLING_RETURN_IF_ERROR(r.Finish());
  return value;
}

}  // namespace

// ---- Randomness
// ---------------------------------------------------------------------------------------------

absl::Status OsRandomSource::Fill(std::span<uint8_t> out) {
  if (out.empty()) return absl::OkStatus();
  if (RAND_bytes(out.data(), static_cast<int>(out.size())) != 1) {
    return absl::InternalError(StrCat("RAND_bytes failed: ", internal::OpenSslErrors()));
  }
  return absl::OkStatus();
}

absl::Status SeededRandomSourceForSimulation::Fill(std::span<uint8_t> out) {
  for (uint8_t& byte : out) {
    if (used_ == block_.size()) {
      static constexpr char kTag[] = "seedling/secagg/seeded";
      std::array<uint8_t, sizeof(kTag) - 1 + 16> input{};
      std::memcpy(input.data(), kTag, sizeof(kTag) - 1);
      for (int i = 0; i < 8; ++i) {
        input[sizeof(kTag) - 1 + i] = static_cast<uint8_t>(seed_ >> (8 * i));
        input[sizeof(kTag) - 1 + 8 + i] = static_cast<uint8_t>(counter_ >> (8 * i));
      }
      ++counter_;
      block_ = internal::Sha256(input);
      used_ = 0;
    }
    byte = block_[used_++];
  }
  return absl::OkStatus();
}

// ---- Parameters
// ---------------------------------------------------------------------------------------------

uint32_t MinNeighbors(uint32_t num_clients) {
  if (num_clients < 2) return 0;
  return std::min(num_clients - 1, 2 * CeilLog2(num_clients));
}

uint32_t MinSurvivors(const SecAggParams& params) {
  const double drops = std::floor(params.max_dropout_fraction * params.num_clients + 1e-9);
  const uint32_t d = drops <= 0 ? 0 : static_cast<uint32_t>(drops);
  return d >= params.num_clients ? 0 : params.num_clients - d;
}

uint32_t MaxQuantizationLevels(uint32_t num_clients, uint32_t max_weight) {
  const uint64_t per = static_cast<uint64_t>(std::max(1u, num_clients)) * std::max(1u, max_weight);
  const uint64_t levels = uint64_t{0xffffffff} / per + 1;
  return static_cast<uint32_t>(std::min<uint64_t>(levels, 0xffffffff));
}

absl::Status ValidateParams(const SecAggParams& p) {
  const uint32_t n = p.num_clients, k = p.num_neighbors, t = p.threshold;
  if (n < 3) {
    return absl::InvalidArgumentError(StrCat("SecAgg needs at least 3 clients (num_clients = ", n,
                                             "): with two, the sum reveals the other client's input"));
  }
  if (n > kMaxCohort) {
    return absl::InvalidArgumentError(StrCat("num_clients = ", n, " exceeds the limit ", kMaxCohort));
  }
  if (k > n - 1) {
    return absl::InvalidArgumentError(StrCat("num_neighbors = ", k, " exceeds num_clients − 1 = ", n - 1));
  }
  if (k < MinNeighbors(n)) {
    return absl::InvalidArgumentError(StrCat("num_neighbors = ", k,
                                             " is below the minimum min(n − 1, 2·ceil(log2 n)) = ", MinNeighbors(n),
                                             " for ", n, " clients"));
  }
  if (k != n - 1 && k % 2 != 0) {
    return absl::InvalidArgumentError(
        StrCat("num_neighbors = ", k, " must be even (k/2 neighbours on each side of the ring) or n − 1 = ", n - 1,
               " (complete graph)"));
  }
  if (2 * static_cast<uint64_t>(t) <= k || t > k) {
    return absl::InvalidArgumentError(StrCat("threshold = ", t, " must satisfy k/2 < t ≤ k for k = ", k,
                                             " neighbours (more than half, so the server can never "
                                             "collect t shares of both secrets of a "
                                             "client)"));
  }
  if (!(p.max_dropout_fraction >= 0.0 && p.max_dropout_fraction < 0.5)) {
    return absl::InvalidArgumentError(
        StrCat("max_dropout_fraction = ", p.max_dropout_fraction, " must be in [0, 0.5)"));
  }
  if (k == n - 1) {
    const uint32_t drops = n - MinSurvivors(p);
    if (t + drops > k) {
      return absl::InvalidArgumentError(
          StrCat("threshold = ", t, " is unreachable after dropouts: with a complete graph of ", n,
                 " clients and max_dropout_fraction = ", p.max_dropout_fraction, " up to ", drops,
                 " neighbours may drop, leaving ", k - std::min(k, drops), " < t; need t ≤ k − floor(δ·n)"));
    }
  } else {
    const auto drops = static_cast<uint32_t>(std::ceil(p.max_dropout_fraction * k - 1e-9));
    if (t + drops > k) {
      return absl::InvalidArgumentError(
          StrCat("threshold = ", t, " is unreachable after dropouts: a neighbourhood of k = ", k,
                 " losing its share ceil(δ·k) = ", drops, " of max_dropout_fraction = ", p.max_dropout_fraction,
                 " keeps ", k - std::min(k, drops), " < t; need t ≤ k − ceil(δ·k)"));
    }
  }
  if (p.quantization_levels < 2) {
    return absl::InvalidArgumentError(StrCat("quantization_levels = ", p.quantization_levels, " must be at least 2"));
  }
  if (p.max_weight < 1) return absl::InvalidArgumentError("max_weight must be at least 1");
  const unsigned __int128 worst = static_cast<unsigned __int128>(n) * p.max_weight * (p.quantization_levels - 1u);
  if (worst > 0xffffffffu) {
    return absl::InvalidArgumentError(StrCat(
        "overflow: num_clients ", n, " × max_weight ", p.max_weight, " × (quantization_levels ", p.quantization_levels,
        " − 1) = ", static_cast<uint64_t>(std::min<unsigned __int128>(worst, std::numeric_limits<uint64_t>::max())),
        " exceeds the modulus 2^32 − 1 = 4294967295, so the sum could wrap; use "
        "quantization_levels ≤ ",
        MaxQuantizationLevels(n, p.max_weight), " for these n and W"));
  }
  if (!std::isfinite(p.clipping_range) || p.clipping_range <= 0.0f) {
    return absl::InvalidArgumentError(StrCat("clipping_range = ", p.clipping_range, " must be finite and positive"));
  }
  if (p.vector_length < 1 || p.vector_length > kMaxVectorLength) {
    return absl::InvalidArgumentError(
        StrCat("vector_length = ", p.vector_length, " must be in [1, ", kMaxVectorLength, "]"));
  }
  return absl::OkStatus();
}

// ---- Session
// ------------------------------------------------------------------------------------------------

absl::StatusOr<SessionId> ComputeSessionId(const SessionConfig& config) {
  SEEDLING_RETURN_IF_ERROR(ValidateParams(config.params));
  if (config.cohort.size() != config.params.num_clients) {
    return absl::InvalidArgumentError(
        StrCat("cohort has ", config.cohort.size(), " ids, num_clients = ", config.params.num_clients));
  }
  if (config.model_hash.size() > kMaxModelHashBytes) {
    return absl::InvalidArgumentError(
        StrCat("model hash of ", config.model_hash.size(), " bytes exceeds ", kMaxModelHashBytes));
  }
  SetupMessage canonical{config};
  std::sort(canonical.config.cohort.begin(), canonical.config.cohort.end());
  if (std::adjacent_find(canonical.config.cohort.begin(), canonical.config.cohort.end()) !=
      canonical.config.cohort.end()) {
    return absl::InvalidArgumentError("cohort ids are not distinct");
  }
  const std::string encoded = StrCat("seedling/secagg/v1/session", canonical.Serialize());
  return internal::Sha256(std::span(reinterpret_cast<const uint8_t*>(encoded.data()), encoded.size()));
}

absl::StatusOr<NeighborGraph> NeighborGraph::Build(const SessionConfig& config, const SessionId& session_id) {
  SEEDLING_RETURN_IF_ERROR(ValidateParams(config.params));
  std::vector<uint32_t> ring = config.cohort;
  std::sort(ring.begin(), ring.end());
  const uint32_t n = static_cast<uint32_t>(ring.size());
  if (n != config.params.num_clients) {
    return absl::InvalidArgumentError(StrCat("cohort has ", n, " ids, num_clients = ", config.params.num_clients));
  }
  // Fisher–Yates driven by SHA-256(session id ‖ "graph" ‖ counter), uniform by rejection.
  std::array<uint8_t, 32 + 5 + 8> seed_input{};
  std::memcpy(seed_input.data(), session_id.data(), 32);
  std::memcpy(seed_input.data() + 32, "graph", 5);
  uint64_t counter = 0;
  internal::Bytes32 block{};
  size_t used = block.size();
  auto next_u32 = [&]() {
    if (used + 4 > block.size()) {
      for (int i = 0; i < 8; ++i) seed_input[37 + i] = static_cast<uint8_t>(counter >> (8 * i));
      ++counter;
      block = internal::Sha256(seed_input);
      used = 0;
    }
    uint32_t v;
    std::memcpy(&v, block.data() + used, 4);
    used += 4;
    return v;
  };
  for (uint32_t i = n - 1; i > 0; --i) {
    const uint64_t range = uint64_t{i} + 1;
    const uint64_t limit = (uint64_t{1} << 32) / range * range;
    uint64_t r;
    do r = next_u32();
    while (r >= limit);
    std::swap(ring[i], ring[r % range]);
  }
  NeighborGraph graph;
  graph.degree_ = config.params.num_neighbors;
  for (uint32_t pos = 0; pos < n; ++pos) graph.position_.emplace(ring[pos], pos);
  graph.ring_ = std::move(ring);
  return graph;
}

std::vector<uint32_t> NeighborGraph::Neighbors(uint32_t id) const {
  auto it = position_.find(id);
  if (it == position_.end()) return {};
  const uint32_t n = static_cast<uint32_t>(ring_.size()), pos = it->second;
  std::vector<uint32_t> nb;
  nb.reserve(degree_);
  if (degree_ == n - 1) {
    for (uint32_t j = 0; j < n; ++j) {
      if (j != pos) nb.push_back(ring_[j]);
    }
  } else {
    for (uint32_t d = 1; d <= degree_ / 2; ++d) {
      nb.push_back(ring_[(pos + d) % n]);
      nb.push_back(ring_[(pos + n - d) % n]);
    }
  }
  std::sort(nb.begin(), nb.end());
  return nb;
}

bool NeighborGraph::AreNeighbors(uint32_t a, uint32_t b) const {
  auto ia = position_.find(a), ib = position_.find(b);
  if (a == b || ia == position_.end() || ib == position_.end()) return false;
  const uint32_t n = static_cast<uint32_t>(ring_.size());
  if (degree_ == n - 1) return true;
  const uint32_t d = (ia->second + n - ib->second) % n;
  return std::min(d, n - d) <= degree_ / 2;
}

// ---- Quantization
// -------------------------------------------------------------------------------------------

absl::StatusOr<std::vector<uint32_t>> EncodeInput(std::span<const float> x, uint32_t weight, const SecAggParams& params,
                                                  Rounding rounding, RngKey stochastic_key) {
  if (params.vector_length < 1 || x.size() != params.vector_length - 1u) {
    return absl::InvalidArgumentError(
        StrCat("input has ", x.size(), " entries, expected ", params.vector_length, " − 1 (one slot is the weight)"));
  }
  if (weight > params.max_weight) {
    return absl::InvalidArgumentError(StrCat("weight ", weight, " exceeds max_weight ", params.max_weight));
  }
  if (params.quantization_levels < 2 || !(params.clipping_range > 0.0f)) {
    return absl::InvalidArgumentError("quantization_levels < 2 or clipping_range ≤ 0");
  }
  const double c = params.clipping_range;
  const double top = static_cast<double>(params.quantization_levels - 1u);
  const double scale = top / (2.0 * c);
  std::vector<uint32_t> out(params.vector_length);
  out[0] = weight;
  constexpr size_t kChunk = 4096;
  std::array<float, kChunk> uniform{};
  for (size_t begin = 0; begin < x.size(); begin += kChunk) {
    const size_t len = std::min(kChunk, x.size() - begin);
    if (rounding == Rounding::kStochastic) {
      FillUniform(stochastic_key, begin, std::span(uniform.data(), len));
    }
    for (size_t j = 0; j < len; ++j) {
      const float v = x[begin + j];
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(StrCat("input entry ", begin + j, " is not finite"));
      }
      const double scaled = (std::clamp(static_cast<double>(v), -c, c) + c) * scale;
      const double r = rounding == Rounding::kStochastic ? scaled + uniform[j] : scaled + 0.5;
      const double q = std::min(std::floor(r), top);
      out[1 + begin + j] = weight * static_cast<uint32_t>(q);
    }
  }
  return out;
}

absl::StatusOr<DecodedAggregate> DecodeAggregate(std::span<const uint32_t> sum, const SecAggParams& params) {
  if (sum.size() != params.vector_length || sum.empty()) {
    return absl::InvalidArgumentError(StrCat("sum has ", sum.size(), " entries, expected ", params.vector_length));
  }
  if (params.quantization_levels < 2) {
    return absl::InvalidArgumentError("quantization_levels must be at least 2");
  }
  DecodedAggregate out;
  out.total_weight = sum[0];
  const double c = params.clipping_range;
  const double step = 2.0 * c / static_cast<double>(params.quantization_levels - 1u);
  const double offset = c * static_cast<double>(out.total_weight);
  out.weighted_sum.resize(sum.size() - 1);
  for (size_t i = 1; i < sum.size(); ++i) {
    out.weighted_sum[i - 1] = static_cast<float>(static_cast<double>(sum[i]) * step - offset);
  }
  return out;
}

// ---- Messages
// -----------------------------------------------------------------------------------------------

std::string SetupMessage::Serialize() const {
  WireWriter w(kSetup, 64 + config.model_hash.size() + 4 * config.cohort.size());
  WriteParams(w, config.params);
  w.U64(config.round_index);
  w.Bytes(config.model_hash);
  WriteIds(w, config.cohort);
  return w.Take();
}

absl::StatusOr<SetupMessage> SetupMessage::Parse(std::string_view bytes) {
  WireReader r(bytes, kSetup, "SecAgg setup");
  SetupMessage m;
  m.config.params = ReadParams(r);
  m.config.round_index = r.U64();
  m.config.model_hash = r.Bytes(kMaxModelHashBytes);
  m.config.cohort = ReadIds(r);
  return Done(r, std::move(m));
}

std::string AdvertiseKeysMessage::Serialize() const {
  WireWriter w(kAdvertiseKeys, 100);
  w.Fixed(session_id);
  w.U32(sender);
  w.Fixed(encryption_key);
  w.Fixed(mask_key);
  return w.Take();
}

absl::StatusOr<AdvertiseKeysMessage> AdvertiseKeysMessage::Parse(std::string_view bytes) {
  WireReader r(bytes, kAdvertiseKeys, "SecAgg AdvertiseKeys");
  AdvertiseKeysMessage m;
  r.Fixed(m.session_id);
  m.sender = r.U32();
  r.Fixed(m.encryption_key);
  r.Fixed(m.mask_key);
  return Done(r, std::move(m));
}

std::string KeyDirectoryMessage::Serialize() const {
  WireWriter w(kKeyDirectory, 36 + 68 * entries.size());
  w.Fixed(session_id);
  w.U32(static_cast<uint32_t>(entries.size()));
  for (const Entry& e : entries) {
    w.U32(e.id);
    w.Fixed(e.encryption_key);
    w.Fixed(e.mask_key);
  }
  return w.Take();
}

absl::StatusOr<KeyDirectoryMessage> KeyDirectoryMessage::Parse(std::string_view bytes) {
  WireReader r(bytes, kKeyDirectory, "SecAgg KeyDirectory");
  KeyDirectoryMessage m;
  r.Fixed(m.session_id);
  m.entries.resize(r.Count(kMaxCohort, 68));
  for (Entry& e : m.entries) {
    e.id = r.U32();
    r.Fixed(e.encryption_key);
    r.Fixed(e.mask_key);
  }
  return Done(r, std::move(m));
}

std::string ShareKeysMessage::Serialize() const {
  WireWriter w(kShareKeys, 40 + (8 + kShareCiphertextBytes) * shares.size());
  w.Fixed(session_id);
  w.U32(sender);
  WriteShares(w, shares);
  return w.Take();
}

absl::StatusOr<ShareKeysMessage> ShareKeysMessage::Parse(std::string_view bytes) {
  WireReader r(bytes, kShareKeys, "SecAgg ShareKeys");
  ShareKeysMessage m;
  r.Fixed(m.session_id);
  m.sender = r.U32();
  m.shares = ReadShares(r);
  return Done(r, std::move(m));
}

std::string ShareRelayMessage::Serialize() const {
  WireWriter w(kShareRelay, 36 + (8 + kShareCiphertextBytes) * shares.size());
  w.Fixed(session_id);
  WriteShares(w, shares);
  return w.Take();
}

absl::StatusOr<ShareRelayMessage> ShareRelayMessage::Parse(std::string_view bytes) {
  WireReader r(bytes, kShareRelay, "SecAgg ShareRelay");
  ShareRelayMessage m;
  r.Fixed(m.session_id);
  m.shares = ReadShares(r);
  return Done(r, std::move(m));
}

std::string MaskedInputMessage::Serialize() const {
  WireWriter w(kMaskedInput, 40 + 4 * masked.size());
  w.Fixed(session_id);
  w.U32(sender);
  w.U32(static_cast<uint32_t>(masked.size()));
  std::string out = w.Take();
  const size_t head = out.size();
  out.resize(head + 4 * masked.size());
  if constexpr (std::endian::native == std::endian::little) {
    // Not with an empty list: memcpy from its null data() is undefined even for 0 bytes.
    if (!masked.empty()) std::memcpy(out.data() + head, masked.data(), 4 * masked.size());
  } else {
    for (size_t i = 0; i < masked.size(); ++i) {
      for (int b = 0; b < 4; ++b) out[head + 4 * i + b] = static_cast<char>(masked[i] >> (8 * b));
    }
  }
  return out;
}

absl::StatusOr<MaskedInputMessage> MaskedInputMessage::Parse(std::string_view bytes) {
  WireReader r(bytes, kMaskedInput, "SecAgg MaskedInput");
  MaskedInputMessage m;
  r.Fixed(m.session_id);
  m.sender = r.U32();
  const uint32_t n = r.Count(kMaxVectorLength, 4);
  // n = 0 parses to an empty list (the server refuses it against the session's vector length); memcpy
  // into its null data() would be undefined even for 0 bytes (found by fuzzing).
  if (r.ok() && n > 0) {
    m.masked.resize(n);
    if constexpr (std::endian::native == std::endian::little) {
      std::memcpy(m.masked.data(), r.Cursor(), 4 * size_t{n});
      r.Skip(4 * size_t{n});
    } else {
      for (uint32_t& v : m.masked) v = r.U32();
    }
  }
  return Done(r, std::move(m));
}

std::string UnmaskRequestMessage::Serialize() const {
  WireWriter w(kUnmaskRequest, 44 + 4 * (survivors.size() + dropped.size()));
  w.Fixed(session_id);
  WriteIds(w, survivors);
  WriteIds(w, dropped);
  return w.Take();
}

absl::StatusOr<UnmaskRequestMessage> UnmaskRequestMessage::Parse(std::string_view bytes) {
  WireReader r(bytes, kUnmaskRequest, "SecAgg UnmaskRequest");
  UnmaskRequestMessage m;
  r.Fixed(m.session_id);
  m.survivors = ReadIds(r);
  m.dropped = ReadIds(r);
  return Done(r, std::move(m));
}

std::string UnmaskResponseMessage::Serialize() const {
  WireWriter w(kUnmaskResponse, 40 + 45 * entries.size());
  w.Fixed(session_id);
  w.U32(sender);
  w.U32(static_cast<uint32_t>(entries.size()));
  for (const Entry& e : entries) {
    w.U32(e.owner);
    w.U8(static_cast<uint8_t>(e.kind));
    for (uint64_t v : e.share) w.U64(v);
  }
  return w.Take();
}

absl::StatusOr<UnmaskResponseMessage> UnmaskResponseMessage::Parse(std::string_view bytes) {
  WireReader r(bytes, kUnmaskResponse, "SecAgg UnmaskResponse");
  UnmaskResponseMessage m;
  r.Fixed(m.session_id);
  m.sender = r.U32();
  m.entries.resize(r.Count(kMaxCohort, 45));
  for (Entry& e : m.entries) {
    e.owner = r.U32();
    const uint8_t kind = r.U8();
    if (r.ok() && kind != static_cast<uint8_t>(ShareKind::kSelfMaskSeed) &&
        kind != static_cast<uint8_t>(ShareKind::kMaskKey)) {
      r.Fail(StrCat("share kind ", static_cast<int>(kind), ", expected 1 or 2"));
    }
    e.kind = static_cast<ShareKind>(kind);
    for (uint64_t& v : e.share) v = r.U64();
  }
  return Done(r, std::move(m));
}

}  // namespace seedling::privacy
