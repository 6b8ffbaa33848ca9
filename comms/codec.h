#pragma once

// Update codecs: how a device's update (a flat fp32 vector, the change of its trainable parameters) or its
// seed-method result travels to the server.
//
//   fp32, fp16             dense, exact / rounded to nearest
//   int8, int4             blockwise: per block of `block_size` values one fp32 scale = max |x|, values
//                          quantized with stochastic rounding so that E[decode(encode(x))] = x (unbiased);
//                          the rounding draws come from a Philox stream seeded by the caller
//   top-k                  the k largest |x| as (index, value) pairs; what is left out is kept by the client
//                          in an ErrorFeedback residual and added to the next round's update (Stich et al.)
//   seed scalars           (seed index, scalar) pairs for FedKSeed, (seed, scalar) pairs for FwdLLM
//
// Every payload starts with a header (magic "SDLU", format version, codec, element count, parameters) so
// a decoder never trusts a length it has not checked. Decoders validate everything (header, lengths, block
// counts, indices in range and strictly increasing, finite scales and values) and return InvalidArgument
// with what was wrong, leaving outputs untouched on error. Nothing here depends on LibTorch.
//
// Payload format, version 1. All integers and floats are little-endian; floats are IEEE binary32.
//
//   offset  size  field
//   0       4     magic "SDLU"
//   4       1     format version (1); any other is rejected
//   5       1     codec: a v1::Codec value (1 fp32 .. 6 seed scalars)
//   6       2     reserved, zero
//   8       8     numel (uint64): dense codecs: the vector's length; seed scalars: the number of pairs
//   16      8     parameter (uint64): int8/int4: block size B (1 .. 2^32 - 1, even for int4);
//                 top-k: entries k (<= numel); seed scalars: the pair kind (1 = index, 2 = seed);
//                 fp32/fp16: 0
//   24            data, exactly as long as the codec says (no trailing bytes):
//
//   codec   data                                                           size (bytes)
//   fp32    numel x f32                                                    24 + 4 n
//   fp16    numel x binary16 (round to nearest even; never inf or NaN)     24 + 2 n
//   int8    nb = ceil(n / B) x f32 scales, then n x int8 in [-127, 127]    24 + 4 nb + n
//   int4    nb x f32 scales, then ceil(n / 2) bytes of two's complement    24 + 4 nb + ceil(n / 2)
//           nibbles in [-7, 7]: element 2j in the low nibble of byte j,
//           element 2j+1 in the high nibble; an unused last high nibble is 0
//   top-k   k x (uint32 index, f32 value), indices strictly increasing,    24 + 8 k
//           < numel (so numel <= 2^32)
//   seeds   kind 1 (FedKSeed): n x (uint32 index, f32 value)               24 + 8 n
//           kind 2 (FwdLLM):   n x (uint64 seed, f32 value)                24 + 12 n
//
// Blockwise codecs: block b covers elements [bB, min((b+1)B, n)), so the last block may be partial. Its
// scale is s = max |x| over the block (0 for an all-zero block, whose values must then all be 0). Encoding
// computes y = x / s * L (L = 127 for int8, 7 for int4; |y| <= L exactly) and q = sign(y) (floor(|y|) +
// [u < frac(|y|)]), u = element i of the uniform stream (rounding_seed, kStochasticRoundingStream) of
// base/philox.h, i the element's index in the whole vector. So E[q] = y up to the 2^-24 resolution of u,
// which only matters for |y| < 1/2. Decoding gives q * (s / L), computed in fp32.
//
// Accepted values: every scale and every decoded value is finite; int8 -128 and the int4 nibble -8 are
// rejected (the encoder never writes them, and they would make the decoded range asymmetric). Seed pairs
// may repeat an index or seed (a FedKSeed client can draw the same seed at several steps) and come in any
// order; top-k entries may not.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comms/proto/seedling.pb.h"

