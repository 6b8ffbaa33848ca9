#include "simulator/population.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <set>

#include "absl/status/status.h"
#include "base/check.h"
#include "base/file.h"
#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"

namespace seedling::simulator {
namespace {

constexpr int64_t kDaySeconds = 86400;
// Awake idle slots: 30 minutes of local time.
constexpr int64_t kSlotSeconds = 1800;
// Every window ends within 48 h of its anchor day's midnight.
constexpr int64_t kWindowLimitMinutes = 48 * 60;
// Battery fraction gained per hour on the charger (assumption).
constexpr double kChargePerHour = 0.5;

// UTC offsets weighted roughly by smartphone users (an approximation: Newzoo's users-by-country
// ranking for the largest markets — China 910M, India 648M, US 249M, Indonesia 192M, Brazil 139M,
// Russia 106M, Japan 97M, Mexico 81M, Nigeria 80M, Philippines 71M;
// https://plozee.com/countries-with-the-most-smartphone-users/ — and assumed weights for the rest
// of each zone; DST ignored).
struct TimeZoneWeight {
  int16_t offset_minutes;
  double weight;
};
constexpr std::array<TimeZoneWeight, 18> kTimeZones = {{
    {480, 26},  // China, Philippines, Malaysia, Taiwan, Hong Kong, Singapore, Western Australia
    {330, 16},  // India, Sri Lanka
    {420, 6},   // western Indonesia, Vietnam, Thailand
    {540, 4},   // Japan, Korea
    {180, 6},   // western Russia, Turkey, Saudi Arabia, East Africa
    {120, 6},   // Egypt, South Africa, eastern Europe
    {60, 8},    // central Europe, Nigeria, west-central Africa
    {0, 4},     // UK, Portugal, West Africa
    {300, 3},   // Pakistan, Uzbekistan
    {360, 3},   // Bangladesh, Kazakhstan
    {210, 2},   // Iran
    {240, 1},   // UAE, Oman, Caucasus
    {600, 1},   // eastern Australia, Vladivostok
    {-180, 5},  // Brazil (east), Argentina
    {-300, 5},  // US Eastern, Colombia, Peru
    {-360, 4},  // US Central, Mexico
    {-420, 1},  // US Mountain
    {-480, 2},  // US Pacific
}};

// ---- Named streams ---------------------------------------------------------------------------

uint64_t Mix64(uint64_t x) {  // SplitMix64 finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t Fnv1a(std::string_view s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  return h;
}

// The Philox stream id of draws named `name` for (device, index): independent across names, devices
// and indices.
uint64_t StreamId(std::string_view name, uint64_t device, uint64_t index) {
  uint64_t h = Mix64(Fnv1a(name));
  h = Mix64(h ^ Mix64(device));
  return Mix64(h ^ Mix64(index ^ 0x5851F42D4C957F2Dull));
}

Rng StreamRng(uint64_t seed, std::string_view name, int64_t device, int64_t index) {
  return Rng(seed, StreamId(name, static_cast<uint64_t>(device), static_cast<uint64_t>(index)));
}

double ClippedNormal(Rng& rng, double limit) { return std::clamp(rng.Normal(), -limit, limit); }

double UniformIn(Rng& rng, double lo, double hi) { return lo + (hi - lo) * rng.Uniform(); }

int64_t FloorDiv(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

int64_t FloorToInt(double x) { return static_cast<int64_t>(std::floor(x)); }

// ---- Windows ---------------------------------------------------------------------------------

// [begin, end) in local seconds (seconds since the Unix epoch shifted by the device's UTC offset).
struct Span {
  int64_t begin = 0;
  int64_t end = 0;
  bool empty() const { return end <= begin; }
  bool Contains(double x) const { return static_cast<double>(begin) <= x && x < static_cast<double>(end); }
};

// The windows anchored on one local day.
struct DayPlan {
  Span charge_night;
  Span day_charge;
  Span sleep;
  Span home_wifi;
  std::array<Span, 2> day_wifi;  // all-day Wi-Fi, Wi-Fi where the device charges in the day
};

// Sorts and merges touching or overlapping spans; drops empty ones.
void Normalize(std::vector<Span>& spans) {
  spans.erase(std::remove_if(spans.begin(), spans.end(), [](const Span& s) { return s.empty(); }), spans.end());
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  size_t out = 0;
  for (const Span& s : spans) {
    if (out > 0 && s.begin <= spans[out - 1].end) {
      spans[out - 1].end = std::max(spans[out - 1].end, s.end);
    } else {
      spans[out++] = s;
    }
  }
  spans.resize(out);
}

// Intersection of two normalized span lists (normalized).
std::vector<Span> Intersect(const std::vector<Span>& a, const std::vector<Span>& b) {
  std::vector<Span> out;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const Span s{std::max(a[i].begin, b[j].begin), std::min(a[i].end, b[j].end)};
    if (!s.empty()) out.push_back(s);
    if (a[i].end < b[j].end) {
      ++i;
    } else {
      ++j;
    }
  }
  Normalize(out);
  return out;
}

// ---- CSV -------------------------------------------------------------------------------------

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// Splits one CSV record; false on an unterminated quote.
bool SplitCsv(std::string_view line, std::vector<std::string>& fields) {
  fields.clear();
  std::string field;
  bool quoted = false;
  bool was_quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"') {
        if (i + 1 < line.size() && line[i + 1] == '"') {
          field.push_back('"');
          ++i;
        } else {
          quoted = false;
        }
      } else {
        field.push_back(c);
      }
    } else if (c == '"' && Trim(field).empty()) {
      field.clear();
      quoted = true;
      was_quoted = true;
    } else if (c == ',') {
      fields.push_back(was_quoted ? field : std::string(Trim(field)));
      field.clear();
      was_quoted = false;
    } else {
      field.push_back(c);
    }
  }
  if (quoted) return false;
  fields.push_back(was_quoted ? field : std::string(Trim(field)));
  return true;
}

