#pragma once

// The coordinator (docs/architecture.md, "One round, end to end" and "The server"): authenticates devices, runs rounds
//   Open (handing out tasks, up to ceil(target × over_selection)) → Collecting (uploads until the target
//   or the deadline) → Aggregating → Committed | Aborted (fewer than min_reports by the deadline),
// validates and durably records uploads before acknowledging them, aggregates them with a Strategy as they
// arrive, and publishes the next global adapter as a checkpoint. Transport-agnostic: TLS and the in-memory
// transport both reach it through handler_factory(); time comes from a Clock so the simulator can drive it.
//
// Promises (tested in tests/server/): an acknowledged update is in a committed round or in a round marked
// aborted after a crash (whose devices are told to retry), never lost or counted twice; a rejected request
// changes nothing durable; the round counter only grows.
//
// The coordinator is the round loop (configure → collect → aggregate → commit) and its request handlers
// (coordinator.cpp); the connection handler (coordinator_handler.cpp) and the read-only views
// (coordinator_views.cpp) are in their own files, and it delegates to components that stand alone: device
// tokens (devices.h), uploads in progress (uploads.h), the strategy stack with its privacy wrappers
// (strategy_stack.h), the DP budget (dp_budget.h) and the SecAgg+ session (secagg_session.h).
//
// Thread-safety: every public method may be called from any thread (one mutex guards the state).

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "base/clock.h"
#include "comms/transport.h"
#include "server/config.h"
#include "server/dp_budget.h"
#include "server/http.h"
#include "server/metrics.h"
#include "server/secagg_session.h"
#include "server/store.h"
#include "server/strategy.h"
#include "server/uploads.h"

namespace seedling::server {

class Coordinator {
 public:
  // Opens the store in config.state_dir, aborts rounds a crash left unfinished, and loads the current
  // global model (or initializes it from the LoRA config and the base model's config.json). `clock` and
  // `metrics` must outlive the coordinator.
  static absl::StatusOr<std::unique_ptr<Coordinator>> Create(const ServerConfig& config, const Clock* clock,
                                                             Metrics* metrics);
  ~Coordinator();

  // Creates the protocol handler of one connection.
  comms::HandlerFactory handler_factory();

  // Advances the round state machine to the clock's time: opens a round when none is active, closes
  // selection, aggregates at the target or the deadline, aborts below min_reports. Call every tick_ms.
  void Tick();

  // True once `rounds` rounds (if > 0) have finished, or, with [privacy] dp, once the next round would exceed
  // target_epsilon (no active round either way).
  bool Finished();

  // With [privacy] dp: ε spent by the committed rounds at the configured δ (RDP accountant, Balle et al.
  // 2020 conversion), 0 before the first; NaN when DP is off. The simulator reports this.
  double dp_epsilon();

  // True when a check-in now could get a task: a round is open with room left in its selection, or none is
  // active and another will open. A hint for the simulator's placement, not a promise.
  bool Selecting();

  // Graceful shutdown (after the transport stopped): an active round is aborted ("server shut down"), so
  // its devices are told to retry when the server is back; nothing acknowledged is lost.
  void Shutdown();

  DashboardSnapshot Snapshot();
  absl::Status Health();

  // The committed global model (tests, tools).
  uint64_t global_version();
  std::vector<float> global_params();
  // The "params" vector of a committed version's checkpoint.
  absl::StatusOr<std::vector<float>> CheckpointParams(uint64_t version);
  // Registers a device in the coordinator's store and returns its token (tests, tools).
  absl::StatusOr<std::string> RegisterDevice(const std::string& device_id);
  // A round as recorded in the store (tests, tools).
  absl::StatusOr<std::optional<RoundRecord>> FindRound(uint64_t round_id);
  // Store::Checksum() of the live store: equal before and after a request means it changed nothing durable.
  absl::StatusOr<std::string> StoreChecksum();
  // [secagg] enabled: the active session's progress.
  SecAggProgress secagg_progress();

 private:
  class Handler;
  // What the active round has seen so far (its result in the store and the dashboard).
  struct RoundStats {
    int64_t rejected = 0;
    double loss_start_sum = 0, loss_end_sum = 0;
    int64_t loss_count = 0;
    int64_t processed_tokens = 0;  // as reported (each capped at kMaxReportedTokens)
    uint64_t bytes_up = 0, bytes_down = 0;
  };
  // A round's aggregate on its way to the store: the next model (checkpointed), the strategy's outcome, the
  // stamped seed sums and the DP price.
  struct PendingCommit {
    GlobalModel next;
    RoundOutcome outcome;
    std::string seed_blob;
    std::optional<DpBudget::Price> dp_price;
  };

