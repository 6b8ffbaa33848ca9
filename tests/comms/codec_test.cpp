#include "comms/codec.h"

#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "base/philox.h"
#include "comms/internal/dense_kernels.h"

namespace seedling::comms {
namespace {

// ---- Helpers
// ---------------------------------------------------------------------------------------------

constexpr size_t kHeader = kPayloadHeaderBytes;

std::vector<float> RandomNormal(size_t n, uint64_t seed, float scale = 1.0f) {
  std::vector<float> x(n);
  FillNormal(RngKey{seed, rng_stream::kData}, 0, x);
  for (float& v : x) v *= scale;
  return x;
}

CodecOptions Options(v1::Codec codec, uint32_t block_size = 64, float topk_fraction = 0.01f) {
  CodecOptions o;
  o.codec = codec;
  o.block_size = block_size;
  o.topk_fraction = topk_fraction;
  return o;
}

std::string MustEncode(std::span<const float> x, const CodecOptions& options, uint64_t seed = 1,
                       ErrorFeedback* feedback = nullptr) {
  absl::StatusOr<std::string> payload = EncodeDense(x, options, seed, feedback);
  INFO(payload.status().ToString());
  REQUIRE(payload.ok());
  return *std::move(payload);
}

std::vector<float> MustDecode(std::string_view payload) {
  absl::StatusOr<std::vector<float>> x = DecodeDense(payload);
  INFO(x.status().ToString());
  REQUIRE(x.ok());
  return *std::move(x);
}

std::string Message(const absl::Status& s) { return std::string(s.message().data(), s.message().size()); }

void CheckInvalid(const absl::Status& status, const std::string& substring) {
  INFO("status: " << status.ToString() << "\nexpected substring: " << substring);
  REQUIRE_FALSE(status.ok());
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(Message(status), Catch::Matchers::Contains(substring));
}

// Little-endian patching of payload bytes at documented offsets (codec.h), written independently of
// the codec's own helpers.
void PutBytesLe(std::string& p, size_t offset, uint64_t v, size_t width) {
  REQUIRE(offset + width <= p.size());
  for (size_t i = 0; i < width; ++i) p[offset + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
void PutU8(std::string& p, size_t off, uint8_t v) { PutBytesLe(p, off, v, 1); }
void PutU16(std::string& p, size_t off, uint16_t v) { PutBytesLe(p, off, v, 2); }
void PutU32(std::string& p, size_t off, uint32_t v) { PutBytesLe(p, off, v, 4); }
void PutU64(std::string& p, size_t off, uint64_t v) { PutBytesLe(p, off, v, 8); }
void PutF32(std::string& p, size_t off, float v) { PutU32(p, off, std::bit_cast<uint32_t>(v)); }
uint64_t GetLe(std::string_view p, size_t offset, size_t width) {
  uint64_t v = 0;
  for (size_t i = 0; i < width; ++i) v |= uint64_t{static_cast<uint8_t>(p[offset + i])} << (8 * i);
  return v;
}
float GetF32(std::string_view p, size_t off) { return std::bit_cast<float>(static_cast<uint32_t>(GetLe(p, off, 4))); }

uint32_t Bits(float f) { return std::bit_cast<uint32_t>(f); }

// binary16 value by definition (sign, 5-bit exponent with bias 15, 10-bit mantissa), in double.
double HalfValue(uint16_t h) {
  const int sign = (h & 0x8000) ? -1 : 1;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  const double magnitude = exponent == 0 ? std::ldexp(mantissa, -24) : std::ldexp(1024 + mantissa, exponent - 25);
  return sign * magnitude;
}

// The naive reference for fp16 rounding: the nearest of all finite halves, ties to the even bit
// pattern.
uint16_t NearestHalf(float x) {
  static const std::vector<double> positive = [] {
    std::vector<double> v;
    for (uint32_t h = 0; h <= 0x7bff; ++h) v.push_back(HalfValue(static_cast<uint16_t>(h)));
    return v;
  }();
  const double a = std::fabs(static_cast<double>(x));
  const auto it = std::upper_bound(positive.begin(), positive.end(), a);
  size_t best;
  if (it == positive.begin()) {
    best = 0;
  } else if (it == positive.end()) {
    best = positive.size() - 1;
  } else {
    const size_t hi = static_cast<size_t>(it - positive.begin()), lo = hi - 1;
    const double d_lo = a - positive[lo], d_hi = positive[hi] - a;
    best = d_lo < d_hi ? lo : d_hi < d_lo ? hi : (lo % 2 == 0 ? lo : hi);
  }
  return static_cast<uint16_t>(best | (std::signbit(x) ? 0x8000u : 0u));
}

// Per-block scale max |x|, recomputed independently of the codec.
std::vector<float> BlockScales(std::span<const float> x, size_t block) {
  std::vector<float> scales;
  for (size_t b = 0; b < x.size(); b += block) {
    float m = 0;
    for (size_t i = b; i < std::min(x.size(), b + block); ++i) m = std::max(m, std::fabs(x[i]));
    scales.push_back(m);
  }
  return scales;
}

const v1::Codec kDenseCodecs[] = {v1::CODEC_FP32, v1::CODEC_FP16, v1::CODEC_INT8, v1::CODEC_INT4, v1::CODEC_TOPK};

// ---- fp32 / fp16
// --------------------------------------------------------------------------------------

TEST_CASE("Every codec's name parses back to it, and other names are refused listing the six", "[comms][codec]") {
  const std::pair<v1::Codec, const char*> names[] = {
      {v1::CODEC_FP32, "fp32"}, {v1::CODEC_FP16, "fp16"}, {v1::CODEC_INT8, "int8"},
      {v1::CODEC_INT4, "int4"}, {v1::CODEC_TOPK, "topk"}, {v1::CODEC_SEED_SCALARS, "seed-scalars"}};
  for (const auto& [codec, name] : names) {
    CHECK(CodecName(codec) == name);
    auto parsed = ParseCodecName(name);
    REQUIRE(parsed.ok());
    CHECK(*parsed == codec);
  }
  for (const char* bad : {"top-k", "FP16", "", "unspecified"}) {
    auto parsed = ParseCodecName(bad);
    REQUIRE_FALSE(parsed.ok());
    CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(parsed.status().message()).find("seed-scalars") != std::string::npos);
  }
}

TEST_CASE("fp32 round trip is bit-exact and takes 24 + 4n bytes", "[comms][codec]") {
  std::vector<float> x = RandomNormal(1001, 1, 3.0f);
  x[5] = -0.0f;
  x[6] = std::numeric_limits<float>::denorm_min();
  x[7] = std::numeric_limits<float>::max();
  const std::string payload = MustEncode(x, Options(v1::CODEC_FP32));
  CHECK(payload.size() == 24 + 4 * x.size());
  const std::vector<float> y = MustDecode(payload);
  REQUIRE(y.size() == x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    INFO("element " << i);
    CHECK(Bits(y[i]) == Bits(x[i]));
    CHECK(Bits(GetF32(payload, kHeader + 4 * i)) == Bits(x[i]));  // little-endian as documented
  }
}

TEST_CASE("fp16 encodes every finite half exactly and decodes it back", "[comms][codec]") {
  std::vector<float> x;
  std::vector<uint16_t> halves;
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    if ((h & 0x7c00) == 0x7c00) continue;  // inf / NaN
    halves.push_back(static_cast<uint16_t>(h));
    x.push_back(static_cast<float>(HalfValue(static_cast<uint16_t>(h))));
  }
  const std::string payload = MustEncode(x, Options(v1::CODEC_FP16));
  REQUIRE(payload.size() == 24 + 2 * x.size());
  const std::vector<float> y = MustDecode(payload);
  for (size_t i = 0; i < x.size(); ++i) {
    INFO("half 0x" << std::hex << halves[i]);
    CHECK(GetLe(payload, kHeader + 2 * i, 2) == halves[i]);
    CHECK(Bits(y[i]) == Bits(x[i]));
  }
}

TEST_CASE("fp16 rounds to the nearest half with ties to even, subnormals included", "[comms][codec]") {
  std::vector<float> x;
  Rng rng(7, rng_stream::kData);
  // Random floats from 2^-28 to just under 65504, log-uniform, either sign.
  while (x.size() < 20000) {
    const uint32_t exponent = 127 - 28 + static_cast<uint32_t>(rng.UniformInt(28 + 16));
    const uint32_t bits = (exponent << 23) | (rng.NextU32() & 0x7fffffu) | (rng.NextU32() & 0x80000000u);
    const float v = std::bit_cast<float>(bits);
    if (std::fabs(v) <= 65504.0f) x.push_back(v);
  }
  // Exact midpoints between neighbouring halves (normal and subnormal): the ties-to-even cases.
  for (int i = 0; i < 4000; ++i) {
    const auto h = static_cast<uint16_t>(rng.UniformInt(0x7bff));
    x.push_back(static_cast<float>((HalfValue(h) + HalfValue(static_cast<uint16_t>(h + 1))) / 2));
  }
  // Hand-picked: 1 + 2^-11 ties to 1, 1 + 3 * 2^-11 ties to 1 + 2^-9, half the smallest subnormal
  // ties to 0, 1.5 subnormal units tie to 2 units, 65519 rounds down to the largest half.
  const float picked[] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 0x1p-25f, 3 * 0x1p-25f, 65519.0f};
  const uint16_t picked_bits[] = {0x3c00, 0x3c02, 0x0000, 0x0002, 0x7bff};
  x.insert(x.end(), std::begin(picked), std::end(picked));

