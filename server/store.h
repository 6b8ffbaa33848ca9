#pragma once

// The coordinator's durable state (docs/architecture.md, "The server"): one SQLite database (WAL, synchronous=FULL) in
// the state directory for devices, rounds, tasks, the accepted-update ledger, the seed-sum history and metadata; global
// checkpoints as safetensors files next to it, written temp → fsync → rename → fsync directory.
//
// Crash contract (what the coordinator builds on): every method that changes state commits one
// transaction before returning OK, so after a SIGKILL the database holds exactly the calls that returned.
// On open, RecoverAfterCrash() marks every round that was not Committed or Aborted as Aborted (its accepted
// updates stay in the ledger, flagged by the round's state), deletes checkpoint files no committed round
// refers to, and returns those rounds. The round counter never decreases.
//
// Lazy writes: TouchDevice and AddTask commit without waiting for the disk (SQLite synchronous=NORMAL for
// their transaction), because a session would otherwise wait for three fsyncs where one carries a promise.
// They survive process death like every write. Across a power loss they are durable once any later write
// commits (the WAL is written in order and a FULL commit syncs all of it), and losing them loses nothing
// promised: last-seen times are informational, and a round whose tasks were lost is aborted on restart anyway
// (devices holding its tasks are told so and check in again). Every other method syncs before returning.
//
// Thread-safety: all methods may be called from any thread; they serialize on one connection.
//
// One process at a time: Open takes an exclusive flock on <dir>/LOCK (released when the Store is destroyed or
// the process dies), because RecoverAfterCrash deletes files that a second live Store could be writing
// (OpenForDevices, for the device registry only, may open the database beside the lock holder). The
// lock descriptor is inherited by fork(): do not fork while a Store is open unless the child execs or exits.
//
// Errors: NotFound for a missing device / round / task / checkpoint, FailedPrecondition for a call the
// current state forbids (a transition, a version mismatch, a final round), AlreadyExists for a duplicate id
// or key, InvalidArgument for malformed arguments, DataLoss for a damaged checkpoint or database, Internal /
// ResourceExhausted / PermissionDenied for I/O. A method that returns an error changed nothing in the
// database (RecoverAfterCrash, which is idempotent, may have done part of its work; a failed WriteCheckpoint
// may leave an uncommitted file, which the next RecoverAfterCrash deletes).
// Messages name the file, round, task, device or key. No exception escapes.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "base/file.h"

namespace seedling::server {

enum class RoundState { kOpen, kCollecting, kAggregating, kCommitted, kAborted };
const char* RoundStateName(RoundState s);  // "open", "collecting", ...

struct DeviceRecord {
  std::string device_id;
  std::string token_sha256;  // hex SHA-256 of the bearer token (the token itself is never stored)
  int64_t created_ms = 0;
  int64_t last_seen_ms = 0;
  int64_t revoked_ms = 0;  // > 0: revoked then (`seedling devices revoke`); the device is refused at Hello
};

struct RoundRecord {
  uint64_t round_id = 0;
  RoundState state = RoundState::kOpen;
  std::string method;
  std::string config_json;      // the round's task template (hyper-parameters, codec, ...)
  uint64_t base_version = 0;    // global version clients start from
  uint64_t result_version = 0;  // version it produced (Committed), else 0
  int64_t target = 0;           // reports wanted
  int64_t min_reports = 0;      // fewer at the deadline: Aborted
  int64_t opened_ms = 0;
  int64_t deadline_ms = 0;
  int64_t closed_ms = 0;
  int64_t selected = 0;  // tasks handed out
  int64_t accepted = 0;  // updates in the ledger
  std::string abort_reason;
  std::string result_json;  // Committed: aggregate metrics (mean loss, bytes, ...)
  int64_t state_ms = 0;     // when the state last changed (creation, SetRoundState, commit, abort)
};

struct TaskRecord {
  std::string task_id;
  uint64_t round_id = 0;
  std::string device_id;
  int64_t assigned_ms = 0;
  std::string state = "assigned";  // "assigned", "declined", "uploaded"
  std::string detail;              // decline reason, ...
};

struct LedgerEntry {
  std::string idempotency_key;  // device + round + task
  uint64_t round_id = 0;
  std::string task_id;
  std::string device_id;
  uint64_t num_examples = 0;
  uint64_t bytes = 0;
  std::string sha256;  // hex of the encoded update
  int64_t accepted_ms = 0;
  std::string metrics_json;
};

// A checkpoint recorded in the database: a committed version, or the initial version 0.
struct CheckpointRecord {
  uint64_t version = 0;
  std::string path;    // <dir>/checkpoints/global-<version>.safetensors
  std::string sha256;  // hex SHA-256 of the file, as recorded when it was committed
};

// The differential-privacy cost of one committed round: `steps` steps of the Poisson-subsampled Gaussian
// at this sampling rate and noise multiplier (privacy/accountant.h composes them).
struct DpSpend {
  uint64_t round_id = 0;
  double sampling_rate = 0;
  double noise_multiplier = 0;
  int64_t steps = 1;
};

// One named fp32 vector of a checkpoint (the global adapter, optimizer moments, ...).
struct NamedVector {
  std::string name;
  std::vector<float> values;
};

// How the store reaches the disk: the defaults are what a server runs with; tests inject faults here.
struct StoreOptions {
  // Checkpoint files go through it: their writes, fsyncs and renames, and the deletions and directory fsync
  // of RecoverAfterCrash. Null: FileSystem::Default() (base/file.h). Must outlive the store.
  FileSystem* fs = nullptr;
  // Testing only; empty by default. Called right before each write transaction's COMMIT with the name of
  // the Store method that runs it ("CommitRound", "RecordAcceptedUpdates", ...) and the connection's
  // PRAGMA synchronous (2 = FULL, 1 = NORMAL). An error it returns fails the transaction as a failed COMMIT
  // would: everything rolls back and the method returns that error. SQLite's own writes and fsyncs do not
  // go through `fs` (that would take a SQLite VFS); this hook stands in for their failure.
  std::function<absl::Status(std::string_view transaction, int synchronous)> before_commit;
};

class Store {
 public:
  // Opens (creating if needed) <dir>/state.db and <dir>/checkpoints/. Failures name the file.
  // FailedPrecondition if another Store holds the directory, if state.db is not a Seedling database or
  // has a newer schema than this build understands; older schemas are migrated in one transaction.
  static absl::StatusOr<std::unique_ptr<Store>> Open(const std::string& dir, const StoreOptions& options = {});
  // For the device registry (`seedling devices add|list|rotate|revoke`), also while a server runs on `dir`: as Open
  // when no other process holds the directory; otherwise opens the existing database beside it without the
  // lock. SQLite's own locking orders the writes (a running server authenticates a new device at its next
  // Hello), and the methods that touch checkpoint files (RecoverAfterCrash, WriteCheckpoint, CommitRound)
  // are refused (FailedPrecondition). FailedPrecondition too if the running server's database has
  // another schema version than this build's (nothing is migrated under a live server).
  static absl::StatusOr<std::unique_ptr<Store>> OpenForDevices(const std::string& dir);
  ~Store();

