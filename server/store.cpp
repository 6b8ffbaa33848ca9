// The store's transactions (about 1,100 lines in one file for a reason): every method below runs through
// Store::Impl, whose two mutexes order checkpoint-file I/O against the database (checkpoint_mu before mu), and
// keeping that ordering private to one translation unit is worth more than shorter files. What stands alone
// lives apart: the SQLite handles and statement helpers (server/internal/sqlite.h), the schema, migrations and
// row readers (server/internal/store_schema.h), and the checkpoint file format
// (server/internal/checkpoint_file.h).

#include "server/store.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "base/check.h"
#include "base/file.h"
#include "base/sha256.h"
#include "base/status.h"
#include "base/strings.h"
#include "model/safetensors.h"
#include "server/internal/checkpoint_file.h"
#include "server/internal/sqlite.h"
#include "server/internal/store_schema.h"
#include "spdlog/spdlog.h"

namespace seedling::server {

namespace {

using namespace store_internal;  // NOLINT: the store's own building blocks (server/internal/)

// Long enough to ride out a checkpointing reader such as an operator's sqlite3 shell; short enough
// that a wedged lock surfaces as Unavailable instead of hanging a request.
constexpr int kBusyTimeoutMs = 5000;

// A file descriptor closed on destruction (the directory lock).
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~UniqueFd() { Reset(); }
  int get() const { return fd_; }

 private:
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd_ = -1;
};

// ---- SHA-256 of the store's contents (base/sha256.h), with the two encodings of a field

void HashU64(Sha256Hasher& sha, uint64_t v) {
  unsigned char b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(v >> (8 * i));
  sha.Update(b, sizeof(b));
}

// Length-prefixed, so concatenations of fields cannot collide.
void HashField(Sha256Hasher& sha, std::string_view s) {
  HashU64(sha, s.size());
  sha.Update(s);
}

bool IsHexSha256(std::string_view s) {
  return s.size() == 64 &&
         std::all_of(s.begin(), s.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); });
}

}  // namespace

const char* RoundStateName(RoundState s) {
  switch (s) {
    case RoundState::kOpen:
      return "open";
    case RoundState::kCollecting:
      return "collecting";
    case RoundState::kAggregating:
      return "aggregating";
    case RoundState::kCommitted:
      return "committed";
    case RoundState::kAborted:
      return "aborted";
  }
  return "unknown";
}

// ---- Impl

// How a write transaction reaches the disk (store.h, "Lazy writes").
enum class Sync { kFull, kLazy };

struct Store::Impl {
  // Constant after construction.
  std::string dir;
  std::string db_path;
  std::string checkpoint_dir;
  UniqueFd lock_fd;   // holds flock(LOCK_EX) on <dir>/LOCK for the Store's lifetime
  bool owner = true;  // false: opened by OpenForDevices beside the process that holds the lock
  StoreOptions options;
  FileSystem* fs = nullptr;  // options.fs, or the default

  // Serializes everything that writes, hashes-for-commit or deletes checkpoint files
  // (WriteCheckpoint, CommitRound, RecoverAfterCrash), so a file cannot be replaced between its
  // commit-time hash and the commit, and a checkpoint write does not hold `mu` (the database stays
  // available while a large file is written). Acquired before `mu`.
  absl::Mutex checkpoint_mu ABSL_ACQUIRED_BEFORE(mu);

  absl::Mutex mu;
  // `statements` is declared after `db` so the statements are finalized first.
  DbPtr db ABSL_GUARDED_BY(mu);
  std::unordered_map<std::string, StmtPtr> statements ABSL_GUARDED_BY(mu);  // by SQL text

  std::string CheckpointPath(uint64_t version) const { return JoinPath(checkpoint_dir, CheckpointFileName(version)); }
  static std::string CheckpointRelativePath(uint64_t version) {
    return JoinPath("checkpoints", CheckpointFileName(version));
  }

  // A cached prepared statement, ready to bind. Requires mu: asserted rather than annotated, because the
  // bodies of Write's transactions (lambdas, which the thread-safety analysis sees as separate functions)
  // reach it, and every helper below that says "Requires mu" goes through it.
  absl::StatusOr<Query> Sql(const std::string& sql) {
    mu.AssertHeld();
    auto it = statements.find(sql);
    if (it == statements.end()) {
      sqlite3_stmt* raw = nullptr;
      const int rc = sqlite3_prepare_v3(db.get(), sql.c_str(), static_cast<int>(sql.size() + 1),
                                        SQLITE_PREPARE_PERSISTENT, &raw, nullptr);
      StmtPtr stmt(raw);
      if (rc != SQLITE_OK) return SqliteStatus(db.get(), rc, db_path, StrCat("cannot prepare '", sql, "'"));
      it = statements.emplace(sql, std::move(stmt)).first;
    }
    return Query(db.get(), it->second.get(), db_path);
  }

  absl::Status Exec(const std::string& sql) {
    SEEDLING_ASSIGN_OR_RETURN(Query q, Sql(sql));
    return q.Run();
  }

