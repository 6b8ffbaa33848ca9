#include "privacy/internal/secagg_crypto.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/params.h>

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string_view>

#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::privacy::internal {
namespace {

absl::Status OpenSslInternal(std::string_view what) { return absl::InternalError(StrCat(what, ": ", OpenSslErrors())); }

// Keystream chunk: 16 KiB keeps the buffer in L1 while amortizing the EVP call.
constexpr size_t kChunkBytes = 16384;
constexpr std::array<uint8_t, kChunkBytes> kZeros{};

absl::StatusOr<EvpPkeyPtr> X25519FromPrivate(const Bytes32& private_key) {
  EvpPkeyPtr key(EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, private_key.data(), private_key.size()));
  if (!key) return OpenSslInternal("X25519 private key");
  return key;
}

}  // namespace

Bytes32 Sha256(std::span<const uint8_t> data) {
  const std::string digest =
      ::seedling::Sha256(std::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
  Bytes32 out;
  std::memcpy(out.data(), digest.data(), out.size());
  return out;
}

absl::StatusOr<X25519PrivateKey> X25519PrivateKey::Create(const Bytes32& private_key) {
  auto key = X25519FromPrivate(private_key);
  if (!key.ok()) return key.status();
  Bytes32 pub;
  size_t len = pub.size();
  if (EVP_PKEY_get_raw_public_key(key->get(), pub.data(), &len) != 1 || len != pub.size()) {
    return OpenSslInternal("X25519 public key");
  }
  return X25519PrivateKey(std::move(*key), pub);
}

absl::StatusOr<Bytes32> X25519PrivateKey::Agree(const Bytes32& peer_public_key) const {
  EvpPkeyPtr peer(
      EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, peer_public_key.data(), peer_public_key.size()));
  if (!peer) return OpenSslInternal("X25519 peer public key");
  EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new(key_.get(), nullptr));
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1) return OpenSslInternal("X25519 derive init");
  if (EVP_PKEY_derive_set_peer(ctx.get(), peer.get()) != 1) {
    return absl::InvalidArgumentError(StrCat("X25519 peer key rejected: ", OpenSslErrors()));
  }
  Bytes32 secret;
  size_t len = secret.size();
  if (EVP_PKEY_derive(ctx.get(), secret.data(), &len) != 1 || len != secret.size()) {
    // OpenSSL fails the derivation when the result is all zero (a low-order peer point).
    return absl::InvalidArgumentError(StrCat("X25519 agreement failed: ", OpenSslErrors()));
  }
  return secret;
}

absl::StatusOr<Bytes32> X25519PublicKey(const Bytes32& private_key) {
  auto key = X25519PrivateKey::Create(private_key);
  if (!key.ok()) return key.status();
  return key->public_key();
}

absl::StatusOr<Bytes32> X25519Agree(const Bytes32& private_key, const Bytes32& peer_public_key) {
  auto key = X25519PrivateKey::Create(private_key);
  if (!key.ok()) return key.status();
  return key->Agree(peer_public_key);
}

