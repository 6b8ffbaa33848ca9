#include "simulator/internal/svg_chart.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "base/strings.h"
#include "simulator/internal/report_format.h"

namespace seedling::simulator::internal {
namespace {

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

}  // namespace

std::string RenderChart(const Chart& c) {
  // Ranges over the plottable data.
  double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin;
  double ymin = xmin, ymax = -xmin;
  const auto extend = [&](const Point& p) {
    if (!std::isfinite(p.x)) return;
    xmin = std::min(xmin, p.x);
    xmax = std::max(xmax, p.x);
    if (!Plottable(p.y, c.log_y)) return;
    ymin = std::min(ymin, p.y);
    ymax = std::max(ymax, p.y);
  };
  for (const Series& s : c.series) {
    for (const Point& p : s.points) extend(p);
    for (const auto& [p, round] : s.aborted) extend(p);
  }
  const Axis xa = LinearAxis(xmin, xmax, c.integer_x, false);
  const Axis ya = c.log_y ? LogAxis(ymin, ymax) : LinearAxis(ymin, ymax, c.integer_y, c.zero_y);

  const double height = std::max(kPlotTop + kPlotHeight + 50, kPlotTop + 8 + kLegendRow * c.legend.size() + 10);
  const double bottom = kPlotTop + kPlotHeight;
  auto px = [&](double x) { return kPlotLeft + AxisFraction(xa, x) * (kPlotRight - kPlotLeft); };
  auto py = [&](double y) { return bottom - AxisFraction(ya, y) * kPlotHeight; };
  auto ylabel = [&](double v) { return c.si_y ? SiCompact(v) : G4(v); };

  std::string o;
  o += StrCat("<svg class=\"chart\" viewBox=\"0 0 ", Fixed(kWidth, 0), " ", Fixed(height, 0), "\" width=\"",
              Fixed(kWidth, 0), "\" height=\"", Fixed(height, 0), "\" role=\"img\" aria-label=\"", HtmlEscape(c.title),
              "\">\n");
  o += StrCat("<text class=\"title\" x=\"", Fixed((kPlotLeft + kPlotRight) / 2, 1),
              "\" y=\"22\" text-anchor=\"middle\">", HtmlEscape(c.title), "</text>\n");

  // Grid and ticks.
  for (double v : ya.minor) {
    o += StrCat("<line class=\"grid minor\" x1=\"", Fixed(kPlotLeft, 1), "\" x2=\"", Fixed(kPlotRight, 1), "\" y1=\"",
                Fixed(py(v), 1), "\" y2=\"", Fixed(py(v), 1), "\"/>\n");
  }
  for (double v : ya.ticks) {
    const std::string y = Fixed(py(v), 1);
    o += StrCat("<g class=\"ytick\" data-v=\"", Shortest(v), "\"><line class=\"grid\" x1=\"", Fixed(kPlotLeft, 1),
                "\" x2=\"", Fixed(kPlotRight, 1), "\" y1=\"", y, "\" y2=\"", y, "\"/><text x=\"",
                Fixed(kPlotLeft - 6, 1), "\" y=\"", y, "\" text-anchor=\"end\" dominant-baseline=\"middle\">",
                HtmlEscape(ylabel(v)), "</text></g>\n");
  }
  for (double v : xa.ticks) {
    const std::string x = Fixed(px(v), 1);
    o += StrCat("<g class=\"xtick\" data-v=\"", Shortest(v), "\"><line class=\"grid\" x1=\"", x, "\" x2=\"", x,
                "\" y1=\"", Fixed(kPlotTop, 1), "\" y2=\"", Fixed(bottom, 1), "\"/><text x=\"", x, "\" y=\"",
                Fixed(bottom + 16, 1), "\" text-anchor=\"middle\">", HtmlEscape(G4(v)), "</text></g>\n");
  }
  o += StrCat("<rect class=\"frame\" x=\"", Fixed(kPlotLeft, 1), "\" y=\"", Fixed(kPlotTop, 1), "\" width=\"",
              Fixed(kPlotRight - kPlotLeft, 1), "\" height=\"", Fixed(kPlotHeight, 1), "\"/>\n");
  o += StrCat("<text class=\"axis-label\" x=\"", Fixed((kPlotLeft + kPlotRight) / 2, 1), "\" y=\"",
              Fixed(bottom + 38, 1), "\" text-anchor=\"middle\">", HtmlEscape(c.x_label), "</text>\n");
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
    o += StrCat("<path class=\"line\" data-method=\"", HtmlEscape(s.method), "\" data-metric=\"", HtmlEscape(s.metric),
                "\" stroke=\"", s.color, "\"");
    if (!s.dash.empty()) o += StrCat(" stroke-dasharray=\"", s.dash, "\"");
    o += StrCat(" d=\"", d, "\"/>\n");
    for (const Point& q : dots) {
      o += StrCat("<circle class=\"dot\" cx=\"", Fixed(q.x, 2), "\" cy=\"", Fixed(q.y, 2), "\" r=\"2.5\" fill=\"",
                  s.color, "\"/>\n");
    }
  }
  // Aborted rounds: a cross on the line, or on the x axis when the value is missing.
  for (const Series& s : c.series) {
    for (const auto& [p, round] : s.aborted) {
      if (!std::isfinite(p.x)) continue;
      const double x = px(p.x), y = Plottable(p.y, c.log_y) ? py(p.y) : bottom;
      o += StrCat("<path class=\"aborted\" stroke=\"", s.color, "\" d=\"M", Fixed(x - 4, 2), ",", Fixed(y - 4, 2), " L",
                  Fixed(x + 4, 2), ",", Fixed(y + 4, 2), " M", Fixed(x - 4, 2), ",", Fixed(y + 4, 2), " L",
                  Fixed(x + 4, 2), ",", Fixed(y - 4, 2), "\"><title>", HtmlEscape(s.method), ": round ", round,
                  " aborted</title></path>\n");
    }
  }

  // Legend, right of the plot.
  o += "<g class=\"legend\">\n";
  double ly = kPlotTop + 8;
  for (const LegendEntry& e : c.legend) {
    const std::string y = Fixed(ly, 1);
    if (e.cross) {
      o += StrCat("<path class=\"aborted\" stroke=\"", e.color, "\" d=\"M", Fixed(kLegendX + 10, 1), ",",
                  Fixed(ly - 4, 1), " L", Fixed(kLegendX + 18, 1), ",", Fixed(ly + 4, 1), " M", Fixed(kLegendX + 10, 1),
                  ",", Fixed(ly + 4, 1), " L", Fixed(kLegendX + 18, 1), ",", Fixed(ly - 4, 1), "\"/>");
    } else {
      o += StrCat("<line class=\"swatch\" x1=\"", Fixed(kLegendX, 1), "\" x2=\"", Fixed(kLegendX + 28, 1), "\" y1=\"",
                  y, "\" y2=\"", y, "\" stroke=\"", e.color, "\"");
      if (!e.dash.empty()) o += StrCat(" stroke-dasharray=\"", e.dash, "\"");
      o += "/>";
    }
    o += StrCat("<text x=\"", Fixed(kLegendX + 34, 1), "\" y=\"", y, "\" dominant-baseline=\"middle\">",
                HtmlEscape(Truncate(e.label, kLegendChars)), "<title>", HtmlEscape(e.label), "</title></text>\n");
    ly += kLegendRow;
  }
  o += "</g>\n</svg>";
  return o;
}

}  // namespace seedling::simulator::internal
