#!/usr/bin/env bash
# Runs clang-tidy (.clang-tidy: bugprone-*, a few performance checks, function size) over C++ sources, using the
# build's compile_commands.json (scripts/build.sh writes it).
#   scripts/tidy.sh                 the .cpp files changed since origin/main (or HEAD~1 without a remote)
#   scripts/tidy.sh FILE...         these files
#   scripts/tidy.sh --all           every .cpp file (slow: LibTorch headers make each file take seconds)
# Not part of CI: GCC builds the project, and clang-tidy parses LibTorch's headers slowly.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${SEEDLING_BUILD_DIR:-build}"
CLANG_TIDY="${CLANG_TIDY:-clang-tidy}"
if ! command -v "$CLANG_TIDY" >/dev/null 2>&1; then
  echo "scripts/tidy.sh: $CLANG_TIDY not found (apt-get install clang-tidy)" >&2
  exit 1
fi
if [ ! -f "$BUILD_DIR/compile_commands.json" ]; then
  echo "scripts/tidy.sh: no $BUILD_DIR/compile_commands.json; run scripts/build.sh first" >&2
  exit 1
fi
if [ "${1:-}" = "--all" ]; then
  mapfile -t files < <(git ls-files '*.cpp' | grep -v '^tests/fuzz/')
elif [ $# -gt 0 ]; then
  files=("$@")
else
  base=$(git rev-parse --verify -q origin/main || git rev-parse HEAD~1)
  mapfile -t files < <(git diff --name-only --diff-filter=AM "$base" -- '*.cpp')
fi
if [ ${#files[@]} -eq 0 ]; then
  echo "scripts/tidy.sh: no files to check"
  exit 0
fi
"$CLANG_TIDY" -p "$BUILD_DIR" --quiet "${files[@]}"
