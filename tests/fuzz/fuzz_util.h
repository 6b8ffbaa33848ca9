#pragma once

// Helpers for fuzz targets whose parser reads a file rather than bytes.

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace seedling::fuzz {

// Writes the input to one file per process (under the system temp directory, named after the pid, so
// parallel fuzzing jobs never share one) and returns its path. The file is rewritten on every call; the
// directory is removed at exit. Aborts if the file cannot be written: that is the machine, not the input.
inline std::string WriteInputFile(const uint8_t* data, size_t size, const std::string& name) {
  static const std::filesystem::path dir = [] {
    std::filesystem::path d = std::filesystem::temp_directory_path() / ("seedling_fuzz_" + std::to_string(getpid()));
    std::filesystem::create_directories(d);
    static const std::string to_remove = d.string();
    std::atexit([] { std::filesystem::remove_all(to_remove); });
    return d;
  }();
  const std::string path = (dir / name).string();
  std::FILE* file = std::fopen(path.c_str(), "wb");
  if (file == nullptr || (size > 0 && std::fwrite(data, 1, size, file) != size) || std::fclose(file) != 0) {
    std::perror(path.c_str());
    std::abort();
  }
  return path;
}

// Keeps a value the target computed from the parsed data (so the reads that produced it are not optimized
// away): the sanitizers check those reads.
inline void Consume(uint64_t value) {
  volatile uint64_t sink = value;
  (void)sink;
}

}  // namespace seedling::fuzz
