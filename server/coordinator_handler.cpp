#include "server/coordinator.h"

// The transport's side of the coordinator: one Handler per connection authenticates it with Hello (and, with
// mutual TLS, checks the certificate names the same device), then dispatches each request to the coordinator.

#include <string>

namespace seedling::server {

// ---- the connection handler ------------------------------------------------------------------------------

class Coordinator::Handler : public comms::ConnectionHandler {
 public:
  Handler(Coordinator* c, std::string peer, std::string cert_subject)
      : c_(c), peer_(std::move(peer)), cert_subject_(std::move(cert_subject)) {
    absl::MutexLock lock(&c_->mu_);
    ++c_->connections_;
    if (c_->connections_gauge_ != nullptr) c_->connections_gauge_->Increment();
  }

  size_t MaxRequestBytes() const override {
    return uploading_ ? comms::kMaxChunkFrameBytes : comms::kMaxControlFrameBytes;
  }

  v1::Envelope Handle(const v1::Envelope& request) override {
    v1::Envelope reply;
    switch (request.body_case()) {
      case v1::Envelope::kHello:
        c_->CountRequest("hello");
        if (!cert_subject_.empty() && request.hello().device_id() != cert_subject_) {
          // Mutual TLS: a device certificate speaks for the device named in it and no other.
          absl::MutexLock lock(&c_->mu_);
          reply = c_->RejectLocked(v1::UNAUTHENTICATED, "the client certificate was issued to another device",
                                   "unauthenticated");
          break;
        }
        reply = c_->OnHello(request.hello(), &device_id_);
        break;
      case v1::Envelope::kCheckIn:
      case v1::Envelope::kDownload:
      case v1::Envelope::kUploadBegin:
      case v1::Envelope::kUploadChunk:
      case v1::Envelope::kUploadCommit:
      case v1::Envelope::kDecline:
      case v1::Envelope::kSecagg:
        if (device_id_.empty()) {
          absl::MutexLock lock(&c_->mu_);
          reply =
              c_->RejectLocked(v1::UNAUTHENTICATED, "send Hello with a valid device token first", "unauthenticated");
          break;
        }
        reply = Dispatch(request);
        break;
      default: {
        absl::MutexLock lock(&c_->mu_);
        reply = c_->RejectLocked(v1::MALFORMED_MESSAGE, "not a request", "malformed");
      }
    }
    reply.set_protocol_version(1);
    reply.set_request_id(request.request_id());
    return reply;
  }

  v1::Envelope OnMalformed(const absl::Status& error) override {
    absl::MutexLock lock(&c_->mu_);
    const bool too_large = error.code() == absl::StatusCode::kResourceExhausted;
    // The transport reports a protocol_version other than 1 as FailedPrecondition (comms/transport.h).
    const bool version = error.code() == absl::StatusCode::kFailedPrecondition;
    v1::Envelope e = c_->RejectLocked(too_large ? v1::RESOURCE_EXHAUSTED
                                      : version ? v1::UNSUPPORTED_VERSION
                                                : v1::MALFORMED_MESSAGE,
                                      std::string(error.message()),
                                      too_large ? "frame_too_large"
                                      : version ? "unsupported_version"
                                                : "malformed");
    e.set_protocol_version(1);
    return e;
  }

  void OnClose() override {
    absl::MutexLock lock(&c_->mu_);
    --c_->connections_;
    if (c_->connections_gauge_ != nullptr) c_->connections_gauge_->Decrement();
  }

 private:
  v1::Envelope Dispatch(const v1::Envelope& request) {
    switch (request.body_case()) {
      case v1::Envelope::kCheckIn:
        c_->CountRequest("check_in");
        return c_->OnCheckIn(device_id_, request.check_in());
      case v1::Envelope::kDownload:
        c_->CountRequest("download");
        return c_->OnDownload(device_id_, request.download());
      case v1::Envelope::kUploadBegin: {
        c_->CountRequest("upload_begin");
        v1::Envelope r = c_->OnUploadBegin(device_id_, request.upload_begin());
        uploading_ = r.has_upload_ack() && !r.upload_ack().accepted();
        return r;
      }
      case v1::Envelope::kUploadChunk:
        c_->CountRequest("upload_chunk");
        return c_->OnUploadChunk(device_id_, request.upload_chunk());
      case v1::Envelope::kUploadCommit:
        c_->CountRequest("upload_commit");
        uploading_ = false;
        return c_->OnUploadCommit(device_id_, request.upload_commit());
      case v1::Envelope::kDecline:
        c_->CountRequest("decline");
        return c_->OnDecline(device_id_, request.decline());
      case v1::Envelope::kSecagg:
        c_->CountRequest("secagg");
        return c_->OnSecAgg(device_id_, request.secagg());
      default:
        return v1::Envelope();  // unreachable: Handle dispatches only these kinds
    }
  }

  Coordinator* const c_;
  const std::string peer_;
  const std::string cert_subject_;  // mutual TLS: the verified certificate's CN, else ""
  std::string device_id_;           // set by a successful Hello
  bool uploading_ = false;
};

comms::HandlerFactory Coordinator::handler_factory() {
  return [this](const comms::PeerInfo& peer) -> std::unique_ptr<comms::ConnectionHandler> {
    return std::make_unique<Handler>(this, peer.address, peer.client_cert_subject);
  };
}

}  // namespace seedling::server
