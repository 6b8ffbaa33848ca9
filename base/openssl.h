#pragma once

// OpenSSL handles owned by unique_ptr (docs/contributing.md, "Ownership and concurrency"), and the error queue
// as text: shared by comms/ (TLS, certificates) and privacy/ (SecAgg+ cryptography).

#include <openssl/evp.h>

#include <memory>
#include <string>

namespace seedling {

// Calls the OpenSSL free function `Free` on destruction.
template <auto Free>
struct OpenSslDeleter {
  template <typename T>
  void operator()(T* p) const {
    Free(p);
  }
};

using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, OpenSslDeleter<&EVP_PKEY_free>>;
using EvpPkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, OpenSslDeleter<&EVP_PKEY_CTX_free>>;

// Drains this thread's OpenSSL error queue into "reason; reason" ("no OpenSSL error" if empty).
std::string OpenSslErrors();

}  // namespace seedling
