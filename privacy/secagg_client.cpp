// The SecAgg+ client state machine (secagg.h). Bonawitz et al. 2017 §4 / Bell et al. 2020 Alg. 2,
// one method per stage; steps are labelled with the paper's round names.

#include <algorithm>
#include <cstring>
#include <optional>
#include <set>
#include <tuple>

#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "privacy/internal/secagg_crypto.h"
#include "privacy/internal/shamir.h"
#include "privacy/secagg.h"

namespace seedling::privacy {
namespace {

using internal::Bytes16;
using internal::Bytes32;
using internal::ShamirShare;

constexpr size_t kSecretBytes = 32;
constexpr size_t kShareElements = internal::ShamirElementCount(kSecretBytes);
static_assert(kShareElements == 5, "UnmaskResponseMessage::Entry::share holds 5 field elements");
constexpr size_t kSharePlaintextBytes = 4 + 4 + 2 * kShareElements * 8;
static_assert(kSharePlaintextBytes + internal::kGcmTagBytes == kShareCiphertextBytes);

const char* StateName(SecAggClient::State s) {
  switch (s) {
    case SecAggClient::State::kAdvertiseKeys:
      return "AdvertiseKeys";
    case SecAggClient::State::kShareKeys:
      return "ShareKeys";
    case SecAggClient::State::kMaskedInput:
      return "MaskInput";
    case SecAggClient::State::kUnmask:
      return "Unmask";
    case SecAggClient::State::kDone:
      return "done";
    case SecAggClient::State::kAborted:
      return "aborted";
  }
  return "?";
}

void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t GetU32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
void PutU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint64_t GetU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The first 6 bytes of a session id, in hex, for messages.
std::string ShortHex(const SessionId& id) {
  return HexOf(std::string_view(reinterpret_cast<const char*>(id.data()), 6));
}

}  // namespace

struct SecAggClient::Impl {
  SessionConfig config;
  NeighborGraph graph;
  RandomSource* random;  // not owned; outlives the client
  internal::MaskPrg prg;

  Bytes32 encryption_sk{}, encryption_pk{};  // c_u
  Bytes32 mask_sk{}, mask_pk{};              // s_u
  Bytes32 self_seed{};                       // b_u
  std::optional<internal::X25519PrivateKey> encryption_key, mask_key;

  // X25519(c_u, c_v) per directory neighbour: the key of the shares in both directions.
  std::map<uint32_t, Bytes32> encryption_shared;

  // Neighbours listed in the key directory (stage 1).
  std::map<uint32_t, KeyDirectoryMessage::Entry> directory;
  // Neighbours whose shares arrived (stage 2); exactly the neighbours this client masked with.
  struct Held {
    std::array<uint64_t, kShareElements> self_seed{};
    std::array<uint64_t, kShareElements> mask_key{};
  };
  std::map<uint32_t, Held> held;

  Impl(SessionConfig c, NeighborGraph g, RandomSource* r, internal::MaskPrg p)
      : config(std::move(c)), graph(std::move(g)), random(r), prg(std::move(p)) {}
  ~Impl() { Wipe(); }

