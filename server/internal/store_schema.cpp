#include "server/internal/store_schema.h"

#include <iterator>

namespace seedling::server::store_internal {
namespace {

constexpr char kCheckpointPrefix[] = "global-";
constexpr char kCheckpointSuffix[] = ".safetensors";

constexpr const char* kMigrations[] = {
    // 0 → 1
    R"sql(
CREATE TABLE schema_version (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  version INTEGER NOT NULL
) STRICT;
CREATE TABLE meta (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  global_version INTEGER NOT NULL CHECK (global_version >= 0),
  last_round_id INTEGER NOT NULL CHECK (last_round_id >= 0)  -- never decreases, even if rounds are deleted
) STRICT;
INSERT INTO meta (id, global_version, last_round_id) VALUES (1, 0, 0);
CREATE TABLE devices (
  device_id TEXT PRIMARY KEY NOT NULL,
  token_sha256 TEXT NOT NULL,
  created_ms INTEGER NOT NULL,
  last_seen_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE rounds (
  round_id INTEGER PRIMARY KEY,
  state TEXT NOT NULL CHECK (state IN ('open', 'collecting', 'aggregating', 'committed', 'aborted')),
  method TEXT NOT NULL,
  config_json TEXT NOT NULL,
  base_version INTEGER NOT NULL,
  result_version INTEGER NOT NULL,
  target INTEGER NOT NULL,
  min_reports INTEGER NOT NULL,
  opened_ms INTEGER NOT NULL,
  deadline_ms INTEGER NOT NULL,
  closed_ms INTEGER NOT NULL,
  selected INTEGER NOT NULL,
  accepted INTEGER NOT NULL,
  abort_reason TEXT NOT NULL,
  result_json TEXT NOT NULL,
  state_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE tasks (
  task_id TEXT PRIMARY KEY NOT NULL,
  round_id INTEGER NOT NULL REFERENCES rounds (round_id),
  device_id TEXT NOT NULL,
  assigned_ms INTEGER NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('assigned', 'declined', 'uploaded')),
  detail TEXT NOT NULL,
  UNIQUE (round_id, device_id)
) STRICT;
CREATE TABLE ledger (
  idempotency_key TEXT PRIMARY KEY NOT NULL,
  round_id INTEGER NOT NULL REFERENCES rounds (round_id),
  task_id TEXT NOT NULL UNIQUE REFERENCES tasks (task_id),
  device_id TEXT NOT NULL,
  num_examples INTEGER NOT NULL,
  bytes INTEGER NOT NULL,
  sha256 TEXT NOT NULL,
  accepted_ms INTEGER NOT NULL,
  metrics_json TEXT NOT NULL
) STRICT;
CREATE INDEX ledger_by_round ON ledger (round_id);
CREATE TABLE seed_sums (
  version INTEGER PRIMARY KEY,
  round_id INTEGER NOT NULL REFERENCES rounds (round_id),
  sums BLOB NOT NULL
) STRICT;
CREATE TABLE checkpoints (
  version INTEGER PRIMARY KEY,
  file TEXT NOT NULL,  -- relative to the state directory, so the directory can be moved
  sha256 TEXT NOT NULL,
  round_id INTEGER REFERENCES rounds (round_id)  -- NULL for the initial version 0
) STRICT;
)sql",
    // 1 → 2: the differential-privacy budget, one row per committed round that released a noised aggregate
    // (written in CommitRound's transaction, so the budget spent and the published versions always agree).
    R"sql(
CREATE TABLE dp_rounds (
  round_id INTEGER PRIMARY KEY REFERENCES rounds (round_id),
  sampling_rate REAL NOT NULL CHECK (sampling_rate >= 0 AND sampling_rate <= 1),
  noise_multiplier REAL NOT NULL CHECK (noise_multiplier >= 0),
  steps INTEGER NOT NULL CHECK (steps >= 0)
) STRICT;
)sql",
    // 2 → 3: revoked devices (seedling devices revoke): 0 while the device may connect.
    R"sql(
ALTER TABLE devices ADD COLUMN revoked_ms INTEGER NOT NULL DEFAULT 0;
)sql",
};
static_assert(std::size(kMigrations) == kSchemaVersion);

}  // namespace

