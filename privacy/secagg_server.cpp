// The SecAgg+ server state machine (secagg.h). Bonawitz et al. 2017 §4 / Bell et al. 2020 Alg. 2
// (server side). U1 ⊇ U2 ⊇ U3 ⊇ U5 are the clients that completed AdvertiseKeys, ShareKeys,
// MaskedInput and Unmask.

#include <algorithm>
#include <set>

#include "base/status.h"
#include "base/strings.h"
#include "privacy/internal/secagg_crypto.h"
#include "privacy/internal/shamir.h"
#include "privacy/secagg.h"

namespace seedling::privacy {
namespace {

constexpr size_t kSecretBytes = 32;

const char* StateName(SecAggServer::State s) {
  switch (s) {
    case SecAggServer::State::kAdvertiseKeys:
      return "AdvertiseKeys";
    case SecAggServer::State::kShareKeys:
      return "ShareKeys";
    case SecAggServer::State::kMaskedInput:
      return "MaskedInput";
    case SecAggServer::State::kUnmask:
      return "Unmask";
    case SecAggServer::State::kDone:
      return "done";
    case SecAggServer::State::kAborted:
      return "aborted";
  }
  return "?";
}

}  // namespace

struct SecAggServer::Impl {
  SessionConfig config;
  NeighborGraph graph;
  std::map<uint32_t, std::vector<uint32_t>> neighbors;  // graph.Neighbors(id) for every id, cached
  internal::MaskPrg prg;
  uint32_t min_survivors;

  std::map<uint32_t, AdvertiseKeysMessage> keys;                       // U1
  std::map<uint32_t, std::map<uint32_t, std::string>> ciphertexts;     // U2: sender → receiver → ct
  std::set<uint32_t> u3;                                               // sent a masked input
  std::vector<uint32_t> accumulator;                                   // (m) Σ_{U3} y_u
  std::map<uint32_t, UnmaskRequestMessage> requests;                   // to U3
  std::set<uint32_t> u5;                                               // answered the unmask request
  std::map<uint32_t, std::vector<internal::ShamirShare>> seed_shares;  // owner ∈ U3 → shares of b
  std::map<uint32_t, std::vector<internal::ShamirShare>> key_shares;   // owner ∈ U2∖U3 → of s^SK

  Impl(SessionConfig c, NeighborGraph g, internal::MaskPrg p)
      : config(std::move(c)), graph(std::move(g)), prg(std::move(p)), min_survivors(MinSurvivors(config.params)) {
    for (uint32_t id : config.cohort) neighbors.emplace(id, graph.Neighbors(id));
  }

  // The neighbours of `id` that are in `set` (a map or set keyed by id), sorted.
  template <typename Set>
  std::vector<uint32_t> NeighborsIn(uint32_t id, const Set& set) const {
    std::vector<uint32_t> out;
    for (uint32_t v : neighbors.at(id)) {
      if (set.count(v)) out.push_back(v);
    }
    return out;
  }
};

SecAggServer::SecAggServer(std::unique_ptr<Impl> impl, const SessionId& session_id)
    : impl_(std::move(impl)), session_id_(session_id) {}
SecAggServer::SecAggServer(SecAggServer&&) noexcept = default;
SecAggServer& SecAggServer::operator=(SecAggServer&&) noexcept = default;
SecAggServer::~SecAggServer() = default;

absl::StatusOr<SecAggServer> SecAggServer::Create(const SessionConfig& config) {
  SEEDLING_ASSIGN_OR_RETURN(const SessionId session_id, ComputeSessionId(config));
  SEEDLING_ASSIGN_OR_RETURN(NeighborGraph graph, NeighborGraph::Build(config, session_id));
  SEEDLING_ASSIGN_OR_RETURN(internal::MaskPrg prg, internal::MaskPrg::Create());
  return SecAggServer(std::make_unique<Impl>(config, std::move(graph), std::move(prg)), session_id);
}

absl::Status SecAggServer::Abort(absl::Status status) {
  state_ = State::kAborted;
  std::fill(impl_->accumulator.begin(), impl_->accumulator.end(), 0);
  impl_->accumulator.clear();
  impl_->seed_shares.clear();
  impl_->key_shares.clear();
  return status;
}

absl::Status SecAggServer::Expect(State state, std::string_view call, const SessionId& session_id) {
  if (state_ == State::kAborted) {
    return absl::AbortedError(StrCat("SecAgg server: ", call, " after the session aborted"));
  }
  if (state_ != state) {
    return absl::FailedPreconditionError(
        StrCat("SecAgg server: ", call, " in stage ", StateName(state_), ", expected ", StateName(state)));
  }
  if (session_id != session_id_) {
    return absl::FailedPreconditionError(StrCat("SecAgg server: ", call, " for another session"));
  }
  return absl::OkStatus();
}

absl::Status SecAggServer::AddAdvertiseKeys(const AdvertiseKeysMessage& message) {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kAdvertiseKeys, "AdvertiseKeys", message.session_id));
  Impl& s = *impl_;
  if (!s.neighbors.count(message.sender)) {
    return absl::InvalidArgumentError(
        StrCat("SecAgg server: AdvertiseKeys from ", message.sender, ", not in the cohort"));
  }
  if (s.keys.count(message.sender)) {
    return absl::AlreadyExistsError(StrCat("SecAgg server: second AdvertiseKeys from ", message.sender));
  }
  s.keys.emplace(message.sender, message);
  return absl::OkStatus();
}

