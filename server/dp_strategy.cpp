#include "server/dp_strategy.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <map>
#include <utility>

#include "base/check.h"
#include "base/file.h"
#include "base/philox.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "comms/codec.h"
#include "server/internal/update_checks.h"

namespace seedling::server {

using internal::InvalidUpdate;
using internal::IsDenseCodec;

DpStrategy::DpStrategy(std::unique_ptr<Strategy> inner, DpStrategyOptions options,
                       std::unique_ptr<privacy::NoiseSource> noise, std::unique_ptr<privacy::NodeNoise> tree_noise)
    : inner_(std::move(inner)),
      options_(options),
      kseed_(inner_->name() == "kseed"),
      fwdgrad_(inner_->name() == "fwdgrad"),
      noise_(std::move(noise)),
      tree_noise_(std::move(tree_noise)) {
  SEEDLING_CHECK(options_.mechanism == DpMechanism::kGaussian ? noise_ != nullptr : tree_noise_ != nullptr);
}

void DpStrategy::ConfigureTask(uint64_t round_index, v1::Task& task) const {
  inner_->ConfigureTask(round_index, task);
  task.set_clip_norm(static_cast<float>(options_.clip_norm));  // clients clip before upload
}

absl::Status DpStrategy::BeginRound(const GlobalModel& global) {
  // The inner strategy checks the model (buffers, size) now, so a bad model fails at the round's start.
  SEEDLING_RETURN_IF_ERROR(inner_->BeginRound(global));
  absl::MutexLock lock(&mu_);
  open_ = true;
  numel_ = global.params.size();
  sum_.assign(kseed_ ? options_.kseed_pool_size : numel_, 0.0);
  scratch_.assign(kseed_ ? 0 : numel_, 0.0f);
  clients_ = 0;
  examples_ = 0;
  clipped_ = 0;
  failures_ = 0;
  client_norm_sum_ = 0;
  return absl::OkStatus();
}

absl::Status DpStrategy::Accumulate(const UpdateView& update) {
  absl::MutexLock lock(&mu_);
  SEEDLING_RETURN_IF_ERROR(internal::CheckUpdateHeader(name(), open_, update, examples_));
  SEEDLING_RETURN_IF_ERROR(kseed_ ? AccumulateSeedsLocked(update) : AccumulateDenseLocked(update));
  ++clients_;
  examples_ += update.num_examples;
  return absl::OkStatus();
}

absl::Status DpStrategy::AccumulateSum(const SummedUpdate& sum) {
  if (kseed_ || fwdgrad_) return absl::UnimplementedError(StrategyCannotTakeSums(name()));
  absl::MutexLock lock(&mu_);
  if (!open_) return absl::FailedPreconditionError(StrCat("strategy ", name(), ": no round begun"));
  if (sum.weighted_sum.size() != numel_) {
    return absl::InvalidArgumentError(
        StrCat("the summed update has ", sum.weighted_sum.size(), " elements, the global model ", numel_));
  }
  if (sum.clients <= 0 || sum.total_weight != static_cast<uint64_t>(sum.clients)) {
    return absl::InvalidArgumentError(StrCat("DP weighs every client 1: a summed update of ", sum.clients,
                                             " clients must have total weight ", sum.clients, ", got ",
                                             sum.total_weight));
  }
  for (size_t i = 0; i < numel_; ++i) {
    if (!std::isfinite(sum.weighted_sum[i])) {
      return absl::InvalidArgumentError(StrCat("element ", i, " of the summed update is not finite"));
    }
  }
  for (size_t i = 0; i < numel_; ++i) sum_[i] += static_cast<double>(sum.weighted_sum[i]);
  clients_ += sum.clients;
  examples_ += sum.total_weight;
  return absl::OkStatus();
}

absl::Status DpStrategy::AccumulateDenseLocked(const UpdateView& update) {
  absl::StatusOr<comms::PayloadInfo> info = comms::InspectPayload(update.payload);
  if (!info.ok()) return InvalidUpdate(update, FromAbsl(info.status().message()));
  // Step 1: decode the whole update into the scratch buffer (nothing is added until it passed).
  std::fill(scratch_.begin(), scratch_.end(), 0.0f);
  if (IsDenseCodec(info->codec)) {
    if (info->numel != numel_) {
      return InvalidUpdate(update, StrCat("the update has ", info->numel, " elements, the global model ", numel_));
    }
    if (absl::Status st = comms::DecodeDenseAdd(update.payload, 1.0f, scratch_); !st.ok()) {
      return InvalidUpdate(update, FromAbsl(st.message()));
    }
  } else if (fwdgrad_ && info->codec == v1::CODEC_SEED_SCALARS && info->seed_kind == comms::SeedScalarKind::kSeed) {
    // FwdLLM pairs: g = Σ_k value_k z(seed_k), the inner strategy's rebuild (optim::AddSeededNormal order).
    absl::StatusOr<std::vector<comms::SeedValueScalar>> pairs = comms::DecodeSeedValueScalars(update.payload);
    if (!pairs.ok()) return InvalidUpdate(update, FromAbsl(pairs.status().message()));
    for (const comms::SeedValueScalar& p : *pairs) {
      seedling::AddNormal({p.seed, rng_stream::kPerturbation}, 0, p.value, scratch_);
    }
  } else {
    return absl::InvalidArgumentError(
        StrCat("strategy ", name(), " does not accept codec ", v1::Codec_Name(info->codec)));
  }
  // Step 2: the cap (reject), then the clip (McMahan et al. 2018 Alg. 1, ClipFn: Δ · min(1, C/‖Δ‖)).
  double norm2 = 0.0;
  for (float v : scratch_) norm2 += static_cast<double>(v) * v;
  const double norm = std::sqrt(norm2);
  if (!std::isfinite(norm)) return InvalidUpdate(update, "the update is not finite");
  if (options_.max_update_norm > 0 && norm > options_.max_update_norm) {
    return InvalidUpdate(update, StrCat("L2 norm ", norm, " exceeds max_update_norm ", options_.max_update_norm));
  }
  absl::StatusOr<privacy::ClipResult> clip = privacy::ClipToL2Norm(scratch_, options_.clip_norm);
  if (!clip.ok()) return InvalidUpdate(update, FromAbsl(clip.status().message()));
  // Step 3: S += clip(Δ_c), weight 1.
  for (size_t i = 0; i < numel_; ++i) sum_[i] += static_cast<double>(scratch_[i]);
  if (clip->clipped()) ++clipped_;
  client_norm_sum_ += norm;
  return absl::OkStatus();
}

absl::Status DpStrategy::AccumulateSeedsLocked(const UpdateView& update) {
  absl::StatusOr<comms::PayloadInfo> info = comms::InspectPayload(update.payload);
  if (!info.ok()) return InvalidUpdate(update, FromAbsl(info.status().message()));
  if (info->codec != v1::CODEC_SEED_SCALARS || info->seed_kind != comms::SeedScalarKind::kIndex) {
    return absl::InvalidArgumentError(StrCat("strategy ", name(), " does not accept codec ",
                                             v1::Codec_Name(info->codec), " without (seed index, scalar) pairs"));
  }
  absl::StatusOr<std::vector<comms::SeedIndexScalar>> pairs =
      comms::DecodeSeedIndexScalars(update.payload, options_.kseed_pool_size);
  if (!pairs.ok()) return InvalidUpdate(update, FromAbsl(pairs.status().message()));
  // Each scalar to |ĝ| ≤ C (docs/architecture.md, "Privacy"), then the client's per-seed vector v_c (v_c,i = Σ of its
  // scalars on seed i) to ‖v_c‖₂ ≤ C: the sensitivity the noise is calibrated to.
  std::vector<float> values(pairs->size());
  double raw2 = 0.0;
  for (size_t k = 0; k < pairs->size(); ++k) {
    values[k] = (*pairs)[k].value;
    raw2 += static_cast<double>(values[k]) * values[k];
  }
  absl::StatusOr<int64_t> scalars_clipped = privacy::ClipScalars(values, options_.clip_norm);
  if (!scalars_clipped.ok()) return InvalidUpdate(update, FromAbsl(scalars_clipped.status().message()));
  std::map<uint32_t, double> per_seed;
  for (size_t k = 0; k < pairs->size(); ++k) per_seed[(*pairs)[k].index] += static_cast<double>(values[k]);
  double v2 = 0.0;
  for (const auto& [index, v] : per_seed) v2 += v * v;
  const double vnorm = std::sqrt(v2);
  double scale = 1.0;
  // (1 − 1e-12): S is summed in double, so the bound holds after rounding too.
  if (vnorm > options_.clip_norm) scale = options_.clip_norm / vnorm * (1.0 - 1e-12);
  for (const auto& [index, v] : per_seed) sum_[index] += v * scale;
  if (*scalars_clipped > 0 || scale < 1.0) ++clipped_;
  client_norm_sum_ += std::sqrt(raw2);
  return absl::OkStatus();
}

void DpStrategy::RecordFailure(const std::string& device_id, const std::string& reason) {
  (void)device_id, (void)reason;
  absl::MutexLock lock(&mu_);
  ++failures_;
}

int64_t DpStrategy::accumulated() const {
  absl::MutexLock lock(&mu_);
  return clients_;
}

absl::StatusOr<RoundOutcome> DpStrategy::FinishRound(GlobalModel& global) {
  absl::MutexLock lock(&mu_);
  if (!open_ || clients_ == 0) {
    return absl::FailedPreconditionError(StrCat("strategy ", name(), ": nothing accumulated in this round"));
  }
  if (global.params.size() != numel_) {
    return absl::FailedPreconditionError(
        StrCat("the global model has ", global.params.size(), " parameters; the round began with ", numel_));
  }
  // Δ = (S + N(0, z²C² I)) / m (docs/methods.md, "Differential privacy (DP-FedAvg and the accountant)", steps 4–5):
  // noise on the sum, then the fixed denominator. Noise is drawn into the sum in place; on failure the round is not
  // released.
  const double sum_stddev = options_.noise_multiplier * options_.clip_norm;
  const double m = options_.expected_clients;
  std::map<std::string, double> tree_metrics;
  double delta_stddev = sum_stddev / m;
  absl::Status noised = absl::OkStatus();
  if (options_.mechanism == DpMechanism::kGaussian) {
    noised = noise_->AddGaussian(sum_stddev, sum_);
  } else {
    // DP-FTRL: S_τ − S_{τ−1} of this round's tree (see the header).
    const uint64_t per_tree = static_cast<uint64_t>(options_.tree_restart_rounds);
    const uint64_t tree = global.version / per_tree;
    const uint64_t position = global.version % per_tree + 1;
    noised = privacy::AddPrefixNoiseIncrement(*tree_noise_, tree, position, sum_stddev, sum_);
    // Nodes in cover(τ) or cover(τ−1) but not both: popcount(τ XOR (τ − 1)).
    delta_stddev *= std::sqrt(static_cast<double>(std::popcount(position ^ (position - 1))));
    tree_metrics["dp_tree"] = static_cast<double>(tree);
    tree_metrics["dp_tree_round"] = static_cast<double>(position);
    tree_metrics["dp_prefix_noise_stddev"] = sum_stddev * std::sqrt(static_cast<double>(std::popcount(position))) / m;
  }
  if (!noised.ok()) {
    open_ = false;
    return absl::InternalError(StrCat("DP noise: ", noised.message()));
  }
  std::string payload;
  if (kseed_) {
    std::vector<comms::SeedIndexScalar> pairs;
    pairs.reserve(sum_.size());
    for (size_t i = 0; i < sum_.size(); ++i) {
      pairs.push_back({static_cast<uint32_t>(i), static_cast<float>(sum_[i] / m)});
    }
    payload = comms::EncodeSeedIndexScalars(pairs);
  } else {
    for (size_t i = 0; i < numel_; ++i) scratch_[i] = static_cast<float>(sum_[i] / m);
    comms::CodecOptions fp32;
    fp32.codec = v1::CODEC_FP32;
    absl::StatusOr<std::string> encoded = comms::EncodeDense(scratch_, fp32, 0);
    if (!encoded.ok()) {
      open_ = false;
      return absl::InternalError(StrCat("encoding the noised aggregate: ", encoded.status().message()));
    }
    payload = *std::move(encoded);
  }
  open_ = false;
  sum_.clear();
  sum_.shrink_to_fit();

  // The inner strategy's mean of this one weight-1 update is Δ; it applies its own step.
  SEEDLING_RETURN_IF_ERROR(inner_->BeginRound(global));
  UpdateView aggregate;
  aggregate.device_id = "dp-aggregate";
  aggregate.num_examples = 1;
  aggregate.payload = payload;
  if (absl::Status st = inner_->Accumulate(aggregate); !st.ok()) {
    return absl::InternalError(StrCat("the inner strategy refused the noised aggregate: ", st.message()));
  }
  SEEDLING_ASSIGN_OR_RETURN(RoundOutcome outcome, inner_->FinishRound(global));
  outcome.metrics["clients"] = static_cast<double>(clients_);
  outcome.metrics["examples"] = static_cast<double>(examples_);
  outcome.metrics["mean_client_norm"] = client_norm_sum_ / static_cast<double>(clients_);
  outcome.metrics["failures"] = static_cast<double>(failures_);
  outcome.metrics["dp_clipped"] = static_cast<double>(clipped_);
  outcome.metrics["dp_noise_stddev"] = delta_stddev;
  outcome.metrics["dp_expected_clients"] = m;
  for (const auto& [key, value] : tree_metrics) outcome.metrics[key] = value;
  return outcome;
}

namespace {

absl::Status ValidateCommonOptions(const Strategy* inner, const DpStrategyOptions& o) {
  if (inner == nullptr) return absl::InvalidArgumentError("DP needs an inner strategy");
  if (!(o.clip_norm > 0) || !std::isfinite(o.clip_norm)) {
    return absl::InvalidArgumentError(StrCat("DP clip_norm must be finite and > 0, got ", o.clip_norm));
  }
  if (!(o.noise_multiplier >= 0) || !std::isfinite(o.noise_multiplier)) {
    return absl::InvalidArgumentError(StrCat("DP noise_multiplier must be finite and >= 0, got ", o.noise_multiplier));
  }
  if (!(o.expected_clients > 0) || !std::isfinite(o.expected_clients)) {
    return absl::InvalidArgumentError(StrCat("DP expected_clients must be finite and > 0, got ", o.expected_clients));
  }
  if (!(o.max_update_norm >= 0) || !std::isfinite(o.max_update_norm)) {
    return absl::InvalidArgumentError(StrCat("max_update_norm must be finite and >= 0, got ", o.max_update_norm));
  }
  if (inner->name() == "kseed" && o.kseed_pool_size < 1) {
    return absl::InvalidArgumentError("kseed_pool_size must be >= 1, got 0");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Strategy>> MakeDpStrategy(std::unique_ptr<Strategy> inner, const DpStrategyOptions& o,
                                                         std::unique_ptr<privacy::NoiseSource> noise) {
  SEEDLING_RETURN_IF_ERROR(ValidateCommonOptions(inner.get(), o));
  if (noise == nullptr) return absl::InvalidArgumentError("DP needs a noise source");
  if (o.mechanism != DpMechanism::kGaussian) {
    return absl::InvalidArgumentError("MakeDpStrategy is the Gaussian mechanism; DP-FTRL is MakeDpFtrlStrategy");
  }
  return std::unique_ptr<Strategy>(new DpStrategy(std::move(inner), o, std::move(noise), nullptr));
}

absl::StatusOr<std::unique_ptr<Strategy>> MakeDpFtrlStrategy(std::unique_ptr<Strategy> inner,
                                                             const DpStrategyOptions& options,
                                                             std::unique_ptr<privacy::NodeNoise> tree_noise) {
  SEEDLING_RETURN_IF_ERROR(ValidateCommonOptions(inner.get(), options));
  if (tree_noise == nullptr) return absl::InvalidArgumentError("DP-FTRL needs a node noise source");
  if (options.tree_restart_rounds < 1 || static_cast<uint64_t>(options.tree_restart_rounds) > privacy::kMaxTreeLeaves) {
    return absl::InvalidArgumentError(StrCat("DP-FTRL tree_restart_rounds must be in [1, ", privacy::kMaxTreeLeaves,
                                             "], got ", options.tree_restart_rounds));
  }
  DpStrategyOptions o = options;
  o.mechanism = DpMechanism::kTreeAggregation;
  return std::unique_ptr<Strategy>(new DpStrategy(std::move(inner), o, nullptr, std::move(tree_noise)));
}

namespace {

constexpr const char* kTreeStateFile = "dp-ftrl-tree";
constexpr const char* kTreeStateHeader = "seedling dp-ftrl tree v1";

// "key value" lines after the header line.
absl::StatusOr<std::map<std::string, std::string>> ParseTreeState(const std::string& path, const std::string& text) {
  std::map<std::string, std::string> fields;
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    lines.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  if (lines.empty() || lines[0] != kTreeStateHeader) {
    return absl::DataLossError(StrCat(path, ": not a DP-FTRL tree state (expected the line '", kTreeStateHeader, "')"));
  }
  for (size_t i = 1; i < lines.size(); ++i) {
    const size_t space = lines[i].find(' ');
    if (space == std::string::npos) return absl::DataLossError(StrCat(path, ": malformed line ", i + 1));
    fields[lines[i].substr(0, space)] = lines[i].substr(space + 1);
  }
  return fields;
}

absl::StatusOr<std::array<uint8_t, privacy::KeyedNodeNoise::kKeyBytes>> KeyFromHex(const std::string& path,
                                                                                   const std::string& hex) {
  std::array<uint8_t, privacy::KeyedNodeNoise::kKeyBytes> key;
  if (hex.size() != 2 * key.size()) return absl::DataLossError(StrCat(path, ": the key is not 64 hex digits"));
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < key.size(); ++i) {
    const int hi = digit(hex[2 * i]), lo = digit(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return absl::DataLossError(StrCat(path, ": the key is not 64 lowercase hex digits"));
    key[i] = static_cast<uint8_t>(hi * 16 + lo);
  }
  return key;
}

std::string TreeSettings(const PrivacyConfig& privacy) {
  return StrCat("tree_restart_rounds ", privacy.tree_restart_rounds, "\nmax_participations_per_tree ",
                privacy.max_participations_per_tree, "\nnoise ", privacy.noise, "\n");
}

}  // namespace

absl::StatusOr<std::unique_ptr<privacy::NodeNoise>> OpenTreeNoise(const std::string& state_dir,
                                                                  const PrivacyConfig& privacy, uint64_t seed,
                                                                  uint64_t committed_version) {
  const std::string path = StrCat(state_dir, "/", kTreeStateFile);
  absl::StatusOr<std::string> text = ReadFile(path);
  std::map<std::string, std::string> fields;
  if (text.ok()) {
    SEEDLING_ASSIGN_OR_RETURN(fields, ParseTreeState(path, *text));
    const std::string recorded =
        StrCat("tree_restart_rounds ", fields["tree_restart_rounds"], "\nmax_participations_per_tree ",
               fields["max_participations_per_tree"], "\nnoise ", fields["noise"], "\n");
    if (recorded != TreeSettings(privacy)) {
      return absl::FailedPreconditionError(StrCat(
          path, " records the run's DP-FTRL settings (", recorded, ") and [privacy] now says (", TreeSettings(privacy),
          "): they cannot change under committed rounds; restore them or start a ", "fresh state_dir"));
    }
  } else if (absl::IsNotFound(text.status())) {
    if (committed_version > 0) {
      return absl::FailedPreconditionError(
          StrCat("[privacy] mechanism = \"dp-ftrl\" but ", path, " is missing at global version ", committed_version,
                 ": either the rounds so far were not DP-FTRL rounds or the tree's key is lost; DP-FTRL starts from ",
                 "a fresh state_dir"));
    }
    std::string contents = StrCat(kTreeStateHeader, "\n", TreeSettings(privacy));
    if (privacy.noise == "csprng") {
      SEEDLING_ASSIGN_OR_RETURN(auto key, privacy::NewTreeNoiseKey());
      fields["key"] = HexOf(std::string_view(reinterpret_cast<const char*>(key.data()), key.size()));
      contents += StrCat("key ", fields["key"], "\n");
    }
    SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(path, contents, 0600));
  } else {
    return text.status();
  }
  if (privacy.noise == "seeded") return std::unique_ptr<privacy::NodeNoise>(new privacy::SeededNodeNoise(seed));
  SEEDLING_ASSIGN_OR_RETURN(auto key, KeyFromHex(path, fields["key"]));
  return std::unique_ptr<privacy::NodeNoise>(new privacy::KeyedNodeNoise(key));
}

}  // namespace seedling::server
