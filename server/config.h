#pragma once

// The coordinator's configuration: `seedling serve --config server.toml`. Every field has a default (the
// table in docs/operations.md lists them all); unknown keys are errors, so a typo never silently falls back to a
// default.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "comms/codec.h"
#include "lora/lora_config.h"
#include "model/weight_format.h"
#include "privacy/secagg.h"
#include "server/robust_options.h"
#include "server/strategy.h"

namespace seedling::server {

// [privacy]: client-level DP-FedAvg (server/dp_strategy.h) and its RDP accountant (privacy/accountant.h).
struct PrivacyConfig {
  bool dp = false;               // wrap the strategy in DpStrategy, account and enforce the budget
  double clip_norm = 0;          // C: L2 bound of each client's update (also sent to clients); > 0 with dp
  double noise_multiplier = 0;   // z: noise std on the sum = z·C; > 0 with dp (`seedling privacy noise-for`)
  double target_epsilon = 0;     // budget: no round opens whose ε after it would exceed this; > 0 with dp
  double delta = 1e-5;           // δ of the (ε, δ) guarantee, in (0, 1)
  int64_t expected_clients = 0;  // m, the fixed denominator of the estimator; 0 = clients_per_round
  std::string noise = "csprng";  // "csprng" (deployment) or "seeded" (simulator only, reproducible)
  // "gaussian": fresh noise per round, RDP accountant assuming Poisson sampling (DP-FedAvg); "dp-ftrl": tree
  // aggregation (server/dp_strategy.h), zCDP without any sampling assumption (docs/methods.md, "DP-FTRL").
  std::string mechanism = "gaussian";
  int64_t tree_restart_rounds = 0;          // dp-ftrl: R, rounds per tree, in [1, 2^32]; required with dp-ftrl
  int64_t max_participations_per_tree = 1;  // dp-ftrl: k, a device's rounds per tree (selection enforces it), >= 1

  bool dp_ftrl() const { return dp && mechanism == "dp-ftrl"; }

  int64_t EffectiveExpectedClients(int64_t clients_per_round) const {
    return expected_clients > 0 ? expected_clients : clients_per_round;
  }
};

// [secagg]: SecAgg+ secure aggregation (privacy/secagg.h, server/secagg_strategy.h). The cohort is the set of
// devices holding a task when selection closes; n below is its size (at most SelectionQuota()).
struct SecAggConfig {
  bool enabled = false;           // run rounds as SecAgg+ sessions; plaintext uploads are refused
  int64_t neighbors = 0;          // k, the neighbour graph's degree; 0 = from neighbors_fraction
  double neighbors_fraction = 0;  // k = ⌈fraction·(n − 1)⌉ (even); 0 with neighbors 0 = n − 1 (complete graph)
  int64_t threshold = 0;          // t, Shamir threshold; 0 = ⌊k/2⌋ + 1
  double max_dropout_fraction = 0.1;  // δ: up to ⌊δ·n⌋ devices may drop over the session; more aborts the round
  int64_t quantization_levels = 1 << 20;  // Q: entries map to integers in [0, Q − 1]; n·W·(Q − 1) < 2^32
  double clipping_range = 0.5;            // c: each entry of a delta is clipped to [−c, c] before quantization
  int64_t max_weight = 1;                 // W: a device's weight is min(its examples, W); 1 = unweighted mean
  int64_t stage_timeout_ms = 30000;       // deadline of the setup/advertise, share and unmask stages (the masked
                                          // input stage ends at the round's deadline: it includes training)
  int64_t poll_ms = 200;                  // retry hint for devices waiting for a stage to close
};

// [strategy] mode = "fedbuff": buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022; docs/architecture.md,
// "Buffered asynchronous rounds"). Devices get a task whenever fewer than `concurrency` are out; each task trains
// from the version current when it was issued; an accepted update joins the open buffer weighted by
// StalenessWeight(τ), τ = flushes since its version; the K-th accepted update flushes the buffer: one server
// update, committed as one round, version + 1.
struct FedBuffConfig {
  int64_t buffer_size = 10;   // K: accepted updates per server update (per committed round), >= 1
  int64_t concurrency = 100;  // C: tasks out at once (issued, neither uploaded, declined nor expired), >= K
  int64_t max_staleness = 0;  // refuse uploads trained from a version more than this many flushes old; 0 = none
};

// The default cap on an upload's L2 norm ([training] max_update_norm). Honest updates measured on the
// tiny model: LoRA deltas 0.15-0.2, MeZO deltas 0.05, forward gradients 200-230 (a gradient, not a
// step, and it grows with the square root of the adapter's size). 1e5 leaves them all room while
// refusing broken or hostile uploads (3e38 per element) long before a sum of them can overflow float.
inline constexpr double kDefaultMaxUpdateNorm = 1e5;

struct ServerConfig {
  // [server]
  std::string state_dir = "seedling-state";  // SQLite database and checkpoints
  std::string bind = "127.0.0.1";
  uint16_t port = 8443;  // TLS port for devices
  std::string cert_file = "certs/server.crt";
  std::string key_file = "certs/server.key";
  std::string client_ca_file;  // non-empty: mutual TLS, devices need a client certificate
  int io_threads = 2;
  int max_connections = 4096;
  int64_t handshake_timeout_ms = 10000;
  int64_t read_timeout_ms = 30000;
  int64_t idle_timeout_ms = 60000;
  int64_t write_timeout_ms = 30000;
  std::string http_bind = "127.0.0.1";  // metrics, health and dashboard (plain HTTP)
  uint16_t http_port = 9090;            // 0: no HTTP server
  int64_t tick_ms = 500;                // how often the round state machine advances