absl::Status HkdfSha256(std::span<const uint8_t> ikm, std::span<const uint8_t> salt, std::span<const uint8_t> info,
                        std::span<uint8_t> out) {
  EvpKdfPtr kdf(EVP_KDF_fetch(nullptr, "HKDF", nullptr));
  if (!kdf) return OpenSslInternal("HKDF fetch");
  EvpKdfCtxPtr ctx(EVP_KDF_CTX_new(kdf.get()));
  if (!ctx) return OpenSslInternal("HKDF context");
  char digest[] = "SHA256";
  // OSSL_PARAM wants non-const pointers; OpenSSL only reads them.
  auto* ikm_p = const_cast<uint8_t*>(ikm.data());
  auto* salt_p = const_cast<uint8_t*>(salt.data());
  auto* info_p = const_cast<uint8_t*>(info.data());
  const OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, ikm_p, ikm.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, salt_p, salt.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info_p, info.size()),
      OSSL_PARAM_construct_end(),
  };
  if (EVP_KDF_derive(ctx.get(), out.data(), out.size(), params) != 1) {
    return OpenSslInternal("HKDF derive");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> AesGcmSeal(const Bytes32& key, std::span<const uint8_t> aad,
                                                std::span<const uint8_t> plaintext) {
  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const std::array<uint8_t, 12> nonce{};
  if (!ctx || EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, key.data(), nonce.data()) != 1) {
    return OpenSslInternal("AES-GCM init");
  }
  int len = 0;
  if (!aad.empty() && EVP_EncryptUpdate(ctx.get(), nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1) {
    return OpenSslInternal("AES-GCM aad");
  }
  std::vector<uint8_t> out(plaintext.size() + kGcmTagBytes);
  if (EVP_EncryptUpdate(ctx.get(), out.data(), &len, plaintext.data(), static_cast<int>(plaintext.size())) != 1) {
    return OpenSslInternal("AES-GCM encrypt");
  }
  int final_len = 0;
  if (EVP_EncryptFinal_ex(ctx.get(), out.data() + len, &final_len) != 1 ||
      static_cast<size_t>(len + final_len) != plaintext.size()) {
    return OpenSslInternal("AES-GCM final");
  }
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kGcmTagBytes, out.data() + plaintext.size()) != 1) {
    return OpenSslInternal("AES-GCM tag");
  }
  return out;
}

absl::StatusOr<std::vector<uint8_t>> AesGcmOpen(const Bytes32& key, std::span<const uint8_t> aad,
                                                std::span<const uint8_t> ciphertext) {
  if (ciphertext.size() < kGcmTagBytes) {
    return absl::InvalidArgumentError(
        StrCat("AES-GCM ciphertext has ", ciphertext.size(), " bytes, expected at least ", kGcmTagBytes));
  }
  const size_t body = ciphertext.size() - kGcmTagBytes;
  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const std::array<uint8_t, 12> nonce{};
  if (!ctx || EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, key.data(), nonce.data()) != 1) {
    return OpenSslInternal("AES-GCM init");
  }
  int len = 0;
  if (!aad.empty() && EVP_DecryptUpdate(ctx.get(), nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1) {
    return OpenSslInternal("AES-GCM aad");
  }
  std::vector<uint8_t> out(body);
  if (EVP_DecryptUpdate(ctx.get(), out.data(), &len, ciphertext.data(), static_cast<int>(body)) != 1) {
    return OpenSslInternal("AES-GCM decrypt");
  }
  std::array<uint8_t, kGcmTagBytes> tag;
  std::memcpy(tag.data(), ciphertext.data() + body, kGcmTagBytes);
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kGcmTagBytes, tag.data()) != 1) {
    return OpenSslInternal("AES-GCM set tag");
  }
  int final_len = 0;
  if (EVP_DecryptFinal_ex(ctx.get(), out.data() + len, &final_len) != 1) {
    ERR_clear_error();
    Cleanse(out);
    return absl::UnauthenticatedError("AES-GCM authentication failed (tampered or misaddressed)");
  }
  return out;
}

absl::StatusOr<MaskPrg> MaskPrg::Create() {
  EvpCipherPtr cipher(EVP_CIPHER_fetch(nullptr, "AES-128-CTR", nullptr));
  if (!cipher) return OpenSslInternal("AES-128-CTR fetch");
  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx) return OpenSslInternal("cipher context");
  return MaskPrg(std::move(cipher), std::move(ctx));
}

