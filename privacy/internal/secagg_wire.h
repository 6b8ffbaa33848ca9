#pragma once

// Byte writer and bounds-checked reader for the SecAgg message encoding (secagg.h, "Wire format"). Internal.

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "base/strings.h"

namespace seedling::privacy::internal {

inline constexpr char kWireMagic[2] = {'S', 'A'};
inline constexpr uint8_t kWireVersion = 1;

class WireWriter {
 public:
  explicit WireWriter(uint8_t type, size_t reserve = 0) {
    out_.reserve(4 + reserve);
    out_.append(kWireMagic, 2);
    U8(kWireVersion);
    U8(type);
  }
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v) {
    for (int i = 0; i < 4; ++i) U8(static_cast<uint8_t>(v >> (8 * i)));
  }
  void U64(uint64_t v) {
    for (int i = 0; i < 8; ++i) U8(static_cast<uint8_t>(v >> (8 * i)));
  }
  template <size_t N>
  void Fixed(const std::array<uint8_t, N>& a) {
    out_.append(reinterpret_cast<const char*>(a.data()), N);
  }
  void Bytes(std::string_view s) {  // uint32 length, then the bytes
    U32(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

// Every read checks the bytes left first; the first failure sticks and later reads return zeros, so a
// parser reads all fields and checks status() once (plus before any allocation sized by the input).
class WireReader {
 public:
  WireReader(std::string_view in, uint8_t type, std::string_view what) : in_(in), what_(what) {
    if (in_.size() < 4 || in_[0] != kWireMagic[0] || in_[1] != kWireMagic[1]) {
      Fail("missing the \"SA\" header");
      return;
    }
    if (static_cast<uint8_t>(in_[2]) != kWireVersion) {
      Fail(StrCat("version ", static_cast<int>(static_cast<uint8_t>(in_[2])), ", expected ",
                  static_cast<int>(kWireVersion)));
      return;
    }
    if (static_cast<uint8_t>(in_[3]) != type) {
      Fail(StrCat("message type ", static_cast<int>(static_cast<uint8_t>(in_[3])), ", expected ",
                  static_cast<int>(type)));
      return;
    }
    pos_ = 4;
  }

  uint8_t U8() {
    if (!Need(1)) return 0;
    return static_cast<uint8_t>(in_[pos_++]);
  }
  uint32_t U32() {
    if (!Need(4)) return 0;
    uint32_t v = 0;
    for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(in_[pos_ + i]);
    pos_ += 4;
    return v;
  }
  uint64_t U64() {
    if (!Need(8)) return 0;
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(in_[pos_ + i]);
    pos_ += 8;
    return v;
  }
  template <size_t N>
  void Fixed(std::array<uint8_t, N>& a) {
    if (!Need(N)) return;
    std::memcpy(a.data(), in_.data() + pos_, N);
    pos_ += N;
  }
  // A length-prefixed byte string of at most `max_len` bytes.
  std::string Bytes(size_t max_len) {
    const uint32_t len = U32();
    if (!ok()) return {};
    if (len > max_len) {
      Fail(StrCat("a byte field of ", len, " bytes exceeds the limit ", max_len));
      return {};
    }
    if (!Need(len)) return {};
    std::string s(in_.substr(pos_, len));
    pos_ += len;
    return s;
  }
  // A list count: fails unless count ≤ max_count and count · min_item_bytes fit in the bytes left, so a
  // forged count never drives an allocation.
  uint32_t Count(uint32_t max_count, size_t min_item_bytes) {
    const uint32_t n = U32();
    if (!ok()) return 0;
    if (n > max_count) {
      Fail(StrCat("list of ", n, " items exceeds the limit ", max_count));
      return 0;
    }
    if (static_cast<uint64_t>(n) * min_item_bytes > in_.size() - pos_) {
      Fail(StrCat("list of ", n, " items needs at least ", static_cast<uint64_t>(n) * min_item_bytes, " bytes, ",
                  in_.size() - pos_, " left"));
      return 0;
    }
    return n;
  }

  void Fail(std::string_view why) {
    if (status_.ok()) status_ = absl::InvalidArgumentError(StrCat("malformed ", what_, ": ", why));
  }
  bool ok() const { return status_.ok(); }
  const char* Cursor() const { return in_.data() + pos_; }
  size_t Remaining() const { return in_.size() - pos_; }
  void Skip(size_t n) { pos_ += n; }

  // OK only if every read succeeded and no bytes are left over.
  absl::Status Finish() {
    if (ok() && pos_ != in_.size()) {
      Fail(StrCat(in_.size() - pos_, " trailing bytes"));
    }
    return status_;
  }

 private:
  bool Need(size_t n) {
    if (!ok()) return false;
    if (in_.size() - pos_ < n) {
      Fail(StrCat("truncated: needed ", n, " more bytes at offset ", pos_, ", ", in_.size() - pos_, " left"));
      return false;
    }
    return true;
  }

  std::string_view in_;
  std::string_view what_;
  size_t pos_ = 0;
  absl::Status status_;
};

}  // namespace seedling::privacy::internal