  // [model]
  std::string model_dir;  // base model: directory or GGUF file (its config gives the adapter's shapes)
  model::WeightPrecision weights =
      model::WeightPrecision::kFloat32;  // how devices hold the frozen base
                                         // weights (tasks carry it; a device's config may override it)

  // [training]
  std::string method = "lora-bp";   // lora-bp, fwdgrad, mezo, kseed
  int64_t rounds = 0;               // rounds to run; 0 = until stopped
  int64_t clients_per_round = 10;   // reports wanted per round (the target)
  double over_selection = 1.3;      // tasks handed out = ceil(target × this)
  int64_t min_reports = 0;          // fewer at the deadline: the round aborts; 0 = ceil(target / 2)
  int64_t selection_window_s = 60;  // a round waits this long for check-ins before it collects
  int64_t round_deadline_s = 600;   // from the round's opening; later uploads are Stale
  uint64_t seed = 0;                // rounds' seeds derive from it
  int64_t steps = 20;               // local steps per task
  int64_t batch = 1;
  int64_t seq_len = 256;
  double lr = 0;              // client lr; 0 = the method's default (client/local_training.h)
  double epsilon = 0;         // mezo / kseed / central differences; 0 = default
  int64_t perturbations = 8;  // fwdgrad K (with strategy.fwdgrad_pacing: K after an applied round)
  // fwdgrad_pacing (false), fwdgrad_variance_threshold (required with pacing) and max_perturbations (64) are
  // read into strategy.fwdgrad_pacing (server/fwdgrad_pacing.h).
  comms::CodecOptions codec = {.codec = v1::CODEC_FP16};  // fp16 (half fp32's bytes), block_size = 64,
                                                          // topk_fraction = 0.01 (kseed: seed-scalars)
  double clip_norm = 0;  // sent to clients; 0 = none ([privacy] clip_norm replaces it with dp)
  double max_update_norm = kDefaultMaxUpdateNorm;  // reject updates with a larger L2 norm; 0 = no cap
  uint64_t max_update_bytes = 64ull << 20;         // encoded update cap
  int64_t max_inflight_uploads = 256;              // uploads being received at once
  bool require_charging = false;                   // eligibility
  bool require_unmetered = false;
  bool require_idle = false;
  // Pseudo-labelling (FeS; client/pseudo_label.h): devices label their unlabelled rows ("output": null) with
  // the global model by multiple choice over pseudo_label_choices and train on the confident ones too.
  bool pseudo_labels = false;
  double pseudo_label_rate = 0.1;       // curriculum: share of unlabelled rows at round t, min(1, rate·t), (0, 1]
  double pseudo_label_threshold = 0.5;  // keep a row when its label's softmax confidence is above this, [0, 1)
  // The candidate labels (2 to 64 distinct non-empty strings). Empty: devices label nothing; the simulator
  // fills them with its data's label set.
  std::vector<std::string> pseudo_label_choices;

