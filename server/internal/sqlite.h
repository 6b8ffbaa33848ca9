#pragma once

// The store's SQLite layer (server/store.h): handle ownership, error mapping and one prepared-statement
// execution. Internal to the store.

#include <sqlite3.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/statusor.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::server::store_internal {

// One deleter for every SQLite handle the store owns (docs/contributing.md, "Ownership and concurrency").
struct CHandleDeleter {
  // close_v2 defers the close until the last statement is finalized, so member order cannot leak.
  void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
  void operator()(sqlite3_stmt* stmt) const { sqlite3_finalize(stmt); }
};
using DbPtr = std::unique_ptr<sqlite3, CHandleDeleter>;
using StmtPtr = std::unique_ptr<sqlite3_stmt, CHandleDeleter>;

// The canonical Status for SQLite result `rc`: AlreadyExists (unique keys), InvalidArgument (checks),
// FailedPrecondition (other constraints), Unavailable (busy), ResourceExhausted, DataLoss (corruption),
// PermissionDenied, else Internal; the message names the database and `context`.
absl::Status SqliteStatus(sqlite3* db, int rc, const std::string& db_path, std::string_view context);

// One execution of a cached prepared statement. Binds parameters left to right; resets the
// statement and clears its bindings when it goes out of scope, so the cache always hands out a
// clean statement and no read stays open across COMMIT.
class Query {
 public:
  Query(sqlite3* db, sqlite3_stmt* stmt, const std::string& db_path) : db_(db), stmt_(stmt), db_path_(&db_path) {}
  Query(Query&& o) noexcept
      : db_(o.db_),
        stmt_(std::exchange(o.stmt_, nullptr)),
        db_path_(o.db_path_),
        next_(o.next_),
        bind_rc_(o.bind_rc_) {}
  Query& operator=(Query&&) = delete;
  ~Query() {
    if (stmt_ != nullptr) {
      sqlite3_reset(stmt_);
      sqlite3_clear_bindings(stmt_);
    }
  }

  Query& Bind(int64_t v) { return Note(sqlite3_bind_int64(stmt_, ++next_, v)); }
  // SQLite integers are signed 64-bit; unsigned values round-trip bit for bit through the cast.
  Query& Bind(uint64_t v) { return Bind(static_cast<int64_t>(v)); }
  Query& Bind(int v) { return Bind(static_cast<int64_t>(v)); }
  Query& Bind(double v) { return Note(sqlite3_bind_double(stmt_, ++next_, v)); }
  // A null data pointer would bind SQL NULL, so empty strings get a real (empty) one.
  Query& Bind(std::string_view v) {
    return Note(
        sqlite3_bind_text64(stmt_, ++next_, v.empty() ? "" : v.data(), v.size(), SQLITE_TRANSIENT, SQLITE_UTF8));
  }
  Query& BindBlob(std::string_view v) {
    return Note(sqlite3_bind_blob64(stmt_, ++next_, v.empty() ? "" : v.data(), v.size(), SQLITE_TRANSIENT));
  }

  // True while there is a row to read.
  absl::StatusOr<bool> Step() {
    if (bind_rc_ != SQLITE_OK) return Error(bind_rc_, "cannot bind parameters");
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return Error(rc, "cannot execute");
  }
  // Steps to the end, ignoring rows.
  absl::Status Run() {
    while (true) {
      SEEDLING_ASSIGN_OR_RETURN(bool row, Step());
      if (!row) return absl::OkStatus();
    }
  }

  int64_t Int(int col) const { return sqlite3_column_int64(stmt_, col); }
  uint64_t UInt(int col) const { return static_cast<uint64_t>(Int(col)); }
  // column_text/blob before column_bytes, as SQLite requires.
  std::string Text(int col) const {
    const unsigned char* p = sqlite3_column_text(stmt_, col);
    const int n = sqlite3_column_bytes(stmt_, col);
    return p == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(n));
  }
  std::string Blob(int col) const {
    const void* p = sqlite3_column_blob(stmt_, col);
    const int n = sqlite3_column_bytes(stmt_, col);
    return p == nullptr ? std::string() : std::string(static_cast<const char*>(p), static_cast<size_t>(n));
  }
  int ColumnCount() const { return sqlite3_column_count(stmt_); }
  int ColumnType(int col) const { return sqlite3_column_type(stmt_, col); }
  double Double(int col) const { return sqlite3_column_double(stmt_, col); }
  int Changes() const { return sqlite3_changes(db_); }

 private:
  Query& Note(int rc) {
    if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
    return *this;
  }
  absl::Status Error(int rc, std::string_view what) const {
    return SqliteStatus(db_, rc, *db_path_, StrCat(what, " '", sqlite3_sql(stmt_), "'"));
  }

  sqlite3* db_;
  sqlite3_stmt* stmt_;  // borrowed from the cache
  const std::string* db_path_;
  int next_ = 0;
  int bind_rc_ = SQLITE_OK;
};

}  // namespace seedling::server::store_internal
