#pragma once

// An in-memory Transport for tests and the simulator: Connect() creates a ConnectionHandler from the
// factory; Call() encodes the request as a frame, decodes it against the handler's limit, runs Handle on
// the calling thread, and does the same for the response, so size limits and malformed-frame handling are
// exactly the TLS path's. Faults can be injected (drop, delay, truncate) through a hook.
//
// As over TLS: a request frame over the handler's MaxRequestBytes() or malformed - including one a hook
// truncated or extended, since each call carries exactly one frame - is answered with the handler's
// OnMalformed response (returned by Call, request_id 0), and the channel is closed after it. A response
// frame the hook damaged is InvalidArgument. Handle cannot be interrupted: a call that took longer than its
// timeout on the transport's clock (a delaying hook, a slow handler) returns DeadlineExceeded when it is
// done. Every error closes
// the channel; OnClose runs once, on Close(), on destruction or on the error. Connect() may be called from
// many threads at once (the factory and the hooks must allow that); each Channel is used by one thread.

#include <functional>
#include <memory>
#include <string>

#include "base/clock.h"
#include "comms/transport.h"

namespace seedling::comms {

struct InMemoryFaults {
  // Called with the encoded request frame before delivery; may modify it (truncate, corrupt) or return
  // false to drop it (the call then fails with Unavailable, as if the connection broke).
  std::function<bool(std::string& frame)> on_request;
  // The same for the response frame.
  std::function<bool(std::string& frame)> on_response;
};

// `clock` times each call against its timeout (base/clock.h; not comms::Clock): null = the host's
// SteadyClock; otherwise it must outlive the transport and its channels.
std::unique_ptr<Transport> MakeInMemoryTransport(HandlerFactory factory, InMemoryFaults faults = {},
                                                 const seedling::Clock* clock = nullptr);

}  // namespace seedling::comms
