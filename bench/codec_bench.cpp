// Update codec throughput: encode and decode MB/s per codec for one flat update, the encoded size,
// and a memcpy figure from the same run as the memory-bandwidth yardstick (docs/architecture.md, "Performance
// principles": claims live in bench/).
//
//   codec_bench [--numel N] [--reps R]      defaults: 10,000,000 floats, best of 5
//
// MB/s are of the fp32 vector (4 bytes per element) so codecs compare directly with each other and
// with memcpy. "encode" includes allocating and zero-filling the output string (the API returns a
// fresh one); "decode-add" is DecodeDenseAdd into an existing accumulator, the server's
// streaming-aggregation path; "decode" is DecodeDense into a fresh vector.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "base/memory.h"
#include "base/philox.h"
#include "comms/codec.h"

namespace {

using seedling::comms::CodecOptions;
namespace v1 = seedling::v1;

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Best-of-`reps` wall time of fn(); the minimum is the least disturbed by other processes.
template <typename Fn>
double BestTime(int reps, Fn fn) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, Seconds(start));
  }
  return best;
}

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "codec_bench: %s\n", what.c_str());
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  size_t numel = 10'000'000;
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--numel" && i + 1 < argc) {
      numel = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else {
      Die("usage: codec_bench [--numel N] [--reps R]");
    }
  }
  const double mb = 4.0 * static_cast<double>(numel) / 1e6;  // the fp32 vector, in MB

  std::vector<float> update(numel);
  seedling::FillNormal({1, seedling::rng_stream::kData}, 0, update);
  for (float& v : update) v *= 1e-3f;  // the size of a typical LoRA delta

  // memcpy between two already-touched buffers: what "memory-bound" means on this machine.
  std::vector<float> copy(numel, 1.0f);
  const double memcpy_s = BestTime(reps, [&] {
    std::memcpy(copy.data(), update.data(), numel * sizeof(float));
    asm volatile("" : : "r"(copy.data()) : "memory");  // keep the copy
  });
  // A fresh output buffer of the fp32 size (allocation, zero fill, first-touch page faults): part
  // of every "encode" and "decode" figure below, since those APIs return new buffers.
  const double fresh_s = BestTime(reps, [&] {
    std::string buffer(4 * numel, '\0');
    asm volatile("" : : "r"(buffer.data()) : "memory");
  });
  std::printf("numel %zu (%.1f MB fp32), best of %d\n", numel, mb, reps);
  std::printf("memcpy: %.2f GB/s; a fresh zeroed %.1f MB buffer: %.1f ms\n\n", mb / 1e3 / memcpy_s, mb, fresh_s * 1e3);

  struct Case {
    const char* name;
    CodecOptions options;
  };
  const Case cases[] = {
      {"fp32", {v1::CODEC_FP32, 64, 0.01f}},     {"fp16", {v1::CODEC_FP16, 64, 0.01f}},
      {"int8/64", {v1::CODEC_INT8, 64, 0.01f}},  {"int4/64", {v1::CODEC_INT4, 64, 0.01f}},
      {"top-k 1%", {v1::CODEC_TOPK, 64, 0.01f}},
  };
  std::printf("%-10s %14s %10s %12s %14s %12s\n", "codec", "encoded bytes", "ratio", "encode MB/s", "decode-add MB/s",
              "decode MB/s");
  std::vector<float> accumulator(numel, 0.0f);
  for (const Case& c : cases) {
    std::string payload;
    double encode_s = 1e30;
    for (int r = 0; r < reps; ++r) {
      // Top-k's residual is state across rounds; each repetition starts from zero like a first
      // round. Allocating it is not part of encoding, so it stays outside the timed region.
      seedling::comms::ErrorFeedback feedback(numel);
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<std::string> encoded =
          seedling::comms::EncodeDense(update, c.options, /*rounding_seed=*/7, &feedback);
      encode_s = std::min(encode_s, Seconds(start));
      if (!encoded.ok()) Die(encoded.status().ToString());
      payload = *std::move(encoded);
    }
    const double add_s = BestTime(reps, [&] {
      const absl::Status s = seedling::comms::DecodeDenseAdd(payload, 0.5f, accumulator);
      if (!s.ok()) Die(s.ToString());
    });
    const double decode_s = BestTime(reps, [&] {
      absl::StatusOr<std::vector<float>> decoded = seedling::comms::DecodeDense(payload);
      if (!decoded.ok()) Die(decoded.status().ToString());
    });
    std::printf("%-10s %14zu %9.1fx %12.0f %14.0f %12.0f\n", c.name, payload.size(),
                4.0 * static_cast<double>(numel) / static_cast<double>(payload.size()), mb / encode_s, mb / add_s,
                mb / decode_s);
  }

  // Seed methods: FedKSeed's 200 steps and an FwdLLM round of 64 perturbations, for scale.
  std::vector<seedling::comms::SeedIndexScalar> kseed(200);
  for (size_t i = 0; i < kseed.size(); ++i) kseed[i] = {static_cast<uint32_t>(i * 17 % 4096), 0.1f};
  std::vector<seedling::comms::SeedValueScalar> fwd(64);
  for (size_t i = 0; i < fwd.size(); ++i) fwd[i] = {i * 0x9E3779B97F4A7C15ull, 0.1f};
  std::printf("\nseed scalars: FedKSeed 200 pairs %zu bytes, FwdLLM 64 pairs %zu bytes\n",
              seedling::comms::EncodeSeedIndexScalars(kseed).size(),
              seedling::comms::EncodeSeedValueScalars(fwd).size());
  std::printf("peak RSS %s\n", seedling::FormatBytes(seedling::PeakRssBytes()).c_str());
  return 0;
}
