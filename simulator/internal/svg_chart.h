#pragma once

// The simulator report's plots as inline SVG (no scripts, styles or fonts from elsewhere): line charts with
// linear or log axes, gaps at NaN points, aborted-round markers and a legend.

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace seedling::simulator::internal {

// Okabe & Ito (2008), "Color Universal Design", ordered for contrast on white (yellow last).
inline constexpr const char* kPalette[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7",
                                           "#E69F00", "#56B4E9", "#000000", "#F0E442"};
inline constexpr const char* kDashes[] = {"", "6 4", "2 3"};  // solid, dashed, dotted
inline constexpr const char* kMetricGrey = "#555555";

struct Point {
  double x;
  double y;  // NaN: a gap
};

struct Series {
  std::string method;
  std::string metric;  // "" for single-metric charts
  std::string color;
  std::string dash;                                // stroke-dasharray, "" = solid
  std::vector<Point> points;                       // sorted by x
  std::vector<std::pair<Point, int64_t>> aborted;  // marker position and round id; y NaN → on the x axis
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

// The chart as an <svg> element (deterministic: the same chart gives the same bytes).
std::string RenderChart(const Chart& c);

}  // namespace seedling::simulator::internal
