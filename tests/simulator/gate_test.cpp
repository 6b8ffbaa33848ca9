// The gate between simulated devices and the event loop (simulator/internal/gate.h), driven by fake devices:
// plain threads that request at chosen simulated times, arriving at the gate in a chosen host order.

#include "simulator/internal/gate.h"

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <thread>
#include <vector>

#include "base/philox.h"

namespace seedling::simulator::internal {
namespace {

using std::chrono::milliseconds;
using Kind = GateEvent::Kind;

// A fake device: active from `start`, then requests arriving at `requests` (simulated seconds, ascending),
// each answered at once. It first sleeps `host_delay` of host time, so the test chooses which thread reaches
// the gate first.
struct FakeDevice {
  int64_t id = 0;
  double start = 0;
  std::vector<double> requests;
  milliseconds host_delay{0};
};

void RunDevice(Gate& gate, const FakeDevice& device) {
  std::this_thread::sleep_for(device.host_delay);
  for (double arrive : device.requests) {
    if (!gate.Wait(device.id, arrive)) break;
    gate.Resume(device.id, {arrive, arrive});
  }
  gate.Finish(device.id);
}

// Runs `body` on its own thread; a gate that deadlocks fails the whole test binary instead of hanging it.
template <typename Body>
void WithinSeconds(int seconds, Body body) {
  std::packaged_task<void()> task(std::move(body));
  std::future<void> done = task.get_future();
  std::thread thread(std::move(task));
  if (done.wait_for(std::chrono::seconds(seconds)) != std::future_status::ready) {
    std::fprintf(stderr, "the gate deadlocked: nothing happened for %d s\n", seconds);
    std::_Exit(1);
  }
  thread.join();
  done.get();
}

// The loop's side, as MethodRun::Loop runs it: takes finished devices, asks for the next event against the
// loop's own events (`own`, run in order), grants requests. Returns the events in the order they ran.
std::vector<GateEvent> RunLoop(Gate& gate, const std::vector<FakeDevice>& devices, std::vector<GateEvent> own = {}) {
  std::sort(own.begin(), own.end());
  for (const FakeDevice& d : devices) gate.Add(d.id, d.start);
  std::vector<std::thread> threads;
  for (const FakeDevice& d : devices) threads.emplace_back(RunDevice, std::ref(gate), std::cref(d));
  std::vector<GateEvent> ran;
  size_t finished = 0;
  size_t next_own = 0;
  while (finished < devices.size() || next_own < own.size()) {
    finished += gate.TakeFinished().size();
    const GateEvent other = next_own < own.size() ? own[next_own] : GateEvent{};
    if (finished == devices.size() && next_own == own.size()) break;
    const std::optional<GateEvent> next = gate.Next(other);
    if (!next.has_value()) continue;
    ran.push_back(*next);
    if (next->kind == Kind::kRequest) {
      gate.Grant(next->device);
    } else {
      ++next_own;
    }
  }
  for (std::thread& t : threads) t.join();
  return ran;
}

// Every request of `devices` in simulated-time order, ties by device.
std::vector<std::pair<double, int64_t>> ExpectedOrder(const std::vector<FakeDevice>& devices) {
  std::vector<std::pair<double, int64_t>> expected;
  for (const FakeDevice& d : devices) {
    for (double t : d.requests) expected.emplace_back(t, d.id);
  }
  std::sort(expected.begin(), expected.end());
  return expected;
}

std::vector<std::pair<double, int64_t>> Requests(const std::vector<GateEvent>& ran) {
  std::vector<std::pair<double, int64_t>> requests;
  for (const GateEvent& e : ran) {
    if (e.kind == Kind::kRequest) requests.emplace_back(e.t, e.device);
  }
  return requests;
}

TEST_CASE("Requests are granted in simulated-time order whatever order their threads reach the gate",
          "[simulator][gate]") {
  // The device whose request is latest in simulated time reaches the gate first in host time.
  const std::vector<FakeDevice> devices = {
      {.id = 0, .start = 0, .requests = {4.0, 9.0}, .host_delay = milliseconds(120)},
      {.id = 1, .start = 0, .requests = {3.0, 5.0}, .host_delay = milliseconds(80)},
      {.id = 2, .start = 0, .requests = {2.0, 8.5}, .host_delay = milliseconds(40)},
      {.id = 3, .start = 1, .requests = {7.0}, .host_delay = milliseconds(0)},
  };
  WithinSeconds(30, [&] {
    Gate gate;
    CHECK(Requests(RunLoop(gate, devices)) == ExpectedOrder(devices));
  });
}

TEST_CASE("Events at the same simulated time run ticks first, then requests by device, then wake-ups",
          "[simulator][gate]") {
  // Devices 3, 1, 2 reach the gate in that host order, all at t = 5.
  const std::vector<FakeDevice> devices = {
      {.id = 3, .start = 0, .requests = {5.0}, .host_delay = milliseconds(0)},
      {.id = 1, .start = 0, .requests = {5.0}, .host_delay = milliseconds(60)},
      {.id = 2, .start = 0, .requests = {5.0}, .host_delay = milliseconds(120)},
  };
  const std::vector<GateEvent> own = {{.t = 5.0, .kind = Kind::kWake, .device = 0}, {.t = 5.0, .kind = Kind::kTick}};
  WithinSeconds(30, [&] {
    Gate gate;
    const std::vector<GateEvent> ran = RunLoop(gate, devices, own);
    REQUIRE(ran.size() == 5);
    CHECK(ran[0].kind == Kind::kTick);
    CHECK((ran[1].kind == Kind::kRequest && ran[1].device == 1));
    CHECK((ran[2].kind == Kind::kRequest && ran[2].device == 2));
    CHECK((ran[3].kind == Kind::kRequest && ran[3].device == 3));
    CHECK((ran[4].kind == Kind::kWake && ran[4].device == 0));
  });
}

TEST_CASE("The loop waits for a running device, and goes on once it finishes or sleeps past the next event",
          "[simulator][gate]") {
  WithinSeconds(30, [] {
    Gate gate;
    gate.Add(0, 0.0);  // requests at t = 10
    gate.Add(1, 0.0);  // finishes without a request, late in host time
    gate.Add(2, 0.0);  // sleeps 20 s of simulated time, late in host time, then requests at t = 25
    std::atomic<bool> finished{false}, slept{false};
    std::thread d0([&] {
      if (gate.Wait(0, 10.0)) gate.Resume(0, {10.0, 10.0});
      gate.Finish(0);
    });
    std::thread d1([&] {
      std::this_thread::sleep_for(milliseconds(100));
      finished = true;
      gate.Finish(1);
    });
    std::thread d2([&] {
      std::this_thread::sleep_for(milliseconds(200));
      slept = true;
      gate.Sleep(2, 20.0);
      CHECK(gate.Now(2) == 20.0);
      if (gate.Wait(2, 25.0)) gate.Resume(2, {25.0, 25.0});
      gate.Finish(2);
    });
    std::vector<std::pair<double, int64_t>> granted;
    size_t done = 0;
    while (done < 3) {
      for (const auto& [device, end_s] : gate.TakeFinished()) {
        ++done;
        if (device == 1) CHECK(end_s == 0.0);
        if (device == 2) CHECK(end_s == 25.0);
      }
      if (done == 3) break;
      const std::optional<GateEvent> next = gate.Next(GateEvent{});
      if (!next.has_value()) continue;
      REQUIRE(next->kind == Kind::kRequest);
      // Device 0's request at t = 10 may run only when neither other device can still come before it.
      if (next->device == 0) CHECK((finished && slept));
      granted.emplace_back(next->t, next->device);
      gate.Grant(next->device);
    }
    d0.join();
    d1.join();
    d2.join();
    CHECK(granted == std::vector<std::pair<double, int64_t>>{{10.0, 0}, {25.0, 2}});
  });
}

TEST_CASE("Closing the gate releases a waiting device and refuses later requests", "[simulator][gate]") {
  WithinSeconds(30, [] {
    Gate gate;
    gate.Add(0, 0.0);
    gate.Add(1, 0.0);  // never requests: device 0's request can never be granted
    std::promise<bool> first, second;
    std::thread d0([&] {
      first.set_value(gate.Wait(0, 5.0));
      second.set_value(gate.Wait(0, 6.0));
      gate.Finish(0);
    });
    std::this_thread::sleep_for(milliseconds(100));  // device 0 is waiting by now (if not, it is refused)
    gate.Close();
    CHECK(!first.get_future().get());
    CHECK(!second.get_future().get());
    gate.Finish(1);
    d0.join();
    size_t done = 0;
    while (done < 2) done += gate.TakeFinished().size();
  });
}

TEST_CASE("Many devices with random times and host jitter are granted in order without deadlock", "[simulator][gate]") {
  Rng rng(7, 0x67617465ULL);  // "gate"
  std::vector<FakeDevice> devices;
  for (int64_t d = 0; d < 16; ++d) {
    FakeDevice device;
    device.id = d;
    device.start = std::floor(rng.Uniform() * 4);
    double t = device.start;
    for (int i = 0; i < 20; ++i) {
      t += std::floor(rng.Uniform() * 3);  // whole seconds: many ties
      device.requests.push_back(t);
    }
    device.host_delay = milliseconds(static_cast<int>(rng.Uniform() * 20));
    devices.push_back(std::move(device));
  }
  WithinSeconds(60, [&] {
    Gate gate;
    CHECK(Requests(RunLoop(gate, devices)) == ExpectedOrder(devices));
  });
}

}  // namespace
}  // namespace seedling::simulator::internal
