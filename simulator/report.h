#pragma once

// Simulator outputs (docs/architecture.md, "The simulator"): one RoundRecord per server round and method, appended to
// <run dir>/rounds.jsonl and rounds.csv as the run goes; a per-method summary (terminal table); and
// a self-contained report.html whose plots are inline SVG drawn here (no scripts, styles or fonts
// from elsewhere, so the file opens offline and can be mailed around).
//
// Missing values are NaN in the structs, null in JSON, an empty field in CSV and "-" in tables; NaN
// points are left out of the plots and break the line there. Everything here is deterministic: the
// same input gives byte-identical output (numbers are formatted with std::to_chars, independent of
// the C locale).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"
#include "simulator/population.h"

namespace seedling::simulator {

// What happened in one server round of one method. Byte and loss fields are means over the round's
// participants (accepted updates) unless said otherwise.
struct RoundRecord {
  std::string method;                     // "lora-bp", "fwdgrad", "mezo", "kseed", ...
  int64_t round = 0;                      // server round id (1-based)
  bool committed = false;                 // false: aborted (fewer than min_reports by the deadline)
  double start_time_s = 0;                // simulated seconds since the simulation start when the round opened
  double end_time_s = 0;                  // ... when the round committed or aborted
  int64_t available = 0;                  // devices available during the round
  int64_t selected = 0;                   // tasks handed out
  int64_t participants = 0;               // accepted updates
  int64_t dropouts = 0;                   // selected devices that dropped out
  int64_t stragglers = 0;                 // finished after the deadline / round end (their upload was stale)
  int64_t declined = 0;                   // declined the task, for any reason
  int64_t declined_memory = 0;            // of which: no memory plan fits the device's budget (Decline MEMORY)
  int64_t declined_unsupported = 0;       // of which: a method, weight representation or base model the device
                                          // does not run (Decline UNSUPPORTED)
  double train_loss = NAN;                // mean over participants of their local loss after training
  double eval_loss = NAN;                 // held-out devices, global model after the round
  double accuracy = NAN;                  // in [0, 1], where the task has labels
  double bytes_up_per_client = 0;         // bytes, mean over participants
  double bytes_down_per_client = 0;       // bytes, mean over participants
  int64_t processed_tokens = 0;           // tokens the participants' local steps processed (prompts included)
  double device_tokens_per_second = NAN;  // processed_tokens over the participants' simulated compute
                                          // seconds: the phones' training speed as the time model has it
  double energy_joules = 0;               // all selected devices' training + radio energy this round, J
  double device_flops = 0;                // FLOPs of the local runs the round's devices started (the compute
                                          // model, client/compute_model.h, at each task's perturbations)
  int64_t perturbations = 0;              // fwdgrad: K of the round's tasks (pacing raises it); 0 otherwise
  double gradient_variance = NAN;         // fwdgrad with pacing: the server's variance of the pooled gradient
                                          // estimate (server/fwdgrad_pacing.h); NaN when not measured
  double epsilon = NAN;                   // DP budget spent so far (privacy) at [privacy] delta, NaN if DP is off
  double rho = NAN;                       // DP-FTRL: zCDP rho spent so far; NaN otherwise (Gaussian or no DP)
  double epsilon_delta_1e10 = NAN;        // DP-FTRL: the epsilon spent so far at delta = 1e-10; NaN otherwise
  std::string global_sha256;              // hex SHA-256 of the global parameters after the round (float32
                                          // bytes): equal across thread counts, ranks and transports
  double wall_seconds = 0;                // host time spent simulating the round, s
};

// One JSON object with the field names above; NaN and ±inf become null.
nlohmann::json ToJson(const RoundRecord& r);

// Inverse of ToJson: null → NaN, missing fields keep their defaults. InvalidArgument naming the
// field when a present field has the wrong type (e.g. a string where a number is expected).
absl::StatusOr<RoundRecord> RoundRecordFromJson(const nlohmann::json& j);

// CSV (RFC 4180): a header line with the field names in declaration order, then one row per record,
// each ending in "\n". NaN → empty field; `committed` is true/false; strings are quoted when they
// contain a comma, a double quote, CR or LF (quotes doubled). Numbers use the shortest round-trip
// form.
std::string CsvHeader();                     // ends in "\n"
std::string ToCsvRow(const RoundRecord& r);  // ends in "\n"

// Appends records to <dir>/rounds.jsonl (one ToJson object per line) and <dir>/rounds.csv, flushing
// both to the OS after every record, so a killed run keeps every record it wrote (a power loss may
// still lose the last few: there is no fsync per round). Not thread-safe; movable, not copyable.
class RoundLog {
 public:
  // Creates `dir` if needed and opens both files for appending (a resumed run continues its log).
  // Writes the CSV header when rounds.csv is new or empty; ends a partial last line (a run killed
  // mid-write) so the next record starts on its own line. FailedPrecondition if an existing
  // rounds.csv starts with a different header (written by another version: appending would misalign
  // the columns); the errno-derived code with the path otherwise.
  static absl::StatusOr<RoundLog> Open(const std::string& dir);

