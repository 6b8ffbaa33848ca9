// SIGKILL the real `seedling serve` process 20 times at random moments while SDK clients keep training and
// uploading, restart it each time, and check the ledger promise against the log of acknowledgements the
// clients keep: every acknowledged update is in a committed round or in a round marked aborted, never
// lost, never counted twice; round ids only grow.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "base/file.h"
#include "base/philox.h"
#include "client/client.h"
#include "comms/tls.h"
#include "model/init.h"
#include "model/runtime.h"
#include "server/coordinator.h"
#include "server/devices.h"
#include "server/store.h"

namespace seedling::server {
namespace {

uint16_t FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

bool PortOpen(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

pid_t StartServer(const std::string& config, const std::string& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    FILE* f = std::freopen(log.c_str(), "a", stdout);
    (void)f;
    ::dup2(::fileno(stdout), STDERR_FILENO);
    ::execl(SEEDLING_BINARY, SEEDLING_BINARY, "serve", "--config", config.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// Runs 4 SDK clients against `seedling serve` with `rounds_toml` ([training] and [strategy] settings), kills the
// server `kills` times at random moments and checks the ledger promise. `one_update_per_device_and_round`: in
// synchronous rounds a device reports at most once per round (in fedbuff a buffer may take a device's update
// of an earlier buffer's task and one of its own task).
void KillRepeatedly(const std::string& rounds_toml, int kills, bool one_update_per_device_and_round) {
  model::ConfigureCompute({1});  // four client threads run models at once: see model/runtime.h
  const std::string dir = std::filesystem::temp_directory_path() / ("seedling_crash_" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  model::InitModelOptions init;
  init.preset = "tiny";
  REQUIRE(model::InitModel(JoinPath(dir, "model"), init).ok());
  comms::CertificateOptions co;
  co.dir = JoinPath(dir, "certs");
  REQUIRE(comms::CreateCertificates(co).ok());
  const uint16_t port = FreePort();
  const std::string config = JoinPath(dir, "server.toml");
  REQUIRE(
      WriteFileAtomic(config, "[server]\nstate_dir = \"state\"\nport = " + std::to_string(port) +
                                  "\nhttp_port = 0\ncert_file = \"certs/server.crt\"\nkey_file = \"certs/server.key\"\n"
                                  "tick_ms = 50\n[model]\ndir = \"model\"\n" +
                                  rounds_toml + "[lora]\nrank = 2\n[retry]\nbase_seconds = 1\njitter = 0.0\n")
          .ok());
  // Register devices with the store directly (the server is not running yet).
  constexpr int kClients = 4;
  std::map<std::string, std::string> tokens;
  {
    auto cfg = LoadServerConfig(config);
    REQUIRE(cfg.ok());
    REQUIRE(MakeDirs(cfg->state_dir).ok());
    auto store = Store::Open(cfg->state_dir);
    REQUIRE(store.ok());
    for (int i = 0; i < kClients; ++i) {
      auto token = AddDevice(**store, "dev" + std::to_string(i), 0);
      REQUIRE(token.ok());
      tokens["dev" + std::to_string(i)] = *token;
    }
  }
  const std::string log = JoinPath(dir, "server.log");
  pid_t server = StartServer(config, log);
  for (int i = 0; i < 200 && !PortOpen(port); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  REQUIRE(PortOpen(port));

  std::atomic<bool> stop{false};
  std::atomic<int> uploads{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      client::ClientConfig c;
      c.port = port;
      c.ca_file = JoinPath(co.dir, "ca.crt");
      c.server_name = "localhost";
      c.device_id = "dev" + std::to_string(i);
      c.token = tokens[c.device_id];
      c.state_dir = JoinPath(dir, "client-" + c.device_id);
      c.model_dir = JoinPath(dir, "model");
      c.data_path = std::string(SEEDLING_SOURCE_DIR) + "/data/sample/instructions.jsonl";
      c.max_attempts = 2;
      c.backoff_base_s = 0.05;
      c.backoff_max_s = 0.2;
      c.connect_timeout_ms = 2000;
      c.call_timeout_ms = 5000;
      c.upload_chunk_bytes = 2048;  // many chunks: kills land mid-upload too
      auto cl = client::Client::Create(c);
      REQUIRE(cl.ok());
      (*cl)->SetConditions({true, true, true, 1.0f});
      while (!stop) {
        auto r = (*cl)->RunOnce();
        if (r.ok() && r->outcome == client::RunOutcome::kUploaded) ++uploads;
        if (!r.ok() || r->outcome != client::RunOutcome::kUploaded) {
          std::this_thread::sleep_for(std::chrono::milliseconds(150));
        }
      }
    });
  }

  Rng rng(2024, rng_stream::kData);
  for (int kill = 0; kill < kills; ++kill) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300 + rng.UniformInt(1700)));
    ::kill(server, SIGKILL);
    ::waitpid(server, nullptr, 0);
    server = StartServer(config, log);
    for (int i = 0; i < 200 && !PortOpen(port); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  std::this_thread::sleep_for(std::chrono::seconds(6));  // let a few rounds finish undisturbed
  stop = true;
  for (std::thread& t : clients) t.join();
  ::kill(server, SIGTERM);  // graceful
  int status = 0;
  ::waitpid(server, &status, 0);
  CHECK(WIFEXITED(status));
  INFO("server log: " << *ReadFile(log));

  // The clients' acknowledgement logs against the durable state.
  auto cfg = LoadServerConfig(config);
  REQUIRE(cfg.ok());
  auto store = Store::Open(cfg->state_dir);
  REQUIRE(store.ok());
  // What a restart would find (a no-op after a graceful shutdown, which aborts the active round itself).
  REQUIRE((*store)->RecoverAfterCrash(0, "check").ok());
  int acked = 0, in_committed = 0;
  std::set<std::string> keys;
  for (int i = 0; i < kClients; ++i) {
    const std::string path = JoinPath(dir, "client-dev" + std::to_string(i) + "/acks.jsonl");
    if (!FileExists(path)) continue;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line);
      const std::string key = j["key"];
      const uint64_t round = j["round"];
      ++acked;
      INFO("acknowledged " << key << " in round " << round);
      CHECK(keys.insert(key).second);  // each acknowledgement once
      auto entry = (*store)->FindLedgerEntry(key);
      REQUIRE(entry.ok());
      REQUIRE(entry->has_value());  // never lost
      CHECK((*entry)->round_id == round);
      auto r = (*store)->FindRound(round);
      REQUIRE(r.ok());
      REQUIRE(r->has_value());
      const RoundState s = (*r)->state;
      CHECK((s == RoundState::kCommitted || s == RoundState::kAborted));
      in_committed += s == RoundState::kCommitted;
    }
  }
  // Never doubled: within any round a device is in the ledger at most once, and committed counts match.
  auto rounds = (*store)->RecentRounds(10000);
  REQUIRE(rounds.ok());
  uint64_t expected_id = rounds->empty() ? 0 : (*rounds)[0].round_id;
  std::set<std::string> ledger_tasks;
  int committed = 0;
  for (const RoundRecord& r : *rounds) {
    CHECK(r.round_id == expected_id--);  // consecutive: ids are never reused or skipped backwards
    auto ledger = (*store)->LedgerForRound(r.round_id);
    REQUIRE(ledger.ok());
    std::set<std::string> devices;
    for (const LedgerEntry& e : *ledger) {
      CHECK(ledger_tasks.insert(e.task_id).second);  // a task's update is in one round's ledger only
      if (one_update_per_device_and_round) CHECK(devices.insert(e.device_id).second);
    }
    CHECK(r.accepted == static_cast<int64_t>(ledger->size()));
    committed += r.state == RoundState::kCommitted;
  }
  INFO(acked << " acknowledged uploads, " << in_committed << " in committed rounds, " << committed
             << " committed rounds of " << rounds->size());
  CHECK(acked > 10);
  CHECK(committed >= 2);
  std::filesystem::remove_all(dir);
}

TEST_CASE("Killing the server 20 times mid-round loses and doubles no acknowledged update", "[server][crash]") {
  KillRepeatedly(
      "[training]\nclients_per_round = 3\nmin_reports = 2\nover_selection = 1.4\nselection_window_s = 1\n"
      "round_deadline_s = 8\nsteps = 1\nseq_len = 32\ncodec = \"int8\"\n",
      20, /*one_update_per_device_and_round=*/true);
}

TEST_CASE("Killing a fedbuff server 10 times between accepts and flushes loses and doubles no acknowledged update",
          "[server][crash][fedbuff]") {
  // Buffers of 3 from up to 4 tasks out: most kills land while a buffer holds acknowledged updates.
  KillRepeatedly(
      "[training]\nselection_window_s = 1\nround_deadline_s = 8\nsteps = 1\nseq_len = 32\ncodec = \"int8\"\n"
      "[strategy]\nmode = \"fedbuff\"\nbuffer_size = 3\nconcurrency = 4\n",
      10, /*one_update_per_device_and_round=*/false);
}

}  // namespace
}  // namespace seedling::server
