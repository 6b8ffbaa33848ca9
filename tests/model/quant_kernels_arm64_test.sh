#!/usr/bin/env bash
# ARM64 slice of the test suite: cross-compiles the weight decoders (model/internal/quant_kernels.cpp) and their
# standalone check (tests/model/quant_kernels_check.cpp, no LibTorch, no Catch2) with Debian's aarch64 cross
# compiler and runs the binary under qemu-user, so the NEON decoders are compared with the portable ones bit for
# bit on an x86-64 host. A few seconds; registered in ctest as "arm64: NEON decoders equal the portable ones".
# The cross compiler and qemu are in scripts/deps.sh's list: a missing one is a failure, never a skip.
# Usage: quant_kernels_arm64_test.sh <source dir> <work dir>
set -euo pipefail
src="$1"
work="$2"

cxx="${SEEDLING_ARM64_CXX:-aarch64-linux-gnu-g++}"
qemu=""
for candidate in qemu-aarch64-static qemu-aarch64; do
  if command -v "$candidate" >/dev/null 2>&1; then
    qemu="$candidate"
    break
  fi
done
missing=()
command -v "$cxx" >/dev/null 2>&1 || missing+=("$cxx (package g++-aarch64-linux-gnu)")
[ -n "$qemu" ] || missing+=("qemu-aarch64-static or qemu-aarch64 (package qemu-user-static or qemu-user)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "FAIL: the ARM64 check needs: ${missing[*]}; run scripts/deps.sh as root to install them" >&2
  exit 1
fi

mkdir -p "$work"
binary="$work/quant_kernels_check"
# Static, so qemu needs no ARM64 loader or libraries: the same binary runs on any x86-64 host.
"$cxx" -std=c++20 -O2 -Wall -Wextra -Werror -static -I"$src" \
  "$src/model/internal/quant_kernels.cpp" "$src/tests/model/quant_kernels_check.cpp" -o "$binary"
# An ELF header's e_machine (bytes 18-19) is 0xb7 0x00 for AArch64: make sure qemu really runs ARM64 code.
machine=$(od -An -tx1 -j18 -N2 "$binary" | tr -d ' \n')
if [ "$machine" != "b700" ]; then
  echo "FAIL: $binary is not an ARM64 executable (ELF e_machine bytes: $machine)" >&2
  exit 1
fi

# The check exits 0 when the decoders agree, 1 naming the one that differs, 2 without SIMD decoders; every
# ARM64 CPU has NEON, so only 0 with "neon" in its report passes.
status=0
output=$("$qemu" "$binary") || status=$?
echo "$output"
if [ "$status" -ne 0 ]; then
  echo "FAIL: $qemu $binary exited with $status (1: a NEON decoder differs, named above; 2: no SIMD decoders)" >&2
  exit 1
fi
if [[ "$output" != "neon decoders equal the portable ones bit for bit" ]]; then
  echo "FAIL: expected the NEON decoders to be checked, the check printed: $output" >&2
  exit 1
fi
