// The gate between the simulated devices and the event loop (simulator/internal/gate.h).

#include "simulator/internal/gate.h"

#include <algorithm>

#include "base/check.h"

namespace seedling::simulator::internal {

void Gate::Add(int64_t device, double t) {
  std::lock_guard<std::mutex> lock(mu_);
  const bool added = devices_.emplace(device, Device{.time = {t, t}}).second;
  SEEDLING_CHECK(added, "a device is added to the gate twice");
}

std::optional<GateEvent> Gate::Next(const GateEvent& other) {
  std::unique_lock<std::mutex> lock(mu_);
  double horizon = std::numeric_limits<double>::infinity();
  GateEvent best = other;
  for (const auto& [device, d] : devices_) {
    switch (d.state) {
      case State::kDone:
        return std::nullopt;
      case State::kRunning:
      case State::kGranted:
        horizon = std::min(horizon, d.time.bound);
        break;
      case State::kWaiting:
        best = std::min(best, GateEvent{d.wait_t, GateEvent::Kind::kRequest, device, d.seq});
        break;
    }
  }
  if (best.t < horizon) return best;
  loop_cv_.wait(lock);
  return std::nullopt;
}

void Gate::Grant(int64_t device) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    Device& d = devices_.at(device);
    SEEDLING_CHECK(d.state == State::kWaiting, "granting a device that is not waiting");
    d.state = State::kGranted;
    d.time.bound = d.wait_t;
  }
  device_cv_.notify_all();
}

std::vector<std::pair<int64_t, double>> Gate::TakeFinished() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::pair<int64_t, double>> finished;
  for (auto it = devices_.begin(); it != devices_.end();) {
    if (it->second.state == State::kDone) {
      finished.emplace_back(it->first, std::max(it->second.time.vt, it->second.time.bound));
      it = devices_.erase(it);
    } else {
      ++it;
    }
  }
  return finished;
}

void Gate::Close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  device_cv_.notify_all();
}

void Gate::AwaitChange(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  loop_cv_.wait_for(lock, timeout);
}

DeviceTime Gate::Time(int64_t device) const {
  std::lock_guard<std::mutex> lock(mu_);
  return devices_.at(device).time;
}

void Gate::Sleep(int64_t device, double seconds) {
  if (!(seconds > 0)) return;
  std::lock_guard<std::mutex> lock(mu_);
  DeviceTime& time = devices_.at(device).time;
  time.vt = std::max(time.vt, time.bound) + seconds;
  time.bound = time.vt;
  loop_cv_.notify_one();
}

void Gate::Reach(int64_t device, double t) {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceTime& time = devices_.at(device).time;
  time.vt = std::max(time.vt, t);
}

bool Gate::Wait(int64_t device, double arrive) {
  std::unique_lock<std::mutex> lock(mu_);
  Device& d = devices_.at(device);
  SEEDLING_CHECK(d.state == State::kRunning && arrive >= d.time.bound,
                 "a request must come from a running device, not before its bound");
  d.state = State::kWaiting;
  d.wait_t = arrive;
  d.seq = ++seq_;
  loop_cv_.notify_one();
  device_cv_.wait(lock, [&] { return d.state == State::kGranted || closed_; });
  if (d.state != State::kGranted) {
    d.state = State::kRunning;
    return false;
  }
  return true;
}

void Gate::Resume(int64_t device, DeviceTime time) {
  std::lock_guard<std::mutex> lock(mu_);
  Device& d = devices_.at(device);
  SEEDLING_CHECK(d.state == State::kGranted, "resuming a device whose request was not granted");
  d.state = State::kRunning;
  d.time = time;
  loop_cv_.notify_one();
}

void Gate::Finish(int64_t device) {
  std::lock_guard<std::mutex> lock(mu_);
  devices_.at(device).state = State::kDone;
  loop_cv_.notify_one();
}

}  // namespace seedling::simulator::internal
