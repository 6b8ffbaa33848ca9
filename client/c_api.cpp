// The C ABI of client/seedling_client.h over seedling::client::Client. No exception crosses it.

#include <cstring>
#include <exception>
#include <mutex>
#include <string>

#include "client/client.h"
#include "client/seedling_client.h"

struct seedling_client {
  std::unique_ptr<seedling::client::Client> client;
  mutable std::mutex mu;  // guards last_error
  std::string last_error;

  int Fail(const absl::Status& s) {
    std::lock_guard<std::mutex> lock(mu);
    last_error = s.ToString();
    return -1;
  }
  int Ok() {
    std::lock_guard<std::mutex> lock(mu);
    last_error.clear();
    return 0;
  }
};

namespace {

template <typename Fn>
int Guard(seedling_client* c, Fn fn) {
  if (c == nullptr) return -1;
  try {
    absl::Status s = fn();
    return s.ok() ? c->Ok() : c->Fail(s);
  } catch (const std::exception& e) {
    return c->Fail(absl::InternalError(e.what()));
  } catch (...) {
    return c->Fail(absl::InternalError("unknown error"));
  }
}

}  // namespace

extern "C" {

seedling_client* seedling_client_create(const char* config_json, char* err, size_t err_len) {
  auto fail = [&](const std::string& msg) -> seedling_client* {
    if (err != nullptr && err_len > 0) {
      const size_t n = std::min(msg.size(), err_len - 1);
      std::memcpy(err, msg.data(), n);
      err[n] = '\0';
    }
    return nullptr;
  };
  if (config_json == nullptr) return fail("config_json is NULL");
  try {
    auto config = seedling::client::ClientConfig::FromJson(config_json);
    if (!config.ok()) return fail(config.status().ToString());
    auto client = seedling::client::Client::Create(std::move(config).value());
    if (!client.ok()) return fail(client.status().ToString());
    auto* c = new seedling_client;
    c->client = std::move(client).value();
    return c;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

void seedling_client_destroy(seedling_client* client) { delete client; }

int seedling_client_set_conditions(seedling_client* client, int charging, int unmetered, int idle, float battery) {
  return Guard(client, [&] {
    client->client->SetConditions({charging != 0, unmetered != 0, idle != 0, battery});
    return absl::OkStatus();
  });
}

int seedling_client_set_data_path(seedling_client* client, const char* path) {
  return Guard(client, [&] {
    if (path == nullptr) return absl::InvalidArgumentError("path is NULL");
    return client->client->SetDataPath(path);
  });
}

int seedling_client_add_example(seedling_client* client, const char* json_row) {
  return Guard(client, [&] {
    if (json_row == nullptr) return absl::InvalidArgumentError("json_row is NULL");
    return client->client->AddExample(json_row);
  });
}

void seedling_client_set_progress(seedling_client* client, seedling_progress_fn fn, void* user) {
  if (client == nullptr) return;
  if (fn == nullptr) {
    client->client->SetProgressCallback(nullptr);
    return;
  }
  client->client->SetProgressCallback(
      [fn, user](const seedling::client::RunProgress& p) { fn(p.phase.c_str(), p.done, p.total, user); });
}

// The C outcome is the C++ one's value.
static_assert(SEEDLING_OUTCOME_UPLOADED == static_cast<int>(seedling::client::RunOutcome::kUploaded));
static_assert(SEEDLING_OUTCOME_RETRY_LATER == static_cast<int>(seedling::client::RunOutcome::kRetryLater));
static_assert(SEEDLING_OUTCOME_DECLINED == static_cast<int>(seedling::client::RunOutcome::kDeclined));
static_assert(SEEDLING_OUTCOME_CANCELLED == static_cast<int>(seedling::client::RunOutcome::kCancelled));
static_assert(SEEDLING_OUTCOME_DROPPED == static_cast<int>(seedling::client::RunOutcome::kDropped));

int seedling_client_run_once(seedling_client* client, seedling_run_result* result) {
  return Guard(client, [&] {
    if (result == nullptr) return absl::InvalidArgumentError("result is NULL");
    auto r = client->client->RunOnce();
    if (!r.ok()) return r.status();
    result->outcome = static_cast<seedling_outcome>(static_cast<int>(r->outcome));
    result->retry_after_seconds = r->retry_after_seconds;
    result->round_id = r->round_id;
    result->loss_start = r->loss_start;
    result->loss_end = r->loss_end;
    result->update_bytes = r->update_bytes;
    return absl::OkStatus();
  });
}

void seedling_client_cancel(seedling_client* client) {
  if (client != nullptr) client->client->Cancel();
}

const char* seedling_client_last_error(const seedling_client* client) {
  if (client == nullptr) return "client is NULL";
  std::lock_guard<std::mutex> lock(client->mu);
  return client->last_error.c_str();
}

}  // extern "C"
