#include "server/http.h"

#include <algorithm>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <exception>
#include <string_view>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "base/clock.h"
#include "base/status.h"
#include "base/strings.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

namespace seedling::server {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

// ---- Formatting helpers -------------------------------------------------------------------------

std::string Printf(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, v);
  return buf;
}

// SVG coordinates: two decimals are far below a pixel and keep the page small.
std::string Coord(double v) { return Printf("%.2f", v); }

std::string FormatLoss(double v) { return std::isfinite(v) ? Printf("%.4g", v) : "–"; }

std::string FormatTime(int64_t ms) {
  if (ms <= 0) return "–";
  const std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return StrCat(buf, " UTC");
}

std::string FormatDuration(int64_t ms) {
  if (ms < 0) return "–";
  if (ms < 60'000) return Printf("%.1f s", ms / 1000.0);
  if (ms < 3'600'000) return Printf("%.1f min", ms / 60'000.0);
  return Printf("%.1f h", ms / 3'600'000.0);
}

struct ByteUnit {
  double scale;
  const char* name;
};

// The largest binary unit in which `max_bytes` is still >= 1, so axis labels stay short.
ByteUnit UnitFor(double max_bytes) {
  static constexpr ByteUnit kUnits[] = {
      {1024.0 * 1024 * 1024, "GiB"}, {1024.0 * 1024, "MiB"}, {1024.0, "KiB"}, {1.0, "B"}};
  for (const ByteUnit& u : kUnits) {
    if (max_bytes >= u.scale) return u;
  }
  return kUnits[3];
}

std::string FormatBytes(uint64_t bytes) {
  const ByteUnit u = UnitFor(static_cast<double>(bytes));
  if (u.scale == 1.0) return StrCat(bytes, " B");
  return StrCat(Printf("%.1f", bytes / u.scale), " ", u.name);
}

// "Nice numbers for graph labels" (Heckbert, Graphics Gems, 1990): the 1-2-5 number near x.
double NiceNumber(double x, bool round) {
  const double exponent = std::floor(std::log10(x));
  const double fraction = x / std::pow(10.0, exponent);
  double nice;
  if (round) {
    nice = fraction < 1.5 ? 1 : fraction < 3 ? 2 : fraction < 7 ? 5 : 10;
  } else {
    nice = fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10;
  }
  return nice * std::pow(10.0, exponent);
}

// About `target` evenly spaced round tick values covering [lo, hi] (lo < hi); the first and last
// tick are the axis range.
std::vector<double> NiceTicks(double lo, double hi, int target) {
  const double step = NiceNumber(NiceNumber(hi - lo, false) / (target - 1), true);
  const double first = std::floor(lo / step) * step;
  const double last = std::ceil(hi / step) * step;
  std::vector<double> ticks;
  const int n = static_cast<int>(std::lround((last - first) / step));
  for (int i = 0; i <= n; ++i) ticks.push_back(first + i * step);
  return ticks;
}

// ---- Charts -------------------------------------------------------------------------------------

// Shared plot geometry: rounds are bands along x, values map linearly onto y between the first and
// last tick.
struct Plot {
  static constexpr double kWidth = 720, kHeight = 260;
  static constexpr double kLeft = 64, kRight = 16, kTop = 28, kBottom = 48;
  size_t rounds = 0;
  double y_lo = 0, y_hi = 1;

  double PlotWidth() const { return kWidth - kLeft - kRight; }
  double Band() const { return PlotWidth() / static_cast<double>(rounds); }
  double X(size_t i) const { return kLeft + (static_cast<double>(i) + 0.5) * Band(); }
  double Y(double v) const { return kTop + (kHeight - kTop - kBottom) * (1.0 - (v - y_lo) / (y_hi - y_lo)); }
  double Bottom() const { return kHeight - kBottom; }
};

// Grid lines, y tick labels, round-id x labels (thinned to about a dozen) and both axis titles.
void AppendAxes(std::string& svg, const Plot& p, const std::vector<double>& ticks,
                const std::vector<std::string>& tick_labels, const std::vector<const DashboardRound*>& rounds,
                std::string_view y_title) {
  for (size_t i = 0; i < ticks.size(); ++i) {
    const std::string y = Coord(p.Y(ticks[i]));
    svg += StrCat("<line class=\"grid\" x1=\"", Coord(Plot::kLeft), "\" y1=\"", y, "\" x2=\"",
                  Coord(Plot::kWidth - Plot::kRight), "\" y2=\"", y, "\"/>");
    svg += StrCat("<text class=\"tick\" x=\"", Coord(Plot::kLeft - 6), "\" y=\"", y,
                  "\" text-anchor=\"end\" dominant-baseline=\"middle\">", HtmlEscape(tick_labels[i]), "</text>");
  }
  svg += StrCat("<line class=\"axis\" x1=\"", Coord(Plot::kLeft), "\" y1=\"", Coord(Plot::kTop), "\" x2=\"",
                Coord(Plot::kLeft), "\" y2=\"", Coord(p.Bottom()), "\"/>");
  svg += StrCat("<line class=\"axis\" x1=\"", Coord(Plot::kLeft), "\" y1=\"", Coord(p.Bottom()), "\" x2=\"",
                Coord(Plot::kWidth - Plot::kRight), "\" y2=\"", Coord(p.Bottom()), "\"/>");
  const size_t every = std::max<size_t>(1, (rounds.size() + 11) / 12);
  for (size_t i = 0; i < rounds.size(); i += every) {
    svg += StrCat("<text class=\"tick\" x=\"", Coord(p.X(i)), "\" y=\"", Coord(p.Bottom() + 16),
                  "\" text-anchor=\"middle\">", rounds[i]->round_id, "</text>");
  }
  svg += StrCat("<text class=\"title\" x=\"", Coord(Plot::kLeft + p.PlotWidth() / 2), "\" y=\"",
                Coord(Plot::kHeight - 8), "\" text-anchor=\"middle\">round</text>");
  svg += StrCat("<text class=\"title\" x=\"14\" y=\"", Coord(Plot::kTop + (p.Bottom() - Plot::kTop) / 2),
                "\" text-anchor=\"middle\" transform=\"rotate(-90 14 ",
                Coord(Plot::kTop + (p.Bottom() - Plot::kTop) / 2), ")\">", HtmlEscape(y_title), "</text>");
}

std::string SvgOpen(std::string_view css_class, std::string_view label) {
  return StrCat("<svg class=\"", css_class, "\" xmlns=\"http://www.w3.org/2000/svg\" width=\"", Coord(Plot::kWidth),
                "\" height=\"", Coord(Plot::kHeight), "\" viewBox=\"0 0 ", Coord(Plot::kWidth), " ",
                Coord(Plot::kHeight), "\" role=\"img\" aria-label=\"", HtmlEscape(label), "\">");
}

std::string SvgEmpty(std::string_view css_class, std::string_view label, std::string_view message) {
  return StrCat(SvgOpen(css_class, label), "<text class=\"empty\" x=\"", Coord(Plot::kWidth / 2), "\" y=\"",
                Coord(Plot::kHeight / 2), "\" text-anchor=\"middle\">", HtmlEscape(message), "</text></svg>");
}

// A legend entry; its "key" class keeps it apart from the data marks that share its colour class.
void AppendLegend(std::string& svg, double x, std::string_view css_class, std::string_view text, bool bar) {
  const double y = 14;
  if (bar) {
    svg += StrCat("<rect class=\"", css_class, " key\" x=\"", Coord(x), "\" y=\"", Coord(y - 5),
                  "\" width=\"10\" height=\"10\"/>");
  } else {
    svg += StrCat("<line class=\"", css_class, " key\" x1=\"", Coord(x), "\" y1=\"", Coord(y), "\" x2=\"",
                  Coord(x + 18), "\" y2=\"", Coord(y), "\"/>");
  }
  svg += StrCat("<text class=\"legend\" x=\"", Coord(x + (bar ? 14 : 22)), "\" y=\"", Coord(y),
                "\" dominant-baseline=\"middle\">", HtmlEscape(text), "</text>");
}

// Mean loss before (dashed) and after (solid) local training, one point per round; a round without
// a reported loss leaves a gap in the line rather than being drawn at zero.
std::string LossChart(const std::vector<const DashboardRound*>& rounds) {
  constexpr std::string_view kClass = "chart-loss", kLabel = "Mean loss per round";
  double lo = INFINITY, hi = -INFINITY;
  for (const DashboardRound* r : rounds) {
    for (double v : {r->loss_start, r->loss_end}) {
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
    }
  }
  if (rounds.empty() || lo > hi) return SvgEmpty(kClass, kLabel, "no loss reported yet");
  if (lo == hi) {
    const double pad = lo == 0 ? 1.0 : std::abs(lo) * 0.1;
    lo -= pad, hi += pad;
  }
  const std::vector<double> ticks = NiceTicks(lo, hi, 5);
  Plot p;
  p.rounds = rounds.size();
  p.y_lo = ticks.front();
  p.y_hi = ticks.back();
  std::vector<std::string> labels;
  for (double t : ticks) labels.push_back(Printf("%g", t));

  std::string svg = SvgOpen(kClass, kLabel);
  AppendAxes(svg, p, ticks, labels, rounds, "mean loss");
  struct Series {
    double DashboardRound::*field;
    const char* line_class;
    const char* point_class;
    const char* name;
  };
  for (const Series& s : {Series{&DashboardRound::loss_start, "line-start", "pt-start", "start"},
                          Series{&DashboardRound::loss_end, "line-end", "pt-end", "end"}}) {
    std::string path;
    bool pen_down = false;
    for (size_t i = 0; i < rounds.size(); ++i) {
      const double v = rounds[i]->*s.field;
      if (!std::isfinite(v)) {
        pen_down = false;
        continue;
      }
      path += StrCat(pen_down ? " L" : (path.empty() ? "M" : " M"), Coord(p.X(i)), " ", Coord(p.Y(v)));
      pen_down = true;
    }
    if (!path.empty()) svg += StrCat("<path class=\"", s.line_class, "\" d=\"", path, "\"/>");
    for (size_t i = 0; i < rounds.size(); ++i) {
      const double v = rounds[i]->*s.field;
      if (!std::isfinite(v)) continue;
      svg += StrCat("<circle class=\"", s.point_class, "\" cx=\"", Coord(p.X(i)), "\" cy=\"", Coord(p.Y(v)),
                    "\" r=\"3\"><title>round ", rounds[i]->round_id, ": ", s.name, " loss ", FormatLoss(v),
                    "</title></circle>");
    }
  }
  AppendLegend(svg, Plot::kWidth - 260, "line-start", "before local training", false);
  AppendLegend(svg, Plot::kWidth - 110, "line-end", "after", false);
  svg += "</svg>";
  return svg;
}

// Bytes uploaded and downloaded per round, as side-by-side bars in the largest fitting binary unit.
std::string BytesChart(const std::vector<const DashboardRound*>& rounds) {
  constexpr std::string_view kClass = "chart-bytes", kLabel = "Bytes per round";
  if (rounds.empty()) return SvgEmpty(kClass, kLabel, "no rounds yet");
  double max_bytes = 0;
  for (const DashboardRound* r : rounds) {
    max_bytes = std::max({max_bytes, static_cast<double>(r->bytes_up), static_cast<double>(r->bytes_down)});
  }
  const ByteUnit unit = UnitFor(max_bytes);
  const std::vector<double> ticks = NiceTicks(0, std::max(max_bytes / unit.scale, 1.0), 5);
  Plot p;
  p.rounds = rounds.size();
  p.y_lo = 0;
  p.y_hi = ticks.back();
  std::vector<std::string> labels;
  for (double t : ticks) labels.push_back(Printf("%g", t));

  std::string svg = SvgOpen(kClass, kLabel);
  AppendAxes(svg, p, ticks, labels, rounds, StrCat("bytes (", unit.name, ")"));
  const double bar = std::min(p.Band() * 0.38, 24.0);
  for (size_t i = 0; i < rounds.size(); ++i) {
    const DashboardRound& r = *rounds[i];
    for (const auto& [bytes, css, dir, x] :
         {std::tuple{r.bytes_up, "bar-up", "up", p.X(i) - bar}, std::tuple{r.bytes_down, "bar-down", "down", p.X(i)}}) {
      const double top = p.Y(static_cast<double>(bytes) / unit.scale);
      svg += StrCat("<rect class=\"", css, "\" x=\"", Coord(x), "\" y=\"", Coord(top), "\" width=\"", Coord(bar),
                    "\" height=\"", Coord(p.Bottom() - top), "\"><title>round ", r.round_id, ": ", FormatBytes(bytes),
                    " ", dir, "</title></rect>");
    }
  }
  AppendLegend(svg, Plot::kWidth - 200, "bar-up", "up (to server)", true);
  AppendLegend(svg, Plot::kWidth - 90, "bar-down", "down", true);
  svg += "</svg>";
  return svg;
}

constexpr std::string_view kStyle = R"css(
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:60em}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.summary span{margin-right:1.4em}.aborted{color:#a40000}
svg text{font-size:11px;fill:#444}svg .title{font-size:12px}svg .empty{fill:#888}
.grid{stroke:#e6e6e6}.axis{stroke:#444}
.line-start{fill:none;stroke:#1f77b4;stroke-width:1.5;stroke-dasharray:5 3}
.line-end{fill:none;stroke:#ff7f0e;stroke-width:2}
.pt-start{fill:#1f77b4}.pt-end{fill:#ff7f0e}.bar-up{fill:#2ca02c}.bar-down{fill:#9467bd}
)css";

void AppendRoundRow(std::string& html, const DashboardRound& r) {
  html += StrCat("<tr", r.abort_reason.empty() ? "" : " class=\"aborted\"", "><td>", r.round_id,
                 "</td><td class=\"l\">", HtmlEscape(r.state), "</td><td class=\"l\">", HtmlEscape(r.method),
                 "</td><td>", r.selected, "</td><td>", r.accepted, "</td><td>", r.rejected, "</td><td>",
                 FormatLoss(r.loss_start), "</td><td>", FormatLoss(r.loss_end), "</td><td>", FormatBytes(r.bytes_up),
                 "</td><td>", FormatBytes(r.bytes_down), "</td><td>", FormatTime(r.opened_ms), "</td><td>",
                 r.opened_ms > 0 && r.closed_ms > 0 ? FormatDuration(r.closed_ms - r.opened_ms) : "–",
                 "</td><td class=\"l\">", HtmlEscape(r.abort_reason), "</td></tr>\n");
}

nlohmann::json NumberOrNull(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

nlohmann::json RoundJson(const DashboardRound& r) {
  return {{"round_id", r.round_id},
          {"state", r.state},
          {"method", r.method},
          {"selected", r.selected},
          {"accepted", r.accepted},
          {"rejected", r.rejected},
          {"loss_start", NumberOrNull(r.loss_start)},
          {"loss_end", NumberOrNull(r.loss_end)},
          {"bytes_up", r.bytes_up},
          {"bytes_down", r.bytes_down},
          {"opened_ms", r.opened_ms},
          {"deadline_ms", r.deadline_ms},
          {"closed_ms", r.closed_ms},
          {"abort_reason", r.abort_reason}};
}

// The dashboard's privacy line: ε at the configured δ of the budget; DP-FTRL adds its mechanism, ρ (zCDP) and
// ε at δ = 1e-10.
std::string PrivacySummary(const DashboardSnapshot& s) {
  if (!std::isfinite(s.epsilon)) return "differential privacy off";
  const bool ftrl = std::isfinite(s.dp_rho);
  std::string privacy = ftrl ? StrCat("privacy spent (DP-FTRL, tree aggregation): ρ = ", Printf("%.4g", s.dp_rho),
                                      " (zCDP), ε = ", Printf("%.4g", s.epsilon))
                             : StrCat("privacy spent ε = ", Printf("%.4g", s.epsilon));
  if (std::isfinite(s.dp_target_epsilon)) {
    privacy += StrCat(" of ", Printf("%.4g", s.dp_target_epsilon), " (δ = ", Printf("%.3g", s.dp_delta), ")");
  }
  if (ftrl && std::isfinite(s.dp_epsilon_delta_1e10)) {
    privacy += StrCat(", ε = ", Printf("%.4g", s.dp_epsilon_delta_1e10), " at δ = 1e-10");
  }
  return privacy;
}

}  // namespace

std::string RenderStatusJson(const DashboardSnapshot& s) {
  nlohmann::json recent = nlohmann::json::array();
  for (const DashboardRound& r : s.recent) recent.push_back(RoundJson(r));
  nlohmann::json rejected = nlohmann::json::object();
  for (const auto& [reason, n] : s.rejected_by_reason) rejected[reason] = n;
  const nlohmann::json j = {
      {"server_version", s.server_version},
      {"global_version", s.global_version},
      {"current", s.current ? RoundJson(*s.current) : nlohmann::json(nullptr)},
      {"recent", std::move(recent)},
      {"rejected_by_reason", std::move(rejected)},
      {"devices_registered", s.devices_registered},
      {"connections", s.connections},
      {"epsilon", NumberOrNull(s.epsilon)},
      {"dp_target_epsilon", NumberOrNull(s.dp_target_epsilon)},
      {"dp_delta", NumberOrNull(s.dp_delta)},
      {"dp_mechanism", s.dp_mechanism.empty() ? nlohmann::json(nullptr) : nlohmann::json(s.dp_mechanism)},
      {"dp_rho", NumberOrNull(s.dp_rho)},
      {"dp_epsilon_delta_1e-10", NumberOrNull(s.dp_epsilon_delta_1e10)},
      {"dp_refusal", s.dp_refusal},
  };
  // replace: a reason string carrying a peer's bytes must not make dump() throw.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string RenderDashboardHtml(const DashboardSnapshot& s, int refresh_seconds) {
  const int64_t now = SystemClock().NowMs();
  std::string html = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">";
  if (refresh_seconds > 0) {
    html += StrCat("<meta http-equiv=\"refresh\" content=\"", refresh_seconds, "\">");
  }
  html += StrCat("<title>Seedling coordinator</title><style>", kStyle, "</style></head><body>\n");
  html += "<h1>Seedling coordinator</h1>\n<p class=\"summary\">";
  html += StrCat("<span>server ", HtmlEscape(s.server_version), "</span>");
  html += StrCat("<span>global model version ", s.global_version, "</span>");
  html += StrCat("<span>devices registered ", s.devices_registered, "</span>");
  html += StrCat("<span>open connections ", s.connections, "</span>");
  html += StrCat("<span class=\"privacy\">", PrivacySummary(s), "</span></p>\n");
  if (!s.dp_refusal.empty()) html += StrCat("<p class=\"dp-refusal\">", HtmlEscape(s.dp_refusal), "</p>\n");

  html += "<h2>Current round</h2>\n";
  if (s.current) {
    const DashboardRound& c = *s.current;
    std::string deadline = FormatTime(c.deadline_ms);
    if (c.deadline_ms > 0) {
      deadline +=
          c.deadline_ms >= now ? StrCat(" (in ", FormatDuration(c.deadline_ms - now), ")") : std::string(" (passed)");
    }
    html +=
        StrCat("<table class=\"current\"><tr><th class=\"l\">round</th><td id=\"current-round\">", c.round_id,
               "</td></tr><tr><th class=\"l\">state</th><td class=\"l\">", HtmlEscape(c.state),
               "</td></tr><tr><th class=\"l\">method</th><td class=\"l\">", HtmlEscape(c.method),
               "</td></tr><tr><th class=\"l\">selected / accepted / rejected</th><td>", c.selected, " / ", c.accepted,
               " / ", c.rejected, "</td></tr><tr><th class=\"l\">opened</th><td class=\"l\">", FormatTime(c.opened_ms),
               "</td></tr><tr><th class=\"l\">deadline</th><td class=\"l\">", deadline, "</td></tr>");
    if (!c.abort_reason.empty()) {
      html += StrCat("<tr><th class=\"l\">abort reason</th><td class=\"l\">", HtmlEscape(c.abort_reason), "</td></tr>");
    }
    html += "</table>\n";
  } else {
    html += "<p>No round in progress.</p>\n";
  }

  // Charts read left to right in time; `recent` arrives newest first.
  std::vector<const DashboardRound*> chronological;
  for (auto it = s.recent.rbegin(); it != s.recent.rend(); ++it) chronological.push_back(&*it);
  html += StrCat("<h2>Mean loss per round</h2>\n", LossChart(chronological), "\n");
  html += StrCat("<h2>Bytes per round</h2>\n", BytesChart(chronological), "\n");

  html += "<h2>Recent rounds</h2>\n";
  if (s.recent.empty()) {
    html += "<p>No finished rounds yet.</p>\n";
  } else {
    html +=
        "<table class=\"recent\"><tr><th>round</th><th class=\"l\">state</th><th "
        "class=\"l\">method</th><th>selected</th><th>accepted</th><th>rejected</th><th>loss "
        "start</th><th>loss end</th><th>bytes up</th><th>bytes down</th><th>opened</th>"
        "<th>duration</th><th class=\"l\">abort reason</th></tr>\n";
    for (const DashboardRound& r : s.recent) AppendRoundRow(html, r);
    html += "</table>\n";
  }

  html += "<h2>Rejected updates by reason</h2>\n";
  if (s.rejected_by_reason.empty()) {
    html += "<p>None.</p>\n";
  } else {
    html += "<table class=\"rejected\"><tr><th class=\"l\">reason</th><th>updates</th></tr>\n";
    for (const auto& [reason, n] : s.rejected_by_reason) {
      html += StrCat("<tr><td class=\"l\">", HtmlEscape(reason), "</td><td>", n, "</td></tr>\n");
    }
    html += "</table>\n";
  }
  html += StrCat("<p><small>generated ", FormatTime(now), "</small></p>\n</body></html>\n");
  return html;
}

// ---- Server -------------------------------------------------------------------------------------

namespace {

// Every connection-level failure goes through here: timeouts and resets are routine for a scrape
// endpoint, so they are debug-level.
void Fail(const beast::error_code& ec, const char* what) {
  if (ec == net::error::operation_aborted) return;
  spdlog::debug("http: {}: {}", what, ec.message());
}

enum class Route { kDashboard, kStatus, kMetrics, kHealth, kOther };

Route RouteFor(std::string_view path) {
  if (path == "/") return Route::kDashboard;
  if (path == "/api/status") return Route::kStatus;
  if (path == "/metrics") return Route::kMetrics;
  if (path == "/healthz") return Route::kHealth;
  return Route::kOther;
}

// The route label of seedling_http_requests_total: a fixed set, so arbitrary URLs cannot grow the
// number of series.
const char* RouteLabel(Route r) {
  switch (r) {
    case Route::kDashboard:
      return "/";
    case Route::kStatus:
      return "/api/status";
    case Route::kMetrics:
      return "/metrics";
    case Route::kHealth:
      return "/healthz";
    case Route::kOther:
      return "other";
  }
  return "other";
}

using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

std::string ReasonPhrase(http::status status) {
  const auto r = http::obsolete_reason(status);
  return std::string(r.data(), r.size());
}

Response MakeResponse(http::status status, unsigned version, bool keep_alive, std::string_view content_type,
                      std::string body) {
  Response res{status, version};
  res.set(http::field::server, "seedling");
  res.set(http::field::content_type, std::string(content_type));
  res.set(http::field::cache_control, "no-store");
  res.set("X-Content-Type-Options", "nosniff");
  res.keep_alive(keep_alive);
  res.body() = std::move(body);
  res.prepare_payload();
  return res;
}

}  // namespace

namespace http_internal {

class Session;

// The listener and everything the sessions share (HttpServer's implementation).
class Server {
 public:
  Server(Metrics& metrics, HttpOptions options, SnapshotProvider provider, HealthCheck health)
      : options_(std::move(options)),
        provider_(std::move(provider)),
        health_(std::move(health)),
        requests_(metrics.AddCounter("seedling_http_requests_total",
                                     "HTTP requests to the observability port, by route and status.",
                                     {"route", "code"})),
        metrics_(metrics),
        ioc_(options_.threads),
        acceptor_(net::make_strand(ioc_)),
        retry_timer_(acceptor_.get_executor()) {}

  ~Server() { Stop(); }

  absl::Status Listen();
  void StartThreads();
  void Stop();
  uint16_t port() const { return port_; }

  const HttpOptions& options() const { return options_; }
  Response Handle(const Request& req);
  void CountResponse(Route route, http::status status);
  void Unregister(Session* s);

 private:
  void DoAccept();
  void OnAccept(beast::error_code ec, tcp::socket socket);

  // Constant after construction.
  const HttpOptions options_;
  const SnapshotProvider provider_;
  const HealthCheck health_;
  CounterFamily& requests_;
  Metrics& metrics_;

  // Declared before ioc_: sessions still queued in ioc_ when it is destroyed unregister themselves
  // here.
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);

  net::io_context ioc_;
  tcp::acceptor acceptor_;         // used on its strand only (after Listen)
  net::steady_timer retry_timer_;  // acceptor strand
  uint16_t port_ = 0;              // set by Listen
  std::vector<std::thread> threads_;
  bool stopped_ = false;  // Start/Stop are not concurrent (see http.h)
};

// One HTTP connection: read a request, answer, repeat while keep-alive; everything on its own
// strand (the socket was accepted onto one), kept alive by the handlers' shared_from_this.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, Server& server)
      : server_(server),
        stream_(std::move(socket)),
        // Room for the largest acceptable request so the parser's limits, not the buffer's, decide.
        buffer_(server.options().max_header_bytes + server.options().max_body_bytes + 4096) {}

  ~Session() { server_.Unregister(this); }

  void Run() { net::dispatch(stream_.get_executor(), beast::bind_front_handler(&Session::DoRead, shared_from_this())); }

  // From any thread: closes the socket on the session's strand, which cancels its pending
  // operation.
  void Close() {
    net::post(stream_.get_executor(), [self = shared_from_this()] {
      beast::error_code ec;
      self->stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
      self->stream_.close();
    });
  }

 private:
  void DoRead() {
    parser_.emplace();
    parser_->header_limit(server_.options().max_header_bytes);
    parser_->body_limit(server_.options().max_body_bytes);
    stream_.expires_after(server_.options().read_timeout);
    http::async_read(stream_, buffer_, *parser_, beast::bind_front_handler(&Session::OnRead, shared_from_this()));
  }

  void OnRead(beast::error_code ec, std::size_t) {
    if (ec == http::error::end_of_stream) return DoClose();
    if (ec) {
      // A malformed or oversized request gets an answer before the close, so a misconfigured
      // scraper sees why; transport errors (timeout, reset, cancellation) just end the session.
      if (ec.category() != http::make_error_code(http::error::bad_method).category()) {
        return Fail(ec, "read");
      }
      const http::status status = ec == http::error::body_limit     ? http::status::payload_too_large
                                  : ec == http::error::header_limit ? http::status::request_header_fields_too_large
                                                                    : http::status::bad_request;
      server_.CountResponse(Route::kOther, status);
      return Send(MakeResponse(status, 11, /*keep_alive=*/false, "text/plain; charset=utf-8",
                               StrCat(ReasonPhrase(status), "\n")));
    }
    Send(server_.Handle(parser_->get()));
  }

  void Send(Response res) {
    res_ = std::move(res);
    const bool keep_alive = res_.keep_alive();
    stream_.expires_after(server_.options().write_timeout);
    http::async_write(stream_, res_, beast::bind_front_handler(&Session::OnWrite, shared_from_this(), keep_alive));
  }

  void OnWrite(bool keep_alive, beast::error_code ec, std::size_t) {
    if (ec) return Fail(ec, "write");
    if (!keep_alive) return DoClose();
    res_ = {};
    DoRead();
  }

  void DoClose() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  }

  Server& server_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  Response res_;  // must live until async_write completes
};

absl::Status Server::Listen() {
  beast::error_code ec;
  const net::ip::address address = net::ip::make_address(options_.bind_address, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        StrCat("http: bind address '", options_.bind_address, "' is not an IPv4 or IPv6 address"));
  }
  const tcp::endpoint endpoint(address, options_.port);
  const auto fail = [&](const char* step) {
    return absl::UnavailableError(
        StrCat("http: cannot listen on ", options_.bind_address, ":", options_.port, " (", step, "): ", ec.message()));
  };
  if (acceptor_.open(endpoint.protocol(), ec); ec) return fail("open");
  // Lets a restarted coordinator rebind while old connections sit in TIME_WAIT.
  if (acceptor_.set_option(net::socket_base::reuse_address(true), ec); ec) return fail("setsockopt");
  if (acceptor_.bind(endpoint, ec); ec) return fail("bind");
  if (acceptor_.listen(net::socket_base::max_listen_connections, ec); ec) return fail("listen");
  const tcp::endpoint local = acceptor_.local_endpoint(ec);
  if (ec) return fail("local_endpoint");
  port_ = local.port();
  return absl::OkStatus();
}

void Server::StartThreads() {
  // The pending accept is the io_context's work: queue it before any thread runs, or run() returns.
  net::dispatch(acceptor_.get_executor(), [this] { DoAccept(); });
  threads_.reserve(options_.threads);
  for (int i = 0; i < options_.threads; ++i) {
    threads_.emplace_back([this] {
      // A handler that throws (bad_alloc, say) loses its own connection, not the server.
      for (;;) {
        try {
          ioc_.run();
          return;
        } catch (const std::exception& e) {
          spdlog::error("http: handler threw: {}", e.what());
        }
      }
    });
  }
}

void Server::DoAccept() {
  // Each connection gets its own strand: its handlers never run concurrently.
  acceptor_.async_accept(net::make_strand(ioc_), beast::bind_front_handler(&Server::OnAccept, this));
}

void Server::OnAccept(beast::error_code ec, tcp::socket socket) {
  if (!acceptor_.is_open()) return;  // Stop() closed it
  if (ec) {
    Fail(ec, "accept");
    // Out of descriptors and similar: back off instead of spinning on an accept that fails at once.
    retry_timer_.expires_after(std::chrono::milliseconds(100));
    retry_timer_.async_wait([this](beast::error_code wait_ec) {
      if (!wait_ec && acceptor_.is_open()) DoAccept();
    });
    return;
  }
  auto session = std::make_shared<Session>(std::move(socket), *this);
  bool run = false;
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_ && sessions_.size() < static_cast<size_t>(options_.max_connections)) {
      sessions_.emplace(session.get(), session);
      run = true;
    }
  }
  // A session not run is dropped here, which closes its socket.
  if (run) {
    session->Run();
  } else {
    spdlog::debug("http: connection refused (stopping or {} connections open)", options_.max_connections);
  }
  DoAccept();
}

void Server::Unregister(Session* s) {
  absl::MutexLock lock(&mu_);
  sessions_.erase(s);
}

void Server::Stop() {
  if (stopped_) return;
  stopped_ = true;
  std::vector<std::shared_ptr<Session>> open;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [ptr, weak] : sessions_) {
      if (auto s = weak.lock()) open.push_back(std::move(s));
    }
  }
  // Outside mu_: dropping the last reference runs ~Session, which takes mu_.
  for (const auto& s : open) s->Close();
  open.clear();
  net::post(acceptor_.get_executor(), [this] {
    beast::error_code ec;
    acceptor_.close(ec);
    retry_timer_.cancel();
  });
  // With the acceptor and every socket closed, run() runs out of work and returns.
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
}

