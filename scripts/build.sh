#!/usr/bin/env bash
# Configures and builds Seedling (Release, Ninja, ccache when present) into ${SEEDLING_BUILD_DIR:-build}.
# Used by demo.sh and test.sh; extra arguments go to the CMake configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${SEEDLING_BUILD_DIR:-build}"
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
fi
cmake --build "$BUILD_DIR"
