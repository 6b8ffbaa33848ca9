#include "simulator/population.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "base/file.h"
#include "catch2/catch.hpp"
#include "model/config.h"

namespace seedling::simulator {
namespace {

const std::string kTableCsv = std::string(SEEDLING_SOURCE_DIR) + "/data/phones/phone_classes.csv";
constexpr double kJan10 = 1704844800.0;  // 2024-01-10 00:00:00 UTC
constexpr double kHour = 3600.0;

std::vector<PhoneClass> RealClasses() {
  auto classes = LoadPhoneClasses(kTableCsv);
  REQUIRE(classes.ok());
  return *classes;
}

Population MakePopulation(int64_t devices, uint64_t seed) {
  PopulationOptions options;
  options.devices = devices;
  options.seed = seed;
  auto population = Population::Create(RealClasses(), options);
  REQUIRE(population.ok());
  return std::move(*population);
}

std::string Message(const absl::Status& status) { return std::string(status.message()); }

const char* kHeader =
    "name,share,gflops,ram_bytes,app_memory_bytes,uplink_mbps,downlink_mbps,rtt_ms,train_watts,"
    "source\n";

bool SameProfile(const DeviceProfile& a, const DeviceProfile& b) {
  return a.gflops == b.gflops && a.uplink_mbps == b.uplink_mbps && a.downlink_mbps == b.downlink_mbps &&
         a.rtt_ms == b.rtt_ms && a.train_watts == b.train_watts && a.dropout_probability == b.dropout_probability &&
         a.utc_offset_minutes == b.utc_offset_minutes && a.charge_start_minute == b.charge_start_minute &&
         a.charge_minutes == b.charge_minutes && a.sleep_minute == b.sleep_minute && a.wake_minute == b.wake_minute &&
         a.home_minute == b.home_minute && a.leave_minute == b.leave_minute &&
         a.day_charge_start_minute == b.day_charge_start_minute && a.day_charge_minutes == b.day_charge_minutes &&
         a.phone_class == b.phone_class && a.flags == b.flags &&
         a.drain_tenth_percent_per_hour == b.drain_tenth_percent_per_hour;
}

bool SameConditions(const DeviceConditions& a, const DeviceConditions& b) {
  return a.charging == b.charging && a.unmetered == b.unmetered && a.idle == b.idle && a.battery == b.battery;
}

TEST_CASE("LoadPhoneClasses reads the repository's phone table with sources and normalized shares",
          "[simulator][population]") {
  const std::vector<PhoneClass> classes = RealClasses();
  REQUIRE(classes.size() >= 5);
  REQUIRE(classes.size() <= 8);
  double total = 0;
  for (const PhoneClass& c : classes) {
    INFO(c.name);
    total += c.share;
    CHECK(c.share > 0);
    CHECK(c.gflops > 0);
    CHECK(c.app_memory_bytes <= c.ram_bytes);
    CHECK(c.uplink_mbps > 0);
    CHECK(c.downlink_mbps >= c.uplink_mbps);
    CHECK(c.rtt_ms > 0);
    CHECK(c.train_watts > 0);
    CHECK(c.source.find("http") != std::string::npos);
  }
  CHECK(total == Approx(1.0).epsilon(1e-12));
}

TEST_CASE("ParsePhoneClasses skips comments, accepts quoted fields and normalizes shares", "[simulator][population]") {
  const std::string csv = std::string("# comment\n\n") + kHeader +
                          "a,2,10,4000000000,1000000000,10,20,30,3,\"x, \"\"quoted\"\" y\"\n"
                          "b,6,20,8000000000,2000000000,20,40,30,4,z\n";
  auto classes = ParsePhoneClasses(csv, "inline.csv");
  REQUIRE(classes.ok());
  REQUIRE(classes->size() == 2);
  CHECK((*classes)[0].share == Approx(0.25));
  CHECK((*classes)[1].share == Approx(0.75));
  CHECK((*classes)[0].source == "x, \"quoted\" y");
  CHECK((*classes)[1].ram_bytes == 8000000000);
}

TEST_CASE("LoadPhoneClasses names the line and column of a missing column", "[simulator][population]") {
  const std::string csv =
      "# no rtt_ms column\n"
      "name,share,gflops,ram_bytes,app_memory_bytes,uplink_mbps,downlink_mbps,train_watts,source\n"
      "a,1,10,4000000000,1000000000,10,20,3,src\n";
  const std::string path =
      (std::filesystem::temp_directory_path() / ("seedling_population_test_" + std::to_string(getpid()) + ".csv"))
          .string();
  REQUIRE(WriteFileAtomic(path, csv).ok());
  auto classes = LoadPhoneClasses(path);
  std::filesystem::remove(path);
  REQUIRE(classes.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(classes.status()),
             Catch::Contains("line 2") && Catch::Contains("'rtt_ms'") && Catch::Contains(path));
}

TEST_CASE("LoadPhoneClasses reports a missing file as NotFound", "[simulator][population]") {
  auto classes = LoadPhoneClasses("/nonexistent/phone_classes.csv");
  CHECK(classes.status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("ParsePhoneClasses rejects a negative bandwidth naming its line and column", "[simulator][population]") {
  const std::string csv = std::string(kHeader) + "a,1,10,4000000000,1000000000,10,20,30,3,s\n" +
                          "b,1,10,4000000000,1000000000,-5,20,30,3,s\n";
  auto classes = ParsePhoneClasses(csv, "bad.csv");
  REQUIRE(classes.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(classes.status()),
             Catch::Contains("bad.csv line 3") && Catch::Contains("'uplink_mbps'") && Catch::Contains("-5"));
}

TEST_CASE("ParsePhoneClasses rejects a non-number naming its line, column and text", "[simulator][population]") {
  const std::string csv = std::string(kHeader) + "a,1,fast,4000000000,1000000000,10,20,30,3,s\n";
  auto classes = ParsePhoneClasses(csv, "bad.csv");
  REQUIRE(classes.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(classes.status()),
             Catch::Contains("line 2") && Catch::Contains("'gflops'") && Catch::Contains("'fast'"));
}

TEST_CASE("ParsePhoneClasses rejects app memory above RAM, wrong field counts and duplicates",
          "[simulator][population]") {
  auto over = ParsePhoneClasses(std::string(kHeader) + "a,1,10,4000,5000,10,20,30,3,s\n", "x.csv");
  CHECK(over.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(over.status()), Catch::Contains("'app_memory_bytes'"));
  auto short_row = ParsePhoneClasses(std::string(kHeader) + "a,1,10,4000,1000,10,20,30\n", "x.csv");
  CHECK(short_row.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(short_row.status()), Catch::Contains("line 2"));
  auto duplicate = ParsePhoneClasses(
      std::string(kHeader) + "a,1,10,4000,1000,10,20,30,3,s\na,1,10,4000,1000,10,20,30,3,s\n", "x.csv");
  CHECK(duplicate.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(duplicate.status()), Catch::Contains("line 3") && Catch::Contains("duplicate"));
  auto empty = ParsePhoneClasses(kHeader, "x.csv");
  CHECK(empty.status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("Population::Create rejects options out of range", "[simulator][population]") {
  PopulationOptions options;
  options.devices = 0;
  CHECK(Population::Create(RealClasses(), options).status().code() == absl::StatusCode::kInvalidArgument);
  options = PopulationOptions{};
  options.dropout_mean = 1.0;
  auto bad = Population::Create(RealClasses(), options);
  CHECK(bad.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(bad.status()), Catch::Contains("dropout_mean"));
  CHECK(Population::Create({}, PopulationOptions{}).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("A 10,000-device population reproduces the class shares", "[simulator][population]") {
  const Population population = MakePopulation(10000, 7);
  std::vector<int64_t> counts(population.classes().size(), 0);
  for (int64_t d = 0; d < population.size(); ++d) ++counts[population.profile(d).phone_class];
  for (size_t k = 0; k < counts.size(); ++k) {
    INFO(population.classes()[k].name);
    CHECK(std::fabs(static_cast<double>(counts[k]) / 10000.0 - population.classes()[k].share) < 0.015);
  }
  CHECK(population.phone_class(0).name == population.classes()[population.profile(0).phone_class].name);
  CHECK(population.memory_budget_bytes(0) == population.phone_class(0).app_memory_bytes);
}

TEST_CASE("The same seed gives identical profiles and conditions and another seed differs", "[simulator][population]") {
  const Population a = MakePopulation(500, 42);
  const Population b = MakePopulation(500, 42);
  const Population c = MakePopulation(500, 43);
  int64_t profiles_differing = 0;
  int64_t conditions_differing = 0;
  for (int64_t d = 0; d < a.size(); ++d) {
    REQUIRE(SameProfile(a.profile(d), b.profile(d)));
    if (!SameProfile(a.profile(d), c.profile(d))) ++profiles_differing;
    for (double t = kJan10; t < kJan10 + 2 * 86400; t += 5437) {
      REQUIRE(SameConditions(a.ConditionsAt(d, t), b.ConditionsAt(d, t)));
      if (!SameConditions(a.ConditionsAt(d, t), c.ConditionsAt(d, t))) ++conditions_differing;
    }
    REQUIRE(a.DropsOut(d, 3) == b.DropsOut(d, 3));
    REQUIRE(a.DropoutPoint(d, 3) == b.DropoutPoint(d, 3));
  }
  CHECK(profiles_differing > 490);
  CHECK(conditions_differing > 1000);
}

TEST_CASE("Available is charging and unmetered and idle, and the battery stays in [0, 1]", "[simulator][population]") {
  const Population population = MakePopulation(200, 3);
  for (int64_t d = 0; d < population.size(); ++d) {
    for (double t = kJan10; t < kJan10 + 3 * 86400; t += 1777) {
      const DeviceConditions c = population.ConditionsAt(d, t);
      REQUIRE(population.Available(d, t) == (c.charging && c.unmetered && c.idle));
      REQUIRE(c.battery >= 0.0f);
      REQUIRE(c.battery <= 1.0f);
    }
  }
}

TEST_CASE("NextAvailable is available, finite, and has no earlier available point on a grid",
          "[simulator][population]") {
  const Population population = MakePopulation(150, 11);
  constexpr double kStep = 300;  // seconds
  for (int64_t d = 0; d < population.size(); ++d) {
    for (double t0 : {kJan10 + 0.5, kJan10 + 13 * kHour + 17, kJan10 + 40 * kHour}) {
      const double next = population.NextAvailable(d, t0);
      INFO("device " << d << " t0 " << t0 << " next " << next);
      REQUIRE(next >= t0);
      REQUIRE(next - t0 < 3.5 * 86400);
      REQUIRE(population.Available(d, next));
      for (double t = t0; t < next; t += kStep) REQUIRE_FALSE(population.Available(d, t));
      if (next > t0) REQUIRE_FALSE(population.Available(d, next - 1));
      // The stretch that starts there ends at AvailableUntil: available throughout, not at its end.
      const double until = population.AvailableUntil(d, next);
      REQUIRE(until > next);
      REQUIRE_FALSE(population.Available(d, until));
      REQUIRE(population.Available(d, until - 1));
      for (double t = next; t < until; t += kStep) REQUIRE(population.Available(d, t));
      REQUIRE(population.NextAvailable(d, next) == next);
      REQUIRE(population.AvailableUntil(d, until) == until);
    }
  }
}

TEST_CASE("More devices are available at local night than at local noon", "[simulator][population]") {
  const Population population = MakePopulation(10000, 5);
  // At one UTC instant, group devices by UTC offset: their local hour differs, so availability
  // should follow it.
  const double t = kJan10 + 20 * kHour;                  // 20:00 UTC: 04:00 in UTC+8, 01:30 in UTC+5:30, 15:00 in UTC-5
  std::map<int, std::pair<int64_t, int64_t>> by_offset;  // offset -> (available, devices)
  for (int64_t d = 0; d < population.size(); ++d) {
    auto& [available, devices] = by_offset[population.profile(d).utc_offset_minutes];
    ++devices;
    if (population.Available(d, t)) ++available;
  }
  auto fraction = [&](int offset) {
    const auto& [available, devices] = by_offset.at(offset);
    REQUIRE(devices >= 300);
    return static_cast<double>(available) / static_cast<double>(devices);
  };
  const double night_china = fraction(480);   // 04:00
  const double night_india = fraction(330);   // 01:30
  const double day_us_east = fraction(-300);  // 15:00
  const double day_brazil = fraction(-180);   // 17:00
  CHECK(night_china > 0.5);
  CHECK(night_india > 0.4);
  CHECK(day_us_east < 0.15);
  CHECK(day_brazil < 0.15);
  CHECK(night_china > day_us_east + 0.3);

  // Per device at its own local 03:00 versus local 12:00.
  int64_t night = 0, noon = 0;
  for (int64_t d = 0; d < population.size(); ++d) {
    const double offset = 60.0 * population.profile(d).utc_offset_minutes;
    if (population.Available(d, kJan10 + 3 * kHour - offset)) ++night;
    if (population.Available(d, kJan10 + 12 * kHour - offset)) ++noon;
  }
  CHECK(night > 5000);
  CHECK(noon < 1000);
  CHECK(noon > 0);  // day chargers exist
}

TEST_CASE("DropsOut happens at about dropout_mean and DropoutPoint is a fraction", "[simulator][population]") {
  const Population population = MakePopulation(10000, 9);
  int64_t drops = 0, draws = 0;
  double point_sum = 0;
  for (int64_t d = 0; d < population.size(); ++d) {
    for (uint64_t k = 0; k < 20; ++k) {
      ++draws;
      if (population.DropsOut(d, k)) ++drops;
      const double point = population.DropoutPoint(d, k);
      REQUIRE(point >= 0.0);
      REQUIRE(point < 1.0);
      point_sum += point;
    }
  }
  CHECK(static_cast<double>(drops) / static_cast<double>(draws) == Approx(0.05).margin(0.005));
  CHECK(point_sum / static_cast<double>(draws) == Approx(0.5).margin(0.01));
}

TEST_CASE("Compute, transfer and energy times follow the documented formulas", "[simulator][population]") {
  const Population population = MakePopulation(20, 1);
  for (int64_t d = 0; d < population.size(); ++d) {
    const DeviceProfile& p = population.profile(d);
    CHECK(population.ComputeSeconds(d, 3e12) == Approx(3e12 / (p.gflops * 1e9)));
    CHECK(population.DownloadSeconds(d, 10'000'000) == Approx(p.rtt_ms / 1e3 + 8e7 / (p.downlink_mbps * 1e6)));
    CHECK(population.UploadSeconds(d, 10'000'000) == Approx(p.rtt_ms / 1e3 + 8e7 / (p.uplink_mbps * 1e6)));
    CHECK(population.DownloadSeconds(d, 0) == Approx(p.rtt_ms / 1e3));
    CHECK(population.TrainingJoules(d, 100.0) == Approx(100.0 * p.train_watts));
  }
}

TEST_CASE("Per-device figures spread log-normally around the class figures", "[simulator][population]") {
  const Population population = MakePopulation(10000, 2);
  std::vector<double> log_ratio;
  for (int64_t d = 0; d < population.size(); ++d) {
    log_ratio.push_back(std::log(population.profile(d).gflops / population.phone_class(d).gflops));
  }
  double mean = 0, square = 0;
  for (double x : log_ratio) mean += x;
  mean /= static_cast<double>(log_ratio.size());
  for (double x : log_ratio) square += (x - mean) * (x - mean);
  const double sd = std::sqrt(square / static_cast<double>(log_ratio.size()));
  CHECK(mean == Approx(0.0).margin(0.01));
  CHECK(sd == Approx(0.2).margin(0.01));
}

TEST_CASE("ClassStatistics counts each class and measures availability as a minute grid does",
          "[simulator][population]") {
  const Population population = MakePopulation(300, 5);
  const std::vector<ClassStats> stats = population.ClassStatistics(kJan10);
  const std::vector<PhoneClass>& classes = population.classes();
  REQUIRE(stats.size() == classes.size() + 1);
  CHECK(stats.back().name == "all");
  CHECK(stats.back().devices == 300);
  CHECK(stats.back().share == 1.0);
  int64_t devices = 0;
  for (size_t k = 0; k < classes.size(); ++k) {
    CAPTURE(classes[k].name);
    CHECK(stats[k].name == classes[k].name);
    // Reference: one class's devices counted, and each device's availability sampled every minute.
    int64_t mine = 0;
    double available_minutes = 0, dropout = 0;
    for (int64_t d = 0; d < population.size(); ++d) {
      if (population.profile(d).phone_class != k) continue;
      ++mine;
      dropout += population.profile(d).dropout_probability;
      for (int minute = 0; minute < 24 * 60; ++minute) {
        available_minutes += population.Available(d, kJan10 + 60.0 * minute + 30) ? 1 : 0;
      }
    }
    devices += stats[k].devices;
    CHECK(stats[k].devices == mine);
    CHECK(stats[k].share == Approx(static_cast<double>(mine) / 300));
    if (mine == 0) {
      CHECK(std::isnan(stats[k].median_gflops));
      continue;
    }
    CHECK(stats[k].median_budget_bytes == static_cast<double>(classes[k].app_memory_bytes));
    CHECK(stats[k].median_ram_bytes == static_cast<double>(classes[k].ram_bytes));
    CHECK(stats[k].mean_dropout == Approx(dropout / static_cast<double>(mine)));
    // Window boundaries are whole seconds, so sampling mid-minute errs by under a minute per stretch edge.
    CHECK(stats[k].mean_available_hours == Approx(available_minutes / 60 / static_cast<double>(mine)).margin(0.1));
    CHECK(stats[k].mean_available_hours > 0);
    CHECK(stats[k].median_gflops > 0);
  }
  CHECK(devices == 300);
}

TEST_CASE("Idle devices are cheap and a 10,000-device population is created quickly", "[simulator][population]") {
  const std::vector<PhoneClass> classes = RealClasses();
  PopulationOptions options;
  options.devices = 10000;
  const auto start = std::chrono::steady_clock::now();
  auto population = Population::Create(classes, options);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  REQUIRE(population.ok());
  CHECK(population->size() == 10000);
  CHECK(population->bytes_per_device() <= 128);
  CHECK(population->bytes_per_device() == sizeof(DeviceProfile));
  CHECK(seconds < 2.0);
  const std::string summary = population->Summary();
  for (const PhoneClass& c : classes) CHECK_THAT(summary, Catch::Contains(c.name));
  CHECK_THAT(summary, Catch::Contains("bytes per device"));
  UNSCOPED_INFO(summary);
  WARN("population summary:\n" << summary);
}

}  // namespace
}  // namespace seedling::simulator
