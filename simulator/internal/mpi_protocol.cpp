// The simulator's MPI protocol: message encodings, the work-directory agreement and the device rank's side
// (simulator/internal/mpi_protocol.h).

#include "simulator/internal/mpi_protocol.h"

#include <bit>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

#include "base/bytes.h"
#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "simulator/internal/attack.h"
#include "simulator/internal/compute_slots.h"
#include "simulator/internal/sim_transport.h"

namespace seedling::simulator::internal {

nlohmann::json StatusJson(const absl::Status& st) {
  return {{"code", static_cast<int>(st.code())}, {"message", std::string(st.message())}};
}

absl::Status StatusFromJson(const nlohmann::json& j) {
  if (!j.is_object() || !j.contains("code") || !j["code"].is_number_integer()) {
    return absl::InternalError("malformed status from another rank");
  }
  return absl::Status(static_cast<absl::StatusCode>(j["code"].get<int>()), ToAbsl(j.value("message", std::string())));
}

std::string EncodeResult(const absl::StatusOr<client::RunResult>& r) {
  nlohmann::json j;
  if (!r.ok()) {
    j["status"] = StatusJson(r.status());
  } else {
    j = {{"outcome", static_cast<int>(r->outcome)},
         {"retry_after", r->retry_after_seconds},
         {"round_id", r->round_id},
         {"detail", r->detail},
         {"loss_start", r->loss_start},
         {"loss_end", r->loss_end},
         {"update_bytes", r->update_bytes},
         {"weights", r->weights}};
  }
  return std::string(1, kDone) + j.dump();
}

absl::StatusOr<client::RunResult> DecodeResult(std::string_view body) {
  const nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InternalError("malformed run result from another rank");
  if (j.contains("status")) return StatusFromJson(j["status"]);
  client::RunResult r;
  r.outcome = static_cast<client::RunOutcome>(j.value("outcome", 0));
  r.retry_after_seconds = j.value("retry_after", 0u);
  r.round_id = j.value("round_id", uint64_t{0});
  r.detail = j.value("detail", std::string());
  r.loss_start = j.value("loss_start", 0.0);
  r.loss_end = j.value("loss_end", 0.0);
  r.update_bytes = j.value("update_bytes", uint64_t{0});
  r.weights = j.value("weights", std::string());
  return r;
}

void PutDouble(std::string& out, double v) { AppendU64Le(out, std::bit_cast<uint64_t>(v)); }
double GetDouble(std::string_view in) { return std::bit_cast<double>(LoadU64Le(in)); }
// With several ranks: rank 0 announces its work directory and a token written there; every rank reports
// whether it sees the token. If all do, they share rank 0's directory (dynamic placement); otherwise each
// rank r > 0 works in <work_dir>/rank-<r> (static placement).
absl::StatusOr<WorkDir> AgreeWorkDir(const SimulationOptions& options, MpiRanks& ranks) {
  if (ranks.rank() == 0) {
    WorkDir wd = RankZeroWorkDir(options);
    SEEDLING_RETURN_IF_ERROR(MakeDirs(wd.path));
    const std::string token = StrCat(getpid(), "-", std::chrono::steady_clock::now().time_since_epoch().count());
    SEEDLING_RETURN_IF_ERROR(WriteFileAtomic(JoinPath(wd.path, "rank0.token"), token));
    const nlohmann::json j = {{"work_dir", wd.path}, {"token", token}};
    for (int r = 1; r < ranks.size(); ++r) ranks.Send(r, MpiRanks::kControlKey, std::string(1, kWorkDir) + j.dump());
    wd.shared = true;
    for (int r = 1; r < ranks.size(); ++r) {
      SEEDLING_ASSIGN_OR_RETURN(MpiRanks::Message m, ranks.Receive(MpiRanks::kControlKey, kRankTimeout));
      const nlohmann::json a =
          nlohmann::json::parse(m.payload.substr(std::min<size_t>(1, m.payload.size())), nullptr, false);
      if (m.payload.empty() || m.payload[0] != kSeesWorkDir || !a.is_object()) {
        return absl::InternalError(
            StrCat("unexpected message from rank ", m.source, " while agreeing on a work directory"));
      }
      wd.shared = wd.shared && a.value("sees", false);
    }
    return wd;
  }
  SEEDLING_ASSIGN_OR_RETURN(MpiRanks::Message m, ranks.Receive(MpiRanks::kControlKey, kRankTimeout));
  const nlohmann::json j =
      nlohmann::json::parse(m.payload.substr(std::min<size_t>(1, m.payload.size())), nullptr, false);
  if (m.payload.empty() || m.payload[0] != kWorkDir || !j.is_object() || !j.contains("work_dir")) {
    return absl::InternalError("unexpected message from rank 0 while agreeing on a work directory");
  }
  WorkDir wd;
  wd.path = j["work_dir"].get<std::string>();
  absl::StatusOr<std::string> seen = ReadFile(JoinPath(wd.path, "rank0.token"));
  wd.shared = options.mpi_placement == "auto" && seen.ok() && *seen == j.value("token", std::string());
  ranks.Send(0, MpiRanks::kControlKey,
             std::string(1, kSeesWorkDir) + nlohmann::json({{"rank", ranks.rank()}, {"sees", wd.shared}}).dump());
  if (!wd.shared) {
    WorkDir own = RankZeroWorkDir(options);
    own.path = JoinPath(own.path, StrCat("rank-", ranks.rank()));
    return own;
  }
  return wd;  // rank 0's: it removes it
}
// A rank other than 0: runs the clients of its devices when rank 0 starts them, until rank 0 says quit.
absl::Status RunDeviceRank(const World& world) {
  MpiRanks& ranks = *world.ranks;
  const SimulationOptions& options = *world.options;
  ComputeSlots slots(options.threads > 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency()));
  std::map<std::string, std::unique_ptr<RunAttackers>> run_attackers;  // by run label ([attack])
  std::map<int64_t, std::thread> threads;                              // by device: its latest activation
  std::set<std::string> methods_ready;
  absl::Status failure = absl::OkStatus();
  while (true) {
    absl::StatusOr<MpiRanks::Message> m = ranks.Receive(MpiRanks::kControlKey, kRankTimeout);
    if (!m.ok()) {
      if (m.status().code() == absl::StatusCode::kDeadlineExceeded) continue;  // rank 0 is busy (evaluating)
      failure = m.status();
      break;
    }
    const std::string& p = m->payload;
    if (!p.empty() && p[0] == kQuit) break;
    const nlohmann::json j =
        p.empty() || p[0] != kStart ? nlohmann::json() : nlohmann::json::parse(p.substr(1), nullptr, false);
    if (!j.is_object() || !j.contains("device") || !j.contains("method")) {
      failure = absl::InternalError("malformed control message from rank 0");
      break;
    }
    const int64_t d = j["device"].get<int64_t>();
    const std::string method = j["method"].get<std::string>();
    const std::string method_dir = JoinPath(world.work_dir, method);
    if (d < 0 || d >= world.population->size() || (!world.shared_work_dir && world.Owner(d) != ranks.rank())) {
      failure = absl::InternalError(StrCat("rank 0 started device ", d, ", which is not on rank ", ranks.rank()));
      break;
    }
    if (!world.shared_work_dir && methods_ready.insert(method).second) {  // shared: rank 0 made it
      std::error_code ec;
      std::filesystem::remove_all(method_dir, ec);
      std::filesystem::create_directories(JoinPath(method_dir, "devices"), ec);
      if (ec) {
        failure = absl::InternalError(StrCat("cannot create ", method_dir, ": ", ec.message()));
        break;
      }
    }
    client::Conditions c;
    c.charging = j.value("charging", false);
    c.unmetered = j.value("unmetered", false);
    c.idle = j.value("idle", false);
    c.battery = j.value("battery", 0.0);
    client::ClientConfig cc = DeviceClientConfig(world, method_dir, d, j.value("token", std::string()));
    if (auto it = threads.find(d); it != threads.end()) it->second.join();  // it reported its result already
    const double vt = j.value("vt", 0.0);
    auto attackers = run_attackers.find(method);
    if (attackers == run_attackers.end()) {
      attackers = run_attackers
                      .emplace(method, std::make_unique<RunAttackers>(*world.options, method, world.population->size(),
                                                                      method_dir))
                      .first;
    }
    const RunAttackers* hostile = attackers->second.get();
    threads[d] = std::thread([&world, &ranks, &slots, cc = std::move(cc), c, d, vt, hostile] {
      auto dev = std::make_shared<ForwardedDevice>();
      dev->ranks = &ranks;
      dev->device = d;
      dev->slots = &slots;
      dev->vt = vt;
      absl::StatusOr<client::RunResult> result = absl::UnknownError("not run");
      {
        ForwardedClock clock(dev);  // outlives the client
        absl::StatusOr<std::unique_ptr<client::Client>> client =
            client::Client::Create(cc, hostile->Wrap(d, std::make_unique<ForwardedTransport>(dev)), world.shared);
        if (!client.ok()) {
          result = client.status();
        } else {
          hostile->Arm(d, **client);
          (*client)->SetConditions(c);
          client::SimulationHooks hooks;
          hooks.clock = &clock;
          hooks.secagg_rounding_seed = cc.seed;
          (*client)->SetSimulationHooks(std::move(hooks));
          result = (*client)->RunOnce();
        }
      }                    // its connection is closed (and rank 0 told) before the result goes
      dev->ReleaseSlot();  // it failed while training
      ranks.Send(0, static_cast<uint64_t>(d), EncodeResult(result));
    });
  }
  for (auto& [d, t] : threads) t.join();
  return failure;
}

}  // namespace seedling::simulator::internal