  const std::string payload = MustEncode(x, Options(v1::CODEC_FP16));
  const std::vector<float> y = MustDecode(payload);
  for (size_t i = 0; i < x.size(); ++i) {
    const uint16_t expected = NearestHalf(x[i]);
    INFO("x = " << x[i] << " (bits 0x" << std::hex << Bits(x[i]) << ")");
    REQUIRE(GetLe(payload, kHeader + 2 * i, 2) == expected);
    REQUIRE(y[i] == static_cast<float>(HalfValue(expected)));
  }
  for (size_t i = 0; i < std::size(picked); ++i) {
    CHECK(GetLe(payload, kHeader + 2 * (x.size() - std::size(picked) + i), 2) == picked_bits[i]);
  }
}

TEST_CASE("fp16 encoding rejects values that would round to infinity", "[comms][codec]") {
  for (float bad : {65520.0f, -70000.0f, 1e30f}) {
    const std::vector<float> x = {1.0f, bad, 2.0f};
    CheckInvalid(EncodeDense(x, Options(v1::CODEC_FP16), 0).status(), "overflows fp16");
  }
}

// ---- int8 / int4
// -------------------------------------------------------------------------------------

TEST_CASE("int8 and int4 decode within one quantization step and have the documented size", "[comms][codec]") {
  struct Case {
    v1::Codec codec;
    float levels;
    size_t n;
    uint32_t block;
  };
  const Case cases[] = {{v1::CODEC_INT8, 127, 1000, 64}, {v1::CODEC_INT8, 127, 1000, 1},
                        {v1::CODEC_INT8, 127, 77, 1000}, {v1::CODEC_INT4, 7, 1000, 64},
                        {v1::CODEC_INT4, 7, 1001, 32},   {v1::CODEC_INT4, 7, 3, 2}};
  for (const Case& c : cases) {
    INFO("codec " << c.codec << " n " << c.n << " block " << c.block);
    std::vector<float> x = RandomNormal(c.n, c.n + c.block, 0.01f);
    // An all-zero block must have scale 0 and decode to zeros.
    if (c.n >= 2 * c.block) std::fill(x.begin() + c.block, x.begin() + 2 * c.block, 0.0f);
    const std::string payload = MustEncode(x, Options(c.codec, c.block), 42);
    const size_t blocks = (c.n + c.block - 1) / c.block;
    const size_t value_bytes = c.codec == v1::CODEC_INT8 ? c.n : (c.n + 1) / 2;
    CHECK(payload.size() == 24 + 4 * blocks + value_bytes);
    const std::vector<float> scales = BlockScales(x, c.block);
    const std::vector<float> y = MustDecode(payload);
    REQUIRE(y.size() == x.size());
    for (size_t i = 0; i < c.n; ++i) {
      const float scale = scales[i / c.block];
      REQUIRE(GetF32(payload, kHeader + 4 * (i / c.block)) == scale);
      const float step = scale / c.levels;
      INFO("element " << i << " x " << x[i] << " decoded " << y[i] << " step " << step);
      REQUIRE(std::fabs(y[i] - x[i]) <= step * (1 + 1e-5f));
      // The block's extreme value maps to +-levels exactly, so it decodes to +-scale.
      // (up to the fp32 rounding of levels * (scale / levels)).
      if (std::fabs(x[i]) == scale) REQUIRE(std::fabs(std::fabs(y[i]) - scale) <= scale * 1e-6f);
    }
  }
}

TEST_CASE("int8 and int4 lay out scales, then values, with int4 nibbles low first", "[comms][codec]") {
  // Values at the block's extremes quantize deterministically (y = +-levels, 0), so the bytes are
  // known.
  const std::vector<float> x8 = {2.0f, -2.0f, 0.0f};
  const std::string p8 = MustEncode(x8, Options(v1::CODEC_INT8, 64));
  REQUIRE(p8.size() == 24 + 4 + 3);
  CHECK(GetLe(p8, 0, 4) == 0x554c4453u);  // "SDLU"
  CHECK(GetLe(p8, 4, 1) == 1);
  CHECK(GetLe(p8, 5, 1) == v1::CODEC_INT8);
  CHECK(GetLe(p8, 8, 8) == 3);
  CHECK(GetLe(p8, 16, 8) == 64);
  CHECK(GetF32(p8, 24) == 2.0f);
  CHECK(GetLe(p8, 28, 1) == 127);
  CHECK(GetLe(p8, 29, 1) == 0x81);  // -127
  CHECK(GetLe(p8, 30, 1) == 0);

  const std::vector<float> x4 = {1.0f, -1.0f, 0.0f, -1.0f, 1.0f};
  const std::string p4 = MustEncode(x4, Options(v1::CODEC_INT4, 6));
  REQUIRE(p4.size() == 24 + 4 + 3);
  CHECK(GetF32(p4, 24) == 1.0f);
  CHECK(GetLe(p4, 28, 1) == 0x97);  // 7, then -7 (0x9) in the high nibble
  CHECK(GetLe(p4, 29, 1) == 0x90);  // 0, then -7
  CHECK(GetLe(p4, 30, 1) == 0x07);  // 7, unused high nibble 0
  CHECK(MustDecode(p4) == x4);
}

TEST_CASE("stochastic rounding is unbiased: the mean over 2000 seeds converges to the input", "[comms][codec]") {
  constexpr int kSeeds = 2000;
  const std::vector<float> x = RandomNormal(256, 99);
  for (const auto& [codec, levels] : {std::pair{v1::CODEC_INT8, 127.0}, std::pair{v1::CODEC_INT4, 7.0}}) {
    INFO("codec " << codec);
    std::vector<double> sum(x.size(), 0.0);
    for (int s = 0; s < kSeeds; ++s) {
      const std::vector<float> y = MustDecode(MustEncode(x, Options(codec, 64), 1000 + s));
      for (size_t i = 0; i < x.size(); ++i) sum[i] += y[i];
    }
    const std::vector<float> scales = BlockScales(x, 64);
    double mean_signed_error_in_steps = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      // Each draw is x rounded up or down by < 1 step, so its variance is at most step^2 / 4 and
      // the mean's standard deviation at most step / (2 sqrt(seeds)); allow 5 of those. A biased
      // rounding (to nearest, or truncation) misses by a quarter step on average, about 20 times
      // this tolerance.
      const double step = scales[i / 64] / levels;
      const double tolerance = 5 * step / (2 * std::sqrt(double{kSeeds})) + 1e-6 * std::fabs(x[i]);
      const double mean = sum[i] / kSeeds;
      INFO("element " << i << " x " << x[i] << " mean " << mean << " step " << step);
      CHECK(std::fabs(mean - x[i]) <= tolerance);
      mean_signed_error_in_steps += (mean - x[i]) / step / x.size();
    }
    // Across elements the errors average out further: sd <= 1 / (2 sqrt(seeds * n)).
    CHECK(std::fabs(mean_signed_error_in_steps) <= 5 / (2 * std::sqrt(double{kSeeds} * x.size())));
  }
}

