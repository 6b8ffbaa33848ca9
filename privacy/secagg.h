#pragma once

// SecAgg+ secure aggregation (Bell et al., CCS 2020), with SecAgg (Bonawitz et al., CCS 2017) as the special
// case of a complete neighbour graph. docs/architecture.md, "Privacy"; docs/methods.md, "Secure aggregation (SecAgg+)".
//
// The server learns Σ_u x_u mod 2^32 over the surviving clients and nothing else about any single x_u
// (semi-honest server; the active-adversary consistency-check round is not implemented). Four stages, each a
// request/response between a client state machine (SecAggClient, on the phone) and a server state machine
// (SecAggServer); the server relays everything between clients:
//
//   0 AdvertiseKeys  client → server  two X25519 public keys: c_u (encryption) and s_u (masks)
//                    server → client  KeyDirectory: the keys of the client's graph neighbours that advertised
//   1 ShareKeys      client → server  for each neighbour v, AES-256-GCM(Shamir t-of-k shares of the self-mask
//                                     seed b_u and of s_u^SK), key = HKDF(X25519(c_u^SK, c_v^PK))
//                    server → client  ShareRelay: the ciphertexts addressed to the client
//   2 MaskedInput    client → server  y_u = x_u + PRG(b_u) + Σ_{v∈N(u), v>u} PRG(s_uv) − Σ_{v∈N(u), v<u} PRG(s_uv)
//                                     over the neighbours v whose shares arrived, s_uv = KA(s_u, s_v)
//                    server → client  UnmaskRequest: which neighbours survived and which dropped
//   3 Unmask         client → server  shares of b_v for surviving v, of s_v^SK for dropped v (never both)
//
// The server then reconstructs each b_v and each dropped s_v^SK, removes the masks and outputs the sum.
//
// Session binding: session id = SHA-256(round index, model version hash, sorted cohort ids, parameters). It is
// in every message, is the HKDF salt of every key, and is in the AES-GCM associated data, so a client whose
// view (model hash, cohort) differs from the server's or its neighbours' aborts.
//
// Errors abort a client for good (every later call returns FailedPrecondition): a message for another session
// (FailedPrecondition), an out-of-order call (FailedPrecondition), a tampered or misaddressed share
// (Unauthenticated), too few neighbours left (Aborted), a malformed message (InvalidArgument). The server
// treats a client that errored as dropped. The server aborts (Aborted, releasing nothing) when survivors fall
// below n − ⌊δ·n⌋ at any stage or a secret lacks t shares.
//
// Not thread-safe: one thread drives one client or server object.

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/philox.h"

namespace seedling::privacy {

// ---- Randomness ---------------------------------------------------------------------------------------------

// Where key pairs, self-mask seeds and Shamir coefficients come from (a seam so that the simulator can be
// reproducible). Implementations need not be thread-safe.
class RandomSource {
 public:
  virtual ~RandomSource() = default;
  // Fills `out` with random bytes; Internal if the source fails.
  virtual absl::Status Fill(std::span<uint8_t> out) = 0;
};

// The operating system's CSPRNG through OpenSSL (RAND_bytes). Use this on devices and servers.
class OsRandomSource final : public RandomSource {
 public:
  absl::Status Fill(std::span<uint8_t> out) override;
};

// NOT SECURE: a deterministic stream SHA-256("seedling/secagg/seeded" ‖ seed ‖ counter), for tests and the
// simulator only (docs/contributing.md, "Memory and numbers"), so a simulated round replays bit for bit. Anyone who
// knows the seed knows every key.
class SeededRandomSourceForSimulation final : public RandomSource {
 public:
  explicit SeededRandomSourceForSimulation(uint64_t seed) : seed_(seed) {}
  absl::Status Fill(std::span<uint8_t> out) override;

