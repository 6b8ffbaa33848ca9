// Fuzz target: a simulation's sim.toml (simulator/simulation.h ParseSimulationConfig).

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "simulator/simulation.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)seedling::simulator::ParseSimulationConfig(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