TEST_CASE("stochastic rounding gives the same bytes for the same seed and different ones otherwise", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(4096, 5);
  for (v1::Codec codec : {v1::CODEC_INT8, v1::CODEC_INT4}) {
    INFO("codec " << codec);
    const std::string a = MustEncode(x, Options(codec, 64), 11);
    CHECK(MustEncode(x, Options(codec, 64), 11) == a);
    const std::string b = MustEncode(x, Options(codec, 64), 12);
    CHECK(b != a);
    // Only the roundings differ: scales are the same.
    CHECK(a.substr(0, kHeader + 4 * 64) == b.substr(0, kHeader + 4 * 64));
  }
}

// ---- top-k
// ---------------------------------------------------------------------------------------------

// The k largest |v| with ties to the lower index, by sorting everything (the clear, slow way).
std::vector<uint32_t> ReferenceTopK(std::span<const float> v, size_t k) {
  std::vector<uint32_t> order(v.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t a, uint32_t b) { return std::fabs(v[a]) > std::fabs(v[b]); });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

TEST_CASE("top-k count is at least one and follows the fraction", "[comms][codec]") {
  CHECK(TopKCount(10, 0.1f) == 1);
  CHECK(TopKCount(100, 0.01f) == 1);
  CHECK(TopKCount(1000, 0.01f) == 10);
  CHECK(TopKCount(1001, 0.01f) == 11);
  CHECK(TopKCount(5, 1e-6f) == 1);
  CHECK(TopKCount(7, 1.0f) == 7);
  CHECK(TopKCount(3, 0.5f) == 2);
  CHECK(TopKCount(0, 0.5f) == 0);
}

TEST_CASE("top-k sends exactly k entries, the largest magnitudes, ties to the lower index", "[comms][codec]") {
  // Small integers so that many magnitudes tie.
  std::vector<float> x(2000);
  Rng rng(3, rng_stream::kData);
  for (float& v : x) v = static_cast<float>(static_cast<int>(rng.UniformInt(41)) - 20);
  for (float fraction : {0.05f, 0.001f, 0.5f, 1.0f}) {
    INFO("fraction " << fraction);
    ErrorFeedback feedback(x.size());
    const std::string payload = MustEncode(x, Options(v1::CODEC_TOPK, 64, fraction), 0, &feedback);
    const size_t k = TopKCount(x.size(), fraction);
    REQUIRE(payload.size() == 24 + 8 * k);
    absl::StatusOr<PayloadInfo> info = InspectPayload(payload);
    REQUIRE(info.ok());
    CHECK(info->entries == k);
    const std::vector<uint32_t> expected = ReferenceTopK(x, k);
    for (size_t e = 0; e < k; ++e) {
      INFO("entry " << e);
      REQUIRE(GetLe(payload, kHeader + 8 * e, 4) == expected[e]);
      REQUIRE(GetF32(payload, kHeader + 8 * e + 4) == x[expected[e]]);
    }
  }
}

TEST_CASE("top-k leaves update plus old residual minus what was sent in the residual", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(5000, 21);
  ErrorFeedback feedback(x.size());
  const std::vector<float> old_residual = RandomNormal(x.size(), 22, 0.5f);
  std::copy(old_residual.begin(), old_residual.end(), feedback.mutable_residual().begin());
  const std::string payload = MustEncode(x, Options(v1::CODEC_TOPK, 64, 0.02f), 0, &feedback);
  const std::vector<float> sent = MustDecode(payload);
  std::vector<float> v(x.size());
  for (size_t i = 0; i < x.size(); ++i) v[i] = x[i] + old_residual[i];
  const std::vector<uint32_t> expected = ReferenceTopK(v, 100);
  size_t nonzero = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    INFO("element " << i);
    const bool chosen = std::binary_search(expected.begin(), expected.end(), static_cast<uint32_t>(i));
    CHECK(sent[i] == (chosen ? v[i] : 0.0f));
    CHECK(feedback.residual()[i] == v[i] - sent[i]);
    nonzero += sent[i] != 0.0f;
  }
  CHECK(nonzero == 100);
}

TEST_CASE("top-k with error feedback loses nothing over several rounds", "[comms][codec]") {
  // Multiples of 1/1024 below 8 in magnitude: every sum here is exact in fp32, so "nothing lost"
  // can be checked with ==.
  constexpr size_t kN = 3000;
  constexpr int kRounds = 6;
  Rng rng(17, rng_stream::kData);
  ErrorFeedback feedback(kN);
  std::vector<float> total_updates(kN, 0.0f), total_decoded(kN, 0.0f);
  for (int round = 0; round < kRounds; ++round) {
    std::vector<float> x(kN);
    for (float& v : x) v = (static_cast<float>(rng.UniformInt(16384)) - 8192.0f) / 1024.0f;
    const std::string payload = MustEncode(x, Options(v1::CODEC_TOPK, 64, 0.03f), round, &feedback);
    REQUIRE(DecodeDenseAdd(payload, 1.0f, total_decoded).ok());
    for (size_t i = 0; i < kN; ++i) total_updates[i] += x[i];
  }
  size_t nonzero_residual = 0;
  for (size_t i = 0; i < kN; ++i) {
    INFO("element " << i);
    CHECK(total_decoded[i] + feedback.residual()[i] == total_updates[i]);
    nonzero_residual += feedback.residual()[i] != 0.0f;
  }
  CHECK(nonzero_residual > 0);  // the test means something only if something was held back
}

TEST_CASE("top-k requires an error feedback of the update's length", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(100, 1);
  CheckInvalid(EncodeDense(x, Options(v1::CODEC_TOPK), 0, nullptr).status(), "needs an ErrorFeedback");
  ErrorFeedback wrong(99);
  CheckInvalid(EncodeDense(x, Options(v1::CODEC_TOPK), 0, &wrong).status(), "error feedback has 99 elements");
}

TEST_CASE("ErrorFeedback survives Serialize and Deserialize", "[comms][codec]") {
  ErrorFeedback feedback(257);
  const std::vector<float> r = RandomNormal(257, 8);
  std::copy(r.begin(), r.end(), feedback.mutable_residual().begin());
  const std::string bytes = feedback.Serialize();
  CHECK(bytes.size() == 16 + 4 * 257);
  absl::StatusOr<ErrorFeedback> back = ErrorFeedback::Deserialize(bytes);
  REQUIRE(back.ok());
  REQUIRE(back->residual().size() == r.size());
  for (size_t i = 0; i < r.size(); ++i) CHECK(Bits(back->residual()[i]) == Bits(r[i]));
  absl::StatusOr<ErrorFeedback> empty = ErrorFeedback::Deserialize(ErrorFeedback().Serialize());
  REQUIRE(empty.ok());
  CHECK(empty->residual().empty());
}

