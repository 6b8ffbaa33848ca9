#pragma once

// What the federation tests share (tests/server/federation_test.cpp, secagg_federation_test.cpp): a tiny
// model, TLS certificates and a server config, the adapter a round starts from, and a coordinator served
// over loopback TLS with its round ticker.

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/file.h"
#include "client/client.h"
#include "comms/tls.h"
#include "lora/adapter.h"
#include "model/init.h"
#include "model/runtime.h"
#include "server/coordinator.h"
#include "server/metrics.h"
#include "tests/test_util.h"

namespace seedling::testing {

struct FederationWorld {
  TempDir dir;
  std::string model_dir = JoinPath(dir.path, "model");
  std::string certs = JoinPath(dir.path, "certs");
  std::string data = std::string(SEEDLING_SOURCE_DIR) + "/data/sample/instructions.jsonl";
  server::ServerConfig config;
  int64_t upload_chunk_bytes = 0;  // > 0: ClientFor's devices upload (and send masked inputs) in such pieces

  FederationWorld() {
    model::ConfigureCompute({1});  // many client threads run models at once: see model/runtime.h
    model::InitModelOptions init;
    init.preset = "tiny";
    init.seed = 3;
    REQUIRE(model::InitModel(model_dir, init).ok());
    comms::CertificateOptions co;
    co.dir = certs;
    REQUIRE(comms::CreateCertificates(co).ok());
    config.state_dir = JoinPath(dir.path, "state");
    config.cert_file = JoinPath(certs, "server.crt");
    config.key_file = JoinPath(certs, "server.key");
    config.port = 0;
    config.http_port = 0;
    config.model_dir = model_dir;
    config.steps = 2;
    config.batch = 1;
    config.seq_len = 48;
    config.over_selection = 1.0;
    config.selection_window_s = 1;
    config.round_deadline_s = 300;
    config.retry_base_s = 1;
    config.retry_jitter = 0.0;
    config.lora_rank = 4;
  }

  client::ClientConfig ClientFor(const std::string& device, const std::string& token, uint16_t port) const {
    client::ClientConfig c;
    c.port = port;
    c.ca_file = JoinPath(certs, "ca.crt");
    c.server_name = "localhost";
    c.device_id = device;
    c.token = token;
    c.state_dir = JoinPath(dir.path, "client-" + device);
    c.model_dir = model_dir;
    c.data_path = data;
    c.backoff_base_s = 0.05;
    c.backoff_max_s = 0.5;
    c.checkpoint_every = 0;
    if (upload_chunk_bytes > 0) c.upload_chunk_bytes = upload_chunk_bytes;
    return c;
  }

  // The global adapter at version 0 (the LoRA initialization of `config`).
  std::vector<float> InitialAdapter() const {
    auto mc = model::LoadModelConfig(model_dir);
    REQUIRE(mc.ok());
    lora::LoraConfig lc;
    lc.rank = config.lora_rank;
    lc.alpha = config.lora_alpha;
    lc.init_seed = config.lora_init_seed;
    auto a = lora::LoraAdapter::Create(*mc, lc);
    REQUIRE(a.ok());
    return std::vector<float>((*a)->flat().data_ptr<float>(), (*a)->flat().data_ptr<float>() + (*a)->numel());
  }
};

// A coordinator on the system clock with devices dev0 .. dev<n-1> registered, behind a TLS server on an
// OS-chosen loopback port, ticked every 20 ms until Stop() (or destruction).
class LoopbackCoordinator {
 public:
  LoopbackCoordinator(const server::ServerConfig& config, int devices) {
    auto c = server::Coordinator::Create(config, &clock_, &metrics_);
    REQUIRE(c.ok());
    coordinator_ = std::move(c).value();
    for (int i = 0; i < devices; ++i) {
      const std::string id = "dev" + std::to_string(i);
      auto token = coordinator_->RegisterDevice(id);
      REQUIRE(token.ok());
      tokens_[id] = *token;
    }
    comms::TlsServerOptions tls;
    tls.cert_file = config.cert_file;
    tls.key_file = config.key_file;
    auto server = comms::TlsServer::Start(tls, coordinator_->handler_factory());
    REQUIRE(server.ok());
    server_ = std::move(server).value();
    ticker_ = std::thread([this] {
      while (!stop_) {
        coordinator_->Tick();
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    });
  }
  ~LoopbackCoordinator() { Stop(); }
  LoopbackCoordinator(const LoopbackCoordinator&) = delete;
  LoopbackCoordinator& operator=(const LoopbackCoordinator&) = delete;

  // Stops the ticker and the TLS server; the coordinator stays for inspection.
  void Stop() {
    stop_ = true;
    if (ticker_.joinable()) ticker_.join();
    if (server_) server_->Stop();
  }

  server::Coordinator& coordinator() { return *coordinator_; }
  server::Metrics& metrics() { return metrics_; }
  uint16_t port() const { return server_->port(); }
  const std::string& token(const std::string& device) const { return tokens_.at(device); }

 private:
  SystemClock clock_;
  server::Metrics metrics_;
  std::unique_ptr<server::Coordinator> coordinator_;
  std::map<std::string, std::string> tokens_;
  std::unique_ptr<comms::TlsServer> server_;
  std::atomic<bool> stop_{false};
  std::thread ticker_;
};

}  // namespace seedling::testing
