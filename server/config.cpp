#include "server/config.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "base/toml.h"
#include "comms/transport.h"
#include "lora/lora_config.h"
#include "optim/method.h"
#include "server/internal/update_checks.h"

namespace seedling::server {
namespace {

absl::Status KeyError(std::string_view table, std::string_view key, std::string_view problem) {
  return absl::InvalidArgumentError(StrCat("[", table, "] ", key, ": ", problem));
}

}  // namespace

// [privacy]: checked whether or not dp is on (a typo should not wait for the day DP is enabled), except the
// values that only make sense with dp = true.
static absl::Status ValidatePrivacy(const ServerConfig& c) {
  const PrivacyConfig& p = c.privacy;
  auto finite_at_least = [](double v, double lo, bool strict) {
    return std::isfinite(v) && (strict ? v > lo : v >= lo);
  };
  if (!(p.delta > 0 && p.delta < 1)) return KeyError("privacy", "delta", StrCat("must be in (0, 1), got ", p.delta));
  if (p.noise != "csprng" && p.noise != "seeded") {
    return KeyError("privacy", "noise", StrCat("must be \"csprng\" or \"seeded\", got \"", p.noise, "\""));
  }
  if (p.mechanism != "gaussian" && p.mechanism != "dp-ftrl") {
    return KeyError("privacy", "mechanism", StrCat("must be \"gaussian\" or \"dp-ftrl\", got \"", p.mechanism, "\""));
  }
  if (p.tree_restart_rounds < 0 || p.tree_restart_rounds > (int64_t{1} << 32)) {
    return KeyError("privacy", "tree_restart_rounds", StrCat("must be in [1, 2^32], got ", p.tree_restart_rounds));
  }
  if (p.max_participations_per_tree < 1) {
    return KeyError("privacy", "max_participations_per_tree",
                    StrCat("must be >= 1, got ", p.max_participations_per_tree));
  }
  if (p.expected_clients < 0) {
    return KeyError("privacy", "expected_clients",
                    StrCat("must be >= 0 (0 = clients_per_round), got ", p.expected_clients));
  }
  if (!finite_at_least(p.clip_norm, 0, false) || !finite_at_least(p.noise_multiplier, 0, false) ||
      !finite_at_least(p.target_epsilon, 0, false)) {
    return KeyError("privacy", "clip_norm/noise_multiplier/target_epsilon", "must be finite and >= 0");
  }
  if (!p.dp) return absl::OkStatus();
  if (!(p.clip_norm > 0)) {
    return KeyError("privacy", "clip_norm", StrCat("must be > 0 with dp = true, got ", p.clip_norm));
  }
  if (!(p.noise_multiplier > 0)) {
    return KeyError("privacy", "noise_multiplier",
                    StrCat("must be > 0 with dp = true, got ", p.noise_multiplier,
                           " (`seedling privacy noise-for` calibrates it)"));
  }
  if (!(p.target_epsilon > 0)) {
    return KeyError("privacy", "target_epsilon", StrCat("must be > 0 with dp = true, got ", p.target_epsilon));
  }
  if (p.mechanism == "dp-ftrl" && p.tree_restart_rounds < 1) {
    return KeyError("privacy", "tree_restart_rounds",
                    StrCat("must be >= 1 with mechanism = \"dp-ftrl\" (rounds per tree; a device joins at most ",
                           "max_participations_per_tree rounds of a tree, so choose about registered devices / ",
                           "clients_per_round), got ", p.tree_restart_rounds));
  }
  if (c.clip_norm != 0 && c.clip_norm != p.clip_norm) {
    return KeyError("training", "clip_norm",
                    StrCat("is ", c.clip_norm, " but [privacy] clip_norm is ", p.clip_norm,
                           "; with dp = true leave it out (devices clip to [privacy] clip_norm)"));
  }
  return absl::OkStatus();
}

// [secagg]: the keys' ranges always; with enabled = true, the method and strategy it supports and the
// SecAgg+ parameters for the largest cohort a round can have (SelectionQuota(): the worst case for
// overflow), checked by privacy::ValidateParams, so an overflow-prone setting is refused at load.
static absl::Status ValidateSecAgg(const ServerConfig& c) {
  const SecAggConfig& s = c.secagg;
  if (s.neighbors < 0 || s.threshold < 0) return KeyError("secagg", "neighbors/threshold", "must be >= 0");
  if (!(s.neighbors_fraction >= 0 && s.neighbors_fraction <= 1)) {
    return KeyError("secagg", "neighbors_fraction", StrCat("must be in [0, 1], got ", s.neighbors_fraction));
  }
  if (s.quantization_levels < 2 || s.quantization_levels > int64_t{0xFFFFFFFF}) {
    return KeyError("secagg", "quantization_levels", StrCat("must be in [2, 2^32 - 1], got ", s.quantization_levels));
  }
  if (s.max_weight < 1 || s.max_weight > int64_t{0xFFFFFFFF}) {
    return KeyError("secagg", "max_weight", StrCat("must be in [1, 2^32 - 1], got ", s.max_weight));
  }
  if (!(std::isfinite(s.clipping_range) && s.clipping_range > 0)) {
    return KeyError("secagg", "clipping_range", StrCat("must be finite and > 0, got ", s.clipping_range));
  }
  if (s.stage_timeout_ms < 100 || s.poll_ms < 10 || s.poll_ms > s.stage_timeout_ms) {
    return KeyError("secagg", "stage_timeout_ms/poll_ms",
                    "need stage_timeout_ms >= 100 and 10 <= poll_ms <= stage_timeout_ms");
  }
  if (!s.enabled) return absl::OkStatus();
  if (!optim::UploadsDenseDelta(c.method)) {
    return KeyError(
        "secagg", "enabled",
        StrCat("secure aggregation sums parameter deltas: method must be lora-bp, mezo or pepita, got ", c.method));
  }
  if (c.privacy.dp && s.max_weight != 1) {
    return KeyError("secagg", "max_weight",
                    StrCat("must be 1 with [privacy] dp (DP-FedAvg weighs every device 1), got ", s.max_weight));
  }
  if (c.SelectionQuota() > int64_t{0xFFFFFFFF}) return KeyError("secagg", "enabled", "the cohort is too large");
  absl::StatusOr<privacy::SecAggParams> params = SecAggParamsFor(s, static_cast<uint32_t>(c.SelectionQuota()), 1);
  if (!params.ok()) {
    return KeyError(
        "secagg", "parameters",
        StrCat(params.status().message(), " (for the largest cohort, ", "ceil(clients_per_round x over_selection))"));
  }
  return absl::OkStatus();
}

// [strategy] mode and the FedBuff keys; fedbuff refuses what needs a fixed cohort per round.
static absl::Status ValidateFedBuff(const ServerConfig& c) {
  if (c.mode != "sync" && c.mode != "fedbuff") {
    return KeyError("strategy", "mode", StrCat("'", c.mode, "' is not \"sync\" or \"fedbuff\""));
  }
  if (!(c.strategy.staleness_exponent >= 0 && c.strategy.staleness_exponent <= 1)) {
    return KeyError("strategy", "staleness_exponent", StrCat("must be in [0, 1], got ", c.strategy.staleness_exponent));
  }
  const FedBuffConfig& f = c.fedbuff;
  if (f.buffer_size < 1) return KeyError("strategy", "buffer_size", StrCat("must be >= 1, got ", f.buffer_size));
  if (f.concurrency < f.buffer_size) {
    return KeyError(
        "strategy", "concurrency",
        StrCat("must be >= buffer_size (", f.buffer_size, ") or no buffer could fill, got ", f.concurrency));
  }
  if (f.max_staleness < 0) return KeyError("strategy", "max_staleness", StrCat("must be >= 0, got ", f.max_staleness));
  if (!c.FedBuff()) return absl::OkStatus();
  if (!internal::IsFedAvgFamily(c.strategy.name)) {
    return KeyError("strategy", "mode",
                    StrCat("fedbuff weighs stale parameter deltas: it needs the fedavg family (fedavg, fedavgm, "
                           "fedadam, fedyogi, fedadagrad), not ",
                           c.strategy.name));
  }
  if (c.secagg.enabled) {
    return KeyError("strategy", "mode",
                    "fedbuff cannot run with [secagg] enabled: a SecAgg+ session needs a fixed cohort that uploads "
                    "together, and a buffer fills from whichever tasks finish");
  }
  if (c.privacy.dp) {
    return KeyError("strategy", "mode",
                    "fedbuff cannot run with [privacy] dp: the accountant assumes each round samples its devices "
                    "afresh, while a buffer takes updates trained from older versions by devices chosen earlier");
  }
  return absl::OkStatus();
}

// [strategy] robust: the keys' ranges always; with a rule on, what it can defend (server/robust_strategy.h).
static absl::Status ValidateRobust(const ServerConfig& c) {
  const RobustOptions& r = c.robust;
  SEEDLING_RETURN_IF_ERROR(ValidateRobustOptions(r));
  if (!r.enabled()) return absl::OkStatus();
  if (!optim::UploadsDenseDelta(c.method)) {
    return KeyError("strategy", "robust",
                    StrCat("robust aggregation compares parameter deltas: method must be lora-bp, mezo or pepita (the "
                           "fedavg family), got ",
                           c.method, " (fwdgrad and kseed upload gradient estimates and seed scalars)"));
  }
  if (c.secagg.enabled) {
    return KeyError("strategy", "robust",
                    "cannot run with [secagg] enabled: the server sees only the sum of the updates, never one "
                    "update to bound, rank or compare");
  }
  if (c.privacy.dp) {
    return KeyError("strategy", "robust",
                    "cannot run with [privacy] dp: DP-FedAvg's clipping already bounds every update's norm, and its "
                    "noise is calibrated to a sum's sensitivity, not a median's, trimmed mean's or Krum "
                    "selection's");
  }
  if (c.FedBuff()) {
    return KeyError("strategy", "robust",
                    "cannot run with mode = \"fedbuff\": the rules compare the updates of one round, while a "
                    "buffer weighs updates of different versions by their staleness");
  }
  if (c.EffectiveMinReports() < MinRobustUpdates(r)) {
    return KeyError("strategy", "robust_krum_f",
                    StrCat("krum with f = ", r.krum_f, (r.krum_m > 0 ? StrCat(", m = ", r.krum_m) : ""),
                           " needs at least ", MinRobustUpdates(r), " updates per round, but a round may commit with ",
                           c.EffectiveMinReports(), " ([training] min_reports)"));
  }
  return absl::OkStatus();
}

double ServerConfig::EffectiveClipNorm() const { return privacy.dp ? privacy.clip_norm : clip_norm; }

int64_t ServerConfig::EffectiveMinReports() const {
  return min_reports > 0 ? min_reports : std::max<int64_t>(1, (clients_per_round + 1) / 2);
}

int64_t ServerConfig::SelectionQuota() const {
  return static_cast<int64_t>(std::ceil(static_cast<double>(clients_per_round) * over_selection - 1e-9));
}

// [training] pseudo_label_* (checked whether or not pseudo_labels is on, so a typo never waits for the switch).
static absl::Status ValidatePseudoLabels(const ServerConfig& c) {
  if (!(c.pseudo_label_rate > 0 && c.pseudo_label_rate <= 1)) {
    return KeyError("training", "pseudo_label_rate", StrCat("must be in (0, 1], got ", c.pseudo_label_rate));
  }
  if (!(c.pseudo_label_threshold >= 0 && c.pseudo_label_threshold < 1)) {
    return KeyError("training", "pseudo_label_threshold", StrCat("must be in [0, 1), got ", c.pseudo_label_threshold));
  }
  const std::vector<std::string>& choices = c.pseudo_label_choices;
  if (choices.size() == 1 || choices.size() > 64) {
    return KeyError("training", "pseudo_label_choices", StrCat("must hold 2 to 64 labels, got ", choices.size()));
  }
  const std::set<std::string> distinct(choices.begin(), choices.end());
  if (distinct.size() != choices.size() || distinct.contains("")) {
    return KeyError("training", "pseudo_label_choices", "must be distinct non-empty strings");
  }
  return absl::OkStatus();
}

double ServerConfig::PseudoLabelShare(uint64_t round) const {
  if (!pseudo_labels || round == 0) return 0;
  return std::min(1.0, pseudo_label_rate * static_cast<double>(round));
}

absl::Status ServerConfig::Validate() const {
  if (model_dir.empty()) return KeyError("model", "dir", "is required (the base model: a directory or a GGUF file)");
  if (absl::Status known = optim::ParseMethod(method).status(); !known.ok()) {
    return KeyError("training", "method", FromAbsl(known.message()));
  }
  if (clients_per_round < 1) return KeyError("training", "clients_per_round", "must be >= 1");
  if (!(over_selection >= 1.0)) return KeyError("training", "over_selection", "must be >= 1");
  if (EffectiveMinReports() > clients_per_round) {
    return KeyError("training", "min_reports", "must not exceed clients_per_round");
  }
  if (selection_window_s < 0 || round_deadline_s <= 0 || selection_window_s >= round_deadline_s) {
    return KeyError("training", "round_deadline_s", "must be positive and longer than selection_window_s");
  }
  if (steps < 1 || batch < 1 || seq_len < 2) return KeyError("training", "steps/batch/seq_len", "must be positive");
  // 0 = the method's default.
  if (!(std::isfinite(lr) && lr >= 0)) return KeyError("training", "lr", StrCat("must be finite and >= 0, got ", lr));
  if (!(std::isfinite(epsilon) && epsilon >= 0)) {
    return KeyError("training", "epsilon", StrCat("must be finite and >= 0, got ", epsilon));
  }
  if (perturbations < 1 || perturbations > comms::kMaxTaskPerturbations) {
    return KeyError("training", "perturbations",
                    StrCat("must be in [1, ", comms::kMaxTaskPerturbations, "], got ", perturbations));
  }
  if (strategy.fwdgrad_pacing.enabled) {
    if (method != "fwdgrad") return KeyError("training", "fwdgrad_pacing", "is for method fwdgrad");
    if (privacy.dp) {
      return KeyError("training", "fwdgrad_pacing",
                      "cannot run with [privacy] dp: pacing measures the spread of single clients' estimates, which "
                      "the DP wrapper sums before the strategy sees them");
    }
    SEEDLING_RETURN_IF_ERROR(ValidatePacing(strategy.fwdgrad_pacing));
  }
  SEEDLING_RETURN_IF_ERROR(ValidatePseudoLabels(*this));
  if (max_update_bytes < 1024) return KeyError("training", "max_update_bytes", "must be at least 1024");
  if (max_inflight_uploads < 1) return KeyError("training", "max_inflight_uploads", "must be >= 1");
  SEEDLING_RETURN_IF_ERROR(comms::ValidateCodecOptions(codec));
  const bool seed_codec = codec.codec == v1::CODEC_SEED_SCALARS;
  if (method == "kseed" && !seed_codec)
    return KeyError("training", "codec", "kseed uploads need codec = \"seed-scalars\"");
  if (seed_codec && method != "kseed" && method != "fwdgrad") {
    return KeyError("training", "codec", "seed-scalars is for the kseed and fwdgrad methods");
  }
  // The strategy must read what the method uploads: kseed's seed scalars, fwdgrad's gradient estimates,
  // or the parameter changes the fedavg family averages.
  if ((method == "kseed") != (strategy.name == "kseed") || (method == "fwdgrad") != (strategy.name == "fwdgrad")) {
    return KeyError(
        "strategy", "name",
        StrCat("'", strategy.name, "' cannot aggregate method ", method, " (kseed needs kseed, fwdgrad needs ",
               "fwdgrad, lora-bp and mezo need fedavg, fedavgm, fedadam, fedyogi or fedadagrad)"));
  }
  if (lora_rank < 1 || !(lora_alpha > 0)) return KeyError("lora", "rank/alpha", "must be positive");
  if (lora_targets.empty()) return KeyError("lora", "targets", "must name at least one projection");
  if (absl::Status layers = lora::ParseLayerSelection(lora_layers).status(); !layers.ok()) {
    return KeyError("lora", "layers", FromAbsl(layers.message()));
  }
  absl::StatusOr<lora::AdapterKind> kind = lora::ParseAdapterKind(lora_kind);
  if (!kind.ok()) return KeyError("lora", "kind", FromAbsl(kind.status().message()));
  if (*kind == lora::AdapterKind::kBias && method == "pepita") {
    return KeyError("lora", "kind", "pepita updates LoRA matrices; a BitFit adapter has none");
  }
  if (io_threads < 1 || max_connections < 1) return KeyError("server", "io_threads/max_connections", "must be >= 1");
  if (tick_ms < 10) return KeyError("server", "tick_ms", "must be >= 10");
  SEEDLING_RETURN_IF_ERROR(ValidatePrivacy(*this));
  SEEDLING_RETURN_IF_ERROR(ValidateSecAgg(*this));
  SEEDLING_RETURN_IF_ERROR(ValidateRobust(*this));
  SEEDLING_RETURN_IF_ERROR(ValidateFedBuff(*this));
  if (!(retry_jitter >= 0 && retry_jitter < 1) || retry_base_s < 1) {
    return KeyError("retry", "base_seconds/jitter", "need base >= 1 and 0 <= jitter < 1");
  }
  return absl::OkStatus();
}

absl::StatusOr<lora::LoraConfig> ServerLoraConfig(const ServerConfig& config, const model::ModelConfig& model) {
  SEEDLING_ASSIGN_OR_RETURN(const lora::LayerSelection selection, lora::ParseLayerSelection(config.lora_layers));
  SEEDLING_ASSIGN_OR_RETURN(std::vector<int64_t> layers, lora::ResolveLayers(selection, model.num_hidden_layers));
  SEEDLING_ASSIGN_OR_RETURN(const lora::AdapterKind kind, lora::ParseAdapterKind(config.lora_kind));
  return lora::MakeLoraConfig(config.lora_rank, config.lora_alpha, config.lora_targets, config.lora_init_seed,
                              std::move(layers), kind);
}

absl::StatusOr<ServerConfig> ParseServerConfig(std::string_view toml_text) {
  return ParseServerConfig(toml_text, ServerConfig{});
}

absl::StatusOr<ServerConfig> ParseServerConfig(std::string_view toml_text, const ServerConfig& defaults) {
  SEEDLING_ASSIGN_OR_RETURN(const toml::table root, ParseToml(toml_text));
  ServerConfig c = defaults;
  auto table = [&](const char* name) { return root.get_as<toml::table>(name); };
  for (const auto& [key, value] : root) {
    const std::string k(key.str());
    static const std::set<std::string> kTables = {"server",   "model",   "training", "lora",
                                                  "strategy", "privacy", "secagg",   "retry"};
    if (!kTables.count(k)) return absl::InvalidArgumentError(StrCat("unknown section [", k, "]"));
    if (!value.is_table()) return absl::InvalidArgumentError(StrCat("[", k, "] must be a table"));
  }

  TomlSection server(table("server"), "server");
  SEEDLING_RETURN_IF_ERROR(server.Get("state_dir", c.state_dir));
  SEEDLING_RETURN_IF_ERROR(server.Get("bind", c.bind));
  SEEDLING_RETURN_IF_ERROR(server.Get("port", c.port));
  SEEDLING_RETURN_IF_ERROR(server.Get("cert_file", c.cert_file));
  SEEDLING_RETURN_IF_ERROR(server.Get("key_file", c.key_file));
  SEEDLING_RETURN_IF_ERROR(server.Get("client_ca_file", c.client_ca_file));
  SEEDLING_RETURN_IF_ERROR(server.Get("io_threads", c.io_threads));
  SEEDLING_RETURN_IF_ERROR(server.Get("max_connections", c.max_connections));
  SEEDLING_RETURN_IF_ERROR(server.Get("handshake_timeout_ms", c.handshake_timeout_ms));
  SEEDLING_RETURN_IF_ERROR(server.Get("read_timeout_ms", c.read_timeout_ms));
  SEEDLING_RETURN_IF_ERROR(server.Get("idle_timeout_ms", c.idle_timeout_ms));
  SEEDLING_RETURN_IF_ERROR(server.Get("write_timeout_ms", c.write_timeout_ms));
  SEEDLING_RETURN_IF_ERROR(server.Get("http_bind", c.http_bind));
  SEEDLING_RETURN_IF_ERROR(server.Get("http_port", c.http_port));
  SEEDLING_RETURN_IF_ERROR(server.Get("tick_ms", c.tick_ms));
  SEEDLING_RETURN_IF_ERROR(server.CheckNoUnknownKeys());

  TomlSection model(table("model"), "model");
  SEEDLING_RETURN_IF_ERROR(model.Get("dir", c.model_dir));
  std::string weights = model::WeightPrecisionName(c.weights);
  SEEDLING_RETURN_IF_ERROR(model.Get("weights", weights));
  if (absl::StatusOr<model::WeightPrecision> precision = model::ParseWeightPrecision(weights); precision.ok()) {
    c.weights = *precision;
  } else {
    return KeyError("model", "weights", StrCat("must be fp32, stored, q8_0 or q4_0, got \"", weights, "\""));
  }
  if (table("model") != nullptr && table("model")->get("id") != nullptr) {
    // Devices identify the base model by the SHA-256 of their config.json and decline any other id, so a
    // chosen id could only make every device decline.
    return KeyError("model", "id", "is not a setting: the model id is the SHA-256 of [model] dir's config.json");
  }
  SEEDLING_RETURN_IF_ERROR(model.CheckNoUnknownKeys());

  TomlSection training(table("training"), "training");
  std::string codec(comms::CodecName(c.codec.codec));
  SEEDLING_RETURN_IF_ERROR(training.Get("method", c.method));
  SEEDLING_RETURN_IF_ERROR(training.Get("rounds", c.rounds));
  SEEDLING_RETURN_IF_ERROR(training.Get("clients_per_round", c.clients_per_round));
  SEEDLING_RETURN_IF_ERROR(training.Get("over_selection", c.over_selection));
  SEEDLING_RETURN_IF_ERROR(training.Get("min_reports", c.min_reports));
  SEEDLING_RETURN_IF_ERROR(training.Get("selection_window_s", c.selection_window_s));
  SEEDLING_RETURN_IF_ERROR(training.Get("round_deadline_s", c.round_deadline_s));
  SEEDLING_RETURN_IF_ERROR(training.Get("seed", c.seed));
  SEEDLING_RETURN_IF_ERROR(training.Get("steps", c.steps));
  SEEDLING_RETURN_IF_ERROR(training.Get("batch", c.batch));
  SEEDLING_RETURN_IF_ERROR(training.Get("seq_len", c.seq_len));
  SEEDLING_RETURN_IF_ERROR(training.Get("lr", c.lr));
  SEEDLING_RETURN_IF_ERROR(training.Get("epsilon", c.epsilon));
  SEEDLING_RETURN_IF_ERROR(training.Get("perturbations", c.perturbations));
  SEEDLING_RETURN_IF_ERROR(training.Get("fwdgrad_pacing", c.strategy.fwdgrad_pacing.enabled));
  SEEDLING_RETURN_IF_ERROR(training.Get("fwdgrad_variance_threshold", c.strategy.fwdgrad_pacing.variance_threshold));
  SEEDLING_RETURN_IF_ERROR(training.Get("max_perturbations", c.strategy.fwdgrad_pacing.max_perturbations));
  const bool codec_given = table("training") != nullptr && table("training")->get("codec") != nullptr;
  SEEDLING_RETURN_IF_ERROR(training.Get("codec", codec));
  SEEDLING_RETURN_IF_ERROR(training.Get("block_size", c.codec.block_size));
  SEEDLING_RETURN_IF_ERROR(training.Get("topk_fraction", c.codec.topk_fraction));
  SEEDLING_RETURN_IF_ERROR(training.Get("clip_norm", c.clip_norm));
  SEEDLING_RETURN_IF_ERROR(training.Get("max_update_norm", c.max_update_norm));
  SEEDLING_RETURN_IF_ERROR(training.Get("max_update_bytes", c.max_update_bytes));
  SEEDLING_RETURN_IF_ERROR(training.Get("max_inflight_uploads", c.max_inflight_uploads));
  SEEDLING_RETURN_IF_ERROR(training.Get("require_charging", c.require_charging));
  SEEDLING_RETURN_IF_ERROR(training.Get("require_unmetered", c.require_unmetered));
  SEEDLING_RETURN_IF_ERROR(training.Get("require_idle", c.require_idle));
  SEEDLING_RETURN_IF_ERROR(training.Get("pseudo_labels", c.pseudo_labels));
  SEEDLING_RETURN_IF_ERROR(training.Get("pseudo_label_rate", c.pseudo_label_rate));
  SEEDLING_RETURN_IF_ERROR(training.Get("pseudo_label_threshold", c.pseudo_label_threshold));
  SEEDLING_RETURN_IF_ERROR(training.Get("pseudo_label_choices", c.pseudo_label_choices));
  SEEDLING_RETURN_IF_ERROR(training.CheckNoUnknownKeys());
  if (!codec_given && c.method == "kseed") codec = "seed-scalars";
  SEEDLING_ASSIGN_OR_RETURN(c.codec.codec, comms::ParseCodecName(codec));

  TomlSection lora(table("lora"), "lora");
  SEEDLING_RETURN_IF_ERROR(lora.Get("rank", c.lora_rank));
  SEEDLING_RETURN_IF_ERROR(lora.Get("alpha", c.lora_alpha));
  SEEDLING_RETURN_IF_ERROR(lora.Get("targets", c.lora_targets));
  SEEDLING_RETURN_IF_ERROR(lora.Get("init_seed", c.lora_init_seed));
  SEEDLING_RETURN_IF_ERROR(lora.Get("layers", c.lora_layers));
  SEEDLING_RETURN_IF_ERROR(lora.Get("kind", c.lora_kind));
  SEEDLING_RETURN_IF_ERROR(lora.CheckNoUnknownKeys());

  TomlSection strategy(table("strategy"), "strategy");
  StrategyOptions& s = c.strategy;
  s.name = c.method == "kseed" ? "kseed" : c.method == "fwdgrad" ? "fwdgrad" : "fedavg";
  SEEDLING_RETURN_IF_ERROR(strategy.Get("name", s.name));
  // Adaptive server optimizers normalize the step, so η = 1 would move every coordinate by about 1.
  if (s.name == "fedadam" || s.name == "fedyogi" || s.name == "fedadagrad") s.server_lr = 1e-2;
  SEEDLING_RETURN_IF_ERROR(strategy.Get("server_lr", s.server_lr));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("momentum", s.momentum));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("beta1", s.beta1));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("beta2", s.beta2));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("tau", s.tau));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("fwdgrad_lr", s.fwdgrad_lr));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("warmup_fraction", s.warmup_fraction));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("kseed_lr", s.kseed_lr));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("kseed_pool_size", s.kseed_pool_size));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("kseed_pool_seed", s.kseed_pool_seed));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("robust", c.robust.rule));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("robust_norm_bound", c.robust.norm_bound));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("robust_trim_fraction", c.robust.trim_fraction));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("robust_krum_f", c.robust.krum_f));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("robust_krum_m", c.robust.krum_m));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("mode", c.mode));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("buffer_size", c.fedbuff.buffer_size));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("concurrency", c.fedbuff.concurrency));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("max_staleness", c.fedbuff.max_staleness));
  SEEDLING_RETURN_IF_ERROR(strategy.Get("staleness_exponent", s.staleness_exponent));
  SEEDLING_RETURN_IF_ERROR(strategy.CheckNoUnknownKeys());
  s.total_rounds = c.rounds > 0 ? c.rounds : 100;
  s.fwdgrad_pacing.base_perturbations = c.perturbations;
  s.max_update_norm = c.max_update_norm;

  TomlSection privacy(table("privacy"), "privacy");
  SEEDLING_RETURN_IF_ERROR(privacy.Get("dp", c.privacy.dp));
  SEEDLING_RETURN_IF_ERROR(privacy.Get("clip_norm", c.privacy.clip_norm));
  SEEDLING_RETURN_IF_ERROR(privacy.Get("noise_multiplier", c.privacy.noise_multiplier));
  SEEDLING_RETURN_IF_ERROR(privacy.Get("target_epsilon", c.privacy.target_epsilon));
  SEEDLING_RETURN_IF_ERROR(privacy.Get("delta", c.privacy.delta));
  SEEDLING_RETURN_IF_ERROR(privacy.Get("expected_clients", c.privacy.expected_clients));
  SEEDLING_RETURN_IF_ERROR(privacy.Get("noise", c.privacy.noise));
  SEEDLING_RETURN_IF_ERROR(privacy.Get("mechanism", c.privacy.mechanism));
  SEEDLING_RETURN_IF_ERROR(privacy.Get("tree_restart_rounds", c.privacy.tree_restart_rounds));
  SEEDLING_RETURN_IF_ERROR(privacy.Get("max_participations_per_tree", c.privacy.max_participations_per_tree));
  SEEDLING_RETURN_IF_ERROR(privacy.CheckNoUnknownKeys());

  TomlSection secagg(table("secagg"), "secagg");
  SEEDLING_RETURN_IF_ERROR(secagg.Get("enabled", c.secagg.enabled));
  SEEDLING_RETURN_IF_ERROR(secagg.Get("neighbors", c.secagg.neighbors));
  SEEDLING_RETURN_IF_ERROR(secagg.Get("neighbors_fraction", c.secagg.neighbors_fraction));
  SEEDLING_RETURN_IF_ERROR(secagg.Get("threshold", c.secagg.threshold));
  SEEDLING_RETURN_IF_ERROR(secagg.Get("max_dropout_fraction", c.secagg.max_dropout_fraction));
  SEEDLING_RETURN_IF_ERROR(secagg.Get("quantization_levels", c.secagg.quantization_levels));
  SEEDLING_RETURN_IF_ERROR(secagg.Get("clipping_range", c.secagg.clipping_range));
  SEEDLING_RETURN_IF_ERROR(secagg.Get("max_weight", c.secagg.max_weight));
  SEEDLING_RETURN_IF_ERROR(secagg.Get("stage_timeout_ms", c.secagg.stage_timeout_ms));
  SEEDLING_RETURN_IF_ERROR(secagg.Get("poll_ms", c.secagg.poll_ms));
  SEEDLING_RETURN_IF_ERROR(secagg.CheckNoUnknownKeys());

  TomlSection retry(table("retry"), "retry");
  SEEDLING_RETURN_IF_ERROR(retry.Get("base_seconds", c.retry_base_s));
  SEEDLING_RETURN_IF_ERROR(retry.Get("jitter", c.retry_jitter));
  SEEDLING_RETURN_IF_ERROR(retry.CheckNoUnknownKeys());

  SEEDLING_RETURN_IF_ERROR(c.Validate());
  return c;
}

absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path) {
  SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  auto config = ParseServerConfig(text);
  if (!config.ok()) return Annotate(config.status(), path);
  // Relative paths are relative to the config file.
  const std::filesystem::path base = std::filesystem::path(path).parent_path();
  auto resolve = [&](std::string& p) {
    if (!p.empty() && std::filesystem::path(p).is_relative()) p = (base / p).lexically_normal().string();
  };
  resolve(config->state_dir);
  resolve(config->cert_file);
  resolve(config->key_file);
  resolve(config->client_ca_file);
  resolve(config->model_dir);
  return config;
}

absl::StatusOr<privacy::SecAggParams> SecAggParamsFor(const SecAggConfig& config, uint32_t cohort,
                                                      uint32_t vector_length) {
  privacy::SecAggParams p;
  p.num_clients = cohort;
  const uint32_t complete = cohort > 0 ? cohort - 1 : 0;
  if (config.neighbors > 0) {
    p.num_neighbors = std::min<uint32_t>(static_cast<uint32_t>(config.neighbors), complete);
  } else if (config.neighbors_fraction > 0) {
    uint32_t k = static_cast<uint32_t>(std::ceil(config.neighbors_fraction * static_cast<double>(complete) - 1e-9));
    k += k % 2;  // the ring construction needs an even degree below n − 1
    p.num_neighbors = std::min(k, complete);
  } else {
    p.num_neighbors = complete;
  }
  p.threshold = config.threshold > 0 ? static_cast<uint32_t>(config.threshold) : p.num_neighbors / 2 + 1;
  p.max_dropout_fraction = config.max_dropout_fraction;
  p.vector_length = vector_length;
  p.quantization_levels = static_cast<uint32_t>(config.quantization_levels);
  p.max_weight = static_cast<uint32_t>(config.max_weight);
  p.clipping_range = static_cast<float>(config.clipping_range);
  if (absl::Status st = privacy::ValidateParams(p); !st.ok()) {
    return absl::InvalidArgumentError(StrCat("secure aggregation with a cohort of ", cohort, " (k = ", p.num_neighbors,
                                             ", t = ", p.threshold, "): ", st.message()));
  }
  return p;
}

}  // namespace seedling::server
