#pragma once

// The seam between protocol logic and the network (docs/contributing.md, "Shape"): the client talks to a Channel
// (request → response), the server implements a ConnectionHandler per connection. Two implementations:
// TLS over Boost.Asio + OpenSSL (comms/tls.h) and in-memory (comms/in_memory.h) for tests and the
// simulator. Both carry the same frames (comms/framing.h), with the same size limits.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "comms/proto/seedling.pb.h"

namespace seedling::comms {

using Clock = std::chrono::steady_clock;
using Duration = std::chrono::milliseconds;

// Frame size limits (docs/protocol.md), checked against the 4-byte length before anything is allocated.
inline constexpr size_t kMaxControlFrameBytes = 4u << 20;             // any message
inline constexpr size_t kMaxChunkBytes = 1u << 20;                    // UploadChunk.data / DownloadReply.data
inline constexpr size_t kMaxChunkFrameBytes = kMaxChunkBytes + 4096;  // a chunk message with its envelope

// The most perturbations (fwdgrad's K) a task may ask per step: servers refuse more in their config,
// clients decline a task asking more.
inline constexpr int64_t kMaxTaskPerturbations = 4096;

// A client's connection. Not thread-safe: one call at a time.
class Channel {
 public:
  virtual ~Channel() = default;
  // Sends `request` and waits for the response with the same request_id, for at most `timeout` in total.
  // DeadlineExceeded on timeout, Unavailable when the peer is gone or the connection broke,
  // InvalidArgument (DataLoss) for a malformed or oversized response frame. After an error the channel is
  // closed; open a new one.
  // A response carries the request's request_id, with one exception: the server's answer to a request
  // frame it could not accept (over the handler's limit, unparsable) is a Reject with request_id 0, which
  // Call returns as the response; the server closes the connection after it, and so does the channel.
  // A response with any other request_id is InvalidArgument.
  virtual absl::StatusOr<v1::Envelope> Call(const v1::Envelope& request, Duration timeout) = 0;
  virtual void Close() = 0;
};

// Opens channels to one server.
class Transport {
 public:
  virtual ~Transport() = default;
  // DeadlineExceeded / Unavailable / Unauthenticated (TLS verification failed) / PermissionDenied.
  virtual absl::StatusOr<std::unique_ptr<Channel>> Connect(Duration timeout) = 0;
};

// What the server knows about a connection's peer before any message.
struct PeerInfo {
  std::string address;              // "127.0.0.1:53211", "in-memory:7"
  std::string client_cert_subject;  // with mutual TLS: the verified client certificate's CN, else ""
};

// Server side: the protocol logic of one connection. Called from one thread at a time per connection
// (connections run concurrently: shared state behind it needs its own locking).
class ConnectionHandler {
 public:
  virtual ~ConnectionHandler() = default;
  // The limit for the next request frame: kMaxControlFrameBytes normally, kMaxChunkFrameBytes while an
  // upload is in progress (a chunk message is all that may come).
  virtual size_t MaxRequestBytes() const = 0;
  // Answers one request. Always returns a response (a Reject for bad requests).
  virtual v1::Envelope Handle(const v1::Envelope& request) = 0;
  // A request frame that could not be parsed or was over the limit: the transport answers with this
  // response (a MALFORMED_MESSAGE / RESOURCE_EXHAUSTED Reject) and closes the connection.
  // `error` is ResourceExhausted (length over MaxRequestBytes(); the body was never read),
  // FailedPrecondition (a protocol_version other than 1) or InvalidArgument (anything else malformed).
  // The response's request_id should be 0: the request's was not readable.
  virtual v1::Envelope OnMalformed(const absl::Status& error) = 0;
  // The connection ended (closed by either side, timed out, or failed).
  virtual void OnClose() = 0;
};

using HandlerFactory = std::function<std::unique_ptr<ConnectionHandler>(const PeerInfo& peer)>;

}  // namespace seedling::comms
