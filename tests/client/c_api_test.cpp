// The SDK's C interface (client/seedling_client.h), driven only through its C functions against an
// in-process coordinator over loopback TLS, as an app would: create from JSON, conditions, examples,
// run_once, errors through seedling_client_last_error, cancel from another thread, destroy.

#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "base/file.h"
#include "client/seedling_client.h"
#include "comms/tls.h"
#include "model/init.h"
#include "model/runtime.h"
#include "server/coordinator.h"
#include "tests/server/federation_world.h"
#include "tests/test_util.h"

namespace seedling {
namespace {

using Json = nlohmann::json;

// A tiny model, certificates and a running TLS coordinator (one client per round, one round).
struct TlsWorld : testing::FederationWorld {
  std::unique_ptr<testing::LoopbackCoordinator> served;
  server::Coordinator* coordinator = nullptr;

  TlsWorld() {
    config.method = "lora-bp";
    config.codec.codec = v1::CODEC_INT8;
    config.steps = 6;
    config.seq_len = 32;
    config.rounds = 1;
    config.clients_per_round = 1;
    config.min_reports = 1;
    config.selection_window_s = 30;
    REQUIRE(config.Validate().ok());
    served = std::make_unique<testing::LoopbackCoordinator>(config, 0);
    coordinator = &served->coordinator();
  }

