#pragma once

// The simulated devices' transports. A device on rank 0 reaches the coordinator through SimTransport,
// whose every request waits at the method run's gate; a device on another rank through ForwardedTransport,
// whose every request is forwarded to rank 0 and answered there at the gate (simulator/internal/
// mpi_protocol.h). Internal to the simulator.

#include <cstdint>
#include <memory>
#include <utility>

#include "absl/status/statusor.h"
#include "base/clock.h"
#include "comms/transport.h"
#include "simulator/internal/compute_slots.h"
#include "simulator/mpi.h"

namespace seedling::simulator::internal {

class MethodRun;

// A device on rank 0: `inner` is the transport to the coordinator; `run` and `inner` must outlive the
// transport and its channels.
class SimTransport : public comms::Transport {
 public:
  SimTransport(MethodRun* run, int64_t device, comms::Transport* inner) : run_(run), device_(device), inner_(inner) {}
  absl::StatusOr<std::unique_ptr<comms::Channel>> Connect(comms::Duration timeout) override;

 private:
  MethodRun* const run_;
  const int64_t device_;
  comms::Transport* const inner_;
};

// A device on a rank other than 0: where its requests go, the compute slot it may hold there, and its
// clock (client::SimulationHooks): its time after the last reply, plus what it slept since, which the
// next call carries to rank 0.
struct ForwardedDevice {
  MpiRanks* ranks = nullptr;
  int64_t device = 0;
  ComputeSlots* slots = nullptr;  // the rank's
  // The device thread only.
  bool holds_slot = false;
  double vt = 0;
  double slept = 0;

  void ReleaseSlot() {
    if (std::exchange(holds_slot, false)) slots->Release();
  }
};

// A forwarded device's clock as its client sees it (client::SimulationHooks): its time after the last
// reply plus what it slept since, in milliseconds. The device thread only.
class ForwardedClock final : public SimulatedClock {
 public:
  explicit ForwardedClock(std::shared_ptr<ForwardedDevice> dev) : dev_(std::move(dev)) {}
  int64_t NowMs() const override { return SecondsToMs(dev_->vt + dev_->slept); }
  void Sleep(double seconds) override {
    if (seconds > 0) dev_->slept += seconds;
  }

 private:
  const std::shared_ptr<ForwardedDevice> dev_;
};

class ForwardedTransport : public comms::Transport {
 public:
  explicit ForwardedTransport(std::shared_ptr<ForwardedDevice> dev) : dev_(std::move(dev)) {}
  absl::StatusOr<std::unique_ptr<comms::Channel>> Connect(comms::Duration timeout) override;

 private:
  const std::shared_ptr<ForwardedDevice> dev_;
};

}  // namespace seedling::simulator::internal