TEST_CASE("ErrorFeedback::Deserialize rejects corrupted state", "[comms][codec]") {
  const std::string good = ErrorFeedback(4).Serialize();
  std::string nan = good;
  PutF32(nan, 16 + 8, std::numeric_limits<float>::quiet_NaN());
  std::string magic = good;
  magic[0] = 'X';
  std::string huge = good;
  PutU64(huge, 8, uint64_t{1} << 62);
  std::string version = good;
  PutU8(version, 4, 9);
  CheckInvalid(ErrorFeedback::Deserialize(good.substr(0, 10)).status(), "truncated header");
  CheckInvalid(ErrorFeedback::Deserialize(good.substr(0, good.size() - 1)).status(), "truncated data");
  CheckInvalid(ErrorFeedback::Deserialize(good + "x").status(), "trailing bytes");
  CheckInvalid(ErrorFeedback::Deserialize(nan).status(), "residual element 2 is not finite");
  CheckInvalid(ErrorFeedback::Deserialize(magic).status(), "bad magic");
  CheckInvalid(ErrorFeedback::Deserialize(huge).status(), "truncated data");
  CheckInvalid(ErrorFeedback::Deserialize(version).status(), "unsupported format version");
}

// ---- Sizes, options, inspection
// --------------------------------------------------------------------------

TEST_CASE("EncodedDenseSize matches the documented and the actual encoded size", "[comms][codec]") {
  for (size_t n : {0, 1, 63, 64, 65, 1000, 1001}) {
    const std::vector<float> x = RandomNormal(n, n);
    const auto blocks = [&](size_t b) { return (n + b - 1) / b; };
    const std::pair<CodecOptions, size_t> cases[] = {
        {Options(v1::CODEC_FP32), 24 + 4 * n},
        {Options(v1::CODEC_FP16), 24 + 2 * n},
        {Options(v1::CODEC_INT8, 64), 24 + 4 * blocks(64) + n},
        {Options(v1::CODEC_INT4, 16), 24 + 4 * blocks(16) + (n + 1) / 2},
        {Options(v1::CODEC_TOPK, 64, 0.1f), 24 + 8 * static_cast<size_t>(TopKCount(n, 0.1f))},
    };
    for (const auto& [options, expected] : cases) {
      INFO("n " << n << " codec " << options.codec);
      ErrorFeedback feedback(n);
      CHECK(MustEncode(x, options, 0, &feedback).size() == expected);
      absl::StatusOr<uint64_t> size = EncodedDenseSize(n, options);
      REQUIRE(size.ok());
      CHECK(*size == expected);
    }
  }
  CheckInvalid(EncodedDenseSize(std::numeric_limits<uint64_t>::max(), Options(v1::CODEC_INT8)).status(), "too large");
  CheckInvalid(EncodedDenseSize((uint64_t{1} << 32) + 1, Options(v1::CODEC_TOPK)).status(), "2^32");
}

TEST_CASE("invalid codec options are rejected with what is wrong", "[comms][codec]") {
  CHECK(ValidateCodecOptions(Options(v1::CODEC_FP32, 0, 0.0f)).ok());  // unused fields are not checked
  CHECK(ValidateCodecOptions(Options(v1::CODEC_SEED_SCALARS)).ok());
  CheckInvalid(ValidateCodecOptions(Options(v1::CODEC_UNSPECIFIED)), "unknown codec");
  CheckInvalid(ValidateCodecOptions(Options(static_cast<v1::Codec>(42))), "unknown codec");
  CheckInvalid(ValidateCodecOptions(Options(v1::CODEC_INT8, 0)), "block size is 0");
  CheckInvalid(ValidateCodecOptions(Options(v1::CODEC_INT4, 7)), "must be even");
  CheckInvalid(ValidateCodecOptions(Options(v1::CODEC_TOPK, 64, 0.0f)), "not in (0, 1]");
  CheckInvalid(ValidateCodecOptions(Options(v1::CODEC_TOPK, 64, 1.5f)), "not in (0, 1]");
  CheckInvalid(ValidateCodecOptions(Options(v1::CODEC_TOPK, 64, std::nanf(""))), "not in (0, 1]");
  const std::vector<float> x = {1.0f};
  CheckInvalid(EncodeDense(x, Options(v1::CODEC_SEED_SCALARS), 0).status(), "not a dense update codec");
  CheckInvalid(EncodeDense(x, Options(v1::CODEC_INT4, 3), 0).status(), "must be even");
}

TEST_CASE("encoding rejects a non-finite update for every codec", "[comms][codec]") {
  for (v1::Codec codec : kDenseCodecs) {
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
      INFO("codec " << codec << " value " << bad);
      std::vector<float> x = RandomNormal(300, 1);
      x[200] = bad;
      ErrorFeedback feedback(x.size());
      feedback.mutable_residual()[3] = 1.0f;
      CheckInvalid(EncodeDense(x, Options(codec), 0, &feedback).status(), "update element 200 is not finite");
      CHECK(feedback.residual()[3] == 1.0f);  // untouched
    }
  }
  // top-k: a finite update whose sum with the residual overflows.
  std::vector<float> x(10, 3e38f);
  ErrorFeedback feedback(10);
  std::fill(feedback.mutable_residual().begin(), feedback.mutable_residual().end(), 3e38f);
  CheckInvalid(EncodeDense(x, Options(v1::CODEC_TOPK), 0, &feedback).status(), "overflows at element 0");
  CHECK(feedback.residual()[0] == 3e38f);
}

TEST_CASE("InspectPayload reports the header fields", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(1000, 2);
  ErrorFeedback feedback(x.size());
  const std::string topk = MustEncode(x, Options(v1::CODEC_TOPK, 64, 0.05f), 0, &feedback);
  absl::StatusOr<PayloadInfo> info = InspectPayload(topk);
  REQUIRE(info.ok());
  CHECK(info->codec == v1::CODEC_TOPK);
  CHECK(info->numel == 1000);
  CHECK(info->entries == 50);
  info = InspectPayload(MustEncode(x, Options(v1::CODEC_INT4, 32)));
  REQUIRE(info.ok());
  CHECK(info->codec == v1::CODEC_INT4);
  CHECK(info->block_size == 32);
  CHECK(info->numel == 1000);
  const SeedValueScalar pairs[] = {{1, 2.0f}, {3, 4.0f}};
  info = InspectPayload(EncodeSeedValueScalars(pairs));
  REQUIRE(info.ok());
  CHECK(info->codec == v1::CODEC_SEED_SCALARS);
  CHECK(info->numel == 2);
  CHECK(info->seed_kind == SeedScalarKind::kSeed);
}

// ---- Streaming aggregation
// -----------------------------------------------------------------------------

TEST_CASE("DecodeDenseAdd adds weight times the decoded update", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(1000, 31);
  for (v1::Codec codec : kDenseCodecs) {
    INFO("codec " << codec);
    ErrorFeedback feedback(x.size());
    const std::string payload = MustEncode(x, Options(codec, 64, 0.1f), 5, &feedback);
    const std::vector<float> decoded = MustDecode(payload);
    std::vector<float> acc = RandomNormal(x.size(), 32);
    const std::vector<float> before = acc;
    const float weight = 0.37f;
    REQUIRE(DecodeDenseAdd(payload, weight, acc).ok());
    for (size_t i = 0; i < x.size(); ++i) {
      INFO("element " << i);
      REQUIRE(Bits(acc[i]) == Bits(before[i] + weight * decoded[i]));
    }
  }
}

