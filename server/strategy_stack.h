#pragma once

// The coordinator's strategy, assembled from the config (docs/architecture.md, "The server"): the built-in
// strategy ([strategy], server/strategy.h), wrapped by DpStrategy with [privacy] dp (server/dp_strategy.h), and
// outermost by SecAggStrategy with [secagg] enabled (server/secagg_strategy.h):
//
//   SecAggStrategy → DpStrategy → fedavg family | fwdgrad | kseed
//
// or, with [strategy] robust (plaintext rounds without DP, server/robust_strategy.h):
//
//   RobustStrategy → fedavg family
//
// Each privacy mechanism is a wrapper behind the Strategy interface, so the coordinator's round loop is the
// same with or without them.

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "lora/adapter.h"
#include "server/config.h"
#include "server/strategy.h"

namespace seedling::server {

// The strategy for an adapter of `num_parameters` entries whose committed version is `version` (the seeded
// DP noise stream continues from it, so a restart does not replay earlier rounds' noise). InvalidArgument
// when the options do not fit, e.g. an adapter too large for a secure-aggregation session. With [privacy]
// mechanism = "dp-ftrl" it opens (or, at version 0, creates) the tree's state in state_dir (OpenTreeNoise in
// server/dp_strategy.h), unless `check_only`: then state_dir is not touched and seeded node noise stands in
// (preflight checks build the stack this way; such a strategy must never serve).
absl::StatusOr<std::unique_ptr<Strategy>> MakeServerStrategy(const ServerConfig& config, int64_t num_parameters,
                                                             uint64_t version, bool check_only = false);

// The adapter the rounds train: its shapes from the base model's config (config.json or a GGUF file's
// metadata), at its deterministic initialization (version 0), with the model's id as devices compute it
// (model::ModelId). Errors name the server.toml section: "[model] dir: ..." or "[lora]: ...".
struct BaseAdapter {
  std::string model_id;
  std::unique_ptr<lora::LoraAdapter> adapter;
};
absl::StatusOr<BaseAdapter> MakeBaseAdapter(const ServerConfig& config);

}  // namespace seedling::server
