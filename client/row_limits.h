#pragma once

// How long one row of a device's data may be (LocalDataOptions::max_row_bytes, ClientConfig's key of the
// same name), without LibTorch so the configuration parser can check it.

#include <cstdint>

namespace seedling::client {

inline constexpr int64_t kDefaultMaxRowBytes = int64_t{256} << 10;
inline constexpr int64_t kMinMaxRowBytes = 1024;
inline constexpr int64_t kMaxMaxRowBytes = int64_t{1} << 30;

}  // namespace seedling::client