TEST_CASE("ValidateDensePayload measures the norm and AddTo adds in double", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(1001, 33);
  for (v1::Codec codec : kDenseCodecs) {
    INFO("codec " << codec);
    ErrorFeedback feedback(x.size());
    const std::string payload = MustEncode(x, Options(codec, 64, 0.1f), 5, &feedback);
    const std::vector<float> decoded = MustDecode(payload);
    absl::StatusOr<ValidatedDense> v = ValidateDensePayload(payload);
    REQUIRE(v.ok());
    CHECK(v->codec() == codec);
    CHECK(v->numel() == x.size());
    double norm2 = 0;
    for (float d : decoded) norm2 += static_cast<double>(d) * d;
    REQUIRE(norm2 > 0);
    CHECK(std::abs(v->squared_norm() - norm2) <= 1e-6 * norm2);

    std::vector<double> acc(x.size());
    for (size_t i = 0; i < acc.size(); ++i) acc[i] = 0.25 * static_cast<double>(i);
    const std::vector<double> before = acc;
    const double weight = 3.0;
    REQUIRE(v->AddTo(acc, weight).ok());
    for (size_t i = 0; i < x.size(); ++i) {
      INFO("element " << i);
      REQUIRE(acc[i] == before[i] + weight * static_cast<double>(decoded[i]));
    }
    // Bad arguments add nothing.
    const std::vector<double> after = acc;
    CheckInvalid(v->AddTo(acc, std::numeric_limits<double>::quiet_NaN()), "weight");
    std::vector<double> short_acc(x.size() - 1, 7.0);
    CheckInvalid(v->AddTo(short_acc, 1.0), "does not match the accumulator");
    CHECK(std::all_of(short_acc.begin(), short_acc.end(), [](double d) { return d == 7.0; }));
    REQUIRE(acc == after);
  }
}

TEST_CASE("DecodeDenseAdd leaves the accumulator untouched when the payload is bad", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(1001, 41);
  ErrorFeedback feedback(x.size());
  const std::string fp32 = MustEncode(x, Options(v1::CODEC_FP32));
  const std::string fp16 = MustEncode(x, Options(v1::CODEC_FP16));
  const std::string int8 = MustEncode(x, Options(v1::CODEC_INT8, 64));
  const std::string int4 = MustEncode(x, Options(v1::CODEC_INT4, 64));
  const std::string topk = MustEncode(x, Options(v1::CODEC_TOPK, 64, 0.1f), 0, &feedback);
  // Every corruption sits at the very end, so a decoder that adds while it validates would have
  // added almost everything before noticing.
  std::string bad_fp32 = fp32;
  PutF32(bad_fp32, bad_fp32.size() - 4, std::numeric_limits<float>::quiet_NaN());
  std::string bad_fp16 = fp16;
  PutU16(bad_fp16, bad_fp16.size() - 2, 0x7c00);
  std::string bad_int8 = int8;
  PutU8(bad_int8, bad_int8.size() - 1, 0x80);
  std::string bad_int4 = int4;
  PutU8(bad_int4, bad_int4.size() - 1, 0x08);
  std::string bad_topk = topk;
  PutU32(bad_topk, bad_topk.size() - 8, 5000);
  const std::pair<std::string, std::string> cases[] = {{bad_fp32, "not finite"},
                                                       {bad_fp16, "not finite"},
                                                       {bad_int8, "-128"},
                                                       {bad_int4, "-8"},
                                                       {bad_topk, "out of range"}};
  std::vector<float> acc = RandomNormal(x.size(), 42);
  const std::vector<float> before = acc;
  for (const auto& [payload, message] : cases) {
    CheckInvalid(DecodeDenseAdd(payload, 1.0f, acc), message);
    REQUIRE(std::memcmp(acc.data(), before.data(), acc.size() * sizeof(float)) == 0);
    CheckInvalid(ValidateDensePayload(payload).status(), message);
  }
  CheckInvalid(DecodeDenseAdd(fp32, std::numeric_limits<float>::infinity(), acc), "weight");
  std::vector<float> short_acc(x.size() - 1, 7.0f);
  CheckInvalid(DecodeDenseAdd(fp32, 1.0f, short_acc), "does not match the accumulator");
  CHECK(std::all_of(short_acc.begin(), short_acc.end(), [](float v) { return v == 7.0f; }));
  REQUIRE(std::memcmp(acc.data(), before.data(), acc.size() * sizeof(float)) == 0);
}

// ---- Seed scalars
// ----------------------------------------------------------------------------------------

TEST_CASE("seed scalar lists round-trip in order, duplicates kept", "[comms][codec]") {
  const std::vector<SeedIndexScalar> by_index = {{7, 0.5f}, {3, -1.25f}, {7, 2.0f}, {4095, -0.0f}};
  const std::string a = EncodeSeedIndexScalars(by_index);
  CHECK(a.size() == 24 + 8 * by_index.size());
  absl::StatusOr<std::vector<SeedIndexScalar>> a_back = DecodeSeedIndexScalars(a, 4096);
  REQUIRE(a_back.ok());
  REQUIRE(a_back->size() == by_index.size());
  for (size_t i = 0; i < by_index.size(); ++i) {
    CHECK((*a_back)[i].index == by_index[i].index);
    CHECK(Bits((*a_back)[i].value) == Bits(by_index[i].value));
  }
  const std::vector<SeedValueScalar> by_seed = {{0xdeadbeefcafef00dull, 3.0f}, {1, -7.5f}};
  const std::string b = EncodeSeedValueScalars(by_seed);
  CHECK(b.size() == 24 + 12 * by_seed.size());
  absl::StatusOr<std::vector<SeedValueScalar>> b_back = DecodeSeedValueScalars(b);
  REQUIRE(b_back.ok());
  REQUIRE(b_back->size() == by_seed.size());
  for (size_t i = 0; i < by_seed.size(); ++i) {
    CHECK((*b_back)[i].seed == by_seed[i].seed);
    CHECK((*b_back)[i].value == by_seed[i].value);
  }
  absl::StatusOr<std::vector<SeedIndexScalar>> empty = DecodeSeedIndexScalars(EncodeSeedIndexScalars({}), 1);
  REQUIRE(empty.ok());
  CHECK(empty->empty());
}

// ---- Corruption
// --------------------------------------------------------------------------------------

enum class Decoder { kDense, kSeedIndex, kSeedValue };

absl::Status Decode(Decoder decoder, const std::string& payload) {
  switch (decoder) {
    case Decoder::kDense:
      return DecodeDense(payload).status();
    case Decoder::kSeedIndex:
      return DecodeSeedIndexScalars(payload, 16).status();
    case Decoder::kSeedValue:
      return DecodeSeedValueScalars(payload).status();
  }
  return absl::InternalError("unreachable");
}