  // Marks unfinished rounds Aborted with `reason` (closed_ms = now_ms), removes orphan checkpoint files
  // (global-<v>.safetensors with no recorded version) and leftover temporary files (*.tmp.*) in
  // checkpoints/; returns the rounds it aborted, oldest first. Idempotent. DataLoss if the current global
  // version's checkpoint file is missing. Call once after Open, before serving.
  absl::StatusOr<std::vector<RoundRecord>> RecoverAfterCrash(int64_t now_ms, const std::string& reason);

  // --- devices
  // AlreadyExists if the id is taken.
  absl::Status AddDevice(const DeviceRecord& device);
  absl::StatusOr<std::optional<DeviceRecord>> FindDevice(const std::string& device_id);
  absl::Status TouchDevice(const std::string& device_id, int64_t now_ms);
  absl::StatusOr<std::vector<DeviceRecord>> ListDevices();
  // Revokes a device for good: its token no longer authenticates (a connection already open keeps working
  // until it closes). Idempotent (the first revocation time stays); NotFound for an unknown device.
  absl::Status RevokeDevice(const std::string& device_id, int64_t now_ms);
  // Replaces a device's token hash (token rotation). InvalidArgument unless 64 hex digits, NotFound for an
  // unknown device, FailedPrecondition for a revoked one.
  absl::Status SetDeviceToken(const std::string& device_id, const std::string& token_sha256);

  // --- meta
  // Current committed global version (0 before any commit).
  absl::StatusOr<uint64_t> GlobalVersion();

  // --- rounds
  // Creates a round with the next id (greater than every id ever used, committed or not) in state Open.
  // Only method, config_json, base_version, target, min_reports, opened_ms and deadline_ms are taken from
  // `fields`; the rest start empty. InvalidArgument for a negative target / min_reports,
  // FailedPrecondition if base_version is newer than the global version.
  absl::StatusOr<RoundRecord> CreateRound(const RoundRecord& fields);
  absl::StatusOr<std::optional<RoundRecord>> FindRound(uint64_t round_id);
  // The newest round, if any.
  absl::StatusOr<std::optional<RoundRecord>> LatestRound();
  // Rounds newest first, at most `limit`.
  absl::StatusOr<std::vector<RoundRecord>> RecentRounds(int limit);
  // Open → Collecting → Aggregating (other transitions are FailedPrecondition).
  absl::Status SetRoundState(uint64_t round_id, RoundState state, int64_t now_ms);
  // NotFound for an unknown round, FailedPrecondition for a final one.
  absl::Status IncrementSelected(uint64_t round_id);
  // Aggregating → Committed in one transaction: the round gets `new_version` (which must be the current
  // global version + 1), the global version becomes `new_version`, the checkpoint (already written with
  // WriteCheckpoint for `new_version`) becomes the current one, and the seed sums (if any) are recorded.
  // The SHA-256 recorded for the checkpoint is computed from the file at commit time. With `dp`, the
  // round's privacy cost is recorded in the same transaction (round_id taken from the call).
  // FailedPrecondition for a wrong state or version or a missing checkpoint file; InvalidArgument for a
  // DP spend out of range.
  absl::Status CommitRound(uint64_t round_id, uint64_t new_version, int64_t now_ms, const std::string& result_json,
                           const std::string& seed_sums_blob = "", const std::optional<DpSpend>& dp = std::nullopt);
  // Every recorded DP spend, by round id ascending.
  absl::StatusOr<std::vector<DpSpend>> DpLedger();
  // Any non-final state → Aborted.
  absl::Status AbortRound(uint64_t round_id, int64_t now_ms, const std::string& reason);

