#pragma once

// Fixed-width little-endian integers in byte strings (the simulator's rank-to-rank messages), the same on
// every host whatever its byte order.

#include <cstdint>
#include <string>
#include <string_view>

namespace seedling {

inline void AppendU64Le(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// Reads 8 bytes at the start of `in`, which must hold at least 8.
inline uint64_t LoadU64Le(std::string_view in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(in[i])) << (8 * i);
  return v;
}

}  // namespace seedling
