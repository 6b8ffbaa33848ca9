// Standalone check (no LibTorch, no Catch2) that the SIMD row decoders of model/internal/quant_kernels.h equal
// the portable ones bit for bit. Built for ARM64 by scripts/check-neon.sh and run under qemu-user, so the NEON
// versions are exercised on an x86-64 host; tests/model/quant_test.cpp covers the host's own SIMD version.
// Exits 0 when they agree, 1 (naming the decoder) when they do not, 2 when the CPU has no SIMD version.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "model/internal/quant_kernels.h"

namespace {

using seedling::model::internal::QuantKernels;

bool Same(const std::vector<float>& a, const std::vector<float>& b) {
  return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Every 16-bit pattern (plus a tail) through f16 and bf16.
bool CheckHalves(const QuantKernels& simd, const QuantKernels& portable) {
  std::vector<uint16_t> all(65536 + 5);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i * 40503u);
  std::vector<float> a(all.size()), b(all.size());
  const auto n = static_cast<int64_t>(all.size());
  portable.f16_to_f32(all.data(), n, a.data());
  simd.f16_to_f32(all.data(), n, b.data());
  if (!Same(a, b)) return std::fprintf(stderr, "f16 decoders differ\n"), false;
  portable.bf16_to_f32(all.data(), n, a.data());
  simd.bf16_to_f32(all.data(), n, b.data());
  if (!Same(a, b)) return std::fprintf(stderr, "bf16 decoders differ\n"), false;
  return true;
}

// Blocks of pseudo-random bytes with finite scales.
bool CheckBlocks(const QuantKernels& simd, const QuantKernels& portable) {
  const int64_t blocks = 257;
  std::vector<uint8_t> raw(static_cast<size_t>(blocks * 34));
  uint32_t state = 12345;
  for (uint8_t& byte : raw) {
    state = state * 1664525u + 1013904223u;
    byte = static_cast<uint8_t>(state >> 24);
  }
  std::vector<float> a(static_cast<size_t>(blocks * 32)), b(a.size());
  for (int64_t i = 0; i < blocks; ++i) raw[static_cast<size_t>(i * 34 + 1)] &= 0x7b;  // exponent below 31
  portable.q8_0_to_f32(raw.data(), blocks, a.data());
  simd.q8_0_to_f32(raw.data(), blocks, b.data());
  if (!Same(a, b)) return std::fprintf(stderr, "q8_0 decoders differ\n"), false;
  for (int64_t i = 0; i < blocks; ++i) raw[static_cast<size_t>(i * 18 + 1)] &= 0x7b;
  portable.q4_0_to_f32(raw.data(), blocks, a.data());
  simd.q4_0_to_f32(raw.data(), blocks, b.data());
  if (!Same(a, b)) return std::fprintf(stderr, "q4_0 decoders differ\n"), false;
  return true;
}

}  // namespace

int main() {
  const QuantKernels* simd = seedling::model::internal::SimdQuantKernels();
  if (simd == nullptr) {
    std::fprintf(stderr, "this CPU has no SIMD decoders\n");
    return 2;
  }
  const QuantKernels& portable = seedling::model::internal::PortableQuantKernels();
  if (!CheckHalves(*simd, portable) || !CheckBlocks(*simd, portable)) return 1;
  std::printf("%s decoders equal the portable ones bit for bit\n", simd->name);
  return 0;
}