  void Wipe() {
    internal::Cleanse(encryption_sk);
    internal::Cleanse(mask_sk);
    internal::Cleanse(self_seed);
    encryption_key.reset();
    mask_key.reset();
    for (auto& [id, secret] : encryption_shared) internal::Cleanse(secret);
    for (auto& [id, h] : held) {
      std::fill(h.self_seed.begin(), h.self_seed.end(), 0);
      std::fill(h.mask_key.begin(), h.mask_key.end(), 0);
    }
  }
};

SecAggClient::SecAggClient(std::unique_ptr<Impl> impl, uint32_t self_id, const SessionId& session_id)
    : impl_(std::move(impl)), self_id_(self_id), session_id_(session_id) {}
SecAggClient::SecAggClient(SecAggClient&&) noexcept = default;
SecAggClient& SecAggClient::operator=(SecAggClient&&) noexcept = default;
SecAggClient::~SecAggClient() = default;

absl::StatusOr<SecAggClient> SecAggClient::Create(const SessionConfig& config, uint32_t self_id, RandomSource& random) {
  SEEDLING_ASSIGN_OR_RETURN(const SessionId session_id, ComputeSessionId(config));
  if (std::find(config.cohort.begin(), config.cohort.end(), self_id) == config.cohort.end()) {
    return absl::InvalidArgumentError(StrCat("client ", self_id, " is not in the cohort"));
  }
  SEEDLING_ASSIGN_OR_RETURN(NeighborGraph graph, NeighborGraph::Build(config, session_id));
  SEEDLING_ASSIGN_OR_RETURN(internal::MaskPrg prg, internal::MaskPrg::Create());
  return SecAggClient(std::make_unique<Impl>(config, std::move(graph), &random, std::move(prg)), self_id, session_id);
}

absl::Status SecAggClient::Fail(absl::Status status) {
  state_ = State::kAborted;
  impl_->Wipe();
  impl_->held.clear();
  return status;
}

absl::Status SecAggClient::Expect(State state, std::string_view call) {
  if (state_ == State::kAborted) {
    return absl::FailedPreconditionError(StrCat("SecAgg client ", self_id_, ": ", call, " after the client aborted"));
  }
  if (state_ != state) {
    return Fail(absl::FailedPreconditionError(
        StrCat("SecAgg client ", self_id_, ": out-of-order ", call, ", expected ", StateName(state_), "; aborting")));
  }
  return absl::OkStatus();
}

// Round 0, AdvertiseKeys: fresh key pairs (c_u^SK, c_u^PK), (s_u^SK, s_u^PK).
absl::StatusOr<AdvertiseKeysMessage> SecAggClient::AdvertiseKeys() {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kAdvertiseKeys, "AdvertiseKeys"));
  Impl& s = *impl_;
  if (absl::Status st = s.random->Fill(s.encryption_sk); !st.ok()) return Fail(st);
  if (absl::Status st = s.random->Fill(s.mask_sk); !st.ok()) return Fail(st);
  auto enc_key = internal::X25519PrivateKey::Create(s.encryption_sk);
  if (!enc_key.ok()) return Fail(enc_key.status());
  auto mask_key = internal::X25519PrivateKey::Create(s.mask_sk);
  if (!mask_key.ok()) return Fail(mask_key.status());
  s.encryption_key.emplace(std::move(*enc_key));
  s.mask_key.emplace(std::move(*mask_key));
  s.encryption_pk = s.encryption_key->public_key();
  s.mask_pk = s.mask_key->public_key();
  internal::Cleanse(s.encryption_sk);  // the OpenSSL key holds it from here on
  state_ = State::kShareKeys;
  return AdvertiseKeysMessage{session_id_, self_id_, s.encryption_pk, s.mask_pk};
}

// Round 1, ShareKeys.
absl::StatusOr<ShareKeysMessage> SecAggClient::ShareKeys(const KeyDirectoryMessage& directory) {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kShareKeys, "ShareKeys"));
  Impl& s = *impl_;
  const SecAggParams& p = s.config.params;
  if (directory.session_id != session_id_) {
    return Fail(absl::FailedPreconditionError(
        StrCat("SecAgg client ", self_id_, ": key directory is for session ", ShortHex(directory.session_id),
               ", this client computed ", ShortHex(session_id_),
               " (different round, model hash, cohort or parameters); aborting")));
  }
  // The directory may list only graph neighbours, once each, with keys distinct from each other and
  // from ours (Bonawitz et al. require distinct keys; a server repeating keys could make masks
  // cancel).
  std::set<PublicKey> keys_seen = {s.encryption_pk, s.mask_pk};
  for (const KeyDirectoryMessage::Entry& e : directory.entries) {
    if (!s.graph.AreNeighbors(self_id_, e.id)) {
      return Fail(absl::InvalidArgumentError(
          StrCat("SecAgg client ", self_id_, ": key directory lists ", e.id, ", not a neighbour")));
    }
    if (!s.directory.emplace(e.id, e).second) {
      return Fail(
          absl::InvalidArgumentError(StrCat("SecAgg client ", self_id_, ": key directory lists ", e.id, " twice")));
    }
    if (!keys_seen.insert(e.encryption_key).second || !keys_seen.insert(e.mask_key).second) {
      return Fail(absl::InvalidArgumentError(
          StrCat("SecAgg client ", self_id_, ": key directory repeats a public key (client ", e.id, ")")));
    }
  }
  if (s.directory.size() < p.threshold) {
    return Fail(absl::AbortedError(StrCat("SecAgg client ", self_id_, ": only ", s.directory.size(),
                                          " neighbours advertised keys, threshold is ", p.threshold)));
  }

  // Self-mask seed b_u, and t-of-|directory| shares of b_u and s_u^SK at x_v = v + 1.
  if (absl::Status st = s.random->Fill(s.self_seed); !st.ok()) return Fail(st);
  std::vector<uint64_t> xs;
  xs.reserve(s.directory.size());
  for (const auto& [id, e] : s.directory) xs.push_back(uint64_t{id} + 1);
  auto seed_shares = internal::ShamirSplit(s.self_seed, static_cast<int>(p.threshold), xs, *s.random);
  if (!seed_shares.ok()) return Fail(seed_shares.status());
  auto key_shares = internal::ShamirSplit(s.mask_sk, static_cast<int>(p.threshold), xs, *s.random);
  if (!key_shares.ok()) return Fail(key_shares.status());

  // Encrypt (u, v, share of b_u, share of s_u^SK) for each v under KA(c_u, c_v), AD = (session, u,
  // v).
  ShareKeysMessage out;
  out.session_id = session_id_;
  out.sender = self_id_;
  out.shares.reserve(s.directory.size());
  std::array<uint8_t, kSharePlaintextBytes> plain;
  size_t i = 0;
  for (const auto& [id, e] : s.directory) {
    auto shared = s.encryption_key->Agree(e.encryption_key);
    if (!shared.ok()) return Fail(shared.status());
    s.encryption_shared[id] = *shared;
    internal::Cleanse(*shared);
    auto key = internal::ShareEncryptionKey(session_id_, self_id_, id, s.encryption_shared[id]);
    if (!key.ok()) return Fail(key.status());
    PutU32(plain.data(), self_id_);
    PutU32(plain.data() + 4, id);
    for (size_t j = 0; j < kShareElements; ++j) {
      PutU64(plain.data() + 8 + 8 * j, (*seed_shares)[i].y[j]);
      PutU64(plain.data() + 8 + 8 * (kShareElements + j), (*key_shares)[i].y[j]);
    }
    auto ct = internal::AesGcmSeal(*key, internal::ShareAad(session_id_, self_id_, id), plain);
    internal::Cleanse(*key);
    if (!ct.ok()) return Fail(ct.status());
    out.shares.push_back(EncryptedShare{id, std::string(ct->begin(), ct->end())});
    ++i;
  }
  internal::Cleanse(plain);
  for (auto* shares : {&*seed_shares, &*key_shares}) {
    for (ShamirShare& sh : *shares) std::fill(sh.y.begin(), sh.y.end(), 0);
  }
  state_ = State::kMaskedInput;
  return out;
}

