#pragma once

// The store's schema (server/store.h): migrations, column lists, row decoders, the round state machine and
// checkpoint file names. Internal to the store.

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "server/internal/sqlite.h"
#include "server/store.h"

namespace seedling::server::store_internal {

inline constexpr int kSchemaVersion = 3;
// PRAGMA application_id, so a stray SQLite file is not mistaken for (and migrated into) a state database.
inline constexpr int32_t kApplicationId = 0x53444c47;  // "SDLG"

// Migrations()[i] takes the schema from version i to i + 1; a new database runs them all. To change
// the schema, append a step and bump kSchemaVersion; never edit a step that has shipped. STRICT
// tables make SQLite enforce the declared column types.
std::span<const char* const> Migrations();

inline constexpr char kRoundColumns[] =
    "round_id, state, method, config_json, base_version, result_version, target, min_reports, "
    "opened_ms, "
    "deadline_ms, closed_ms, selected, accepted, abort_reason, result_json, state_ms";
inline constexpr char kDeviceColumns[] = "device_id, token_sha256, created_ms, last_seen_ms, revoked_ms";
inline constexpr char kTaskColumns[] = "task_id, round_id, device_id, assigned_ms, state, detail";
inline constexpr char kLedgerColumns[] =
    "idempotency_key, round_id, task_id, device_id, num_examples, bytes, sha256, accepted_ms, "
    "metrics_json";

bool IsFinal(RoundState s);
bool IsTaskState(std::string_view s);
// DataLoss for a name the database should never hold.
absl::StatusOr<RoundState> ParseRoundState(std::string_view name);

// Rows selected with the column lists above.
absl::StatusOr<RoundRecord> ReadRound(const Query& q);
DeviceRecord ReadDevice(const Query& q);
TaskRecord ReadTask(const Query& q);
LedgerEntry ReadLedger(const Query& q);

// "global-<version>.safetensors", and back (anything else, including temporaries, is nullopt).
std::string CheckpointFileName(uint64_t version);
std::optional<uint64_t> ParseCheckpointFileName(std::string_view name);

std::string TransitionError(uint64_t round_id, RoundState from, RoundState to, std::string_view hint = "");
// The state machine of docs/architecture.md, "The server": Open → Collecting → Aggregating → Committed, and
// any non-final state → Aborted. FailedPrecondition otherwise.
absl::Status CheckTransition(const RoundRecord& r, RoundState to);

}  // namespace seedling::server::store_internal