  std::string ClientJson(const std::string& device, const std::string& token, bool with_data_path) const {
    Json j = {{"host", "127.0.0.1"},
              {"port", served->port()},
              {"ca_file", JoinPath(certs, "ca.crt")},
              {"server_name", "localhost"},
              {"device_id", device},
              {"token", token},
              {"state_dir", JoinPath(dir.path, "client-" + device)},
              {"model_dir", model_dir},
              {"backoff_base_s", 0.01},
              {"backoff_max_s", 0.05},
              {"checkpoint_every", 0}};
    if (with_data_path) j["data_path"] = JoinPath(SEEDLING_SOURCE_DIR, "data/sample/instructions.jsonl");
    return j.dump();
  }
};

// The progress callback's user data: blocks the training thread after step `stop_at` until the other
// thread has called seedling_client_cancel.
struct CancelPoint {
  int64_t stop_at = 2;
  std::mutex mu;
  std::condition_variable cv;
  bool reached = false;
  bool cancelled = false;
  bool finished = false;       // run_once returned (without reaching stop_at, the canceller must not wait on)
  std::vector<int64_t> steps;  // training progress seen
};

extern "C" void OnProgress(const char* phase, int64_t done, int64_t, void* user) {
  auto* p = static_cast<CancelPoint*>(user);
  if (std::strcmp(phase, "training") != 0) return;
  std::unique_lock<std::mutex> lock(p->mu);
  p->steps.push_back(done);
  if (done != p->stop_at || p->cancelled) return;
  p->reached = true;
  p->cv.notify_all();
  p->cv.wait(lock, [&] { return p->cancelled; });
}

TEST_CASE("seedling_client_create returns NULL with the reason for a bad config", "[client][c_api]") {
  char err[256];
  const std::string base = R"("device_id": "d", "state_dir": "/tmp/seedling-capi-unused", "model_dir": "/nowhere")";
  CHECK(seedling_client_create(("{" + base + ", \"prot\": 1}").c_str(), err, sizeof err) == nullptr);
  CHECK_THAT(std::string(err), Catch::Contains("prot"));
  CHECK(seedling_client_create(("{" + base + ", \"max_attempts\": \"many\"}").c_str(), err, sizeof err) == nullptr);
  CHECK_THAT(std::string(err), Catch::Contains("max_attempts"));
  CHECK(seedling_client_create("{not json", err, sizeof err) == nullptr);
  CHECK_THAT(std::string(err), Catch::Contains("JSON"));
  CHECK(seedling_client_create(R"({"state_dir": "/tmp/x", "model_dir": "/m"})", err, sizeof err) == nullptr);
  CHECK_THAT(std::string(err), Catch::Contains("device_id"));
  CHECK(seedling_client_create(nullptr, err, sizeof err) == nullptr);
  CHECK_THAT(std::string(err), Catch::Contains("NULL"));
  // A short buffer gets a terminated prefix; no buffer is fine too.
  char small[8];
  std::memset(small, 'x', sizeof small);
  CHECK(seedling_client_create("{not json", small, sizeof small) == nullptr);
  CHECK(std::strlen(small) == sizeof small - 1);
  CHECK(seedling_client_create("{not json", nullptr, 0) == nullptr);
}

TEST_CASE("The C functions refuse a NULL client", "[client][c_api]") {
  seedling_run_result r;
  CHECK(seedling_client_run_once(nullptr, &r) == -1);
  CHECK(seedling_client_set_conditions(nullptr, 1, 1, 1, 1.0f) == -1);
  CHECK(seedling_client_add_example(nullptr, "{}") == -1);
  CHECK(seedling_client_set_data_path(nullptr, "/x") == -1);
  CHECK(std::string(seedling_client_last_error(nullptr)) == "client is NULL");
  seedling_client_set_progress(nullptr, OnProgress, nullptr);
  seedling_client_cancel(nullptr);
  seedling_client_destroy(nullptr);
}

TEST_CASE("A C client with a wrong token fails run_once with an UNAUTHENTICATED last error", "[client][c_api]") {
  TlsWorld w;
  REQUIRE(w.coordinator->RegisterDevice("dev0").ok());
  char err[256] = "";
  seedling_client* c = seedling_client_create(w.ClientJson("dev0", "wrong", true).c_str(), err, sizeof err);
  INFO(err);
  REQUIRE(c != nullptr);
  CHECK(std::string(seedling_client_last_error(c)).empty());
  seedling_run_result r;
  CHECK(seedling_client_run_once(c, &r) == -1);
  CHECK_THAT(std::string(seedling_client_last_error(c)), Catch::Contains("UNAUTHENTICATED"));
  // The next successful call clears it.
  CHECK(seedling_client_set_conditions(c, 1, 1, 1, 0.5f) == 0);
  CHECK(std::string(seedling_client_last_error(c)).empty());
  CHECK(seedling_client_run_once(c, nullptr) == -1);
  CHECK_THAT(std::string(seedling_client_last_error(c)), Catch::Contains("result is NULL"));
  seedling_client_destroy(c);
}

TEST_CASE("A C client trains on added examples, is cancelled from another thread, then resumes and uploads",
          "[client][c_api]") {
  TlsWorld w;
  auto token = w.coordinator->RegisterDevice("dev0");
  REQUIRE(token.ok());
  char err[256] = "";
  seedling_client* c = seedling_client_create(w.ClientJson("dev0", *token, false).c_str(), err, sizeof err);
  INFO(err);
  REQUIRE(c != nullptr);
  REQUIRE(seedling_client_set_conditions(c, 1, 1, 1, 0.9f) == 0);

  // The device's own examples, through the local example store.
  std::ifstream in(JoinPath(SEEDLING_SOURCE_DIR, "data/sample/instructions.jsonl"));
  std::string line;
  int added = 0;
  while (added < 120 && std::getline(in, line)) {
    REQUIRE(seedling_client_add_example(c, line.c_str()) == 0);
    ++added;
  }
  CHECK(seedling_client_add_example(c, "[\"not\", \"an object\"]") == -1);
  CHECK_THAT(std::string(seedling_client_last_error(c)), Catch::Contains("INVALID_ARGUMENT"));
  CHECK(seedling_client_add_example(c, nullptr) == -1);

  // The ticker opens the round; a check-in before that would only be told to retry later.
  for (int i = 0; i < 500 && !w.coordinator->Snapshot().current.has_value(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(w.coordinator->Snapshot().current.has_value());

  CancelPoint point;
  seedling_client_set_progress(c, OnProgress, &point);
  std::thread canceller([&] {
    std::unique_lock<std::mutex> lock(point.mu);
    point.cv.wait(lock, [&] { return point.reached || point.finished; });
    if (!point.reached) return;  // run_once ended without training to stop_at: the checks below fail
    seedling_client_cancel(c);
    point.cancelled = true;
    point.cv.notify_all();
  });
  seedling_run_result r;
  std::memset(&r, 0xff, sizeof r);
  const int rc = seedling_client_run_once(c, &r);
  {
    std::lock_guard<std::mutex> lock(point.mu);
    point.finished = true;
  }
  point.cv.notify_all();
  canceller.join();
  CHECK(point.reached);
  INFO(seedling_client_last_error(c));
  REQUIRE(rc == 0);
  CHECK(r.outcome == SEEDLING_OUTCOME_CANCELLED);
  CHECK(r.round_id == 1);

  // Run again: training continues after step 2 and the update is acknowledged.
  point.steps.clear();
  std::memset(&r, 0xff, sizeof r);
  REQUIRE(seedling_client_run_once(c, &r) == 0);
  CHECK(r.outcome == SEEDLING_OUTCOME_UPLOADED);
  CHECK(r.round_id == 1);
  CHECK(r.update_bytes > 0);
  CHECK(std::isfinite(r.loss_start));
  CHECK(std::isfinite(r.loss_end));
  REQUIRE_FALSE(point.steps.empty());
  CHECK(point.steps.front() == 3);
  CHECK(point.steps.back() == 6);
  for (int i = 0; i < 250 && w.coordinator->global_version() < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  CHECK(w.coordinator->global_version() == 1);
  seedling_client_destroy(c);
}

}  // namespace
}  // namespace seedling
