#include "base/memory.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>

#include "absl/strings/str_format.h"
#include "base/strings.h"

namespace seedling {
namespace {

// Reads a "Key:   1234 kB" line from /proc/self/status.
int64_t ProcStatusKb(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t key_len = std::strlen(key);
  while (std::getline(in, line)) {
    if (line.compare(0, key_len, key) == 0 && line.size() > key_len && line[key_len] == ':') {
      long long kb = 0;
      if (std::sscanf(line.c_str() + key_len + 1, "%lld", &kb) == 1) return kb;
    }
  }
  return -1;
}

// The value of "Key:   1234 kB" in `status` (the text of /proc/self/status), in bytes; 0 if absent.
int64_t StatusBytes(std::string_view status, std::string_view key) {
  size_t at = 0;
  while ((at = status.find(key, at)) != std::string_view::npos) {
    const bool line_start = at == 0 || status[at - 1] == '\n';
    at += key.size();
    if (line_start && at < status.size() && status[at] == ':') {
      long long kb = 0;
      if (std::sscanf(std::string(status.substr(at + 1, 32)).c_str(), "%lld", &kb) == 1) return kb * 1024;
    }
  }
  return 0;
}

}  // namespace

RssParts CurrentRssParts() {
  // One read(2) of the whole file: cheap enough to sample every few milliseconds.
  char buf[4096];
  const int fd = ::open("/proc/self/status", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  const ssize_t n = ::read(fd, buf, sizeof(buf));
  ::close(fd);
  if (n <= 0) return {};
  const std::string_view status(buf, static_cast<size_t>(n));
  return {StatusBytes(status, "RssAnon"), StatusBytes(status, "RssFile"), StatusBytes(status, "RssShmem")};
}

struct RssPeakSampler::State {
  std::mutex mu;
  std::condition_variable wake;
  bool stop = false;  // guarded by mu
  RssParts peak;      // guarded by mu
  std::thread thread;

  void Sample() {
    const RssParts now = CurrentRssParts();
    std::lock_guard<std::mutex> lock(mu);
    peak.anon = std::max(peak.anon, now.anon);
    peak.file = std::max(peak.file, now.file);
    peak.shmem = std::max(peak.shmem, now.shmem);
  }
};

RssPeakSampler::RssPeakSampler(int interval_ms) : state_(std::make_unique<State>()) {
  State* state = state_.get();
  state->Sample();
  state->thread = std::thread([state, interval_ms] {
    std::unique_lock<std::mutex> lock(state->mu);
    while (!state->wake.wait_for(lock, std::chrono::milliseconds(interval_ms), [&] { return state->stop; })) {
      lock.unlock();
      state->Sample();
      lock.lock();
    }
  });
}

RssPeakSampler::~RssPeakSampler() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
  }
  state_->wake.notify_all();
  state_->thread.join();
}

RssParts RssPeakSampler::Peak() const {
  state_->Sample();
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->peak;
}

int64_t PeakRssBytes() {
  int64_t kb = ProcStatusKb("VmHWM");
  if (kb >= 0) return kb * 1024;
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) == 0) return static_cast<int64_t>(ru.ru_maxrss) * 1024;
  return 0;
}

int64_t CurrentRssBytes() {
  int64_t kb = ProcStatusKb("VmRSS");
  return kb >= 0 ? kb * 1024 : 0;
}

bool ResetPeakRss() {
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  bool ok = std::fputs("5", f) >= 0;
  ok = (std::fclose(f) == 0) && ok;
  return ok;
}

HeapAllocator CurrentHeapAllocator() {
  // tcmalloc exports its entry points under their own names too, whether linked in or preloaded.
  return dlsym(RTLD_DEFAULT, "tc_malloc") != nullptr ? HeapAllocator::kTcmalloc : HeapAllocator::kSystem;
}

void ReleaseFreeHeapMemory() {
  using Release = void (*)();
  auto release = reinterpret_cast<Release>(dlsym(RTLD_DEFAULT, "MallocExtension_ReleaseFreeMemory"));
  if (release != nullptr) {
    release();
  } else {
    malloc_trim(0);
  }
}

const char* HeapAllocatorName(HeapAllocator allocator) {
  return allocator == HeapAllocator::kTcmalloc ? "tcmalloc" : "system";
}

std::string FormatBytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", b / (1 << 30));
  if (bytes >= (int64_t{1} << 20)) return absl::StrFormat("%.1f MiB", b / (1 << 20));
  if (bytes >= (int64_t{1} << 10)) return absl::StrFormat("%.1f KiB", b / (1 << 10));
  return absl::StrFormat("%d B", bytes);
}

absl::StatusOr<int64_t> ParseByteSize(std::string_view text) {
  std::string s(text);
  s.erase(std::remove_if(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); }), s.end());
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(s, &pos);
  } catch (const std::exception&) {
    return absl::InvalidArgumentError(StrCat("'", text, "' is not a size (examples: 512M, 1.5G, 800MiB)"));
  }
  std::string unit = s.substr(pos);
  for (char& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  double mult = 0;
  if (unit.empty() || unit == "B") mult = 1;
  if (unit == "K" || unit == "KB" || unit == "KIB") mult = 1024.0;
  if (unit == "M" || unit == "MB" || unit == "MIB") mult = 1024.0 * 1024;
  if (unit == "G" || unit == "GB" || unit == "GIB") mult = 1024.0 * 1024 * 1024;
  if (mult == 0 || !(value >= 0) || !std::isfinite(value)) {
    return absl::InvalidArgumentError(StrCat("'", text, "' is not a size (examples: 512M, 1.5G, 800MiB)"));
  }
  if (value * mult > static_cast<double>(kMaxByteSize)) {
    return absl::InvalidArgumentError(StrCat("'", text, "' is more than 1 PiB"));
  }
  return static_cast<int64_t>(value * mult);
}

}  // namespace seedling
