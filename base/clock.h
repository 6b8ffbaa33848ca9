#pragma once

// Time as a seam (docs/architecture.md, "The server"): code that reads the time reads a Clock, so tests and
// the simulator can drive it. This is the one time mechanism of the server, the client, the SecAgg
// participant and the in-memory transport:
//
// - Clock::NowMs() reads the time. SystemClock is the time of day (ms since the Unix epoch: the server's
//   rounds, deadlines and records); SteadyClock is monotonic with an arbitrary epoch (a device measuring
//   its own waits, a transport's call timeout); ManualClock is set or advanced by hand (tests, and the
//   coordinator's clock in the simulator, which only its event loop moves).
// - A SimulatedClock can also be waited on: Sleep(seconds) passes the clock's own time and returns at once,
//   costing no host time. A simulated phone has one (client::SimulationHooks); where code waits on the host
//   instead (a real, cancellable sleep), it reads a SteadyClock.

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>

namespace seedling {

// Seconds (a simulated clock's unit) to a clock's milliseconds, rounded to the nearest.
inline int64_t SecondsToMs(double seconds) { return static_cast<int64_t>(std::llround(seconds * 1000.0)); }

// Thread-safe in every implementation here.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t NowMs() const = 0;
};

// The time of day: milliseconds since the Unix epoch.
class SystemClock final : public Clock {
 public:
  int64_t NowMs() const override {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

// The host's monotonic clock (std::chrono::steady_clock), in milliseconds from an arbitrary epoch: for
// measuring intervals, never for the time of day.
class SteadyClock final : public Clock {
 public:
  int64_t NowMs() const override {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
};

// A clock whose waits pass its own time instead of the host's.
class SimulatedClock : public Clock {
 public:
  // Moves the clock on by `seconds` (nothing if not > 0) and returns at once.
  virtual void Sleep(double seconds) = 0;
};

// A manually advanced clock (tests, simulator). Thread-safe.
class ManualClock final : public SimulatedClock {
 public:
  explicit ManualClock(int64_t start_ms = 1'700'000'000'000) : now_(start_ms) {}
  int64_t NowMs() const override { return now_.load(); }
  void Advance(int64_t ms) { now_ += ms; }
  void Set(int64_t ms) { now_ = ms; }
  // Advances by `seconds`, rounded to the millisecond.
  void Sleep(double seconds) override {
    if (seconds > 0) Advance(SecondsToMs(seconds));
  }

 private:
  std::atomic<int64_t> now_;
};

}  // namespace seedling
