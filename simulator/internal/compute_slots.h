#pragma once

// The trainings one process runs at once (SimulationOptions::threads). Internal to the simulator.

#include <condition_variable>
#include <mutex>

namespace seedling::simulator::internal {

// A device takes a slot when a reply starts its training (the last download's, or SHARE_KEYS' in a SecAgg
// round) and gives it back with its next request: only training is counted, because the protocol steps
// between are short and the event loop runs them one at a time anyway. A device never waits at the gate
// while holding a slot, so slots cannot deadlock with the loop. Thread-safe.
class ComputeSlots {
 public:
  explicit ComputeSlots(int n) : free_(n) {}
  void Acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return free_ > 0; });
    --free_;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++free_;
    }
    cv_.notify_one();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int free_;  // guarded by mu_
};

}  // namespace seedling::simulator::internal