bool ParseDouble(std::string_view s, double& out) {
  s = Trim(s);
  if (s.empty()) return false;
  if (s.front() == '+') s.remove_prefix(1);
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && ptr == s.data() + s.size() && std::isfinite(out);
}

bool ParseInt64(std::string_view s, int64_t& out) {
  s = Trim(s);
  if (s.empty()) return false;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  if (ec == std::errc() && ptr == s.data() + s.size()) return true;
  double d = 0;  // also accept "4.0e9"-style integral values
  if (!ParseDouble(s, d) || d != std::floor(d) || std::fabs(d) > 9.0e18) return false;
  out = static_cast<int64_t>(d);
  return true;
}

constexpr std::array<const char*, 10> kColumns = {
    "name",        "share",         "gflops", "ram_bytes",   "app_memory_bytes",
    "uplink_mbps", "downlink_mbps", "rtt_ms", "train_watts", "source"};

absl::Status ValidateClass(const PhoneClass& c, std::string_view where) {
  auto bad = [&](std::string_view column, std::string_view what) {
    return absl::InvalidArgumentError(ToAbsl(StrCat(where, "column '", column, "': ", what)));
  };
  if (c.name.empty()) return bad("name", "expected a non-empty name");
  if (!(c.share >= 0)) return bad("share", StrCat("expected a share >= 0, got ", c.share));
  if (!(c.gflops > 0)) return bad("gflops", StrCat("expected a positive GFLOP/s, got ", c.gflops));
  if (c.ram_bytes <= 0) return bad("ram_bytes", StrCat("expected positive bytes, got ", c.ram_bytes));
  if (c.app_memory_bytes <= 0 || c.app_memory_bytes > c.ram_bytes) {
    return bad("app_memory_bytes",
               StrCat("expected bytes in (0, ram_bytes = ", c.ram_bytes, "], got ", c.app_memory_bytes));
  }
  if (!(c.uplink_mbps > 0)) return bad("uplink_mbps", StrCat("expected a positive Mbit/s, got ", c.uplink_mbps));
  if (!(c.downlink_mbps > 0)) {
    return bad("downlink_mbps", StrCat("expected a positive Mbit/s, got ", c.downlink_mbps));
  }
  if (!(c.rtt_ms >= 0)) return bad("rtt_ms", StrCat("expected milliseconds >= 0, got ", c.rtt_ms));
  if (!(c.train_watts > 0)) return bad("train_watts", StrCat("expected positive watts, got ", c.train_watts));
  return absl::OkStatus();
}

absl::Status NormalizeShares(std::vector<PhoneClass>& classes, std::string_view origin) {
  double total = 0;
  for (const PhoneClass& c : classes) total += c.share;
  if (!(total > 0) || !std::isfinite(total)) {
    return absl::InvalidArgumentError(ToAbsl(StrCat(origin, ": shares must sum to a positive number, got ", total)));
  }
  for (PhoneClass& c : classes) c.share /= total;
  return absl::OkStatus();
}

std::string FormatBytes(double bytes) {
  char buf[32];
  if (bytes >= 1024.0 * 1024 * 1024) {
    std::snprintf(buf, sizeof(buf), "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
  } else if (bytes >= 1024.0 * 1024) {
    std::snprintf(buf, sizeof(buf), "%.1f MiB", bytes / (1024.0 * 1024));
  } else {
    std::snprintf(buf, sizeof(buf), "%.1f KiB", bytes / 1024.0);
  }
  return buf;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(mid), v.end());
  return v[mid];
}

