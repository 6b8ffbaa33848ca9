// Fuzz target: every update-codec decoder of comms/codec.h on a peer's payload, and the error-feedback
// residual a client reads back from its state directory.

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "comms/codec.h"

namespace {

// DecodeDense allocates the header's numel (documented: a caller checks it first), so the target does too.
constexpr uint64_t kMaxDecodedElements = 1 << 20;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace comms = seedling::comms;
  const std::string_view payload(reinterpret_cast<const char*>(data), size);

  auto info = comms::InspectPayload(payload);
  if (info.ok() && info->numel <= kMaxDecodedElements) {
    (void)comms::DecodeDense(payload);
    std::vector<float> accumulator(info->numel, 0.0f);
    (void)comms::DecodeDenseAdd(payload, 0.5f, accumulator);
    auto validated = comms::ValidateDensePayload(payload);
    if (validated.ok()) {
      std::vector<double> sum(validated->numel(), 0.0);
      (void)validated->AddTo(sum, 2.0);
    }
  } else {
    (void)comms::ValidateDensePayload(payload);
  }
  (void)comms::DecodeSeedIndexScalars(payload, 4096);
  (void)comms::DecodeSeedValueScalars(payload);
  (void)comms::ErrorFeedback::Deserialize(payload);
  return 0;
}
