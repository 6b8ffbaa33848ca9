#include "server/robust_options.h"

#include <algorithm>
#include <cmath>
#include <string_view>

#include "base/strings.h"

namespace seedling::server {
namespace {

absl::Status KeyError(std::string_view key, std::string_view problem) {
  return absl::InvalidArgumentError(StrCat("[strategy] ", key, ": ", problem));
}

}  // namespace

absl::Status ValidateRobustOptions(const RobustOptions& o) {
  if (o.rule != "none" && o.rule != "norm" && o.rule != "median" && o.rule != "trimmed-mean" && o.rule != "krum") {
    return KeyError(
        "robust", StrCat("must be \"none\", \"norm\", \"median\", \"trimmed-mean\" or \"krum\", got \"", o.rule, "\""));
  }
  if (!(std::isfinite(o.norm_bound) && o.norm_bound >= 0)) {
    return KeyError("robust_norm_bound",
                    StrCat("must be finite and >= 0 (0 = the median of the round's norms), got ", o.norm_bound));
  }
  if (!(o.trim_fraction >= 0 && o.trim_fraction < 0.5)) {
    return KeyError("robust_trim_fraction", StrCat("must be in [0, 0.5), got ", o.trim_fraction));
  }
  if (o.krum_f < 0) return KeyError("robust_krum_f", StrCat("must be >= 0, got ", o.krum_f));
  if (o.krum_m < 0) return KeyError("robust_krum_m", StrCat("must be >= 0 (0 = n - f), got ", o.krum_m));
  return absl::OkStatus();
}

int64_t MinRobustUpdates(const RobustOptions& options) {
  if (options.rule != "krum") return 1;
  // Krum's n − f − 2 neighbours must exist (n ≥ 2f + 3); m updates must be there to average.
  return std::max(2 * options.krum_f + 3, options.krum_m);
}

}  // namespace seedling::server
