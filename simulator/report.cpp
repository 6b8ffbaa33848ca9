#include "simulator/report.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string_view>
#include <system_error>

#include "base/file.h"
#include "base/status.h"
#include "base/strings.h"
#include "nlohmann/json.hpp"
#include "simulator/internal/report_format.h"
#include "simulator/internal/svg_chart.h"

namespace seedling::simulator {
namespace {

using internal::Chart;
using internal::CsvField;
using internal::CsvNumber;
using internal::Fixed;
using internal::G4;
using internal::HumanBytes;
using internal::JsonNumber;
using internal::kDashes;
using internal::kMetricGrey;
using internal::kNaN;
using internal::kPalette;
using internal::Point;
using internal::RenderChart;
using internal::Series;
using internal::TextWidth;

// Field names in declaration order: the JSON keys and the CSV header.
constexpr const char* kFields[] = {"method",
                                   "round",
                                   "committed",
                                   "start_time_s",
                                   "end_time_s",
                                   "available",
                                   "selected",
                                   "participants",
                                   "dropouts",
                                   "stragglers",
                                   "declined",
                                   "declined_memory",
                                   "declined_unsupported",
                                   "train_loss",
                                   "eval_loss",
                                   "accuracy",
                                   "bytes_up_per_client",
                                   "bytes_down_per_client",
                                   "processed_tokens",
                                   "device_tokens_per_second",
                                   "energy_joules",
                                   "device_flops",
                                   "perturbations",
                                   "gradient_variance",
                                   "epsilon",
                                   "rho",
                                   "epsilon_delta_1e10",
                                   "global_sha256",
                                   "wall_seconds"};

// -------------------------------------------------------------------------------------------------
// Report assembly.

struct MethodData {
  std::string name;
  std::string color;
  std::vector<const RoundRecord*> records;  // sorted by round
  double initial_eval_loss = kNaN;
  double initial_accuracy = kNaN;
};

std::vector<MethodData> GroupByMethod(const ReportInput& in) {
  std::vector<std::string> order;
  std::set<std::string> seen;
  auto add = [&](const std::string& m) {
    if (seen.insert(m).second) order.push_back(m);
  };
  for (const MethodSummary& s : in.summaries) add(s.method);
  for (const RoundRecord& r : in.rounds) add(r.method);
  for (const auto& [m, loss] : in.initial_eval_loss) add(m);
  for (const auto& [m, accuracy] : in.initial_accuracy) add(m);

  std::vector<MethodData> out;
  for (size_t i = 0; i < order.size(); ++i) {
    MethodData md;
    md.name = order[i];
    md.color = kPalette[i % std::size(kPalette)];
    for (const RoundRecord& r : in.rounds) {
      if (r.method == md.name) md.records.push_back(&r);
    }
    std::stable_sort(md.records.begin(), md.records.end(),
                     [](const RoundRecord* a, const RoundRecord* b) { return a->round < b->round; });
    if (auto it = in.initial_eval_loss.find(md.name); it != in.initial_eval_loss.end()) {
      md.initial_eval_loss = it->second;
    }
    if (auto it = in.initial_accuracy.find(md.name); it != in.initial_accuracy.end()) {
      md.initial_accuracy = it->second;
    }
    out.push_back(std::move(md));
  }
  return out;
}

struct MetricSpec {
  std::string name;                     // legend label and data-metric
  double (*value)(const RoundRecord&);  // the y value of a record
};

// A chart with one series per (method, metric): colour = method, dash = metric. `x` maps a record
// to its x value; `initial`, when not null, names the method's value before round 1, drawn at x = 0
// (initial_eval_loss, initial_accuracy). Aborted rounds are marked on the first metric's line.
Chart MetricChart(std::string id, std::string title, std::string x_label, std::string y_label,
                  const std::vector<MethodData>& methods, const std::vector<MetricSpec>& metrics,
                  double (*x)(const RoundRecord&), double MethodData::*initial) {
  Chart c;
  c.id = std::move(id);
  c.title = std::move(title);
  c.x_label = std::move(x_label);
  c.y_label = std::move(y_label);
  bool any_aborted = false;
  for (const MethodData& m : methods) {
    for (size_t k = 0; k < metrics.size(); ++k) {
      Series s;
      s.method = m.name;
      s.metric = metrics.size() > 1 ? metrics[k].name : "";
      s.color = m.color;
      s.dash = kDashes[k % std::size(kDashes)];
      if (initial != nullptr && std::isfinite(m.*initial)) s.points.push_back({0, m.*initial});
      for (const RoundRecord* r : m.records) {
        const Point p{x(*r), metrics[k].value(*r)};
        s.points.push_back(p);
        if (!r->committed && k == 0) {
          s.aborted.push_back({p, r->round});
          any_aborted = true;
        }
      }
      std::stable_sort(s.points.begin(), s.points.end(), [](const Point& a, const Point& b) { return a.x < b.x; });
      c.series.push_back(std::move(s));
    }
    c.legend.push_back({m.name, m.color, "", false});
  }
  if (metrics.size() > 1) {
    for (size_t k = 0; k < metrics.size(); ++k) {
      c.legend.push_back({metrics[k].name, kMetricGrey, kDashes[k % std::size(kDashes)], false});
    }
  }
  if (any_aborted) c.legend.push_back({"aborted round", kMetricGrey, "", true});
  return c;
}

double ByRound(const RoundRecord& r) { return static_cast<double>(r.round); }
double ByHours(const RoundRecord& r) { return r.end_time_s / 3600; }

// Declined tasks by reason: per method, the rounds with a decline and a total.
std::string DeclineTable(const std::vector<MethodData>& methods) {
  struct Counts {
    int64_t declined = 0, memory = 0, unsupported = 0;
    void Add(const RoundRecord& r) {
      declined += r.declined;
      memory += r.declined_memory;
      unsupported += r.declined_unsupported;
    }
  };
  auto cells = [](const Counts& c) {
    std::string o;
    for (int64_t v : {c.declined, c.memory, c.unsupported, c.declined - c.memory - c.unsupported}) {
      o += StrCat("<td class=\"num\">", v, "</td>");
    }
    return o;
  };
  std::string rows;
  for (const MethodData& m : methods) {
    Counts total;
    for (const RoundRecord* r : m.records) {
      if (r->declined == 0) continue;
      Counts round;
      round.Add(*r);
      total.Add(*r);
      rows +=
          StrCat("<tr><td>", HtmlEscape(m.name), "</td><td class=\"num\">", r->round, "</td>", cells(round), "</tr>\n");
    }
    if (total.declined > 0) {
      rows += StrCat("<tr class=\"total\"><td>", HtmlEscape(m.name), "</td><td>total</td>", cells(total), "</tr>\n");
    }
  }
  std::string o = "<h2>Declined tasks</h2>\n";
  if (rows.empty()) return o + "<p>No selected device declined its task.</p>\n";
  o += "<table class=\"declines\">\n<tr><th>method</th><th>round</th><th>declined</th><th>memory</th>"
       "<th>unsupported</th><th>other</th></tr>\n";
  o += rows;
  o += "</table>\n<p class=\"legend-note\">Selected devices that declined their task, by reason: <b>memory</b>, "
       "the device's memory planner found no plan within its budget (base weights, adapter, activations); "
       "<b>unsupported</b>, a method, weight representation or base model the device does not run; "
       "<b>other</b>, run conditions or the user. Rounds without a decline are left out.</p>\n";
  return o;
}

std::string Figure(const Chart& c, std::string_view caption) {
  return StrCat("<figure id=\"", c.id, "\">\n", RenderChart(c), "\n<figcaption>", HtmlEscape(caption),
                "</figcaption>\n</figure>\n");
}

constexpr std::string_view kStyle =
    R"(body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1000px;padding:0 16px;color:#222;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.9em;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}th.num{text-align:right}tr.total td{font-weight:600}
.notes p{white-space:pre-wrap}
.swatch-box{display:inline-block;width:10px;height:10px;margin-right:6px;vertical-align:baseline}
figure{margin:16px 0}figcaption{font-size:0.85em;color:#555;max-width:780px}
svg.chart{max-width:100%;height:auto;font-size:12px;font-family:inherit}
svg .title{font-size:14px;font-weight:600}svg .axis-label{font-size:12px}
svg .grid{stroke:#e2e2e2;stroke-width:1}svg .grid.minor{stroke:#f1f1f1}
svg .frame{fill:none;stroke:#888;stroke-width:1}
svg path.line{fill:none;stroke-width:2;stroke-linejoin:round;stroke-linecap:round}
svg path.aborted{fill:none;stroke-width:2}svg line.swatch{stroke-width:2.5}
)";

}  // namespace

// -------------------------------------------------------------------------------------------------
// Records: JSON, CSV, log.

nlohmann::json ToJson(const RoundRecord& r) {
  nlohmann::json j = nlohmann::json::object();
  j["method"] = r.method;
  j["round"] = r.round;
  j["committed"] = r.committed;
  j["start_time_s"] = JsonNumber(r.start_time_s);
  j["end_time_s"] = JsonNumber(r.end_time_s);
  j["available"] = r.available;
  j["selected"] = r.selected;
  j["participants"] = r.participants;
  j["dropouts"] = r.dropouts;
  j["stragglers"] = r.stragglers;
  j["declined"] = r.declined;
  j["declined_memory"] = r.declined_memory;
  j["declined_unsupported"] = r.declined_unsupported;
  j["train_loss"] = JsonNumber(r.train_loss);
  j["eval_loss"] = JsonNumber(r.eval_loss);
  j["accuracy"] = JsonNumber(r.accuracy);
  j["bytes_up_per_client"] = JsonNumber(r.bytes_up_per_client);
  j["bytes_down_per_client"] = JsonNumber(r.bytes_down_per_client);
  j["processed_tokens"] = r.processed_tokens;
  j["device_tokens_per_second"] = JsonNumber(r.device_tokens_per_second);
  j["energy_joules"] = JsonNumber(r.energy_joules);
  j["device_flops"] = JsonNumber(r.device_flops);
  j["perturbations"] = r.perturbations;
  j["gradient_variance"] = JsonNumber(r.gradient_variance);
  j["epsilon"] = JsonNumber(r.epsilon);
  j["rho"] = JsonNumber(r.rho);
  j["epsilon_delta_1e10"] = JsonNumber(r.epsilon_delta_1e10);
  j["global_sha256"] = r.global_sha256;
  j["wall_seconds"] = JsonNumber(r.wall_seconds);
  return j;
}

absl::StatusOr<RoundRecord> RoundRecordFromJson(const nlohmann::json& j) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(ToAbsl(StrCat("round record: expected a JSON object, got ", j.type_name())));
  }
  RoundRecord r;
  auto bad = [](const char* key, const char* want, const nlohmann::json& v) {
    return absl::InvalidArgumentError(
        ToAbsl(StrCat("round record field '", key, "': expected ", want, ", got ", v.type_name())));
  };
  auto get_double = [&](const char* key, double& out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end()) return absl::OkStatus();
    if (it->is_null()) {
      out = kNaN;
    } else if (it->is_number()) {
      out = it->get<double>();
    } else {
      return bad(key, "a number or null", *it);
    }
    return absl::OkStatus();
  };
  auto get_int = [&](const char* key, int64_t& out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end()) return absl::OkStatus();
    if (!it->is_number_integer()) return bad(key, "an integer", *it);
    out = it->get<int64_t>();
    return absl::OkStatus();
  };
  if (auto it = j.find("method"); it != j.end()) {
    if (!it->is_string()) return bad("method", "a string", *it);
    r.method = it->get<std::string>();
  }
  if (auto it = j.find("global_sha256"); it != j.end()) {
    if (!it->is_string()) return bad("global_sha256", "a string", *it);
    r.global_sha256 = it->get<std::string>();
  }
  if (auto it = j.find("committed"); it != j.end()) {
    if (!it->is_boolean()) return bad("committed", "a boolean", *it);
    r.committed = it->get<bool>();
  }
  SEEDLING_RETURN_IF_ERROR(get_int("round", r.round));
  SEEDLING_RETURN_IF_ERROR(get_double("start_time_s", r.start_time_s));
  SEEDLING_RETURN_IF_ERROR(get_double("end_time_s", r.end_time_s));
  SEEDLING_RETURN_IF_ERROR(get_int("available", r.available));
  SEEDLING_RETURN_IF_ERROR(get_int("selected", r.selected));
  SEEDLING_RETURN_IF_ERROR(get_int("participants", r.participants));
  SEEDLING_RETURN_IF_ERROR(get_int("dropouts", r.dropouts));
  SEEDLING_RETURN_IF_ERROR(get_int("stragglers", r.stragglers));
  SEEDLING_RETURN_IF_ERROR(get_int("declined", r.declined));
  SEEDLING_RETURN_IF_ERROR(get_int("declined_memory", r.declined_memory));
  SEEDLING_RETURN_IF_ERROR(get_int("declined_unsupported", r.declined_unsupported));
  SEEDLING_RETURN_IF_ERROR(get_double("train_loss", r.train_loss));
  SEEDLING_RETURN_IF_ERROR(get_double("eval_loss", r.eval_loss));
  SEEDLING_RETURN_IF_ERROR(get_double("accuracy", r.accuracy));
  SEEDLING_RETURN_IF_ERROR(get_double("bytes_up_per_client", r.bytes_up_per_client));
  SEEDLING_RETURN_IF_ERROR(get_double("bytes_down_per_client", r.bytes_down_per_client));
  SEEDLING_RETURN_IF_ERROR(get_int("processed_tokens", r.processed_tokens));
  SEEDLING_RETURN_IF_ERROR(get_double("device_tokens_per_second", r.device_tokens_per_second));
  SEEDLING_RETURN_IF_ERROR(get_double("energy_joules", r.energy_joules));
  SEEDLING_RETURN_IF_ERROR(get_double("device_flops", r.device_flops));
  SEEDLING_RETURN_IF_ERROR(get_int("perturbations", r.perturbations));
  SEEDLING_RETURN_IF_ERROR(get_double("gradient_variance", r.gradient_variance));
  SEEDLING_RETURN_IF_ERROR(get_double("epsilon", r.epsilon));
  SEEDLING_RETURN_IF_ERROR(get_double("rho", r.rho));
  SEEDLING_RETURN_IF_ERROR(get_double("epsilon_delta_1e10", r.epsilon_delta_1e10));
  SEEDLING_RETURN_IF_ERROR(get_double("wall_seconds", r.wall_seconds));
  return r;
}