  // --- tasks
  // Also increments the round's `selected`. A device has at most one task per round. NotFound for an
  // unknown round, FailedPrecondition for a final one, AlreadyExists for a taken task id or a device that
  // already has a task in the round, InvalidArgument for an unknown state.
  absl::Status AddTask(const TaskRecord& task);
  absl::StatusOr<std::optional<TaskRecord>> FindTask(const std::string& task_id);
  // The device's task in that round, if any.
  absl::StatusOr<std::optional<TaskRecord>> FindTaskFor(uint64_t round_id, const std::string& device_id);
  // "assigned" or "declined". Only RecordAcceptedUpdate makes a task "uploaded", and an uploaded task
  // keeps that state (so the ledger and the tasks always agree): setting "uploaded" on an uploaded task is
  // an OK no-op, any other change of or to "uploaded" is FailedPrecondition. NotFound for an unknown task.
  absl::Status SetTaskState(const std::string& task_id, const std::string& state, const std::string& detail = "");

  // --- ledger
  // Records an accepted update (and marks its task "uploaded", increments the round's `accepted`) in one
  // transaction. AlreadyExists if the key is in the ledger (the caller answers exact retries from
  // FindLedgerEntry), or if the task already has an update under another key. NotFound for an unknown
  // task or round, FailedPrecondition for a final round, InvalidArgument if the entry's device differs from
  // its task's or its round is neither the task's nor a later existing round. (A later round is how
  // [strategy] mode = "fedbuff" records an update: the task was issued while one buffer was open, its update
  // joined the buffer open when it arrived, and the entry names that buffer, the round that commits it.)
  absl::Status RecordAcceptedUpdate(const LedgerEntry& entry);
  // Group commit: records each entry as RecordAcceptedUpdate would, all in one transaction (one fsync), and
  // returns one status per entry. An entry its checks refuse changes nothing and the others are still
  // recorded; if the transaction itself fails, nothing is recorded and every entry not refused by its own
  // checks gets that error.
  std::vector<absl::Status> RecordAcceptedUpdates(std::span<const LedgerEntry> entries);
  absl::StatusOr<std::optional<LedgerEntry>> FindLedgerEntry(const std::string& idempotency_key);
  // In the order they were recorded.
  absl::StatusOr<std::vector<LedgerEntry>> LedgerForRound(uint64_t round_id);

  // --- seed-sum history (kseed): the blob each committed round recorded, for versions > since_version,
  // ascending.
  absl::StatusOr<std::vector<std::pair<uint64_t, std::string>>> SeedSumsSince(uint64_t since_version);

  // --- checkpoints
  // Writes <dir>/checkpoints/global-<version>.safetensors atomically (not yet current: CommitRound makes
  // it so). Returns the hex SHA-256 of the file. `version` must be the global version + 1 (rewriting an
  // uncommitted file is allowed), or 0 while the global version is 0: the initial model has no round to
  // commit it, so version 0 is recorded at once. FailedPrecondition for another version, AlreadyExists
  // for a recorded one (recorded checkpoints are immutable), InvalidArgument for empty or duplicate names.
  // The file write does not block the other methods.
  absl::StatusOr<std::string> WriteCheckpoint(uint64_t version, const std::vector<NamedVector>& vectors);
  // Reads the checkpoint of `version`, in the order it was written (zero-length vectors sharing an offset
  // come in name order). NotFound if there is no file; DataLoss if the file is malformed, not all 1-D F32,
  // or (for a recorded version) its SHA-256 differs from the recorded one.
  absl::StatusOr<std::vector<NamedVector>> ReadCheckpoint(uint64_t version);
  // The recorded checkpoint of `version` (committed, or the initial version 0), if any.
  absl::StatusOr<std::optional<CheckpointRecord>> FindCheckpoint(uint64_t version);

  // --- tests and operators
  // SHA-256 over every table's rows in a canonical order: equal before and after a call means the call
  // changed nothing durable.
  absl::StatusOr<std::string> Checksum();

 private:
  struct Impl;
  static absl::StatusOr<std::unique_ptr<Store>> OpenImpl(const std::string& dir, bool beside_owner,
                                                         const StoreOptions& options);
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace seedling::server
