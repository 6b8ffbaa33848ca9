#include "server/internal/update_checks.h"

#include <limits>

#include "base/strings.h"

namespace seedling::server::internal {

absl::Status InvalidUpdate(const UpdateView& update, std::string_view what) {
  return absl::InvalidArgumentError(StrCat("update from device '", update.device_id, "': ", what));
}

bool IsDenseCodec(v1::Codec codec) {
  return codec == v1::CODEC_FP32 || codec == v1::CODEC_FP16 || codec == v1::CODEC_INT8 || codec == v1::CODEC_INT4 ||
         codec == v1::CODEC_TOPK;
}

bool IsFedAvgFamily(std::string_view name) {
  return name == "fedavg" || name == "fedavgm" || name == "fedadam" || name == "fedyogi" || name == "fedadagrad";
}

absl::Status CheckUpdateHeader(std::string_view name, bool round_open, const UpdateView& update,
                               uint64_t examples_so_far) {
  if (!round_open) return absl::FailedPreconditionError(StrCat("strategy ", name, ": no round begun"));
  if (update.num_examples == 0) return InvalidUpdate(update, "num_examples must be > 0, got 0");
  if (update.num_examples > std::numeric_limits<uint64_t>::max() - examples_so_far) {
    return InvalidUpdate(update, StrCat("num_examples ", update.num_examples, " overflows the round's total"));
  }
  return absl::OkStatus();
}

}  // namespace seedling::server::internal