std::span<const char* const> Migrations() { return kMigrations; }

static constexpr RoundState kAllStates[] = {RoundState::kOpen, RoundState::kCollecting, RoundState::kAggregating,
                                            RoundState::kCommitted, RoundState::kAborted};

bool IsFinal(RoundState s) { return s == RoundState::kCommitted || s == RoundState::kAborted; }

bool IsTaskState(std::string_view s) { return s == "assigned" || s == "declined" || s == "uploaded"; }

absl::StatusOr<RoundState> ParseRoundState(std::string_view name) {
  for (RoundState s : kAllStates) {
    if (name == RoundStateName(s)) return s;
  }
  return absl::DataLossError(StrCat("state database holds an unknown round state '", name, "'"));
}

absl::StatusOr<RoundRecord> ReadRound(const Query& q) {
  RoundRecord r;
  r.round_id = q.UInt(0);
  SEEDLING_ASSIGN_OR_RETURN(r.state, ParseRoundState(q.Text(1)));
  r.method = q.Text(2);
  r.config_json = q.Text(3);
  r.base_version = q.UInt(4);
  r.result_version = q.UInt(5);
  r.target = q.Int(6);
  r.min_reports = q.Int(7);
  r.opened_ms = q.Int(8);
  r.deadline_ms = q.Int(9);
  r.closed_ms = q.Int(10);
  r.selected = q.Int(11);
  r.accepted = q.Int(12);
  r.abort_reason = q.Text(13);
  r.result_json = q.Text(14);
  r.state_ms = q.Int(15);
  return r;
}

DeviceRecord ReadDevice(const Query& q) {
  DeviceRecord d;
  d.device_id = q.Text(0);
  d.token_sha256 = q.Text(1);
  d.created_ms = q.Int(2);
  d.last_seen_ms = q.Int(3);
  d.revoked_ms = q.Int(4);
  return d;
}

TaskRecord ReadTask(const Query& q) {
  TaskRecord t;
  t.task_id = q.Text(0);
  t.round_id = q.UInt(1);
  t.device_id = q.Text(2);
  t.assigned_ms = q.Int(3);
  t.state = q.Text(4);
  t.detail = q.Text(5);
  return t;
}

LedgerEntry ReadLedger(const Query& q) {
  LedgerEntry e;
  e.idempotency_key = q.Text(0);
  e.round_id = q.UInt(1);
  e.task_id = q.Text(2);
  e.device_id = q.Text(3);
  e.num_examples = q.UInt(4);
  e.bytes = q.UInt(5);
  e.sha256 = q.Text(6);
  e.accepted_ms = q.Int(7);
  e.metrics_json = q.Text(8);
  return e;
}

std::string CheckpointFileName(uint64_t version) { return StrCat(kCheckpointPrefix, version, kCheckpointSuffix); }

std::optional<uint64_t> ParseCheckpointFileName(std::string_view name) {
  const std::string_view prefix = kCheckpointPrefix, suffix = kCheckpointSuffix;
  if (name.size() <= prefix.size() + suffix.size() || name.substr(0, prefix.size()) != prefix ||
      name.substr(name.size() - suffix.size()) != suffix) {
    return std::nullopt;
  }
  const std::string_view digits = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
  if (digits.size() > 19) return std::nullopt;
  uint64_t v = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  return v;
}

std::string TransitionError(uint64_t round_id, RoundState from, RoundState to, std::string_view hint) {
  return StrCat("round ", round_id, " cannot move from ", RoundStateName(from), " to ", RoundStateName(to), hint);
}

absl::Status CheckTransition(const RoundRecord& r, RoundState to) {
  bool ok = false;
  switch (to) {
    case RoundState::kOpen:
      ok = false;
      break;
    case RoundState::kCollecting:
      ok = r.state == RoundState::kOpen;
      break;
    case RoundState::kAggregating:
      ok = r.state == RoundState::kCollecting;
      break;
    case RoundState::kCommitted:
      ok = r.state == RoundState::kAggregating;
      break;
    case RoundState::kAborted:
      ok = !IsFinal(r.state);
      break;
  }
  if (!ok) return absl::FailedPreconditionError(TransitionError(r.round_id, r.state, to));
  return absl::OkStatus();
}

}  // namespace seedling::server::store_internal
