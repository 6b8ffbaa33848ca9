#pragma once

// The simulator's data: JSONL rows read once, split across simulated devices by a partitioner, and
// written back as one JSONL file per device for the real client SDK (client/local_data.h) to load.
// Also a built-in federated synthetic corpus for the demo: per-device text with shared structure
// and device-specific style, plus held-out devices (new users) for evaluation.
//
// Rows are kept as their original JSON lines, so whatever the client accepts ({"text"},
// {"instruction","input","output"}, Dolly {"instruction","context","response"}, extra fields)
// reaches it unchanged. Only "user" and one label field (default "topic") are read here.
//
// Determinism (docs/contributing.md, "Memory and numbers"): every random draw comes from seedling::Rng. Partitioners
// use (options.seed, rng_stream::kData); synthetic device d uses (options.seed, kCorpusStreamBase + d). The same rows,
// devices and options give the same partition. Dirichlet and power-law draws use libm's log / exp / sqrt, so they are
// bit-identical on one platform, not across libm versions.
//
// Nothing here is thread-safe unless stated; all functions are reentrant (no shared state).

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace seedling::simulator {

// One row of a dataset.
struct DataRow {
  std::string json;   // the row's JSON line as read (no trailing newline, no '\r', no BOM)
  std::string user;   // the "user" field: a string, or an integer as decimal; "" if absent or other
  std::string label;  // the label field (ReadRows' label_field), same rules as user
};

struct ReadRowsResult {
  std::vector<DataRow> rows;  // the usable rows, in file order
  int64_t skipped = 0;        // non-blank lines that are not JSON objects
  // "skipped 3 of 120 rows; first at line 17: not valid JSON", or "" when nothing was skipped.
  // Never quotes row contents (they are user data and end up in logs).
  std::string message;
};

// Reads a JSONL file. Blank lines are ignored; a UTF-8 BOM on line 1 and a '\r' before each '\n'
// are stripped. Lines that are not JSON objects (invalid JSON or UTF-8, arrays, scalars) are
// skipped and counted, never fatal. `label_field` names the field read into DataRow::label
// (default "topic"). Errors: NotFound / PermissionDenied / Internal from reading the file;
// InvalidArgument when no line is a JSON object, or when there are more than 2^32 - 1 rows.
absl::StatusOr<ReadRowsResult> ReadRows(const std::string& path, const std::string& label_field = "topic");

enum class PartitionKind {
  kIid,        // shuffle, then deal equal shares (device sizes differ by at most 1)
  kDirichlet,  // equal shares; each device's label mix ~ Dirichlet (label skew)
  kPowerLaw,   // IID labels; device sizes ~ Pareto (quantity skew)
  kUser,       // one device per distinct "user" value (natural split)
};

// "iid", "dirichlet", "power-law" (or "powerlaw"), "user". InvalidArgument otherwise, listing these.
absl::StatusOr<PartitionKind> ParsePartitionKind(std::string_view name);
std::string_view PartitionKindName(PartitionKind kind);

struct PartitionOptions {
  // Which partitioner. Default kIid.
  PartitionKind kind = PartitionKind::kIid;
  // kDirichlet: concentration α, > 0 and finite. Device d's label mix q_d ~ Dir(α·K·p), p the
  // global label frequencies and K the number of labels, so with balanced labels every component
  // has concentration α (the usual "Dir(α)" of Hsu et al. 2019). Small α (0.1) = one or two labels
  // dominate each device; large α (100) = close to IID. Sizes stay balanced; time O(rows × labels).
  // Default 0.5.
  double alpha = 0.5;
  // kPowerLaw: tail exponent of the Pareto draws that device sizes are proportional to
  // (P(w > x) = x^-exponent, x >= 1), > 0 and finite. Smaller = heavier tail (a few devices hold
  // most rows). Default 1.5.
  double exponent = 1.5;
  // Every device gets at least this many rows, >= 0 (InvalidArgument if rows < min_rows × devices,
  // or, for kUser, if some user has fewer rows). Default 1.
  int64_t min_rows = 1;
  // Seeds the partition's draws (stream rng_stream::kData). Default 0.
  uint64_t seed = 0;
};

// What a partition looks like, for logs and reports.
struct PartitionStats {
  int64_t devices = 0;                                  // device_rows.size()
  int64_t rows = 0;                                     // rows assigned, summed over devices
  int64_t min_rows = 0, median_rows = 0, max_rows = 0;  // rows per device (median: the lower one)
  double mean_rows = 0;
  // Distinct label values over the assigned rows; "" (unlabeled) counts as a value only when some
  // rows are labeled. 0 when no row has a label, and then the two label figures below are 0 too.
  int64_t labels = 0;
  double mean_labels_per_device = 0;  // distinct label values per device, averaged over devices
  // Total-variation distance ½ Σ_k |q_d(k) − p(k)| between a device's label mix q_d and the global
  // mix p, averaged over non-empty devices. 0 = every device looks like the whole (IID); near 1 =
  // every device holds labels that are rare overall.
  double mean_label_tv_distance = 0;

  // "20 devices, 600 rows; rows/device min 30 median 30 mean 30.0 max 30; 6 labels, 1.4 per
  // device, label TV distance 0.712"
  std::string ToString() const;
  // {"devices":..,"rows":..,"min_rows":..,"median_rows":..,"max_rows":..,"mean_rows":..,
  //  "labels":..,"mean_labels_per_device":..,"mean_label_tv_distance":..}
  nlohmann::json ToJson() const;
};

// Statistics of any assignment of `rows` to devices (indices must be < rows.size()).
PartitionStats ComputePartitionStats(const std::vector<DataRow>& rows,
                                     const std::vector<std::vector<uint32_t>>& device_rows);

struct Partition {
  // device_rows[d]: indices into the rows, ascending (file order). Every row appears exactly once
  // over all devices.
  std::vector<std::vector<uint32_t>> device_rows;
  PartitionStats stats;
};

// Splits rows across `devices` devices. InvalidArgument (with what was expected and what came) for:
// devices < 1; min_rows < 0; rows.size() < min_rows × devices; alpha or exponent not > 0 and
// finite; kDirichlet when a row has no label (the message says how many); kUser when a row has no
// user (how many), when there are more distinct users than `devices`, or when a user has fewer
// than min_rows rows.
//
// kUser returns one device per distinct user, in order of the user's first row, so
// device_rows.size() is the number of users, which may be less than `devices` (the argument is a
// maximum). More users than devices is an error rather than a silent merge or sample: merging
// users would break the natural split, dropping them would drop data; pass devices >= users.
absl::StatusOr<Partition> PartitionRows(const std::vector<DataRow>& rows, int64_t devices,
                                        const PartitionOptions& options);

// Writes rows[indices[0]].json, rows[indices[1]].json, ... one per line, to `path`, atomically
// (temporary file + rename: a crash leaves the old file or the new one). InvalidArgument if an
// index is out of range; I/O errors from WriteFileAtomic, with the path.
absl::Status WriteRowsJsonl(const std::string& path, const std::vector<DataRow>& rows,
                            std::span<const uint32_t> indices);

// --- Built-in federated synthetic corpus ---------------------------------------------------------
//
// Simple, highly regular English meant to be learnable by a tiny model in a few hundred steps:
// lowercase template sentences over a small vocabulary of common words ("we cut the warm bread in
// the kitchen."), 20–60 words per row. Each device has a persona: a topic (the label, written as
// "topic": one of SyntheticTopics()) whose words dominate its vocabulary, a device-specific Zipf
// over a permuted subset of the topic and shared words, favourite sentence templates, and
// favourite phrases (an opener, a closer, a catchphrase). So devices share structure but differ in
// word distribution (non-IID). Held-out devices come from the same generator with their own
// personas: evaluating on them measures generalization to new users.
//
// Rows are {"text", "topic", "user"}; an instruction_fraction of them are
// {"instruction", "input": "", "output", "topic", "user"} with the text as output. "user" is
// "device-<d>": d = 0 .. devices-1 for training devices, devices .. devices+heldout_devices-1 for
// held-out ones. Device d's persona and rows depend only on (seed, d, rows_per_device,
// instruction_fraction, topics), not on how many other devices there are.

// Stream ids of the synthetic corpus: device d draws from Rng(seed, kCorpusStreamBase + d).
inline constexpr uint64_t kCorpusStreamBase = uint64_t{0x53594E43} << 32;  // "SYNC"

// The built-in topics, in order ("cooking", "garden", ...).
std::span<const std::string_view> SyntheticTopics();

struct SyntheticCorpusOptions {
  int64_t devices = 1000;             // training devices, >= 1. Default 1000.
  int64_t heldout_devices = 50;       // evaluation-only devices (new users), >= 0. Default 50.
  int64_t rows_per_device = 24;       // rows on every device, >= 1. Default 24.
  int64_t topics = 8;                 // topics in use, the first `topics` of SyntheticTopics(),
                                      // in [1, SyntheticTopics().size()]. Default 8.
  double instruction_fraction = 0.1;  // rows written as instruction rows, in [0, 0.5]. Default 0.1.
  uint64_t seed = 0;                  // seeds every device's persona and rows. Default 0.
};

struct FederatedCorpus {
  std::vector<DataRow> rows;                   // all rows: training devices' (device 0 first), then held-out ones'
  Partition train;                             // device_rows for the `devices` training devices, with stats
  std::vector<std::vector<uint32_t>> heldout;  // rows of each held-out device
};

// Generates the corpus. Deterministic in the options. Options out of range are a programming error
// and abort (SEEDLING_CHECK). Memory: ~200 bytes per row (1000 × 24 rows ≈ 5 MB).
FederatedCorpus MakeSyntheticCorpus(const SyntheticCorpusOptions& options);

}  // namespace seedling::simulator