void Server::CountResponse(Route route, http::status status) {
  requests_.WithLabels({RouteLabel(route), std::to_string(static_cast<unsigned>(status))}).Increment();
}

Response Server::Handle(const Request& req) {
  const std::string_view target(req.target().data(), req.target().size());
  const Route route = RouteFor(target.substr(0, target.find_first_of("?#")));
  const unsigned version = req.version();
  const bool keep_alive = req.keep_alive();
  constexpr std::string_view kText = "text/plain; charset=utf-8";

  Response res;
  try {
    if (route == Route::kOther) {
      res = MakeResponse(http::status::not_found, version, keep_alive, kText, "not found\n");
    } else if (req.method() != http::verb::get) {
      res = MakeResponse(http::status::method_not_allowed, version, keep_alive, kText, "method not allowed\n");
      res.set(http::field::allow, "GET");
    } else {
      switch (route) {
        case Route::kMetrics:
          res = MakeResponse(http::status::ok, version, keep_alive, "text/plain; version=0.0.4; charset=utf-8",
                             metrics_.RenderPrometheus());
          break;
        case Route::kHealth: {
          const absl::Status health = health_ ? health_() : absl::OkStatus();
          res = health.ok() ? MakeResponse(http::status::ok, version, keep_alive, kText, "ok")
                            : MakeResponse(http::status::service_unavailable, version, keep_alive, kText,
                                           StrCat("unavailable: ", health.message(), "\n"));
          break;
        }
        case Route::kStatus:
          res = MakeResponse(http::status::ok, version, keep_alive, "application/json", RenderStatusJson(provider_()));
          break;
        case Route::kDashboard:
          res = MakeResponse(http::status::ok, version, keep_alive, "text/html; charset=utf-8",
                             RenderDashboardHtml(provider_(), options_.dashboard_refresh_seconds));
          // The page needs nothing but its own inline styles; forbid everything else outright.
          res.set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'");
          break;
        case Route::kOther:
          break;
      }
    }
  } catch (const std::exception& e) {
    // The provider and health callbacks are the coordinator's code: a throw there is its bug, but
    // it must not take the I/O thread down.
    spdlog::error("http: {} failed: {}", RouteLabel(route), e.what());
    res = MakeResponse(http::status::internal_server_error, version, keep_alive, kText, "internal error\n");
  }
  CountResponse(route, res.result());
  return res;
}

}  // namespace http_internal

