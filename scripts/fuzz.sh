#!/usr/bin/env bash
# Fuzzes one target of tests/fuzz/ with libFuzzer (clang, AddressSanitizer + UndefinedBehaviorSanitizer).
#
#   scripts/fuzz.sh --list            the targets
#   scripts/fuzz.sh TARGET SECONDS [libFuzzer flags...]
#
# Builds in its own directory (SEEDLING_FUZZ_BUILD_DIR, default build-fuzz/) with -DSEEDLING_FUZZ=ON, tcmalloc
# off (the sanitizers need the system allocator), no benchmarks and no precompiled LibTorch header (clang's
# -fpch-instantiate-templates rejects it), then runs the target for SECONDS on a
# working corpus (build-fuzz/corpus/TARGET, seeded from tests/fuzz/corpus/TARGET, which is only read).
# Prints the executions and the path of any crash file (build-fuzz/artifacts/TARGET/); to keep a crash,
# copy it into tests/fuzz/corpus/TARGET/ and fix the parser.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
FUZZ_DIR="$ROOT/tests/fuzz"

targets() { for f in "$FUZZ_DIR"/*_fuzz.cpp; do basename "$f" _fuzz.cpp; done; }
if [[ "${1:-}" == "--list" ]]; then
  targets
  exit 0
fi
if [[ $# -lt 2 || "${1:-}" == -* ]]; then
  echo "usage: scripts/fuzz.sh --list | TARGET SECONDS [libFuzzer flags...]" >&2
  exit 2
fi
TARGET="$1"
SECONDS_TO_RUN="$2"
shift 2
if [[ ! -f "$FUZZ_DIR/${TARGET}_fuzz.cpp" ]]; then
  echo "fuzz.sh: unknown target '$TARGET'; known: $(targets | tr '\n' ' ')" >&2
  exit 2
fi
if ! [[ "$SECONDS_TO_RUN" =~ ^[0-9]+$ ]]; then
  echo "fuzz.sh: SECONDS must be a whole number, got '$SECONDS_TO_RUN'" >&2
  exit 2
fi

if ! command -v clang++ >/dev/null 2>&1; then
  echo "fuzz.sh: needs clang with libFuzzer (Debian: apt-get install clang)" >&2
  exit 1
fi

BUILD_DIR="${SEEDLING_FUZZ_BUILD_DIR:-$ROOT/build-fuzz}"
SANITIZE="-fsanitize=address,undefined,fuzzer-no-link -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_C_FLAGS="$SANITIZE" -DCMAKE_CXX_FLAGS="$SANITIZE" \
  -DSEEDLING_FUZZ=ON -DSEEDLING_TCMALLOC=OFF -DSEEDLING_BUILD_BENCH=OFF -DSEEDLING_USE_PCH=OFF >/dev/null
nice ninja -C "$BUILD_DIR" "seedling_fuzz_$TARGET"

WORK="$BUILD_DIR/corpus/$TARGET"
ARTIFACTS="$BUILD_DIR/artifacts/$TARGET"
mkdir -p "$WORK" "$ARTIFACTS"
LOG="$BUILD_DIR/fuzz-$TARGET.log"
set +e
ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}" \
  nice "$BUILD_DIR/tests/fuzz/seedling_fuzz_$TARGET" -max_total_time="$SECONDS_TO_RUN" -print_final_stats=1 \
  -artifact_prefix="$ARTIFACTS/" "$@" "$WORK" "$FUZZ_DIR/corpus/$TARGET" 2>&1 | tee "$LOG" | grep -v '^#[0-9]'
STATUS=${PIPESTATUS[0]}
set -e
echo "---"
echo "target:     $TARGET"
echo "executions: $(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$LOG" | grep -oE '[0-9]+$' || echo '?')"
echo "seconds:    $(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$LOG" | grep -oE '[0-9]+ second' | grep -oE '[0-9]+' || echo "$SECONDS_TO_RUN (stopped early)")"
CRASHES=$(grep -oE "(Test unit|artifact_prefix.*; Test unit) written to [^ ]+" "$LOG" | awk '{print $NF}' || true)
if [[ -n "$CRASHES" ]]; then
  # crash-, leak-, oom- and timeout- files are findings; a slow-unit- file can also be a stall of a busy machine
  # (re-run it alone: build-fuzz/tests/fuzz/seedling_fuzz_TARGET FILE).
  echo "artifacts:"
  echo "$CRASHES" | sort -u | sed 's/^/  /'
else
  echo "artifacts: none"
fi
exit "$STATUS"
