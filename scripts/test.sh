#!/usr/bin/env bash
# Installs missing packages, checks the formatting, builds, and runs every test (CTest over the Catch2 test cases).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/format.sh --check
scripts/build.sh
BUILD_DIR="${SEEDLING_BUILD_DIR:-build}"
cd "$BUILD_DIR"
# One thread per test process, tests in parallel across the cores.
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ctest --output-on-failure -j "$(nproc)" "$@"
