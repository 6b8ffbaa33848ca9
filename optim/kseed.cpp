#include "optim/kseed.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::optim {

std::vector<uint64_t> CandidateSeeds(uint64_t pool_seed, int64_t k) {
  // A dedicated stream so pools never coincide with step seeds of the same number.
  constexpr uint64_t kPoolStream = 0x6b736565642d706fULL;  // "kseed-po"
  Rng rng(pool_seed, kPoolStream);
  std::vector<uint64_t> pool(static_cast<size_t>(std::max<int64_t>(k, 0)));
  for (uint64_t& s : pool) s = rng.NextU64();
  return pool;
}

std::vector<SeedScalar> SumPerSeed(const std::vector<SeedScalar>& pairs, double weight) {
  std::map<uint32_t, double> sums;  // double, then one rounding to float per seed
  for (const SeedScalar& p : pairs) sums[p.index] += static_cast<double>(p.value) * weight;
  std::vector<SeedScalar> out;
  for (const auto& [index, sum] : sums) {
    if (sum != 0.0) out.push_back({index, static_cast<float>(sum)});
  }
  return out;
}

absl::Status ApplySeedSums(const ParameterSet& params, const std::vector<uint64_t>& pool, std::vector<SeedScalar> sums,
                           double lr) {
  for (const SeedScalar& s : sums) {
    if (s.index >= pool.size()) {
      return absl::InvalidArgumentError(StrCat("seed index ", s.index, " is outside the pool of ", pool.size()));
    }
    if (!std::isfinite(s.value)) {
      return absl::InvalidArgumentError(StrCat("the scalar for seed index ", s.index, " is not finite"));
    }
  }
  std::stable_sort(sums.begin(), sums.end(),
                   [](const SeedScalar& a, const SeedScalar& b) { return a.index < b.index; });
  for (const SeedScalar& s : sums) {
    params.AddNormal(pool[s.index], static_cast<float>(-lr * static_cast<double>(s.value)));
  }
  return absl::OkStatus();
}

absl::Status ReplaySeedHistory(const ParameterSet& params, const std::vector<uint64_t>& pool,
                               const std::vector<std::vector<SeedScalar>>& rounds, double lr) {
  // Validate everything first so a bad round changes nothing.
  for (size_t r = 0; r < rounds.size(); ++r) {
    for (const SeedScalar& s : rounds[r]) {
      if (s.index >= pool.size() || !std::isfinite(s.value)) {
        return absl::InvalidArgumentError(StrCat("round ", r, " has an invalid seed scalar (index ", s.index, ")"));
      }
    }
  }
  for (const auto& round : rounds) SEEDLING_RETURN_IF_ERROR(ApplySeedSums(params, pool, round, lr));
  return absl::OkStatus();
}

std::vector<double> SeedProbabilities(const std::vector<std::vector<float>>& history, double clip) {
  const size_t k = history.size();
  std::vector<double> score(k, 0.0);
  for (size_t i = 0; i < k; ++i) {
    if (history[i].empty()) continue;
    double sum = 0;
    for (float g : history[i]) sum += std::min(std::abs(static_cast<double>(g)), clip);
    score[i] = sum / static_cast<double>(history[i].size());
  }
  if (k == 0) return {};
  const auto [lo, hi] = std::minmax_element(score.begin(), score.end());
  const double range = *hi - *lo;
  double z = 0;
  std::vector<double> p(k);
  for (size_t i = 0; i < k; ++i) {
    const double normalized = range > 0 ? (score[i] - *lo) / range : 0.0;
    p[i] = std::exp(normalized);
    z += p[i];
  }
  for (double& x : p) x /= z;
  return p;
}