 private:
  uint64_t seed_;
  uint64_t counter_ = 0;
  std::array<uint8_t, 32> block_{};
  size_t used_ = 32;  // bytes of block_ already handed out
};

// ---- Parameters ---------------------------------------------------------------------------------------------

// Every field must be set (there is no sensible default cohort); ValidateParams states the rules.
struct SecAggParams {
  uint32_t num_clients = 0;                 // n: cohort size (clients invited to the session)
  uint32_t num_neighbors = 0;               // k: degree of the neighbour graph; n − 1 = complete graph (SecAgg)
  uint32_t threshold = 0;                   // t: Shamir shares needed to reconstruct a secret; t > k/2, t ≤ k
  double max_dropout_fraction = 0.1;        // δ: fraction of the cohort that may drop over the whole session
  uint32_t vector_length = 0;               // m: uint32 entries masked = model entries + 1 (the weight slot)
  uint32_t quantization_levels = 1u << 16;  // Q: a clipped value maps to an integer in [0, Q − 1]
  uint32_t max_weight = 1;                  // W: largest integer weight a client may give its input
  float clipping_range = 8.0f;              // c: values are clipped to [−c, c] before quantization
};

inline constexpr uint32_t kMaxVectorLength = 1u << 28;  // 1 GiB of uint32: refuses absurd sizes early

// The smallest degree accepted for a cohort of n: min(n − 1, 2·⌈log2 n⌉). This refuses degenerate graphs
// only; the degree that gives Bell et al.'s security and correctness bounds for a corrupt fraction γ and
// dropout fraction δ is larger (their Theorem 6.2 / Table 2) and is the operator's choice.
uint32_t MinNeighbors(uint32_t num_clients);

// The fewest survivors a session accepts at any stage: n − ⌊δ·n⌋ (computed with a 1e-9 guard so that
// δ = 0.1, n = 10 gives 9).
uint32_t MinSurvivors(const SecAggParams& params);

// InvalidArgument, with the violated rule and the numbers, unless all of these hold:
//  * n ≥ 3 (with two clients the sum reveals the other's input);
//  * k ≤ n − 1, k ≥ MinNeighbors(n), and k even unless k = n − 1 (the ring construction below);
//  * k/2 < t ≤ k: an honest client reveals only one of b_v or s_v^SK per neighbour, so with t > k/2 the
//    server can never collect t shares of both;
//  * 0 ≤ δ < 1/2, and t still reachable after dropouts: t ≤ k − ⌊δ·n⌋ for the complete graph (worst case:
//    every dropout is a neighbour), t ≤ k − ⌈δ·k⌉ for a sparse graph (a neighbourhood losing its share of
//    dropouts; with random dropouts this holds with high probability, and a session where it does not
//    aborts rather than releasing anything);
//  * no overflow: n · W · (Q − 1) ≤ 2^32 − 1. Each client contributes per entry w·q with q ∈ [0, Q − 1]
//    (the clipped value mapped affinely from [−c, c]) and w ∈ [0, W], so the sum over all n clients (none
//    dropping is the worst case) is below the modulus 2^32 and the modular sum equals the integer sum.
//    The clipping range c does not enter: it only sets the resolution 2c/(Q − 1). Q ≥ 2, W ≥ 1;
//  * c finite and > 0; 1 ≤ m ≤ kMaxVectorLength.
absl::Status ValidateParams(const SecAggParams& params);

// The largest Q that n clients with weights up to W can use without overflow: ⌊(2^32 − 1)/(n·W)⌋ + 1.
uint32_t MaxQuantizationLevels(uint32_t num_clients, uint32_t max_weight);

// ---- Session ------------------------------------------------------------------------------------------------

using SessionId = std::array<uint8_t, 32>;
using PublicKey = std::array<uint8_t, 32>;

// What both sides must agree on. The server sends it with the task (SetupMessage); a client fills
// model_hash from the model it actually downloaded and verified, not from the server's word.
struct SessionConfig {
  SecAggParams params;
  uint64_t round_index = 0;
  std::string model_hash;        // model version hash (bytes or hex), bound into the session id
  std::vector<uint32_t> cohort;  // participant ids, distinct, any order; size n
};

// SHA-256 over a versioned encoding of (round index, model hash, sorted cohort, parameters). InvalidArgument
// if the parameters are invalid or the cohort does not have n distinct ids.
absl::StatusOr<SessionId> ComputeSessionId(const SessionConfig& config);

// The neighbour graph: a Harary graph with a random assignment of clients to nodes (the k-nearest-on-a-ring
// construction Flower's SecAgg+ uses; Bell et al. analyse random k-regular graphs): the cohort is shuffled by
// Fisher–Yates driven by SHA-256(session id ‖ "graph" ‖ counter), placed on a ring, and each client is joined to the
// k/2 nearest on each side (k even), or to everyone when k = n − 1. The graph is k-regular, symmetric, and every party
// derives the same one from the session id.
class NeighborGraph {
 public:
  static absl::StatusOr<NeighborGraph> Build(const SessionConfig& config, const SessionId& session_id);

