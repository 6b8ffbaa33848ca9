#pragma once

// A progress line for long work ("eval 120/480 [=====>     ] 25% ETA 0:42"), written to stderr and
// redrawn in place when stderr is a terminal; otherwise a plain line at most every `interval` seconds so
// logs stay readable (work shorter than `interval` prints nothing). Not thread-safe.

#include <chrono>
#include <cstdint>
#include <string>

namespace seedling {

class Progress {
 public:
  // `total` <= 0 means unknown (no bar, no ETA).
  Progress(std::string label, int64_t total, double interval_seconds = 5.0);
  ~Progress();  // finishes the line if Update was called

  void Update(int64_t done);
  void Finish();

 private:
  std::string Render(int64_t done, double elapsed) const;

  const std::string label_;
  const int64_t total_;
  const double interval_;
  const bool tty_;
  const std::chrono::steady_clock::time_point start_;
  double last_print_ = 0;
  int64_t done_ = 0;
  bool printed_ = false;
  bool finished_ = false;
};

// "1:02:03" or "2:03".
std::string FormatDuration(double seconds);

}  // namespace seedling