std::string CsvHeader() {
  std::string s;
  for (const char* f : kFields) {
    if (!s.empty()) s += ',';
    s += f;
  }
  s += '\n';
  return s;
}

std::string ToCsvRow(const RoundRecord& r) {
  return StrCat(CsvField(r.method), ",", r.round, ",", r.committed ? "true" : "false", ",", CsvNumber(r.start_time_s),
                ",", CsvNumber(r.end_time_s), ",", r.available, ",", r.selected, ",", r.participants, ",", r.dropouts,
                ",", r.stragglers, ",", r.declined, ",", r.declined_memory, ",", r.declined_unsupported, ",",
                CsvNumber(r.train_loss), ",", CsvNumber(r.eval_loss), ",", CsvNumber(r.accuracy), ",",
                CsvNumber(r.bytes_up_per_client), ",", CsvNumber(r.bytes_down_per_client), ",", r.processed_tokens, ",",
                CsvNumber(r.device_tokens_per_second), ",", CsvNumber(r.energy_joules), ",", CsvNumber(r.device_flops),
                ",", r.perturbations, ",", CsvNumber(r.gradient_variance), ",", CsvNumber(r.epsilon), ",",
                CsvNumber(r.rho), ",", CsvNumber(r.epsilon_delta_1e10), ",", CsvField(r.global_sha256), ",",
                CsvNumber(r.wall_seconds), "\n");
}

