// Standalone forward benchmark: the same as `seedling bench forward` (see forward_bench.h).

#include <iostream>
#include <thread>

#include "bench/forward_bench.h"
#include "model/runtime.h"

int main(int argc, char** argv) {
  seedling::model::ConfigureCompute({});
  seedling::bench::ForwardBenchOptions options;
  if (argc > 1) options.presets = {argv[1]};
  auto rows = seedling::bench::RunForwardBench(options, std::cout);
  if (!rows.ok()) {
    std::cerr << "seedling_bench_forward: " << rows.status().message() << "\n";
    return 1;
  }
  return 0;
}
