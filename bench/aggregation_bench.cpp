// Streaming aggregation throughput: FedAvg over many client updates of the SmolLM2-135M LoRA size (rank 8
// on q and v: 460,800 floats), next to a memcpy figure measured in the same run, and the peak RSS of a
// process aggregating 10 vs 1,000 updates (each count in its own child process, so each peak is its own).
//
//   seedling_bench_aggregation [--updates 1000] [--codec fp32|fp16|int8] [--preset smollm2-135m]

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "base/memory.h"
#include "base/philox.h"
#include "base/strings.h"
#include "comms/codec.h"
#include "lora/adapter.h"
#include "model/config.h"
#include "server/config.h"
#include "server/strategy.h"

namespace {

using Clock = std::chrono::steady_clock;
using namespace seedling;

struct Args {
  int64_t updates = 1000;
  std::string codec = "fp32";
  std::string preset = "smollm2-135m";
  int64_t child_updates = -1;  // internal: run as a child measuring peak RSS
};

int64_t AdapterSize(const std::string& preset) {
  auto config = model::PresetConfig(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str());
    std::exit(2);
  }
  auto adapter = lora::LoraAdapter::Create(*config, lora::LoraConfig{});  // rank 8 on q_proj and v_proj
  return (*adapter)->numel();
}

std::string MakePayload(int64_t n, v1::Codec codec) {
  std::vector<float> update(static_cast<size_t>(n));
  FillNormal({7, rng_stream::kData}, 0, update);
  for (float& v : update) v *= 1e-3f;
  comms::CodecOptions o;
  o.codec = codec;
  auto payload = comms::EncodeDense(update, o, 1);
  if (!payload.ok()) std::exit(3);
  return *payload;
}

// Aggregates `updates` copies of the payload; returns seconds spent in Accumulate.
double Aggregate(const std::string& payload, int64_t n, int64_t updates) {
  server::StrategyOptions so;
  so.name = "fedavg";
  auto strategy = server::MakeStrategy(so);
  server::GlobalModel global;
  global.params.assign(static_cast<size_t>(n), 0.0f);
  if (!(*strategy)->BeginRound(global).ok()) std::exit(4);
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < updates; ++i) {
    const std::string device = StrCat("d", i);
    if (!(*strategy)->Accumulate({device, 10, payload}).ok()) std::exit(5);
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!(*strategy)->FinishRound(global).ok()) std::exit(6);
  return seconds;
}