namespace {

// Opens `path` for appending (and reading) and makes sure the next write starts a new line: a run
// killed in the middle of a line leaves a partial record, which must not swallow the next one.
absl::StatusOr<std::FILE*> OpenForAppend(const std::string& path, bool* empty) {
  std::FILE* f = std::fopen(path.c_str(), "a+b");
  if (f == nullptr) return ErrnoStatus(errno, "cannot open", path);
  if (std::fseek(f, 0, SEEK_END) != 0) {
    const int err = errno;
    std::fclose(f);
    return ErrnoStatus(err, "cannot seek in", path);
  }
  const long size = std::ftell(f);
  *empty = size == 0;
  bool newline = false;
  if (size > 0 && std::fseek(f, size - 1, SEEK_SET) == 0) newline = std::fgetc(f) != '\n';
  std::fseek(f, 0, SEEK_END);  // C11 7.21.5.3: reposition between a read and a write
  if (newline) {
    if (std::fputc('\n', f) == EOF || std::fflush(f) != 0) {
      const int err = errno;
      std::fclose(f);
      return ErrnoStatus(err, "cannot write", path);
    }
  }
  return f;
}

}  // namespace

absl::StatusOr<RoundLog> RoundLog::Open(const std::string& dir) {
  SEEDLING_RETURN_IF_ERROR(MakeDirs(dir));
  std::string jsonl_path = JoinPath(dir, "rounds.jsonl");
  std::string csv_path = JoinPath(dir, "rounds.csv");

  const std::string header = CsvHeader();
  if (FileExists(csv_path)) {
    std::ifstream in(csv_path, std::ios::binary);
    std::string first;
    if (!in) return ErrnoStatus(errno, "cannot open", csv_path);
    std::getline(in, first);
    if (!first.empty() && first + "\n" != header) {
      return absl::FailedPreconditionError(
          ToAbsl(StrCat("'", csv_path, "' starts with '", first, "', expected the header '",
                        std::string_view(header).substr(0, header.size() - 1),
                        "' (written by another version?); move it away or use another output directory")));
    }
  }
  bool jsonl_empty = false, csv_empty = false;
  SEEDLING_ASSIGN_OR_RETURN(std::FILE * jsonl_file, OpenForAppend(jsonl_path, &jsonl_empty));
  FilePtr jsonl(jsonl_file);
  SEEDLING_ASSIGN_OR_RETURN(std::FILE * csv_file, OpenForAppend(csv_path, &csv_empty));
  FilePtr csv(csv_file);
  if (csv_empty) {
    if (std::fwrite(header.data(), 1, header.size(), csv.get()) != header.size() || std::fflush(csv.get()) != 0) {
      return ErrnoStatus(errno, "cannot write", csv_path);
    }
  }
  return RoundLog(std::move(jsonl_path), std::move(csv_path), std::move(jsonl), std::move(csv));
}

