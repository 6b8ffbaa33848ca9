#include "client/client_config.h"

#include <toml++/toml.h>

#include <limits>
#include <nlohmann/json.hpp>
#include <type_traits>
#include <utility>

#include "base/json.h"
#include "base/memory.h"
#include "base/status.h"
#include "base/strings.h"
#include "base/toml.h"
#include "comms/transport.h"
#include "model/weight_format.h"
#include "optim/method.h"

namespace seedling::client {

using Json = nlohmann::json;

namespace {

// Applies key/values from a JSON object to the config; shared by the JSON and TOML parsers.
absl::Status ApplyConfig(const Json& j, ClientConfig& c) {
  if (!j.is_object()) return absl::InvalidArgumentError("the client config must be an object");
  for (const auto& item : j.items()) {
    // Named copies, not a structured binding: the lambdas below capture them (clang 14 cannot capture
    // structured bindings, and the fuzzing build uses it).
    const std::string& key = item.key();
    const Json& value = item.value();
    auto str = [&](std::string& out) -> absl::Status {
      if (!value.is_string()) return absl::InvalidArgumentError(StrCat("'", key, "' must be a string"));
      out = value.get<std::string>();
      return absl::OkStatus();
    };
    auto num = [&](auto& out) -> absl::Status {
      if (!value.is_number()) return absl::InvalidArgumentError(StrCat("'", key, "' must be a number"));
      using T = std::remove_reference_t<decltype(out)>;
      if constexpr (std::is_integral_v<T>) {
        // Range-checked: get<T>() alone would wrap 70000 into a uint16_t port, 2^32 + 1 into an int.
        const bool in_range = value.is_number_unsigned()
                                  ? std::in_range<T>(value.get<uint64_t>())
                                  : value.is_number_integer() && std::in_range<T>(value.get<int64_t>());
        if (!in_range) {
          return absl::InvalidArgumentError(StrCat("'", key, "' must be an integer in [", std::numeric_limits<T>::min(),
                                                   ", ", std::numeric_limits<T>::max(), "]"));
        }
        out = value.is_number_unsigned() ? static_cast<T>(value.get<uint64_t>()) : static_cast<T>(value.get<int64_t>());
      } else {
        out = value.get<T>();
      }
      return absl::OkStatus();
    };
    absl::Status st;
    if (key == "host")
      st = str(c.host);
    else if (key == "port")
      st = num(c.port);
    else if (key == "ca_file")
      st = str(c.ca_file);
    else if (key == "pinned_public_key_sha256")
      st = str(c.pinned_public_key_sha256);
    else if (key == "server_name")
      st = str(c.server_name);
    else if (key == "client_cert_file")
      st = str(c.client_cert_file);
    else if (key == "client_key_file")
      st = str(c.client_key_file);
    else if (key == "device_id")
      st = str(c.device_id);
    else if (key == "token")
      st = str(c.token);
    else if (key == "state_dir")
      st = str(c.state_dir);
    else if (key == "model_dir")
      st = str(c.model_dir);
    else if (key == "weights")
      st = str(c.weights);
    else if (key == "weight_cache_dir")
      st = str(c.weight_cache_dir);
    else if (key == "data_path")
      st = str(c.data_path);
    else if (key == "memory_budget_bytes")
      st = num(c.memory_budget_bytes);
    else if (key == "max_row_bytes")
      st = num(c.max_row_bytes);
    else if (key == "memory_budget") {
      if (value.is_string()) {
        auto b = ParseByteSize(value.get<std::string>());
        if (!b.ok()) return b.status();
        c.memory_budget_bytes = *b;
      } else {
        st = num(c.memory_budget_bytes);
      }
    } else if (key == "methods") {
      if (!value.is_array()) return absl::InvalidArgumentError("'methods' must be an array of strings");
      c.methods.clear();
      for (const Json& m : value) {
        if (!m.is_string()) return absl::InvalidArgumentError("'methods' must be an array of strings");
        c.methods.push_back(m.get<std::string>());
      }
    } else if (key == "connect_timeout_ms")
      st = num(c.connect_timeout_ms);
    else if (key == "call_timeout_ms")
      st = num(c.call_timeout_ms);
    else if (key == "max_attempts")
      st = num(c.max_attempts);
    else if (key == "backoff_base_s")
      st = num(c.backoff_base_s);
    else if (key == "backoff_max_s")
      st = num(c.backoff_max_s);
    else if (key == "checkpoint_every")
      st = num(c.checkpoint_every);
    else if (key == "seed")
      st = num(c.seed);
    else if (key == "upload_chunk_bytes")
      st = num(c.upload_chunk_bytes);
    else
      return absl::InvalidArgumentError(StrCat("unknown client config key '", key, "'"));
    SEEDLING_RETURN_IF_ERROR(st);
  }
  return c.Validate();
}

}  // namespace

absl::Status ClientConfig::Validate() const {
  if (device_id.empty()) return absl::InvalidArgumentError("device_id is required");
  if (state_dir.empty()) return absl::InvalidArgumentError("state_dir is required");
  if (model_dir.empty()) return absl::InvalidArgumentError("model_dir is required");
  if (!weights.empty() && !model::ParseWeightPrecision(weights).ok()) {
    return absl::InvalidArgumentError(
        StrCat("weights must be fp32, stored, q8_0 or q4_0 (or empty: as the task says), got '", weights, "'"));
  }
  if (memory_budget_bytes < 0) return absl::InvalidArgumentError("memory_budget_bytes must be >= 0");
  if (max_row_bytes < kMinMaxRowBytes || max_row_bytes > kMaxMaxRowBytes) {
    return absl::InvalidArgumentError(
        StrCat("max_row_bytes must be in [", kMinMaxRowBytes, ", ", kMaxMaxRowBytes, "], got ", max_row_bytes));
  }
  if (max_attempts < 1) return absl::InvalidArgumentError("max_attempts must be >= 1");
  if (connect_timeout_ms < 1 || call_timeout_ms < 1) {
    return absl::InvalidArgumentError("connect_timeout_ms and call_timeout_ms must be >= 1");
  }
  if (checkpoint_every < 0) return absl::InvalidArgumentError("checkpoint_every must be >= 0");
  if (!(backoff_base_s > 0) || backoff_max_s < backoff_base_s) {
    return absl::InvalidArgumentError("need 0 < backoff_base_s <= backoff_max_s");
  }
  if (upload_chunk_bytes < 1024 || upload_chunk_bytes > static_cast<int64_t>(comms::kMaxChunkBytes)) {
    return absl::InvalidArgumentError("upload_chunk_bytes must be in [1 KiB, 1 MiB]");
  }
  for (const std::string& m : methods) {
    if (!optim::ParseMethod(m).ok()) return absl::InvalidArgumentError(StrCat("unknown method '", m, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ClientConfig> ClientConfig::FromJson(std::string_view json) {
  SEEDLING_ASSIGN_OR_RETURN(const Json j, ParseJson(json, "the client config"));
  ClientConfig c;
  SEEDLING_RETURN_IF_ERROR(ApplyConfig(j, c));
  return c;
}

absl::StatusOr<ClientConfig> ClientConfig::FromToml(std::string_view text) {
  SEEDLING_ASSIGN_OR_RETURN(const toml::table root, ParseToml(text));
  // Flatten [client] (or the top level) into the JSON form: one set of keys for both formats.
  const toml::table* t = root.get_as<toml::table>("client");
  if (t == nullptr) t = &root;
  Json j = Json::object();
  for (const auto& [key, node] : *t) {
    const std::string k(key.str());
    if (auto s = node.value<std::string>(); s && node.is_string()) {
      j[k] = *s;
    } else if (node.is_integer()) {
      j[k] = *node.value<int64_t>();
    } else if (node.is_floating_point()) {
      j[k] = *node.value<double>();
    } else if (node.is_boolean()) {
      j[k] = *node.value<bool>();
    } else if (const toml::array* arr = node.as_array()) {
      Json a = Json::array();
      for (const toml::node& e : *arr) {
        auto s = e.value<std::string>();
        if (!s) return absl::InvalidArgumentError(StrCat("'", k, "' must be an array of strings"));
        a.push_back(*s);
      }
      j[k] = a;
    } else {
      return absl::InvalidArgumentError(StrCat("unsupported value for '", k, "'"));
    }
  }
  ClientConfig c;
  SEEDLING_RETURN_IF_ERROR(ApplyConfig(j, c));
  return c;
}

}  // namespace seedling::client
