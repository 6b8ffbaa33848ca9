#pragma once

// Constants of the GGUF v3 format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), shared
// by the writer (model/gguf.cpp) and the reader (model/gguf_reader.cpp).
//
// File layout: magic "GGUF", uint32 version (3), uint64 tensor count, uint64 metadata key-value count,
// the key-value pairs (key: uint64 length + bytes; uint32 value type; value), the tensor infos (name;
// uint32 n_dims; n_dims × uint64 ne, ne[0] varying fastest; uint32 ggml type; uint64 offset relative
// to the data section), padding to general.alignment (default 32), then the data section. Strings are
// uint64 length + UTF-8 bytes without a terminator; arrays are uint32 element type + uint64 count +
// elements. Everything is little-endian.

#include <cstdint>

namespace seedling::model::internal {

inline constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
inline constexpr uint32_t kGgufVersion = 3;
inline constexpr uint32_t kGgufDefaultAlignment = 32;
// ggml's GGML_MAX_NAME counts the terminating NUL.
inline constexpr uint64_t kGgufMaxTensorName = 63;
// ggml's GGML_MAX_DIMS.
inline constexpr uint32_t kGgufMaxDims = 4;

// gguf_type: the type of a metadata value.
enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// ggml_type: the element type of a tensor (the values Seedling reads or writes, plus the ones it
// names in errors).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

// general.file_type (llama_ftype) values.
inline constexpr uint32_t kFileTypeAllF32 = 0;
inline constexpr uint32_t kFileTypeMostlyF16 = 1;
inline constexpr uint32_t kFileTypeMostlyQ4_0 = 2;
inline constexpr uint32_t kFileTypeMostlyQ8_0 = 7;
inline constexpr uint32_t kFileTypeMostlyBF16 = 32;

}  // namespace seedling::model::internal
