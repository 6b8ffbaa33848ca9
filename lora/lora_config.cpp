#include "lora/lora_config.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/json.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::lora {

using model::kAllProjections;
using model::ModelConfig;
using model::Projection;
using model::ProjectionFromName;
using Json = nlohmann::json;

const char* AdapterKindName(AdapterKind kind) { return kind == AdapterKind::kBias ? "bitfit" : "lora"; }

absl::StatusOr<AdapterKind> ParseAdapterKind(std::string_view name) {
  for (AdapterKind k : {AdapterKind::kLora, AdapterKind::kBias}) {
    if (name == AdapterKindName(k)) return k;
  }
  return absl::InvalidArgumentError(StrCat("adapter kind '", name, "' is not \"lora\" or \"bitfit\""));
}

double LoraConfig::scale() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

absl::Status LoraConfig::Validate(const ModelConfig& model) const {
  if (kind == AdapterKind::kLora && (rank < 1 || rank > kMaxLoraRank)) {
    return absl::InvalidArgumentError(StrCat("LoRA rank must be in [1, ", kMaxLoraRank, "], got ", rank));
  }
  if (!(alpha > 0)) return absl::InvalidArgumentError(StrCat("LoRA alpha must be > 0, got ", alpha));
  if (!(dropout >= 0 && dropout < 1)) {
    return absl::InvalidArgumentError(StrCat("LoRA dropout must be in [0, 1), got ", dropout));
  }
  if (targets.empty()) return absl::InvalidArgumentError("LoRA needs at least one target projection");
  std::set<Projection> seen(targets.begin(), targets.end());
  if (seen.size() != targets.size()) return absl::InvalidArgumentError("LoRA targets contain a duplicate");
  for (Projection p : targets) {
    if (!model::HasProjection(model, p)) {
      std::string have;
      for (Projection m : model::ModelProjections(model))
        have += StrCat(have.empty() ? "" : ", ", model::TargetModuleName(model, m));
      return absl::InvalidArgumentError(StrCat("LoRA target ", model::ProjectionName(p), " is not a projection of ",
                                               model.architecture, " (it has ", have, ")"));
    }
  }
  for (int64_t l : layers) {
    if (l < 0 || l >= model.num_hidden_layers) {
      return absl::InvalidArgumentError(
          StrCat("LoRA layer ", l, " does not exist (the model has ", model.num_hidden_layers, " layers)"));
    }
  }
  if (std::set<int64_t>(layers.begin(), layers.end()).size() != layers.size()) {
    return absl::InvalidArgumentError("LoRA layers contain a duplicate");
  }
  return absl::OkStatus();
}

std::vector<Projection> TargetsFor(const ModelConfig& model, const std::vector<Projection>& targets) {
  std::set<Projection> wanted;
  for (Projection p : targets) {
    if (const std::optional<Projection> in = model::ProjectionIn(model, p)) {
      wanted.insert(*in);
    } else if (p == Projection::kQkv) {
      wanted.insert({Projection::kQ, Projection::kK, Projection::kV});
    } else if (p == Projection::kGateUp) {
      for (Projection part : {Projection::kGate, Projection::kUp}) {
        if (model::HasProjection(model, part)) wanted.insert(part);  // a plain MLP has no gate
      }
    }
  }
  std::vector<Projection> out;
  for (Projection p : kAllProjections) {
    if (wanted.count(p)) out.push_back(p);
  }
  return out;
}

absl::StatusOr<std::vector<Projection>> ParseTargets(std::string_view list) {
  std::vector<Projection> out;
  if (list == "all" || list == "all-linear")
    return std::vector<Projection>(std::begin(kAllProjections), std::end(kAllProjections));
  for (absl::string_view part : absl::StrSplit(ToAbsl(list), ',', absl::SkipWhitespace())) {
    std::string name(part.data(), part.size());
    name.erase(0, name.find_first_not_of(' '));
    name.erase(name.find_last_not_of(' ') + 1);
    std::optional<Projection> p = model::ProjectionOfAnyModule(name);
    if (!p && name.find('_') == std::string::npos) p = ProjectionFromName(name + "_proj");  // "q" -> "q_proj"
    if (!p) {
      return absl::InvalidArgumentError(StrCat("unknown LoRA target '", name,
                                               "' (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                               "down_proj, qkv_proj, gate_up_proj, a family's own module name such "
                                               "as query_key_value, or all)"));
    }
    if (std::find(out.begin(), out.end(), *p) == out.end()) out.push_back(*p);
  }
  if (out.empty()) return absl::InvalidArgumentError("no LoRA targets given");
  return out;
}

