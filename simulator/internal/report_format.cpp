#include "simulator/internal/report_format.h"

#include <charconv>
#include <cmath>
#include <system_error>

#include "base/strings.h"

namespace seedling::simulator::internal {

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

nlohmann::json JsonNumber(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

}  // namespace seedling::simulator::internal