  // Sorted neighbour ids of `id` (k of them); empty if `id` is not in the cohort. O(k log k).
  std::vector<uint32_t> Neighbors(uint32_t id) const;
  // O(log n).
  bool AreNeighbors(uint32_t a, uint32_t b) const;

 private:
  // O(n) state, so every phone can hold the graph: the ring order and each id's position on it.
  uint32_t degree_ = 0;
  std::vector<uint32_t> ring_;
  std::map<uint32_t, uint32_t> position_;
};

// ---- Quantization -------------------------------------------------------------------------------------------

enum class Rounding : uint8_t {
  kNearest = 0,     // q = ⌊v + 1/2⌋: deterministic, biased by up to half a step per entry
  kStochastic = 1,  // q = ⌊v + u⌋, u ~ U[0, 1) from a seeded Philox stream: unbiased
};

// The secured vector for one client: [w, w·q(x_0), …, w·q(x_{m−2})], with
// q(x) = round((clip(x, −c, c) + c) / (2c) · (Q − 1)) ∈ [0, Q − 1]. Slot 0 carries the weight so the server
// learns Σw and can dequantize. `stochastic_key` is used only for kStochastic. InvalidArgument if
// x.size() ≠ m − 1, x has a NaN or infinity, or weight > W.
absl::StatusOr<std::vector<uint32_t>> EncodeInput(std::span<const float> x, uint32_t weight, const SecAggParams& params,
                                                  Rounding rounding, RngKey stochastic_key = {});

// Dequantized aggregate: Σ_u w_u·x_u per entry (divide by total_weight for the weighted mean), from
// Σ w·q = sum[1 + i] and Σ w = sum[0]: Σ w·x = sum[1 + i] · 2c/(Q − 1) − c · Σ w.
struct DecodedAggregate {
  uint64_t total_weight = 0;
  std::vector<float> weighted_sum;  // (m − 1)
};
absl::StatusOr<DecodedAggregate> DecodeAggregate(std::span<const uint32_t> sum, const SecAggParams& params);

// ---- Messages -----------------------------------------------------------------------------------------------
//
// Wire format (carried as `bytes` by the transport): "SA", version byte 1, message-type byte, then fields in
// little-endian; lists are a uint32 count then the items. Parse returns InvalidArgument for a wrong magic,
// version or type, truncation, a count larger than the bytes left or the limits above, and trailing bytes.

// Server → client with the task: the session's configuration. The client must replace model_hash with its own.
struct SetupMessage {
  SessionConfig config;
  std::string Serialize() const;
  static absl::StatusOr<SetupMessage> Parse(std::string_view bytes);
};

// Stage 0, client → server.
struct AdvertiseKeysMessage {
  SessionId session_id{};
  uint32_t sender = 0;
  PublicKey encryption_key{};  // c_u^PK
  PublicKey mask_key{};        // s_u^PK
  std::string Serialize() const;
  static absl::StatusOr<AdvertiseKeysMessage> Parse(std::string_view bytes);
};

// Stage 0, server → client: the keys of the client's neighbours that advertised.
struct KeyDirectoryMessage {
  struct Entry {
    uint32_t id = 0;
    PublicKey encryption_key{};
    PublicKey mask_key{};
  };
  SessionId session_id{};
  std::vector<Entry> entries;
  std::string Serialize() const;
  static absl::StatusOr<KeyDirectoryMessage> Parse(std::string_view bytes);
};

// One encrypted share pair from `sender` to `receiver` (the side not implied by the message).
struct EncryptedShare {
  uint32_t peer = 0;       // receiver in ShareKeysMessage, sender in ShareRelayMessage
  std::string ciphertext;  // AES-256-GCM, kShareCiphertextBytes
};
inline constexpr size_t kShareCiphertextBytes = 4 + 4 + 2 * 5 * 8 + 16;  // ids, 2 shares, GCM tag

// Stage 1, client → server: one ciphertext per neighbour in the client's key directory.
struct ShareKeysMessage {
  SessionId session_id{};
  uint32_t sender = 0;
  std::vector<EncryptedShare> shares;
  std::string Serialize() const;
  static absl::StatusOr<ShareKeysMessage> Parse(std::string_view bytes);
};

// Stage 1, server → client: the ciphertexts neighbours addressed to this client.
struct ShareRelayMessage {
  SessionId session_id{};
  std::vector<EncryptedShare> shares;
  std::string Serialize() const;
  static absl::StatusOr<ShareRelayMessage> Parse(std::string_view bytes);
};

// Stage 2, client → server.
struct MaskedInputMessage {
  SessionId session_id{};
  uint32_t sender = 0;
  std::vector<uint32_t> masked;  // (m)
  std::string Serialize() const;
  static absl::StatusOr<MaskedInputMessage> Parse(std::string_view bytes);
};

// Stage 2, server → client: the client's neighbours (among those it masked with) split by fate.
struct UnmaskRequestMessage {
  SessionId session_id{};
  std::vector<uint32_t> survivors;  // sent a masked input: reveal their self-mask seed share
  std::vector<uint32_t> dropped;    // did not: reveal their mask-key share
  std::string Serialize() const;
  static absl::StatusOr<UnmaskRequestMessage> Parse(std::string_view bytes);
};

enum class ShareKind : uint8_t { kSelfMaskSeed = 1, kMaskKey = 2 };

// Stage 3, client → server.
struct UnmaskResponseMessage {
  struct Entry {
    uint32_t owner = 0;  // whose secret this is a share of
    ShareKind kind = ShareKind::kSelfMaskSeed;
    std::array<uint64_t, 5> share{};  // Shamir share over GF(2^61 − 1) at x = sender + 1
  };
  SessionId session_id{};
  uint32_t sender = 0;
  std::vector<Entry> entries;
  std::string Serialize() const;
  static absl::StatusOr<UnmaskResponseMessage> Parse(std::string_view bytes);
};

// ---- Client -------------------------------------------------------------------------------------------------

class SecAggClient {
 public:
  enum class State { kAdvertiseKeys, kShareKeys, kMaskedInput, kUnmask, kDone, kAborted };

