#pragma once

// SHA-256 (OpenSSL's EVP implementation, which uses the CPU's SHA extensions where present) and hex.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace seedling {

// The 32-byte digest of `bytes`.
std::string Sha256(std::string_view bytes);

// Lower-case hex of raw bytes ("a1fe..."), e.g. of a digest.
std::string HexOf(std::string_view raw);

// The 64-character hex digest of `bytes`: HexOf(Sha256(bytes)).
std::string Sha256Hex(std::string_view bytes);

// An incremental SHA-256 over pieces of data, for streams too large to hold at once.
class Sha256Hasher {
 public:
  Sha256Hasher();
  ~Sha256Hasher();
  Sha256Hasher(const Sha256Hasher&) = delete;
  Sha256Hasher& operator=(const Sha256Hasher&) = delete;

  void Update(std::string_view bytes);
  void Update(const void* data, size_t size) { Update(std::string_view(static_cast<const char*>(data), size)); }
  // The 32-byte digest of everything added; the hasher starts over afterwards.
  std::string Finish();

 private:
  struct Context;
  std::unique_ptr<Context> context_;
};

}  // namespace seedling
