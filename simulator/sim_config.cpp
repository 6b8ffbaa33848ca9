// sim.toml: the [simulation] and [methods.*] tables here; round settings through server::ParseServerConfig.
// No LibTorch: scripts/fuzz.sh fuzzes this parser with clang.

#include <toml++/toml.h>

#include <set>
#include <sstream>

#include "base/memory.h"
#include "base/status.h"
#include "base/strings.h"
#include "base/toml.h"
#include "comms/codec.h"
#include "optim/method.h"
#include "simulator/simulation.h"

namespace seedling::simulator {

namespace {

std::string DefaultCodec(const std::string& method) {
  if (method == "kseed") return "seed-scalars";
  if (method == "fwdgrad") return "fp16";
  return "int8";
}

// kseed and fwdgrad have their own strategies; lora-bp and mezo keep a fedavg-family [strategy] name.
std::string StrategyFor(const std::string& method, const std::string& configured) {
  if (method == "kseed" || method == "fwdgrad") return method;
  return configured == "kseed" || configured == "fwdgrad" ? std::string("fedavg") : configured;
}

// An [attack] table (top level or a run's) into `attack`, which keeps its defaults for missing keys.
absl::Status ParseAttack(const toml::table& t, const std::string& name, AttackOptions& attack) {
  TomlSection section(&t, name);
  SEEDLING_RETURN_IF_ERROR(section.Get("fraction", attack.fraction));
  SEEDLING_RETURN_IF_ERROR(section.Get("kind", attack.kind));
  SEEDLING_RETURN_IF_ERROR(section.Get("scale", attack.scale));
  SEEDLING_RETURN_IF_ERROR(section.CheckNoUnknownKeys());
  if (absl::Status st = attack.Validate(); !st.ok()) {
    // Name the table the value came from.
    return absl::InvalidArgumentError(StrCat("[", name, "]", FromAbsl(st.message()).substr(8)));
  }
  return absl::OkStatus();
}

// A [methods.<label>] table: its own keys into `ms`, its sub-tables (server.toml sections) into
// ms.server_overrides as TOML text.
absl::Status ParseRunTable(const toml::table& t, const std::string& label, MethodSettings& ms) {
  const std::string tn = StrCat("methods.", label);
  TomlSection section(&t, tn);
  SEEDLING_RETURN_IF_ERROR(section.Get("method", ms.method));
  SEEDLING_RETURN_IF_ERROR(section.Get("codec", ms.codec));
  SEEDLING_RETURN_IF_ERROR(section.Get("lr", ms.lr));
  SEEDLING_RETURN_IF_ERROR(section.Get("epsilon", ms.epsilon));
  toml::table overrides;
  for (const auto& [key, value] : t) {
    if (!value.is_table()) continue;
    const std::string k(key.str());
    section.MarkKnown(k);
    if (k == "attack") {  // the simulator's own, not a server.toml section
      AttackOptions attack;
      SEEDLING_RETURN_IF_ERROR(ParseAttack(*value.as_table(), StrCat(tn, ".attack"), attack));
      ms.attack = attack;
      continue;
    }
    if (k == "training" && value.as_table()->contains("method")) {
      return absl::InvalidArgumentError(
          StrCat("[", tn, ".training] method: set the run's method with [", tn, "] method"));
    }
    // The runs share one loaded base model (its weights and the longest sequence it serves).
    if (k == "model" || (k == "training" && value.as_table()->contains("seq_len"))) {
      return absl::InvalidArgumentError(StrCat("[", tn, ".", k, "] ", k == "model" ? "weights" : "seq_len",
                                               ": the runs of a simulation share one base model; set it at the top"));
    }
    overrides.insert(k, *value.as_table());
  }
  SEEDLING_RETURN_IF_ERROR(section.CheckNoUnknownKeys());
  if (!overrides.empty()) {
    std::ostringstream text;
    text << overrides;
    ms.server_overrides = text.str();
  }
  return absl::OkStatus();
}

}  // namespace

server::ServerConfig DefaultSimulationServerConfig() {
  server::ServerConfig c;
  c.rounds = 20;
  c.clients_per_round = 10;
  c.steps = 10;
  c.seq_len = 64;
  c.selection_window_s = 60;
  c.round_deadline_s = 600;
  c.retry_base_s = 300;
  c.retry_jitter = 0.5;
  c.codec.codec = v1::CODEC_INT8;
  // With [privacy] dp = true, the noise comes from a seeded stream so that runs repeat (simulation only:
  // a deployment draws it from the CSPRNG). `noise = "csprng"` in sim.toml opts out.
  c.privacy.noise = "seeded";
  return c;
}

absl::StatusOr<SimulationOptions> ParseSimulationConfig(std::string_view toml_text) {
  SEEDLING_ASSIGN_OR_RETURN(toml::table root, ParseToml(toml_text));
  SimulationOptions o;
  const toml::node* sim_methods = root["simulation"]["methods"].node();
  if (const toml::node* sim_node = root.get("simulation"); sim_node != nullptr) {
    const toml::table* sim = sim_node->as_table();
    if (sim == nullptr) return absl::InvalidArgumentError("[simulation] must be a table");
    const std::string n = "simulation";
    TomlSection section(sim, n);
    SEEDLING_RETURN_IF_ERROR(section.Get("model", o.model_dir));
    SEEDLING_RETURN_IF_ERROR(section.Get("out", o.out_dir));
    SEEDLING_RETURN_IF_ERROR(section.Get("work_dir", o.work_dir));
    SEEDLING_RETURN_IF_ERROR(section.Get("methods", o.methods));
    SEEDLING_RETURN_IF_ERROR(section.Get("seed", o.seed));
    SEEDLING_RETURN_IF_ERROR(section.Get("threads", o.threads));
    SEEDLING_RETURN_IF_ERROR(section.Get("devices", o.population.devices));
    SEEDLING_RETURN_IF_ERROR(section.Get("heldout_devices", o.heldout_devices));
    SEEDLING_RETURN_IF_ERROR(section.Get("eval_examples", o.eval_examples));
    SEEDLING_RETURN_IF_ERROR(section.Get("labelled_fraction", o.labelled_fraction));
    SEEDLING_RETURN_IF_ERROR(section.Get("phone_classes", o.phone_classes));
    SEEDLING_RETURN_IF_ERROR(section.Get("data", o.data_path));
    std::string partition;
    SEEDLING_RETURN_IF_ERROR(section.Get("partition", partition));
    if (!partition.empty()) {
      absl::StatusOr<PartitionKind> kind = ParsePartitionKind(partition);
      if (!kind.ok()) return section.Error("partition", FromAbsl(kind.status().message()));
      o.partition.kind = *kind;
    }
    SEEDLING_RETURN_IF_ERROR(section.Get("alpha", o.partition.alpha));
    SEEDLING_RETURN_IF_ERROR(section.Get("exponent", o.partition.exponent));
    SEEDLING_RETURN_IF_ERROR(section.Get("rows_per_device", o.corpus.rows_per_device));
    SEEDLING_RETURN_IF_ERROR(section.Get("dropout_mean", o.population.dropout_mean));
    SEEDLING_RETURN_IF_ERROR(section.Get("variation", o.population.variation));
    SEEDLING_RETURN_IF_ERROR(section.Get("start_time", o.start_time_s));
    SEEDLING_RETURN_IF_ERROR(section.Get("tick_s", o.tick_s));
    SEEDLING_RETURN_IF_ERROR(section.Get("max_hours", o.max_hours));
    SEEDLING_RETURN_IF_ERROR(section.Get("plan_seconds", o.plan_seconds));
    SEEDLING_RETURN_IF_ERROR(section.Get("radio_watts", o.radio_watts));
    SEEDLING_RETURN_IF_ERROR(section.Get("target_loss", o.target_loss));
    SEEDLING_RETURN_IF_ERROR(section.Get("loopback", o.loopback));
    SEEDLING_RETURN_IF_ERROR(section.Get("mpi_placement", o.mpi_placement));
    std::string runtime = "auto";
    SEEDLING_RETURN_IF_ERROR(section.Get("device_runtime", runtime));
    if (runtime != "auto") {
      absl::StatusOr<int64_t> bytes = ParseByteSize(runtime);
      if (!bytes.ok())
        return section.Error("device_runtime",
                             StrCat("expected \"auto\" or a size such as \"180M\": ", bytes.status().message()));
      o.device_runtime_bytes = *bytes;
    }
    SEEDLING_RETURN_IF_ERROR(section.CheckNoUnknownKeys());
  }
  if (const toml::node* methods_node = root.get("methods"); methods_node != nullptr) {
    const toml::table* methods = methods_node->as_table();
    if (methods == nullptr) return absl::InvalidArgumentError("[methods] must hold [methods.<name>] tables");
    for (const auto& [key, value] : *methods) {
      const std::string name(key.str());
      const toml::table* t = value.as_table();
      const std::string tn = StrCat("methods.", name);
      if (t == nullptr) return absl::InvalidArgumentError(StrCat("[", tn, "] must be a table"));
      SEEDLING_RETURN_IF_ERROR(ParseRunTable(*t, name, o.method_settings[name]));
    }
  }
  if (const toml::node* attack = root.get("attack"); attack != nullptr) {
    if (!attack->is_table()) return absl::InvalidArgumentError("[attack] must be a table");
    SEEDLING_RETURN_IF_ERROR(ParseAttack(*attack->as_table(), "attack", o.attack));
  }
  // [model]: weights is server.toml's key (the rounds carry it); weight_cache_dir is the simulator's own.
  if (toml::table* model = root.get_as<toml::table>("model"); model != nullptr) {
    // The other [model] keys are server.toml's: only this one is read (and checked) here.
    SEEDLING_RETURN_IF_ERROR(TomlSection(model, "model").Get("weight_cache_dir", o.weight_cache_dir));
    model->erase("weight_cache_dir");
  }
  // The round settings: everything else, in server.toml's sections.
  root.erase("simulation");
  root.erase("methods");
  root.erase("attack");
  std::ostringstream rest;
  rest << root;
  server::ServerConfig defaults = DefaultSimulationServerConfig();
  defaults.model_dir = o.model_dir.empty() ? "." : o.model_dir;  // [simulation] model is the base model
  SEEDLING_ASSIGN_OR_RETURN(o.server, server::ParseServerConfig(rest.str(), defaults));
  o.server.model_dir = o.model_dir;
  SimulationOptions check = o;  // the model and the methods may still come from flags
  if (check.model_dir.empty()) check.model_dir = ".";
  if (sim_methods == nullptr) check.methods = {"lora-bp"};
  SEEDLING_RETURN_IF_ERROR(check.Validate());
  return o;
}

absl::Status SimulationOptions::Validate() const {
  if (model_dir.empty()) return absl::InvalidArgumentError("model_dir is required");
  if (methods.empty()) return absl::InvalidArgumentError("at least one method is required");
  std::set<std::string> labels;
  for (const std::string& label : methods) {
    if (!labels.insert(label).second) return absl::InvalidArgumentError(StrCat("run '", label, "' is listed twice"));
    if (label.empty() || label.find_first_of("/\\") != std::string::npos || label == "." || label == "..") {
      return absl::InvalidArgumentError(StrCat("run label '", label, "' is not a plain name"));
    }
    if (!optim::ParseMethod(MethodOf(label)).ok()) {
      return absl::InvalidArgumentError(
          method_settings.count(label) > 0 && !method_settings.at(label).method.empty()
              ? StrCat("[methods.", label, "] method: ", optim::ParseMethod(MethodOf(label)).status().message())
              : StrCat("run '", label, "' is not a method (lora-bp, fwdgrad, mezo, kseed, ...) and has no [methods.",
                       label, "] method"));
    }
  }
  if (server.rounds < 1) return absl::InvalidArgumentError("rounds must be at least 1");
  if (heldout_devices < 1) return absl::InvalidArgumentError("heldout_devices must be at least 1");
  if (eval_examples < 1) return absl::InvalidArgumentError("eval_examples must be at least 1");
  if (!(labelled_fraction >= 0 && labelled_fraction <= 1)) {
    return absl::InvalidArgumentError(StrCat("labelled_fraction must be in [0, 1], got ", labelled_fraction));
  }
  if (!(tick_s > 0)) return absl::InvalidArgumentError("tick_s must be positive");
  if (!(max_hours > 0)) return absl::InvalidArgumentError("max_hours must be positive");
  if (threads < 0) return absl::InvalidArgumentError("threads must be >= 0");
  // Each run's round settings, with its method (e.g. [secagg] refuses methods without a dense delta).
  for (const std::string& label : methods) SEEDLING_RETURN_IF_ERROR(RunServerConfig(label).status());
  SEEDLING_RETURN_IF_ERROR(attack.Validate());
  for (const std::string& label : methods) {
    const AttackOptions& run_attack = RunAttack(label);
    SEEDLING_RETURN_IF_ERROR(run_attack.Validate());
    if (!run_attack.enabled()) continue;
    SEEDLING_ASSIGN_OR_RETURN(const server::ServerConfig run, RunServerConfig(label));
    if (run.secagg.enabled) {
      return absl::InvalidArgumentError(StrCat("run '", label,
                                               "': [attack] rewrites plaintext uploads and cannot run with [secagg] "
                                               "enabled"));
    }
    if (run.codec.codec == v1::CODEC_TOPK) {
      return absl::InvalidArgumentError(StrCat(
          "run '", label, "': [attack] cannot rewrite top-k uploads (their error feedback stays on the device)"));
    }
  }
  if (mpi_placement != "auto" && mpi_placement != "static") {
    return absl::InvalidArgumentError(StrCat("mpi_placement must be auto or static, got '", mpi_placement, "'"));
  }
  if (!(target_loss >= 0) || !std::isfinite(target_loss)) {
    return absl::InvalidArgumentError(
        StrCat("target_loss must be finite and >= 0 (0 = the default rule), got ", target_loss));
  }
  if (!(plan_seconds >= 0) || !(radio_watts >= 0)) {
    return absl::InvalidArgumentError("plan_seconds and radio_watts must be >= 0");
  }
  return absl::OkStatus();
}

const AttackOptions& SimulationOptions::RunAttack(const std::string& label) const {
  const auto it = method_settings.find(label);
  return it != method_settings.end() && it->second.attack.has_value() ? *it->second.attack : attack;
}

double AttackOptions::EffectiveScale() const {
  if (scale > 0) return scale;
  if (kind == "sign-flip") return 1.0;
  if (kind == "noise") return 0.01;
  return 10.0;
}

std::string AttackOptions::Describe() const {
  if (!enabled()) return "";
  const std::string what = kind == "noise"       ? StrCat("noise std ", EffectiveScale())
                           : kind == "sign-flip" ? StrCat("sign-flip x", EffectiveScale())
                                                 : StrCat("scale x", EffectiveScale());
  return StrCat(fraction * 100, "% of devices, ", what);
}

absl::Status AttackOptions::Validate() const {
  if (!(fraction >= 0 && fraction <= 1)) {
    return absl::InvalidArgumentError(StrCat("[attack] fraction: must be in [0, 1], got ", fraction));
  }
  if (kind != "scale" && kind != "sign-flip" && kind != "noise") {
    return absl::InvalidArgumentError(
        StrCat("[attack] kind: must be \"scale\", \"sign-flip\" or \"noise\", got \"", kind, "\""));
  }
  if (!(std::isfinite(scale) && scale >= 0)) {
    return absl::InvalidArgumentError(
        StrCat("[attack] scale: must be finite and >= 0 (0 = the kind's default), got ", scale));
  }
  return absl::OkStatus();
}

std::string SimulationOptions::MethodOf(const std::string& label) const {
  const auto it = method_settings.find(label);
  return it == method_settings.end() || it->second.method.empty() ? label : it->second.method;
}

std::string SimulationOptions::DescribeRun(const std::string& label) const {
  std::string out = MethodOf(label);
  if (const AttackOptions& a = RunAttack(label); a.enabled()) out += StrCat("; attack: ", a.Describe());
  const auto it = method_settings.find(label);
  if (it == method_settings.end()) return out;
  const MethodSettings& ms = it->second;
  if (!ms.codec.empty()) out += StrCat("; codec ", ms.codec);
  if (ms.lr > 0) out += StrCat("; lr ", ms.lr);
  if (ms.epsilon > 0) out += StrCat("; epsilon ", ms.epsilon);
  if (ms.server_overrides.empty()) return out;
  absl::StatusOr<toml::table> overrides = ParseToml(ms.server_overrides);
  if (!overrides.ok()) return out;
  for (const auto& [section, table] : *overrides) {
    if (!table.is_table()) continue;
    for (const auto& [key, value] : *table.as_table()) {
      std::ostringstream v;
      value.visit([&v](const auto& node) { v << node; });
      out += StrCat("; ", section.str(), ".", key.str(), " = ", v.str());
    }
  }
  return out;
}

absl::StatusOr<server::ServerConfig> SimulationOptions::RunServerConfig(const std::string& label) const {
  const auto it = method_settings.find(label);
  const MethodSettings settings = it == method_settings.end() ? MethodSettings{} : it->second;
  const std::string method = MethodOf(label);
  server::ServerConfig c = server;
  c.model_dir = model_dir;
  c.method = method;
  c.seed = seed;
  c.strategy.name = StrategyFor(method, c.strategy.name);
  auto bad = [&](const auto& message) { return absl::InvalidArgumentError(StrCat("[methods.", label, "] ", message)); };
  absl::StatusOr<v1::Codec> codec =
      comms::ParseCodecName(settings.codec.empty() ? DefaultCodec(method) : settings.codec);
  if (!codec.ok()) return bad(StrCat("codec: ", codec.status().message()));
  c.codec.codec = *codec;
  if (settings.lr > 0) {
    c.lr = settings.lr;
    if (method == "kseed") c.strategy.kseed_lr = settings.lr;
  }
  if (settings.epsilon > 0) c.epsilon = settings.epsilon;
  if (method == "fwdgrad") c.strategy.total_rounds = c.rounds;
  if (settings.server_overrides.empty()) {
    if (absl::Status st = c.Validate(); !st.ok()) return bad(st.message());
    return c;
  }
  absl::StatusOr<server::ServerConfig> run = server::ParseServerConfig(settings.server_overrides, c);
  if (!run.ok()) return bad(run.status().message());
  if (method == "fwdgrad") run->strategy.total_rounds = run->rounds;
  return run;
}

}  // namespace seedling::simulator
