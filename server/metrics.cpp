#include "server/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <set>
#include <utility>

#include "base/check.h"
#include "base/strings.h"

namespace seedling::server {
namespace {

using metrics_internal::Type;

constexpr std::string_view kHistogramSuffixes[] = {"_bucket", "_sum", "_count"};

const char* TypeName(Type t) {
  switch (t) {
    case Type::kCounter:
      return "counter";
    case Type::kGauge:
      return "gauge";
    case Type::kHistogram:
      return "histogram";
  }
  return "untyped";
}

bool IsAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// [a-zA-Z_:][a-zA-Z0-9_:]*
bool ValidMetricName(std::string_view s) {
  if (s.empty() || IsDigit(s[0])) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return IsAlpha(c) || IsDigit(c) || c == '_' || c == ':'; });
}

// [a-zA-Z_][a-zA-Z0-9_]*, and "__" prefixes are reserved for Prometheus itself.
bool ValidLabelName(std::string_view s) {
  if (s.empty() || IsDigit(s[0]) || s.substr(0, 2) == "__") return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return IsAlpha(c) || IsDigit(c) || c == '_'; });
}

// Length of the valid UTF-8 sequence at s[i], or 0 if there is none (RFC 3629: no overlong forms,
// no surrogates, nothing above U+10FFFF). Prometheus rejects a whole scrape over one invalid byte,
// so a label value built from, say, a peer's error message must not be able to break /metrics.
size_t Utf8SequenceLength(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const auto cont = [&](size_t k) { return i + k < s.size() && (b(k) & 0xC0) == 0x80; };
  const unsigned char c = b(0);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(1) || !cont(2)) return 0;
    if (c == 0xE0 && b(1) < 0xA0) return 0;  // overlong
    if (c == 0xED && b(1) > 0x9F) return 0;  // UTF-16 surrogates
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    if (c == 0xF0 && b(1) < 0x90) return 0;  // overlong
    if (c == 0xF4 && b(1) > 0x8F) return 0;  // above U+10FFFF
    return 4;
  }
  return 0;
}

// Escapes per the 0.0.4 format: in HELP text \ and newline; in label values also the double quote.
void AppendEscaped(std::string& out, std::string_view s, bool escape_quote) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = Utf8SequenceLength(s, i);
    if (n == 0) {
      out += "\xEF\xBF\xBD";  // U+FFFD REPLACEMENT CHARACTER
      ++i;
      continue;
    }
    const char c = s[i];
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '"' && escape_quote) {
      out += "\\\"";
    } else {
      out.append(s.data() + i, n);
    }
    i += n;
  }
}

// Go's ParseFloat (what Prometheus uses) reads the shortest round-trip form std::to_chars produces,
// plus the special spellings below.
void AppendDouble(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
  } else if (std::isinf(v)) {
    out += v > 0 ? "+Inf" : "-Inf";
  } else {
    char buf[64];
    const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
    SEEDLING_CHECK(ec == std::errc());
    out.append(buf, end);
  }
}

void AppendUint(std::string& out, uint64_t v) {
  char buf[32];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  SEEDLING_CHECK(ec == std::errc());
  out.append(buf, end);
}

// {a="x",b="y"} plus an optional trailing le="…"; nothing at all for an empty set.
void AppendLabels(std::string& out, const std::vector<std::string>& names, const std::vector<std::string>& values,
                  const std::string* le = nullptr) {
  if (names.empty() && le == nullptr) return;
  out += '{';
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ',';
    out += names[i];
    out += "=\"";
    AppendEscaped(out, values[i], /*escape_quote=*/true);
    out += '"';
  }
  if (le != nullptr) {
    if (!names.empty()) out += ',';
    out += "le=\"";
    out += *le;
    out += '"';
  }
  out += '}';
}

void AppendSample(std::string& out, const Counter& c, const std::string& name,
                  const std::vector<std::string>& label_names, const std::vector<std::string>& values,
                  const std::vector<double>&) {
  out += name;
  AppendLabels(out, label_names, values);
  out += ' ';
  AppendUint(out, c.Value());
  out += '\n';
}

void AppendSample(std::string& out, const Gauge& g, const std::string& name,
                  const std::vector<std::string>& label_names, const std::vector<std::string>& values,
                  const std::vector<double>&) {
  out += name;
  AppendLabels(out, label_names, values);
  out += ' ';
  AppendDouble(out, g.Value());
  out += '\n';
}

