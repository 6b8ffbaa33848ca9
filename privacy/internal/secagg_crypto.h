#pragma once

// The few cryptographic primitives SecAgg+ needs, on OpenSSL's EVP interface (internal to privacy/):
// SHA-256, X25519, HKDF-SHA256, AES-256-GCM for the encrypted shares, and the AES-128-CTR mask PRG that adds
// (or subtracts) its keystream, read as little-endian uint32 words, into a vector in place.
//
// Every OpenSSL handle is owned by a unique_ptr with its free function as deleter (docs/contributing.md, "Ownership and
// concurrency").

#include <openssl/evp.h>
#include <openssl/kdf.h>

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/openssl.h"

namespace seedling::privacy::internal {

using ::seedling::EvpPkeyCtxPtr;
using ::seedling::EvpPkeyPtr;
using ::seedling::OpenSslDeleter;
using ::seedling::OpenSslErrors;

using EvpCipherPtr = std::unique_ptr<EVP_CIPHER, OpenSslDeleter<&EVP_CIPHER_free>>;
using EvpCipherCtxPtr = std::unique_ptr<EVP_CIPHER_CTX, OpenSslDeleter<&EVP_CIPHER_CTX_free>>;
using EvpKdfPtr = std::unique_ptr<EVP_KDF, OpenSslDeleter<&EVP_KDF_free>>;
using EvpKdfCtxPtr = std::unique_ptr<EVP_KDF_CTX, OpenSslDeleter<&EVP_KDF_CTX_free>>;

using Bytes32 = std::array<uint8_t, 32>;
using Bytes16 = std::array<uint8_t, 16>;

// SHA-256 of `data`.
Bytes32 Sha256(std::span<const uint8_t> data);

// An X25519 private key held as an OpenSSL key, so agreements with many peers pay for one scalar
// multiplication each (building the key from raw bytes costs another: OpenSSL derives the public key).
class X25519PrivateKey {
 public:
  // Internal if OpenSSL fails. The key is clamped by X25519 itself (RFC 7748).
  static absl::StatusOr<X25519PrivateKey> Create(const Bytes32& private_key);

  const Bytes32& public_key() const { return public_key_; }

  // X25519(private key, peer_public_key). InvalidArgument if the peer key is a low-order point (the
  // shared secret would be all zero; OpenSSL refuses it).
  absl::StatusOr<Bytes32> Agree(const Bytes32& peer_public_key) const;

 private:
  X25519PrivateKey(EvpPkeyPtr key, const Bytes32& public_key) : key_(std::move(key)), public_key_(public_key) {}
  EvpPkeyPtr key_;
  Bytes32 public_key_;
};

// The public key of a raw private key (one-off uses; see X25519PrivateKey).
absl::StatusOr<Bytes32> X25519PublicKey(const Bytes32& private_key);

// X25519(private_key, peer_public_key) for a one-off agreement.
absl::StatusOr<Bytes32> X25519Agree(const Bytes32& private_key, const Bytes32& peer_public_key);

// HKDF-SHA256 (RFC 5869) of `ikm` with `salt` and `info`, filling `out` (at most 255 * 32 bytes).
absl::Status HkdfSha256(std::span<const uint8_t> ikm, std::span<const uint8_t> salt, std::span<const uint8_t> info,
                        std::span<uint8_t> out);

// AES-256-GCM with a 96-bit all-zero nonce and a 16-byte tag appended to the ciphertext. The zero nonce is
// safe only because every key passed here is derived for exactly one message (SecAgg derives a fresh key per
// session, sender and receiver); never reuse a key.
inline constexpr size_t kGcmTagBytes = 16;
absl::StatusOr<std::vector<uint8_t>> AesGcmSeal(const Bytes32& key, std::span<const uint8_t> aad,
                                                std::span<const uint8_t> plaintext);
// Unauthenticated (DataLoss would suggest storage) if the tag does not verify: tampered ciphertext, wrong
// key or wrong associated data. InvalidArgument if the ciphertext is shorter than the tag.
absl::StatusOr<std::vector<uint8_t>> AesGcmOpen(const Bytes32& key, std::span<const uint8_t> aad,
                                                std::span<const uint8_t> ciphertext);

// The mask PRG: AES-128-CTR with a zero IV under a 16-byte key; keystream bytes 4i..4i+3, read as a
// little-endian uint32, are word i of the mask. AddMask adds the mask to `inout` modulo 2^32 (or subtracts it
// when `subtract`), streaming through a fixed buffer: no allocation proportional to the vector.
// One instance per thread (it owns an EVP context); reusable for any number of streams.
class MaskPrg {
 public:
  // Internal if OpenSSL has no AES-128-CTR.
  static absl::StatusOr<MaskPrg> Create();

  absl::Status AddMask(const Bytes16& key, bool subtract, std::span<uint32_t> inout);

 private:
  MaskPrg(EvpCipherPtr cipher, EvpCipherCtxPtr ctx) : cipher_(std::move(cipher)), ctx_(std::move(ctx)) {}

  EvpCipherPtr cipher_;
  EvpCipherCtxPtr ctx_;
};

// ---- The SecAgg key schedule. Every derivation is HKDF-SHA256 with the session id as salt and an info
// string "seedling/secagg/v1/<purpose>" followed by little-endian uint32 client ids, so keys never repeat
// across sessions, purposes or directions.

// Key of the AES-256-GCM message carrying sender's shares to receiver:
// HKDF(X25519(c_sender, c_receiver), info = "share-enc" ‖ sender ‖ receiver). Either side computes the
// shared secret with its own private key and the other's public key.
absl::StatusOr<Bytes32> ShareEncryptionKey(const Bytes32& session_id, uint32_t sender, uint32_t receiver,
                                           const Bytes32& shared_secret);

// Associated data of that message: session id ‖ sender ‖ receiver.
std::array<uint8_t, 40> ShareAad(const Bytes32& session_id, uint32_t sender, uint32_t receiver);

// PRG key of the pairwise mask between a and b (order-free): HKDF(X25519(s_a, s_b),
// info = "pair-mask" ‖ min(a, b) ‖ max(a, b)).
absl::StatusOr<Bytes16> PairMaskKey(const Bytes32& session_id, uint32_t a, uint32_t b, const Bytes32& shared_secret);

// PRG key of owner's self mask: HKDF(b_owner, info = "self-mask" ‖ owner).
absl::StatusOr<Bytes16> SelfMaskKey(const Bytes32& session_id, uint32_t owner, const Bytes32& seed);

// Overwrites `bytes` with zeros in a way the compiler may not elide (OPENSSL_cleanse).
void Cleanse(std::span<uint8_t> bytes);

}  // namespace seedling::privacy::internal
