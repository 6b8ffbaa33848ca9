#pragma once

// Frames: a 4-byte big-endian length, then that many bytes of one serialized Envelope (docs/protocol.md).

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "comms/proto/seedling.pb.h"

namespace seedling::comms {

// Serializes `envelope` with its length prefix. InvalidArgument if it exceeds `max_bytes`.
absl::StatusOr<std::string> EncodeFrame(const v1::Envelope& envelope, size_t max_bytes);

// Reads the length prefix: ResourceExhausted if it exceeds `max_bytes` (nothing is allocated for the
// body), InvalidArgument for a zero length.
absl::StatusOr<uint32_t> DecodeFrameLength(const uint8_t header[4], size_t max_bytes);

// Parses a frame body. InvalidArgument ("malformed envelope") if it is not a valid Envelope, has no body,
// or has a protocol_version other than 1 (FailedPrecondition for that one).
absl::StatusOr<v1::Envelope> DecodeFrameBody(std::string_view body);

// Incremental decoder for byte streams (tests, fuzzing, the in-memory transport): feed bytes, take whole
// frames. Once it has reported an error it stays failed.
class FrameDecoder {
 public:
  explicit FrameDecoder(size_t max_bytes) : max_bytes_(max_bytes) {}
  void set_max_bytes(size_t max_bytes) { max_bytes_ = max_bytes; }
  // Appends bytes (never more than the current frame can need beyond its declared length).
  // Bytes of following frames are kept too; every length prefix is checked against the limit as soon as
  // its 4 bytes have arrived, and after a bad one nothing more is buffered (a 4 GiB prefix costs nothing).
  void Feed(std::string_view bytes);
  // The next complete frame, std::nullopt if more bytes are needed, or the error.
  absl::StatusOr<std::optional<v1::Envelope>> Next();

 private:
  size_t max_bytes_;
  std::string buffer_;
  absl::Status error_;
};

}  // namespace seedling::comms
