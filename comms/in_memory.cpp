#include "comms/in_memory.h"

#include <atomic>
#include <cstring>
#include <exception>
#include <utility>

#include "base/strings.h"
#include "comms/framing.h"
#include "comms/internal/response_id.h"
#include "spdlog/spdlog.h"

namespace seedling::comms {
namespace {

constexpr size_t kHeaderBytes = 4;

// Decodes one whole frame as the TLS path reads it from a stream: the length against `max_bytes`
// first, then the body. A frame shorter than its length prefix (a truncated frame) or longer
// (trailing bytes) is malformed (InvalidArgument).
absl::StatusOr<v1::Envelope> DecodeWholeFrame(const std::string& frame, size_t max_bytes) {
  if (frame.size() < kHeaderBytes) {
    return absl::InvalidArgumentError(StrCat("truncated frame: ", frame.size(), " bytes, no complete length prefix"));
  }
  absl::StatusOr<uint32_t> length = DecodeFrameLength(reinterpret_cast<const uint8_t*>(frame.data()), max_bytes);
  if (!length.ok()) return length.status();
  if (frame.size() - kHeaderBytes != *length) {
    return absl::InvalidArgumentError(
        StrCat("frame declares ", *length, " bytes but carries ", frame.size() - kHeaderBytes));
  }
  return DecodeFrameBody(std::string_view(frame).substr(kHeaderBytes));
}

class InMemoryChannel final : public Channel {
 public:
  // `clock`: null = a SteadyClock of the channel's own.
  InMemoryChannel(std::unique_ptr<ConnectionHandler> handler, std::shared_ptr<const InMemoryFaults> faults,
                  const seedling::Clock* clock)
      : handler_(std::move(handler)), faults_(std::move(faults)), clock_(clock != nullptr ? clock : &steady_) {}
  ~InMemoryChannel() override { Close(); }

  absl::StatusOr<v1::Envelope> Call(const v1::Envelope& request, Duration timeout) override {
    if (handler_ == nullptr) return absl::UnavailableError("in-memory channel is closed");
    const int64_t deadline_ms = clock_->NowMs() + timeout.count();
    absl::StatusOr<v1::Envelope> response = Exchange(request);
    if (response.ok() && clock_->NowMs() > deadline_ms) {
      response = absl::DeadlineExceededError(StrCat("no response within ", timeout.count(), " ms"));
    }
    if (!response.ok() || close_after_response_) Close();
    return response;
  }

  void Close() override {
    if (handler_ == nullptr) return;
    std::unique_ptr<ConnectionHandler> handler = std::move(handler_);
    try {
      handler->OnClose();
    } catch (const std::exception& e) {
      spdlog::error("in-memory transport: OnClose threw: {}", e.what());
    }
  }

 private:
  // One request/response through the frames and fault hooks; sets close_after_response_ when the
  // server side would close the connection after answering (a malformed or oversized request).
  absl::StatusOr<v1::Envelope> Exchange(const v1::Envelope& request) {
    absl::StatusOr<std::string> request_frame = EncodeFrame(request, kMaxControlFrameBytes);
    if (!request_frame.ok()) return request_frame.status();
    if (faults_->on_request && !faults_->on_request(*request_frame)) {
      return absl::UnavailableError("request dropped (in-memory fault)");
    }

    // Server side.
    v1::Envelope reply;
    try {
      absl::StatusOr<v1::Envelope> decoded = DecodeWholeFrame(*request_frame, handler_->MaxRequestBytes());
      if (decoded.ok()) {
        reply = handler_->Handle(*decoded);
      } else {
        reply = handler_->OnMalformed(decoded.status());
        close_after_response_ = true;
      }
    } catch (const std::exception& e) {
      // As the TLS server does: a handler that throws loses its connection.
      spdlog::error("in-memory transport: the connection handler threw: {}", e.what());
      return absl::UnavailableError("connection closed by the server");
    }
    absl::StatusOr<std::string> response_frame = EncodeFrame(reply, kMaxControlFrameBytes);
    if (!response_frame.ok()) {
      spdlog::error("in-memory transport: dropping the connection, the handler's response is unusable: {}",
                    response_frame.status().ToString());
      return absl::UnavailableError("connection closed by the server");
    }

    // Back on the client side.
    if (faults_->on_response && !faults_->on_response(*response_frame)) {
      return absl::UnavailableError("response dropped (in-memory fault)");
    }
    absl::StatusOr<v1::Envelope> response = DecodeWholeFrame(*response_frame, kMaxControlFrameBytes);
    if (!response.ok()) {
      return absl::InvalidArgumentError(StrCat("bad response frame: ", response.status().message()));
    }
    absl::Status id_check = internal::CheckResponseId(request, *response);
    if (!id_check.ok()) return id_check;
    return response;
  }

  std::unique_ptr<ConnectionHandler> handler_;  // null once closed
  const std::shared_ptr<const InMemoryFaults> faults_;
  const seedling::SteadyClock steady_;
  const seedling::Clock* const clock_;  // steady_ or the transport's
  bool close_after_response_ = false;
};

class InMemoryTransport final : public Transport {
 public:
  InMemoryTransport(HandlerFactory factory, InMemoryFaults faults, const seedling::Clock* clock)
      : factory_(std::move(factory)),
        faults_(std::make_shared<const InMemoryFaults>(std::move(faults))),
        clock_(clock) {}

  absl::StatusOr<std::unique_ptr<Channel>> Connect(Duration timeout) override {
    PeerInfo peer;
    peer.address = StrCat("in-memory:", next_connection_.fetch_add(1) + 1);
    std::unique_ptr<ConnectionHandler> handler;
    try {
      handler = factory_(peer);
    } catch (const std::exception& e) {
      spdlog::error("in-memory transport: the handler factory threw for {}: {}", peer.address, e.what());
    }
    if (handler == nullptr) return absl::UnavailableError("connection refused by the server (no handler)");
    return std::unique_ptr<Channel>(std::make_unique<InMemoryChannel>(std::move(handler), faults_, clock_));
  }

 private:
  // Constant after construction.
  const HandlerFactory factory_;
  const std::shared_ptr<const InMemoryFaults> faults_;
  const seedling::Clock* const clock_;  // null: each channel's own SteadyClock
  std::atomic<uint64_t> next_connection_{0};
};

}  // namespace

std::unique_ptr<Transport> MakeInMemoryTransport(HandlerFactory factory, InMemoryFaults faults,
                                                 const seedling::Clock* clock) {
  return std::make_unique<InMemoryTransport>(std::move(factory), std::move(faults), clock);
}

}  // namespace seedling::comms