// ---- Availability engine ---------------------------------------------------------------------

// Pure functions of (options, profile, device) used by Population's availability queries.
class Schedule {
 public:
  Schedule(const PopulationOptions& options, const DeviceProfile& profile, int64_t device)
      : options_(options), p_(profile), device_(device) {}

  double LocalSeconds(double t) const { return t + 60.0 * p_.utc_offset_minutes; }
  double UtcSeconds(int64_t local) const { return static_cast<double>(local - 60 * p_.utc_offset_minutes); }

  bool SkipRaw(int64_t day) const {
    Rng rng = StreamRng(options_.seed, "avail.skip", device_, day);
    return rng.Uniform() < options_.night_skip_probability;
  }

  // No two skipped nights in a row: a night is skipped when its raw draw says so and the previous
  // one's did not.
  bool NightSkipped(int64_t day) const { return SkipRaw(day) && !SkipRaw(day - 1); }

  bool SlotIdle(int64_t slot) const {
    Rng rng = StreamRng(options_.seed, "avail.idle", device_, slot);
    return rng.Uniform() < options_.daytime_idle_probability;
  }

  DayPlan Plan(int64_t day) const {
    Rng rng = StreamRng(options_.seed, "avail.day", device_, day);
    const double sigma = options_.daily_jitter_minutes;
    const double shift = ClippedNormal(rng, 2.0) * sigma;         // the whole night moves
    const double length_jitter = ClippedNormal(rng, 2.0) * 15.0;  // ±30 min
    const double home_jitter = std::clamp(rng.Normal() * sigma, -60.0, 60.0);
    const double day_jitter = std::clamp(rng.Normal() * sigma, -60.0, 60.0);
    const int64_t base = day * kDaySeconds;
    auto span = [base](double begin_minute, double end_minute) {
      begin_minute = std::clamp(begin_minute, 0.0, static_cast<double>(kWindowLimitMinutes));
      end_minute = std::clamp(end_minute, 0.0, static_cast<double>(kWindowLimitMinutes));
      return Span{base + std::llround(begin_minute * 60.0), base + std::llround(end_minute * 60.0)};
    };
    DayPlan plan;
    if (!NightSkipped(day)) {
      plan.charge_night =
          span(p_.charge_start_minute + shift, p_.charge_start_minute + shift + p_.charge_minutes + length_jitter);
    }
    plan.sleep = span(p_.sleep_minute + shift, p_.wake_minute + shift);
    const double home_begin = p_.home_minute + shift + home_jitter;
    plan.home_wifi = span(home_begin, p_.leave_minute + shift);
    if ((p_.flags & DeviceProfile::kDaytimeWifi) != 0) {
      plan.day_wifi[0] = span(p_.leave_minute - 1440 + shift, home_begin);
    }
    if (p_.day_charge_start_minute >= 0) {
      const double begin = p_.day_charge_start_minute + day_jitter;
      plan.day_charge = span(begin, begin + p_.day_charge_minutes);
      plan.day_wifi[1] = span(begin - 30, begin + p_.day_charge_minutes + 30);
    }
    return plan;
  }

  struct Flags {
    bool charging = false, unmetered = false, idle = false;
  };

  Flags FlagsAt(double local) const {
    const int64_t day = FloorDiv(FloorToInt(local), kDaySeconds);
    Flags f;
    bool asleep = false;
    for (int64_t anchor = day - 1; anchor <= day; ++anchor) {  // older anchors end before `day` starts
      const DayPlan plan = Plan(anchor);
      f.charging |= plan.charge_night.Contains(local) || plan.day_charge.Contains(local);
      f.unmetered |=
          plan.home_wifi.Contains(local) || plan.day_wifi[0].Contains(local) || plan.day_wifi[1].Contains(local);
      asleep |= plan.sleep.Contains(local);
    }
    f.idle = asleep || SlotIdle(FloorDiv(FloorToInt(local), kSlotSeconds));
    return f;
  }

  // Charging spans anchored on days [lo, hi], normalized.
  std::vector<Span> ChargeSpans(int64_t lo, int64_t hi) const {
    std::vector<Span> spans;
    for (int64_t d = lo; d <= hi; ++d) {
      const DayPlan plan = Plan(d);
      spans.push_back(plan.charge_night);
      spans.push_back(plan.day_charge);
    }
    Normalize(spans);
    return spans;
  }