  // Runs `body` in one write transaction named `what` (the Store method, for StoreOptions::before_commit):
  // BEGIN IMMEDIATE takes the write lock up front, so a body that reads then writes cannot be refused
  // half-way by another writer; any error rolls everything back. Requires mu. Sync::kLazy commits without
  // waiting for the disk (store.h, "Lazy writes").
  template <typename Body>
  absl::Status Write(const char* what, Body&& body, Sync sync = Sync::kFull) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (sync == Sync::kLazy) {
      SEEDLING_RETURN_IF_ERROR(Exec("PRAGMA synchronous = NORMAL"));
      absl::Status st = Write(what, std::forward<Body>(body));
      absl::Status full = Exec("PRAGMA synchronous = FULL");
      return st.ok() ? full : st;
    }
    SEEDLING_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
    absl::Status st = body();
    if (st.ok() && options.before_commit) st = BeforeCommit(what);
    if (st.ok()) {
      st = Exec("COMMIT");
      if (st.ok()) return st;
    }
    // After some failures (e.g. a full disk) SQLite has already rolled back; ROLLBACK would then
    // fail.
    if (sqlite3_get_autocommit(db.get()) == 0) {
      absl::Status rb = Exec("ROLLBACK");
      if (!rb.ok()) spdlog::error("{}", std::string(rb.message()));
    }
    return st;
  }

  // StoreOptions::before_commit with the connection's synchronous setting. Requires mu.
  absl::Status BeforeCommit(const char* what) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("PRAGMA synchronous"));
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    const int synchronous = row ? static_cast<int>(q.Int(0)) : -1;
    return options.before_commit(what, synchronous);
  }

  // ---- reads (require mu) ----

  struct Meta {
    uint64_t global_version = 0;
    uint64_t last_round_id = 0;
  };
  absl::StatusOr<Meta> LoadMeta() {
    SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("SELECT global_version, last_round_id FROM meta WHERE id = 1"));
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) return absl::DataLossError(StrCat("state database '", db_path, "' has no meta row"));
    return Meta{q.UInt(0), q.UInt(1)};
  }

  absl::StatusOr<std::optional<RoundRecord>> LoadRound(uint64_t round_id) {
    SEEDLING_ASSIGN_OR_RETURN(Query q, Sql(StrCat("SELECT ", kRoundColumns, " FROM rounds WHERE round_id = ?")));
    q.Bind(round_id);
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) return std::optional<RoundRecord>();
    SEEDLING_ASSIGN_OR_RETURN(RoundRecord r, ReadRound(q));
    return std::optional<RoundRecord>(std::move(r));
  }

  absl::StatusOr<RoundRecord> RequireRound(uint64_t round_id) {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<RoundRecord> r, LoadRound(round_id));
    if (!r) return absl::NotFoundError(StrCat("round ", round_id, " does not exist"));
    return *std::move(r);
  }

  // A round that may still take tasks and updates.
  absl::StatusOr<RoundRecord> RequireLiveRound(uint64_t round_id, std::string_view action) {
    SEEDLING_ASSIGN_OR_RETURN(RoundRecord r, RequireRound(round_id));
    if (IsFinal(r.state)) {
      return absl::FailedPreconditionError(
          StrCat("round ", round_id, " is ", RoundStateName(r.state), ": cannot ", action));
    }
    return r;
  }

  absl::StatusOr<std::vector<RoundRecord>> LoadRounds(const std::string& sql, std::optional<int64_t> arg) {
    SEEDLING_ASSIGN_OR_RETURN(Query q, Sql(sql));
    if (arg) q.Bind(*arg);
    std::vector<RoundRecord> out;
    while (true) {
      SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
      if (!row) break;
      SEEDLING_ASSIGN_OR_RETURN(RoundRecord r, ReadRound(q));
      out.push_back(std::move(r));
    }
    return out;
  }

  absl::StatusOr<std::optional<DeviceRecord>> LoadDevice(const std::string& device_id) {
    SEEDLING_ASSIGN_OR_RETURN(Query q, Sql(StrCat("SELECT ", kDeviceColumns, " FROM devices WHERE device_id = ?")));
    q.Bind(device_id);
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) return std::optional<DeviceRecord>();
    return std::optional<DeviceRecord>(ReadDevice(q));
  }

  absl::StatusOr<std::optional<TaskRecord>> LoadTask(const std::string& task_id) {
    SEEDLING_ASSIGN_OR_RETURN(Query q, Sql(StrCat("SELECT ", kTaskColumns, " FROM tasks WHERE task_id = ?")));
    q.Bind(task_id);
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) return std::optional<TaskRecord>();
    return std::optional<TaskRecord>(ReadTask(q));
  }

  absl::StatusOr<std::optional<LedgerEntry>> LoadLedger(const std::string& key) {
    SEEDLING_ASSIGN_OR_RETURN(Query q,
                              Sql(StrCat("SELECT ", kLedgerColumns, " FROM ledger WHERE idempotency_key = ?")));
    q.Bind(key);
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) return std::optional<LedgerEntry>();
    return std::optional<LedgerEntry>(ReadLedger(q));
  }

  absl::StatusOr<std::optional<CheckpointRecord>> LoadCheckpoint(uint64_t version) {
    SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("SELECT file, sha256 FROM checkpoints WHERE version = ?"));
    q.Bind(version);
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) return std::optional<CheckpointRecord>();
    return std::optional<CheckpointRecord>(CheckpointRecord{version, JoinPath(dir, q.Text(0)), q.Text(1)});
  }

  // The checks and rows of one accepted update (Store::RecordAcceptedUpdates), inside a transaction.
  // Requires mu.
  absl::Status InsertLedgerEntry(const LedgerEntry& entry) {
    const std::string& key = entry.idempotency_key;
    SEEDLING_ASSIGN_OR_RETURN(std::optional<LedgerEntry> existing, LoadLedger(key));
    if (existing) {
      return absl::AlreadyExistsError(
          StrCat("update '", key, "' is already in the ledger (round ", existing->round_id, ")"));
    }
    SEEDLING_ASSIGN_OR_RETURN(std::optional<TaskRecord> task, LoadTask(entry.task_id));
    if (!task) return absl::NotFoundError(StrCat("update '", key, "': task '", entry.task_id, "' does not exist"));
    // A later round than the task's is the buffer a fedbuff task's update joined (Store::RecordAcceptedUpdate).
    bool later_round = false;
    if (task->round_id < entry.round_id) {
      SEEDLING_ASSIGN_OR_RETURN(std::optional<RoundRecord> round, LoadRound(entry.round_id));
      later_round = round.has_value();
    }
    if ((task->round_id != entry.round_id && !later_round) || task->device_id != entry.device_id) {
      return absl::InvalidArgumentError(StrCat("update '", key, "' claims round ", entry.round_id, " and device '",
                                               entry.device_id, "', but task '", entry.task_id, "' is round ",
                                               task->round_id, " for device '", task->device_id, "'"));
    }
    if (task->state == "uploaded") {
      return absl::AlreadyExistsError(
          StrCat("update '", key, "': task '", entry.task_id, "' already has an update in the ledger"));
    }
    SEEDLING_RETURN_IF_ERROR(RequireLiveRound(entry.round_id, StrCat("accept update '", key, "'")));
    {
      SEEDLING_ASSIGN_OR_RETURN(
          Query q, Sql(StrCat("INSERT INTO ledger (", kLedgerColumns, ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")));
      q.Bind(key)
          .Bind(entry.round_id)
          .Bind(entry.task_id)
          .Bind(entry.device_id)
          .Bind(entry.num_examples)
          .Bind(entry.bytes)
          .Bind(entry.sha256)
          .Bind(entry.accepted_ms)
          .Bind(entry.metrics_json);
      SEEDLING_RETURN_IF_ERROR(q.Run());
    }
    {
      SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("UPDATE tasks SET state = 'uploaded' WHERE task_id = ?"));
      q.Bind(entry.task_id);
      SEEDLING_RETURN_IF_ERROR(q.Run());
    }
    SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("UPDATE rounds SET accepted = accepted + 1 WHERE round_id = ?"));
    q.Bind(entry.round_id);
    return q.Run();
  }

  // ---- opening ----

  absl::Status Configure() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    sqlite3_extended_result_codes(db.get(), 1);
    sqlite3_busy_timeout(db.get(), kBusyTimeoutMs);
    {
      SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("PRAGMA journal_mode = WAL"));
      SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
      const std::string mode = row ? q.Text(0) : "";
      if (mode != "wal") {
        return absl::FailedPreconditionError(
            StrCat("state database '", db_path, "': cannot enable WAL journaling (got '", mode, "')"));
      }
    }
    // FULL: a transaction is on disk (WAL fsynced) when COMMIT returns, which the crash contract
    // needs across power loss, not only process death.
    SEEDLING_RETURN_IF_ERROR(Exec("PRAGMA synchronous = FULL"));
    SEEDLING_RETURN_IF_ERROR(Exec("PRAGMA foreign_keys = ON"));
    {
      // Both pragmas are silently ignored by builds without the feature: check they took.
      SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("SELECT * FROM pragma_synchronous, pragma_foreign_keys"));
      SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
      if (!row || q.Int(0) != 2 || q.Int(1) != 1) {
        return absl::FailedPreconditionError(
            StrCat("state database '", db_path, "': SQLite refused synchronous=FULL or foreign_keys=ON"));
      }
    }
    return absl::OkStatus();
  }

  // Creates or migrates the schema in one transaction; refuses foreign and newer databases. With
  // `may_change` false (beside a running owner), refuses any schema but the current one instead.
  absl::Status Migrate(bool may_change = true) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return Write("Migrate", [&]() -> absl::Status {
      int64_t app_id = 0;
      {
        SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("PRAGMA application_id"));
        SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
        if (row) app_id = q.Int(0);
      }
      bool has_version_table = false;
      int64_t other_tables = 0;
      {
        SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("SELECT name FROM sqlite_schema WHERE type = "
                                               "'table' AND name NOT LIKE 'sqlite_%'"));
        while (true) {
          SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
          if (!row) break;
          if (q.Text(0) == "schema_version") {
            has_version_table = true;
          } else {
            ++other_tables;
          }
        }
      }
      const bool fresh = app_id == 0 && !has_version_table && other_tables == 0;
      if (!fresh && (app_id != kApplicationId || !has_version_table)) {
        return absl::FailedPreconditionError(StrCat("'", db_path, "' is not a Seedling state database"));
      }
      int64_t version = 0;
      if (has_version_table) {
        SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("SELECT version FROM schema_version WHERE id = 1"));
        SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
        if (!row) return absl::DataLossError(StrCat("state database '", db_path, "' has no schema version"));
        version = q.Int(0);
      }
      if (version > kSchemaVersion) {
        return absl::FailedPreconditionError(StrCat("state database '", db_path, "' has schema version ", version,
                                                    "; this build understands up to ", kSchemaVersion,
                                                    " (was it written by a newer Seedling?)"));
      }
      if (version < 0) {
        return absl::DataLossError(StrCat("state database '", db_path, "' has schema version ", version));
      }
      if (!may_change && version != kSchemaVersion) {
        return absl::FailedPreconditionError(StrCat("state database '", db_path, "' has schema version ", version,
                                                    " and is in use by a server; this "
                                                    "build's version is ",
                                                    kSchemaVersion,
                                                    ": stop the server (or use its own seedling) first"));
      }
      for (int64_t v = version; v < kSchemaVersion; ++v) {
        // DDL runs once per database, so it goes through sqlite3_exec rather than the statement
        // cache.
        char* err = nullptr;
        mu.AssertHeld();  // inside Write's body (see Sql)
        const int rc = sqlite3_exec(db.get(), Migrations()[v], nullptr, nullptr, &err);
        const std::string detail = err != nullptr ? err : "";
        sqlite3_free(err);
        if (rc != SQLITE_OK) {
          return SqliteStatus(db.get(), rc, db_path,
                              StrCat("cannot migrate schema from version ", v, " to ", v + 1, ": ", detail));
        }
      }
      if (version < kSchemaVersion) {
        SEEDLING_RETURN_IF_ERROR(Exec(StrCat("PRAGMA application_id = ", kApplicationId)));
        SEEDLING_ASSIGN_OR_RETURN(Query q, Sql("INSERT OR REPLACE INTO schema_version (id, version) VALUES (1, ?)"));
        q.Bind(kSchemaVersion);
        SEEDLING_RETURN_IF_ERROR(q.Run());
      }
      return absl::OkStatus();
    });
  }
};