absl::Status RoundLog::Append(const RoundRecord& r) {
  if (!jsonl_ || !csv_) return absl::FailedPreconditionError("RoundLog used after being moved from");
  const std::string line = ToJson(r).dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), jsonl_.get()) != line.size() || std::fflush(jsonl_.get()) != 0) {
    return ErrnoStatus(errno, "cannot write", jsonl_path_);
  }
  const std::string row = ToCsvRow(r);
  if (std::fwrite(row.data(), 1, row.size(), csv_.get()) != row.size() || std::fflush(csv_.get()) != 0) {
    return ErrnoStatus(errno, "cannot write", csv_path_);
  }
  return absl::OkStatus();
}

// -------------------------------------------------------------------------------------------------
// Summaries.

MethodSummary Summarize(std::string method, double initial_eval_loss, std::span<const RoundRecord> records) {
  std::vector<const RoundRecord*> mine;
  for (const RoundRecord& r : records) {
    if (r.method == method) mine.push_back(&r);
  }
  std::stable_sort(mine.begin(), mine.end(),
                   [](const RoundRecord* a, const RoundRecord* b) { return a->round < b->round; });

  MethodSummary s;
  s.method = std::move(method);
  s.initial_eval_loss = initial_eval_loss;
  s.final_eval_loss = initial_eval_loss;
  s.rounds = static_cast<int64_t>(mine.size());
  double up = 0, down = 0, weight = 0, latest_end = 0, energy = 0, wall = 0;
  for (const RoundRecord* r : mine) {
    if (r->committed) {
      ++s.committed_rounds;
      if (r->participants > 0) {
        const double w = static_cast<double>(r->participants);
        up += r->bytes_up_per_client * w;
        down += r->bytes_down_per_client * w;
        weight += w;
      }
    }
    if (std::isfinite(r->eval_loss)) s.final_eval_loss = r->eval_loss;
    if (std::isfinite(r->accuracy)) s.final_accuracy = r->accuracy;
    if (std::isfinite(r->epsilon)) s.epsilon = r->epsilon;
    if (std::isfinite(r->rho)) s.rho = r->rho;
    if (std::isfinite(r->epsilon_delta_1e10)) s.epsilon_delta_1e10 = r->epsilon_delta_1e10;
    if (std::isfinite(r->end_time_s)) latest_end = std::max(latest_end, r->end_time_s);
    if (std::isfinite(r->energy_joules)) energy += r->energy_joules;
    if (std::isfinite(r->wall_seconds)) wall += r->wall_seconds;
  }
  if (weight > 0) {
    s.bytes_up_per_client_per_round = up / weight;
    s.bytes_down_per_client_per_round = down / weight;
  }
  s.simulated_hours = latest_end / 3600;
  s.energy_kj = energy / 1000;
  s.wall_seconds = wall;
  return s;
}

