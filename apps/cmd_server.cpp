// serve, certs, devices, client.

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "apps/commands.h"
#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "client/client.h"
#include "comms/tls.h"
#include "server/config.h"
#include "server/coordinator.h"
#include "server/devices.h"
#include "server/http.h"
#include "server/metrics.h"
#include "server/preflight.h"
#include "server/store.h"
#include "spdlog/spdlog.h"

namespace seedling::apps {
namespace {

// SIGINT / SIGTERM request an orderly shutdown. A handler (not sigwait) because threads started before
// main() by the BLAS library would otherwise receive the signal with its default action and kill the
// process mid-write. The flag is the one global a signal handler needs; it only ever goes false -> true.
std::atomic<bool> g_shutdown_requested{false};

extern "C" void OnShutdownSignal(int) { g_shutdown_requested.store(true); }

class ShutdownSignal {
 public:
  ShutdownSignal() {
    struct sigaction sa {};
    sa.sa_handler = OnShutdownSignal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~ShutdownSignal() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  bool requested() const {
    const bool r = g_shutdown_requested.load();
    if (r && !logged_.exchange(true)) spdlog::warn("shutdown requested: finishing");
    return r;
  }

 private:
  struct sigaction old_int_ {
  }, old_term_{};
  mutable std::atomic<bool> logged_{false};
};

// `serve --check-config`: the startup checks alone (server/preflight.h), then one summary line.
absl::Status CheckConfig(const std::string& config_path) {
  SEEDLING_ASSIGN_OR_RETURN(const server::ServerConfig config, server::LoadServerConfig(config_path));
  absl::StatusOr<server::PreflightReport> report = server::CheckServerConfig(config);
  if (!report.ok()) return Annotate(report.status(), config_path);
  const std::string http =
      config.http_port == 0 ? std::string("no HTTP") : StrCat("HTTP on ", config.http_bind, ":", config.http_port);
  std::printf("%s: ok: %s with %s, model %s, adapter of %lld parameters, devices on %s:%u, %s, %s state in %s\n",
              config_path.c_str(), config.method.c_str(), report->strategy.c_str(),
              report->model_id.substr(0, 12).c_str(), static_cast<long long>(report->adapter_parameters),
              config.bind.c_str(), config.port, http.c_str(), report->state_exists ? "existing" : "new",
              config.state_dir.c_str());
  return absl::OkStatus();
}

void RegisterServe(CLI::App& app, Action& action) {
  auto config_path = std::make_shared<std::string>();
  auto port_file = std::make_shared<std::string>();
  auto check_config = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("serve", "Run the coordination server (TLS for devices, HTTP for metrics)");
  cmd->add_option("--config", *config_path, "server.toml (docs/operations.md: every key and its default)")->required();
  cmd->add_option("--port-file", *port_file, "Write the bound TLS and HTTP ports here as JSON (for scripts)");
  cmd->add_flag("--check-config", *check_config,
                "Only check server.toml and the files it names (no port bound, no state written); print a summary");
  cmd->callback([config_path, port_file, check_config, &action] {
    action = [config_path, port_file, check_config]() -> absl::Status {
      if (*check_config) return CheckConfig(*config_path);
      SEEDLING_ASSIGN_OR_RETURN(server::ServerConfig config, server::LoadServerConfig(*config_path));
      ShutdownSignal shutdown;  // before any thread starts, so they inherit the blocked mask
      SystemClock clock;
      server::Metrics metrics;
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<server::Coordinator> coordinator,
                                server::Coordinator::Create(config, &clock, &metrics));
      comms::TlsServerOptions tls;
      tls.bind_address = config.bind;
      tls.port = config.port;
      tls.cert_file = config.cert_file;
      tls.key_file = config.key_file;
      tls.client_ca_file = config.client_ca_file;
      tls.threads = config.io_threads;
      tls.max_connections = config.max_connections;
      tls.handshake_timeout = comms::Duration(config.handshake_timeout_ms);
      tls.read_timeout = comms::Duration(config.read_timeout_ms);
      tls.idle_timeout = comms::Duration(config.idle_timeout_ms);
      tls.write_timeout = comms::Duration(config.write_timeout_ms);
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<comms::TlsServer> server,
                                comms::TlsServer::Start(tls, coordinator->handler_factory()));
      server::HttpServer http(metrics);
      if (config.http_port != 0) {
        server::HttpOptions ho;
        ho.bind_address = config.http_bind;
        ho.port = config.http_port;
        SEEDLING_RETURN_IF_ERROR(http.Start(
            ho, [&] { return coordinator->Snapshot(); }, [&] { return coordinator->Health(); }));
      }
      std::printf("seedling serve: devices on %s:%u (TLS 1.3), metrics on http://%s:%u/\n", config.bind.c_str(),
                  server->port(), config.http_bind.c_str(), http.port());
      std::fflush(stdout);
      if (!port_file->empty()) {
        const nlohmann::json ports = {{"port", server->port()}, {"http_port", http.port()}};
        SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(*port_file, ports.dump() + "\n"));
      }
      while (!shutdown.requested() && !coordinator->Finished()) {
        coordinator->Tick();
        std::this_thread::sleep_for(std::chrono::milliseconds(config.tick_ms));
      }
      // Graceful: stop taking connections, let the I/O threads finish, then close the store.
      server->Stop();
      http.Stop();
      coordinator->Shutdown();
      std::printf("seedling serve: stopped at global version %llu\n",
                  static_cast<unsigned long long>(coordinator->global_version()));
      return absl::OkStatus();
    };
  });
}