  // [lora]
  int64_t lora_rank = 8;
  double lora_alpha = 16;
  std::vector<std::string> lora_targets = {"q_proj", "v_proj"};
  uint64_t lora_init_seed = 0;
  // Decoder layers the adapter covers (lora/lora_config.h ParseLayerSelection): "all", "top:N" (FeS's
  // top-layers option) or indices "0,5,11"; resolved against the model when the server starts.
  std::string lora_layers = "all";
  // "lora" or "bitfit" (lora/lora_config.h AdapterKind): BitFit trains one bias per targeted projection.
  std::string lora_kind = "lora";

  // [strategy] (name default: fedavg; kseed for method kseed, fwdgrad for method fwdgrad)
  StrategyOptions strategy;
  RobustOptions robust;       // [strategy] robust, robust_norm_bound, ... (server/robust_strategy.h)
  std::string mode = "sync";  // [strategy] mode: "sync" (rounds with a cohort and a deadline) or "fedbuff"
  FedBuffConfig fedbuff;      // [strategy] buffer_size, concurrency, max_staleness (mode = "fedbuff")

  // [privacy]
  PrivacyConfig privacy;

  // [secagg]
  SecAggConfig secagg;

  // [retry]
  int64_t retry_base_s = 30;  // RetryAfter for devices not selected
  double retry_jitter = 0.5;  // ± fraction of uniform jitter

  int64_t EffectiveMinReports() const;
  int64_t SelectionQuota() const;    // ceil(target × over_selection)
  double EffectiveClipNorm() const;  // privacy.clip_norm with DP on, else clip_norm (what tasks carry)
  // The pseudo-label curriculum: the share of a device's unlabelled rows it may label in round `round`
  // (1-based), min(1, pseudo_label_rate × round); 0 with pseudo_labels off or round 0.
  double PseudoLabelShare(uint64_t round) const;
  bool FedBuff() const { return mode == "fedbuff"; }
  absl::Status Validate() const;
};

// Parses TOML text. InvalidArgument naming the key for unknown keys, wrong types or invalid values.
absl::StatusOr<ServerConfig> ParseServerConfig(std::string_view toml_text);

// The adapter `config`'s [lora] section describes on `model` (its layer selection resolved against the
// model's layers). InvalidArgument names a bad target or a selection the model cannot meet.
absl::StatusOr<lora::LoraConfig> ServerLoraConfig(const ServerConfig& config, const model::ModelConfig& model);
// The same, starting from `defaults` instead of ServerConfig{} (the simulator's round defaults).
absl::StatusOr<ServerConfig> ParseServerConfig(std::string_view toml_text, const ServerConfig& defaults);
absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path);

// The SecAgg+ parameters of a round whose cohort has `cohort` devices and whose masked vectors have
// `vector_length` entries (adapter entries + 1), from [secagg]:
//   k = neighbors if set (n − 1 when the cohort is smaller), else ⌈neighbors_fraction·(n − 1)⌉ rounded up to
//       even (n − 1 when that reaches it), else n − 1 (the complete graph: SecAgg);
//   t = threshold if set, else ⌊k/2⌋ + 1 (the smallest secure threshold: tolerates the most dropouts).
// InvalidArgument (privacy::ValidateParams' message, prefixed with the cohort) if the result is refused.
absl::StatusOr<privacy::SecAggParams> SecAggParamsFor(const SecAggConfig& config, uint32_t cohort,
                                                      uint32_t vector_length);

}  // namespace seedling::server
