#include "base/memory.h"

#include <sys/resource.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/strings/str_format.h"

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

}  // namespace

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

std::string FormatBytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", b / (1 << 30));
  if (bytes >= (int64_t{1} << 20)) return absl::StrFormat("%.1f MiB", b / (1 << 20));
  if (bytes >= (int64_t{1} << 10)) return absl::StrFormat("%.1f KiB", b / (1 << 10));
  return absl::StrFormat("%d B", bytes);
}

}  // namespace seedling