absl::StatusOr<std::unique_ptr<KSeedTrainer>> KSeedTrainer::Create(const model::LlamaModel& model,
                                                                   lora::LoraAdapter* adapter, ParameterSet params,
                                                                   const KSeedOptions& options) {
  if (options.pool_size < 1 || options.pool_size > (int64_t{1} << 32)) {
    return absl::InvalidArgumentError(StrCat("pool_size must be in [1, 2^32], got ", options.pool_size));
  }
  if (!(options.lr > 0)) return absl::InvalidArgumentError(StrCat("lr must be > 0, got ", options.lr));
  if (!(options.epsilon > 0)) return absl::InvalidArgumentError("epsilon must be > 0");
  if (params.numel() == 0) return absl::InvalidArgumentError("nothing to train: the parameter set is empty");
  if (options.perturbations < 1) {
    return absl::InvalidArgumentError(StrCat("perturbations must be >= 1, got ", options.perturbations));
  }
  if (options.batched && adapter == nullptr) {
    return absl::InvalidArgumentError(
        "batched probes perturb an adapter's copies; full-parameter kseed probes in place");
  }
  std::vector<double> cdf;
  if (!options.probabilities.empty()) {
    if (static_cast<int64_t>(options.probabilities.size()) != options.pool_size) {
      return absl::InvalidArgumentError(
          StrCat("probabilities has ", options.probabilities.size(), " entries for a pool of ", options.pool_size));
    }
    double total = 0;
    for (double p : options.probabilities) {
      if (!(p >= 0) || !std::isfinite(p)) return absl::InvalidArgumentError("probabilities must be finite and >= 0");
      total += p;
      cdf.push_back(total);
    }
    if (!(total > 0)) return absl::InvalidArgumentError("probabilities sum to zero");
    for (double& c : cdf) c /= total;
  }
  return std::unique_ptr<KSeedTrainer>(new KSeedTrainer(model, adapter, std::move(params), options,
                                                        CandidateSeeds(options.pool_seed, options.pool_size),
                                                        std::move(cdf)));
}

TrainerState KSeedTrainer::SaveState() const {
  TrainerState s = LocalTrainer::SaveState();
  for (const SeedScalar& p : pairs_) s.pairs.emplace_back(p.index, p.value);
  return s;
}

absl::Status KSeedTrainer::RestoreState(const TrainerState& state) {
  std::vector<SeedScalar> pairs;
  for (const auto& [index, value] : state.pairs) {
    if (index >= pool_.size() || !std::isfinite(value)) {
      return absl::InvalidArgumentError(StrCat("trainer state has an invalid seed pair (index ", index, ")"));
    }
    pairs.push_back({index, value});
  }
  SEEDLING_RETURN_IF_ERROR(LocalTrainer::RestoreState(state));
  pairs_ = std::move(pairs);
  return absl::OkStatus();
}

std::vector<uint32_t> KSeedTrainer::PickIndices(uint64_t step) const {
  Rng rng(StepSeed(options_.seed, step), rng_stream::kStepSeeds);
  std::vector<uint32_t> indices;
  for (int64_t i = 0; i < options_.perturbations; ++i) {
    if (cdf_.empty()) {
      indices.push_back(static_cast<uint32_t>(rng.UniformInt(pool_.size())));
      continue;
    }
    const double u = rng.Uniform();
    const auto it = std::upper_bound(cdf_.begin(), cdf_.end(), u);
    indices.push_back(
        static_cast<uint32_t>(std::min<size_t>(static_cast<size_t>(it - cdf_.begin()), pool_.size() - 1)));
  }
  return indices;
}

absl::StatusOr<StepResult> KSeedTrainer::Step(const model::Batch& batch) {
  model::ForwardOptions fo;
  fo.adapter = adapter_;
  fo.ce_chunk_tokens = options_.ce_chunk_tokens;
  fo.mlp_chunk_tokens = options_.mlp_chunk_tokens;
  const std::vector<uint32_t> indices = PickIndices(static_cast<uint64_t>(steps()));
  std::vector<uint64_t> seeds;
  for (uint32_t i : indices) seeds.push_back(pool_[i]);
  SEEDLING_ASSIGN_OR_RETURN(std::vector<SpsaProbe> probes,
                            RunProbes(model_, batch, fo, adapter_, params_, seeds, options_.epsilon, options_.batched,
                                      options_.exact_restore));
  StepResult result;
  result.loss = MeanProbeLoss(probes);
  result.tokens = batch.labels.narrow(1, 1, batch.labels.size(1) - 1).ne(model::kIgnoreIndex).sum().item<int64_t>();
  if (!AllFinite(probes)) {
    result.skipped = true;
    return Count(result);
  }
  const double q = static_cast<double>(probes.size());
  std::vector<SeedScalar> step_pairs;
  for (size_t i = 0; i < probes.size(); ++i) {
    step_pairs.push_back({indices[i], static_cast<float>(probes[i].projected_gradient / q)});
  }
  // The same arithmetic as ApplySeedSums on the step's pairs, so the local path and replay agree bit for bit.
  SEEDLING_RETURN_IF_ERROR(ApplySeedSums(params_, pool_, step_pairs, options_.lr));
  pairs_.insert(pairs_.end(), step_pairs.begin(), step_pairs.end());
  return Count(result);
}

}  // namespace seedling::optim
