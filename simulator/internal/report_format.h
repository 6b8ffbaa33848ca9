#pragma once

// Number and string formatting for the simulator's outputs (rounds.csv, rounds.jsonl, report.html): std::to_chars,
// so the text is locale-independent and the same input gives the same bytes.

#include <cstddef>
#include <limits>
#include <string>
#include <string_view>

#include "nlohmann/json.hpp"

namespace seedling::simulator::internal {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Shortest representation that parses back to the same double ("0.1", "45123", "1e-07").
std::string Shortest(double v);
// Like printf("%.4g").
std::string G4(double v);
// Fixed-point with `digits` decimals, for SVG coordinates.
std::string Fixed(double v, int digits);
// 312 → "312 B", 46182 → "45.1 KiB" (binary units, as base/memory.h FormatBytes, but for doubles).
std::string HumanBytes(double b);
// SI-compact tick labels: 1500 → "1.5k", 2e6 → "2M".
std::string SiCompact(double v);
// A CSV field, quoted when it holds a comma, quote or line break.
std::string CsvField(std::string_view s);
// A number as a CSV field; NaN and infinities are an empty field.
std::string CsvNumber(double v);
// At most `max` code points of UTF-8 text, "…" marking a cut.
std::string Truncate(std::string_view s, size_t max);
// Display width of UTF-8 text: code points, not bytes.
size_t TextWidth(std::string_view s);
// A number as JSON; NaN and infinities are null.
nlohmann::json JsonNumber(double v);

}  // namespace seedling::simulator::internal
