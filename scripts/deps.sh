#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages Seedling builds against, if any are missing. Idempotent and quiet when
# everything is present; needs root (or password-less sudo) only when something must be installed.
set -euo pipefail

PACKAGES=(
  cmake ninja-build ccache g++ pkg-config
  libtorch-dev libopenblas0-pthread          # LibTorch; OpenBLAS or LibTorch falls back to reference BLAS (~50x slower)
  libboost1.81-dev libssl-dev libprotobuf-dev protobuf-compiler
  catch2 libabsl-dev nlohmann-json3-dev libpcre2-dev libsentencepiece-dev libicu-dev
  libsqlite3-dev libcli11-dev libspdlog-dev libtomlplusplus-dev
  libopenmpi-dev openmpi-bin libbenchmark-dev
  libgoogle-perftools-dev                     # tcmalloc for the programs: less heap fragmentation in training
  clang-format                                # scripts/format.sh --check, the first step of scripts/test.sh
  default-jdk-headless                        # the JVM binding (bindings/jvm) and its host-JVM tests
  g++-aarch64-linux-gnu qemu-user-static      # ctest "arm64: ...": the NEON decoders cross-compiled, run under qemu
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO="sudo"
    else
      echo "scripts/deps.sh: these packages are missing: ${missing[*]}" >&2
      echo "scripts/deps.sh: run as root (or install them: apt-get install ${missing[*]})" >&2
      exit 1
    fi
  fi
  echo "scripts/deps.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# LibTorch must pick up OpenBLAS through the libblas.so.3 alternative.
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || true)
if [ -n "$blas" ] && [[ "$blas" != *openblas* ]]; then
  echo "scripts/deps.sh: warning: libblas.so.3 points at $blas, not OpenBLAS; GEMM will be very slow." >&2
  echo "scripts/deps.sh: fix with: update-alternatives --config libblas.so.3-x86_64-linux-gnu" >&2
fi