namespace {

struct Column {
  std::string header;
  bool numeric;
  std::string (*cell)(const MethodSummary&);
};

std::vector<Column> SummaryColumns(std::span<const MethodSummary> summaries) {
  std::vector<Column> cols = {
      {"method", false, [](const MethodSummary& s) { return s.method; }},
      {"rounds", true, [](const MethodSummary& s) { return StrCat(s.rounds); }},
      {"committed", true, [](const MethodSummary& s) { return StrCat(s.committed_rounds); }},
      {"initial loss", true, [](const MethodSummary& s) { return G4(s.initial_eval_loss); }},
      {"final loss", true, [](const MethodSummary& s) { return G4(s.final_eval_loss); }},
      {"up/client/round", true, [](const MethodSummary& s) { return HumanBytes(s.bytes_up_per_client_per_round); }},
      {"down/client/round", true, [](const MethodSummary& s) { return HumanBytes(s.bytes_down_per_client_per_round); }},
      {"simulated h", true, [](const MethodSummary& s) { return G4(s.simulated_hours); }},
      {"energy kJ", true, [](const MethodSummary& s) { return G4(s.energy_kj); }},
      {"wall s", true, [](const MethodSummary& s) { return G4(s.wall_seconds); }},
  };
  bool any_accuracy = false, any_epsilon = false, any_rho = false;
  for (const MethodSummary& s : summaries) {
    any_accuracy |= std::isfinite(s.final_accuracy);
    any_epsilon |= std::isfinite(s.epsilon);
    any_rho |= std::isfinite(s.rho);
  }
  if (any_accuracy) {
    cols.push_back({"accuracy", true, [](const MethodSummary& s) { return G4(s.final_accuracy); }});
  }
  if (any_epsilon) {
    cols.push_back({"epsilon", true, [](const MethodSummary& s) { return G4(s.epsilon); }});
  }
  if (any_rho) {  // DP-FTRL's zCDP and its epsilon at delta = 1e-10 ("-" for the other runs)
    cols.push_back({"rho", true, [](const MethodSummary& s) { return G4(s.rho); }});
    cols.push_back({"epsilon@1e-10", true, [](const MethodSummary& s) { return G4(s.epsilon_delta_1e10); }});
  }
  return cols;
}

}  // namespace

std::string SummaryTable(std::span<const MethodSummary> summaries) {
  const std::vector<Column> cols = SummaryColumns(summaries);
  std::vector<std::vector<std::string>> rows;
  std::vector<size_t> width(cols.size());
  for (size_t c = 0; c < cols.size(); ++c) width[c] = TextWidth(cols[c].header);
  for (const MethodSummary& s : summaries) {
    std::vector<std::string> row;
    for (size_t c = 0; c < cols.size(); ++c) {
      row.push_back(cols[c].cell(s));
      width[c] = std::max(width[c], TextWidth(row.back()));
    }
    rows.push_back(std::move(row));
  }
  auto line = [&](auto cell_text) {
    std::string out;
    for (size_t c = 0; c < cols.size(); ++c) {
      const std::string text = cell_text(c);
      const std::string pad(width[c] - TextWidth(text), ' ');
      if (c > 0) out += "  ";
      out += cols[c].numeric ? pad + text : text + pad;
    }
    return out + "\n";
  };
  std::string out = line([&](size_t c) { return cols[c].header; });
  size_t total = 0;
  for (size_t c = 0; c < cols.size(); ++c) total += width[c] + (c > 0 ? 2 : 0);
  out += std::string(total, '-') + "\n";
  for (const auto& row : rows) out += line([&](size_t c) { return row[c]; });
  return out;
}

TargetCost CostToTarget(std::string method, double target_loss, std::span<const RoundRecord> records) {
  std::vector<const RoundRecord*> mine;
  for (const RoundRecord& r : records) {
    if (r.method == method) mine.push_back(&r);
  }
  std::stable_sort(mine.begin(), mine.end(),
                   [](const RoundRecord* a, const RoundRecord* b) { return a->round < b->round; });
  TargetCost cost;
  cost.method = std::move(method);
  cost.target_loss = target_loss;
  double flops = 0, energy = 0;
  for (const RoundRecord* r : mine) {
    if (std::isfinite(r->device_flops)) flops += r->device_flops;
    if (std::isfinite(r->energy_joules)) energy += r->energy_joules;
    if (r->eval_loss <= target_loss) {  // false for a NaN loss or target
      cost.round = r->round;
      cost.simulated_hours = r->end_time_s / 3600;
      cost.device_flops = flops;
      cost.energy_kj = energy / 1000;
      break;
    }
  }
  return cost;
}

double DefaultTargetLoss(std::span<const MethodSummary> summaries) {
  double target = kNaN;
  for (const MethodSummary& s : summaries) {
    if (!(s.final_eval_loss < s.initial_eval_loss)) continue;  // did not learn (or NaN)
    if (!(target >= s.final_eval_loss)) target = s.final_eval_loss;
  }
  return target;
}

