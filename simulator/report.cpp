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

namespace seedling::simulator {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// -------------------------------------------------------------------------------------------------
// Number and string formatting (std::to_chars: locale-independent, deterministic).

// Shortest representation that parses back to the same double ("0.1", "45123", "1e-07").
std::string Shortest(double v) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, res.ptr);
}

// Like printf("%.4g").
std::string G4(double v) {
  if (!std::isfinite(v)) return "-";
  if (v == 0) v = 0;  // no "-0"
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::general, 4);
  return std::string(buf, res.ptr);
}

// Fixed-point with `digits` decimals, for SVG coordinates.
std::string Fixed(double v, int digits) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::fixed, digits);
  std::string s(buf, res.ptr);
  if (s == "-0.0" || s == "-0.00" || s == "-0") s.erase(0, 1);
  return s;
}

// 312 → "312 B", 46182 → "45.1 KiB" (binary units, as base/memory.h FormatBytes, but for doubles).
std::string HumanBytes(double b) {
  if (!std::isfinite(b)) return "-";
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (std::fabs(b) >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  if (u == 0) return StrCat(G4(std::round(b)), " B");
  return StrCat(Fixed(b, std::fabs(b) >= 100 ? 0 : 1), " ", kUnits[u]);
}

// SI-compact tick labels: 1500 → "1.5k", 2e6 → "2M".
std::string SiCompact(double v) {
  const double a = std::fabs(v);
  if (a >= 1e12) return StrCat(G4(v / 1e12), "T");
  if (a >= 1e9) return StrCat(G4(v / 1e9), "G");
  if (a >= 1e6) return StrCat(G4(v / 1e6), "M");
  if (a >= 1e3) return StrCat(G4(v / 1e3), "k");
  return G4(v);
}


std::string CsvField(std::string_view s) {
  if (s.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(s);
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  out += '"';
  return out;
}

std::string CsvNumber(double v) { return std::isfinite(v) ? Shortest(v) : std::string(); }

// At most `max` code points of UTF-8 text, "…" marking a cut.
std::string Truncate(std::string_view s, size_t max) {
  size_t points = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if ((static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) continue;
    if (points == max) return StrCat(s.substr(0, i), "\u2026");
    ++points;
  }
  return std::string(s);
}

// Display width of UTF-8 text: code points, not bytes.
size_t TextWidth(std::string_view s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

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
                                   "epsilon",
                                   "global_sha256",
                                   "wall_seconds"};

nlohmann::json JsonNumber(double v) {
  return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
}

// -------------------------------------------------------------------------------------------------
// SVG charts.

// Okabe & Ito (2008), "Color Universal Design", ordered for contrast on white (yellow last).
constexpr const char* kPalette[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7",
                                    "#E69F00", "#56B4E9", "#000000", "#F0E442"};
constexpr const char* kDashes[] = {"", "6 4", "2 3"};  // solid, dashed, dotted
constexpr const char* kMetricGrey = "#555555";

struct Point {
  double x;
  double y;  // NaN: a gap
};

struct Series {
  std::string method;
  std::string metric;  // "" for single-metric charts
  std::string color;
  std::string dash;           // stroke-dasharray, "" = solid
  std::vector<Point> points;  // sorted by x
  std::vector<std::pair<Point, int64_t>>
      aborted;  // marker position and round id; y NaN → on the x axis
};

struct LegendEntry {
  std::string label;
  std::string color;
  std::string dash;
  bool cross = false;  // an aborted-round marker instead of a line
};

struct Chart {
  std::string id;
  std::string title;
  std::string x_label;
  std::string y_label;
  bool log_y = false;
  bool integer_x = false;
  bool integer_y = false;
  bool zero_y = false;  // y range includes 0 (counts, bytes)
  bool si_y = false;    // SI-compact y tick labels (bytes)
  std::vector<Series> series;
  std::vector<LegendEntry> legend;
};

struct Axis {
  double lo = 0, hi = 1;
  bool log = false;
  std::vector<double> ticks;  // labelled
  std::vector<double> minor;  // unlabelled grid (log axes: 2..9 × 10^k)
};

// A 1/2/5 × 10^k step close to `raw`.
double NiceStep(double raw) {
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / mag;
  const double f = norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10;
  return f * mag;
}

Axis LinearAxis(double mn, double mx, bool integer, bool zero) {
  Axis a;
  if (!std::isfinite(mn) || !std::isfinite(mx)) {
    mn = 0;
    mx = 1;
  }
  if (zero) {
    mn = std::min(mn, 0.0);
    mx = std::max(mx, 0.0);
  }
  if (mx == mn) {
    const double pad = mn == 0 ? 1 : std::fabs(mn) * 0.1;
    mn -= pad;
    mx += pad;
    if (zero && mn < 0 && mn + pad >= 0) mn = 0;
  }
  double step = NiceStep((mx - mn) / 5);
  if (integer) step = std::max(step, 1.0);
  const double k0 = std::floor(mn / step + 1e-9);
  const double k1 = std::ceil(mx / step - 1e-9);
  if (!(k1 - k0 >= 1 && k1 - k0 <= 20)) {
    // Ranges a double cannot subdivide (1e20 ± 100, overflow): label the ends only.
    a.lo = mn;
    a.hi = mx > mn ? mx : mn + 1;
    a.ticks = {a.lo, a.hi};
    return a;
  }
  a.lo = k0 * step;
  a.hi = k1 * step;
  for (double k = k0; k <= k1; k += 1) {
    double v = k * step;
    if (std::fabs(v) < step * 1e-9) v = 0;
    a.ticks.push_back(v);
  }
  return a;
}

// Whole decades covering the positive values; ticks at powers of ten.
Axis LogAxis(double mn, double mx) {
  Axis a;
  a.log = true;
  if (!std::isfinite(mn) || !std::isfinite(mx) || mn <= 0) {
    mn = 1;
    mx = 10;
  }
  int lo = static_cast<int>(std::floor(std::log10(mn) + 1e-9));
  int hi = static_cast<int>(std::ceil(std::log10(mx) - 1e-9));
  if (hi <= lo) hi = lo + 1;
  a.lo = std::pow(10.0, lo);
  // Every decade up to 12 of them; beyond, every `every`-th (still powers of ten).
  const int every = (hi - lo + 11) / 12;
  hi = lo + (hi - lo + every - 1) / every * every;
  a.hi = std::pow(10.0, hi);
  for (int k = lo; k <= hi; ++k) {
    const double decade = std::pow(10.0, k);
    if ((k - lo) % every == 0) a.ticks.push_back(decade);
    if (k < hi && hi - lo <= 6) {
      for (int m = 2; m <= 9; ++m) a.minor.push_back(m * decade);
    }
  }
  return a;
}

// Fraction of the axis at v (0 = lo, 1 = hi).
double AxisFraction(const Axis& a, double v) {
  if (a.log) return (std::log10(v) - std::log10(a.lo)) / (std::log10(a.hi) - std::log10(a.lo));
  return (v - a.lo) / (a.hi - a.lo);
}

bool Plottable(double y, bool log) { return std::isfinite(y) && (!log || y > 0); }

// Plot geometry (viewBox units).
constexpr double kWidth = 780;
constexpr double kPlotLeft = 72, kPlotRight = 590, kPlotTop = 40;
constexpr double kPlotHeight = 290;
constexpr double kLegendX = 606, kLegendRow = 18;
constexpr size_t kLegendChars = 20;  // longer legend labels are cut (full text in a tooltip)

std::string RenderChart(const Chart& c) {
  // Ranges over the plottable data.
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin;
  double ymin = xmin, ymax = -xmin;
  for (const Series& s : c.series) {
    for (const Point& p : s.points) {
      if (!std::isfinite(p.x)) continue;
      xmin = std::min(xmin, p.x);
      xmax = std::max(xmax, p.x);
      if (!Plottable(p.y, c.log_y)) continue;
      ymin = std::min(ymin, p.y);
      ymax = std::max(ymax, p.y);
    }
    for (const auto& [p, round] : s.aborted) {
      if (!std::isfinite(p.x)) continue;
      xmin = std::min(xmin, p.x);
      xmax = std::max(xmax, p.x);
      if (!Plottable(p.y, c.log_y)) continue;
      ymin = std::min(ymin, p.y);
      ymax = std::max(ymax, p.y);
    }
  }
  const Axis xa = LinearAxis(xmin, xmax, c.integer_x, false);
  const Axis ya = c.log_y ? LogAxis(ymin, ymax) : LinearAxis(ymin, ymax, c.integer_y, c.zero_y);

  const double height =
      std::max(kPlotTop + kPlotHeight + 50, kPlotTop + 8 + kLegendRow * c.legend.size() + 10);
  const double bottom = kPlotTop + kPlotHeight;
  auto px = [&](double x) { return kPlotLeft + AxisFraction(xa, x) * (kPlotRight - kPlotLeft); };
  auto py = [&](double y) { return bottom - AxisFraction(ya, y) * kPlotHeight; };
  auto ylabel = [&](double v) { return c.si_y ? SiCompact(v) : G4(v); };

  std::string o;
  o += StrCat("<svg class=\"chart\" viewBox=\"0 0 ", Fixed(kWidth, 0), " ", Fixed(height, 0),
              "\" width=\"", Fixed(kWidth, 0), "\" height=\"", Fixed(height, 0),
              "\" role=\"img\" aria-label=\"", HtmlEscape(c.title), "\">\n");
  o += StrCat("<text class=\"title\" x=\"", Fixed((kPlotLeft + kPlotRight) / 2, 1),
              "\" y=\"22\" text-anchor=\"middle\">", HtmlEscape(c.title), "</text>\n");

  // Grid and ticks.
  for (double v : ya.minor) {
    o += StrCat("<line class=\"grid minor\" x1=\"", Fixed(kPlotLeft, 1), "\" x2=\"",
                Fixed(kPlotRight, 1), "\" y1=\"", Fixed(py(v), 1), "\" y2=\"", Fixed(py(v), 1),
                "\"/>\n");
  }
  for (double v : ya.ticks) {
    const std::string y = Fixed(py(v), 1);
    o += StrCat("<g class=\"ytick\" data-v=\"", Shortest(v), "\"><line class=\"grid\" x1=\"",
                Fixed(kPlotLeft, 1), "\" x2=\"", Fixed(kPlotRight, 1), "\" y1=\"", y, "\" y2=\"", y,
                "\"/><text x=\"", Fixed(kPlotLeft - 6, 1), "\" y=\"", y,
                "\" text-anchor=\"end\" dominant-baseline=\"middle\">", HtmlEscape(ylabel(v)),
                "</text></g>\n");
  }
  for (double v : xa.ticks) {
    const std::string x = Fixed(px(v), 1);
    o += StrCat("<g class=\"xtick\" data-v=\"", Shortest(v), "\"><line class=\"grid\" x1=\"", x,
                "\" x2=\"", x, "\" y1=\"", Fixed(kPlotTop, 1), "\" y2=\"", Fixed(bottom, 1),
                "\"/><text x=\"", x, "\" y=\"", Fixed(bottom + 16, 1), "\" text-anchor=\"middle\">",
                HtmlEscape(G4(v)), "</text></g>\n");
  }
  o += StrCat("<rect class=\"frame\" x=\"", Fixed(kPlotLeft, 1), "\" y=\"", Fixed(kPlotTop, 1),
              "\" width=\"", Fixed(kPlotRight - kPlotLeft, 1), "\" height=\"",
              Fixed(kPlotHeight, 1), "\"/>\n");
  o += StrCat("<text class=\"axis-label\" x=\"", Fixed((kPlotLeft + kPlotRight) / 2, 1), "\" y=\"",
              Fixed(bottom + 38, 1), "\" text-anchor=\"middle\">", HtmlEscape(c.x_label),
              "</text>\n");
  const std::string ycenter = Fixed(kPlotTop + kPlotHeight / 2, 1);
  o += StrCat("<text class=\"axis-label\" x=\"16\" y=\"", ycenter, "\" text-anchor=\"middle\" ",
              "transform=\"rotate(-90 16 ", ycenter, ")\">", HtmlEscape(c.y_label), "</text>\n");

  // Lines: one path per series, a new subpath after every gap; dots where a segment is a single
  // point (it would be invisible otherwise) or on every point of a short series (≤ 20 points).
  for (const Series& s : c.series) {
    std::string d;
    std::vector<Point> dots;
    const bool dot_all = s.points.size() <= 20;
    size_t run = 0;
    Point run_start{};
    for (const Point& p : s.points) {
      if (!std::isfinite(p.x) || !Plottable(p.y, c.log_y)) {
        if (run == 1 && !dot_all) dots.push_back(run_start);
        run = 0;
        continue;
      }
      const Point q{px(p.x), py(p.y)};
      if (!d.empty()) d += ' ';
      d += StrCat(run == 0 ? "M" : "L", Fixed(q.x, 2), ",", Fixed(q.y, 2));
      if (run == 0) run_start = q;
      if (dot_all) dots.push_back(q);
      ++run;
    }
    if (run == 1 && !dot_all) dots.push_back(run_start);
    o += StrCat("<path class=\"line\" data-method=\"", HtmlEscape(s.method), "\" data-metric=\"",
                HtmlEscape(s.metric), "\" stroke=\"", s.color, "\"");
    if (!s.dash.empty()) o += StrCat(" stroke-dasharray=\"", s.dash, "\"");
    o += StrCat(" d=\"", d, "\"/>\n");
    for (const Point& q : dots) {
      o += StrCat("<circle class=\"dot\" cx=\"", Fixed(q.x, 2), "\" cy=\"", Fixed(q.y, 2),
                  "\" r=\"2.5\" fill=\"", s.color, "\"/>\n");
    }
  }
  // Aborted rounds: a cross on the line, or on the x axis when the value is missing.
  for (const Series& s : c.series) {
    for (const auto& [p, round] : s.aborted) {
      if (!std::isfinite(p.x)) continue;
      const double x = px(p.x), y = Plottable(p.y, c.log_y) ? py(p.y) : bottom;
      o += StrCat("<path class=\"aborted\" stroke=\"", s.color, "\" d=\"M", Fixed(x - 4, 2), ",",
                  Fixed(y - 4, 2), " L", Fixed(x + 4, 2), ",", Fixed(y + 4, 2), " M",
                  Fixed(x - 4, 2), ",", Fixed(y + 4, 2), " L", Fixed(x + 4, 2), ",",
                  Fixed(y - 4, 2), "\"><title>", HtmlEscape(s.method), ": round ", round,
                  " aborted</title></path>\n");
    }
  }

  // Legend, right of the plot.
  o += "<g class=\"legend\">\n";
  double ly = kPlotTop + 8;
  for (const LegendEntry& e : c.legend) {
    const std::string y = Fixed(ly, 1);
    if (e.cross) {
      o += StrCat("<path class=\"aborted\" stroke=\"", e.color, "\" d=\"M", Fixed(kLegendX + 10, 1),
                  ",", Fixed(ly - 4, 1), " L", Fixed(kLegendX + 18, 1), ",", Fixed(ly + 4, 1), " M",
                  Fixed(kLegendX + 10, 1), ",", Fixed(ly + 4, 1), " L", Fixed(kLegendX + 18, 1),
                  ",", Fixed(ly - 4, 1), "\"/>");
    } else {
      o += StrCat("<line class=\"swatch\" x1=\"", Fixed(kLegendX, 1), "\" x2=\"",
                  Fixed(kLegendX + 28, 1), "\" y1=\"", y, "\" y2=\"", y, "\" stroke=\"", e.color,
                  "\"");
      if (!e.dash.empty()) o += StrCat(" stroke-dasharray=\"", e.dash, "\"");
      o += "/>";
    }
    o += StrCat("<text x=\"", Fixed(kLegendX + 34, 1), "\" y=\"", y,
                "\" dominant-baseline=\"middle\">", HtmlEscape(Truncate(e.label, kLegendChars)),
                "<title>", HtmlEscape(e.label), "</title></text>\n");
    ly += kLegendRow;
  }
  o += "</g>\n</svg>";
  return o;
}

// -------------------------------------------------------------------------------------------------
// Report assembly.

struct MethodData {
  std::string name;
  std::string color;
  std::vector<const RoundRecord*> records;  // sorted by round
  double initial_eval_loss = kNaN;
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

  std::vector<MethodData> out;
  for (size_t i = 0; i < order.size(); ++i) {
    MethodData md;
    md.name = order[i];
    md.color = kPalette[i % std::size(kPalette)];
    for (const RoundRecord& r : in.rounds) {
      if (r.method == md.name) md.records.push_back(&r);
    }
    std::stable_sort(
        md.records.begin(), md.records.end(),
        [](const RoundRecord* a, const RoundRecord* b) { return a->round < b->round; });
    if (auto it = in.initial_eval_loss.find(md.name); it != in.initial_eval_loss.end()) {
      md.initial_eval_loss = it->second;
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
// to its x value; `with_initial` adds the method's initial eval loss at x = 0. Aborted rounds are
// marked on the first metric's line.
Chart MetricChart(std::string id, std::string title, std::string x_label, std::string y_label,
                  const std::vector<MethodData>& methods, const std::vector<MetricSpec>& metrics,
                  double (*x)(const RoundRecord&), bool with_initial) {
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
      if (with_initial && std::isfinite(m.initial_eval_loss))
        s.points.push_back({0, m.initial_eval_loss});
      for (const RoundRecord* r : m.records) {
        const Point p{x(*r), metrics[k].value(*r)};
        s.points.push_back(p);
        if (!r->committed && k == 0) {
          s.aborted.push_back({p, r->round});
          any_aborted = true;
        }
      }
      std::stable_sort(s.points.begin(), s.points.end(),
                       [](const Point& a, const Point& b) { return a.x < b.x; });
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
      rows += StrCat("<tr><td>", HtmlEscape(m.name), "</td><td class=\"num\">", r->round, "</td>", cells(round),
                     "</tr>\n");
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
  return StrCat("<figure id=\"", c.id, "\">\n", RenderChart(c), "\n<figcaption>",
                HtmlEscape(caption), "</figcaption>\n</figure>\n");
}

constexpr std::string_view kStyle =
    R"(body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1000px;padding:0 16px;color:#222;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.9em;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.total td{font-weight:600}
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
  j["epsilon"] = JsonNumber(r.epsilon);
  j["global_sha256"] = r.global_sha256;
  j["wall_seconds"] = JsonNumber(r.wall_seconds);
  return j;
}

absl::StatusOr<RoundRecord> RoundRecordFromJson(const nlohmann::json& j) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        ToAbsl(StrCat("round record: expected a JSON object, got ", j.type_name())));
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
  SEEDLING_RETURN_IF_ERROR(get_double("epsilon", r.epsilon));
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
  return StrCat(CsvField(r.method), ",", r.round, ",", r.committed ? "true" : "false", ",",
                CsvNumber(r.start_time_s), ",", CsvNumber(r.end_time_s), ",", r.available, ",",
                r.selected, ",", r.participants, ",", r.dropouts, ",", r.stragglers, ",",
                r.declined, ",", r.declined_memory, ",", r.declined_unsupported, ",", CsvNumber(r.train_loss), ",", CsvNumber(r.eval_loss), ",",
                CsvNumber(r.accuracy), ",", CsvNumber(r.bytes_up_per_client), ",",
                CsvNumber(r.bytes_down_per_client), ",", r.processed_tokens, ",",
                CsvNumber(r.device_tokens_per_second), ",", CsvNumber(r.energy_joules), ",",
                CsvNumber(r.epsilon), ",", CsvField(r.global_sha256), ",", CsvNumber(r.wall_seconds), "\n");
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
      return absl::FailedPreconditionError(ToAbsl(
          StrCat("'", csv_path, "' starts with '", first, "', expected the header '",
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
    if (std::fwrite(header.data(), 1, header.size(), csv.get()) != header.size() ||
        std::fflush(csv.get()) != 0) {
      return ErrnoStatus(errno, "cannot write", csv_path);
    }
  }
  return RoundLog(std::move(jsonl_path), std::move(csv_path), std::move(jsonl), std::move(csv));
}

absl::Status RoundLog::Append(const RoundRecord& r) {
  if (!jsonl_ || !csv_)
    return absl::FailedPreconditionError("RoundLog used after being moved from");
  const std::string line = ToJson(r).dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), jsonl_.get()) != line.size() ||
      std::fflush(jsonl_.get()) != 0) {
    return ErrnoStatus(errno, "cannot write", jsonl_path_);
  }
  const std::string row = ToCsvRow(r);
  if (std::fwrite(row.data(), 1, row.size(), csv_.get()) != row.size() ||
      std::fflush(csv_.get()) != 0) {
    return ErrnoStatus(errno, "cannot write", csv_path_);
  }
  return absl::OkStatus();
}

// -------------------------------------------------------------------------------------------------
// Summaries.

MethodSummary Summarize(std::string method, double initial_eval_loss,
                        std::span<const RoundRecord> records) {
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
      {"up/client/round", true,
       [](const MethodSummary& s) { return HumanBytes(s.bytes_up_per_client_per_round); }},
      {"down/client/round", true,
       [](const MethodSummary& s) { return HumanBytes(s.bytes_down_per_client_per_round); }},
      {"simulated h", true, [](const MethodSummary& s) { return G4(s.simulated_hours); }},
      {"energy kJ", true, [](const MethodSummary& s) { return G4(s.energy_kj); }},
      {"wall s", true, [](const MethodSummary& s) { return G4(s.wall_seconds); }},
  };
  bool any_accuracy = false, any_epsilon = false;
  for (const MethodSummary& s : summaries) {
    any_accuracy |= std::isfinite(s.final_accuracy);
    any_epsilon |= std::isfinite(s.epsilon);
  }
  if (any_accuracy) {
    cols.push_back({"accuracy", true, [](const MethodSummary& s) { return G4(s.final_accuracy); }});
  }
  if (any_epsilon) {
    cols.push_back({"epsilon", true, [](const MethodSummary& s) { return G4(s.epsilon); }});
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

// -------------------------------------------------------------------------------------------------
// HTML report.

std::string RenderReportHtml(const ReportInput& input) {
  const std::vector<MethodData> methods = GroupByMethod(input);
  const std::string title = input.title.empty() ? "Seedling simulation report" : input.title;

  std::string o;
  o += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
  o += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
  o += StrCat("<title>", HtmlEscape(title), "</title>\n<style>\n", kStyle,
              "</style>\n</head>\n<body>\n");
  o += StrCat("<h1>", HtmlEscape(title), "</h1>\n");

  if (!input.settings.empty()) {
    o += "<h2>Settings</h2>\n<table class=\"settings\">\n";
    for (const auto& [key, value] : input.settings) {
      o += StrCat("<tr><th>", HtmlEscape(key), "</th><td>", HtmlEscape(value), "</td></tr>\n");
    }
    o += "</table>\n";
  }
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
          o += StrCat("<td><span class=\"swatch-box\" style=\"background:", color, "\"></span>",
                      HtmlEscape(c.cell(s)), "</td>");
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

  o += "<h2>Figures</h2>\n";
  const MetricSpec eval_loss{"eval loss", [](const RoundRecord& r) { return r.eval_loss; }};
  {
    Chart c = MetricChart("fig-loss-round", "Eval loss vs round", "round", "eval loss", methods,
                          {eval_loss}, ByRound, true);
    c.integer_x = true;
    o += Figure(
        c,
        "Held-out eval loss of the global model after each round (round 0: before training). "
        "Crosses mark aborted rounds; gaps are rounds without an evaluation.");
  }
  {
    Chart c = MetricChart("fig-loss-time", "Eval loss vs simulated time", "simulated time (hours)",
                          "eval loss", methods, {eval_loss}, ByHours, true);
    o +=
        Figure(c, "The same eval loss against simulated wall-clock time at the end of each round.");
  }
  {
    Chart c =
        MetricChart("fig-bytes", "Bytes per client per round", "round", "bytes per client", methods,
                    {{"up", [](const RoundRecord& r) { return r.bytes_up_per_client; }},
                     {"down", [](const RoundRecord& r) { return r.bytes_down_per_client; }}},
                    ByRound, false);
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
    Chart c =
        MetricChart("fig-participation", "Participation per round", "round", "devices", methods,
                    {{"participants", [](const RoundRecord& r) { return double(r.participants); }},
                     {"dropouts", [](const RoundRecord& r) { return double(r.dropouts); }},
                     {"stragglers", [](const RoundRecord& r) { return double(r.stragglers); }}},
                    ByRound, false);
    c.integer_x = true;
    c.integer_y = true;
    c.zero_y = true;
    o += Figure(
        c,
        "Accepted updates (solid), dropouts (dashed) and stragglers whose upload came too late "
        "(dotted) per round.");
  }
  bool any_accuracy = false, any_epsilon = false, any_speed = false;
  for (const RoundRecord& r : input.rounds) {
    any_accuracy |= std::isfinite(r.accuracy);
    any_epsilon |= std::isfinite(r.epsilon);
    any_speed |= std::isfinite(r.device_tokens_per_second);
  }
  if (any_speed) {
    Chart c = MetricChart("fig-device-speed", "Device training speed per round", "round", "tokens per second",
                          methods,
                          {{"tokens/s", [](const RoundRecord& r) { return r.device_tokens_per_second; }}},
                          ByRound, false);
    c.integer_x = true;
    c.zero_y = true;
    o += Figure(c,
                "Tokens the participants' local steps processed over their simulated compute seconds: the "
                "phones' training speed under the time model (device_tokens_per_second).");
  }
  if (any_accuracy) {
    Chart c = MetricChart("fig-accuracy", "Accuracy vs round", "round", "accuracy", methods,
                          {{"accuracy", [](const RoundRecord& r) { return r.accuracy; }}}, ByRound,
                          false);
    c.integer_x = true;
    o += Figure(c, "Held-out accuracy of the global model after each round.");
  }
  if (any_epsilon) {
    Chart c =
        MetricChart("fig-epsilon", "Privacy budget spent", "round", "epsilon", methods,
                    {{"epsilon", [](const RoundRecord& r) { return r.epsilon; }}}, ByRound, false);
    c.integer_x = true;
    c.zero_y = true;
    o += Figure(c, "Differential-privacy epsilon spent so far.");
  }
  o += DeclineTable(methods);
  o += "</body>\n</html>\n";
  return o;
}

absl::Status WriteReport(const std::string& path, const ReportInput& input) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty() && !std::filesystem::is_directory(parent, ec)) {
    return absl::NotFoundError(ToAbsl(StrCat("cannot write report '", path, "': directory '",
                                             parent.string(), "' does not exist")));
  }
  return Annotate(WriteFileAtomic(path, RenderReportHtml(input)),
                  StrCat("writing report '", path, "'"));
}

}  // namespace seedling::simulator