// ---- Store

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() = default;

absl::StatusOr<std::unique_ptr<Store>> Store::Open(const std::string& dir, const StoreOptions& options) {
  return OpenImpl(dir, false, options);
}

absl::StatusOr<std::unique_ptr<Store>> Store::OpenForDevices(const std::string& dir) {
  return OpenImpl(dir, true, StoreOptions());
}

absl::StatusOr<std::unique_ptr<Store>> Store::OpenImpl(const std::string& dir, bool beside_owner,
                                                       const StoreOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->fs = options.fs != nullptr ? options.fs : FileSystem::Default();
  impl->dir = dir;
  impl->db_path = JoinPath(dir, "state.db");
  impl->checkpoint_dir = JoinPath(dir, "checkpoints");
  SEEDLING_RETURN_IF_ERROR(MakeDirs(dir));
  SEEDLING_RETURN_IF_ERROR(MakeDirs(impl->checkpoint_dir));

  const std::string lock_path = JoinPath(dir, "LOCK");
  impl->lock_fd = UniqueFd(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (impl->lock_fd.get() < 0) return ErrnoStatus(errno, "cannot open lock file", lock_path);
  // flock, not fcntl: flock locks belong to the open file description, so a second Store in the
  // same process conflicts too.
  while (::flock(impl->lock_fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK) {
      if (beside_owner) {
        impl->lock_fd = UniqueFd();
        impl->owner = false;
        break;
      }
      return absl::FailedPreconditionError(
          StrCat("state directory '", dir, "' is in use by another Store (lock '", lock_path, "' is held)"));
    }
    return ErrnoStatus(errno, "cannot lock", lock_path);
  }

  sqlite3* raw = nullptr;
  // NOMUTEX: `mu` already serializes every use of the connection. Beside a running owner, the database
  // must already exist.
  const int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | (impl->owner ? SQLITE_OPEN_CREATE : 0);
  const int rc = sqlite3_open_v2(impl->db_path.c_str(), &raw, flags, nullptr);
  {
    absl::MutexLock lock(&impl->mu);
    impl->db.reset(raw);  // sqlite3_open_v2 allocates a handle even when it fails
    if (rc != SQLITE_OK) return SqliteStatus(impl->db.get(), rc, impl->db_path, "cannot open");
    SEEDLING_RETURN_IF_ERROR(impl->Configure());
    SEEDLING_RETURN_IF_ERROR(impl->Migrate(/*may_change=*/impl->owner));
  }
  return std::unique_ptr<Store>(new Store(std::move(impl)));
}

namespace {
absl::Status RefuseBesideOwner(const std::string& dir, const char* what) {
  return absl::FailedPreconditionError(StrCat(what, ": the state directory '", dir,
                                              "' is held by a running server; this Store was opened for the "
                                              "device registry only"));
}
}  // namespace

absl::StatusOr<std::vector<RoundRecord>> Store::RecoverAfterCrash(int64_t now_ms, const std::string& reason) {
  Impl& im = *impl_;
  if (!im.owner) return RefuseBesideOwner(im.dir, "RecoverAfterCrash");
  absl::MutexLock ck(&im.checkpoint_mu);
  absl::MutexLock lock(&im.mu);

  // Without the current model the server cannot serve: say so before changing anything.
  SEEDLING_ASSIGN_OR_RETURN(Impl::Meta meta, im.LoadMeta());
  std::set<uint64_t> recorded;
  {
    SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("SELECT version FROM checkpoints ORDER BY version"));
    while (true) {
      SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
      if (!row) break;
      recorded.insert(q.UInt(0));
    }
  }
  if (recorded.count(meta.global_version) != 0 && !FileExists(im.CheckpointPath(meta.global_version))) {
    return absl::DataLossError(StrCat("the checkpoint of the current global version ", meta.global_version, " ('",
                                      im.CheckpointPath(meta.global_version), "') is missing"));
  }

  std::vector<RoundRecord> aborted;
  SEEDLING_RETURN_IF_ERROR(im.Write("RecoverAfterCrash", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(
        aborted, im.LoadRounds(StrCat("SELECT ", kRoundColumns,
                                      " FROM rounds WHERE state NOT IN ('committed', 'aborted') ORDER BY round_id"),
                               std::nullopt));
    for (RoundRecord& r : aborted) {
      SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE rounds SET state = 'aborted', closed_ms = ?, state_ms = ?, "
                                                "abort_reason = ? WHERE round_id = ?"));
      q.Bind(now_ms).Bind(now_ms).Bind(reason).Bind(r.round_id);
      SEEDLING_RETURN_IF_ERROR(q.Run());
      r.state = RoundState::kAborted;
      r.closed_ms = now_ms;
      r.state_ms = now_ms;
      r.abort_reason = reason;
    }
    return absl::OkStatus();
  }));

  // A checkpoint file no version refers to was written by a round that never committed (the process
  // died between WriteCheckpoint and CommitRound); temporaries are writes that never finished. The
  // directory lock guarantees no live writer owns either.
  std::error_code ec;
  std::filesystem::directory_iterator it(im.checkpoint_dir, ec);
  if (ec) return ErrnoStatus(ec.value(), "cannot list", im.checkpoint_dir);
  std::vector<std::string> doomed;
  for (; it != std::filesystem::directory_iterator(); it.increment(ec)) {
    if (ec) return ErrnoStatus(ec.value(), "cannot list", im.checkpoint_dir);
    const std::string name = it->path().filename().string();
    const std::optional<uint64_t> version = ParseCheckpointFileName(name);
    if (name.find(".tmp.") != std::string::npos || (version && recorded.count(*version) == 0)) {
      doomed.push_back(it->path().string());
    }
  }
  if (ec) return ErrnoStatus(ec.value(), "cannot list", im.checkpoint_dir);
  for (const std::string& path : doomed) {
    if (absl::Status st = im.fs->Remove(path); !st.ok() && st.code() != absl::StatusCode::kNotFound) return st;
    spdlog::warn("store: deleted '{}', left by an interrupted checkpoint write or commit", path);
  }
  if (!doomed.empty()) SEEDLING_RETURN_IF_ERROR(im.fs->SyncDirectory(im.checkpoint_dir));
  return aborted;
}

