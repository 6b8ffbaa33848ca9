#pragma once

// Device registration and authentication (docs/architecture.md, "The server"; docs/protocol.md, "Hello"). A
// device proves itself with a random 256-bit token issued once by the operator; the store keeps only the
// token's SHA-256, so a leaked state directory does not leak tokens.

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "server/store.h"

namespace seedling::server {

// Issues a new random device token (returned once; only its SHA-256 is stored). InvalidArgument for an id
// that is empty, longer than 128 characters, or holds '/' or whitespace; AlreadyExists if the id is taken.
absl::StatusOr<std::string> AddDevice(Store& store, const std::string& device_id, int64_t now_ms);
// Issues a new random token for a registered device and returns it (once); the old token stops
// authenticating. NotFound for an unknown device, FailedPrecondition for a revoked one.
absl::StatusOr<std::string> RotateDeviceToken(Store& store, const std::string& device_id);

enum class DeviceAuth {
  kAuthenticated,
  kRejected,     // unknown device or wrong token (indistinguishable, also in time)
  kRevoked,      // the right token of a device the operator revoked
  kUnavailable,  // the registry could not be read
};

// Checks `token` against the stored hash in constant time; an unknown device costs the same as a wrong token.
DeviceAuth AuthenticateDevice(Store& store, const std::string& device_id, std::string_view token);

}  // namespace seedling::server