  // Available spans (local seconds) built from the windows anchored on days [lo, hi], normalized.
  // Exact before (hi + 1) days: windows anchored after hi start at or after that.
  std::vector<Span> AvailableSpans(int64_t lo, int64_t hi) const {
    std::vector<Span> charging, unmetered, idle;
    for (int64_t d = lo; d <= hi; ++d) {
      const DayPlan plan = Plan(d);
      charging.push_back(plan.charge_night);
      charging.push_back(plan.day_charge);
      unmetered.push_back(plan.home_wifi);
      unmetered.push_back(plan.day_wifi[0]);
      unmetered.push_back(plan.day_wifi[1]);
      idle.push_back(plan.sleep);
    }
    Normalize(charging);
    Normalize(unmetered);
    const std::vector<Span> powered_on_wifi = Intersect(charging, unmetered);
    for (const Span& s : powered_on_wifi) {  // awake idle slots only matter where the other two hold
      for (int64_t slot = FloorDiv(s.begin, kSlotSeconds); slot * kSlotSeconds < s.end; ++slot) {
        if (SlotIdle(slot)) idle.push_back(Span{slot * kSlotSeconds, (slot + 1) * kSlotSeconds});
      }
    }
    Normalize(idle);
    return Intersect(powered_on_wifi, idle);
  }

  float Battery(double local) const {
    const int64_t day = FloorDiv(FloorToInt(local), kDaySeconds);
    const std::vector<Span> charges = ChargeSpans(day - 3, day);
    const double drain = p_.drain_tenth_percent_per_hour / 1000.0 / 3600.0;  // fraction per second
    const double gain = kChargePerHour / 3600.0;
    // Level at the start of charge i: full at the previous unplug (an approximation), then a
    // linear drain.
    auto level_at_plug = [&](size_t i) {
      if (i == 0) return 0.5;
      return std::max(0.05, 1.0 - drain * static_cast<double>(charges[i].begin - charges[i - 1].end));
    };
    size_t last = charges.size();
    for (size_t i = 0; i < charges.size(); ++i) {
      if (static_cast<double>(charges[i].begin) <= local) last = i;
    }
    if (last == charges.size()) return 0.5f;
    const Span& c = charges[last];
    const double at_plug = level_at_plug(last);
    if (local < static_cast<double>(c.end)) {
      return static_cast<float>(std::min(1.0, at_plug + gain * (local - static_cast<double>(c.begin))));
    }
    const double at_unplug = std::min(1.0, at_plug + gain * static_cast<double>(c.end - c.begin));
    return static_cast<float>(std::max(0.02, at_unplug - drain * (local - static_cast<double>(c.end))));
  }

 private:
  const PopulationOptions& options_;
  const DeviceProfile& p_;
  const int64_t device_;
};

absl::Status ValidateOptions(const PopulationOptions& o) {
  auto in = [](double v, double lo, double hi) { return v >= lo && v <= hi; };
  auto bad = [](std::string_view field, auto value, std::string_view range) {
    return absl::InvalidArgumentError(ToAbsl(StrCat("PopulationOptions.", field, " = ", value, ": expected ", range)));
  };
  if (o.devices < 1 || o.devices > 100'000'000) return bad("devices", o.devices, "[1, 100000000]");
  if (!(o.dropout_mean >= 0 && o.dropout_mean < 1)) return bad("dropout_mean", o.dropout_mean, "[0, 1)");
  if (!in(o.dropout_spread, 0, 3)) return bad("dropout_spread", o.dropout_spread, "[0, 3]");
  if (!in(o.variation, 0, 2)) return bad("variation", o.variation, "[0, 2]");
  if (!in(o.charge_start_earliest_hour, 12, 30)) {
    return bad("charge_start_earliest_hour", o.charge_start_earliest_hour, "[12, 30]");
  }
  if (!in(o.charge_start_latest_hour, o.charge_start_earliest_hour, 30)) {
    return bad("charge_start_latest_hour", o.charge_start_latest_hour, "[charge_start_earliest_hour, 30]");
  }
  if (!in(o.charge_hours_min, 3, 12)) return bad("charge_hours_min", o.charge_hours_min, "[3, 12]");
  if (!in(o.charge_hours_max, o.charge_hours_min, 12)) {
    return bad("charge_hours_max", o.charge_hours_max, "[charge_hours_min, 12]");
  }
  if (!in(o.daily_jitter_minutes, 0, 120)) return bad("daily_jitter_minutes", o.daily_jitter_minutes, "[0, 120]");
  if (!in(o.night_skip_probability, 0, 0.5)) {
    return bad("night_skip_probability", o.night_skip_probability, "[0, 0.5]");
  }
  if (!in(o.day_charger_fraction, 0, 1)) return bad("day_charger_fraction", o.day_charger_fraction, "[0, 1]");
  if (!in(o.daytime_wifi_fraction, 0, 1)) return bad("daytime_wifi_fraction", o.daytime_wifi_fraction, "[0, 1]");
  if (!in(o.daytime_idle_probability, 0, 1)) {
    return bad("daytime_idle_probability", o.daytime_idle_probability, "[0, 1]");
  }
  if (!(o.drain_percent_per_hour_min > 0 && o.drain_percent_per_hour_min <= 25)) {
    return bad("drain_percent_per_hour_min", o.drain_percent_per_hour_min, "(0, 25]");
  }
  if (!in(o.drain_percent_per_hour_max, o.drain_percent_per_hour_min, 25)) {
    return bad("drain_percent_per_hour_max", o.drain_percent_per_hour_max, "[drain_percent_per_hour_min, 25]");
  }
  return absl::OkStatus();
}