// ---- devices

absl::Status Store::AddDevice(const DeviceRecord& device) {
  if (device.device_id.empty()) return absl::InvalidArgumentError("a device id cannot be empty");
  // Guards against a caller passing the bearer token itself; the message must not echo the value.
  if (!IsHexSha256(device.token_sha256)) {
    return absl::InvalidArgumentError(StrCat("token_sha256 of device '", device.device_id,
                                             "' must be 64 hex digits (the SHA-256 of the token, never the token)"));
  }
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  return im.Write("AddDevice", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<DeviceRecord> existing, im.LoadDevice(device.device_id));
    if (existing) return absl::AlreadyExistsError(StrCat("device '", device.device_id, "' already exists"));
    SEEDLING_ASSIGN_OR_RETURN(Query q,
                              im.Sql(StrCat("INSERT INTO devices (", kDeviceColumns, ") VALUES (?, ?, ?, ?, ?)")));
    q.Bind(device.device_id)
        .Bind(device.token_sha256)
        .Bind(device.created_ms)
        .Bind(device.last_seen_ms)
        .Bind(device.revoked_ms);
    return q.Run();
  });
}

absl::StatusOr<std::optional<DeviceRecord>> Store::FindDevice(const std::string& device_id) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->LoadDevice(device_id);
}

