#include "server/internal/sqlite.h"

namespace seedling::server::store_internal {

absl::Status SqliteStatus(sqlite3* db, int rc, const std::string& db_path, std::string_view context) {
  const std::string msg = StrCat("state database '", db_path, "': ", context, ": ",
                                 db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc), " (SQLite code ", rc, ")");
  switch (rc & 0xff) {
    case SQLITE_CONSTRAINT:
      switch (rc) {
        case SQLITE_CONSTRAINT_PRIMARYKEY:
        case SQLITE_CONSTRAINT_UNIQUE:
          return absl::AlreadyExistsError(msg);
        case SQLITE_CONSTRAINT_CHECK:
        case SQLITE_CONSTRAINT_NOTNULL:
        case SQLITE_CONSTRAINT_DATATYPE:
          return absl::InvalidArgumentError(msg);
        default:
          return absl::FailedPreconditionError(msg);
      }
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return absl::UnavailableError(msg);
    case SQLITE_FULL:
    case SQLITE_NOMEM:
      return absl::ResourceExhaustedError(msg);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::DataLossError(msg);
    case SQLITE_PERM:
    case SQLITE_READONLY:
    case SQLITE_AUTH:
      return absl::PermissionDeniedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

}  // namespace seedling::server::store_internal