int16_t Minutes(double m) { return static_cast<int16_t>(std::lround(m)); }

}  // namespace

// ---- Phone classes ---------------------------------------------------------------------------

absl::StatusOr<std::vector<PhoneClass>> ParsePhoneClasses(std::string_view csv_text, std::string_view origin) {
  std::vector<PhoneClass> classes;
  std::map<std::string, size_t> column_index;  // column name -> field index
  size_t header_fields = 0;
  bool have_header = false;
  std::set<std::string> names;
  std::vector<std::string> fields;
  int64_t line_number = 0;
  size_t pos = 0;
  while (pos <= csv_text.size()) {
    const size_t eol = std::min(csv_text.find('\n', pos), csv_text.size());
    const std::string_view line = csv_text.substr(pos, eol - pos);
    pos = eol + 1;
    ++line_number;
    const std::string_view trimmed = Trim(line);
    if (trimmed.empty() || trimmed.front() == '#') continue;
    const std::string where = StrCat(origin, " line ", line_number, ", ");
    if (!SplitCsv(line, fields)) {
      return absl::InvalidArgumentError(ToAbsl(StrCat(where, "unterminated quoted field")));
    }
    if (!have_header) {
      for (size_t i = 0; i < fields.size(); ++i) column_index[fields[i]] = i;
      for (const char* column : kColumns) {
        if (column_index.count(column) == 0) {
          return absl::InvalidArgumentError(ToAbsl(StrCat(where, "column '", column, "': missing from the header")));
        }
      }
      header_fields = fields.size();
      have_header = true;
      continue;
    }
    if (fields.size() != header_fields) {
      return absl::InvalidArgumentError(
          ToAbsl(StrCat(where, "expected ", header_fields, " fields as in the header, got ", fields.size())));
    }
    auto field = [&](const char* column) -> const std::string& { return fields[column_index.at(column)]; };
    auto number = [&](const char* column, double& out) -> absl::Status {
      if (!ParseDouble(field(column), out)) {
        return absl::InvalidArgumentError(
            ToAbsl(StrCat(where, "column '", column, "': expected a number, got '", field(column), "'")));
      }
      return absl::OkStatus();
    };
    auto integer = [&](const char* column, int64_t& out) -> absl::Status {
      if (!ParseInt64(field(column), out)) {
        return absl::InvalidArgumentError(
            ToAbsl(StrCat(where, "column '", column, "': expected an integer, got '", field(column), "'")));
      }
      return absl::OkStatus();
    };
    PhoneClass c;
    c.name = field("name");
    c.source = field("source");
    SEEDLING_RETURN_IF_ERROR(number("share", c.share));
    SEEDLING_RETURN_IF_ERROR(number("gflops", c.gflops));
    SEEDLING_RETURN_IF_ERROR(integer("ram_bytes", c.ram_bytes));
    SEEDLING_RETURN_IF_ERROR(integer("app_memory_bytes", c.app_memory_bytes));
    SEEDLING_RETURN_IF_ERROR(number("uplink_mbps", c.uplink_mbps));
    SEEDLING_RETURN_IF_ERROR(number("downlink_mbps", c.downlink_mbps));
    SEEDLING_RETURN_IF_ERROR(number("rtt_ms", c.rtt_ms));
    SEEDLING_RETURN_IF_ERROR(number("train_watts", c.train_watts));
    SEEDLING_RETURN_IF_ERROR(ValidateClass(c, where));
    if (!names.insert(c.name).second) {
      return absl::InvalidArgumentError(ToAbsl(StrCat(where, "column 'name': duplicate class '", c.name, "'")));
    }
    classes.push_back(std::move(c));
  }
  if (classes.empty()) {
    return absl::InvalidArgumentError(ToAbsl(StrCat(origin, ": no phone classes (expected a header and rows)")));
  }
  SEEDLING_RETURN_IF_ERROR(NormalizeShares(classes, origin));
  return classes;
}