absl::StatusOr<std::map<uint32_t, KeyDirectoryMessage>> SecAggServer::CloseAdvertiseKeys() {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kAdvertiseKeys, "CloseAdvertiseKeys", session_id_));
  Impl& s = *impl_;
  if (s.keys.size() < s.min_survivors) {
    return Abort(absl::AbortedError(
        StrCat("SecAgg server: ", s.keys.size(), " clients advertised keys, need ", s.min_survivors)));
  }
  std::map<uint32_t, KeyDirectoryMessage> out;
  for (const auto& [id, k] : s.keys) {
    KeyDirectoryMessage& d = out[id];
    d.session_id = session_id_;
    for (uint32_t v : s.NeighborsIn(id, s.keys)) {
      const AdvertiseKeysMessage& kv = s.keys.at(v);
      d.entries.push_back({v, kv.encryption_key, kv.mask_key});
    }
  }
  state_ = State::kShareKeys;
  return out;
}

absl::Status SecAggServer::AddShareKeys(const ShareKeysMessage& message) {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kShareKeys, "ShareKeys", message.session_id));
  Impl& s = *impl_;
  if (!s.keys.count(message.sender)) {
    return absl::InvalidArgumentError(
        StrCat("SecAgg server: ShareKeys from ", message.sender, ", which did not advertise keys"));
  }
  if (s.ciphertexts.count(message.sender)) {
    return absl::AlreadyExistsError(StrCat("SecAgg server: second ShareKeys from ", message.sender));
  }
  // The receivers must be exactly the sender's key directory.
  const std::vector<uint32_t> expected = s.NeighborsIn(message.sender, s.keys);
  std::map<uint32_t, std::string> by_receiver;
  for (const EncryptedShare& e : message.shares) {
    if (e.ciphertext.size() != kShareCiphertextBytes) {
      return absl::InvalidArgumentError(StrCat("SecAgg server: ShareKeys from ", message.sender,
                                               " has a ciphertext of ", e.ciphertext.size(), " bytes, expected ",
                                               kShareCiphertextBytes));
    }
    if (!std::binary_search(expected.begin(), expected.end(), e.peer) ||
        !by_receiver.emplace(e.peer, e.ciphertext).second) {
      return absl::InvalidArgumentError(StrCat("SecAgg server: ShareKeys from ", message.sender, " addresses ", e.peer,
                                               ", not a neighbour in its directory (or twice)"));
    }
  }
  if (by_receiver.size() != expected.size()) {
    return absl::InvalidArgumentError(StrCat("SecAgg server: ShareKeys from ", message.sender, " has ",
                                             by_receiver.size(), " shares, expected ", expected.size()));
  }
  s.ciphertexts.emplace(message.sender, std::move(by_receiver));
  return absl::OkStatus();
}

absl::StatusOr<std::map<uint32_t, ShareRelayMessage>> SecAggServer::CloseShareKeys() {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kShareKeys, "CloseShareKeys", session_id_));
  Impl& s = *impl_;
  if (s.ciphertexts.size() < s.min_survivors) {
    return Abort(absl::AbortedError(
        StrCat("SecAgg server: ", s.ciphertexts.size(), " clients shared keys, need ", s.min_survivors)));
  }
  std::map<uint32_t, ShareRelayMessage> out;
  for (const auto& [v, unused] : s.ciphertexts) {
    ShareRelayMessage& r = out[v];
    r.session_id = session_id_;
    for (uint32_t u : s.NeighborsIn(v, s.ciphertexts)) {
      r.shares.push_back({u, s.ciphertexts.at(u).at(v)});
    }
  }
  s.accumulator.assign(s.config.params.vector_length, 0);
  state_ = State::kMaskedInput;
  return out;
}