void RegisterCerts(CLI::App& app, Action& action) {
  CLI::App* certs = app.add_subcommand("certs", "TLS certificates");
  certs->require_subcommand(1);
  auto options = std::make_shared<comms::CertificateOptions>();
  CLI::App* init = certs->add_subcommand("init", "Write a CA and a server certificate (ECDSA P-256)");
  init->add_option("--dir", options->dir, "Output directory")->required();
  init->add_option("--names", options->server_names, "Server DNS names / IP addresses")
      ->delimiter(',')
      ->capture_default_str();
  init->add_option("--days", options->validity_days, "Validity in days")->capture_default_str();
  init->add_flag("--force", options->overwrite, "Replace existing files");
  init->callback([options, &action] {
    action = [options]() -> absl::Status {
      SEEDLING_RETURN_IF_ERROR(comms::CreateCertificates(*options));
      SEEDLING_ASSIGN_OR_RETURN(std::string pin, comms::PublicKeySha256(JoinPath(options->dir, "server.crt")));
      std::printf("wrote ca.crt, ca.key, server.crt, server.key to %s\nserver public key SHA-256 (for pinning): %s\n",
                  options->dir.c_str(), pin.c_str());
      return absl::OkStatus();
    };
  });
  auto client_name = std::make_shared<std::string>();
  auto client_dir = std::make_shared<std::string>();
  CLI::App* client = certs->add_subcommand("client", "Issue a client certificate (mutual TLS) from the CA in --dir");
  client->add_option("--dir", *client_dir, "Directory with ca.crt / ca.key")->required();
  client->add_option("--name", *client_name, "Certificate name (device id)")->required();
  client->callback([client_dir, client_name, &action] {
    action = [client_dir, client_name]() -> absl::Status {
      SEEDLING_RETURN_IF_ERROR(comms::CreateClientCertificate(*client_dir, *client_name));
      std::printf("wrote %s.crt and %s.key to %s\n", client_name->c_str(), client_name->c_str(), client_dir->c_str());
      return absl::OkStatus();
    };
  });
}

// Issues a token per id with `issue` and prints "id token" lines, or one JSON object with --json. The
// tokens are in effect once issued: if a later id fails, the ones issued so far are printed before the
// error rather than lost.
absl::Status IssueTokens(const std::vector<std::string>& ids, bool json,
                         const std::function<absl::StatusOr<std::string>(const std::string&)>& issue) {
  nlohmann::json out = nlohmann::json::object();
  for (const std::string& id : ids) {
    absl::StatusOr<std::string> token = issue(id);
    if (!token.ok()) {
      if (json && !out.empty()) std::printf("%s\n", out.dump().c_str());
      return token.status();
    }
    out[id] = *token;
    if (!json) std::printf("%s %s\n", id.c_str(), token->c_str());
  }
  if (json) std::printf("%s\n", out.dump().c_str());
  return absl::OkStatus();
}