absl::StatusOr<std::vector<PhoneClass>> LoadPhoneClasses(const std::string& csv_path) {
  SEEDLING_ASSIGN_OR_RETURN(const std::string text, ReadFile(csv_path));
  return ParsePhoneClasses(text, csv_path);
}

// ---- Population ------------------------------------------------------------------------------

absl::StatusOr<Population> Population::Create(std::vector<PhoneClass> classes, const PopulationOptions& options) {
  SEEDLING_RETURN_IF_ERROR(ValidateOptions(options));
  if (classes.empty()) return absl::InvalidArgumentError("Population: no phone classes");
  if (classes.size() > 255) {
    return absl::InvalidArgumentError(ToAbsl(StrCat("Population: at most 255 phone classes, got ", classes.size())));
  }
  for (const PhoneClass& c : classes) {
    SEEDLING_RETURN_IF_ERROR(ValidateClass(c, StrCat("phone class '", c.name, "': ")));
  }
  SEEDLING_RETURN_IF_ERROR(NormalizeShares(classes, "Population"));
  std::vector<double> cumulative;
  double sum = 0;
  for (const PhoneClass& c : classes) cumulative.push_back(sum += c.share);
  double tz_total = 0;
  for (const TimeZoneWeight& z : kTimeZones) tz_total += z.weight;

  const uint64_t seed = options.seed;
  const double sigma = options.variation;
  std::vector<DeviceProfile> profiles(static_cast<size_t>(options.devices));
  for (int64_t i = 0; i < options.devices; ++i) {
    DeviceProfile& p = profiles[static_cast<size_t>(i)];

    Rng class_rng = StreamRng(seed, "profile.class", i, 0);
    const double u = class_rng.Uniform();
    const size_t k =
        static_cast<size_t>(std::upper_bound(cumulative.begin(), cumulative.end() - 1, u) - cumulative.begin());
    p.phone_class = static_cast<uint8_t>(k);
    const PhoneClass& c = classes[k];

    Rng figures = StreamRng(seed, "profile.figures", i, 0);
    const double compute_factor = std::exp(sigma * ClippedNormal(figures, 3.0));
    const double link_factor = std::exp(sigma * ClippedNormal(figures, 3.0));  // up and down move together
    const double rtt_factor = std::exp(sigma * ClippedNormal(figures, 3.0));
    const double power_factor = std::exp(sigma * ClippedNormal(figures, 3.0));
    p.gflops = static_cast<float>(c.gflops * compute_factor);
    p.uplink_mbps = static_cast<float>(c.uplink_mbps * link_factor);
    p.downlink_mbps = static_cast<float>(c.downlink_mbps * link_factor);
    p.rtt_ms = static_cast<float>(c.rtt_ms * rtt_factor);
    p.train_watts = static_cast<float>(c.train_watts * power_factor);

    Rng dropout = StreamRng(seed, "profile.dropout", i, 0);
    const double s = options.dropout_spread;
    p.dropout_probability = static_cast<float>(
        std::clamp(options.dropout_mean * std::exp(s * ClippedNormal(dropout, 3.0) - 0.5 * s * s), 0.0, 0.95));

    Rng tz = StreamRng(seed, "profile.timezone", i, 0);
    double pick = tz.Uniform() * tz_total;
    p.utc_offset_minutes = kTimeZones.back().offset_minutes;
    for (const TimeZoneWeight& z : kTimeZones) {
      if (pick < z.weight) {
        p.utc_offset_minutes = z.offset_minutes;
        break;
      }
      pick -= z.weight;
    }

    // Habits, in minutes after local midnight (see the header for the model).
    Rng habits = StreamRng(seed, "profile.habits", i, 0);
    const double charge_start =
        UniformIn(habits, options.charge_start_earliest_hour * 60, options.charge_start_latest_hour * 60);
    const double charge_length = UniformIn(habits, options.charge_hours_min * 60, options.charge_hours_max * 60);
    const double sleep = charge_start + UniformIn(habits, -60, 60);
    const double wake = std::max(charge_start + charge_length + UniformIn(habits, -60, 60), sleep + 300);
    const double home = std::min(UniformIn(habits, 17 * 60, 21 * 60), charge_start - 120);
    const double leave = wake + UniformIn(habits, 15, 90);
    p.charge_start_minute = Minutes(charge_start);
    p.charge_minutes = Minutes(charge_length);
    p.sleep_minute = Minutes(sleep);
    p.wake_minute = Minutes(wake);
    p.home_minute = Minutes(home);
    p.leave_minute = Minutes(leave);
    const bool day_charger = habits.Uniform() < options.day_charger_fraction;
    const double day_start = UniformIn(habits, 9 * 60, 16 * 60);
    const double day_length = UniformIn(habits, 60, 180);
    if (day_charger) {
      p.day_charge_start_minute = Minutes(day_start);
      p.day_charge_minutes = Minutes(day_length);
    }
    if (habits.Uniform() < options.daytime_wifi_fraction) p.flags |= DeviceProfile::kDaytimeWifi;
    p.drain_tenth_percent_per_hour = static_cast<uint8_t>(
        std::lround(10 * UniformIn(habits, options.drain_percent_per_hour_min, options.drain_percent_per_hour_max)));
  }
  return Population(std::move(classes), options, std::move(profiles));
}