absl::Status MaskPrg::AddMask(const Bytes16& key, bool subtract, std::span<uint32_t> inout) {
  const std::array<uint8_t, 16> iv{};
  if (EVP_EncryptInit_ex(ctx_.get(), cipher_.get(), nullptr, key.data(), iv.data()) != 1) {
    return OpenSslInternal("AES-CTR init");
  }
  alignas(64) std::array<uint8_t, kChunkBytes> stream;
  constexpr size_t kWordsPerChunk = kChunkBytes / 4;
  for (size_t begin = 0; begin < inout.size(); begin += kWordsPerChunk) {
    const size_t words = std::min(kWordsPerChunk, inout.size() - begin);
    int len = 0;
    if (EVP_EncryptUpdate(ctx_.get(), stream.data(), &len, kZeros.data(), static_cast<int>(words * 4)) != 1 ||
        static_cast<size_t>(len) != words * 4) {
      return OpenSslInternal("AES-CTR keystream");
    }
    uint32_t* out = inout.data() + begin;
    // Little-endian words on every platform (the mask is a wire contract between client and
    // server).
    if (subtract) {
      for (size_t i = 0; i < words; ++i) {
        uint32_t w;
        std::memcpy(&w, stream.data() + 4 * i, 4);
        if constexpr (std::endian::native == std::endian::big) w = __builtin_bswap32(w);
        out[i] -= w;
      }
    } else {
      for (size_t i = 0; i < words; ++i) {
        uint32_t w;
        std::memcpy(&w, stream.data() + 4 * i, 4);
        if constexpr (std::endian::native == std::endian::big) w = __builtin_bswap32(w);
        out[i] += w;
      }
    }
  }
  return absl::OkStatus();
}

namespace {

// "seedling/secagg/v1/<purpose>" followed by the ids, little-endian.
std::vector<uint8_t> Info(std::string_view purpose, std::initializer_list<uint32_t> ids) {
  constexpr std::string_view kPrefix = "seedling/secagg/v1/";
  std::vector<uint8_t> info;
  info.reserve(kPrefix.size() + purpose.size() + 4 * ids.size());
  for (char c : kPrefix) info.push_back(static_cast<uint8_t>(c));
  for (char c : purpose) info.push_back(static_cast<uint8_t>(c));
  for (uint32_t id : ids) {
    for (int i = 0; i < 4; ++i) info.push_back(static_cast<uint8_t>(id >> (8 * i)));
  }
  return info;
}

}  // namespace

absl::StatusOr<Bytes32> ShareEncryptionKey(const Bytes32& session_id, uint32_t sender, uint32_t receiver,
                                           const Bytes32& shared_secret) {
  Bytes32 key;
  SEEDLING_RETURN_IF_ERROR(HkdfSha256(shared_secret, session_id, Info("share-enc", {sender, receiver}), key));
  return key;
}

std::array<uint8_t, 40> ShareAad(const Bytes32& session_id, uint32_t sender, uint32_t receiver) {
  std::array<uint8_t, 40> aad;
  std::memcpy(aad.data(), session_id.data(), 32);
  for (int i = 0; i < 4; ++i) {
    aad[32 + i] = static_cast<uint8_t>(sender >> (8 * i));
    aad[36 + i] = static_cast<uint8_t>(receiver >> (8 * i));
  }
  return aad;
}

absl::StatusOr<Bytes16> PairMaskKey(const Bytes32& session_id, uint32_t a, uint32_t b, const Bytes32& shared_secret) {
  Bytes16 key;
  SEEDLING_RETURN_IF_ERROR(
      HkdfSha256(shared_secret, session_id, Info("pair-mask", {std::min(a, b), std::max(a, b)}), key));
  return key;
}

absl::StatusOr<Bytes16> SelfMaskKey(const Bytes32& session_id, uint32_t owner, const Bytes32& seed) {
  Bytes16 key;
  const absl::Status s = HkdfSha256(seed, session_id, Info("self-mask", {owner}), key);
  if (!s.ok()) return s;
  return key;
}

void Cleanse(std::span<uint8_t> bytes) { OPENSSL_cleanse(bytes.data(), bytes.size()); }

}  // namespace seedling::privacy::internal