  // InvalidArgument if the config is invalid or `self_id` is not in the cohort. `random` must outlive the
  // client (OsRandomSource on a device).
  static absl::StatusOr<SecAggClient> Create(const SessionConfig& config, uint32_t self_id, RandomSource& random);

  // Stage 0: draws the two key pairs.
  absl::StatusOr<AdvertiseKeysMessage> AdvertiseKeys();
  // Stage 1: checks the directory (session, only neighbours, distinct keys, at least t), then draws b_u and
  // encrypts one share pair per listed neighbour.
  absl::StatusOr<ShareKeysMessage> ShareKeys(const KeyDirectoryMessage& directory);
  // Stage 2: decrypts and checks the relayed shares (at least t), then masks `input` (m entries, each
  // ≤ W·(Q − 1), e.g. from EncodeInput).
  absl::StatusOr<MaskedInputMessage> MaskInput(const ShareRelayMessage& relay, std::span<const uint32_t> input);
  // Stage 3: refuses (Aborted) if fewer than t neighbours survived or any id is listed both as survivor and
  // as dropped; otherwise reveals one share per listed neighbour.
  absl::StatusOr<UnmaskResponseMessage> Unmask(const UnmaskRequestMessage& request);

  State state() const { return state_; }
  uint32_t id() const { return self_id_; }
  const SessionId& session_id() const { return session_id_; }