  // Writes one line to each file and flushes them. After an error the log should not be used again.
  absl::Status Append(const RoundRecord& r);

  const std::string& jsonl_path() const { return jsonl_path_; }
  const std::string& csv_path() const { return csv_path_; }

 private:
  struct FileCloser {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

  RoundLog(std::string jsonl_path, std::string csv_path, FilePtr jsonl, FilePtr csv)
      : jsonl_path_(std::move(jsonl_path)),
        csv_path_(std::move(csv_path)),
        jsonl_(std::move(jsonl)),
        csv_(std::move(csv)) {}

  std::string jsonl_path_;
  std::string csv_path_;
  FilePtr jsonl_;
  FilePtr csv_;
};

// One method's run, condensed.
struct MethodSummary {
  std::string method;
  int64_t rounds = 0;                            // records of this method
  int64_t committed_rounds = 0;                  // of which committed
  double initial_eval_loss = NAN;                // before round 1
  double final_eval_loss = NAN;                  // see Summarize
  double bytes_up_per_client_per_round = NAN;    // bytes, see Summarize
  double bytes_down_per_client_per_round = NAN;  // bytes, see Summarize
  double simulated_hours = 0;                    // latest end_time_s / 3600
  double energy_kj = 0;                          // sum of energy_joules / 1000, aborted rounds included
  double wall_seconds = 0;                       // sum of wall_seconds
  double final_accuracy = NAN;                   // last non-NaN accuracy in round order
  double epsilon = NAN;                          // last non-NaN epsilon in round order (the budget spent)
  double rho = NAN;                              // DP-FTRL: last non-NaN rho in round order
  double epsilon_delta_1e10 = NAN;               // DP-FTRL: last non-NaN epsilon_delta_1e10 in round order
};

// Condenses the records of `method`; records of other methods are skipped, so the whole log can be
// passed. Records are taken in round order whatever their order in the span.
//  - final_eval_loss: the last non-NaN eval_loss (an aborted round evaluates the unchanged model,
//    so its value counts too); initial_eval_loss when there is none.
//  - bytes_*_per_client_per_round: bytes one participating client moved in one round, averaged
//    over every accepted update of the committed rounds, i.e. Σ bytes_per_client·participants /
//    Σ participants over committed rounds. Aborted rounds are excluded: their updates were thrown
//    away and their per-client mean is over too few (often zero) participants to describe the
//    method. NaN when no committed round had a participant.
//  - energy and wall time include aborted rounds: that energy and time were spent.
MethodSummary Summarize(std::string method, double initial_eval_loss, std::span<const RoundRecord> records);

// An aligned plain-text table for the terminal: a header line, a rule, one line per summary,
// every line the same width (method left-aligned, numbers right-aligned). Bytes use binary units
// ("45.1 KiB"), NaN prints as "-". The accuracy, epsilon, rho and epsilon@1e-10 columns appear only when
// some summary has a value (rho and epsilon@1e-10: some DP-FTRL run).
std::string SummaryTable(std::span<const MethodSummary> summaries);

// What a run spent to reach a held-out loss, so methods compare on cost and not only on their final loss.
struct TargetCost {
  std::string method;
  double target_loss = NAN;
  int64_t round = 0;             // the first round (in round order) whose eval_loss <= target_loss; 0 = not reached
  double simulated_hours = NAN;  // that round's end_time_s / 3600
  double device_flops = NAN;     // Σ device_flops of the run's rounds up to and including that round
  double energy_kj = NAN;        // Σ energy_joules / 1000, likewise (aborted rounds count: that energy was spent)
  bool reached() const { return round > 0; }
};

// The cost of `method` (records of other methods are skipped, any order) to reach `target_loss`; the
// figures stay NaN when no round reaches it (or the target is NaN).
TargetCost CostToTarget(std::string method, double target_loss, std::span<const RoundRecord> records);

// The default target when sim.toml sets none: the largest final_eval_loss among the summaries whose final
// loss is below their initial loss, i.e. the loss every run that learned reaches, so each of them gets a
// cost (a run that did not learn gets "not reached"). NaN when no run learned.
double DefaultTargetLoss(std::span<const MethodSummary> summaries);

// An aligned plain-text table (as SummaryTable) after a line stating the target: method, rounds, simulated
// h, device FLOPs, energy kJ; "not reached" in the rounds column (the rest "-") for a run that did not
// reach the target. "" for no costs.
std::string TargetTable(std::span<const TargetCost> costs);

// Y axis of the bytes figure.
enum class AxisScale {
  kAuto,  // log when the positive values span more than two orders of magnitude (kseed vs LoRA)
  kLinear,
  kLog,
};

// What ran, for the report's opening paragraph. Empty strings and zero counts are left out of it.
struct RunDescription {
  std::string model;               // what was fine-tuned, e.g. "llama (models/tiny)"
  int64_t devices = 0;             // simulated phones that train
  int64_t heldout_devices = 0;     // phones whose data only evaluates the global model
  int64_t rounds = 0;              // rounds asked of each method
  int64_t clients_per_round = 0;   // accepted updates wanted per round
  std::string data;                // e.g. "the built-in synthetic corpus" or a data file's path
  std::string partition;           // how the data is split across devices, a phrase such as "split by
                                   // label with Dirichlet skew (alpha 0.5)"
  double label_tv_distance = NAN;  // mean total-variation distance of a device's label mix from the global
                                   // mix (PartitionStats): 0 = IID; NaN when the rows have no labels
};

struct ReportInput {
  std::string title;   // e.g. "Seedling simulation: 1000 phones, tiny model"
  RunDescription run;  // the opening paragraph, with the methods' summaries
  // Key/value table at the top (devices, rounds, model, seed, ...), in this order.
  std::vector<std::pair<std::string, std::string>> settings;
  // Free-text paragraphs (population summary, partition statistics); newlines are kept.
  std::vector<std::string> notes;
  // The population table: one row per phone class and one over every device (Population::ClassStatistics),
  // in this order. No table when empty.
  std::vector<ClassStats> population;
  std::vector<MethodSummary> summaries;
  std::vector<RoundRecord> rounds;                  // all methods, any order
  std::map<std::string, double> initial_eval_loss;  // per method: the point at round 0 / time 0
  std::map<std::string, double> initial_accuracy;   // per method: accuracy before round 1, where measured
  AxisScale bytes_axis = AxisScale::kAuto;          // y scale of the bytes figure
  std::vector<TargetCost> targets;                  // per run, the cost to reach the target loss (a table)
};

// The whole report as one HTML5 document. Methods get colours (Okabe–Ito palette, colour-blind
// safe) in the order of `summaries`, then of first appearance in `rounds`.
// At the top, <p class="run-summary">: one paragraph saying what ran (methods, model, devices, rounds,
// clients per round, data and partition from `run`) and how each method of `summaries` ended (committed
// rounds, simulated hours, final eval loss and accuracy, numbers formatted as the summary table does);
// left out when `run` is empty and there are no summaries.
// Then the settings, <table class="population"> (a header row, a row per ClassStats, numbers in
// <td class="num">, the whole population's row class="total"), the notes, the summary table and, when
// `targets` is not empty, <table class="target"> (TargetTable's columns, "not reached" for a run that
// missed the target).
// Figures, each a <figure id="..."> holding one inline <svg>:
//   fig-loss-round   eval loss vs round (round 0 = initial_eval_loss)
//   fig-loss-time    eval loss vs simulated hours (time 0 = initial_eval_loss)
//   fig-bytes        bytes up (solid) and down (dashed) per client per round
//   fig-participation  participants (solid), dropouts (dashed), stragglers (dotted) per round
//   fig-device-speed  device tokens per second per round, only when some record has one
//   fig-accuracy     accuracy vs round (round 0 = initial_accuracy), only when some record has an accuracy
//   fig-accuracy-time  accuracy vs simulated hours, with fig-accuracy
//   fig-epsilon      DP epsilon vs round, only when some record has an epsilon
// After the figures, <table class="declines">: per method, a row per round with a declined task
// (declined, memory, unsupported, other) and a total row (class="total"); a sentence instead when no
// task was declined.
// Each method's line in a figure is one <path class="line" data-method="..." data-metric="...">
// whose `d` is "M x,y L x,y ..." with a new "M" after each NaN gap; aborted rounds get an "×"
// marker (class="aborted"); axis ticks are <g class="xtick|ytick" data-v="value">. Every string
// from the input is HTML-escaped. No external references.
std::string RenderReportHtml(const ReportInput& input);

// Renders and writes the report atomically (base/file.h WriteFileAtomic): readers see the old file
// or the new one. The I/O error with the path when e.g. the directory does not exist.
absl::Status WriteReport(const std::string& path, const ReportInput& input);

}  // namespace seedling::simulator