namespace {

// "1.23e+15": FLOP counts span many orders of magnitude across methods.
std::string Sci3(double v) {
  if (!std::isfinite(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g", v);
  return buf;
}

struct TargetColumn {
  std::string header;
  bool numeric;
  std::string (*cell)(const TargetCost&);
};

std::vector<TargetColumn> TargetColumns() {
  return {
      {"method", false, [](const TargetCost& c) { return c.method; }},
      {"rounds", true, [](const TargetCost& c) { return c.reached() ? StrCat(c.round) : std::string("not reached"); }},
      {"simulated h", true, [](const TargetCost& c) { return G4(c.simulated_hours); }},
      {"device FLOPs", true, [](const TargetCost& c) { return Sci3(c.device_flops); }},
      {"energy kJ", true, [](const TargetCost& c) { return G4(c.energy_kj); }},
  };
}

}  // namespace

std::string TargetTable(std::span<const TargetCost> costs) {
  if (costs.empty()) return "";
  const std::vector<TargetColumn> cols = TargetColumns();
  std::vector<size_t> width(cols.size());
  std::vector<std::vector<std::string>> rows;
  for (size_t c = 0; c < cols.size(); ++c) width[c] = TextWidth(cols[c].header);
  for (const TargetCost& cost : costs) {
    std::vector<std::string> row;
    for (size_t c = 0; c < cols.size(); ++c) {
      row.push_back(cols[c].cell(cost));
      width[c] = std::max(width[c], TextWidth(row.back()));
    }
    rows.push_back(std::move(row));
  }
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (size_t c = 0; c < cols.size(); ++c) {
      const std::string pad(width[c] - TextWidth(cells[c]), ' ');
      if (c > 0) out += "  ";
      out += cols[c].numeric ? pad + cells[c] : cells[c] + pad;
    }
    return out + "\n";
  };
  std::string out = StrCat("Cost to reach held-out loss ", G4(costs.front().target_loss), "\n");
  std::vector<std::string> header;
  for (const TargetColumn& c : cols) header.push_back(c.header);
  out += line(header);
  size_t total = 0;
  for (size_t c = 0; c < cols.size(); ++c) total += width[c] + (c > 0 ? 2 : 0);
  out += std::string(total, '-') + "\n";
  for (const auto& row : rows) out += line(row);
  return out;
}

// -------------------------------------------------------------------------------------------------
// HTML report.

namespace {

// "a", "a and b", "a, b and c".
std::string JoinAnd(const std::vector<std::string>& items) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += i + 1 == items.size() ? " and " : ", ";
    out += items[i];
  }
  return out;
}

// The opening paragraph: what ran, from `run`, and how each method ended, from its summary. Every
// string is escaped here; numbers are formatted as the summary table formats them.
std::string RunSummaryParagraph(const ReportInput& input, const std::vector<MethodData>& methods) {
  const RunDescription& run = input.run;
  const bool described = !run.model.empty() || run.devices > 0 || run.rounds > 0 || run.clients_per_round > 0 ||
                         !run.data.empty() || !run.partition.empty();
  if (!described && input.summaries.empty()) return "";
  std::vector<std::string> names;
  for (const MethodData& m : methods) names.push_back(HtmlEscape(m.name));

  std::string o = "<p class=\"run-summary\">Ran ";
  o += names.empty() ? std::string("the simulation") : JoinAnd(names);
  if (names.size() > 1) o += ", one after the other,";
  if (!run.model.empty()) o += StrCat(" fine-tuning ", HtmlEscape(run.model));
  if (run.devices > 0) {
    o += StrCat(" on ", run.devices, " simulated phones");
    if (run.heldout_devices > 0) o += StrCat(" (+", run.heldout_devices, " held out for evaluation)");
  }
  if (run.rounds > 0 || run.clients_per_round > 0) {
    o += ": ";
    o += run.rounds > 0 ? StrCat(run.rounds, run.rounds == 1 ? " round" : " rounds") : std::string("rounds");
    if (run.clients_per_round > 0) o += StrCat(" of ", run.clients_per_round, " clients per round");
    if (names.size() > 1) o += " each";
  }
  if (!run.data.empty()) o += StrCat(", on ", HtmlEscape(run.data));
  if (!run.partition.empty()) o += StrCat(", ", HtmlEscape(run.partition));
  if (std::isfinite(run.label_tv_distance)) {
    o += StrCat("; label total-variation distance from the global mix ", G4(run.label_tv_distance), " (0 is IID)");
  }
  o += ".";
  for (const MethodSummary& s : input.summaries) {
    o += StrCat(" ", HtmlEscape(s.method), " committed ", s.committed_rounds, " of ", s.rounds,
                s.rounds == 1 ? " round" : " rounds", " in ", G4(s.simulated_hours),
                " simulated hours; held-out eval loss ", G4(s.initial_eval_loss), " before training, ",
                G4(s.final_eval_loss), " at the end");
    if (std::isfinite(s.final_accuracy)) {
      o += StrCat(", accuracy ", G4(s.final_accuracy));
      if (auto it = input.initial_accuracy.find(s.method);
          it != input.initial_accuracy.end() && std::isfinite(it->second)) {
        o += StrCat(" (", G4(it->second), " before training)");
      }
    }
    o += ".";
  }
  return o + "</p>\n";
}

std::string Percent(double fraction) {
  return std::isfinite(fraction) ? StrCat(Fixed(100 * fraction, 1), "%") : std::string("-");
}