double MemcpyGbPerSecond(size_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  std::memcpy(b.data(), a.data(), bytes);  // warm up
  int iters = 0;
  const auto t0 = Clock::now();
  while (iters < 20 || std::chrono::duration<double>(Clock::now() - t0).count() < 1.0) {
    std::memcpy(b.data(), a.data(), bytes);
    a[static_cast<size_t>(iters) % bytes] = static_cast<char>(iters);
    ++iters;
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return static_cast<double>(bytes) * iters / seconds / 1e9;
}

// The two passes Accumulate makes over a dense payload, timed apart: validation with the norm, and the
// add into the double running sum. Returns {validate seconds, add seconds} for `updates` repetitions.
std::pair<double, double> PassSeconds(const std::string& payload, int64_t n, int64_t updates) {
  std::vector<double> sum(static_cast<size_t>(n), 0.0);
  double sink = 0;
  auto t0 = Clock::now();
  for (int64_t i = 0; i < updates; ++i) {
    auto v = comms::ValidateDensePayload(payload);
    if (!v.ok()) std::exit(7);
    sink += v->squared_norm();
  }
  const double validate = std::chrono::duration<double>(Clock::now() - t0).count();
  auto v = comms::ValidateDensePayload(payload);
  t0 = Clock::now();
  for (int64_t i = 0; i < updates; ++i) {
    if (!v->AddTo(sum, 10.0).ok()) std::exit(8);
  }
  const double add = std::chrono::duration<double>(Clock::now() - t0).count();
  if (sink < 0 || sum[0] == 12345.0) std::printf("(unreachable)\n");  // keeps the work observable
  return {validate, add};
}

// Runs this program as a child aggregating `updates` and returns its peak RSS in bytes.
int64_t ChildPeakRss(const Args& args, int64_t updates) {
  int fds[2];
  if (::pipe(fds) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    const std::string u = std::to_string(updates);
    ::execl("/proc/self/exe", "seedling_bench_aggregation", "--child", u.c_str(), "--codec", args.codec.c_str(),
            "--preset", args.preset.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(fds[1]);
  char buf[64] = {0};
  const ssize_t got = ::read(fds[0], buf, sizeof(buf) - 1);
  ::close(fds[0]);
  ::waitpid(pid, nullptr, 0);
  return got > 0 ? std::atoll(buf) : -1;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--updates") {
      args.updates = std::atoll(next().c_str());
    } else if (a == "--codec") {
      args.codec = next();
    } else if (a == "--preset") {
      args.preset = next();
    } else if (a == "--child") {
      args.child_updates = std::atoll(next().c_str());
    } else {
      std::fprintf(stderr, "usage: %s [--updates N] [--codec fp32|fp16|int8] [--preset NAME]\n", argv[0]);
      return 2;
    }
  }
  auto codec = comms::ParseCodecName(args.codec);
  if (!codec.ok()) {
    std::fprintf(stderr, "%s\n", std::string(codec.status().message()).c_str());
    return 2;
  }
  const int64_t n = AdapterSize(args.preset);
  const std::string payload = MakePayload(n, *codec);
  if (args.child_updates >= 0) {
    Aggregate(payload, n, args.child_updates);
    std::printf("%lld\n", static_cast<long long>(PeakRssBytes()));
    return 0;
  }
  std::printf("streaming FedAvg, %s LoRA (rank 8, q/v): %lld floats per update, %s payload of %zu bytes\n",
              args.preset.c_str(), static_cast<long long>(n), args.codec.c_str(), payload.size());
  // memcpy is timed right before and right after the aggregation and the two averaged: the machine
  // this runs on is shared, and a single reference taken before would miss load that starts during it.
  const double memcpy_before = MemcpyGbPerSecond(static_cast<size_t>(n) * sizeof(float));
  const double seconds = Aggregate(payload, n, args.updates);
  const double memcpy_after = MemcpyGbPerSecond(static_cast<size_t>(n) * sizeof(float));
  const double memcpy_gbs = (memcpy_before + memcpy_after) / 2;
  const double gbs = static_cast<double>(payload.size()) * static_cast<double>(args.updates) / seconds / 1e9;
  std::printf(
      "memcpy of one fp32 update (%.1f MiB): %.2f GB/s (in-run reference, one thread; %.2f before, "
      "%.2f after)\n",
      static_cast<double>(n) * 4 / (1 << 20), memcpy_gbs, memcpy_before, memcpy_after);
  std::printf(
      "aggregated %lld updates in %.3f s on one thread (%s kernels): %.0f updates/s, %.2f GB/s of "
      "payload (%.0f%% of memcpy)\n",
      static_cast<long long>(args.updates), seconds, std::string(comms::DenseKernelName()).c_str(),
      static_cast<double>(args.updates) / seconds, gbs, 100.0 * gbs / memcpy_gbs);
  const auto [validate_s, add_s] = PassSeconds(payload, n, args.updates);
  const double bytes = static_cast<double>(payload.size()) * static_cast<double>(args.updates);
  std::printf("  of which: validate + norm %.2f GB/s (%.3f s), add into the double sum %.2f GB/s (%.3f s)\n",
              bytes / validate_s / 1e9, validate_s, bytes / add_s / 1e9, add_s);
  const int64_t rss_10 = ChildPeakRss(args, 10);
  const int64_t rss_many = ChildPeakRss(args, args.updates);
  std::printf("peak RSS aggregating 10 updates: %s; %lld updates: %s\n", FormatBytes(rss_10).c_str(),
              static_cast<long long>(args.updates), FormatBytes(rss_many).c_str());
  return 0;
}