absl::Status Store::TouchDevice(const std::string& device_id, int64_t now_ms) {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  return im.Write(
      "TouchDevice",
      [&]() -> absl::Status {
        SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE devices SET last_seen_ms = ? WHERE device_id = ?"));
        q.Bind(now_ms).Bind(device_id);
        SEEDLING_RETURN_IF_ERROR(q.Run());
        if (q.Changes() == 0) return absl::NotFoundError(StrCat("device '", device_id, "' does not exist"));
        return absl::OkStatus();
      },
      Sync::kLazy);
}

absl::Status Store::RevokeDevice(const std::string& device_id, int64_t now_ms) {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  return im.Write("RevokeDevice", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<DeviceRecord> existing, im.LoadDevice(device_id));
    if (!existing) return absl::NotFoundError(StrCat("device '", device_id, "' does not exist"));
    if (existing->revoked_ms != 0) return absl::OkStatus();  // already revoked: keep the first time
    SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE devices SET revoked_ms = ? WHERE device_id = ?"));
    q.Bind(std::max<int64_t>(1, now_ms)).Bind(device_id);
    return q.Run();
  });
}

absl::Status Store::SetDeviceToken(const std::string& device_id, const std::string& token_sha256) {
  if (!IsHexSha256(token_sha256)) {
    return absl::InvalidArgumentError(StrCat("the new token_sha256 of device '", device_id,
                                             "' must be 64 hex digits (the SHA-256 of the token, never the token)"));
  }
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  return im.Write("SetDeviceToken", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<DeviceRecord> existing, im.LoadDevice(device_id));
    if (!existing) return absl::NotFoundError(StrCat("device '", device_id, "' does not exist"));
    if (existing->revoked_ms != 0) {
      return absl::FailedPreconditionError(StrCat("device '", device_id, "' is revoked; register a new id"));
    }
    SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE devices SET token_sha256 = ? WHERE device_id = ?"));
    q.Bind(token_sha256).Bind(device_id);
    return q.Run();
  });
}

absl::StatusOr<std::vector<DeviceRecord>> Store::ListDevices() {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql(StrCat("SELECT ", kDeviceColumns, " FROM devices ORDER BY device_id")));
  std::vector<DeviceRecord> out;
  while (true) {
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    out.push_back(ReadDevice(q));
  }
  return out;
}

// ---- meta

absl::StatusOr<uint64_t> Store::GlobalVersion() {
  absl::MutexLock lock(&impl_->mu);
  SEEDLING_ASSIGN_OR_RETURN(Impl::Meta meta, impl_->LoadMeta());
  return meta.global_version;
}

// ---- rounds

absl::StatusOr<RoundRecord> Store::CreateRound(const RoundRecord& fields) {
  if (fields.target < 0 || fields.min_reports < 0) {
    return absl::InvalidArgumentError(
        StrCat("a round needs target >= 0 and min_reports >= 0, got ", fields.target, " and ", fields.min_reports));
  }
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  RoundRecord r;
  r.method = fields.method;
  r.config_json = fields.config_json;
  r.base_version = fields.base_version;
  r.target = fields.target;
  r.min_reports = fields.min_reports;
  r.opened_ms = fields.opened_ms;
  r.deadline_ms = fields.deadline_ms;
  r.state_ms = fields.opened_ms;
  SEEDLING_RETURN_IF_ERROR(im.Write("CreateRound", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(Impl::Meta meta, im.LoadMeta());
    if (r.base_version > meta.global_version) {
      return absl::FailedPreconditionError(StrCat("a new round cannot start from version ", r.base_version,
                                                  ": the global version is ", meta.global_version));
    }
    // The counter lives in meta, not in MAX(round_id), so ids are never reused even if rows go
    // away.
    r.round_id = meta.last_round_id + 1;
    {
      SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE meta SET last_round_id = ? WHERE id = 1"));
      q.Bind(r.round_id);
      SEEDLING_RETURN_IF_ERROR(q.Run());
    }
    SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql(StrCat("INSERT INTO rounds (", kRoundColumns,
                                                     ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")));
    q.Bind(r.round_id)
        .Bind(RoundStateName(r.state))
        .Bind(r.method)
        .Bind(r.config_json)
        .Bind(r.base_version)
        .Bind(r.result_version)
        .Bind(r.target)
        .Bind(r.min_reports)
        .Bind(r.opened_ms)
        .Bind(r.deadline_ms)
        .Bind(r.closed_ms)
        .Bind(r.selected)
        .Bind(r.accepted)
        .Bind(r.abort_reason)
        .Bind(r.result_json)
        .Bind(r.state_ms);
    return q.Run();
  }));
  return r;
}

absl::StatusOr<std::optional<RoundRecord>> Store::FindRound(uint64_t round_id) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->LoadRound(round_id);
}

absl::StatusOr<std::optional<RoundRecord>> Store::LatestRound() {
  absl::MutexLock lock(&impl_->mu);
  SEEDLING_ASSIGN_OR_RETURN(
      std::vector<RoundRecord> rounds,
      impl_->LoadRounds(StrCat("SELECT ", kRoundColumns, " FROM rounds ORDER BY round_id DESC LIMIT 1"), std::nullopt));
  if (rounds.empty()) return std::optional<RoundRecord>();
  return std::optional<RoundRecord>(std::move(rounds.front()));
}

absl::StatusOr<std::vector<RoundRecord>> Store::RecentRounds(int limit) {
  if (limit < 0) return absl::InvalidArgumentError(StrCat("RecentRounds limit must be >= 0, got ", limit));
  absl::MutexLock lock(&impl_->mu);
  return impl_->LoadRounds(StrCat("SELECT ", kRoundColumns, " FROM rounds ORDER BY round_id DESC LIMIT ?"),
                           int64_t{limit});
}

