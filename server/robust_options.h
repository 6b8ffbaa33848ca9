#pragma once

// The [strategy] robust keys of server.toml (docs/operations.md, "Robust aggregation") and their checks, apart from
// the strategy itself (server/robust_strategy.h) so that the config parser needs nothing else.

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace seedling::server {

// [strategy] robust keys (docs/operations.md).
struct RobustOptions {
  std::string rule = "none";   // none, norm, median, trimmed-mean, krum
  double norm_bound = 0;       // norm: B, the L2 bound of each update; 0 = the median of the round's norms
  double trim_fraction = 0.1;  // trimmed-mean: β in [0, 0.5), values dropped at each end = ⌈β·n⌉
  int64_t krum_f = 1;          // krum: attackers assumed per round, ≥ 0; rounds need n ≥ 2f + 3 updates
  int64_t krum_m = 0;          // krum: updates averaged, ≥ 0; 0 = n − f (every update not excluded); 1 = Krum

  bool enabled() const { return rule != "none"; }
  // Holds the round's updates (not streamable).
  bool holds_updates() const { return enabled() && !(rule == "norm" && norm_bound > 0); }
};

// InvalidArgument naming the key ("robust", "robust_norm_bound", ...) for an unknown rule or a value out of
// range. Does not look at the round size (MakeRobustStrategy and the server config do).
absl::Status ValidateRobustOptions(const RobustOptions& options);

// The fewest updates a round needs for the rule (krum: 2f + 3; others 1).
int64_t MinRobustUpdates(const RobustOptions& options);

}  // namespace seedling::server