void AppendSample(std::string& out, const Histogram& h, const std::string& name,
                  const std::vector<std::string>& label_names, const std::vector<std::string>& values,
                  const std::vector<double>& bounds) {
  const Histogram::Snapshot snap = h.Collect();
  for (size_t i = 0; i <= bounds.size(); ++i) {
    std::string le;
    if (i < bounds.size()) {
      AppendDouble(le, bounds[i]);
    } else {
      le = "+Inf";
    }
    out += name;
    out += "_bucket";
    AppendLabels(out, label_names, values, &le);
    out += ' ';
    AppendUint(out, snap.cumulative[i]);
    out += '\n';
  }
  out += name;
  out += "_sum";
  AppendLabels(out, label_names, values);
  out += ' ';
  AppendDouble(out, snap.sum);
  out += '\n';
  out += name;
  out += "_count";
  AppendLabels(out, label_names, values);
  out += ' ';
  AppendUint(out, snap.count);
  out += '\n';
}

void CheckBounds(const std::vector<double>& bounds) {
  SEEDLING_CHECK(!bounds.empty(), "a histogram needs at least one finite bucket bound");
  for (size_t i = 0; i < bounds.size(); ++i) {
    SEEDLING_CHECK(std::isfinite(bounds[i]), "histogram bucket bounds must be finite (+Inf is implicit)");
    SEEDLING_CHECK(i == 0 || bounds[i - 1] < bounds[i], "histogram bucket bounds must be strictly increasing");
  }
}

}  // namespace

// ---- Histogram ----------------------------------------------------------------------------------

Histogram::Histogram(std::vector<double> upper_bounds)
    : upper_bounds_(std::move(upper_bounds)), counts_(new std::atomic<uint64_t>[upper_bounds_.size() + 1]) {
  CheckBounds(upper_bounds_);
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) counts_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double v) {
  if (std::isnan(v)) return;
  const size_t bucket = std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), v) - upper_bounds_.begin();
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::Collect() const {
  Snapshot s;
  s.cumulative.resize(upper_bounds_.size() + 1);
  uint64_t running = 0;
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) {
    running += counts_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = running;
  }
  s.count = running;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

std::vector<double> Histogram::LatencySecondsBuckets() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

std::vector<double> Histogram::SizeBytesBuckets() { return ExponentialBuckets(1024, 4, 11); }

