#include "comms/framing.h"

#include <climits>

#include "base/strings.h"

namespace seedling::comms {
namespace {

constexpr size_t kHeaderBytes = 4;
constexpr uint32_t kProtocolVersion = 1;

uint32_t ReadBigEndian32(const uint8_t b[4]) {
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
}

}  // namespace

absl::StatusOr<std::string> EncodeFrame(const v1::Envelope& envelope, size_t max_bytes) {
  const size_t body_bytes = envelope.ByteSizeLong();
  if (body_bytes > max_bytes || body_bytes > UINT32_MAX) {
    return absl::InvalidArgumentError(
        StrCat("envelope of ", body_bytes, " bytes exceeds the frame limit of ", max_bytes, " bytes"));
  }
  std::string frame(kHeaderBytes + body_bytes, '\0');
  const auto n = static_cast<uint32_t>(body_bytes);
  frame[0] = static_cast<char>(n >> 24);
  frame[1] = static_cast<char>(n >> 16);
  frame[2] = static_cast<char>(n >> 8);
  frame[3] = static_cast<char>(n);
  if (!envelope.SerializeToArray(frame.data() + kHeaderBytes, static_cast<int>(body_bytes))) {
    return absl::InvalidArgumentError("envelope could not be serialized");
  }
  return frame;
}

absl::StatusOr<uint32_t> DecodeFrameLength(const uint8_t header[4], size_t max_bytes) {
  const uint32_t length = ReadBigEndian32(header);
  if (length == 0) return absl::InvalidArgumentError("malformed frame: zero length");
  if (length > max_bytes) {
    return absl::ResourceExhaustedError(
        StrCat("frame of ", length, " bytes exceeds the limit of ", max_bytes, " bytes"));
  }
  return length;
}

absl::StatusOr<v1::Envelope> DecodeFrameBody(std::string_view body) {
  v1::Envelope envelope;
  if (body.size() > static_cast<size_t>(INT_MAX) ||
      !envelope.ParseFromArray(body.data(), static_cast<int>(body.size()))) {
    return absl::InvalidArgumentError(StrCat("malformed envelope (", body.size(), " bytes)"));
  }
  // The version first: a newer peer's envelope may carry a body this version does not know.
  if (envelope.protocol_version() != kProtocolVersion) {
    return absl::FailedPreconditionError(
        StrCat("unsupported protocol_version ", envelope.protocol_version(), ", expected ", kProtocolVersion));
  }
  if (envelope.body_case() == v1::Envelope::BODY_NOT_SET) {
    return absl::InvalidArgumentError("malformed envelope: no body");
  }
  return envelope;
}

// Invariant: buffer_ holds the unconsumed bytes of the stream; every length prefix that is complete
// in it has been checked against the limit, so a bad one stops buffering as soon as its 4 bytes
// arrived.
void FrameDecoder::Feed(std::string_view bytes) {
  if (!error_.ok()) return;
  buffer_.append(bytes.data(), bytes.size());
  size_t pos = 0;
  while (pos + kHeaderBytes <= buffer_.size()) {
    absl::StatusOr<uint32_t> length =
        DecodeFrameLength(reinterpret_cast<const uint8_t*>(buffer_.data() + pos), max_bytes_);
    if (!length.ok()) {
      error_ = length.status();
      std::string().swap(buffer_);
      return;
    }
    pos += kHeaderBytes + *length;
  }
}

absl::StatusOr<std::optional<v1::Envelope>> FrameDecoder::Next() {
  if (!error_.ok()) return error_;
  if (buffer_.size() < kHeaderBytes) return std::nullopt;
  // Checked again: the limit may have changed since the bytes were fed.
  absl::StatusOr<uint32_t> length = DecodeFrameLength(reinterpret_cast<const uint8_t*>(buffer_.data()), max_bytes_);
  if (!length.ok()) {
    error_ = length.status();
    std::string().swap(buffer_);
    return error_;
  }
  if (buffer_.size() - kHeaderBytes < *length) return std::nullopt;
  absl::StatusOr<v1::Envelope> envelope = DecodeFrameBody(std::string_view(buffer_).substr(kHeaderBytes, *length));
  if (!envelope.ok()) {
    error_ = envelope.status();
    std::string().swap(buffer_);
    return error_;
  }
  buffer_.erase(0, kHeaderBytes + *length);
  return std::optional<v1::Envelope>(std::move(*envelope));
}

}  // namespace seedling::comms
