// sim.toml: the [simulation] and [methods.*] tables here; round settings through server::ParseServerConfig.
// No LibTorch: scripts/fuzz.sh fuzzes this parser with clang.

#include <set>
#include <sstream>

#include <toml++/toml.h>

#include "base/status.h"
#include "base/strings.h"
#include "base/toml.h"
#include "base/memory.h"
#include "optim/method.h"
#include "simulator/simulation.h"

namespace seedling::simulator {
namespace {

absl::Status KeyError(const std::string& table, const std::string& key, const std::string& what) {
  return absl::InvalidArgumentError(StrCat("[", table, "] ", key, ": ", what));
}

// Reads `key` of `table` into `out` when present; InvalidArgument naming the key for a wrong type.
template <typename T>
absl::Status Get(const toml::table& table, const std::string& name, const char* key, T& out) {
  const toml::node* node = table.get(key);
  if (node == nullptr) return absl::OkStatus();
  if constexpr (std::is_same_v<T, std::string>) {
    if (!node->is_string()) return KeyError(name, key, "expected a string");
    out = node->as_string()->get();
  } else if constexpr (std::is_same_v<T, bool>) {
    if (!node->is_boolean()) return KeyError(name, key, "expected true or false");
    out = node->as_boolean()->get();
  } else if constexpr (std::is_floating_point_v<T>) {
    if (node->is_integer()) {
      out = static_cast<T>(node->as_integer()->get());
    } else if (node->is_floating_point()) {
      out = static_cast<T>(node->as_floating_point()->get());
    } else {
      return KeyError(name, key, "expected a number");
    }
  } else {
    absl::StatusOr<T> v = TomlInteger<T>(*node);
    if (!v.ok()) return KeyError(name, key, std::string(FromAbsl(v.status().message())));
    out = *v;
  }
  return absl::OkStatus();
}

absl::Status CheckKeys(const toml::table& table, const std::string& name, const std::set<std::string>& known) {
  for (const auto& [key, value] : table) {
    if (!known.count(std::string(key.str()))) {
      return absl::InvalidArgumentError(StrCat("[", name, "]: unknown key '", std::string(key.str()), "'"));
    }
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
    SEEDLING_RETURN_IF_ERROR(CheckKeys(*sim, n, {"model", "out", "work_dir", "methods", "seed", "threads", "devices",
                                                "heldout_devices", "eval_examples", "phone_classes", "data",
                                                "partition", "alpha", "exponent", "rows_per_device", "dropout_mean",
                                                "variation", "start_time", "tick_s", "max_hours", "plan_seconds",
                                                "radio_watts", "loopback", "mpi_placement", "device_runtime"}));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "model", o.model_dir));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "out", o.out_dir));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "work_dir", o.work_dir));
    if (const toml::node* m = sim->get("methods"); m != nullptr) {
      const toml::array* arr = m->as_array();
      if (arr == nullptr) return KeyError(n, "methods", "expected an array of strings");
      o.methods.clear();
      for (const toml::node& e : *arr) {
        if (!e.is_string()) return KeyError(n, "methods", "expected an array of strings");
        o.methods.push_back(e.as_string()->get());
      }
    }
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "seed", o.seed));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "threads", o.threads));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "devices", o.population.devices));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "heldout_devices", o.heldout_devices));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "eval_examples", o.eval_examples));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "phone_classes", o.phone_classes));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "data", o.data_path));
    std::string partition;
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "partition", partition));
    if (!partition.empty()) {
      absl::StatusOr<PartitionKind> kind = ParsePartitionKind(partition);
      if (!kind.ok()) return KeyError(n, "partition", std::string(kind.status().message()));
      o.partition.kind = *kind;
    }
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "alpha", o.partition.alpha));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "exponent", o.partition.exponent));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "rows_per_device", o.corpus.rows_per_device));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "dropout_mean", o.population.dropout_mean));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "variation", o.population.variation));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "start_time", o.start_time_s));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "tick_s", o.tick_s));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "max_hours", o.max_hours));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "plan_seconds", o.plan_seconds));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "radio_watts", o.radio_watts));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "loopback", o.loopback));
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "mpi_placement", o.mpi_placement));
    std::string runtime = "auto";
    SEEDLING_RETURN_IF_ERROR(Get(*sim, n, "device_runtime", runtime));
    if (runtime != "auto") {
      absl::StatusOr<int64_t> bytes = ParseByteSize(runtime);
      if (!bytes.ok()) return KeyError(n, "device_runtime", StrCat("expected \"auto\" or a size such as \"180M\": ",
                                                                  bytes.status().message()));
      o.device_runtime_bytes = *bytes;
    }
  }
  if (const toml::node* methods_node = root.get("methods"); methods_node != nullptr) {
    const toml::table* methods = methods_node->as_table();
    if (methods == nullptr) return absl::InvalidArgumentError("[methods] must hold [methods.<name>] tables");
    for (const auto& [key, value] : *methods) {
      const std::string name(key.str());
      const toml::table* t = value.as_table();
      const std::string tn = StrCat("methods.", name);
      if (t == nullptr) return absl::InvalidArgumentError(StrCat("[", tn, "] must be a table"));
      SEEDLING_RETURN_IF_ERROR(CheckKeys(*t, tn, {"codec", "lr", "epsilon"}));
      MethodSettings& ms = o.method_settings[name];
      SEEDLING_RETURN_IF_ERROR(Get(*t, tn, "codec", ms.codec));
      SEEDLING_RETURN_IF_ERROR(Get(*t, tn, "lr", ms.lr));
      SEEDLING_RETURN_IF_ERROR(Get(*t, tn, "epsilon", ms.epsilon));
    }
  }
  // [model]: weights is server.toml's key (the rounds carry it); weight_cache_dir is the simulator's own.
  if (toml::table* model = root.get_as<toml::table>("model"); model != nullptr) {
    SEEDLING_RETURN_IF_ERROR(Get(*model, "model", "weight_cache_dir", o.weight_cache_dir));
    model->erase("weight_cache_dir");
  }
  // The round settings: everything else, in server.toml's sections.
  root.erase("simulation");
  root.erase("methods");
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
  for (const std::string& m : methods) SEEDLING_RETURN_IF_ERROR(optim::ParseMethod(m).status());
  if (server.rounds < 1) return absl::InvalidArgumentError("rounds must be at least 1");
  if (heldout_devices < 1) return absl::InvalidArgumentError("heldout_devices must be at least 1");
  if (eval_examples < 1) return absl::InvalidArgumentError("eval_examples must be at least 1");
  if (!(tick_s > 0)) return absl::InvalidArgumentError("tick_s must be positive");
  if (!(max_hours > 0)) return absl::InvalidArgumentError("max_hours must be positive");
  if (threads < 0) return absl::InvalidArgumentError("threads must be >= 0");
  if (server.secagg.enabled) {
    for (const std::string& m : methods) {
      if (m != "lora-bp" && m != "mezo") {
        return absl::InvalidArgumentError(StrCat("[secagg] enabled: method ", m, " does not upload a dense delta; "
                                                 "secure aggregation runs with lora-bp and mezo"));
      }
    }
  }
  if (mpi_placement != "auto" && mpi_placement != "static") {
    return absl::InvalidArgumentError(StrCat("mpi_placement must be auto or static, got '", mpi_placement, "'"));
  }
  if (!(plan_seconds >= 0) || !(radio_watts >= 0)) {
    return absl::InvalidArgumentError("plan_seconds and radio_watts must be >= 0");
  }
  return absl::OkStatus();
}

}  // namespace seedling::simulator