namespace seedling::comms {

// A codec's name in server.toml, sim.toml, the dashboard and messages: "fp32", "fp16", "int8", "int4", "topk",
// "seed-scalars"; "unspecified" for any other value.
std::string_view CodecName(v1::Codec codec);
// Parses the names CodecName gives; InvalidArgument lists them.
absl::StatusOr<v1::Codec> ParseCodecName(std::string_view name);

struct CodecOptions {
  v1::Codec codec = v1::CODEC_FP32;
  uint32_t block_size = 64;     // int8 / int4: values per scale (even for int4)
  float topk_fraction = 0.01f;  // top-k: fraction of elements sent, at least 1
};

// Validates options (known codec, block size > 0 and even for int4, 0 < topk_fraction <= 1). Only the
// fields the codec uses are checked, so a CodecSpec for fp32 may leave block_size and topk_fraction at 0.
// CODEC_SEED_SCALARS is a valid option here (a task may ask for it) but EncodeDense refuses it.
absl::Status ValidateCodecOptions(const CodecOptions& options);

// Size of the fixed payload header (see the format above).
inline constexpr size_t kPayloadHeaderBytes = 24;

// Stream id of the stochastic-rounding draws (the key is (rounding_seed, this)). Far from the small ids in
// base/philox.h's rng_stream so a rounding seed that equals a perturbation seed still draws independently.
inline constexpr uint64_t kStochasticRoundingStream = 0x53444C5500000001ull;  // "SDLU" << 32 | 1

// Top-k entries sent for `numel` elements: min(numel, max(1, ceil(fraction * numel))). The product is
// taken in double with a relative slack of 2^-24, the precision of the float fraction, so that 0.1f of 10
// elements is 1 entry and not 2 (0.1f is slightly above 0.1).
uint64_t TopKCount(uint64_t numel, float fraction);

// Exact size in bytes of EncodeDense's output for a vector of `numel` elements (the table above), so a
// client can compare it with the task's max_update_bytes before encoding. InvalidArgument for invalid
// options, a non-dense codec, numel > 2^32 with top-k, or a size that overflows 64 bits.
absl::StatusOr<uint64_t> EncodedDenseSize(uint64_t numel, const CodecOptions& options);

// The residual a client keeps for top-k error feedback, across rounds. Serializable so it survives a
// restart in the client's state directory.
class ErrorFeedback {
 public:
  ErrorFeedback() = default;
  explicit ErrorFeedback(size_t numel) : residual_(numel, 0.0f) {}
  std::span<const float> residual() const { return residual_; }
  std::span<float> mutable_residual() { return residual_; }
  // Format: magic "SDLE", version byte (1), 3 zero bytes, numel (uint64 LE), numel x f32 LE.
  std::string Serialize() const;
  // InvalidArgument for a short or long buffer, wrong magic/version, nonzero reserved bytes, a numel that
  // does not match the size (checked before allocating), or a non-finite value.
  static absl::StatusOr<ErrorFeedback> Deserialize(std::string_view bytes);

 private:
  std::vector<float> residual_;
};

// Encodes a dense update. `rounding_seed` seeds stochastic rounding (int8/int4): the same (update,
// options, seed) always gives the same bytes. With top-k, `feedback` (required, of the update's length) is
// added before selection and receives what was not sent: v = update + residual; the k largest |v| (ties to
// the lower index) are sent; residual <- v with the sent positions set to 0. Other codecs ignore
// `feedback` and leave it untouched. The encoded size is the returned string's size (EncodedDenseSize).
// InvalidArgument, with `feedback` untouched, for invalid options, a seed-scalars codec, a non-finite
// update element (or residual, or their sum), a value that overflows fp16 (|x| >= 65520), and for top-k a
// missing or wrong-length `feedback` or more than 2^32 elements. Thread-compatible.
absl::StatusOr<std::string> EncodeDense(std::span<const float> update, const CodecOptions& options,
                                        uint64_t rounding_seed, ErrorFeedback* feedback = nullptr);

// What a seed-scalars payload holds (the header parameter).
enum class SeedScalarKind : uint8_t {
  kNone = 0,   // not a seed-scalars payload
  kIndex = 1,  // FedKSeed (uint32 pool index, f32 scalar)
  kSeed = 2,   // FwdLLM (uint64 seed, f32 scalar)
};

// Header fields of a payload, validated against its size.
struct PayloadInfo {
  v1::Codec codec = v1::CODEC_UNSPECIFIED;
  uint64_t numel = 0;  // dense: vector length; seed scalars: number of pairs
  uint32_t block_size = 0;
  uint64_t entries = 0;                              // top-k: pairs sent
  SeedScalarKind seed_kind = SeedScalarKind::kNone;  // seed scalars only
};
// Reads and validates only the header and the payload's size against it (O(1): the data is not read, so
// non-finite values or bad indices are found by the decoders, not here). InvalidArgument with the reason.
absl::StatusOr<PayloadInfo> InspectPayload(std::string_view payload);

// Decodes a dense payload and adds weight · update into `accumulator` (whose length must equal the
// payload's numel): the streaming server aggregates without materializing the update. Fully validated
// before anything is added. Non-finite decoded values are InvalidArgument.
// Each element becomes accumulator[i] + weight * decoded[i] in fp32 (bit-identical to adding DecodeDense's
// result), so overflow of the sum itself is the caller's to watch. InvalidArgument for a non-finite weight,
// a seed-scalars payload or a length mismatch too. Reads the payload twice (validate, then add); allocates
// nothing. Thread-compatible: concurrent calls need distinct accumulators.
absl::Status DecodeDenseAdd(std::string_view payload, float weight, std::span<float> accumulator);

// A dense payload that passed every check DecodeDense makes (header, size, finite scales and values, codes
// in range, top-k indices), with the squared L2 norm of its decoded values. It points into the payload's
// bytes, which must outlive it unchanged. The server's streaming path: one read of the payload validates
// it and measures its norm (for the norm cap), a second adds it, and nothing is materialized.
class ValidatedDense {
 public:
  v1::Codec codec() const { return codec_; }
  uint64_t numel() const { return numel_; }
  // Σ decoded[i]², summed in double in an order of the implementation's choosing; for int8/int4 computed
  // as Σ_b step_b² Σ q², which can differ from squaring the fp32-rounded decoded values in the last bits.
  double squared_norm() const { return squared_norm_; }

