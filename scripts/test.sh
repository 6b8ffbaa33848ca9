#!/usr/bin/env bash
# Installs missing packages, checks the formatting, builds, and runs every test (CTest over the Catch2 test cases),
# then the SDK as an app links it: a SEEDLING_CLIENT_ONLY build of libseedling_client.so and its checks
# (scripts/client-only.sh; SEEDLING_SKIP_CLIENT_ONLY=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/format.sh --check
scripts/build.sh
BUILD_DIR="${SEEDLING_BUILD_DIR:-build}"
# One thread per test process, tests in parallel across the cores.
(cd "$BUILD_DIR" && OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ctest --output-on-failure -j "$(nproc)" "$@")
if [ "${SEEDLING_SKIP_CLIENT_ONLY:-0}" != 1 ]; then
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 scripts/client-only.sh
fi