void RegisterDevices(CLI::App& app, Action& action) {
  CLI::App* devices = app.add_subcommand("devices", "The device registry");
  devices->require_subcommand(1);
  auto config_path = std::make_shared<std::string>();
  auto ids = std::make_shared<std::vector<std::string>>();
  auto json = std::make_shared<bool>(false);
  CLI::App* add = devices->add_subcommand("add", "Register devices and print their tokens (shown once)");
  add->add_option("--config", *config_path, "server.toml")->required();
  add->add_option("--id", *ids, "Device id(s)")->required()->delimiter(',');
  add->add_flag("--json", *json, "Print {\"device\": \"token\", ...}");
  add->callback([config_path, ids, json, &action] {
    action = [config_path, ids, json]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(server::ServerConfig config, server::LoadServerConfig(*config_path));
      SEEDLING_RETURN_IF_ERROR(MakeDirs(config.state_dir));
      // Works beside a running `seedling serve` too: it authenticates the new devices at their next Hello.
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<server::Store> store, server::Store::OpenForDevices(config.state_dir));
      SystemClock clock;
      return IssueTokens(*ids, *json,
                         [&](const std::string& id) { return server::AddDevice(*store, id, clock.NowMs()); });
    };
  });
  auto list_config = std::make_shared<std::string>();
  CLI::App* list = devices->add_subcommand("list", "List registered devices (never their tokens)");
  list->add_option("--config", *list_config, "server.toml")->required();
  list->callback([list_config, &action] {
    action = [list_config]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(server::ServerConfig config, server::LoadServerConfig(*list_config));
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<server::Store> store, server::Store::OpenForDevices(config.state_dir));
      SEEDLING_ASSIGN_OR_RETURN(std::vector<server::DeviceRecord> devices, store->ListDevices());
      for (const server::DeviceRecord& d : devices) {
        std::printf("%s%s\n", d.device_id.c_str(), d.revoked_ms != 0 ? " revoked" : "");
      }
      return absl::OkStatus();
    };
  });
  auto rotate_config = std::make_shared<std::string>();
  auto rotate_ids = std::make_shared<std::vector<std::string>>();
  auto rotate_json = std::make_shared<bool>(false);
  CLI::App* rotate =
      devices->add_subcommand("rotate", "Issue new tokens for devices (shown once); the old ones stop working");
  rotate->add_option("--config", *rotate_config, "server.toml")->required();
  rotate->add_option("--id", *rotate_ids, "Device id(s)")->required()->delimiter(',');
  rotate->add_flag("--json", *rotate_json, "Print {\"device\": \"token\", ...}");
  rotate->callback([rotate_config, rotate_ids, rotate_json, &action] {
    action = [rotate_config, rotate_ids, rotate_json]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(server::ServerConfig config, server::LoadServerConfig(*rotate_config));
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<server::Store> store, server::Store::OpenForDevices(config.state_dir));
      return IssueTokens(*rotate_ids, *rotate_json,
                         [&](const std::string& id) { return server::RotateDeviceToken(*store, id); });
    };
  });
  auto revoke_config = std::make_shared<std::string>();
  auto revoke_ids = std::make_shared<std::vector<std::string>>();
  CLI::App* revoke = devices->add_subcommand("revoke", "Revoke devices: their tokens stop authenticating");
  revoke->add_option("--config", *revoke_config, "server.toml")->required();
  revoke->add_option("--id", *revoke_ids, "Device id(s)")->required()->delimiter(',');
  revoke->callback([revoke_config, revoke_ids, &action] {
    action = [revoke_config, revoke_ids]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(server::ServerConfig config, server::LoadServerConfig(*revoke_config));
      // Beside a running server too: its next Hello from the device is refused.
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<server::Store> store, server::Store::OpenForDevices(config.state_dir));
      SystemClock clock;
      for (const std::string& id : *revoke_ids) {
        SEEDLING_RETURN_IF_ERROR(store->RevokeDevice(id, clock.NowMs()));
        std::printf("%s revoked\n", id.c_str());
      }
      return absl::OkStatus();
    };
  });
}