// The population of emulated phones: one row per class, the "all" row set apart.
std::string PopulationTable(const std::vector<ClassStats>& population) {
  if (population.empty()) return "";
  struct PopulationColumn {
    const char* header;
    std::string (*cell)(const ClassStats&);
  };
  static const PopulationColumn kColumns[] = {
      {"devices", [](const ClassStats& c) { return StrCat(c.devices); }},
      {"share", [](const ClassStats& c) { return Percent(c.share); }},
      {"GFLOP/s", [](const ClassStats& c) { return G4(c.median_gflops); }},
      {"RAM", [](const ClassStats& c) { return HumanBytes(c.median_ram_bytes); }},
      {"memory budget", [](const ClassStats& c) { return HumanBytes(c.median_budget_bytes); }},
      {"down Mbit/s", [](const ClassStats& c) { return G4(c.median_downlink_mbps); }},
      {"up Mbit/s", [](const ClassStats& c) { return G4(c.median_uplink_mbps); }},
      {"RTT ms", [](const ClassStats& c) { return G4(c.median_rtt_ms); }},
      {"dropout", [](const ClassStats& c) { return Percent(c.mean_dropout); }},
      {"available h/day",
       [](const ClassStats& c) {
         return std::isfinite(c.mean_available_hours) ? Fixed(c.mean_available_hours, 1) : std::string("-");
       }},
  };
  std::string o = "<h2>Population</h2>\n<table class=\"population\">\n<tr><th>class</th>";
  for (const PopulationColumn& c : kColumns) o += StrCat("<th class=\"num\">", HtmlEscape(c.header), "</th>");
  o += "</tr>\n";
  for (const ClassStats& row : population) {
    o += row.whole_population ? "<tr class=\"total\">" : "<tr>";
    o += StrCat("<td>", HtmlEscape(row.name), "</td>");
    for (const PopulationColumn& c : kColumns) o += StrCat("<td class=\"num\">", HtmlEscape(c.cell(row)), "</td>");
    o += "</tr>\n";
  }
  o += "</table>\n<p class=\"legend-note\">Per phone class: devices drawn and their share; medians over the "
       "class's devices of sustained GFLOP/s, RAM, the app memory budget, downlink, uplink and round-trip time; "
       "the mean chance of dropping out of a task; and the mean hours of the first simulated day in which a "
       "device could train (charging, on an unmetered network and idle). The last row is every device.</p>\n";
  return o;
}

}  // namespace

