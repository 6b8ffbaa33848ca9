#include "server/devices.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "base/sha256.h"
#include "base/status.h"

namespace seedling::server {
namespace {

absl::StatusOr<std::string> NewToken() {
  unsigned char raw[32];
  if (RAND_bytes(raw, sizeof(raw)) != 1) return absl::InternalError("no randomness for a token");
  return HexOf(std::string_view(reinterpret_cast<const char*>(raw), sizeof(raw)));
}

}  // namespace

absl::StatusOr<std::string> RotateDeviceToken(Store& store, const std::string& device_id) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string token, NewToken());
  SEEDLING_RETURN_IF_ERROR(store.SetDeviceToken(device_id, Sha256Hex(token)));
  return token;
}

absl::StatusOr<std::string> AddDevice(Store& store, const std::string& device_id, int64_t now_ms) {
  if (device_id.empty() || device_id.size() > 128 || device_id.find_first_of("/ \t\n") != std::string::npos) {
    return absl::InvalidArgumentError("device ids are 1-128 characters without '/' or whitespace");
  }
  SEEDLING_ASSIGN_OR_RETURN(const std::string token, NewToken());
  DeviceRecord d;
  d.device_id = device_id;
  d.token_sha256 = Sha256Hex(token);
  d.created_ms = now_ms;
  SEEDLING_RETURN_IF_ERROR(store.AddDevice(d));
  return token;
}

DeviceAuth AuthenticateDevice(Store& store, const std::string& device_id, std::string_view token) {
  absl::StatusOr<std::optional<DeviceRecord>> device = store.FindDevice(device_id);
  if (!device.ok()) return DeviceAuth::kUnavailable;
  const std::string presented = Sha256Hex(token);
  const std::string expected = device->has_value() ? (*device)->token_sha256 : std::string(64, '0');
  const bool ok = device->has_value() && presented.size() == expected.size() &&
                  CRYPTO_memcmp(presented.data(), expected.data(), expected.size()) == 0;
  if (!ok) return DeviceAuth::kRejected;
  // Only a holder of the right token learns this: the app can stop retrying.
  return (*device)->revoked_ms != 0 ? DeviceAuth::kRevoked : DeviceAuth::kAuthenticated;
}

}  // namespace seedling::server