TEST_CASE("decoders reject corrupted payloads with a message that says what is wrong", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(100, 51);
  const std::vector<float> x101 = RandomNormal(101, 52);
  ErrorFeedback feedback(x.size());
  const std::string fp32 = MustEncode(x, Options(v1::CODEC_FP32));
  const std::string fp16 = MustEncode(x, Options(v1::CODEC_FP16));
  const std::string int8 = MustEncode(x, Options(v1::CODEC_INT8, 32));                      // 4 blocks, the last of 4
  const std::string int4 = MustEncode(x101, Options(v1::CODEC_INT4, 32));                   // 4 blocks, 51 value bytes
  const std::string topk = MustEncode(x, Options(v1::CODEC_TOPK, 64, 0.1f), 0, &feedback);  // k = 10
  const std::vector<SeedIndexScalar> index_pairs = {{1, 1.0f}, {15, 2.0f}, {3, 3.0f}};
  const std::string seeds = EncodeSeedIndexScalars(index_pairs);
  const std::vector<SeedValueScalar> value_pairs = {{1, 1.0f}, {2, 2.0f}};
  const std::string seed_values = EncodeSeedValueScalars(value_pairs);
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const float kInf = std::numeric_limits<float>::infinity();
  const size_t int8_values = kHeader + 4 * 4, int4_values = kHeader + 4 * 4;

  struct Row {
    std::string name;
    std::string payload;
    Decoder decoder;
    std::string message;
    bool header_level;  // InspectPayload must reject it too
  };
  std::vector<Row> rows;
  auto add = [&](std::string name, std::string base, auto mutate, Decoder decoder, std::string message,
                 bool header_level) {
    mutate(base);
    rows.push_back({std::move(name), std::move(base), decoder, std::move(message), header_level});
  };
  using D = Decoder;
  add(
      "truncated header", fp32, [](std::string& p) { p.resize(23); }, D::kDense, "truncated header", true);
  add(
      "empty payload", fp32, [](std::string& p) { p.clear(); }, D::kDense, "truncated header", true);
  add(
      "truncated data", fp32, [](std::string& p) { p.pop_back(); }, D::kDense, "truncated data", true);
  add(
      "trailing byte", fp32, [](std::string& p) { p.push_back('\0'); }, D::kDense, "trailing bytes", true);
  add(
      "wrong magic", fp32, [](std::string& p) { p[0] = 'X'; }, D::kDense, "bad magic", true);
  add(
      "unknown version", fp32, [](std::string& p) { PutU8(p, 4, 2); }, D::kDense, "unsupported format version 2", true);
  add(
      "unknown codec 7", fp32, [](std::string& p) { PutU8(p, 5, 7); }, D::kDense, "unknown codec id 7", true);
  add(
      "unknown codec 0", fp32, [](std::string& p) { PutU8(p, 5, 0); }, D::kDense, "unknown codec id 0", true);
  add(
      "reserved bytes", fp32, [](std::string& p) { PutU16(p, 6, 1); }, D::kDense, "reserved header bytes", true);
  add(
      "fp32 parameter", fp32, [](std::string& p) { PutU64(p, 16, 64); }, D::kDense, "parameter must be 0", true);
  add(
      "numel 2^60", fp32, [](std::string& p) { PutU64(p, 8, uint64_t{1} << 60); }, D::kDense,
      "truncated data: fp32 payload with numel 1152921504606846976", true);
  add(
      "numel 2^63 overflows", fp32, [](std::string& p) { PutU64(p, 8, uint64_t{1} << 63); }, D::kDense, "too large",
      true);
  add(
      "int8 numel 2^64-1 overflows", int8, [](std::string& p) { PutU64(p, 8, ~uint64_t{0}); }, D::kDense, "too large",
      true);
  add(
      "numel one less", fp32, [](std::string& p) { PutU64(p, 8, 99); }, D::kDense, "trailing bytes", true);
  add(
      "NaN in fp32", fp32, [&](std::string& p) { PutF32(p, kHeader + 4 * 3, kNaN); }, D::kDense,
      "fp32 value at element 3 is not finite", false);
  add(
      "inf in fp32", fp32, [&](std::string& p) { PutF32(p, kHeader + 4 * 99, -kInf); }, D::kDense,
      "fp32 value at element 99 is not finite", false);
  add(
      "inf in fp16", fp16, [](std::string& p) { PutU16(p, kHeader + 2 * 7, 0xfc00); }, D::kDense,
      "fp16 value at element 7 is not finite", false);
  add(
      "NaN in fp16", fp16, [](std::string& p) { PutU16(p, kHeader + 2 * 8, 0x7e00); }, D::kDense,
      "fp16 value at element 8 is not finite", false);
  add(
      "int8 block size 0", int8, [](std::string& p) { PutU64(p, 16, 0); }, D::kDense, "block size 0 is out of range",
      true);
  add(
      "int8 block size 2^32", int8, [](std::string& p) { PutU64(p, 16, uint64_t{1} << 32); }, D::kDense,
      "is out of range", true);
  add(
      "int8 block count mismatch", int8, [](std::string& p) { PutU64(p, 16, 16); }, D::kDense, "truncated data", true);
  add(
      "int8 block count mismatch (fewer)", int8, [](std::string& p) { PutU64(p, 16, 64); }, D::kDense, "trailing bytes",
      true);
  add(
      "int8 inf scale", int8, [&](std::string& p) { PutF32(p, kHeader + 4 * 1, kInf); }, D::kDense,
      "int8 block 1 scale is not finite", false);
  add(
      "int8 NaN scale", int8, [&](std::string& p) { PutF32(p, kHeader + 4 * 3, kNaN); }, D::kDense,
      "int8 block 3 scale is not finite", false);
  add(
      "int8 negative scale", int8, [](std::string& p) { PutF32(p, kHeader, -1.0f); }, D::kDense,
      "int8 block 0 scale is not finite and non-negative", false);
  add(
      "int8 -128", int8, [&](std::string& p) { PutU8(p, int8_values + 5, 0x80); }, D::kDense,
      "int8 value -128 at element 5", false);
  add(
      "int8 zero scale, nonzero value", int8,
      [&](std::string& p) {
        PutF32(p, kHeader + 4 * 2, 0.0f);
        PutU8(p, int8_values + 70, 3);
      },
      D::kDense, "int8 block 2 has scale 0 but a nonzero value", false);
  add(
      "int4 odd block size", int4, [](std::string& p) { PutU64(p, 16, 31); }, D::kDense, "must be even", true);
  add(
      "int4 nibble -8", int4, [&](std::string& p) { PutU8(p, int4_values + 3, 0x18); }, D::kDense,
      "int4 value -8 at element 6", false);
  add(
      "int4 padding nibble", int4, [&](std::string& p) { PutU8(p, int4_values + 50, 0x11); }, D::kDense,
      "padding nibble", false);
  add(
      "int4 inf scale", int4, [&](std::string& p) { PutF32(p, kHeader + 4 * 2, kInf); }, D::kDense,
      "int4 block 2 scale is not finite", false);
  add(
      "top-k index out of range", topk, [](std::string& p) { PutU32(p, kHeader + 8 * 9, 100); }, D::kDense,
      "top-k index 100 at entry 9 is out of range", false);
  add(
      "top-k unsorted", topk,
      [](std::string& p) {
        const std::string e2 = p.substr(kHeader + 16, 8), e3 = p.substr(kHeader + 24, 8);
        p.replace(kHeader + 16, 8, e3);
        p.replace(kHeader + 24, 8, e2);
      },
      D::kDense, "top-k indices are not sorted", false);
  add(
      "top-k duplicate", topk,
      [](std::string& p) { PutU32(p, kHeader + 24, static_cast<uint32_t>(GetLe(p, kHeader + 16, 4))); }, D::kDense,
      "duplicate top-k index", false);
  add(
      "top-k NaN value", topk, [&](std::string& p) { PutF32(p, kHeader + 8 * 4 + 4, kNaN); }, D::kDense,
      "top-k value at entry 4", false);
  add(
      "top-k entries exceed numel", topk, [](std::string& p) { PutU64(p, 8, 5); }, D::kDense,
      "top-k entries 10 exceed numel 5", true);
  add(
      "top-k numel over 2^32", topk, [](std::string& p) { PutU64(p, 8, (uint64_t{1} << 32) + 1); }, D::kDense,
      "exceeds 2^32", true);
  add(
      "top-k entries count mismatch", topk, [](std::string& p) { PutU64(p, 16, 11); }, D::kDense, "truncated data",
      true);
  add(
      "seed index outside the pool", seeds, [](std::string& p) { PutU32(p, kHeader + 8, 16); }, D::kSeedIndex,
      "seed index 16 at pair 1 is out of the pool (size 16)", false);
  add(
      "NaN seed value (index pairs)", seeds, [&](std::string& p) { PutF32(p, kHeader + 8 * 2 + 4, kNaN); },
      D::kSeedIndex, "seed scalar value at pair 2 is not finite", false);
  add(
      "inf seed value (seed pairs)", seed_values, [&](std::string& p) { PutF32(p, kHeader + 12 + 8, kInf); },
      D::kSeedValue, "seed scalar value at pair 1 is not finite", false);
  add(
      "seed pairs read as index pairs", seed_values, [](std::string&) {}, D::kSeedIndex, "kind mismatch", false);
  add(
      "index pairs read as seed pairs", seeds, [](std::string&) {}, D::kSeedValue, "kind mismatch", false);
  add(
      "unknown seed kind", seeds, [](std::string& p) { PutU64(p, 16, 3); }, D::kSeedIndex, "unknown seed scalar kind 3",
      true);
  add(
      "seed pairs truncated", seed_values, [](std::string& p) { p.resize(p.size() - 3); }, D::kSeedValue,
      "truncated data", true);
  add(
      "seed scalars as a dense update", seeds, [](std::string&) {}, D::kDense, "not a dense update codec", false);
  add(
      "dense update as seed scalars", fp32, [](std::string&) {}, D::kSeedIndex, "expected a seed-scalars payload",
      false);

  for (const Row& row : rows) {
    INFO("case: " << row.name);
    CheckInvalid(Decode(row.decoder, row.payload), row.message);
    if (row.header_level) CheckInvalid(InspectPayload(row.payload).status(), row.message);
    if (row.decoder == Decoder::kDense) {
      // The accumulator matches the header's numel where that is plausible, so the data checks are
      // reached.
      size_t n = 100;
      if (row.payload.size() >= 16 && GetLe(row.payload, 8, 8) <= 1000) n = GetLe(row.payload, 8, 8);
      std::vector<float> acc(n, 1.0f);
      CheckInvalid(DecodeDenseAdd(row.payload, 1.0f, acc), row.message);
      CHECK(std::all_of(acc.begin(), acc.end(), [](float v) { return v == 1.0f; }));
      CheckInvalid(ValidateDensePayload(row.payload).status(), row.message);
    }
  }
}

