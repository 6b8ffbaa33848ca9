#pragma once

// The `tiny` preset written to disk once per test process and seed, for test files that load a model directory
// (the simulator, the client, the server). Kept apart from tests/test_util.h, which needs no Seedling library.

#include <catch2/catch.hpp>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "base/file.h"
#include "model/init.h"
#include "tests/test_util.h"

namespace seedling::testing {

// The directory of a `tiny` model with random weights from `seed`, written on first use and removed when the
// test process exits.
inline const std::string& TinyModelDir(uint64_t seed) {
  static std::mutex mu;
  static TempDir root;
  static std::map<uint64_t, std::string> dirs;
  std::lock_guard<std::mutex> lock(mu);
  auto it = dirs.find(seed);
  if (it != dirs.end()) return it->second;
  const std::string path = JoinPath(root.path, "tiny-" + std::to_string(seed));
  model::InitModelOptions init;
  init.preset = "tiny";
  init.seed = seed;
  REQUIRE(model::InitModel(path, init).ok());
  return dirs.emplace(seed, path).first->second;
}

}  // namespace seedling::testing
