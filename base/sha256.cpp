#include "base/sha256.h"

#include <openssl/evp.h>

#include "base/check.h"

namespace seedling {

struct Sha256Hasher::Context {
  struct Free {
    void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
  };
  std::unique_ptr<EVP_MD_CTX, Free> ctx{EVP_MD_CTX_new()};
};

std::string Sha256(std::string_view bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  SEEDLING_CHECK(EVP_Digest(bytes.data(), bytes.size(), digest, &len, EVP_sha256(), nullptr) == 1);
  return std::string(reinterpret_cast<const char*>(digest), len);
}

std::string HexOf(std::string_view raw) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * raw.size());
  for (unsigned char c : raw) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

std::string Sha256Hex(std::string_view bytes) { return HexOf(Sha256(bytes)); }

Sha256Hasher::Sha256Hasher() : context_(std::make_unique<Context>()) {
  SEEDLING_CHECK(context_->ctx != nullptr && EVP_DigestInit_ex(context_->ctx.get(), EVP_sha256(), nullptr) == 1);
}

Sha256Hasher::~Sha256Hasher() = default;

void Sha256Hasher::Update(std::string_view bytes) {
  SEEDLING_CHECK(EVP_DigestUpdate(context_->ctx.get(), bytes.data(), bytes.size()) == 1);
}

std::string Sha256Hasher::Finish() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  SEEDLING_CHECK(EVP_DigestFinal_ex(context_->ctx.get(), digest, &len) == 1);
  SEEDLING_CHECK(EVP_DigestInit_ex(context_->ctx.get(), EVP_sha256(), nullptr) == 1);
  return std::string(reinterpret_cast<const char*>(digest), len);
}

}  // namespace seedling