absl::Status SecAggServer::AddMaskedInput(const MaskedInputMessage& message) {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kMaskedInput, "MaskedInput", message.session_id));
  Impl& s = *impl_;
  if (!s.ciphertexts.count(message.sender)) {
    return absl::InvalidArgumentError(
        StrCat("SecAgg server: MaskedInput from ", message.sender, ", which did not share keys"));
  }
  if (s.u3.count(message.sender)) {
    return absl::AlreadyExistsError(StrCat("SecAgg server: second MaskedInput from ", message.sender));
  }
  if (message.masked.size() != s.accumulator.size()) {
    return absl::InvalidArgumentError(StrCat("SecAgg server: MaskedInput from ", message.sender, " has ",
                                             message.masked.size(), " entries, expected ", s.accumulator.size()));
  }
  uint32_t* acc = s.accumulator.data();
  const uint32_t* y = message.masked.data();
  for (size_t i = 0; i < s.accumulator.size(); ++i) acc[i] += y[i];
  s.u3.insert(message.sender);
  return absl::OkStatus();
}

absl::StatusOr<std::map<uint32_t, UnmaskRequestMessage>> SecAggServer::CloseMaskedInput() {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kMaskedInput, "CloseMaskedInput", session_id_));
  Impl& s = *impl_;
  if (s.u3.size() < s.min_survivors) {
    return Abort(absl::AbortedError(
        StrCat("SecAgg server: ", s.u3.size(), " clients sent masked inputs, need ", s.min_survivors)));
  }
  for (uint32_t u : s.u3) {
    UnmaskRequestMessage& r = s.requests[u];
    r.session_id = session_id_;
    for (uint32_t v : s.NeighborsIn(u, s.ciphertexts)) {
      (s.u3.count(v) ? r.survivors : r.dropped).push_back(v);
    }
  }
  state_ = State::kUnmask;
  return s.requests;
}

absl::Status SecAggServer::AddUnmaskResponse(const UnmaskResponseMessage& message) {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kUnmask, "UnmaskResponse", message.session_id));
  Impl& s = *impl_;
  auto req = s.requests.find(message.sender);
  if (req == s.requests.end()) {
    return absl::InvalidArgumentError(
        StrCat("SecAgg server: UnmaskResponse from ", message.sender, ", which sent no masked input"));
  }
  if (s.u5.count(message.sender)) {
    return absl::AlreadyExistsError(StrCat("SecAgg server: second UnmaskResponse from ", message.sender));
  }
  // Exactly the shares requested: one per listed neighbour, of the kind its fate calls for.
  const UnmaskRequestMessage& r = req->second;
  if (message.entries.size() != r.survivors.size() + r.dropped.size()) {
    return absl::InvalidArgumentError(StrCat("SecAgg server: UnmaskResponse from ", message.sender, " has ",
                                             message.entries.size(), " shares, expected ",
                                             r.survivors.size() + r.dropped.size()));
  }
  std::set<uint32_t> seen;
  for (const UnmaskResponseMessage::Entry& e : message.entries) {
    const bool survivor = std::binary_search(r.survivors.begin(), r.survivors.end(), e.owner);
    const bool dropped = std::binary_search(r.dropped.begin(), r.dropped.end(), e.owner);
    const ShareKind want = survivor ? ShareKind::kSelfMaskSeed : ShareKind::kMaskKey;
    if ((!survivor && !dropped) || e.kind != want || !seen.insert(e.owner).second) {
      return absl::InvalidArgumentError(
          StrCat("SecAgg server: UnmaskResponse from ", message.sender, " has an unrequested share for ", e.owner));
    }
    for (uint64_t v : e.share) {
      if (v >= internal::kShamirPrime) {
        return absl::InvalidArgumentError(
            StrCat("SecAgg server: UnmaskResponse from ", message.sender, " has a non-field share value"));
      }
    }
  }
  for (const UnmaskResponseMessage::Entry& e : message.entries) {
    auto& bucket = e.kind == ShareKind::kSelfMaskSeed ? s.seed_shares : s.key_shares;
    bucket[e.owner].push_back({uint64_t{message.sender} + 1, std::vector<uint64_t>(e.share.begin(), e.share.end())});
  }
  s.u5.insert(message.sender);
  return absl::OkStatus();
}

