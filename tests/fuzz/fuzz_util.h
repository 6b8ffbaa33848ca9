#pragma once

// Helpers shared by the fuzz targets.

#include <cstdint>

namespace seedling::fuzz {

// Keeps a value the target computed from the parsed data (so the reads that produced it are not optimized
// away): the sanitizers check those reads.
inline void Consume(uint64_t value) {
  volatile uint64_t sink = value;
  (void)sink;
}

}  // namespace seedling::fuzz
