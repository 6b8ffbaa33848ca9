#pragma once

// The simulator's device population (docs/architecture.md, "The simulator"): N phones, each with a profile drawn from a
// table of phone classes (data/phones/phone_classes.csv), an availability pattern, and a dropout
// probability.
//
// Profiles. Each device gets a class (drawn with the class shares), then its own figures: the
// class's sustained GFLOP/s, link bandwidths, RTT and training power, each multiplied by
// exp(variation * z) with z ~ N(0, 1) clipped to [-3, 3] (a log-normal spread whose median is the
// class figure). RAM and the app memory budget are the class's.
//
// Availability. The OS lets the app train only when the phone is charging, on an unmetered network
// and idle (Android WorkManager setRequiresCharging / setRequiredNetworkType(UNMETERED) /
// setRequiresDeviceIdle; iOS BGProcessingTask requiresExternalPower /
// requiresNetworkConnectivity). The model, in the device's local time:
//
//   * UTC offset: one per device, drawn from a world distribution weighted roughly by smartphone
//     users per time zone (an approximation built from Newzoo's users-by-country ranking: China
//     910M, India 648M, US 249M, Indonesia 192M, Brazil 139M, ...; plus assumptions for the rest;
//     daylight saving time is ignored). See kTimeZones in population.cpp.
//   * Habits, drawn once per device: a nightly plug-in time uniform in
//     [charge_start_earliest_hour, charge_start_latest_hour] (22:00-01:00 by default) lasting
//     [charge_hours_min, charge_hours_max] hours; going to sleep (screen off) within an hour of
//     plugging in and waking within an hour of the charge's end; home Wi-Fi (unmetered) from an
//     evening arrival (17:00-21:00) until leaving after waking. A fraction (day_charger_fraction)
//     also charges for 1-3 h starting 09:00-16:00 somewhere with Wi-Fi (desk, office); a fraction
//     (daytime_wifi_fraction) is on Wi-Fi all day (works from home, or an office with Wi-Fi).
//   * Per-day jitter: every local day gets a shift of the whole night (N(0, daily_jitter_minutes)
//     clipped to 2 sigma), a jitter of the charge length (30 min at most) and of the home arrival.
//     A night's charge is skipped (away, forgot) when that night's draw falls under
//     night_skip_probability p and the previous night's did not: a skip rate of p(1 - p) and never
//     two nights in a row. Every night that is not skipped has at least an hour of charging, home
//     Wi-Fi and sleep together, so NextAvailable is finite: within about three days.
//   * Idle: the screen is off while asleep, and while awake in 30-minute local slots, each
//     independently idle with probability daytime_idle_probability.
//
// Every window is anchored on the local day it starts in, lies within 48 h of that day's midnight,
// and has whole-second boundaries: Available(t) looks at two anchor days and is O(1);
// NextAvailable and AvailableUntil scan a few days of windows.
//
// Determinism. Every draw comes from seedling::Rng(options.seed, StreamId(name, device, index))
// where StreamId hashes a stream name ("profile.class", "avail.day", "avail.idle", "dropout", ...),
// the device and a per-purpose index (0, the local day, the 30-minute slot, the task number):
// adding a stream never changes another's draws, and every query is a pure function of (seed,
// device, arguments). Population is immutable after Create and thread-safe for concurrent const
// use.
//
// Memory. Per device the population keeps only a DeviceProfile (bytes_per_device(): 48 bytes);
// classes are shared; nothing is allocated per day, slot or task.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace seedling::simulator {

// One row of data/phones/phone_classes.csv.
struct PhoneClass {
  std::string name;              // unique, e.g. "android-mid-2021"
  double share = 0;              // fraction of the population (normalized to sum to 1 across classes)
  double gflops = 0;             // sustained fp32 GFLOP/s on the training kernels (after thermal throttling)
  int64_t ram_bytes = 0;         // physical RAM
  int64_t app_memory_bytes = 0;  // memory the OS lets a background app use (<= ram_bytes)
  double uplink_mbps = 0;        // Mbit/s (1e6 bit/s) on the link the phone trains on
  double downlink_mbps = 0;      // Mbit/s
  double rtt_ms = 0;             // round-trip time to the server, milliseconds
  double train_watts = 0;        // whole-device power while training, watts
  std::string source;            // citations for the row
};

// Parses the CSV: '#' lines and blank lines are skipped; the first other line is a header naming
// the columns (any order; extra columns are ignored): name, share, gflops, ram_bytes,
// app_memory_bytes, uplink_mbps, downlink_mbps, rtt_ms, train_watts, source. Fields may be
// double-quoted ("" inside quotes is a quote). Returns the classes with shares normalized to sum
// to 1. NotFound if the file is missing; InvalidArgument naming the file, line and column for a
// missing column, a wrong field count, a non-number, a non-positive figure (share may be 0 but not
// all shares), app memory above RAM, a duplicate or empty name, or no rows.
absl::StatusOr<std::vector<PhoneClass>> LoadPhoneClasses(const std::string& csv_path);

