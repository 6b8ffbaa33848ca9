#pragma once

// The coordinator (docs/architecture.md, "One round, end to end" and "The server"): authenticates devices, runs rounds
//   Open (handing out tasks, up to ceil(target × over_selection)) → Collecting (uploads until the target
//   or the deadline) → Aggregating → Committed | Aborted (fewer than min_reports by the deadline),
// validates and durably records uploads before acknowledging them, aggregates them with a Strategy as they
// arrive, and publishes the next global adapter as a checkpoint. Transport-agnostic: TLS and the in-memory
// transport both reach it through handler_factory(); time comes from a Clock so the simulator can drive it.
//
// With [strategy] mode = "fedbuff" (buffered asynchronous aggregation, coordinator_fedbuff.cpp) a round is one
// buffer: it stays Open with no selection window or deadline, any eligible device checking in gets a task while
// fewer than `concurrency` are out (each with its own deadline, round_deadline_s), a task trains from the version
// current when it was issued, and its update joins whichever buffer is open when it arrives, weighted by its
// staleness; the buffer_size-th accepted update closes the round (Aggregating → Committed, version + 1) and the
// next buffer opens at once. The promises below hold the same way: the ledger names the buffer an update joined.
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
// Thread-safety: every public method may be called from any thread. One mutex guards the state, but no
// fsync runs under it (docs/architecture.md, "The server"): an accepted upload's ledger entry is written by
// a group commit outside the lock (the upload is acknowledged once it is durable), and the end of a round
// marks the round aggregating under the lock, then aggregates, writes the checkpoint and commits without it,
// and takes it again to publish.

