#pragma once

// Helpers shared by the test files.

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <string>

namespace seedling::testing {

// A fresh directory under the system temp directory, removed with everything in it on destruction.
// Unique per process and per instance, so parallel test processes never share one.
struct TempDir {
  std::string path;
  TempDir() {
    static std::atomic<int> n{0};
    path = std::filesystem::temp_directory_path() /
           ("seedling_test_" + std::to_string(getpid()) + "_" + std::to_string(n++));
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

}  // namespace seedling::testing