// Same as LoadPhoneClasses on CSV text; `origin` names the source in messages.
absl::StatusOr<std::vector<PhoneClass>> ParsePhoneClasses(std::string_view csv_text, std::string_view origin);

struct PopulationOptions {
  // Number of devices, in [1, 100'000'000]. Default 1000.
  int64_t devices = 1000;
  // Root seed of every stream. Default 0.
  uint64_t seed = 0;
  // Mean probability that a device drops out during a task, in [0, 1). Default 0.05.
  double dropout_mean = 0.05;
  // Sigma of the per-device log-normal spread of the dropout probability (its mean is kept), in
  // [0, 3]. Default 0.5.
  double dropout_spread = 0.5;
  // Sigma of the per-device log-normal spread around the class figures, in [0, 2]. Default 0.2.
  double variation = 0.2;

  // Availability. Hours are local, after midnight; values past 24 mean after the next midnight.
  // Habitual nightly plug-in, earliest, hours, in [12, 30]. Default 22 (22:00).
  double charge_start_earliest_hour = 22.0;
  // Habitual nightly plug-in, latest, hours, in [earliest, 30]. Default 25 (01:00).
  double charge_start_latest_hour = 25.0;
  // Habitual nightly charge length, shortest and longest, hours, in [3, 12]. Default 5 to 9.
  double charge_hours_min = 5.0;
  double charge_hours_max = 9.0;
  // Sigma of the per-day shift of the night, minutes, in [0, 120]. Default 30.
  double daily_jitter_minutes = 30.0;
  // p: nights are skipped at rate p(1 - p), never two in a row, in [0, 0.5]. Default 0.1.
  double night_skip_probability = 0.1;
  // Fraction of devices that also charge 1-3 h in the day on Wi-Fi, in [0, 1]. Default 0.15.
  double day_charger_fraction = 0.15;
  // Fraction of devices on unmetered Wi-Fi all day, in [0, 1]. Default 0.3.
  double daytime_wifi_fraction = 0.3;
  // Chance that a 30-minute awake slot has the screen off, in [0, 1]. Default 0.5.
  double daytime_idle_probability = 0.5;
  // Battery drain while unplugged, % per hour, lowest and highest, in (0, 25]. Default 3 to 7.
  double drain_percent_per_hour_min = 3.0;
  double drain_percent_per_hour_max = 7.0;
};

// What the OS knows about a device at one instant.
struct DeviceConditions {
  bool charging = false;   // on external power
  bool unmetered = false;  // on an unmetered network (Wi-Fi)
  bool idle = false;       // screen off / not in use
  // State of charge in [0, 1]. Approximate: full at unplug, linear drain, 50 % per hour on charge.
  float battery = 1.0f;
};

// A device's characteristics: what the simulator keeps per device. Compact: no heap, float and
// int16 fields. Minutes are local; "after midnight" values may pass 1440 (the next day).
struct DeviceProfile {
  float gflops = 0;                           // sustained fp32 GFLOP/s on the training kernels
  float uplink_mbps = 0;                      // Mbit/s
  float downlink_mbps = 0;                    // Mbit/s
  float rtt_ms = 0;                           // milliseconds
  float train_watts = 0;                      // watts while training
  float dropout_probability = 0;              // probability of dropping out during one task
  int16_t utc_offset_minutes = 0;             // local time = UTC + this
  int16_t charge_start_minute = 0;            // habitual nightly plug-in, minutes after midnight
  int16_t charge_minutes = 0;                 // habitual nightly charge length
  int16_t sleep_minute = 0;                   // habitual screen-off for the night, minutes after midnight
  int16_t wake_minute = 0;                    // habitual wake-up, minutes after the previous midnight
  int16_t home_minute = 0;                    // habitual arrival on home Wi-Fi, minutes after midnight
  int16_t leave_minute = 0;                   // habitual departure from home, minutes after previous midnight
  int16_t day_charge_start_minute = -1;       // daytime charge start, minutes after midnight; -1: none
  int16_t day_charge_minutes = 0;             // daytime charge length
  uint8_t phone_class = 0;                    // index into Population::classes()
  uint8_t flags = 0;                          // kDaytimeWifi
  uint8_t drain_tenth_percent_per_hour = 50;  // battery drain while unplugged, 0.1 % per hour

  static constexpr uint8_t kDaytimeWifi = 1;
};

