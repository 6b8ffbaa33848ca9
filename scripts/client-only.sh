#!/usr/bin/env bash
# The SDK as an app links it: a SEEDLING_CLIENT_ONLY build in ${SEEDLING_CLIENT_BUILD_DIR:-build-client}
# (libseedling_client.so, examples/client_c linked against it, the JVM binding), then
# tests/client/shared_library_test.sh: the library exports only the seedling_* C functions, and the C example
# and the JVM binding's tests run against `seedling serve` from the main build (${SEEDLING_BUILD_DIR:-build},
# built first by scripts/build.sh).
# scripts/test.sh runs it after ctest; extra arguments go to the CMake configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${SEEDLING_BUILD_DIR:-build}"
CLIENT_DIR="${SEEDLING_CLIENT_BUILD_DIR:-build-client}"
if [ ! -f "$CLIENT_DIR/build.ninja" ]; then
  cmake -S . -B "$CLIENT_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEEDLING_CLIENT_ONLY=ON \
    -DSEEDLING_BUILD_TESTS=OFF -DSEEDLING_BUILD_BENCH=OFF "$@" >/dev/null
fi
cmake --build "$CLIENT_DIR"
tests/client/shared_library_test.sh "$CLIENT_DIR" "$BUILD_DIR/bin/seedling" "$CLIENT_DIR/shared_library_test" "$PWD"
