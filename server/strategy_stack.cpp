#include "server/strategy_stack.h"

#include <utility>

#include "base/status.h"
#include "base/strings.h"
#include "model/config.h"
#include "privacy/dp.h"
#include "privacy/secagg.h"
#include "server/dp_strategy.h"
#include "server/robust_strategy.h"
#include "server/secagg_strategy.h"
#include "spdlog/spdlog.h"

namespace seedling::server {
namespace {

absl::StatusOr<std::unique_ptr<Strategy>> WrapWithDp(std::unique_ptr<Strategy> inner, const ServerConfig& config,
                                                     uint64_t version, bool check_only) {
  const PrivacyConfig& p = config.privacy;
  DpStrategyOptions dp;
  dp.clip_norm = p.clip_norm;
  dp.noise_multiplier = p.noise_multiplier;
  dp.expected_clients = static_cast<double>(p.EffectiveExpectedClients(config.clients_per_round));
  dp.max_update_norm = config.max_update_norm;
  dp.kseed_pool_size = config.strategy.kseed_pool_size;
  if (p.dp_ftrl()) {
    // DP-FTRL: the tree's node noise, regenerable after a restart (its key and settings in state_dir).
    dp.tree_restart_rounds = p.tree_restart_rounds;
    std::unique_ptr<privacy::NodeNoise> tree_noise;
    if (check_only) {
      tree_noise = std::make_unique<privacy::SeededNodeNoise>(config.seed);
    } else {
      SEEDLING_ASSIGN_OR_RETURN(tree_noise, OpenTreeNoise(config.state_dir, p, config.seed, version));
    }
    if (!check_only && !tree_noise->cryptographically_secure()) {
      spdlog::warn("DP-FTRL node noise comes from a seeded stream (noise = \"seeded\"): reproducible, NOT private");
    }
    return MakeDpFtrlStrategy(std::move(inner), dp, std::move(tree_noise));
  }
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<privacy::NoiseSource> noise,
                            privacy::MakeNoiseSource(p.noise, config.seed ^ ((version + 1) * 0x9E3779B97F4A7C15ULL)));
  if (!noise->cryptographically_secure()) {
    spdlog::warn("DP noise comes from a seeded stream (noise = \"{}\"): reproducible for simulation, NOT private",
                 p.noise);
  }
  return MakeDpStrategy(std::move(inner), dp, std::move(noise));
}

// Outermost: the unmasked sum goes to DP (noise) or straight to the fedavg family. A masked input is 4 bytes
// per adapter entry plus the weight slot (in pieces when it exceeds a frame, comms/proto).
absl::StatusOr<std::unique_ptr<Strategy>> WrapWithSecAgg(std::unique_ptr<Strategy> inner, const ServerConfig& config,
                                                         int64_t num_parameters) {
  const uint64_t m = static_cast<uint64_t>(num_parameters) + 1;
  if (m > privacy::kMaxVectorLength) {
    return absl::InvalidArgumentError(StrCat("[secagg] enabled: the adapter's ", m, " entries exceed the ",
                                             privacy::kMaxVectorLength, " a secure-aggregation session masks"));
  }
  SEEDLING_RETURN_IF_ERROR(
      SecAggParamsFor(config.secagg, static_cast<uint32_t>(config.SelectionQuota()), static_cast<uint32_t>(m))
          .status());
  spdlog::info("secure aggregation (SecAgg+): cohorts of up to {}, Q = {}, clipping range {}, max weight {}",
               config.SelectionQuota(), config.secagg.quantization_levels, config.secagg.clipping_range,
               config.secagg.max_weight);
  return std::make_unique<SecAggStrategy>(std::move(inner));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Strategy>> MakeServerStrategy(const ServerConfig& config, int64_t num_parameters,
                                                             uint64_t version, bool check_only) {
  StrategyOptions options = config.strategy;
  // One setting, enforced by the strategy (by the DP wrapper with DP on: the inner strategy then sees only
  // the noised aggregate, which is not a client update; by the robust wrapper, which hands it the robust
  // aggregate).
  const bool wrapped = config.privacy.dp || config.secagg.enabled || config.robust.enabled();
  options.max_update_norm = wrapped ? 0.0 : config.max_update_norm;
  SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<Strategy> strategy, MakeStrategy(options));
  if (config.robust.enabled()) {
    // Plaintext rounds of the fedavg family only, so it is the only wrapper when present (ServerConfig::
    // Validate says why; checked again for a config that was not validated). A round accepts at most
    // clients_per_round updates.
    if (config.privacy.dp || config.secagg.enabled) {
      return absl::InvalidArgumentError("[strategy] robust: cannot run with [privacy] dp or [secagg] enabled");
    }
    SEEDLING_ASSIGN_OR_RETURN(strategy, MakeRobustStrategy(std::move(strategy), config.robust, config.max_update_norm,
                                                           config.clients_per_round, num_parameters));
  }
  if (config.privacy.dp) {
    SEEDLING_ASSIGN_OR_RETURN(strategy, WrapWithDp(std::move(strategy), config, version, check_only));
  }
  if (config.secagg.enabled) {
    SEEDLING_ASSIGN_OR_RETURN(strategy, WrapWithSecAgg(std::move(strategy), config, num_parameters));
  }
  return strategy;
}

absl::StatusOr<BaseAdapter> MakeBaseAdapter(const ServerConfig& config) {
  absl::StatusOr<model::ModelConfig> model_config = model::LoadModelConfig(config.model_dir);
  if (!model_config.ok()) return Annotate(model_config.status(), "[model] dir");
  absl::StatusOr<lora::LoraConfig> lora_config = ServerLoraConfig(config, *model_config);
  if (!lora_config.ok()) return Annotate(lora_config.status(), "[lora]");
  absl::StatusOr<std::unique_ptr<lora::LoraAdapter>> adapter = lora::LoraAdapter::Create(*model_config, *lora_config);
  if (!adapter.ok()) return Annotate(adapter.status(), "[lora]");
  return BaseAdapter{model::ModelId(*model_config), std::move(adapter).value()};
}

}  // namespace seedling::server