// One phone class's devices, or the whole population's, condensed for the report's population table.
// Figures drawn per device are medians over the devices; NaN when there are none.
struct ClassStats {
  std::string name;                   // the class's name; "all" for the whole population
  bool whole_population = false;      // the row over every device
  int64_t devices = 0;                // devices of the class
  double share = 0;                   // devices / population size, in [0, 1]
  double median_gflops = NAN;         // sustained GFLOP/s
  double median_ram_bytes = NAN;      // physical RAM, bytes (the class's, for a class)
  double median_budget_bytes = NAN;   // app memory budget, bytes (the class's, for a class)
  double median_downlink_mbps = NAN;  // Mbit/s
  double median_uplink_mbps = NAN;    // Mbit/s
  double median_rtt_ms = NAN;         // milliseconds
  double mean_dropout = NAN;          // mean per-task dropout probability, in [0, 1]
  double mean_available_hours = NAN;  // hours available (charging, unmetered and idle) in the day measured,
                                      // mean over the devices, in [0, 24]
};

class Population {
 public:
  // Draws `options.devices` profiles. InvalidArgument for no classes, more than 255 classes, a
  // class with a non-positive figure, shares that do not sum to a positive number, or an option out
  // of its documented range. Shares are normalized again here.
  static absl::StatusOr<Population> Create(std::vector<PhoneClass> classes, const PopulationOptions& options);

  int64_t size() const { return static_cast<int64_t>(profiles_.size()); }
  const PopulationOptions& options() const { return options_; }
  const std::vector<PhoneClass>& classes() const { return classes_; }
  // `device` must be in [0, size()) for every per-device call (checked: aborts otherwise).
  const DeviceProfile& profile(int64_t device) const;
  const PhoneClass& phone_class(int64_t device) const;
  // Bytes the app may use on the device (its class's app_memory_bytes).
  int64_t memory_budget_bytes(int64_t device) const;

  // Conditions at simulated time t (seconds since the Unix epoch, UTC): deterministic in
  // (seed, device, t).
  DeviceConditions ConditionsAt(int64_t device, double t) const;
  // True when the OS would let the app train: charging && unmetered && idle.
  bool Available(int64_t device, double t) const;
  // Earliest time >= t at which Available() holds (t itself if available at t). Finite: within
  // about three days.
  double NextAvailable(int64_t device, double t) const;
  // End of the available stretch containing t: the first time > t at which Available() fails.
  // Returns t if the device is not available at t.
  double AvailableUntil(int64_t device, double t) const;

  // Whether the device drops out during its k-th task ("dropout" stream keyed by (device, k)),
  // and how far into the task it drops: a fraction in [0, 1) from the same stream, meaningful
  // when DropsOut is true.
  bool DropsOut(int64_t device, uint64_t k) const;
  double DropoutPoint(int64_t device, uint64_t k) const;

  // flops / (gflops × 1e9).
  double ComputeSeconds(int64_t device, double flops) const;
  // One RTT + bytes × 8 / (downlink_mbps × 1e6).
  double DownloadSeconds(int64_t device, uint64_t bytes) const;
  // One RTT + bytes × 8 / (uplink_mbps × 1e6).
  double UploadSeconds(int64_t device, uint64_t bytes) const;
  // train_watts × compute_seconds.
  double TrainingJoules(int64_t device, double compute_seconds) const;

  // The population's memory per device: sizeof(DeviceProfile).
  size_t bytes_per_device() const { return sizeof(DeviceProfile); }
  // Devices per class with median GFLOP/s, memory budget, bandwidth and RTT; bytes per device.
  std::string Summary() const;
  // One row per class in classes() order (classes without devices included), then a row "all" over every
  // device. Availability is measured exactly (NextAvailable / AvailableUntil) over the 24 hours from
  // `day_start_s` (Unix seconds); the walk costs a few window scans per device, so O(size()).
  std::vector<ClassStats> ClassStatistics(double day_start_s) const;

 private:
  Population(std::vector<PhoneClass> classes, PopulationOptions options, std::vector<DeviceProfile> profiles)
      : classes_(std::move(classes)), options_(options), profiles_(std::move(profiles)) {}

  // The rows of ClassStatistics (Summary prints them too); availability only with a day to measure.
  std::vector<ClassStats> CondenseClasses(std::optional<double> day_start_s) const;
  // Seconds `device` is available in the 24 hours from `day_start_s`.
  double AvailableSecondsInDay(int64_t device, double day_start_s) const;

  // Constant after construction.
  std::vector<PhoneClass> classes_;
  PopulationOptions options_;
  std::vector<DeviceProfile> profiles_;
};

}  // namespace seedling::simulator