// ---- HttpServer ---------------------------------------------------------------------------------

HttpServer::HttpServer(Metrics& metrics) : metrics_(metrics) {}

HttpServer::~HttpServer() { Stop(); }

absl::Status HttpServer::Start(const HttpOptions& options, SnapshotProvider provider, HealthCheck health) {
  if (started_) return absl::FailedPreconditionError("http: server already started");
  if (options.threads < 1) {
    return absl::InvalidArgumentError(StrCat("http: threads must be >= 1, got ", options.threads));
  }
  if (options.max_connections < 1) {
    return absl::InvalidArgumentError(StrCat("http: max_connections must be >= 1, got ", options.max_connections));
  }
  if (options.max_header_bytes < 1024) {
    return absl::InvalidArgumentError(StrCat("http: max_header_bytes must be >= 1024, got ", options.max_header_bytes));
  }
  if (options.read_timeout.count() <= 0 || options.write_timeout.count() <= 0) {
    return absl::InvalidArgumentError("http: read_timeout and write_timeout must be positive");
  }
  if (!provider) return absl::InvalidArgumentError("http: a snapshot provider is required");
  try {
    auto impl = std::make_unique<http_internal::Server>(metrics_, options, std::move(provider), std::move(health));
    SEEDLING_RETURN_IF_ERROR(impl->Listen());
    impl->StartThreads();
    impl_ = std::move(impl);
  } catch (const std::exception& e) {
    // io_context and std::thread report resource exhaustion by throwing.
    return absl::InternalError(StrCat("http: cannot start: ", e.what()));
  }
  started_ = true;
  spdlog::info("http: observability endpoint on http://{}:{}/", options.bind_address, port());
  return absl::OkStatus();
}

void HttpServer::Stop() {
  if (impl_) impl_->Stop();
}

uint16_t HttpServer::port() const { return impl_ ? impl_->port() : 0; }

}  // namespace seedling::server