  // accumulator[i] += weight * double(decoded[i]) for every element the payload defines (top-k: the sent
  // ones), in element order. InvalidArgument, nothing added, for a non-finite weight or an accumulator
  // whose length is not numel(). Allocates nothing.
  absl::Status AddTo(std::span<double> accumulator, double weight) const;

 private:
  friend absl::StatusOr<ValidatedDense> ValidateDensePayload(std::string_view payload);
  v1::Codec codec_ = v1::CODEC_UNSPECIFIED;
  uint64_t numel_ = 0;
  uint64_t param_ = 0;
  uint64_t num_blocks_ = 0;
  const uint8_t* data_ = nullptr;
  double squared_norm_ = 0;
};

// Validates a dense payload completely (InvalidArgument with the reason, as DecodeDense) and measures it.
absl::StatusOr<ValidatedDense> ValidateDensePayload(std::string_view payload);

// Which implementation of ValidateDensePayload's and AddTo's fp32/fp16/int8 loops this process runs:
// "avx2+f16c" (x86-64 CPUs that have them, chosen at run time) or "portable". Both give the same bits;
// benchmarks print it next to their figures.
std::string_view DenseKernelName();

// Decodes into a fresh vector (tests, clients). Allocates numel floats after validation; for top-k that
// can be far more than the payload (numel up to 2^32 from 32 bytes), so code that decodes a peer's payload
// should check InspectPayload(payload)->numel against the length it expects, or use DecodeDenseAdd.
absl::StatusOr<std::vector<float>> DecodeDense(std::string_view payload);

// Seed-method results.
struct SeedIndexScalar {  // FedKSeed: index into the candidate pool
  uint32_t index = 0;
  float value = 0;
};
struct SeedValueScalar {  // FwdLLM: a full 64-bit seed
  uint64_t seed = 0;
  float value = 0;
};
// The encoders write the pairs as given, in order; they do not check values (their signatures cannot
// fail), so a client should drop non-finite steps before encoding: the decoders reject them.
std::string EncodeSeedIndexScalars(std::span<const SeedIndexScalar> pairs);
std::string EncodeSeedValueScalars(std::span<const SeedValueScalar> pairs);
// `pool_size`: indices must be < pool_size. Values must be finite. InvalidArgument also for a payload of
// another codec or of the other pair kind. The result has the payload's order (duplicates kept).
absl::StatusOr<std::vector<SeedIndexScalar>> DecodeSeedIndexScalars(std::string_view payload, uint32_t pool_size);
absl::StatusOr<std::vector<SeedValueScalar>> DecodeSeedValueScalars(std::string_view payload);

}  // namespace seedling::comms
