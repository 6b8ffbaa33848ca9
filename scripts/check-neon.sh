#!/usr/bin/env bash
# Cross-compiles the weight decoders (model/internal/quant_kernels.cpp) for ARM64 and runs their check under
# qemu-user, so the NEON versions are tested on an x86-64 host. Installs g++-aarch64-linux-gnu and
# qemu-user-static when missing (as root). The whole ARM64 SDK build is a separate, larger job.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/check-neon.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The same check ctest runs ("arm64: NEON decoders equal the portable ones").
exec tests/model/quant_kernels_arm64_test.sh "$PWD" "${SEEDLING_BUILD_DIR:-build}/arm64-check"
