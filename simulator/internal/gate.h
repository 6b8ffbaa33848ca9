#pragma once

// The gate (simulator/simulation.h, "How time works"): every request of a simulated device waits here
// until the event loop grants it, and the loop grants events in simulated-time order, and only when no
// running device could still produce an earlier one. The gate holds each active device's clock and knows
// nothing of the protocol, the client or the coordinator, so a test can drive it with plain threads.
// Internal to the simulator.
//
// Users: one loop thread (Add, Next, Grant, TakeFinished, Close, AwaitChange) and one thread per active
// device (Time, Now, Sleep, Reach, Wait, Resume, Finish, for its own device only). All methods are
// thread-safe; none calls out of the gate, so a caller may hold its own mutex across the non-blocking ones.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "base/clock.h"

namespace seedling::simulator::internal {

// An event the loop may run next. Events are ordered by time, then kind, then device and sequence number,
// so the order depends on simulated time alone, never on which host thread came first.
struct GateEvent {
  enum class Kind { kTick = 0, kRequest = 1, kWake = 2 };  // at equal times: ticks, requests, wake-ups
  double t = std::numeric_limits<double>::infinity();      // simulated seconds
  Kind kind = Kind::kTick;
  int64_t device = -1;  // kRequest, kWake: the device
  uint64_t seq = 0;     // kRequest: the gate's count of requests when it arrived

  friend bool operator<(const GateEvent& a, const GateEvent& b) {
    return std::tie(a.t, a.kind, a.device, a.seq) < std::tie(b.t, b.kind, b.device, b.seq);
  }
};

// A device's clock (simulated seconds): where it is, and the earliest time its next request can arrive at
// the gate (bound ≥ what the loop may run before hearing from the device: a training device's is the end
// of its compute time).
struct DeviceTime {
  double vt = 0;
  double bound = 0;
};

class Gate {
 public:
  // --- The loop's side.

  // A device becomes active at simulated time `t` (its clock and bound are t). It must not be active.
  void Add(int64_t device, double t);

  // The earliest of the waiting requests and `other` (the loop's own next event: a tick or a wake-up), if
  // it is earlier than every running device's bound: no running device can still produce an earlier one.
  // Returns it without running it (a request: Grant it). Otherwise waits until a device changes state and
  // returns nullopt (look again); nullopt at once while a finished device has not been taken.
  std::optional<GateEvent> Next(const GateEvent& other);

  // Grants the waiting request of `device` (an event Next returned): the device runs it now, at its
  // arrival time, which becomes its bound until it resumes.
  void Grant(int64_t device);

  // Removes the devices that finished, and returns them in device order with the time each was done
  // (max(vt, bound)).
  std::vector<std::pair<int64_t, double>> TakeFinished();

  // Releases every waiting device, now and later: Wait returns false. For the end of a run.
  void Close();

  // Waits until a device changes state or `timeout` passes.
  void AwaitChange(std::chrono::milliseconds timeout);

  // --- A device's side (its own thread, or a thread serving it).

  DeviceTime Time(int64_t device) const;
  double Now(int64_t device) const { return Time(device).vt; }

  // A wait of `seconds` on the device's clock: moves it and its bound on, costing no host time.
  void Sleep(int64_t device, double seconds);

  // Moves the device's clock on to `t` if it is earlier (its bound stays): a device that vanished at t.
  void Reach(int64_t device, double t);

  // Blocks until the loop grants the device's request arriving at `arrive` (≥ its bound). False if the
  // gate is closed first (the device runs on, but the request must not be made).
  bool Wait(int64_t device, double arrive);

  // After a granted request: the device runs again, its clock at `time`.
  void Resume(int64_t device, DeviceTime time);

  // The device's run is over (the loop then takes it with TakeFinished).
  void Finish(int64_t device);

 private:
  enum class State { kRunning, kWaiting, kGranted, kDone };
  struct Device {
    State state = State::kRunning;
    DeviceTime time;
    double wait_t = 0;  // kWaiting, kGranted: when the request arrives at the gate
    uint64_t seq = 0;
  };

  mutable std::mutex mu_;
  std::condition_variable loop_cv_;    // the loop waits for a device to change state
  std::condition_variable device_cv_;  // devices wait for their request to be granted
  // Guarded by mu_.
  std::map<int64_t, Device> devices_;
  uint64_t seq_ = 0;
  bool closed_ = false;
};

// A device's clock as its client sees it (client::SimulationHooks): the gate's clock of `device`, in
// milliseconds; a wait moves it and the device's bound on, costing no host time. `gate` must outlive it.
class GateClock final : public SimulatedClock {
 public:
  GateClock(Gate& gate, int64_t device) : gate_(gate), device_(device) {}
  int64_t NowMs() const override { return SecondsToMs(gate_.Now(device_)); }
  void Sleep(double seconds) override { gate_.Sleep(device_, seconds); }

 private:
  Gate& gate_;
  const int64_t device_;
};

}  // namespace seedling::simulator::internal