absl::StatusOr<LayerSelection> ParseLayerSelection(std::string_view text) {
  absl::string_view trimmed = absl::StripAsciiWhitespace(ToAbsl(text));
  LayerSelection s;
  if (trimmed.empty() || trimmed == "all") return s;
  if (absl::ConsumePrefix(&trimmed, "top:")) {
    if (!absl::SimpleAtoi(trimmed, &s.top) || s.top < 1) {
      return absl::InvalidArgumentError(StrCat("layers 'top:", FromAbsl(trimmed), "': N must be an integer >= 1"));
    }
    return s;
  }
  for (absl::string_view part : absl::StrSplit(trimmed, ',')) {
    int64_t l = -1;
    if (!absl::SimpleAtoi(part, &l) || l < 0) {
      return absl::InvalidArgumentError(StrCat("layers: '", FromAbsl(part),
                                               "' is not a layer index (give \"all\", \"top:N\" or indices like "
                                               "\"0,5,11\")"));
    }
    s.list.push_back(l);
  }
  std::sort(s.list.begin(), s.list.end());
  if (std::adjacent_find(s.list.begin(), s.list.end()) != s.list.end()) {
    return absl::InvalidArgumentError(StrCat("layers '", FromAbsl(trimmed), "' names a layer twice"));
  }
  return s;
}

int64_t FirstAdaptedLayer(const LoraConfig& config) {
  return config.layers.empty() ? 0 : *std::min_element(config.layers.begin(), config.layers.end());
}

absl::StatusOr<std::vector<int64_t>> ResolveLayers(const LayerSelection& selection, int64_t num_layers) {
  if (selection.top > 0) {
    if (selection.top > num_layers) {
      return absl::InvalidArgumentError(
          StrCat("layers 'top:", selection.top, "': the model has ", num_layers, " layers"));
    }
    std::vector<int64_t> layers;
    for (int64_t l = num_layers - selection.top; l < num_layers; ++l) layers.push_back(l);
    return layers;
  }
  for (int64_t l : selection.list) {
    if (l >= num_layers) {
      return absl::InvalidArgumentError(
          StrCat("layers: layer ", l, " does not exist (the model has ", num_layers, " layers)"));
    }
  }
  return selection.list;
}

absl::StatusOr<LoraConfig> MakeLoraConfig(int64_t rank, double alpha, const std::vector<std::string>& targets,
                                          uint64_t init_seed, std::vector<int64_t> layers, AdapterKind kind) {
  LoraConfig c;
  c.kind = kind;
  c.rank = rank;
  c.alpha = alpha;
  c.init_seed = init_seed;
  c.layers = std::move(layers);
  SEEDLING_ASSIGN_OR_RETURN(c.targets, ParseTargets(absl::StrJoin(targets, ",")));
  return c;
}

