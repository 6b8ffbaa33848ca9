// Fuzz target: the SecAgg+ stage messages (privacy/secagg.h), which a server relays from one device to
// another. Every parser sees every input (each rejects the other types by their type byte).

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "privacy/secagg.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace seedling::privacy;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  (void)SetupMessage::Parse(bytes);
  (void)AdvertiseKeysMessage::Parse(bytes);
  (void)KeyDirectoryMessage::Parse(bytes);
  (void)ShareKeysMessage::Parse(bytes);
  (void)ShareRelayMessage::Parse(bytes);
  (void)MaskedInputMessage::Parse(bytes);
  (void)UnmaskRequestMessage::Parse(bytes);
  (void)UnmaskResponseMessage::Parse(bytes);
  return 0;
}