absl::Status Store::SetRoundState(uint64_t round_id, RoundState state, int64_t now_ms) {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  return im.Write("SetRoundState", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(RoundRecord r, im.RequireRound(round_id));
    if (state == RoundState::kCommitted || state == RoundState::kAborted) {
      return absl::FailedPreconditionError(TransitionError(round_id, r.state, state,
                                                           state == RoundState::kCommitted
                                                               ? " with SetRoundState (use CommitRound)"
                                                               : " with SetRoundState (use AbortRound)"));
    }
    SEEDLING_RETURN_IF_ERROR(CheckTransition(r, state));
    SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE rounds SET state = ?, state_ms = ? WHERE round_id = ?"));
    q.Bind(RoundStateName(state)).Bind(now_ms).Bind(round_id);
    return q.Run();
  });
}

absl::Status Store::IncrementSelected(uint64_t round_id) {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  return im.Write("IncrementSelected", [&]() -> absl::Status {
    SEEDLING_RETURN_IF_ERROR(im.RequireLiveRound(round_id, "select devices"));
    SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE rounds SET selected = selected + 1 WHERE round_id = ?"));
    q.Bind(round_id);
    return q.Run();
  });
}

absl::Status Store::CommitRound(uint64_t round_id, uint64_t new_version, int64_t now_ms, const std::string& result_json,
                                const std::string& seed_sums_blob, const std::optional<DpSpend>& dp) {
  if (!impl_->owner) return RefuseBesideOwner(impl_->dir, "CommitRound");
  if (dp.has_value() && (!(dp->sampling_rate >= 0 && dp->sampling_rate <= 1) || !(dp->noise_multiplier >= 0) ||
                         !std::isfinite(dp->noise_multiplier) || dp->steps < 0)) {
    return absl::InvalidArgumentError(StrCat("round ", round_id, ": DP spend needs sampling rate in [0, 1], noise ",
                                             "multiplier >= 0 and steps >= 0, got ", dp->sampling_rate, ", ",
                                             dp->noise_multiplier, ", ", dp->steps));
  }
  Impl& im = *impl_;
  absl::MutexLock ck(&im.checkpoint_mu);
  absl::MutexLock lock(&im.mu);
  return im.Write("CommitRound", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(RoundRecord r, im.RequireRound(round_id));
    SEEDLING_RETURN_IF_ERROR(CheckTransition(r, RoundState::kCommitted));
    SEEDLING_ASSIGN_OR_RETURN(Impl::Meta meta, im.LoadMeta());
    if (new_version != meta.global_version + 1) {
      return absl::FailedPreconditionError(StrCat("round ", round_id, " cannot commit version ", new_version,
                                                  ": the global version is ", meta.global_version, ", so the next is ",
                                                  meta.global_version + 1));
    }
    const std::string path = im.CheckpointPath(new_version);
    if (!FileExists(path)) {
      return absl::FailedPreconditionError(StrCat("round ", round_id, " cannot commit version ", new_version,
                                                  ": its checkpoint '", path,
                                                  "' does not exist (WriteCheckpoint first)"));
    }
    // Hashed here, under checkpoint_mu, so the recorded hash is that of the file that becomes
    // current.
    SEEDLING_ASSIGN_OR_RETURN(std::string sha, FileSha256Hex(path));
    {
      SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE rounds SET state = 'committed', result_version = ?, "
                                                "closed_ms = ?, state_ms = ?, result_json = ? WHERE round_id = ?"));
      q.Bind(new_version).Bind(now_ms).Bind(now_ms).Bind(result_json).Bind(round_id);
      SEEDLING_RETURN_IF_ERROR(q.Run());
    }
    {
      SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE meta SET global_version = ? WHERE id = 1"));
      q.Bind(new_version);
      SEEDLING_RETURN_IF_ERROR(q.Run());
    }
    {
      SEEDLING_ASSIGN_OR_RETURN(
          Query q, im.Sql("INSERT INTO checkpoints (version, file, sha256, round_id) VALUES (?, ?, ?, ?)"));
      q.Bind(new_version).Bind(Impl::CheckpointRelativePath(new_version)).Bind(sha).Bind(round_id);
      SEEDLING_RETURN_IF_ERROR(q.Run());
    }
    if (!seed_sums_blob.empty()) {
      SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("INSERT INTO seed_sums (version, round_id, sums) VALUES (?, ?, ?)"));
      q.Bind(new_version).Bind(round_id).BindBlob(seed_sums_blob);
      SEEDLING_RETURN_IF_ERROR(q.Run());
    }
    if (dp.has_value()) {
      SEEDLING_ASSIGN_OR_RETURN(
          Query q,
          im.Sql("INSERT INTO dp_rounds (round_id, sampling_rate, noise_multiplier, steps) VALUES (?, ?, ?, ?)"));
      q.Bind(round_id).Bind(dp->sampling_rate).Bind(dp->noise_multiplier).Bind(dp->steps);
      SEEDLING_RETURN_IF_ERROR(q.Run());
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<std::vector<DpSpend>> Store::DpLedger() {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  std::vector<DpSpend> out;
  SEEDLING_ASSIGN_OR_RETURN(
      Query q, im.Sql("SELECT round_id, sampling_rate, noise_multiplier, steps FROM dp_rounds ORDER BY round_id"));
  while (true) {
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    out.push_back({q.UInt(0), q.Double(1), q.Double(2), q.Int(3)});
  }
  return out;
}

absl::Status Store::AbortRound(uint64_t round_id, int64_t now_ms, const std::string& reason) {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  return im.Write("AbortRound", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(RoundRecord r, im.RequireRound(round_id));
    SEEDLING_RETURN_IF_ERROR(CheckTransition(r, RoundState::kAborted));
    // The ledger rows stay: the round's state tells readers they were never aggregated.
    SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE rounds SET state = 'aborted', closed_ms = ?, state_ms = ?, "
                                              "abort_reason = ? WHERE round_id = ?"));
    q.Bind(now_ms).Bind(now_ms).Bind(reason).Bind(round_id);
    return q.Run();
  });
}