const DeviceProfile& Population::profile(int64_t device) const {
  SEEDLING_CHECK(device >= 0 && device < size(), "device index out of range");
  return profiles_[static_cast<size_t>(device)];
}

const PhoneClass& Population::phone_class(int64_t device) const { return classes_[profile(device).phone_class]; }

int64_t Population::memory_budget_bytes(int64_t device) const { return phone_class(device).app_memory_bytes; }

DeviceConditions Population::ConditionsAt(int64_t device, double t) const {
  const Schedule schedule(options_, profile(device), device);
  const double local = schedule.LocalSeconds(t);
  const Schedule::Flags f = schedule.FlagsAt(local);
  DeviceConditions c;
  c.charging = f.charging;
  c.unmetered = f.unmetered;
  c.idle = f.idle;
  c.battery = schedule.Battery(local);
  return c;
}

bool Population::Available(int64_t device, double t) const {
  const Schedule schedule(options_, profile(device), device);
  const Schedule::Flags f = schedule.FlagsAt(schedule.LocalSeconds(t));
  return f.charging && f.unmetered && f.idle;
}

double Population::NextAvailable(int64_t device, double t) const {
  const Schedule schedule(options_, profile(device), device);
  const double local = schedule.LocalSeconds(t);
  const int64_t day = FloorDiv(FloorToInt(local), kDaySeconds);
  // Windows anchored before day - 1 end before `day` starts; those anchored after hi start after
  // hi ends.
  for (int64_t hi = day + 3; hi <= day + 12; hi += 3) {
    const int64_t horizon = (hi + 1) * kDaySeconds;
    for (const Span& s : schedule.AvailableSpans(day - 1, hi)) {
      if (static_cast<double>(s.end) <= local) continue;
      if (s.begin >= horizon) break;
      return s.Contains(local) ? t : schedule.UtcSeconds(s.begin);
    }
  }
  SEEDLING_CHECK(false, "no available window within 12 days: the availability model guarantees one");
  return t;
}

double Population::AvailableUntil(int64_t device, double t) const {
  if (!Available(device, t)) return t;
  const Schedule schedule(options_, profile(device), device);
  const double local = schedule.LocalSeconds(t);
  const int64_t day = FloorDiv(FloorToInt(local), kDaySeconds);
  for (int64_t hi = day + 2; hi <= day + 30; hi += 2) {
    const int64_t horizon = (hi + 1) * kDaySeconds;
    for (const Span& s : schedule.AvailableSpans(day - 1, hi)) {
      if (!s.Contains(local)) continue;
      if (s.end < horizon) return schedule.UtcSeconds(s.end);
      break;  // may continue into windows anchored after hi
    }
  }
  SEEDLING_CHECK(false, "available stretch longer than 30 days");
  return t;
}

bool Population::DropsOut(int64_t device, uint64_t k) const {
  const double p = profile(device).dropout_probability;
  Rng rng(options_.seed, StreamId("dropout", static_cast<uint64_t>(device), k));
  return rng.Uniform() < p;
}

double Population::DropoutPoint(int64_t device, uint64_t k) const {
  SEEDLING_CHECK(device >= 0 && device < size(), "device index out of range");
  Rng rng(options_.seed, StreamId("dropout", static_cast<uint64_t>(device), k));
  rng.Uniform();  // the DropsOut draw
  return rng.Uniform();
}

double Population::ComputeSeconds(int64_t device, double flops) const {
  return flops / (static_cast<double>(profile(device).gflops) * 1e9);
}

double Population::DownloadSeconds(int64_t device, uint64_t bytes) const {
  const DeviceProfile& p = profile(device);
  return p.rtt_ms / 1e3 + static_cast<double>(bytes) * 8.0 / (static_cast<double>(p.downlink_mbps) * 1e6);
}

double Population::UploadSeconds(int64_t device, uint64_t bytes) const {
  const DeviceProfile& p = profile(device);
  return p.rtt_ms / 1e3 + static_cast<double>(bytes) * 8.0 / (static_cast<double>(p.uplink_mbps) * 1e6);
}

