// The clocks of the time seam (base/clock.h).

#include "base/clock.h"

#include <catch2/catch.hpp>

namespace seedling {
namespace {

TEST_CASE("A ManualClock's Sleep passes its own time, rounded to the millisecond, and ignores waits <= 0",
          "[base][clock]") {
  ManualClock clock(1'000);
  SimulatedClock& simulated = clock;
  simulated.Sleep(1.5);
  CHECK(clock.NowMs() == 2'500);
  simulated.Sleep(0.0004);  // rounds to nothing
  CHECK(clock.NowMs() == 2'500);
  simulated.Sleep(0.0006);
  CHECK(clock.NowMs() == 2'501);
  simulated.Sleep(0);
  simulated.Sleep(-3);
  CHECK(clock.NowMs() == 2'501);
}

TEST_CASE("SecondsToMs rounds to the nearest millisecond", "[base][clock]") {
  CHECK(SecondsToMs(1767643200.0) == 1'767'643'200'000);
  CHECK(SecondsToMs(0.0015) == 2);
  CHECK(SecondsToMs(0.0014) == 1);
  CHECK(SecondsToMs(-0.0016) == -2);
}

TEST_CASE("SteadyClock never goes back, and SystemClock reads the time of day", "[base][clock]") {
  const SteadyClock steady;
  int64_t last = steady.NowMs();
  for (int i = 0; i < 1000; ++i) {
    const int64_t now = steady.NowMs();
    CHECK(now >= last);
    last = now;
  }
  CHECK(SystemClock().NowMs() > 1'700'000'000'000);  // after November 2023
}

}  // namespace
}  // namespace seedling