std::string RenderReportHtml(const ReportInput& input) {
  const std::vector<MethodData> methods = GroupByMethod(input);
  const std::string title = input.title.empty() ? "Seedling simulation report" : input.title;

  std::string o;
  o += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
  o += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
  o += StrCat("<title>", HtmlEscape(title), "</title>\n<style>\n", kStyle, "</style>\n</head>\n<body>\n");
  o += StrCat("<h1>", HtmlEscape(title), "</h1>\n");
  o += RunSummaryParagraph(input, methods);

  if (!input.settings.empty()) {
    o += "<h2>Settings</h2>\n<table class=\"settings\">\n";
    for (const auto& [key, value] : input.settings) {
      o += StrCat("<tr><th>", HtmlEscape(key), "</th><td>", HtmlEscape(value), "</td></tr>\n");
    }
    o += "</table>\n";
  }
  o += PopulationTable(input.population);
  if (!input.notes.empty()) {
    o += "<section class=\"notes\">\n";
    for (const std::string& note : input.notes) o += StrCat("<p>", HtmlEscape(note), "</p>\n");
    o += "</section>\n";
  }

  if (!input.summaries.empty()) {
    const std::vector<Column> cols = SummaryColumns(input.summaries);
    o += "<h2>Summary</h2>\n<table class=\"summary\">\n<tr>";
    for (const Column& c : cols) o += StrCat("<th>", HtmlEscape(c.header), "</th>");
    o += "</tr>\n";
    for (const MethodSummary& s : input.summaries) {
      std::string color = kMetricGrey;
      for (const MethodData& m : methods) {
        if (m.name == s.method) color = m.color;
      }
      o += "<tr>";
      for (const Column& c : cols) {
        if (!c.numeric) {
          o += StrCat("<td><span class=\"swatch-box\" style=\"background:", color, "\"></span>", HtmlEscape(c.cell(s)),
                      "</td>");
        } else {
          o += StrCat("<td class=\"num\">", HtmlEscape(c.cell(s)), "</td>");
        }
      }
      o += "</tr>\n";
    }
    o += "</table>\n<p class=\"legend-note\">Bytes are per participating client per round, "
         "averaged over "
         "the accepted updates of committed rounds; energy and wall time include aborted "
         "rounds.</p>\n";
  }

  if (!input.targets.empty()) {
    o += StrCat("<h2>Cost to reach the target loss</h2>\n<p>Target: held-out loss ",
                HtmlEscape(G4(input.targets.front().target_loss)),
                ". Rounds, simulated time, device FLOPs and energy spent until the first round that reached it "
                "(aborted rounds included).</p>\n<table class=\"target\">\n<tr>");
    const std::vector<TargetColumn> cols = TargetColumns();
    for (const TargetColumn& c : cols) o += StrCat("<th>", HtmlEscape(c.header), "</th>");
    o += "</tr>\n";
    for (const TargetCost& cost : input.targets) {
      o += "<tr>";
      for (const TargetColumn& c : cols) {
        o += StrCat(c.numeric ? "<td class=\"num\">" : "<td>", HtmlEscape(c.cell(cost)), "</td>");
      }
      o += "</tr>\n";
    }
    o += "</table>\n";
  }

  o += "<h2>Figures</h2>\n";
  const MetricSpec eval_loss{"eval loss", [](const RoundRecord& r) { return r.eval_loss; }};
  {
    Chart c = MetricChart("fig-loss-round", "Eval loss vs round", "round", "eval loss", methods, {eval_loss}, ByRound,
                          &MethodData::initial_eval_loss);
    c.integer_x = true;
    o += Figure(c,
                "Held-out eval loss of the global model after each round (round 0: before training). "
                "Crosses mark aborted rounds; gaps are rounds without an evaluation.");
  }
  {
    Chart c = MetricChart("fig-loss-time", "Eval loss vs simulated time", "simulated time (hours)", "eval loss",
                          methods, {eval_loss}, ByHours, &MethodData::initial_eval_loss);
    o += Figure(c, "The same eval loss against simulated wall-clock time at the end of each round.");
  }
  {
    Chart c = MetricChart("fig-bytes", "Bytes per client per round", "round", "bytes per client", methods,
                          {{"up", [](const RoundRecord& r) { return r.bytes_up_per_client; }},
                           {"down", [](const RoundRecord& r) { return r.bytes_down_per_client; }}},
                          ByRound, nullptr);
    c.integer_x = true;
    c.zero_y = true;
    c.si_y = true;
    bool log = input.bytes_axis == AxisScale::kLog;
    if (input.bytes_axis == AxisScale::kAuto) {
      double mn = std::numeric_limits<double>::infinity(), mx = 0;
      for (const Series& s : c.series) {
        for (const Point& p : s.points) {
          if (std::isfinite(p.y) && p.y > 0) {
            mn = std::min(mn, p.y);
            mx = std::max(mx, p.y);
          }
        }
      }
      log = mx > 0 && mx / mn > 100;
    }
    if (log) {
      c.log_y = true;
      c.zero_y = false;
      c.y_label = "bytes per client (log scale)";
    }
    o += Figure(c, "Mean bytes uploaded (solid) and downloaded (dashed) per participating client.");
  }
  {
    Chart c = MetricChart("fig-participation", "Participation per round", "round", "devices", methods,
                          {{"participants", [](const RoundRecord& r) { return double(r.participants); }},
                           {"dropouts", [](const RoundRecord& r) { return double(r.dropouts); }},
                           {"stragglers", [](const RoundRecord& r) { return double(r.stragglers); }}},
                          ByRound, nullptr);
    c.integer_x = true;
    c.integer_y = true;
    c.zero_y = true;
    o += Figure(c,
                "Accepted updates (solid), dropouts (dashed) and stragglers whose upload came too late "
                "(dotted) per round.");
  }
  bool any_accuracy = false, any_epsilon = false, any_epsilon_1e10 = false, any_speed = false;
  for (const RoundRecord& r : input.rounds) {
    any_accuracy |= std::isfinite(r.accuracy);
    any_epsilon |= std::isfinite(r.epsilon);
    any_epsilon_1e10 |= std::isfinite(r.epsilon_delta_1e10);
    any_speed |= std::isfinite(r.device_tokens_per_second);
  }
  if (any_speed) {
    Chart c =
        MetricChart("fig-device-speed", "Device training speed per round", "round", "tokens per second", methods,
                    {{"tokens/s", [](const RoundRecord& r) { return r.device_tokens_per_second; }}}, ByRound, nullptr);
    c.integer_x = true;
    c.zero_y = true;
    o += Figure(c,
                "Tokens the participants' local steps processed over their simulated compute seconds: the "
                "phones' training speed under the time model (device_tokens_per_second).");
  }
  if (any_accuracy) {
    const MetricSpec accuracy{"accuracy", [](const RoundRecord& r) { return r.accuracy; }};
    Chart c = MetricChart("fig-accuracy", "Accuracy vs round", "round", "accuracy", methods, {accuracy}, ByRound,
                          &MethodData::initial_accuracy);
    c.integer_x = true;
    o += Figure(c,
                "Held-out accuracy of the global model after each round (round 0: before training, where "
                "measured). Crosses mark aborted rounds.");
    Chart t = MetricChart("fig-accuracy-time", "Accuracy vs simulated time", "simulated time (hours)", "accuracy",
                          methods, {accuracy}, ByHours, &MethodData::initial_accuracy);
    o += Figure(t, "The same accuracy against simulated wall-clock time at the end of each round.");
  }
  if (any_epsilon) {
    std::vector<MetricSpec> spent = {{"epsilon", [](const RoundRecord& r) { return r.epsilon; }}};
    // DP-FTRL's runs also state their guarantee at delta = 1e-10 (dashed); the other runs have no such line.
    if (any_epsilon_1e10) {
      spent.push_back({"epsilon at delta 1e-10", [](const RoundRecord& r) { return r.epsilon_delta_1e10; }});
    }
    Chart c = MetricChart("fig-epsilon", "Privacy budget spent", "round", "epsilon", methods, spent, ByRound, nullptr);
    c.integer_x = true;
    c.zero_y = true;
    o += Figure(c, any_epsilon_1e10 ? "Differential-privacy epsilon spent so far, at the run's delta (solid) and, "
                                      "for DP-FTRL's zCDP guarantee, at delta = 1e-10 (dashed)."
                                    : "Differential-privacy epsilon spent so far.");
  }
  o += DeclineTable(methods);
  o += "</body>\n</html>\n";
  return o;
}

absl::Status WriteReport(const std::string& path, const ReportInput& input) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty() && !std::filesystem::is_directory(parent, ec)) {
    return absl::NotFoundError(
        ToAbsl(StrCat("cannot write report '", path, "': directory '", parent.string(), "' does not exist")));
  }
  return Annotate(WriteFileAtomic(path, RenderReportHtml(input)), StrCat("writing report '", path, "'"));
}

}  // namespace seedling::simulator