#include <cmath>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
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
  // `metrics` must outlive the coordinator. `store_options` says how the store reaches the disk (tests inject
  // faults there; its file system must outlive the coordinator).
  static absl::StatusOr<std::unique_ptr<Coordinator>> Create(const ServerConfig& config, const Clock* clock,
                                                             Metrics* metrics, const StoreOptions& store_options = {});
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
    int64_t processed_tokens = 0;  // as reported (each capped at kMaxReportedTokens by Uploads::Begin)
    uint64_t bytes_up = 0, bytes_down = 0;
    uint64_t staleness_sum = 0, staleness_max = 0;  // fedbuff: of the accepted updates
  };
  // A round on its way from its last upload to the store: what it had seen when it closed (copied under the
  // lock), then the next model (checkpointed), the strategy's outcome, the stamped seed sums and the DP price.
  struct PendingCommit {
    RoundRecord round;
    RoundStats stats;
    bool was_open = false;  // closed straight from Open (the store moves Open → Collecting → Aggregating)
    GlobalModel next;
    RoundOutcome outcome;
    std::string seed_blob;
    std::optional<DpBudget::Price> dp_price;
  };
  // An accepted upload waiting for its ledger entry to be durable (group commit in OnUploadCommit).
  struct LedgerWrite {
    LedgerEntry entry;
    v1::UpdateMetrics metrics;  // counted into the round's stats once the entry is durable
    uint64_t staleness = 0;     // fedbuff: τ of the update (into the round's stats too)
    absl::Status status;        // the store's answer, once done
    bool done = false;
  };
  // fedbuff: a task out (issued, and neither uploaded, declined, refused nor past its deadline).
  struct OutstandingTask {
    std::string device_id;
    uint64_t round_id = 0;      // the buffer open when it was issued (its upload key names it)
    uint64_t base_version = 0;  // the version it trains from
    int64_t deadline_ms = 0;    // assigned + round_deadline_s
  };
  // fedbuff: a global version older than the current one that tasks out still train from (Download serves it).
  struct ServedVersion {
    std::string bytes;   // params as little-endian fp32
    std::string sha256;  // raw SHA-256 of bytes
  };

  Coordinator(const ServerConfig& config, const Clock* clock, Metrics* metrics, std::unique_ptr<Store> store);

  // Request handling (called by Handler, without the lock held).
  v1::Envelope OnHello(const v1::Hello& hello, std::string* device_id) ABSL_LOCKS_EXCLUDED(mu_);
  v1::Envelope OnCheckIn(const std::string& device_id, const v1::CheckIn& check_in) ABSL_LOCKS_EXCLUDED(mu_);
  v1::Envelope OnDownload(const std::string& device_id, const v1::Download& download) ABSL_LOCKS_EXCLUDED(mu_);
  v1::Envelope OnUploadBegin(const std::string& device_id, const v1::UploadBegin& begin) ABSL_LOCKS_EXCLUDED(mu_);
  v1::Envelope OnUploadChunk(const std::string& device_id, const v1::UploadChunk& chunk) ABSL_LOCKS_EXCLUDED(mu_);
  v1::Envelope OnUploadCommit(const std::string& device_id, const v1::UploadCommit& commit) ABSL_LOCKS_EXCLUDED(mu_);
  v1::Envelope OnDecline(const std::string& device_id, const v1::Decline& decline) ABSL_LOCKS_EXCLUDED(mu_);
  v1::Envelope OnSecAgg(const std::string& device_id, const v1::SecAggRequest& request) ABSL_LOCKS_EXCLUDED(mu_);
  void CountRequest(const char* kind);
  DashboardRound ToDashboard(const RoundRecord& r);

  // With mu_ held.
  v1::Envelope RejectLocked(v1::RejectCode code, std::string message, const char* reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::Envelope NoUploadLocked(const std::string& key, const char* message) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::Task MakeTaskLocked(const RoundRecord& round, const TaskRecord& task) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::Envelope RetryLocked(const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // fedbuff (coordinator_fedbuff.cpp, with mu_ held). Check-in: the device's task out again, else a new task
  // in the open buffer when fewer than `concurrency` are out and the device has not had one in this buffer.
  v1::Envelope FedBuffCheckInLocked(const std::string& device_id, int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The refusal of an upload (UploadBegin or UploadCommit) of task `task_id`, or nullopt and its staleness τ
  // (flushes since its version) when the open buffer may take it. Waits (releasing mu_) while a flush runs:
  // the update then joins the next buffer. Refuses (Stale) a task no longer out, past its deadline or more
  // than max_staleness flushes old (forgetting it), and any upload when no buffer is open.
  std::optional<v1::Envelope> FedBuffUploadRefusalLocked(const std::string& device_id, uint64_t round_id,
                                                         const std::string& task_id, int64_t now, uint64_t* staleness)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Opens a buffer when none is active, forgets tasks past their deadline, drops silent uploads.
  void TickFedBuffLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ForgetTaskLocked(const std::string& task_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Around a flush's publication: keeps the outgoing version's bytes if tasks out train from it; afterwards
  // forgets tasks now over max_staleness, drops versions no task out trains from, and opens the next buffer.
  void BeforeFedBuffPublishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AfterFedBuffPublishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What Download serves for `version` (pointers into global_bytes_ / global_sha256_ or older_versions_,
  // valid until the next publication): the current version, an older one tasks out train from, or nullopt.
  struct ServedRef {
    const std::string* bytes;
    const std::string* sha256;
  };
  std::optional<ServedRef> ServedVersionLocked(uint64_t version) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The round loop (coordinator_rounds.cpp): Tick opens a round when none is active and the limits allow,
  // closes selection after its window, and finishes or aborts the round at its deadline.
  void OpenRoundIfAllowedLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status OpenRoundLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool SelectionDueLocked(int64_t now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TickRoundLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TickSecAggRoundLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // global_bytes_ and global_sha256_ from global_ (what Download serves).
  void ServeGlobalLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sets the DP gauges from dp_budget_ (after it is created and after each commit).
  void SetDpGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Group commit (LevelDB's writer queue): `w` joins the queue; whoever is at its front writes the entries of
  // every queued upload in one transaction with mu_ released, counts the durable ones into the round, and
  // wakes the others. Returns with w->done. A failed write aborts the round: its aggregate holds updates the
  // ledger does not.
  void WriteLedgerLocked(LedgerWrite* w, int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waits (releasing mu_) until no ledger write is queued or in flight.
  void WaitForLedgerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Aggregate → checkpoint → commit → publish the active round, unless another thread is already finishing
  // it. Marks the round aggregating (no upload joins it any more), waits for the ledger writes in flight,
  // then releases mu_ for the I/O (MarkAggregating, Aggregate, Commit) and takes it again to publish. A
  // failing step aborts the round; the published model changes only once the commit is durable. One finish
  // runs at a time (finishing_). The round may have ended when this returns, and any state read before
  // the call must be read again.
  void FinishRoundLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // FinishRoundLocked's steps without the lock: they touch only the store (thread-safe), the strategy (no
  // other thread uses it while the round is aggregating) and `p`.
  absl::Status MarkAggregating(const PendingCommit& p, int64_t now) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Aggregate(Strategy& strategy, PendingCommit& p) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Commit(const PendingCommit& p, int64_t now) ABSL_LOCKS_EXCLUDED(mu_);
  void PublishLocked(PendingCommit p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AbortRoundLocked(int64_t now, const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint32_t RetrySecondsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // [privacy] dp: q for the next round (devices registered now).
  absl::StatusOr<double> DpSamplingRateLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // [secagg] (with mu_ held): the session (server/secagg_session.h) starts when selection closes, with the
  // devices holding a task then; its last stage hands the unmasked sum to the strategy and commits the round.
  // Any failure aborts the round and releases nothing.
  void StartSecAggLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CloseSecAggStageLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::Envelope SecAggEnvelopeLocked(v1::SecAggStage stage, const SecAggAnswer& answer, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `rounds` rounds have finished, or DP refuses the next one (with mu_ held).
  bool NoMoreRoundsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AbortSecAggLocked(int64_t now, v1::SecAggStage stage, const absl::Status& why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

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
  Gauge* dp_epsilon_gauge_ = nullptr;             // only with [privacy] dp
  Gauge* dp_rho_gauge_ = nullptr;                 // only with [privacy] mechanism = "dp-ftrl"
  Gauge* dp_epsilon_1e10_gauge_ = nullptr;        // only with [privacy] mechanism = "dp-ftrl"
  CounterFamily* secagg_aborts_total_ = nullptr;  // only with [secagg] enabled
  std::string model_id_;
  int64_t num_parameters_ = 0;
  std::vector<int64_t> lora_layers_;  // the adapter's layers, as tasks carry them (empty = all)
  // Thread-safe itself, so used with or without mu_ (the I/O of a round's end and of group commits runs
  // without it).
  const std::unique_ptr<Store> store_;

  absl::Mutex mu_;
  // Signalled (SignalAll) when a ledger batch was written or a round's finish is over.
  absl::CondVar io_done_;
  // Guarded by mu_. While finishing_, the finishing thread uses strategy_ without the lock; nobody else
  // touches it then (the round is aggregating: no task, upload or decline reaches the strategy).
  std::unique_ptr<Strategy> strategy_ ABSL_GUARDED_BY(mu_);
  GlobalModel global_ ABSL_GUARDED_BY(mu_);
  std::string global_bytes_ ABSL_GUARDED_BY(mu_);          // params as little-endian fp32 (what Download serves)
  std::string global_sha256_ ABSL_GUARDED_BY(mu_);         // raw SHA-256 of global_bytes_
  std::optional<RoundRecord> round_ ABSL_GUARDED_BY(mu_);  // the active round (not Committed/Aborted), if any
  std::unique_ptr<RoundStats> stats_ ABSL_GUARDED_BY(mu_);
  // The active round takes no more uploads: it is aggregating, or its deadline is being acted on.
  bool round_closing_ ABSL_GUARDED_BY(mu_) = false;
  // A FinishRoundLocked is running (possibly without the lock): no second one starts, Tick leaves the round
  // alone, and Shutdown waits.
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  // Uploads whose ledger entries are being written (the front batch) or wait to be (group commit).
  std::deque<LedgerWrite*> ledger_queue_ ABSL_GUARDED_BY(mu_);
  Uploads uploads_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> rejected_by_reason_ ABSL_GUARDED_BY(mu_);
  int64_t finished_rounds_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t retry_counter_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status health_ ABSL_GUARDED_BY(mu_);
  int64_t connections_ ABSL_GUARDED_BY(mu_) = 0;
  // [privacy] dp only: the accountant composed from the store's ledger and the budget gate.
  std::optional<DpBudget> dp_budget_ ABSL_GUARDED_BY(mu_);
  // [privacy] mechanism = "dp-ftrl" only: each device's contributions to the current tree (selection refuses a
  // device at max_participations_per_tree).
  std::optional<TreeParticipation> tree_participation_ ABSL_GUARDED_BY(mu_);
  // [secagg] only: each device's participant id in the active round (from its task), and the session once
  // selection closed.
  std::map<std::string, uint32_t> secagg_participants_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<SecAggSession> secagg_ ABSL_GUARDED_BY(mu_);
  // [strategy] mode = "fedbuff" only: the tasks out, by task id, and each device's (one at a time); the
  // older versions they train from. In memory only: after a restart, uploads of earlier tasks are Stale.
  std::map<std::string, OutstandingTask> outstanding_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> task_of_device_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, ServedVersion> older_versions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace seedling::server
