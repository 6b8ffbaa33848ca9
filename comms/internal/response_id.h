#pragma once

// The request_id rule shared by the TLS and in-memory channels. Internal to comms.

#include "absl/status/status.h"
#include "base/strings.h"
#include "comms/proto/seedling.pb.h"

namespace seedling::comms::internal {

// A Reject with request_id 0: the server's answer to a request frame it could not parse.
inline bool IsConnectionReject(const v1::Envelope& response) {
  return response.request_id() == 0 && response.has_reject();
}

// OK if `response` answers `request`: the same request_id, or a connection-level Reject (request_id
// 0) that the server sends for a request frame it could not parse before closing the connection.
// InvalidArgument otherwise.
inline absl::Status CheckResponseId(const v1::Envelope& request, const v1::Envelope& response) {
  if (response.request_id() == request.request_id()) return absl::OkStatus();
  if (IsConnectionReject(response)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      StrCat("response carries request_id ", response.request_id(), ", expected ", request.request_id()));
}

}  // namespace seedling::comms::internal