double Population::TrainingJoules(int64_t device, double compute_seconds) const {
  return static_cast<double>(profile(device).train_watts) * compute_seconds;
}

std::string Population::Summary() const {
  const std::vector<ClassStats> rows = CondenseClasses(std::nullopt);
  std::string out = StrCat("population: ", size(), " devices, ", classes_.size(), " phone classes, ",
                           bytes_per_device(), " bytes per device (",
                           FormatBytes(static_cast<double>(bytes_per_device() * profiles_.size())), " of profiles)\n");
  char line[256];
  std::snprintf(line, sizeof(line), "  %-24s %8s %7s %9s %12s %18s %7s\n", "class", "devices", "share", "GFLOP/s",
                "mem budget", "down/up Mbit/s", "RTT ms");
  out += line;
  for (size_t k = 0; k < rows.size(); ++k) {
    const ClassStats& r = rows[k];
    // A class without devices prints zeros; its budget is the class's own.
    auto value = [&](double v) { return r.devices > 0 ? v : 0.0; };
    const double budget =
        r.whole_population ? value(r.median_budget_bytes) : static_cast<double>(classes_[k].app_memory_bytes);
    std::snprintf(line, sizeof(line), "  %-24s %8lld %6.1f%% %9.1f %12s %10.1f/%-7.1f %7.0f\n",
                  (r.whole_population ? std::string("all (medians)") : r.name).c_str(),
                  static_cast<long long>(r.devices), 100.0 * r.share, value(r.median_gflops),
                  FormatBytes(budget).c_str(), value(r.median_downlink_mbps), value(r.median_uplink_mbps),
                  value(r.median_rtt_ms));
    out += line;
  }
  return out;
}

std::vector<ClassStats> Population::ClassStatistics(double day_start_s) const { return CondenseClasses(day_start_s); }

double Population::AvailableSecondsInDay(int64_t device, double day_start_s) const {
  constexpr double kDay = 86400;
  // The available stretches that overlap [day_start_s, day_start_s + kDay).
  double available_s = 0;
  const double day_end = day_start_s + kDay;
  for (double t = day_start_s; t < day_end;) {
    const double from = NextAvailable(device, t);
    if (from >= day_end) break;
    const double until = AvailableUntil(device, from);
    available_s += std::min(until, day_end) - from;
    t = until;
  }
  return available_s;
}

std::vector<ClassStats> Population::CondenseClasses(std::optional<double> day_start_s) const {
  struct Draws {
    std::vector<double> gflops, ram, budget, down, up, rtt;
    double dropout = 0, available_s = 0;
  };
  std::vector<Draws> per_class(classes_.size() + 1);  // the last one: every device
  for (int64_t d = 0; d < size(); ++d) {
    const DeviceProfile& p = profiles_[static_cast<size_t>(d)];
    const PhoneClass& c = classes_[p.phone_class];
    const double available_s = day_start_s.has_value() ? AvailableSecondsInDay(d, *day_start_s) : 0;
    for (Draws* s : {&per_class[p.phone_class], &per_class.back()}) {
      s->gflops.push_back(p.gflops);
      s->ram.push_back(static_cast<double>(c.ram_bytes));
      s->budget.push_back(static_cast<double>(c.app_memory_bytes));
      s->down.push_back(p.downlink_mbps);
      s->up.push_back(p.uplink_mbps);
      s->rtt.push_back(p.rtt_ms);
      s->dropout += p.dropout_probability;
      s->available_s += available_s;
    }
  }
  std::vector<ClassStats> out;
  for (size_t k = 0; k < per_class.size(); ++k) {
    Draws& s = per_class[k];
    ClassStats row;
    row.whole_population = k == classes_.size();
    row.name = row.whole_population ? "all" : classes_[k].name;
    row.devices = static_cast<int64_t>(s.gflops.size());
    row.share = size() > 0 ? static_cast<double>(row.devices) / static_cast<double>(size()) : 0;
    if (row.devices > 0) {
      const double n = static_cast<double>(row.devices);
      row.median_gflops = Median(std::move(s.gflops));
      row.median_ram_bytes = Median(std::move(s.ram));
      row.median_budget_bytes = Median(std::move(s.budget));
      row.median_downlink_mbps = Median(std::move(s.down));
      row.median_uplink_mbps = Median(std::move(s.up));
      row.median_rtt_ms = Median(std::move(s.rtt));
      row.mean_dropout = s.dropout / n;
      if (day_start_s.has_value()) row.mean_available_hours = s.available_s / n / 3600;
    }
    out.push_back(std::move(row));
  }
  return out;
}

}  // namespace seedling::simulator