TEST_CASE("a forged huge numel is rejected by size arithmetic without allocating", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(8, 1);
  std::vector<std::string> forged;
  for (v1::Codec codec : {v1::CODEC_FP32, v1::CODEC_FP16, v1::CODEC_INT8, v1::CODEC_INT4}) {
    std::string p = MustEncode(x, Options(codec, 2));
    for (uint64_t numel : {uint64_t{1} << 60, uint64_t{1} << 62, ~uint64_t{0}, ~uint64_t{0} - 1}) {
      PutU64(p, 8, numel);
      forged.push_back(p);
    }
  }
  std::string seeds = EncodeSeedIndexScalars({});
  PutU64(seeds, 8, uint64_t{1} << 60);
  // If any decoder trusted these, it would try to allocate exabytes and throw or be killed; a size
  // check answers in microseconds.
  const auto start = std::chrono::steady_clock::now();
  for (int repeat = 0; repeat < 100; ++repeat) {
    for (const std::string& p : forged) {
      REQUIRE(DecodeDense(p).status().code() == absl::StatusCode::kInvalidArgument);
      REQUIRE(InspectPayload(p).status().code() == absl::StatusCode::kInvalidArgument);
    }
    REQUIRE(DecodeSeedIndexScalars(seeds, 16).status().code() == absl::StatusCode::kInvalidArgument);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(seconds < 0.5);
}

TEST_CASE("randomly corrupted payloads never crash and never decode to non-finite values", "[comms][codec]") {
  const std::vector<float> x = RandomNormal(203, 61, 2.0f);
  ErrorFeedback feedback(x.size());
  std::vector<std::string> valid;
  for (v1::Codec codec : kDenseCodecs) valid.push_back(MustEncode(x, Options(codec, 16, 0.1f), 3, &feedback));
  const std::vector<SeedIndexScalar> index_pairs = {{1, 1.0f}, {15, -2.0f}, {3, 3.5f}, {0, 0.25f}};
  const std::vector<SeedValueScalar> value_pairs = {{1, 1.0f}, {~uint64_t{0}, -2.0f}, {42, 0.5f}};
  valid.push_back(EncodeSeedIndexScalars(index_pairs));
  valid.push_back(EncodeSeedValueScalars(value_pairs));

  Rng rng(2024, rng_stream::kData);
  int accepted = 0, rejected = 0;
  for (const std::string& original : valid) {
    for (int variant = 0; variant < 80; ++variant) {
      std::string p = original;
      switch (rng.UniformInt(4)) {
        case 0: {  // flip a few random bits anywhere
          const int flips = 1 + static_cast<int>(rng.UniformInt(4));
          for (int f = 0; f < flips; ++f) p[rng.UniformInt(p.size())] ^= static_cast<char>(1 << rng.UniformInt(8));
          break;
        }
        case 1:  // overwrite a header byte (where size and count fields live)
          p[rng.UniformInt(kHeader)] = static_cast<char>(rng.UniformInt(256));
          break;
        case 2:  // truncate
          p.resize(rng.UniformInt(p.size()));
          break;
        default:  // append garbage
          for (uint64_t extra = 1 + rng.UniformInt(16); extra > 0; --extra) {
            p.push_back(static_cast<char>(rng.UniformInt(256)));
          }
          break;
      }
      absl::StatusOr<PayloadInfo> info = InspectPayload(p);
      // DecodeDense allocates numel floats, which for top-k can be 2^32 from a tiny payload
      // (documented): only call it on sizes a caller would expect.
      if (info.ok() && info->numel <= (1u << 20)) {
        absl::StatusOr<std::vector<float>> y = DecodeDense(p);
        if (y.ok()) {
          CHECK(std::all_of(y->begin(), y->end(), [](float v) { return std::isfinite(v); }));
        }
      }
      std::vector<float> acc(x.size(), 0.0f);
      const absl::Status added = DecodeDenseAdd(p, 1.0f, acc);
      if (added.ok()) {
        ++accepted;
        CHECK(std::all_of(acc.begin(), acc.end(), [](float v) { return std::isfinite(v); }));
      } else {
        ++rejected;
        CHECK(added.code() == absl::StatusCode::kInvalidArgument);
        CHECK(std::all_of(acc.begin(), acc.end(), [](float v) { return v == 0.0f; }));
      }
      absl::StatusOr<std::vector<SeedIndexScalar>> a = DecodeSeedIndexScalars(p, 16);
      if (a.ok()) {
        for (const SeedIndexScalar& s : *a) CHECK((s.index < 16 && std::isfinite(s.value)));
      }
      absl::StatusOr<std::vector<SeedValueScalar>> b = DecodeSeedValueScalars(p);
      if (b.ok()) {
        for (const SeedValueScalar& s : *b) CHECK(std::isfinite(s.value));
      }
    }
  }
  // Both outcomes must occur, or the mutations are not exercising the decoders.
  CHECK(accepted > 0);
  CHECK(rejected > 0);
}

// ---- The dispatched kernels (comms/internal/dense_kernels.h) ----------------------------------------

// The AVX2 kernels of this build and CPU, or null (then the tests below have nothing to compare).
const internal::DenseKernels* WideKernels() {
  const internal::DenseKernels* k = internal::Avx2Kernels();
  if (k == nullptr) WARN("no AVX2 + F16C kernels on this build or CPU: only the portable ones are tested");
  return k;
}

std::string HalfBytes(std::span<const uint16_t> halves) {
  std::string bytes(2 * halves.size(), '\0');
  for (size_t i = 0; i < halves.size(); ++i) PutU16(bytes, 2 * i, halves[i]);
  return bytes;
}

TEST_CASE("the portable half conversion is exact for every half, inf and NaN included", "[comms][codec][kernels]") {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    INFO("half 0x" << std::hex << h);
    const float f = internal::HalfToFloat(static_cast<uint16_t>(h));
    const uint32_t sign = (h & 0x8000u) << 16;
    if ((h & 0x7c00u) != 0x7c00u) {
      REQUIRE(Bits(f) == Bits(static_cast<float>(HalfValue(static_cast<uint16_t>(h)))));
    } else if ((h & 0x3ffu) == 0) {
      REQUIRE(Bits(f) == (sign | 0x7f800000u));  // ±inf
    } else {
      // NaN: sign and payload kept, made quiet.
      REQUIRE(Bits(f) == (sign | 0x7fc00000u | ((h & 0x3ffu) << 13)));
    }
  }
}