void RegisterClient(CLI::App& app, Action& action) {
  auto config_path = std::make_shared<std::string>();
  auto rounds = std::make_shared<int>(1);
  auto max_wait = std::make_shared<double>(600);
  auto conditions = std::make_shared<client::Conditions>(client::Conditions{true, true, true, 1.0f});
  CLI::App* cmd = app.add_subcommand("client", "Run the device SDK from the command line");
  cmd->add_option("--config", *config_path, "client.toml (keys of ClientConfig in client/client.h)")->required();
  cmd->add_option("--rounds", *rounds, "Stop after this many acknowledged uploads (0 = run until stopped)")
      ->capture_default_str();
  cmd->add_option("--max-wait", *max_wait, "Give up after waiting this many seconds in total")->capture_default_str();
  cmd->callback([config_path, rounds, max_wait, conditions, &action] {
    action = [config_path, rounds, max_wait, conditions]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(std::string text, ReadFile(*config_path));
      SEEDLING_ASSIGN_OR_RETURN(client::ClientConfig config, client::ClientConfig::FromToml(text));
      ShutdownSignal shutdown;
      SEEDLING_ASSIGN_OR_RETURN(std::unique_ptr<client::Client> c, client::Client::Create(config));
      c->SetConditions(*conditions);
      // Ctrl-C / SIGTERM cancel the run in progress (training stops at the next step, after a checkpoint;
      // the next run resumes there) instead of waiting for the whole round.
      struct Watcher {
        std::atomic<bool> done{false};
        std::thread thread;
        ~Watcher() {
          done = true;
          if (thread.joinable()) thread.join();
        }
      } watcher;
      watcher.thread = std::thread([&watcher, &shutdown, client = c.get()] {
        while (!watcher.done) {
          if (shutdown.requested()) {
            client->Cancel();
            return;
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
      });
      int uploaded = 0;
      double waited = 0;
      while (!shutdown.requested() && (*rounds == 0 || uploaded < *rounds)) {
        SEEDLING_ASSIGN_OR_RETURN(client::RunResult r, c->RunOnce());
        nlohmann::json line = {{"outcome", client::RunOutcomeName(r.outcome)},
                               {"round", r.round_id},
                               {"retry_after_seconds", r.retry_after_seconds},
                               {"detail", r.detail}};
        if (r.outcome == client::RunOutcome::kUploaded) {
          ++uploaded;
          line["loss_start"] = r.loss_start;
          line["loss_end"] = r.loss_end;
          line["update_bytes"] = r.update_bytes;
          line["tokens_per_second"] = r.tokens_per_second;
          line["weights"] = r.weights;  // the frozen base weights' representation it trained with
          line["scored_tokens"] = r.scored_tokens;
        }
        // kDropped (a straggler's update after its round closed) needs no wait: the next call checks in.
        std::cout << line.dump() << std::endl;
        if (r.outcome == client::RunOutcome::kRetryLater || r.outcome == client::RunOutcome::kDeclined) {
          const double wait = std::max<double>(1.0, r.retry_after_seconds);
          if (waited + wait > *max_wait) return absl::DeadlineExceededError("gave up waiting for a task");
          for (double t = 0; t < wait && !shutdown.requested(); t += 0.1) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
          }
          waited += wait;
        }
      }
      return absl::OkStatus();
    };
  });
}

}  // namespace

void RegisterServerCommands(CLI::App& app, Action& action) {
  RegisterServe(app, action);
  RegisterCerts(app, action);
  RegisterDevices(app, action);
  RegisterClient(app, action);
}

}  // namespace seedling::apps