std::vector<double> Histogram::ExponentialBuckets(double start, double factor, int count) {
  SEEDLING_CHECK(start > 0 && factor > 1 && count >= 1);
  std::vector<double> b;
  b.reserve(count);
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

// ---- Families -----------------------------------------------------------------------------------

namespace metrics_internal {

FamilyBase::FamilyBase(std::string name, std::string help, Type type, std::vector<std::string> label_names)
    : name_(std::move(name)), help_(std::move(help)), type_(type), label_names_(std::move(label_names)) {}

}  // namespace metrics_internal

template <typename T>
Family<T>::Family(std::string name, std::string help, Type type, std::vector<std::string> label_names,
                  std::vector<double> upper_bounds)
    : FamilyBase(std::move(name), std::move(help), type, std::move(label_names)),
      upper_bounds_(std::move(upper_bounds)) {
  // Exported at zero before the first event, so a rate() over a fresh process has a starting point.
  if (this->label_names().empty()) WithLabels({});
}

template <typename T>
T& Family<T>::WithLabels(const std::vector<std::string>& label_values) {
  SEEDLING_CHECK(label_values.size() == label_names().size(), "wrong number of label values for this metric");
  {
    absl::ReaderMutexLock lock(&mu_);
    const auto it = series_.find(label_values);
    if (it != series_.end()) return *it->second;
  }
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = series_.try_emplace(label_values);
  if (inserted) {
    if constexpr (std::is_same_v<T, Histogram>) {
      it->second = std::make_unique<Histogram>(upper_bounds_);
    } else {
      it->second = std::make_unique<T>();
    }
  }
  return *it->second;
}

template <typename T>
T& Family<T>::Get() {
  SEEDLING_CHECK(label_names().empty(), "Get() on a metric with labels: use WithLabels");
  return WithLabels({});
}

template <typename T>
void Family<T>::Render(std::string& out) const {
  out += "# HELP ";
  out += name();
  out += ' ';
  AppendEscaped(out, help(), /*escape_quote=*/false);
  out += "\n# TYPE ";
  out += name();
  out += ' ';
  out += TypeName(type());
  out += '\n';
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [values, series] : series_) {
    AppendSample(out, *series, name(), label_names(), values, upper_bounds_);
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

// ---- Registry -----------------------------------------------------------------------------------

CounterFamily& Metrics::AddCounter(std::string_view name, std::string_view help, std::vector<std::string> label_names) {
  return static_cast<CounterFamily&>(Add(name, help, Type::kCounter, std::move(label_names), {}));
}

GaugeFamily& Metrics::AddGauge(std::string_view name, std::string_view help, std::vector<std::string> label_names) {
  return static_cast<GaugeFamily&>(Add(name, help, Type::kGauge, std::move(label_names), {}));
}

HistogramFamily& Metrics::AddHistogram(std::string_view name, std::string_view help, std::vector<double> upper_bounds,
                                       std::vector<std::string> label_names) {
  CheckBounds(upper_bounds);
  return static_cast<HistogramFamily&>(
      Add(name, help, Type::kHistogram, std::move(label_names), std::move(upper_bounds)));
}

metrics_internal::FamilyBase& Metrics::Add(std::string_view name, std::string_view help, Type type,
                                           std::vector<std::string> label_names, std::vector<double> upper_bounds) {
  SEEDLING_CHECK(ValidMetricName(name), "invalid Prometheus metric name");
  std::set<std::string_view> seen;
  for (const std::string& l : label_names) {
    SEEDLING_CHECK(ValidLabelName(l), "invalid Prometheus label name");
    SEEDLING_CHECK(seen.insert(l).second, "duplicate label name");
    SEEDLING_CHECK(type != Type::kHistogram || l != "le", "\"le\" is reserved for histogram buckets");
  }

  absl::MutexLock lock(&mu_);
  if (const auto it = families_.find(name); it != families_.end()) {
    metrics_internal::FamilyBase& f = *it->second;
    SEEDLING_CHECK(f.type() == type && f.label_names() == label_names,
                   "metric registered twice with different type or labels");
    if (type == Type::kHistogram) {
      SEEDLING_CHECK(static_cast<HistogramFamily&>(f).upper_bounds() == upper_bounds,
                     "histogram registered twice with different buckets");
    }
    return f;
  }
  // A histogram "x" also writes x_bucket, x_sum and x_count: no other metric may use those names.
  for (std::string_view suffix : kHistogramSuffixes) {
    if (type == Type::kHistogram) {
      SEEDLING_CHECK(families_.find(StrCat(name, suffix)) == families_.end(),
                     "metric name collides with a histogram's _bucket/_sum/_count series");
    }
    if (name.size() > suffix.size() && name.substr(name.size() - suffix.size()) == suffix) {
      const auto base = families_.find(name.substr(0, name.size() - suffix.size()));
      SEEDLING_CHECK(base == families_.end() || base->second->type() != Type::kHistogram,
                     "metric name collides with a histogram's _bucket/_sum/_count series");
    }
  }

  std::unique_ptr<metrics_internal::FamilyBase> family;
  std::string n(name), h(help);
  switch (type) {
    case Type::kCounter:
      family = std::make_unique<CounterFamily>(std::move(n), std::move(h), type, std::move(label_names),
                                               std::vector<double>{});
      break;
    case Type::kGauge:
      family = std::make_unique<GaugeFamily>(std::move(n), std::move(h), type, std::move(label_names),
                                             std::vector<double>{});
      break;
    case Type::kHistogram:
      family = std::make_unique<HistogramFamily>(std::move(n), std::move(h), type, std::move(label_names),
                                                 std::move(upper_bounds));
      break;
  }
  auto [it, inserted] = families_.emplace(std::string(name), std::move(family));
  return *it->second;
}

std::string Metrics::RenderPrometheus() const {
  std::string out;
  absl::MutexLock lock(&mu_);
  for (const auto& [name, family] : families_) family->Render(out);
  return out;
}

}  // namespace seedling::server