// ---- tasks

absl::Status Store::AddTask(const TaskRecord& task) {
  if (task.task_id.empty()) return absl::InvalidArgumentError("a task id cannot be empty");
  if (!IsTaskState(task.state)) {
    return absl::InvalidArgumentError(
        StrCat("task '", task.task_id, "' has state '", task.state, "'; expected assigned, declined or uploaded"));
  }
  if (task.state == "uploaded") {
    return absl::InvalidArgumentError(
        StrCat("task '", task.task_id, "' cannot start uploaded: only RecordAcceptedUpdate marks a task uploaded"));
  }
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  return im.Write(
      "AddTask",
      [&]() -> absl::Status {
        SEEDLING_RETURN_IF_ERROR(im.RequireLiveRound(task.round_id, StrCat("add task '", task.task_id, "'")));
        SEEDLING_ASSIGN_OR_RETURN(std::optional<TaskRecord> existing, im.LoadTask(task.task_id));
        if (existing) return absl::AlreadyExistsError(StrCat("task '", task.task_id, "' already exists"));
        {
          SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("SELECT task_id FROM tasks WHERE round_id = ? AND device_id = ?"));
          q.Bind(task.round_id).Bind(task.device_id);
          SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
          if (row) {
            return absl::AlreadyExistsError(
                StrCat("device '", task.device_id, "' already has task '", q.Text(0), "' in round ", task.round_id));
          }
        }
        {
          SEEDLING_ASSIGN_OR_RETURN(Query q,
                                    im.Sql(StrCat("INSERT INTO tasks (", kTaskColumns, ") VALUES (?, ?, ?, ?, ?, ?)")));
          q.Bind(task.task_id)
              .Bind(task.round_id)
              .Bind(task.device_id)
              .Bind(task.assigned_ms)
              .Bind(task.state)
              .Bind(task.detail);
          SEEDLING_RETURN_IF_ERROR(q.Run());
        }
        SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE rounds SET selected = selected + 1 WHERE round_id = ?"));
        q.Bind(task.round_id);
        return q.Run();
      },
      Sync::kLazy);
}

absl::StatusOr<std::optional<TaskRecord>> Store::FindTask(const std::string& task_id) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->LoadTask(task_id);
}

absl::StatusOr<std::optional<TaskRecord>> Store::FindTaskFor(uint64_t round_id, const std::string& device_id) {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  SEEDLING_ASSIGN_OR_RETURN(
      Query q, im.Sql(StrCat("SELECT ", kTaskColumns, " FROM tasks WHERE round_id = ? AND device_id = ?")));
  q.Bind(round_id).Bind(device_id);
  SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
  if (!row) return std::optional<TaskRecord>();
  return std::optional<TaskRecord>(ReadTask(q));
}

absl::Status Store::SetTaskState(const std::string& task_id, const std::string& state, const std::string& detail) {
  if (!IsTaskState(state)) {
    return absl::InvalidArgumentError(
        StrCat("task '", task_id, "': unknown state '", state, "'; expected assigned, declined or uploaded"));
  }
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  return im.Write("SetTaskState", [&]() -> absl::Status {
    SEEDLING_ASSIGN_OR_RETURN(std::optional<TaskRecord> t, im.LoadTask(task_id));
    if (!t) return absl::NotFoundError(StrCat("task '", task_id, "' does not exist"));
    if (t->state == "uploaded" && state == "uploaded") return absl::OkStatus();
    if (t->state == "uploaded" || state == "uploaded") {
      return absl::FailedPreconditionError(
          StrCat("task '", task_id, "' cannot move from ", t->state, " to ", state,
                 ": only RecordAcceptedUpdate marks a task uploaded, and the ledger keeps it so"));
    }
    SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("UPDATE tasks SET state = ?, detail = ? WHERE task_id = ?"));
    q.Bind(state).Bind(detail).Bind(task_id);
    return q.Run();
  });
}

// ---- ledger

absl::Status Store::RecordAcceptedUpdate(const LedgerEntry& entry) {
  return RecordAcceptedUpdates(std::span<const LedgerEntry>(&entry, 1)).front();
}

std::vector<absl::Status> Store::RecordAcceptedUpdates(std::span<const LedgerEntry> entries) {
  std::vector<absl::Status> results(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].idempotency_key.empty()) {
      results[i] = absl::InvalidArgumentError("an idempotency key cannot be empty");
    }
  }
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  const absl::Status st = im.Write("RecordAcceptedUpdates", [&]() -> absl::Status {
    for (size_t i = 0; i < entries.size(); ++i) {
      if (!results[i].ok()) continue;
      // A savepoint per entry: one refused entry leaves the others of the transaction in.
      SEEDLING_RETURN_IF_ERROR(im.Exec("SAVEPOINT ledger_entry"));
      results[i] = im.InsertLedgerEntry(entries[i]);
      if (!results[i].ok()) SEEDLING_RETURN_IF_ERROR(im.Exec("ROLLBACK TO ledger_entry"));
      SEEDLING_RETURN_IF_ERROR(im.Exec("RELEASE ledger_entry"));
    }
    return absl::OkStatus();
  });
  if (!st.ok()) {
    for (absl::Status& r : results) {
      if (r.ok()) r = st;
    }
  }
  return results;
}

absl::StatusOr<std::optional<LedgerEntry>> Store::FindLedgerEntry(const std::string& idempotency_key) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->LoadLedger(idempotency_key);
}

absl::StatusOr<std::vector<LedgerEntry>> Store::LedgerForRound(uint64_t round_id) {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  // rowid follows insertion order for a table that is never vacuumed of live rows.
  SEEDLING_ASSIGN_OR_RETURN(
      Query q, im.Sql(StrCat("SELECT ", kLedgerColumns, " FROM ledger WHERE round_id = ? ORDER BY rowid")));
  q.Bind(round_id);
  std::vector<LedgerEntry> out;
  while (true) {
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    out.push_back(ReadLedger(q));
  }
  return out;
}

// ---- seed sums