TEST_CASE("the F16C half conversion gives the portable bits for all 65,536 halves", "[comms][codec][kernels]") {
  std::vector<uint16_t> halves(1 << 16);
  std::iota(halves.begin(), halves.end(), uint16_t{0});
  const std::string bytes = HalfBytes(halves);
  const auto* d = reinterpret_cast<const uint8_t*>(bytes.data());
  std::vector<float> portable(halves.size()), wide(halves.size());
  internal::PortableKernels().fp16_decode(d, halves.size(), portable.data());
  for (size_t i = 0; i < halves.size(); ++i) {
    INFO("half 0x" << std::hex << halves[i]);
    REQUIRE(Bits(portable[i]) == Bits(internal::HalfToFloat(halves[i])));
  }
  const internal::DenseKernels* k = WideKernels();
  if (k == nullptr) return;
  k->fp16_decode(d, halves.size(), wide.data());
  for (size_t i = 0; i < halves.size(); ++i) {
    INFO("half 0x" << std::hex << halves[i]);
    REQUIRE(Bits(wide[i]) == Bits(portable[i]));
  }
}

// Element counts around the vector widths, so every tail length is exercised.
constexpr uint64_t kKernelSizes[] = {0, 1, 7, 8, 15, 16, 17, 31, 33, 100, 1001, 4099};

bool SameBits(double a, double b) { return std::bit_cast<uint64_t>(a) == std::bit_cast<uint64_t>(b); }

TEST_CASE("the AVX2 fp32 and fp16 kernels give the portable bits", "[comms][codec][kernels]") {
  const internal::DenseKernels& p = internal::PortableKernels();
  const internal::DenseKernels* k = WideKernels();
  if (k == nullptr) return;
  for (uint64_t n : kKernelSizes) {
    INFO("n " << n);
    // Magnitudes over many binades, so lane order would show in the sums' last bits.
    std::vector<float> x = RandomNormal(n, 50 + n);
    for (size_t i = 0; i < n; ++i) x[i] = std::ldexp(x[i], static_cast<int>(i % 23) - 11);
    const std::string f32 = MustEncode(x, Options(v1::CODEC_FP32));
    const std::string f16 = MustEncode(x, Options(v1::CODEC_FP16));
    const auto* d32 = reinterpret_cast<const uint8_t*>(f32.data()) + kHeader;
    const auto* d16 = reinterpret_cast<const uint8_t*>(f16.data()) + kHeader;
    CHECK(SameBits(k->fp32_sum_squares(d32, n), p.fp32_sum_squares(d32, n)));
    uint16_t max_p = 1, max_k = 2;
    CHECK(SameBits(k->fp16_sum_squares(d16, n, &max_k), p.fp16_sum_squares(d16, n, &max_p)));
    CHECK(max_k == max_p);

    std::vector<double> acc_p(n), acc_k(n);
    for (size_t i = 0; i < n; ++i) acc_p[i] = acc_k[i] = 0.1 * static_cast<double>(i) - 3.0;
    p.fp32_add(d32, n, 7.3, acc_p.data());
    k->fp32_add(d32, n, 7.3, acc_k.data());
    p.fp16_add(d16, n, -0.37, acc_p.data());
    k->fp16_add(d16, n, -0.37, acc_k.data());
    for (size_t i = 0; i < n; ++i) {
      INFO("element " << i);
      REQUIRE(SameBits(acc_k[i], acc_p[i]));
    }
  }
}

TEST_CASE("the AVX2 fp16 norm reports an inf or NaN anywhere, as the portable one does", "[comms][codec][kernels]") {
  const internal::DenseKernels& p = internal::PortableKernels();
  const internal::DenseKernels* k = WideKernels();
  if (k == nullptr) return;
  for (uint16_t bad : {uint16_t{0x7c00}, uint16_t{0xfc00}, uint16_t{0x7e00}, uint16_t{0xfc01}}) {
    for (size_t at : {size_t{0}, size_t{15}, size_t{16}, size_t{40}}) {
      std::vector<uint16_t> halves(41, 0x3c00);  // 1.0
      halves[at] = bad;
      const std::string bytes = HalfBytes(halves);
      const auto* d = reinterpret_cast<const uint8_t*>(bytes.data());
      uint16_t max_p = 0, max_k = 0;
      p.fp16_sum_squares(d, halves.size(), &max_p);
      k->fp16_sum_squares(d, halves.size(), &max_k);
      CHECK(max_p == (bad & 0x7fff));
      CHECK(max_k == max_p);
    }
  }
}

TEST_CASE("the AVX2 int8 kernels give the portable bits and reject the same data", "[comms][codec][kernels]") {
  const internal::DenseKernels& p = internal::PortableKernels();
  const internal::DenseKernels* k = WideKernels();
  if (k == nullptr) return;
  for (uint32_t block : {1u, 7u, 32u, 64u, 100u}) {
    for (uint64_t n : kKernelSizes) {
      INFO("block " << block << ", n " << n);
      std::vector<float> x = RandomNormal(n, 70 + n);
      for (size_t i = 0; i < n && i < 2 * block; ++i) x[i] = 0.0f;  // zero-scale blocks
      const std::string payload = MustEncode(x, Options(v1::CODEC_INT8, block), 3);
      const uint64_t nb = (n + block - 1) / block;
      const auto* scales = reinterpret_cast<const uint8_t*>(payload.data()) + kHeader;
      const auto* q = reinterpret_cast<const int8_t*>(scales + 4 * nb);
      double norm_p = -1, norm_k = -2;
      REQUIRE(p.int8_validate_norm(scales, q, n, block, nb, &norm_p));
      REQUIRE(k->int8_validate_norm(scales, q, n, block, nb, &norm_k));
      CHECK(SameBits(norm_k, norm_p));
      std::vector<double> acc_p(n), acc_k(n);
      for (size_t i = 0; i < n; ++i) acc_p[i] = acc_k[i] = 0.1 * static_cast<double>(i) - 3.0;
      p.int8_add(scales, q, n, block, nb, 7.3, acc_p.data());
      k->int8_add(scales, q, n, block, nb, 7.3, acc_k.data());
      for (size_t i = 0; i < n; ++i) {
        INFO("element " << i);
        REQUIRE(SameBits(acc_k[i], acc_p[i]));
      }
      if (n == 0) continue;
      // Each corruption at the first, a middle and the last element (or block).
      for (uint64_t at : {uint64_t{0}, n / 2, n - 1}) {
        const uint64_t b = at / block;
        std::string min_code = payload;
        PutU8(min_code, kHeader + 4 * nb + at, 0x80);
        std::string nan_scale = payload;
        PutF32(nan_scale, kHeader + 4 * b, std::numeric_limits<float>::quiet_NaN());
        std::string negative_scale = payload;
        PutF32(negative_scale, kHeader + 4 * b, -1.0f);
        std::string inf_scale = payload;
        PutF32(inf_scale, kHeader + 4 * b, std::numeric_limits<float>::infinity());
        std::string nonzero_in_zero_block = payload;
        PutF32(nonzero_in_zero_block, kHeader + 4 * b, 0.0f);
        PutU8(nonzero_in_zero_block, kHeader + 4 * nb + at, 1);
        for (const std::string* bad : {&min_code, &nan_scale, &negative_scale, &inf_scale, &nonzero_in_zero_block}) {
          const auto* bs = reinterpret_cast<const uint8_t*>(bad->data()) + kHeader;
          const auto* bq = reinterpret_cast<const int8_t*>(bs + 4 * nb);
          double unused;
          CHECK_FALSE(p.int8_validate_norm(bs, bq, n, block, nb, &unused));
          CHECK_FALSE(k->int8_validate_norm(bs, bq, n, block, nb, &unused));
        }
      }
    }
  }
}

TEST_CASE("ValidateDensePayload and AddTo use the fastest kernels this CPU has", "[comms][codec][kernels]") {
  const internal::DenseKernels* k = internal::Avx2Kernels();
  CHECK(&internal::BestKernels() == (k != nullptr ? k : &internal::PortableKernels()));
}

}  // namespace
}  // namespace seedling::comms
