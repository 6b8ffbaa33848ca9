#pragma once

// A device's configuration (the `seedling client` config file, the C ABI's JSON, ClientConfig in the C++
// SDK), parsed from JSON or TOML without LibTorch.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "client/row_limits.h"

namespace seedling::client {

struct ClientConfig {
  // Server and identity.
  std::string host = "127.0.0.1";
  uint16_t port = 8443;
  std::string ca_file;                   // PEM CA of the server certificate (required for TLS)
  std::string pinned_public_key_sha256;  // optional pin of the server key (hex)
  std::string server_name;               // certificate name to expect; default: host
  std::string client_cert_file;          // optional, mutual TLS
  std::string client_key_file;
  std::string device_id;
  std::string token;  // the device token from `seedling devices add`
  // Local.
  std::string state_dir;                        // required; created if missing
  std::string model_dir;                        // the base model (the same as the server's)
  std::string weights;                          // how to hold the frozen base weights: "" = as the task says
                                                // (server.toml [model] weights), or this device's own choice:
                                                // fp32 | stored | q8_0 | q4_0 (model/weight_format.h)
  std::string weight_cache_dir;                 // q8_0 / q4_0 weight cache (model/weight_cache.h), built once;
                                                // default <state_dir>/model-cache (the model may be read-only)
  std::string data_path;                        // JSONL of the device's examples; default <state_dir>/examples.jsonl
  int64_t memory_budget_bytes = 0;              // peak process memory the app allows (0 = unlimited)
  int64_t runtime_bytes = -1;                   // the planner's runtime baseline (code, LibTorch, BLAS before the
                                                // model); -1 = measured before this client first loads a model.
                                                // Set by embedders that share a model (the simulator's devices)
  int64_t max_row_bytes = kDefaultMaxRowBytes;  // longer data rows are skipped (local_data.h);
                                                // AddExample refuses them
  std::vector<std::string> methods = {"lora-bp", "fwdgrad", "mezo", "kseed", "pepita"};
  // Behaviour.
  int64_t connect_timeout_ms = 10000;
  int64_t call_timeout_ms = 30000;
  int max_attempts = 6;         // network attempts per RunOnce before giving up
  double backoff_base_s = 0.5;  // full-jitter exponential backoff: U(0, min(max, base × 2^attempt))
  double backoff_max_s = 30.0;
  int64_t checkpoint_every = 5;          // training steps between checkpoints
  uint64_t seed = 0;                     // backoff jitter stream
  int64_t upload_chunk_bytes = 1 << 20;  // ≤ 1 MiB

  // Parses JSON or TOML text (keys as the field names). InvalidArgument names unknown keys and bad values.
  static absl::StatusOr<ClientConfig> FromJson(std::string_view json);
  static absl::StatusOr<ClientConfig> FromToml(std::string_view toml);
  absl::Status Validate() const;
};

}  // namespace seedling::client
