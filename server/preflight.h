#pragma once

// `seedling serve --check-config`: the checks `seedling serve` makes at startup, without binding a port or
// opening the state store, so a bad server.toml (or a file it names) is found before a restart takes the
// running server down (the systemd unit in examples/ops/ runs it as ExecStartPre).

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "server/config.h"

namespace seedling::server {

// What a passing check found.
struct PreflightReport {
  std::string model_id;            // model::ModelId of the base model's config, as devices compute it
  int64_t adapter_parameters = 0;  // entries of the LoRA adapter the rounds train
  std::string strategy;            // the strategy stack's name (e.g. "fedavg", "dp(fedavg)")
  bool state_exists = false;       // state_dir already holds a state database (else serve creates one)
};

// Checks `config` as Coordinator::Create and TlsServer::Start would, in the order serve meets them:
//   1. ServerConfig::Validate (InvalidArgument naming the key);
//   2. the TLS files: cert_file holds a PEM certificate, key_file a PEM private key matching it, and
//      client_ca_file (if set) a PEM certificate (InvalidArgument naming the key and the file; NotFound /
//      PermissionDenied if unreadable);
//   3. state_dir is a directory this process can write, or can be created (FailedPrecondition /
//      PermissionDenied naming it); nothing is created or opened;
//   4. the base model's config (model_dir), the LoRA config, the adapter and the strategy stack built from them,
//      and the DP accountant's parameters with [privacy] dp (their errors, prefixed with the section).
// Not checked: whether the ports are free (only binding tells), and whether a stored checkpoint matches the
// adapter (serve reads it under the store's lock). Thread-compatible; reads files only.
absl::StatusOr<PreflightReport> CheckServerConfig(const ServerConfig& config);

}  // namespace seedling::server