// Round 2, MaskedInputCollection.
absl::StatusOr<MaskedInputMessage> SecAggClient::MaskInput(const ShareRelayMessage& relay,
                                                           std::span<const uint32_t> input) {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kMaskedInput, "MaskInput"));
  Impl& s = *impl_;
  const SecAggParams& p = s.config.params;
  if (relay.session_id != session_id_) {
    return Fail(absl::FailedPreconditionError(StrCat("SecAgg client ", self_id_, ": share relay is for session ",
                                                     ShortHex(relay.session_id), ", expected ", ShortHex(session_id_),
                                                     "; aborting")));
  }
  if (input.size() != p.vector_length) {
    return Fail(absl::InvalidArgumentError(
        StrCat("SecAgg client ", self_id_, ": input has ", input.size(), " entries, expected ", p.vector_length)));
  }
  const uint64_t max_entry = uint64_t{p.max_weight} * (p.quantization_levels - 1u);
  for (size_t i = 0; i < input.size(); ++i) {
    if (input[i] > max_entry) {
      return Fail(absl::InvalidArgumentError(StrCat("SecAgg client ", self_id_, ": input entry ", i, " = ", input[i],
                                                    " exceeds max_weight·(quantization_levels − 1) = ", max_entry,
                                                    " (the bound that keeps the sum from wrapping)")));
    }
  }

  // Decrypt every relayed share pair; any authentication failure aborts this client.
  for (const EncryptedShare& e : relay.shares) {
    auto it = s.directory.find(e.peer);
    if (it == s.directory.end()) {
      return Fail(absl::InvalidArgumentError(StrCat("SecAgg client ", self_id_, ": relayed share from ", e.peer,
                                                    ", not a neighbour in the key directory")));
    }
    if (s.held.count(e.peer)) {
      return Fail(absl::InvalidArgumentError(StrCat("SecAgg client ", self_id_, ": two relayed shares from ", e.peer)));
    }
    auto key = internal::ShareEncryptionKey(session_id_, e.peer, self_id_, s.encryption_shared.at(e.peer));
    if (!key.ok()) return Fail(key.status());
    auto plain =
        internal::AesGcmOpen(*key, internal::ShareAad(session_id_, e.peer, self_id_),
                             std::span(reinterpret_cast<const uint8_t*>(e.ciphertext.data()), e.ciphertext.size()));
    internal::Cleanse(*key);
    if (!plain.ok()) {
      return Fail(absl::Status(plain.status().code(), StrCat("SecAgg client ", self_id_, ": share from ", e.peer, ": ",
                                                             plain.status().message(), "; aborting")));
    }
    if (plain->size() != kSharePlaintextBytes || GetU32(plain->data()) != e.peer ||
        GetU32(plain->data() + 4) != self_id_) {
      return Fail(absl::InvalidArgumentError(
          StrCat("SecAgg client ", self_id_, ": share from ", e.peer, " is malformed or misaddressed")));
    }
    Impl::Held h;
    for (size_t j = 0; j < kShareElements; ++j) {
      h.self_seed[j] = GetU64(plain->data() + 8 + 8 * j);
      h.mask_key[j] = GetU64(plain->data() + 8 + 8 * (kShareElements + j));
      if (h.self_seed[j] >= internal::kShamirPrime || h.mask_key[j] >= internal::kShamirPrime) {
        return Fail(absl::InvalidArgumentError(
            StrCat("SecAgg client ", self_id_, ": share from ", e.peer, " is not a field element")));
      }
    }
    internal::Cleanse(*plain);
    s.held.emplace(e.peer, h);
  }
  if (s.held.size() < p.threshold) {
    return Fail(absl::AbortedError(StrCat("SecAgg client ", self_id_, ": shares from only ", s.held.size(),
                                          " neighbours, threshold is ", p.threshold)));
  }

  // y_u = x_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)   (mod 2^32)
  MaskedInputMessage out;
  out.session_id = session_id_;
  out.sender = self_id_;
  out.masked.assign(input.begin(), input.end());
  auto self_key = internal::SelfMaskKey(session_id_, self_id_, s.self_seed);
  if (!self_key.ok()) return Fail(self_key.status());
  if (absl::Status st = s.prg.AddMask(*self_key, /*subtract=*/false, out.masked); !st.ok()) {
    return Fail(st);
  }
  internal::Cleanse(*self_key);
  for (const auto& [id, h] : s.held) {
    auto shared = s.mask_key->Agree(s.directory.at(id).mask_key);
    if (!shared.ok()) return Fail(shared.status());
    auto key = internal::PairMaskKey(session_id_, self_id_, id, *shared);
    internal::Cleanse(*shared);
    if (!key.ok()) return Fail(key.status());
    const absl::Status st = s.prg.AddMask(*key, /*subtract=*/id < self_id_, out.masked);
    internal::Cleanse(*key);
    if (!st.ok()) return Fail(st);
  }
  state_ = State::kUnmask;
  return out;
}