  SecAggClient(SecAggClient&&) noexcept;
  SecAggClient& operator=(SecAggClient&&) noexcept;
  ~SecAggClient();

 private:
  struct Impl;
  SecAggClient(std::unique_ptr<Impl> impl, uint32_t self_id, const SessionId& session_id);
  absl::Status Fail(absl::Status status);  // moves to kAborted and returns `status`
  absl::Status Expect(State state, std::string_view call);

  std::unique_ptr<Impl> impl_;
  uint32_t self_id_;
  SessionId session_id_;
  State state_ = State::kAdvertiseKeys;
};

// ---- Server -------------------------------------------------------------------------------------------------

struct AggregateResult {
  std::vector<uint32_t> sum;        // (m) Σ_{u ∈ survivors} input_u mod 2^32
  std::vector<uint32_t> survivors;  // sorted ids whose input is in the sum
};

// Collect messages of a stage with Add*, then Close* at the deadline (or when all arrived) to get the
// messages for the next stage, one per client still in the session. A rejected message changes nothing and
// its sender counts as dropped. Memory is O(m + n·k): masked inputs are added into one accumulator on arrival.
class SecAggServer {
 public:
  enum class State { kAdvertiseKeys, kShareKeys, kMaskedInput, kUnmask, kDone, kAborted };

  // InvalidArgument if the config is invalid.
  static absl::StatusOr<SecAggServer> Create(const SessionConfig& config);

  // Add*: FailedPrecondition in the wrong stage or for another session, InvalidArgument for a sender not
  // entitled to this stage or malformed content, AlreadyExists for a duplicate.
  absl::Status AddAdvertiseKeys(const AdvertiseKeysMessage& message);
  absl::StatusOr<std::map<uint32_t, KeyDirectoryMessage>> CloseAdvertiseKeys();
  absl::Status AddShareKeys(const ShareKeysMessage& message);
  absl::StatusOr<std::map<uint32_t, ShareRelayMessage>> CloseShareKeys();
  absl::Status AddMaskedInput(const MaskedInputMessage& message);
  absl::StatusOr<std::map<uint32_t, UnmaskRequestMessage>> CloseMaskedInput();
  absl::Status AddUnmaskResponse(const UnmaskResponseMessage& message);
  // Reconstructs, unmasks and returns the sum. Aborted (nothing released) if too few responded or a secret
  // lacks t shares; DataLoss if reconstructed shares are inconsistent with an advertised key.
  absl::StatusOr<AggregateResult> Finish();

  State state() const { return state_; }
  const SessionId& session_id() const { return session_id_; }

  SecAggServer(SecAggServer&&) noexcept;
  SecAggServer& operator=(SecAggServer&&) noexcept;
  ~SecAggServer();

 private:
  struct Impl;
  SecAggServer(std::unique_ptr<Impl> impl, const SessionId& session_id);
  absl::Status Abort(absl::Status status);
  absl::Status Expect(State state, std::string_view call, const SessionId& session_id);

  std::unique_ptr<Impl> impl_;
  SessionId session_id_;
  State state_ = State::kAdvertiseKeys;
};

}  // namespace seedling::privacy
