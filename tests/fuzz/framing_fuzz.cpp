// Fuzz target: the frame reader (comms/framing.h) on a byte stream from a peer, and Envelope parsing.
// The first byte picks the size of the pieces the stream is fed in, so frames split at every position.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "comms/framing.h"

namespace {

constexpr size_t kMaxFrameBytes = 64 * 1024;  // small, so the limit path is reachable

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using seedling::comms::FrameDecoder;
  if (size == 0) return 0;
  const size_t piece = size_t{data[0]} + 1;
  const std::string_view stream(reinterpret_cast<const char*>(data) + 1, size - 1);

  FrameDecoder decoder(kMaxFrameBytes);
  for (size_t pos = 0; pos < stream.size(); pos += piece) {
    decoder.Feed(stream.substr(pos, piece));
    while (true) {
      auto frame = decoder.Next();
      if (!frame.ok() || !frame->has_value()) break;
      // A frame that decoded must re-encode within the limit and decode again (what a relay does). Not
      // compared byte for byte: map fields serialize in no fixed order.
      auto encoded = seedling::comms::EncodeFrame(**frame, kMaxFrameBytes);
      if (!encoded.ok()) std::abort();
      auto again = seedling::comms::DecodeFrameBody(std::string_view(*encoded).substr(4));
      if (!again.ok() || again->ByteSizeLong() != (*frame)->ByteSizeLong()) std::abort();
    }
  }

  // The whole input as one frame body (what the TLS transport hands DecodeFrameBody).
  (void)seedling::comms::DecodeFrameBody(stream);
  return 0;
}
