#pragma once

// The coordinator's metrics registry (docs/architecture.md, "The server"): counters, gauges and
// fixed-bucket histograms, optionally split by labels, rendered in the Prometheus text exposition
// format 0.0.4 for GET /metrics (server/http.h).
//
// No globals: the coordinator owns one Metrics and passes it by reference to whatever records into
// it.
//
//   Metrics metrics;
//   CounterFamily& rejected = metrics.AddCounter("seedling_updates_rejected_total",
//                                                "Updates refused, by reason.", {"reason"});
//   Counter& stale = rejected.WithLabels({"stale"});   // look up once ...
//   stale.Increment();                                  // ... then a single atomic add per event
//
// Cost model: Increment / Set / Observe are lock-free atomics. WithLabels takes a shared (reader)
// lock to find an existing series and an exclusive lock only to create a new label set; Add* and
// RenderPrometheus take the registry mutex. Series are never removed, so every reference returned
// here stays valid for the lifetime of the Metrics object. Keep label values low-cardinality
// (reasons, states, routes), never device ids or anything a client chooses freely.
//
// Misuse (an invalid metric or label name, a wrong number of label values, the same name registered
// twice with different definitions, unsorted histogram buckets) is a programming error and aborts.

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace seedling::server {

// A monotonically increasing count (Prometheus "counter"). Thread-safe.
class Counter {
 public:
  void Increment(uint64_t n = 1) { value_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

// A value that goes up and down (Prometheus "gauge"). Thread-safe.
class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double delta) { value_.fetch_add(delta, std::memory_order_relaxed); }
  void Increment() { Add(1.0); }
  void Decrement() { Add(-1.0); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Observations counted into fixed buckets (Prometheus "histogram"). Thread-safe.
class Histogram {
 public:
  // `upper_bounds`: finite, strictly increasing, non-empty; the +Inf bucket is implicit.
  explicit Histogram(std::vector<double> upper_bounds);

  // Counts `v` into the first bucket whose upper bound is >= v (Prometheus "le" semantics). NaN is
  // ignored: it would poison _sum for the rest of the process's life.
  void Observe(double v);

  struct Snapshot {
    std::vector<uint64_t> cumulative;  // one per upper bound, then +Inf; cumulative.back() == count
    double sum = 0.0;
    uint64_t count = 0;
  };
  // A consistent-enough view: count is derived from the buckets, so the +Inf bucket always equals
  // count even while other threads observe (sum may lag or lead by the in-flight observations).
  Snapshot Collect() const;

  const std::vector<double>& upper_bounds() const { return upper_bounds_; }

  // Request latencies in seconds: 5 ms … 60 s.
  static std::vector<double> LatencySecondsBuckets();
  // Payload sizes in bytes: 1 KiB … 1 GiB in steps of ×4.
  static std::vector<double> SizeBytesBuckets();
  // `count` bounds start, start·factor, start·factor², … (start > 0, factor > 1, count >= 1).
  static std::vector<double> ExponentialBuckets(double start, double factor, int count);

 private:
  const std::vector<double> upper_bounds_;
  // Non-cumulative: counts_[i] for bucket i, counts_[upper_bounds_.size()] for (last bound, +Inf).
  const std::unique_ptr<std::atomic<uint64_t>[]> counts_;
  std::atomic<double> sum_{0.0};
};

namespace metrics_internal {

enum class Type { kCounter, kGauge, kHistogram };

// The name, help and label names shared by every series of one metric.
class FamilyBase {
 public:
  FamilyBase(std::string name, std::string help, Type type, std::vector<std::string> label_names);
  virtual ~FamilyBase() = default;
  FamilyBase(const FamilyBase&) = delete;
  FamilyBase& operator=(const FamilyBase&) = delete;

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  Type type() const { return type_; }
  const std::vector<std::string>& label_names() const { return label_names_; }

  // Appends this family's HELP, TYPE and sample lines to `out`, series sorted by label values.
  virtual void Render(std::string& out) const = 0;

 private:
  const std::string name_;
  const std::string help_;
  const Type type_;
  const std::vector<std::string> label_names_;
};

}  // namespace metrics_internal

// All series of one metric, one per distinct set of label values. Thread-safe.
template <typename T>
class Family final : public metrics_internal::FamilyBase {
 public:
  // Internal: use Metrics::Add*. `upper_bounds` is used by histogram families only.
  Family(std::string name, std::string help, metrics_internal::Type type, std::vector<std::string> label_names,
         std::vector<double> upper_bounds);

  // The series for `label_values` (one per label name, in the same order), created at zero on first
  // use. Aborts on a wrong number of values. The reference is valid as long as the Metrics object.
  T& WithLabels(const std::vector<std::string>& label_values);
  // The single series of a family without labels (aborts if the family has labels).
  T& Get();

  const std::vector<double>& upper_bounds() const { return upper_bounds_; }
  void Render(std::string& out) const override;

 private:
  // Constant after construction.
  const std::vector<double> upper_bounds_;

  mutable absl::Mutex mu_;
  // Sorted by label values, which gives RenderPrometheus its stable order; unique_ptr because atomics do
  // not move and callers keep references.
  std::map<std::vector<std::string>, std::unique_ptr<T>> series_ ABSL_GUARDED_BY(mu_);
};

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

extern template class Family<Counter>;
extern template class Family<Gauge>;
extern template class Family<Histogram>;

// The registry. Thread-safe; not copyable or movable (callers hold references into it).
class Metrics {
 public:
  Metrics() = default;
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Registers a metric, or returns the existing one when `name` was already registered with the
  // same type, label names (and buckets); any other redefinition aborts. `name` matches
  // [a-zA-Z_:][a-zA-Z0-9_:]*; label names match [a-zA-Z_][a-zA-Z0-9_]*, do not start with "__", are
  // distinct, and are not "le" for histograms. A family without labels starts with its one series
  // at 0, so it is exported before the first event.
  CounterFamily& AddCounter(std::string_view name, std::string_view help, std::vector<std::string> label_names = {});
  GaugeFamily& AddGauge(std::string_view name, std::string_view help, std::vector<std::string> label_names = {});
  HistogramFamily& AddHistogram(std::string_view name, std::string_view help, std::vector<double> upper_bounds,
                                std::vector<std::string> label_names = {});

  // The Prometheus text exposition format 0.0.4 (serve as "text/plain; version=0.0.4"): for every
  // metric, sorted by name, "# HELP" and "# TYPE" lines then its samples sorted by label values;
  // histograms as name_bucket{...,le="…"} (cumulative, ending with le="+Inf"), name_sum and
  // name_count. Help text and label values are escaped, and invalid UTF-8 in them is replaced by
  // U+FFFD.
  std::string RenderPrometheus() const;

 private:
  metrics_internal::FamilyBase& Add(std::string_view name, std::string_view help, metrics_internal::Type type,
                                    std::vector<std::string> label_names, std::vector<double> upper_bounds);

  mutable absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<metrics_internal::FamilyBase>, std::less<>> families_ ABSL_GUARDED_BY(mu_);
};

}  // namespace seedling::server
