#pragma once

// The checks every strategy makes on an uploaded update before it decodes the payload, in one home for
// strategy.cpp, dp_strategy.cpp and robust_strategy.cpp.

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "comms/proto/seedling.pb.h"
#include "server/strategy.h"

namespace seedling::server::internal {

// InvalidArgument "update from device '<id>': <what>".
absl::Status InvalidUpdate(const UpdateView& update, std::string_view what);

// The codecs that carry a dense parameter vector (fp32, fp16, int8, int4, top-k), as opposed to seed scalars.
bool IsDenseCodec(v1::Codec codec);

// fedavg, fedavgm, fedadam, fedyogi, fedadagrad: the strategies that average parameter deltas.
bool IsFedAvgFamily(std::string_view name);

// What an update needs before its payload is looked at: strategy `name` has a round open, num_examples > 0,
// and the round's example total (`examples_so_far` before this update) cannot overflow.
absl::Status CheckUpdateHeader(std::string_view name, bool round_open, const UpdateView& update,
                               uint64_t examples_so_far);

}  // namespace seedling::server::internal
