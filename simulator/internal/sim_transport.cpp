// The simulated devices' transports (simulator/internal/sim_transport.h).

#include "simulator/internal/sim_transport.h"

#include <string>

#include "base/bytes.h"
#include "base/status.h"
#include "simulator/internal/method_run.h"
#include "simulator/internal/mpi_protocol.h"

namespace seedling::simulator::internal {
namespace {

// A device's connection: every request goes through the method run's gate.
class SimChannel : public comms::Channel {
 public:
  SimChannel(MethodRun* run, int64_t device, std::unique_ptr<comms::Channel> inner)
      : run_(run), device_(device), inner_(std::move(inner)) {}
  absl::StatusOr<v1::Envelope> Call(const v1::Envelope& request, comms::Duration timeout) override {
    return run_->DeviceCall(device_, *inner_, request, timeout);
  }
  void Close() override { inner_->Close(); }

 private:
  MethodRun* const run_;
  const int64_t device_;
  std::unique_ptr<comms::Channel> inner_;
};

// A device's connection to rank 0's coordinator, from another rank: each call is forwarded and answered
// there at the gate (MethodRun::RemoteDeviceMain).
class ForwardedChannel : public comms::Channel {
 public:
  explicit ForwardedChannel(std::shared_ptr<ForwardedDevice> dev) : dev_(std::move(dev)) {}
  ~ForwardedChannel() override { Close(); }

  absl::StatusOr<v1::Envelope> Call(const v1::Envelope& request, comms::Duration timeout) override {
    if (closed_) return absl::FailedPreconditionError("the connection is closed");
    dev_->ReleaseSlot();  // a request after training: the training is over
    std::string msg(1, kCall);
    AppendU64Le(msg, static_cast<uint64_t>(timeout.count()));
    PutDouble(msg, std::exchange(dev_->slept, 0.0));
    request.AppendToString(&msg);
    const uint64_t key = static_cast<uint64_t>(dev_->device);
    dev_->ranks->Send(0, key, std::move(msg));
    SEEDLING_ASSIGN_OR_RETURN(MpiRanks::Message m, dev_->ranks->Receive(key, kRankTimeout));
    const std::string& p = m.payload;
    if (p.size() < 11 || p[0] != kReply) return absl::InternalError("unexpected message from rank 0");
    if (p[1] == 'T') {
      dev_->slots->Acquire();  // the reply starts this device's training
      dev_->holds_slot = true;
    }
    dev_->vt = GetDouble(std::string_view(p).substr(2));
    if (p[10] == '1') {
      v1::Envelope reply;
      if (!reply.ParseFromArray(p.data() + 11, static_cast<int>(p.size() - 11))) {
        return absl::InternalError("malformed reply envelope from rank 0");
      }
      return reply;
    }
    return StatusFromJson(nlohmann::json::parse(p.substr(11), nullptr, false));
  }

  void Close() override {
    if (closed_) return;
    closed_ = true;
    dev_->ranks->Send(0, static_cast<uint64_t>(dev_->device), std::string(1, kClose));
  }

 private:
  const std::shared_ptr<ForwardedDevice> dev_;
  bool closed_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<comms::Channel>> SimTransport::Connect(comms::Duration timeout) {
  if (run_->DeviceDropped(device_)) return absl::UnavailableError("the device dropped out (simulated)");
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<comms::Channel> channel, inner_->Connect(timeout));
  return std::unique_ptr<comms::Channel>(new SimChannel(run_, device_, std::move(channel)));
}

absl::StatusOr<std::unique_ptr<comms::Channel>> ForwardedTransport::Connect(comms::Duration timeout) {
  std::string msg(1, kConnect);
  AppendU64Le(msg, static_cast<uint64_t>(timeout.count()));
  const uint64_t key = static_cast<uint64_t>(dev_->device);
  dev_->ranks->Send(0, key, std::move(msg));
  SEEDLING_ASSIGN_OR_RETURN(MpiRanks::Message m, dev_->ranks->Receive(key, kRankTimeout));
  if (m.payload.empty() || m.payload[0] != kConnected) return absl::InternalError("unexpected message from rank 0");
  SEEDLING_RETURN_IF_ERROR(StatusFromJson(nlohmann::json::parse(m.payload.substr(1), nullptr, false)));
  return std::unique_ptr<comms::Channel>(new ForwardedChannel(dev_));
}

}  // namespace seedling::simulator::internal