  Coordinator(const ServerConfig& config, const Clock* clock, Metrics* metrics, std::unique_ptr<Store> store);

  // Request handling (called by Handler, without the lock held).
  v1::Envelope OnHello(const v1::Hello& hello, std::string* device_id);
  v1::Envelope OnCheckIn(const std::string& device_id, const v1::CheckIn& check_in);
  v1::Envelope OnDownload(const std::string& device_id, const v1::Download& download);
  v1::Envelope OnUploadBegin(const std::string& device_id, const v1::UploadBegin& begin);
  v1::Envelope OnUploadChunk(const std::string& device_id, const v1::UploadChunk& chunk);
  v1::Envelope OnUploadCommit(const std::string& device_id, const v1::UploadCommit& commit);
  v1::Envelope OnDecline(const std::string& device_id, const v1::Decline& decline);
  v1::Envelope OnSecAgg(const std::string& device_id, const v1::SecAggRequest& request);
  void CountRequest(const char* kind);
  DashboardRound ToDashboard(const RoundRecord& r);

  // With mu_ held.
  v1::Envelope RejectLocked(v1::RejectCode code, std::string message, const char* reason);
  v1::Envelope NoUploadLocked(const std::string& key, const char* message);
  v1::Task MakeTaskLocked(const RoundRecord& round, const TaskRecord& task);
  absl::Status OpenRoundLocked(int64_t now);
  // The round's steps from its last upload to the published model (FinishRoundLocked runs them in order).
  void FinishRoundLocked(int64_t now);
  absl::Status StartAggregatingLocked(int64_t now);
  absl::StatusOr<PendingCommit> AggregateLocked();
  absl::Status CommitLocked(const PendingCommit& p, int64_t now);
  void PublishLocked(PendingCommit p);
  void AbortRoundLocked(int64_t now, const std::string& reason);
  uint32_t RetrySecondsLocked();
  // [privacy] dp: q for the next round (devices registered now).
  absl::StatusOr<double> DpSamplingRateLocked();
  // [secagg] (with mu_ held): the session (server/secagg_session.h) starts when selection closes, with the
  // devices holding a task then; its last stage hands the unmasked sum to the strategy and commits the round.
  // Any failure aborts the round and releases nothing.
  void StartSecAggLocked(int64_t now);
  void CloseSecAggStageLocked(int64_t now);
  v1::Envelope SecAggEnvelopeLocked(v1::SecAggStage stage, const SecAggAnswer& answer, int64_t now);
  // `rounds` rounds have finished, or DP refuses the next one (with mu_ held).
  bool NoMoreRoundsLocked() const;
  void AbortSecAggLocked(int64_t now, v1::SecAggStage stage, const absl::Status& why);

  // Constant after construction.
  const ServerConfig config_;
  const Clock* const clock_;
  Metrics* const metrics_;  // may be null
  // Families registered once in metrics_ (null when metrics_ is).
  CounterFamily* requests_total_ = nullptr;
  CounterFamily* rejections_total_ = nullptr;
  CounterFamily* rounds_total_ = nullptr;
  CounterFamily* declines_total_ = nullptr;
  Counter* accepted_total_ = nullptr;
  Counter* tasks_total_ = nullptr;
  Gauge* global_version_gauge_ = nullptr;
  Gauge* connections_gauge_ = nullptr;
  Gauge* dp_epsilon_gauge_ = nullptr;  // only with [privacy] dp
  CounterFamily* secagg_aborts_total_ = nullptr;  // only with [secagg] enabled
  std::string model_id_;
  int64_t num_parameters_ = 0;

  std::mutex mu_;
  // Guarded by mu_.
  std::unique_ptr<Store> store_;
  std::unique_ptr<Strategy> strategy_;
  GlobalModel global_;
  std::string global_bytes_;   // params as little-endian fp32 (what Download serves)
  std::string global_sha256_;  // raw SHA-256 of global_bytes_
  std::optional<RoundRecord> round_;  // the active round (not Committed/Aborted), if any
  std::unique_ptr<RoundStats> stats_;
  Uploads uploads_;
  std::map<std::string, int64_t> rejected_by_reason_;
  int64_t finished_rounds_ = 0;
  uint64_t retry_counter_ = 0;
  absl::Status health_;
  int64_t connections_ = 0;
  // [privacy] dp only (guarded by mu_): the accountant composed from the store's ledger and the budget gate.
  std::optional<DpBudget> dp_budget_;
  // [secagg] only (guarded by mu_): each device's participant id in the active round (from its task), and
  // the session once selection closed.
  std::map<std::string, uint32_t> secagg_participants_;
  std::unique_ptr<SecAggSession> secagg_;
};

}  // namespace seedling::server