namespace {

// The string value of `key`, or "" when it is missing or not a string.
std::string StringKey(const Json& j, const char* key) {
  auto it = j.find(key);
  return (it != j.end() && it->is_string()) ? it->get<std::string>() : std::string();
}

// The LoRA-only keys of a PEFT adapter_config.json into `c`: r, lora_alpha, lora_dropout, use_rslora, and the
// options not supported (DoRA, per-module patterns, trained biases).
absl::Status ParseLoraKeys(const Json& j, LoraConfig& c) {
  if (!j.contains("r") || !j["r"].is_number_integer()) return absl::InvalidArgumentError("'r' must be an integer");
  c.rank = j["r"].get<int64_t>();
  if (!j.contains("lora_alpha") || !j["lora_alpha"].is_number()) {
    return absl::InvalidArgumentError("'lora_alpha' must be a number");
  }
  c.alpha = j["lora_alpha"].get<double>();
  if (j.contains("lora_dropout") && j["lora_dropout"].is_number()) c.dropout = j["lora_dropout"].get<double>();
  if (j.contains("use_rslora") && j["use_rslora"].is_boolean()) c.use_rslora = j["use_rslora"].get<bool>();
  if (j.contains("use_dora") && j["use_dora"].is_boolean() && j["use_dora"].get<bool>()) {
    return absl::InvalidArgumentError("DoRA adapters (use_dora) are not supported");
  }
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    if (j.contains(key) && j[key].is_object() && !j[key].empty()) {
      return absl::InvalidArgumentError(StrCat("'", key, "' (per-module ranks or alphas) is not supported"));
    }
  }
  if (!StringKey(j, "bias").empty() && StringKey(j, "bias") != "none") {
    return absl::InvalidArgumentError(StrCat("bias '", StringKey(j, "bias"), "' is not supported (only \"none\")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LoraConfig> ParsePeftConfig(std::string_view json_text, const ModelConfig& model) {
  SEEDLING_ASSIGN_OR_RETURN(const Json j, ParseJson(json_text, "the adapter config"));
  if (!j.is_object()) return absl::InvalidArgumentError("the adapter config must be a JSON object");
  const std::string type = StringKey(j, "peft_type");
  if (type != "LORA" && type != "BITFIT") {
    return absl::InvalidArgumentError(
        StrCat("peft_type is '", type, "'; only LORA adapters (and Seedling's BITFIT) are supported"));
  }
  LoraConfig c;
  if (type == "BITFIT") {
    c.kind = AdapterKind::kBias;
  } else {
    SEEDLING_RETURN_IF_ERROR(ParseLoraKeys(j, c));
  }
  // fan_in_fan_out marks adapters of modules stored (in, out), GPT-2's Conv1D; A and B have the same shapes.
  if (j.contains("fan_in_fan_out") && j["fan_in_fan_out"].is_boolean() && j["fan_in_fan_out"].get<bool>() &&
      !model::StoresTransposed(model)) {
    return absl::InvalidArgumentError(
        StrCat("fan_in_fan_out is true, but ", model.architecture, "'s projections are not stored (in, out)"));
  }
  if (j.contains("modules_to_save") && !j["modules_to_save"].is_null() &&
      !(j["modules_to_save"].is_array() && j["modules_to_save"].empty())) {
    return absl::InvalidArgumentError("modules_to_save (fully trained extra modules) is not supported");
  }
  const Json& tm = j.contains("target_modules") ? j["target_modules"] : Json();
  c.targets.clear();
  if (tm.is_string()) {
    const std::string s = tm.get<std::string>();
    if (s != "all-linear") {
      return absl::InvalidArgumentError(
          StrCat("target_modules is the pattern '", s, "'; give a list of module names or \"all-linear\""));
    }
    c.targets = model::ModelProjections(model);
  } else if (tm.is_array()) {
    for (const Json& t : tm) {
      if (!t.is_string()) return absl::InvalidArgumentError("target_modules must hold strings");
      const std::vector<Projection> named = model::ProjectionsOfModule(model, t.get<std::string>());
      if (named.empty()) {
        return absl::InvalidArgumentError(
            StrCat("target module '", t.get<std::string>(), "' is not a projection of ", model.architecture));
      }
      for (Projection p : named) {
        if (std::find(c.targets.begin(), c.targets.end(), p) == c.targets.end()) c.targets.push_back(p);
      }
    }
  } else {
    return absl::InvalidArgumentError("target_modules is missing");
  }
  if (j.contains("layers_to_transform") && !j["layers_to_transform"].is_null()) {
    const Json& l = j["layers_to_transform"];
    if (l.is_number_integer()) {
      c.layers = {l.get<int64_t>()};
    } else if (l.is_array()) {
      for (const Json& x : l) {
        if (!x.is_number_integer()) return absl::InvalidArgumentError("layers_to_transform must hold integers");
        c.layers.push_back(x.get<int64_t>());
      }
    } else {
      return absl::InvalidArgumentError("layers_to_transform must be an integer or a list");
    }
  }
  SEEDLING_RETURN_IF_ERROR(c.Validate(model));
  return c;
}

std::string PeftConfigJson(const LoraConfig& c, const ModelConfig& model, const std::string& base_model) {
  Json targets = Json::array();
  for (Projection p : model::kAllProjections) {
    if (std::find(c.targets.begin(), c.targets.end(), p) != c.targets.end())
      targets.push_back(model::TargetModuleName(model, p));
  }
  const Json layers = c.layers.empty() ? Json(nullptr) : Json(c.layers);
  if (c.kind == AdapterKind::kBias) {
    // Seedling's own form: PEFT has no bias-only adapter type, so only Seedling reads this one back.
    const Json bitfit = {{"peft_type", "BITFIT"},
                         {"task_type", "CAUSAL_LM"},
                         {"target_modules", targets},
                         {"layers_to_transform", layers},
                         {"base_model_name_or_path", base_model}};
    return bitfit.dump(2) + "\n";
  }
  Json config = {{"peft_type", "LORA"},
                 {"task_type", "CAUSAL_LM"},
                 {"r", c.rank},
                 {"lora_alpha", c.alpha},
                 {"lora_dropout", c.dropout},
                 {"target_modules", targets},
                 {"bias", "none"},
                 {"fan_in_fan_out", model::StoresTransposed(model)},
                 {"use_rslora", c.use_rslora},
                 {"use_dora", false},
                 {"init_lora_weights", true},
                 {"inference_mode", true},
                 {"modules_to_save", nullptr},
                 {"rank_pattern", Json::object()},
                 {"alpha_pattern", Json::object()},
                 {"layers_to_transform", layers},
                 {"base_model_name_or_path", base_model},
                 {"revision", nullptr}};
  return config.dump(2) + "\n";
}

}  // namespace seedling::lora
