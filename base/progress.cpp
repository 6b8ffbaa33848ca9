#include "base/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

#include "absl/strings/str_format.h"

namespace seedling {

std::string FormatDuration(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return "?";
  const auto s = static_cast<int64_t>(std::llround(seconds));
  if (s >= 3600) return absl::StrFormat("%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
  return absl::StrFormat("%d:%02d", s / 60, s % 60);
}

Progress::Progress(std::string label, int64_t total, double interval_seconds)
    : label_(std::move(label)),
      total_(total),
      interval_(interval_seconds),
      tty_(::isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()) {}

Progress::~Progress() { Finish(); }

std::string Progress::Render(int64_t done, double elapsed) const {
  if (total_ <= 0) return absl::StrFormat("%s %d (%s)", label_, done, FormatDuration(elapsed));
  const double frac = std::min(1.0, static_cast<double>(done) / static_cast<double>(total_));
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(frac * kWidth);
  std::string bar(static_cast<size_t>(filled), '=');
  if (filled < kWidth) bar += '>';
  bar.resize(kWidth, ' ');
  const double eta = done > 0 ? elapsed * (static_cast<double>(total_ - done) / static_cast<double>(done)) : -1;
  return absl::StrFormat("%s %d/%d [%s] %3.0f%% %s ETA %s", label_, done, total_, bar, frac * 100,
                         FormatDuration(elapsed), done > 0 ? FormatDuration(eta) : "?");
}

void Progress::Update(int64_t done) {
  done_ = done;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const bool complete = total_ > 0 && done >= total_;
  if (tty_) {
    if (elapsed - last_print_ < 0.1 && !complete) return;
  } else if (elapsed - last_print_ < interval_ && !(complete && printed_)) {
    return;  // plain logs: one line per interval, and a final line only if earlier ones were printed
  }
  last_print_ = elapsed;
  const std::string line = Render(done, elapsed);
  if (tty_) {
    std::fprintf(stderr, "\r%s\033[K", line.c_str());
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
  printed_ = true;
}

void Progress::Finish() {
  if (finished_) return;
  finished_ = true;
  if (printed_ && tty_) {
    std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }
}

}  // namespace seedling