absl::StatusOr<AggregateResult> SecAggServer::Finish() {
  SEEDLING_RETURN_IF_ERROR(Expect(State::kUnmask, "Finish", session_id_));
  Impl& s = *impl_;
  const SecAggParams& p = s.config.params;
  if (s.u5.size() < s.min_survivors) {
    return Abort(absl::AbortedError(
        StrCat("SecAgg server: ", s.u5.size(), " clients answered the unmask request, need ", s.min_survivors)));
  }
  // Check every threshold before unmasking anything.
  std::vector<uint32_t> dropped;  // U2 ∖ U3
  for (const auto& [v, unused] : s.ciphertexts) {
    if (!s.u3.count(v)) dropped.push_back(v);
  }
  for (uint32_t u : s.u3) {
    if (s.seed_shares[u].size() < p.threshold) {
      return Abort(absl::AbortedError(StrCat("SecAgg server: only ", s.seed_shares[u].size(), " shares of client ", u,
                                             "'s self-mask seed, threshold is ", p.threshold)));
    }
  }
  for (uint32_t v : dropped) {
    if (s.key_shares[v].size() < p.threshold) {
      return Abort(
          absl::AbortedError(StrCat("SecAgg server: only ", s.key_shares[v].size(), " shares of dropped client ", v,
                                    "'s mask key, threshold is ", p.threshold)));
    }
  }
  const int t = static_cast<int>(p.threshold);
  // Remove the self masks of U3: Σ y_u − PRG(b_u).
  for (uint32_t u : s.u3) {
    auto seed = internal::ShamirReconstruct(s.seed_shares[u], t, kSecretBytes);
    if (!seed.ok()) {
      return Abort(absl::DataLossError(StrCat("SecAgg server: self-mask seed of ", u, ": ", seed.status().message())));
    }
    internal::Bytes32 b;
    std::copy(seed->begin(), seed->end(), b.begin());
    auto key = internal::SelfMaskKey(session_id_, u, b);
    internal::Cleanse(b);
    if (!key.ok()) return Abort(key.status());
    if (absl::Status st = s.prg.AddMask(*key, /*subtract=*/true, s.accumulator); !st.ok()) {
      return Abort(st);
    }
  }
  // Remove the pairwise masks survivors w added with dropped neighbours v: w added +PRG(s_wv) if w
  // < v and −PRG(s_wv) if w > v, so the server subtracts in the first case and adds in the second.
  for (uint32_t v : dropped) {
    auto sk = internal::ShamirReconstruct(s.key_shares[v], t, kSecretBytes);
    if (!sk.ok()) {
      return Abort(absl::DataLossError(StrCat("SecAgg server: mask key of ", v, ": ", sk.status().message())));
    }
    internal::Bytes32 sv;
    std::copy(sk->begin(), sk->end(), sv.begin());
    auto key_v = internal::X25519PrivateKey::Create(sv);
    internal::Cleanse(sv);
    if (!key_v.ok()) return Abort(key_v.status());
    if (key_v->public_key() != s.keys.at(v).mask_key) {
      return Abort(absl::DataLossError(
          StrCat("SecAgg server: reconstructed mask key of ", v, " does not match its advertised key")));
    }
    for (uint32_t w : s.NeighborsIn(v, s.u3)) {
      auto shared = key_v->Agree(s.keys.at(w).mask_key);
      if (!shared.ok()) return Abort(shared.status());
      auto key = internal::PairMaskKey(session_id_, v, w, *shared);
      internal::Cleanse(*shared);
      if (!key.ok()) return Abort(key.status());
      if (absl::Status st = s.prg.AddMask(*key, /*subtract=*/w < v, s.accumulator); !st.ok()) {
        return Abort(st);
      }
    }
  }
  AggregateResult result;
  result.sum = std::move(s.accumulator);
  result.survivors.assign(s.u3.begin(), s.u3.end());
  s.seed_shares.clear();
  s.key_shares.clear();
  state_ = State::kDone;
  return result;
}

}  // namespace seedling::privacy