absl::StatusOr<std::vector<std::pair<uint64_t, std::string>>> Store::SeedSumsSince(uint64_t since_version) {
  std::vector<std::pair<uint64_t, std::string>> out;
  // Versions are stored as signed 64-bit; nothing can be newer than the largest one.
  if (since_version >= static_cast<uint64_t>(INT64_MAX)) return out;
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("SELECT version, sums FROM seed_sums WHERE version > ? ORDER BY version"));
  q.Bind(since_version);
  while (true) {
    SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    out.emplace_back(q.UInt(0), q.Blob(1));
  }
  return out;
}

// ---- checkpoints

absl::StatusOr<std::string> Store::WriteCheckpoint(uint64_t version, const std::vector<NamedVector>& vectors) {
  Impl& im = *impl_;
  if (!im.owner) return RefuseBesideOwner(im.dir, "WriteCheckpoint");
  absl::MutexLock ck(&im.checkpoint_mu);
  {
    absl::MutexLock lock(&im.mu);
    SEEDLING_ASSIGN_OR_RETURN(std::optional<CheckpointRecord> recorded, im.LoadCheckpoint(version));
    if (recorded) {
      return absl::AlreadyExistsError(
          StrCat("checkpoint of version ", version, " ('", recorded->path, "') is recorded and cannot be rewritten"));
    }
    SEEDLING_ASSIGN_OR_RETURN(Impl::Meta meta, im.LoadMeta());
    if (version != meta.global_version + 1 && !(version == 0 && meta.global_version == 0)) {
      return absl::FailedPreconditionError(StrCat("cannot write the checkpoint of version ", version,
                                                  ": the global version is ", meta.global_version, ", so only version ",
                                                  meta.global_version + 1, " can be written"));
    }
  }
  // `mu` is released: the global version only changes in CommitRound, which waits for
  // checkpoint_mu.

  const std::string path = im.CheckpointPath(version);
  SEEDLING_ASSIGN_OR_RETURN(std::string sha, WriteCheckpointFile(path, version, vectors, im.fs));

  if (version == 0) {
    // The initial model has no round to commit it: record it now (a crash before this leaves an
    // orphan that RecoverAfterCrash deletes, consistent with the call not having returned).
    absl::MutexLock lock(&im.mu);
    SEEDLING_RETURN_IF_ERROR(im.Write("WriteCheckpoint", [&]() -> absl::Status {
      SEEDLING_ASSIGN_OR_RETURN(
          Query q, im.Sql("INSERT INTO checkpoints (version, file, sha256, round_id) VALUES (?, ?, ?, NULL)"));
      q.Bind(version).Bind(Impl::CheckpointRelativePath(version)).Bind(sha);
      return q.Run();
    }));
  }
  return sha;
}

absl::StatusOr<std::vector<NamedVector>> Store::ReadCheckpoint(uint64_t version) {
  Impl& im = *impl_;
  const std::string path = im.CheckpointPath(version);
  std::optional<CheckpointRecord> recorded;
  {
    absl::MutexLock lock(&im.mu);
    SEEDLING_ASSIGN_OR_RETURN(recorded, im.LoadCheckpoint(version));
  }
  // Recorded files are immutable (WriteCheckpoint refuses them), so no lock is needed from here on.
  return ReadCheckpointFile(path, version, recorded ? std::optional<std::string>(recorded->sha256) : std::nullopt);
}

absl::StatusOr<std::optional<CheckpointRecord>> Store::FindCheckpoint(uint64_t version) {
  absl::MutexLock lock(&impl_->mu);
  return impl_->LoadCheckpoint(version);
}

// ---- checksum

absl::StatusOr<std::string> Store::Checksum() {
  Impl& im = *impl_;
  absl::MutexLock lock(&im.mu);
  // The table list comes from the schema, so a table added by a later migration is covered without
  // touching this function.
  std::vector<std::string> tables;
  {
    SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("SELECT name FROM sqlite_schema WHERE type = 'table' "
                                              "AND name NOT LIKE 'sqlite_%' ORDER BY name"));
    while (true) {
      SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
      if (!row) break;
      tables.push_back(q.Text(0));
    }
  }
  Sha256Hasher sha;
  for (const std::string& table : tables) {
    std::string order;
    {
      SEEDLING_ASSIGN_OR_RETURN(Query q, im.Sql("SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk"));
      q.Bind(table);
      while (true) {
        SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
        if (!row) break;
        order += StrCat(order.empty() ? "" : ", ", "\"", q.Text(0), "\"");
      }
    }
    SEEDLING_ASSIGN_OR_RETURN(
        Query q, im.Sql(StrCat("SELECT * FROM \"", table, "\"", order.empty() ? "" : StrCat(" ORDER BY ", order))));
    sha.Update("T");
    HashField(sha, table);
    std::vector<std::string> rows;  // only used for tables without a primary key
    while (true) {
      SEEDLING_ASSIGN_OR_RETURN(bool row, q.Step());
      if (!row) break;
      // Typed, length-prefixed values: 1 and '1', or 'ab','c' and 'a','bc', hash differently.
      Sha256Hasher row_sha;
      HashU64(row_sha, static_cast<uint64_t>(q.ColumnCount()));
      for (int c = 0; c < q.ColumnCount(); ++c) {
        const int type = q.ColumnType(c);
        HashU64(row_sha, static_cast<uint64_t>(type));
        switch (type) {
          case SQLITE_INTEGER:
            HashU64(row_sha, static_cast<uint64_t>(q.Int(c)));
            break;
          case SQLITE_FLOAT: {
            const double d = q.Double(c);
            HashU64(row_sha, std::bit_cast<uint64_t>(d));
            break;
          }
          case SQLITE_TEXT:
            HashField(row_sha, q.Text(c));
            break;
          case SQLITE_BLOB:
            HashField(row_sha, q.Blob(c));
            break;
          default:  // NULL
            break;
        }
      }
      rows.push_back(HexOf(row_sha.Finish()));
    }
    // Without a primary key the SELECT order is unspecified: sort the row digests instead.
    if (order.empty()) std::sort(rows.begin(), rows.end());
    HashU64(sha, rows.size());
    for (const std::string& r : rows) sha.Update(r);
  }
  return HexOf(sha.Finish());
}

}  // namespace seedling::server
