#include "model/weight_format.h"

#include "base/strings.h"

namespace seedling::model {

const char* WeightFormatName(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32:
      return "f32";
    case WeightFormat::kF16:
      return "f16";
    case WeightFormat::kBF16:
      return "bf16";
    case WeightFormat::kQ8_0:
      return "q8_0";
    case WeightFormat::kQ4_0:
      return "q4_0";
  }
  return "?";
}

int64_t BlockBytes(WeightFormat format) {
  switch (format) {
    case WeightFormat::kQ8_0:
      return sizeof(BlockQ8_0);
    case WeightFormat::kQ4_0:
      return sizeof(BlockQ4_0);
    default:
      return 0;
  }
}

int64_t RowBytes(WeightFormat format, int64_t cols) {
  switch (format) {
    case WeightFormat::kF32:
      return 4 * cols;
    case WeightFormat::kF16:
    case WeightFormat::kBF16:
      return 2 * cols;
    case WeightFormat::kQ8_0:
    case WeightFormat::kQ4_0:
      return cols / kQuantBlock * BlockBytes(format);
  }
  return 0;
}

WeightFormat MatrixFormatFor(WeightFormat requested, int64_t cols) {
  if (IsBlockFormat(requested) && cols % kQuantBlock != 0) return WeightFormat::kF16;
  return requested;
}

const char* WeightPrecisionName(WeightPrecision precision) {
  switch (precision) {
    case WeightPrecision::kFloat32:
      return "fp32";
    case WeightPrecision::kStored:
      return "stored";
    case WeightPrecision::kQ8_0:
      return "q8_0";
    case WeightPrecision::kQ4_0:
      return "q4_0";
  }
  return "?";
}

std::optional<WeightFormat> BlockFormatOf(WeightPrecision precision) {
  if (precision == WeightPrecision::kQ8_0) return WeightFormat::kQ8_0;
  if (precision == WeightPrecision::kQ4_0) return WeightFormat::kQ4_0;
  return std::nullopt;
}

absl::StatusOr<WeightPrecision> ParseWeightPrecision(std::string_view name) {
  for (WeightPrecision p :
       {WeightPrecision::kFloat32, WeightPrecision::kStored, WeightPrecision::kQ8_0, WeightPrecision::kQ4_0}) {
    if (name == WeightPrecisionName(p)) return p;
  }
  return absl::InvalidArgumentError(StrCat("weights must be fp32, stored, q8_0 or q4_0, got '", name, "'"));
}

}  // namespace seedling::model
