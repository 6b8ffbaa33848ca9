// Update codecs (comms/codec.h holds the payload format and the contracts).
//
// Decoders run on the server against bytes from untrusted peers, so every function that reads a
// payload first parses its header into a Layout whose sizes were checked against the real byte
// count (with overflow checks), then validates the data in a read-only pass, and only then writes
// to its output. The hot loops are templates over a small "sink" functor (store or weighted add),
// so there is no per-element indirect call and the compiler can vectorize the straight-line cases.

#include "comms/codec.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "base/philox.h"
#include "base/status.h"
#include "base/strings.h"
#include "comms/internal/dense_kernels.h"

namespace seedling::comms {
namespace {

constexpr char kMagic[4] = {'S', 'D', 'L', 'U'};
constexpr char kFeedbackMagic[4] = {'S', 'D', 'L', 'E'};
constexpr uint8_t kFormatVersion = 1;
constexpr uint8_t kFeedbackVersion = 1;
constexpr size_t kFeedbackHeaderBytes = 16;
constexpr uint64_t kMaxTopKNumel = uint64_t{1} << 32;  // indices are uint32
constexpr float kInt8Levels = 127.0f;
constexpr float kInt4Levels = 7.0f;
// Elements quantized per batch of uniform draws: 4 KiB of floats stays in L1 next to the data.
constexpr size_t kRoundingChunk = 1024;

constexpr uint32_t kF32ExpMask = 0x7f800000u;

absl::Status Invalid(std::string_view message) { return absl::InvalidArgumentError(StrCat("update codec: ", message)); }

// ---- Little-endian access ----
// memcpy-based so unaligned access is defined; on little-endian hosts (every phone and server we
// target) the byte swap folds away and the loads become plain moves that vectorize.

template <typename T>
T ByteSwap(T v) {
  static_assert(std::is_unsigned_v<T>);
  T r = 0;
  for (size_t i = 0; i < sizeof(T); ++i) r = static_cast<T>((r << 8) | ((v >> (8 * i)) & 0xff));
  return r;
}

template <typename T>
inline T LoadLe(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  if constexpr (std::endian::native == std::endian::big) v = ByteSwap(v);
  return v;
}

template <typename T>
inline void StoreLe(uint8_t* p, T v) {
  if constexpr (std::endian::native == std::endian::big) v = ByteSwap(v);
  std::memcpy(p, &v, sizeof(T));
}

inline float LoadF32(const uint8_t* p) { return std::bit_cast<float>(LoadLe<uint32_t>(p)); }
inline void StoreF32(uint8_t* p, float v) { StoreLe<uint32_t>(p, std::bit_cast<uint32_t>(v)); }
inline bool IsFiniteBits(uint32_t bits) { return (bits & kF32ExpMask) != kF32ExpMask; }

// ---- binary16 ----

constexpr uint16_t kHalfExpMask = 0x7c00;

using internal::HalfToFloat;  // exact for every half; the validators reject exponent 31 first
using seedling::FloatToHalf;  // base/half.h

// ---- Header ----

bool IsDenseCodec(v1::Codec codec) {
  return codec == v1::CODEC_FP32 || codec == v1::CODEC_FP16 || codec == v1::CODEC_INT8 || codec == v1::CODEC_INT4 ||
         codec == v1::CODEC_TOPK;
}

bool IsBlockCodec(v1::Codec codec) { return codec == v1::CODEC_INT8 || codec == v1::CODEC_INT4; }

uint64_t CeilDiv(uint64_t a, uint64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

size_t SeedPairBytes(SeedScalarKind kind) { return kind == SeedScalarKind::kIndex ? 8 : 12; }

// Data size (after the header) for a codec, numel and parameter that are already known to be
// consistent with each other. Returns false on 64-bit overflow, which no real payload can reach.
bool DataBytes(v1::Codec codec, uint64_t numel, uint64_t param, uint64_t* bytes) {
  switch (codec) {
    case v1::CODEC_FP32:
      return !__builtin_mul_overflow(numel, uint64_t{4}, bytes);
    case v1::CODEC_FP16:
      return !__builtin_mul_overflow(numel, uint64_t{2}, bytes);
    case v1::CODEC_INT8:
    case v1::CODEC_INT4: {
      uint64_t scale_bytes;
      if (__builtin_mul_overflow(CeilDiv(numel, param), uint64_t{4}, &scale_bytes)) return false;
      const uint64_t value_bytes = codec == v1::CODEC_INT8 ? numel : CeilDiv(numel, 2);
      return !__builtin_add_overflow(scale_bytes, value_bytes, bytes);
    }
    case v1::CODEC_TOPK:
      return !__builtin_mul_overflow(param, uint64_t{8}, bytes);
    case v1::CODEC_SEED_SCALARS:
      return !__builtin_mul_overflow(numel, uint64_t{SeedPairBytes(static_cast<SeedScalarKind>(param))}, bytes);
    default:
      return false;
  }
}

// A payload whose header has been checked against its size: every pointer below is in bounds for
// the lengths the codec implies.
struct Layout {
  v1::Codec codec = v1::CODEC_UNSPECIFIED;
  uint64_t numel = 0;
  uint64_t param = 0;
  uint64_t num_blocks = 0;        // int8 / int4
  const uint8_t* data = nullptr;  // first byte after the header
};

absl::StatusOr<Layout> ParseLayout(std::string_view payload) {
  if (payload.size() < kPayloadHeaderBytes) {
    return Invalid(
        StrCat("truncated header: payload has ", payload.size(), " bytes, the header needs ", kPayloadHeaderBytes));
  }
  const auto* p = reinterpret_cast<const uint8_t*>(payload.data());
  if (std::memcmp(p, kMagic, 4) != 0) {
    return Invalid("bad magic: payload does not start with \"SDLU\"");
  }
  if (p[4] != kFormatVersion) {
    return Invalid(StrCat("unsupported format version ", static_cast<int>(p[4]), " (this build reads version ",
                          static_cast<int>(kFormatVersion), ")"));
  }
  if (p[5] < v1::CODEC_FP32 || p[5] > v1::CODEC_SEED_SCALARS) {
    return Invalid(StrCat("unknown codec id ", static_cast<int>(p[5])));
  }
  Layout layout;
  layout.codec = static_cast<v1::Codec>(p[5]);
  if (const uint16_t reserved = LoadLe<uint16_t>(p + 6); reserved != 0) {
    return Invalid(StrCat("reserved header bytes 6..7 must be zero, got ", reserved));
  }
  layout.numel = LoadLe<uint64_t>(p + 8);
  layout.param = LoadLe<uint64_t>(p + 16);
  layout.data = p + kPayloadHeaderBytes;
  const std::string_view name = CodecName(layout.codec);

  // The parameter first: the data size depends on it.
  switch (layout.codec) {
    case v1::CODEC_FP32:
    case v1::CODEC_FP16:
      if (layout.param != 0) {
        return Invalid(StrCat(name, " header parameter must be 0, got ", layout.param));
      }
      break;
    case v1::CODEC_INT8:
    case v1::CODEC_INT4:
      if (layout.param == 0 || layout.param > std::numeric_limits<uint32_t>::max()) {
        return Invalid(StrCat(name, " block size ", layout.param, " is out of range [1, 2^32)"));
      }
      if (layout.codec == v1::CODEC_INT4 && layout.param % 2 != 0) {
        return Invalid(StrCat("int4 block size ", layout.param, " must be even"));
      }
      layout.num_blocks = CeilDiv(layout.numel, layout.param);
      break;
    case v1::CODEC_TOPK:
      if (layout.numel > kMaxTopKNumel) {
        return Invalid(StrCat("top-k numel ", layout.numel, " exceeds 2^32 (indices are uint32)"));
      }
      if (layout.param > layout.numel) {
        return Invalid(StrCat("top-k entries ", layout.param, " exceed numel ", layout.numel));
      }
      break;
    case v1::CODEC_SEED_SCALARS:
      if (layout.param != static_cast<uint64_t>(SeedScalarKind::kIndex) &&
          layout.param != static_cast<uint64_t>(SeedScalarKind::kSeed)) {
        return Invalid(StrCat("unknown seed scalar kind ", layout.param, " (expected 1 or 2)"));
      }
      break;
    default:
      return Invalid(StrCat("unknown codec id ", static_cast<int>(p[5])));
  }

  uint64_t need = 0;
  if (!DataBytes(layout.codec, layout.numel, layout.param, &need)) {
    return Invalid(StrCat(name, " numel ", layout.numel, " is too large: its data size overflows 64 bits (payload has ",
                          payload.size(), " bytes)"));
  }
  const uint64_t have = payload.size() - kPayloadHeaderBytes;
  if (need > have) {
    return Invalid(StrCat("truncated data: ", name, " payload with numel ", layout.numel, " needs ", need,
                          " data bytes, got ", have));
  }
  if (need < have) {
    return Invalid(StrCat("trailing bytes: ", name, " payload with numel ", layout.numel, " needs ", need,
                          " data bytes, got ", have));
  }
  return layout;
}

void WriteHeader(uint8_t* p, v1::Codec codec, uint64_t numel, uint64_t param) {
  std::memcpy(p, kMagic, 4);
  p[4] = kFormatVersion;
  p[5] = static_cast<uint8_t>(codec);
  StoreLe<uint16_t>(p + 6, 0);
  StoreLe<uint64_t>(p + 8, numel);
  StoreLe<uint64_t>(p + 16, param);
}

// ---- Validation of dense data (read-only) ----
// Each scan folds a "bad" flag over the whole range without early exit so the loop vectorizes; only
// when something is wrong does a second, scalar scan find the first culprit for the message.

absl::Status ValidateFp32(const Layout& l) {
  const uint8_t* d = l.data;
  uint32_t bad = 0;
  for (uint64_t i = 0; i < l.numel; ++i) bad |= !IsFiniteBits(LoadLe<uint32_t>(d + 4 * i));
  if (bad == 0) return absl::OkStatus();
  for (uint64_t i = 0; i < l.numel; ++i) {
    if (!IsFiniteBits(LoadLe<uint32_t>(d + 4 * i))) {
      return Invalid(StrCat("fp32 value at element ", i, " is not finite (", LoadF32(d + 4 * i), ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateFp16(const Layout& l) {
  const uint8_t* d = l.data;
  uint32_t bad = 0;
  for (uint64_t i = 0; i < l.numel; ++i) {
    bad |= (LoadLe<uint16_t>(d + 2 * i) & kHalfExpMask) == kHalfExpMask;
  }
  if (bad == 0) return absl::OkStatus();
  for (uint64_t i = 0; i < l.numel; ++i) {
    const uint16_t h = LoadLe<uint16_t>(d + 2 * i);
    if ((h & kHalfExpMask) == kHalfExpMask) {
      return Invalid(
          StrCat("fp16 value at element ", i, " is not finite (bits 0x", absl::Hex(h, absl::kZeroPad4), ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateBlocks(const Layout& l) {
  const bool int8 = l.codec == v1::CODEC_INT8;
  const std::string_view name = CodecName(l.codec);
  const uint8_t* scales = l.data;
  const uint8_t* values = l.data + 4 * l.num_blocks;
  const uint64_t block = l.param;
  for (uint64_t b = 0; b < l.num_blocks; ++b) {
    const float scale = LoadF32(scales + 4 * b);
    // NaN fails both comparisons; a negative scale is never written (it is a max of magnitudes).
    if (!(scale >= 0.0f) || !std::isfinite(scale)) {
      return Invalid(StrCat(name, " block ", b, " scale is not finite and non-negative (", scale, ")"));
    }
  }
  // Values: the rejected codes (-128, nibble -8) and, in zero-scale blocks, any nonzero code.
  uint32_t bad = 0;
  if (int8) {
    for (uint64_t i = 0; i < l.numel; ++i) bad |= values[i] == 0x80u;
  } else {
    const uint64_t bytes = CeilDiv(l.numel, 2);
    for (uint64_t j = 0; j < bytes; ++j) {
      bad |= (values[j] & 0x0fu) == 0x08u;
      bad |= (values[j] & 0xf0u) == 0x80u;
    }
    if (l.numel % 2 != 0 && (values[bytes - 1] & 0xf0u) != 0) {
      return Invalid(
          StrCat("int4 padding nibble after the last element is not zero (byte ", values[bytes - 1] >> 4, ")"));
    }
  }
  auto code_at = [&](uint64_t i) -> int {
    if (int8) return static_cast<int8_t>(values[i]);
    const uint8_t byte = values[i / 2];
    const uint8_t nib = (i % 2 == 0) ? (byte & 0x0fu) : (byte >> 4);
    return nib >= 8 ? static_cast<int>(nib) - 16 : nib;
  };
  if (bad != 0) {
    const int min_code = int8 ? -128 : -8;
    for (uint64_t i = 0; i < l.numel; ++i) {
      if (code_at(i) == min_code) {
        return Invalid(StrCat(name, " value ", min_code, " at element ", i, " is out of range [", min_code + 1, ", ",
                              -min_code - 1, "]"));
      }
    }
  }
  for (uint64_t b = 0; b < l.num_blocks; ++b) {
    if (LoadF32(scales + 4 * b) != 0.0f) continue;
    const uint64_t end = std::min(l.numel, (b + 1) * block);
    for (uint64_t i = b * block; i < end; ++i) {
      if (code_at(i) != 0) {
        return Invalid(StrCat(name, " block ", b, " has scale 0 but a nonzero value at element ", i));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateTopK(const Layout& l) {
  const uint8_t* d = l.data;
  const uint64_t k = l.param;
  int64_t previous = -1;
  for (uint64_t e = 0; e < k; ++e) {
    const uint32_t index = LoadLe<uint32_t>(d + 8 * e);
    const uint32_t value_bits = LoadLe<uint32_t>(d + 8 * e + 4);
    if (index >= l.numel) {
      return Invalid(StrCat("top-k index ", index, " at entry ", e, " is out of range (numel ", l.numel, ")"));
    }
    if (static_cast<int64_t>(index) == previous) {
      return Invalid(StrCat("duplicate top-k index ", index, " at entry ", e));
    }
    if (static_cast<int64_t>(index) < previous) {
      return Invalid(StrCat("top-k indices are not sorted: index ", index, " at entry ", e, " follows ", previous));
    }
    if (!IsFiniteBits(value_bits)) {
      return Invalid(StrCat("top-k value at entry ", e, " (index ", index, ") is not finite (",
                            std::bit_cast<float>(value_bits), ")"));
    }
    previous = index;
  }
  return absl::OkStatus();
}

absl::Status ValidateDense(const Layout& l) {
  switch (l.codec) {
    case v1::CODEC_FP32:
      return ValidateFp32(l);
    case v1::CODEC_FP16:
      return ValidateFp16(l);
    case v1::CODEC_INT8:
    case v1::CODEC_INT4:
      return ValidateBlocks(l);
    case v1::CODEC_TOPK:
      return ValidateTopK(l);
    default:
      return Invalid(StrCat("codec ", CodecName(l.codec), " is not a dense update codec"));
  }
}

// ---- Decoding of validated data ----

struct StoreSink {
  float* out;
  void operator()(uint64_t i, float v) const { out[i] = v; }
};

struct AddSink {
  float* acc;
  float weight;
  void operator()(uint64_t i, float v) const { acc[i] += weight * v; }
};

// Calls sink(i, value) for every element the payload defines (top-k: only the sent ones). `l` must
// have passed ValidateDense.
template <typename Sink>
void ApplyDense(const Layout& l, Sink sink) {
  const uint8_t* d = l.data;
  const uint64_t n = l.numel;
  switch (l.codec) {
    case v1::CODEC_FP32:
      for (uint64_t i = 0; i < n; ++i) sink(i, LoadF32(d + 4 * i));
      break;
    case v1::CODEC_FP16:
      for (uint64_t i = 0; i < n; ++i) sink(i, HalfToFloat(LoadLe<uint16_t>(d + 2 * i)));
      break;
    case v1::CODEC_INT8: {
      const auto* q = reinterpret_cast<const int8_t*>(d + 4 * l.num_blocks);
      for (uint64_t b = 0; b < l.num_blocks; ++b) {
        const float step = LoadF32(d + 4 * b) / kInt8Levels;
        const uint64_t begin = b * l.param, end = std::min(n, begin + l.param);
        for (uint64_t i = begin; i < end; ++i) sink(i, static_cast<float>(q[i]) * step);
      }
      break;
    }
    case v1::CODEC_INT4: {
      const uint8_t* packed = d + 4 * l.num_blocks;
      for (uint64_t b = 0; b < l.num_blocks; ++b) {
        const float step = LoadF32(d + 4 * b) / kInt4Levels;
        const uint64_t begin = b * l.param, end = std::min(n, begin + l.param);
        // begin is even (the block size is), so pairs line up with bytes. A counted loop over
        // bytes (rather than i += 2) lets the compiler vectorize it.
        const uint8_t* src = packed + begin / 2;
        const uint64_t pairs = (end - begin) / 2;
        for (uint64_t j = 0; j < pairs; ++j) {
          // Sign-extend each nibble: shift it to the top of an int8, then arithmetic-shift back.
          const int lo = static_cast<int8_t>(static_cast<uint8_t>(src[j] << 4)) >> 4;
          const int hi = static_cast<int8_t>(src[j]) >> 4;
          sink(begin + 2 * j, static_cast<float>(lo) * step);
          sink(begin + 2 * j + 1, static_cast<float>(hi) * step);
        }
        if ((end - begin) % 2 != 0) {
          const int lo = static_cast<int8_t>(static_cast<uint8_t>(src[pairs] << 4)) >> 4;
          sink(end - 1, static_cast<float>(lo) * step);
        }
      }
      break;
    }
    case v1::CODEC_TOPK:
      for (uint64_t e = 0; e < l.param; ++e) {
        sink(LoadLe<uint32_t>(d + 8 * e), LoadF32(d + 8 * e + 4));
      }
      break;
    default:
      break;  // unreachable: ValidateDense accepted only dense codecs
  }
}

// ---- Encoding ----

// Index of the first non-finite element, or size() if all are finite.
size_t FirstNonFinite(std::span<const float> x) {
  uint32_t bad = 0;
  for (float v : x) bad |= !IsFiniteBits(std::bit_cast<uint32_t>(v));
  if (bad == 0) return x.size();
  for (size_t i = 0; i < x.size(); ++i) {
    if (!IsFiniteBits(std::bit_cast<uint32_t>(x[i]))) return i;
  }
  return x.size();
}

// Stochastic rounding of one run of a block (see codec.h): q = sign(y) (floor|y| + [u < frac|y|]).
// |y| <= levels because |x| <= scale and both the division and the multiplication round
// monotonically, so the truncating conversion and the +1 stay within [-levels, levels].
inline void StochasticQuantize(const float* x, const float* u, size_t len, float scale, float levels, int8_t* q) {
  for (size_t j = 0; j < len; ++j) {
    const float y = x[j] / scale * levels;
    const float a = std::fabs(y);
    const int32_t whole = static_cast<int32_t>(a);     // a >= 0: truncation is floor
    const float frac = a - static_cast<float>(whole);  // exact
    const int32_t r = whole + (u[j] < frac ? 1 : 0);
    q[j] = static_cast<int8_t>(y < 0.0f ? -r : r);
  }
}

void EncodeBlocks(std::span<const float> x, v1::Codec codec, uint64_t block, uint64_t rounding_seed, uint8_t* data) {
  const bool int8 = codec == v1::CODEC_INT8;
  const float levels = int8 ? kInt8Levels : kInt4Levels;
  const uint64_t n = x.size();
  const uint64_t num_blocks = CeilDiv(n, block);
  uint8_t* scales = data;
  uint8_t* values = data + 4 * num_blocks;
  const RngKey key{rounding_seed, kStochasticRoundingStream};
  float u[kRoundingChunk];
  int8_t q[kRoundingChunk];
  for (uint64_t b = 0; b < num_blocks; ++b) {
    const uint64_t begin = b * block, end = std::min(n, begin + block);
    // max |x| as the max of the bit patterns with the sign cleared: for finite values (checked by
    // the caller) these order like the magnitudes, and an integer max vectorizes where a float max
    // (NaN and -0 semantics) does not.
    uint32_t max_bits = 0;
    for (uint64_t i = begin; i < end; ++i) {
      max_bits = std::max(max_bits, std::bit_cast<uint32_t>(x[i]) & 0x7fffffffu);
    }
    const float scale = std::bit_cast<float>(max_bits);
    StoreF32(scales + 4 * b, scale);
    // The output is zero-filled, and an all-zero block's values must be zeros.
    if (scale == 0.0f) continue;
    for (uint64_t off = begin; off < end; off += kRoundingChunk) {
      const size_t len = static_cast<size_t>(std::min<uint64_t>(kRoundingChunk, end - off));
      FillUniform(key, off, std::span<float>(u, len));
      StochasticQuantize(x.data() + off, u, len, scale, levels, q);
      if (int8) {
        std::memcpy(values + off, q, len);
      } else {
        // off is even (block and chunk sizes are), so the run starts at a byte boundary.
        uint8_t* out = values + off / 2;
        size_t j = 0;
        for (; j + 1 < len; j += 2) {
          out[j / 2] = static_cast<uint8_t>((q[j] & 0x0f) | ((q[j + 1] & 0x0f) << 4));
        }
        if (j < len) out[j / 2] = static_cast<uint8_t>(q[j] & 0x0f);
      }
    }
  }
}

// Top-k selection by a two-pass radix select on the bit patterns of |v|, which order like the
// values for finite non-negative floats: O(n) streaming passes and a 512 KiB histogram instead of
// sorting or materializing v. v = update + residual is recomputed in each pass (the same fp32 sum
// each time), so the residual is only written in the last pass, after everything has been checked.
absl::Status EncodeTopK(std::span<const float> update, std::span<float> residual, uint64_t k, uint8_t* data) {
  const size_t n = update.size();
  const float* x = update.data();
  const float* e = residual.data();
  auto key_at = [x, e](size_t i) { return std::bit_cast<uint32_t>(x[i] + e[i]) & 0x7fffffffu; };

  std::vector<uint64_t> hist(1u << 16, 0);
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t key = key_at(i);
    bad |= key >= kF32ExpMask;
    ++hist[key >> 16];
  }
  if (bad != 0) {
    for (size_t i = 0; i < n; ++i) {
      if (!std::isfinite(e[i])) {
        return Invalid(StrCat("error-feedback residual element ", i, " is not finite (", e[i], ")"));
      }
      if (key_at(i) >= kF32ExpMask) {
        return Invalid(StrCat("update + residual overflows at element ", i, " (", x[i], " + ", e[i], ")"));
      }
    }
  }
  if (k == 0) return absl::OkStatus();

  // Pass 1 picked the high 16 bits of the k-th largest key; pass 2 picks its low 16 bits among the
  // elements in that bucket.
  uint64_t above = 0;  // elements with a key strictly above the current bucket
  uint32_t high = 0;
  for (int64_t h = (1 << 16) - 1; h >= 0; --h) {
    if (above + hist[h] >= k) {
      high = static_cast<uint32_t>(h);
      break;
    }
    above += hist[h];
  }
  std::fill(hist.begin(), hist.end(), 0);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t key = key_at(i);
    if ((key >> 16) == high) ++hist[key & 0xffffu];
  }
  uint32_t low = 0;
  for (int64_t b = (1 << 16) - 1; b >= 0; --b) {
    if (above + hist[b] >= k) {
      low = static_cast<uint32_t>(b);
      break;
    }
    above += hist[b];
  }
  const uint32_t threshold = (high << 16) | low;
  // Elements equal to the threshold that are sent: the ones with the lowest indices.
  uint64_t ties_left = k - above;

  uint8_t* out = data;
  float* r = residual.data();
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i] + e[i];
    const uint32_t key = std::bit_cast<uint32_t>(v) & 0x7fffffffu;
    bool send = key > threshold;
    if (key == threshold && ties_left > 0) {
      send = true;
      --ties_left;
    }
    if (send) {
      StoreLe<uint32_t>(out, static_cast<uint32_t>(i));
      StoreF32(out + 4, v);
      out += 8;
      r[i] = 0.0f;
    } else {
      r[i] = v;
    }
  }
  return absl::OkStatus();
}

// Parses a seed-scalars payload of the expected kind; the pair count is then bounded by the payload
// size.
absl::StatusOr<Layout> ParseSeedLayout(std::string_view payload, SeedScalarKind want) {
  SEEDLING_ASSIGN_OR_RETURN(Layout l, ParseLayout(payload));
  if (l.codec != v1::CODEC_SEED_SCALARS) {
    return Invalid(StrCat("expected a seed-scalars payload, got codec ", CodecName(l.codec)));
  }
  if (static_cast<SeedScalarKind>(l.param) != want) {
    return Invalid(want == SeedScalarKind::kIndex
                       ? "seed scalar kind mismatch: payload holds (seed, scalar) pairs, expected "
                         "(seed index, scalar) pairs"
                       : "seed scalar kind mismatch: payload holds (seed index, scalar) pairs, expected "
                         "(seed, scalar) pairs");
  }
  return l;
}

}  // namespace

absl::Status ValidateCodecOptions(const CodecOptions& options) {
  switch (options.codec) {
    case v1::CODEC_FP32:
    case v1::CODEC_FP16:
    case v1::CODEC_SEED_SCALARS:
      return absl::OkStatus();
    case v1::CODEC_INT8:
    case v1::CODEC_INT4:
      if (options.block_size == 0) {
        return Invalid(StrCat(CodecName(options.codec), " block size is 0"));
      }
      if (options.codec == v1::CODEC_INT4 && options.block_size % 2 != 0) {
        return Invalid(StrCat("int4 block size ", options.block_size, " must be even"));
      }
      return absl::OkStatus();
    case v1::CODEC_TOPK:
      // Written so that NaN fails too.
      if (!(options.topk_fraction > 0.0f && options.topk_fraction <= 1.0f)) {
        return Invalid(StrCat("top-k fraction ", options.topk_fraction, " is not in (0, 1]"));
      }
      return absl::OkStatus();
    default:
      return Invalid(StrCat("unknown codec id ", static_cast<int>(options.codec)));
  }
}

uint64_t TopKCount(uint64_t numel, float fraction) {
  if (numel == 0) return 0;
  const double product = static_cast<double>(fraction) * static_cast<double>(numel);
  const double k = std::ceil(product - product * 0x1p-24);
  if (!(k >= 1.0)) return 1;  // also catches NaN
  if (k >= static_cast<double>(numel)) return numel;
  return static_cast<uint64_t>(k);
}

absl::StatusOr<uint64_t> EncodedDenseSize(uint64_t numel, const CodecOptions& options) {
  SEEDLING_RETURN_IF_ERROR(ValidateCodecOptions(options));
  uint64_t param = 0;
  switch (options.codec) {
    case v1::CODEC_INT8:
    case v1::CODEC_INT4:
      param = options.block_size;
      break;
    case v1::CODEC_TOPK:
      if (numel > kMaxTopKNumel) {
        return Invalid(StrCat("top-k needs numel <= 2^32 (indices are uint32), got ", numel));
      }
      param = TopKCount(numel, options.topk_fraction);
      break;
    case v1::CODEC_SEED_SCALARS:
      return Invalid("codec seed-scalars is not a dense update codec");
    default:
      break;
  }
  uint64_t data = 0, total = 0;
  if (!DataBytes(options.codec, numel, param, &data) ||
      __builtin_add_overflow(data, uint64_t{kPayloadHeaderBytes}, &total)) {
    return Invalid(StrCat("numel ", numel, " is too large: the encoded size overflows 64 bits"));
  }
  return total;
}

std::string ErrorFeedback::Serialize() const {
  std::string bytes(kFeedbackHeaderBytes + 4 * residual_.size(), '\0');
  auto* p = reinterpret_cast<uint8_t*>(bytes.data());
  std::memcpy(p, kFeedbackMagic, 4);
  p[4] = kFeedbackVersion;
  StoreLe<uint64_t>(p + 8, residual_.size());
  for (size_t i = 0; i < residual_.size(); ++i) {
    StoreF32(p + kFeedbackHeaderBytes + 4 * i, residual_[i]);
  }
  return bytes;
}

absl::StatusOr<ErrorFeedback> ErrorFeedback::Deserialize(std::string_view bytes) {
  auto fail = [](std::string_view message) { return absl::InvalidArgumentError(StrCat("error feedback: ", message)); };
  if (bytes.size() < kFeedbackHeaderBytes) {
    return fail(StrCat("truncated header: ", bytes.size(), " bytes, the header needs ", kFeedbackHeaderBytes));
  }
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  if (std::memcmp(p, kFeedbackMagic, 4) != 0) {
    return fail("bad magic: does not start with \"SDLE\"");
  }
  if (p[4] != kFeedbackVersion) {
    return fail(StrCat("unsupported format version ", static_cast<int>(p[4]), " (this build reads version ",
                       static_cast<int>(kFeedbackVersion), ")"));
  }
  if (p[5] != 0 || p[6] != 0 || p[7] != 0) return fail("reserved header bytes 5..7 must be zero");
  const uint64_t numel = LoadLe<uint64_t>(p + 8);
  const uint64_t have = bytes.size() - kFeedbackHeaderBytes;
  // numel > have / 4 also covers numel * 4 overflowing, without computing it.
  if (numel > have / 4) {
    return fail(StrCat("truncated data: numel ", numel, " does not fit in ", have, " data bytes"));
  }
  if (numel * 4 != have) {
    return fail(StrCat("trailing bytes: numel ", numel, " needs ", numel * 4, " data bytes, got ", have));
  }
  const uint8_t* d = p + kFeedbackHeaderBytes;
  for (uint64_t i = 0; i < numel; ++i) {
    if (!IsFiniteBits(LoadLe<uint32_t>(d + 4 * i))) {
      return fail(StrCat("residual element ", i, " is not finite (", LoadF32(d + 4 * i), ")"));
    }
  }
  ErrorFeedback feedback(numel);
  for (uint64_t i = 0; i < numel; ++i) feedback.residual_[i] = LoadF32(d + 4 * i);
  return feedback;
}

absl::StatusOr<std::string> EncodeDense(std::span<const float> update, const CodecOptions& options,
                                        uint64_t rounding_seed, ErrorFeedback* feedback) {
  if (options.codec == v1::CODEC_SEED_SCALARS) {
    return Invalid("codec seed-scalars is not a dense update codec (use EncodeSeed*Scalars)");
  }
  absl::StatusOr<uint64_t> size = EncodedDenseSize(update.size(), options);
  if (!size.ok()) return size.status();
  if (options.codec == v1::CODEC_TOPK) {
    if (feedback == nullptr) return Invalid("top-k needs an ErrorFeedback (got null)");
    if (feedback->residual().size() != update.size()) {
      return Invalid(
          StrCat("error feedback has ", feedback->residual().size(), " elements, the update has ", update.size()));
    }
  }
  if (const size_t bad = FirstNonFinite(update); bad != update.size()) {
    return Invalid(StrCat("update element ", bad, " is not finite (", update[bad], ")"));
  }

  // Zero-filled: int8/int4 skip all-zero blocks, which then decode to zeros.
  std::string payload(*size, '\0');
  auto* p = reinterpret_cast<uint8_t*>(payload.data());
  uint8_t* data = p + kPayloadHeaderBytes;
  const uint64_t n = update.size();
  uint64_t param = 0;
  switch (options.codec) {
    case v1::CODEC_FP32:
      for (uint64_t i = 0; i < n; ++i) StoreF32(data + 4 * i, update[i]);
      break;
    case v1::CODEC_FP16: {
      uint32_t overflow = 0;
      for (uint64_t i = 0; i < n; ++i) {
        StoreLe<uint16_t>(data + 2 * i, FloatToHalf(update[i], overflow));
      }
      if (overflow != 0) {
        for (uint64_t i = 0; i < n; ++i) {
          uint32_t bad = 0;
          FloatToHalf(update[i], bad);
          if (bad != 0) {
            return Invalid(
                StrCat("update element ", i, " (", update[i], ") overflows fp16 (|x| >= 65520 rounds to infinity)"));
          }
        }
      }
      break;
    }
    case v1::CODEC_INT8:
    case v1::CODEC_INT4:
      param = options.block_size;
      EncodeBlocks(update, options.codec, param, rounding_seed, data);
      break;
    case v1::CODEC_TOPK: {
      param = TopKCount(n, options.topk_fraction);
      SEEDLING_RETURN_IF_ERROR(EncodeTopK(update, feedback->mutable_residual(), param, data));
      break;
    }
    default:
      return Invalid(StrCat("unknown codec id ", static_cast<int>(options.codec)));
  }
  WriteHeader(p, options.codec, n, param);
  return payload;
}

absl::StatusOr<PayloadInfo> InspectPayload(std::string_view payload) {
  SEEDLING_ASSIGN_OR_RETURN(const Layout l, ParseLayout(payload));
  PayloadInfo info;
  info.codec = l.codec;
  info.numel = l.numel;
  if (IsBlockCodec(l.codec)) info.block_size = static_cast<uint32_t>(l.param);
  if (l.codec == v1::CODEC_TOPK) info.entries = l.param;
  if (l.codec == v1::CODEC_SEED_SCALARS) info.seed_kind = static_cast<SeedScalarKind>(l.param);
  return info;
}

absl::Status DecodeDenseAdd(std::string_view payload, float weight, std::span<float> accumulator) {
  if (!std::isfinite(weight)) return Invalid(StrCat("weight ", weight, " is not finite"));
  SEEDLING_ASSIGN_OR_RETURN(const Layout l, ParseLayout(payload));
  if (!IsDenseCodec(l.codec)) {
    return Invalid(StrCat("codec ", CodecName(l.codec), " is not a dense update codec"));
  }
  if (l.numel != accumulator.size()) {
    return Invalid(
        StrCat("payload numel ", l.numel, " does not match the accumulator's ", accumulator.size(), " elements"));
  }
  SEEDLING_RETURN_IF_ERROR(ValidateDense(l));
  ApplyDense(l, AddSink{accumulator.data(), weight});
  return absl::OkStatus();
}

namespace {

// ---- Squared norms of validated data ----
// Eight independent double lanes (so the loop vectorizes and is not bound by the latency of one add chain).

constexpr size_t kLanes = 8;

template <typename Load>
double LaneSumSquares(uint64_t n, Load load) {
  double lanes[kLanes] = {};
  uint64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) {
      const double v = load(i + j);
      lanes[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = load(i);
    lanes[0] += v * v;
  }
  double total = 0;
  for (double lane : lanes) total += lane;
  return total;
}

double BlocksSquaredNorm(const Layout& l) {
  const bool int8 = l.codec == v1::CODEC_INT8;
  const uint8_t* scales = l.data;
  const uint8_t* values = l.data + 4 * l.num_blocks;
  double total = 0;
  for (uint64_t b = 0; b < l.num_blocks; ++b) {
    const double step = LoadF32(scales + 4 * b) / (int8 ? kInt8Levels : kInt4Levels);
    const uint64_t begin = b * l.param, end = std::min(l.numel, begin + l.param);
    int64_t codes2 = 0;  // exact: at most 127² per element, 2^32 elements per block
    if (int8) {
      const auto* q = reinterpret_cast<const int8_t*>(values);
      for (uint64_t i = begin; i < end; ++i) codes2 += int32_t{q[i]} * int32_t{q[i]};
    } else {
      for (uint64_t i = begin; i < end; ++i) {
        const uint8_t byte = values[i / 2];
        const int nib = (i % 2 == 0) ? (byte & 0x0f) : (byte >> 4);
        const int code = nib >= 8 ? nib - 16 : nib;
        codes2 += code * code;
      }
    }
    total += step * step * static_cast<double>(codes2);
  }
  return total;
}

// The fused scans below come from internal::BestKernels() (AVX2 + F16C where the CPU has them, the
// portable loops otherwise; both give the same bits). A non-finite fp32 value makes the lane sums
// non-finite (finite values cannot: 2^64 squares of at most 2^256 stay far below the double range), so
// the fused scan only runs the validator to name the culprit; likewise for fp16 and int8.
absl::StatusOr<double> CheckedSquaredNorm(const Layout& l) {
  const internal::DenseKernels& k = internal::BestKernels();
  const uint8_t* d = l.data;
  double norm2 = 0;
  switch (l.codec) {
    case v1::CODEC_FP32:
      norm2 = k.fp32_sum_squares(d, l.numel);
      if (!std::isfinite(norm2)) SEEDLING_RETURN_IF_ERROR(ValidateFp32(l));
      break;
    case v1::CODEC_FP16: {
      // An exponent-31 half (inf or NaN) shows in the largest magnitude bits.
      uint16_t max_bits = 0;
      norm2 = k.fp16_sum_squares(d, l.numel, &max_bits);
      if (max_bits >= kHalfExpMask || !std::isfinite(norm2)) SEEDLING_RETURN_IF_ERROR(ValidateFp16(l));
      break;
    }
    case v1::CODEC_INT8:
      if (!k.int8_validate_norm(d, reinterpret_cast<const int8_t*>(d + 4 * l.num_blocks), l.numel, l.param,
                                l.num_blocks, &norm2)) {
        SEEDLING_RETURN_IF_ERROR(ValidateBlocks(l));
      }
      break;
    case v1::CODEC_INT4:
      SEEDLING_RETURN_IF_ERROR(ValidateBlocks(l));
      norm2 = BlocksSquaredNorm(l);
      break;
    case v1::CODEC_TOPK:
      SEEDLING_RETURN_IF_ERROR(ValidateTopK(l));
      norm2 = LaneSumSquares(l.param, [d](uint64_t e) { return double{LoadF32(d + 8 * e + 4)}; });
      break;
    default:
      return Invalid(StrCat("codec ", CodecName(l.codec), " is not a dense update codec"));
  }
  if (!std::isfinite(norm2)) {
    return absl::InternalError(StrCat("validated ", CodecName(l.codec), " payload has norm² ", norm2));
  }
  return norm2;
}

struct AddDoubleSink {
  double* acc;
  double weight;
  void operator()(uint64_t i, float v) const { acc[i] += weight * static_cast<double>(v); }
};

}  // namespace

absl::StatusOr<ValidatedDense> ValidateDensePayload(std::string_view payload) {
  SEEDLING_ASSIGN_OR_RETURN(const Layout l, ParseLayout(payload));
  SEEDLING_ASSIGN_OR_RETURN(const double norm2, CheckedSquaredNorm(l));
  ValidatedDense v;
  v.codec_ = l.codec;
  v.numel_ = l.numel;
  v.param_ = l.param;
  v.num_blocks_ = l.num_blocks;
  v.data_ = l.data;
  v.squared_norm_ = norm2;
  return v;
}

std::string_view DenseKernelName() { return internal::BestKernels().name; }

absl::Status ValidatedDense::AddTo(std::span<double> accumulator, double weight) const {
  if (!std::isfinite(weight)) return Invalid(StrCat("weight ", weight, " is not finite"));
  if (accumulator.size() != numel_) {
    return Invalid(
        StrCat("payload numel ", numel_, " does not match the accumulator's ", accumulator.size(), " elements"));
  }
  Layout l;
  l.codec = codec_;
  l.numel = numel_;
  l.param = param_;
  l.num_blocks = num_blocks_;
  l.data = data_;
  const internal::DenseKernels& k = internal::BestKernels();
  switch (codec_) {
    case v1::CODEC_FP32:
      k.fp32_add(data_, numel_, weight, accumulator.data());
      break;
    case v1::CODEC_FP16:
      k.fp16_add(data_, numel_, weight, accumulator.data());
      break;
    case v1::CODEC_INT8:
      k.int8_add(data_, reinterpret_cast<const int8_t*>(data_ + 4 * num_blocks_), numel_, param_, num_blocks_, weight,
                 accumulator.data());
      break;
    default:
      ApplyDense(l, AddDoubleSink{accumulator.data(), weight});
      break;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> DecodeDense(std::string_view payload) {
  SEEDLING_ASSIGN_OR_RETURN(const Layout l, ParseLayout(payload));
  if (!IsDenseCodec(l.codec)) {
    return Invalid(StrCat("codec ", CodecName(l.codec), " is not a dense update codec"));
  }
  SEEDLING_RETURN_IF_ERROR(ValidateDense(l));
  // Zero-initialized: top-k writes only the sent positions.
  std::vector<float> out(l.numel);
  ApplyDense(l, StoreSink{out.data()});
  return out;
}

std::string EncodeSeedIndexScalars(std::span<const SeedIndexScalar> pairs) {
  std::string payload(kPayloadHeaderBytes + 8 * pairs.size(), '\0');
  auto* p = reinterpret_cast<uint8_t*>(payload.data());
  WriteHeader(p, v1::CODEC_SEED_SCALARS, pairs.size(), static_cast<uint64_t>(SeedScalarKind::kIndex));
  uint8_t* d = p + kPayloadHeaderBytes;
  for (const SeedIndexScalar& pair : pairs) {
    StoreLe<uint32_t>(d, pair.index);
    StoreF32(d + 4, pair.value);
    d += 8;
  }
  return payload;
}

std::string EncodeSeedValueScalars(std::span<const SeedValueScalar> pairs) {
  std::string payload(kPayloadHeaderBytes + 12 * pairs.size(), '\0');
  auto* p = reinterpret_cast<uint8_t*>(payload.data());
  WriteHeader(p, v1::CODEC_SEED_SCALARS, pairs.size(), static_cast<uint64_t>(SeedScalarKind::kSeed));
  uint8_t* d = p + kPayloadHeaderBytes;
  for (const SeedValueScalar& pair : pairs) {
    StoreLe<uint64_t>(d, pair.seed);
    StoreF32(d + 8, pair.value);
    d += 12;
  }
  return payload;
}

absl::StatusOr<std::vector<SeedIndexScalar>> DecodeSeedIndexScalars(std::string_view payload, uint32_t pool_size) {
  SEEDLING_ASSIGN_OR_RETURN(const Layout l, ParseSeedLayout(payload, SeedScalarKind::kIndex));
  const uint8_t* d = l.data;
  for (uint64_t i = 0; i < l.numel; ++i) {
    const uint32_t index = LoadLe<uint32_t>(d + 8 * i);
    if (index >= pool_size) {
      return Invalid(StrCat("seed index ", index, " at pair ", i, " is out of the pool (size ", pool_size, ")"));
    }
    if (!IsFiniteBits(LoadLe<uint32_t>(d + 8 * i + 4))) {
      return Invalid(StrCat("seed scalar value at pair ", i, " is not finite (", LoadF32(d + 8 * i + 4), ")"));
    }
  }
  std::vector<SeedIndexScalar> pairs(l.numel);
  for (uint64_t i = 0; i < l.numel; ++i) {
    pairs[i].index = LoadLe<uint32_t>(d + 8 * i);
    pairs[i].value = LoadF32(d + 8 * i + 4);
  }
  return pairs;
}

absl::StatusOr<std::vector<SeedValueScalar>> DecodeSeedValueScalars(std::string_view payload) {
  SEEDLING_ASSIGN_OR_RETURN(const Layout l, ParseSeedLayout(payload, SeedScalarKind::kSeed));
  const uint8_t* d = l.data;
  for (uint64_t i = 0; i < l.numel; ++i) {
    if (!IsFiniteBits(LoadLe<uint32_t>(d + 12 * i + 8))) {
      return Invalid(StrCat("seed scalar value at pair ", i, " is not finite (", LoadF32(d + 12 * i + 8), ")"));
    }
  }
  std::vector<SeedValueScalar> pairs(l.numel);
  for (uint64_t i = 0; i < l.numel; ++i) {
    pairs[i].seed = LoadLe<uint64_t>(d + 12 * i);
    pairs[i].value = LoadF32(d + 12 * i + 8);
  }
  return pairs;
}

std::string_view CodecName(v1::Codec codec) {
  switch (codec) {
    case v1::CODEC_FP32:
      return "fp32";
    case v1::CODEC_FP16:
      return "fp16";
    case v1::CODEC_INT8:
      return "int8";
    case v1::CODEC_INT4:
      return "int4";
    case v1::CODEC_TOPK:
      return "topk";
    case v1::CODEC_SEED_SCALARS:
      return "seed-scalars";
    default:
      return "unspecified";
  }
}

absl::StatusOr<v1::Codec> ParseCodecName(std::string_view name) {
  for (v1::Codec codec :
       {v1::CODEC_FP32, v1::CODEC_FP16, v1::CODEC_INT8, v1::CODEC_INT4, v1::CODEC_TOPK, v1::CODEC_SEED_SCALARS}) {
    if (name == CodecName(codec)) return codec;
  }
  return absl::InvalidArgumentError(
      StrCat("unknown codec '", name, "' (expected fp32, fp16, int8, int4, topk or seed-scalars)"));
}

}  // namespace seedling::comms