// Round 4, Unmasking: one share per listed neighbour, of b_v if v survived, of s_v^SK if it
// dropped.
absl::StatusOr<UnmaskResponseMessage> SecAggClient::Unmask(const UnmaskRequestMessage& request) {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kUnmask, "Unmask"));
  Impl& s = *impl_;
  if (request.session_id != session_id_) {
    return Fail(absl::FailedPreconditionError(StrCat("SecAgg client ", self_id_, ": unmask request is for session ",
                                                     ShortHex(request.session_id), ", expected ", ShortHex(session_id_),
                                                     "; aborting")));
  }
  std::set<uint32_t> survivors, dropped;
  for (auto [list, set, what] :
       {std::tuple(&request.survivors, &survivors, "survivor"), std::tuple(&request.dropped, &dropped, "dropped")}) {
    for (uint32_t id : *list) {
      if (!s.held.count(id)) {
        return Fail(absl::InvalidArgumentError(StrCat("SecAgg client ", self_id_, ": unmask request lists ", what, " ",
                                                      id, ", not a neighbour this client masked with")));
      }
      if (!set->insert(id).second) {
        return Fail(
            absl::InvalidArgumentError(StrCat("SecAgg client ", self_id_, ": unmask request lists ", id, " twice")));
      }
    }
  }
  for (uint32_t id : survivors) {
    if (dropped.count(id)) {
      return Fail(absl::AbortedError(StrCat("SecAgg client ", self_id_,
                                            ": unmask request asks for both the self-mask seed and the mask "
                                            "key of client ",
                                            id, " (that would reveal its input); aborting")));
    }
  }
  if (survivors.size() < s.config.params.threshold) {
    return Fail(absl::AbortedError(StrCat("SecAgg client ", self_id_, ": only ", survivors.size(),
                                          " neighbours survived, threshold is ", s.config.params.threshold,
                                          "; refusing to reveal any share")));
  }
  UnmaskResponseMessage out;
  out.session_id = session_id_;
  out.sender = self_id_;
  out.entries.reserve(survivors.size() + dropped.size());
  for (uint32_t id : survivors) {
    out.entries.push_back({id, ShareKind::kSelfMaskSeed, s.held[id].self_seed});
  }
  for (uint32_t id : dropped) out.entries.push_back({id, ShareKind::kMaskKey, s.held[id].mask_key});
  state_ = State::kDone;
  s.Wipe();
  return out;
}

}  // namespace seedling::privacy
