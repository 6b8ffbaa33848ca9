#!/usr/bin/env bash
# The SDK for ARM64 phones, built and tested on an x86-64 Debian bookworm host: the client-only build
# (libseedling_client.so, examples/client_c, the client-side tests) cross-compiled with Debian's aarch64
# toolchain against an arm64 bookworm sysroot, and run under qemu-user. Needs root (apt-get, mmdebstrap).
#
# Usage: scripts/cross-arm64.sh [stage...]     stages, in order (default: all of them):
#   deps       host packages: g++-aarch64-linux-gnu, qemu-user-static, mmdebstrap, protobuf-compiler, ...
#   sysroot    an arm64 bookworm tree in $SEEDLING_ARM64_SYSROOT (default build-arm64/sysroot) holding the
#              arm64 -dev packages of cmake/SeedlingDeps.cmake. LibTorch's arm64 package cannot be installed
#              beside the host's amd64 one (apt removes the host's), hence a separate tree, never multiarch.
#   configure  build-arm64 (SEEDLING_ARM64_BUILD_DIR) with cmake/aarch64-linux-gnu.cmake, client-only
#   build      libseedling_client.so and client_c, then the rest: the client-side tests, fuzz corpus replays
#   test       under qemu: the NEON decoder check, the client-side Catch2 tests (ctest), and examples/client_c
#              (arm64) completing a round against the host's `seedling serve` (needs build/bin/seedling)
# Every compile runs under `nice -n 19`. Each stage prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
build="${SEEDLING_ARM64_BUILD_DIR:-build-arm64}"
sysroot="${SEEDLING_ARM64_SYSROOT:-$build/sysroot}"
host_build="${SEEDLING_BUILD_DIR:-build}"
mirror="${SEEDLING_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${SEEDLING_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

# The arm64 packages cmake/SeedlingDeps.cmake finds in a client-only build (scripts/deps.sh's list without
# the server's, the tools and the JDK), plus the C/C++ runtime headers the cross compiler reads from the tree.
SYSROOT_PACKAGES=(
  libc6-dev libstdc++-12-dev
  libtorch-dev libopenblas0-pthread
  libabsl-dev libspdlog-dev nlohmann-json3-dev libtomlplusplus-dev
  libssl-dev libprotobuf-dev libboost1.81-dev
  libpcre2-dev libsentencepiece-dev libicu-dev
  catch2
)
HOST_PACKAGES=(
  g++-aarch64-linux-gnu qemu-user-static mmdebstrap  # qemu is called by name: binfmt_misc is not needed
  cmake ninja-build pkg-config protobuf-compiler  # protoc runs on the host; its 3.21 matches the tree's libprotobuf
)

log() { echo "cross-arm64: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}
# timed <stage> <function>: runs a stage and prints its wall-clock time.
timed() {
  local start=$SECONDS
  log "stage $1"
  "$2"
  log "stage $1 took $((SECONDS - start)) s"
}

stage_deps() {
  local missing=() p
  for p in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "run as root to install ${missing[*]}"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

stage_sysroot() {
  if [ -f "$sysroot/.seedling-sysroot-complete" ]; then
    log "$sysroot is complete (remove it to rebuild)"
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "mmdebstrap needs root"
  rm -rf "$sysroot"
  mkdir -p "$(dirname "$sysroot")"
  # The extract variant unpacks the packages and their dependencies without running a maintainer script, so
  # no arm64 code runs and no binfmt_misc registration is needed (containers often have none). What the
  # scripts would have done for a sysroot (the BLAS alternative) is done below.
  local include
  include=$(
    IFS=,
    echo "${SYSROOT_PACKAGES[*]}"
  )
  nice -n 19 mmdebstrap --variant=extract --arch=arm64 --include="$include" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$sysroot" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb $security_mirror bookworm-security main"
  # Absolute symlinks (libfoo.so -> /lib/aarch64-linux-gnu/libfoo.so.1) would resolve into the host's root:
  # make them relative to the tree.
  local link target
  while IFS= read -r -d '' link; do
    target=$(readlink "$link")
    ln -sfnr "$sysroot$target" "$link"
  done < <(find "$sysroot" -type l -lname '/*' -print0)
  # update-alternatives never ran: point libblas.so.3 / liblapack.so.3 (LibTorch's) and libopenblas.so.0
  # (theirs) at OpenBLAS (pthread), as on the host; reference BLAS is ~50x slower.
  local libdir="$sysroot/usr/lib/aarch64-linux-gnu" lib
  for lib in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
    [ -e "$libdir/openblas-pthread/$lib" ] || die "no $libdir/openblas-pthread/$lib (libopenblas0-pthread:arm64)"
    ln -sfn "openblas-pthread/$lib" "$libdir/$lib"
  done
  touch "$sysroot/.seedling-sysroot-complete"
  du -sh "$sysroot" >&2
}

stage_configure() {
  [ -f "$sysroot/.seedling-sysroot-complete" ] || die "no sysroot in $sysroot: run the sysroot stage first"
  # No JDK in the tree: the JVM binding is skipped (its JNI shim is host-tested by scripts/client-only.sh).
  nice -n 19 cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$repo/cmake/aarch64-linux-gnu.cmake" -DSEEDLING_ARM64_SYSROOT="$(realpath "$sysroot")" \
    -DSEEDLING_CLIENT_ONLY=ON -DSEEDLING_BUILD_BENCH=OFF -DSEEDLING_BUILD_TESTS=ON -DSEEDLING_TCMALLOC=OFF
}

stage_build() {
  local start=$SECONDS
  nice -n 19 cmake --build "$build" --target seedling_client_shared client_c
  log "libseedling_client.so and client_c built in $((SECONDS - start)) s"
  local lib
  lib=$(find "$build" -name 'libseedling_client.so*' -type f | head -n 1)
  [ -n "$lib" ] || die "no libseedling_client.so in $build"
  aarch64-linux-gnu-strip -o "$build/libseedling_client.stripped.so" "$lib"
  log "$lib (arm64): $(stat -c %s "$lib") bytes, $(stat -c %s "$build/libseedling_client.stripped.so") stripped"
  start=$SECONDS
  nice -n 19 cmake --build "$build"
  log "the rest (client-side test executables, fuzz corpus replays) built in $((SECONDS - start)) s"
}

stage_test() {
  local failed=0 start=$SECONDS
  tests/model/quant_kernels_arm64_test.sh "$repo" "$build/arm64-check" || failed=1
  log "NEON decoder check: $([ $failed -eq 0 ] && echo passed || echo FAILED) ($((SECONDS - start)) s)"
  start=$SECONDS
  # ctest runs each test through CMAKE_CROSSCOMPILING_EMULATOR (qemu-aarch64-static -L <sysroot>);
  # SEEDLING_ARM64_CTEST_ARGS narrows the run (e.g. "-R ^(quant|codec):"), default every client-side test.
  local ctest_args=()
  read -r -a ctest_args <<< "${SEEDLING_ARM64_CTEST_ARGS:-}"
  (cd "$build" && nice -n 19 ctest --output-on-failure -j1 --timeout 900 "${ctest_args[@]}") || failed=1
  log "client-side Catch2 tests under qemu: $((SECONDS - start)) s"
  start=$SECONDS
  if [ -x "$host_build/bin/seedling" ]; then
    # federation_cli_test.sh runs its 5th argument as the client_c program: an arm64 one, through qemu.
    local wrapper="$build/client_c_qemu"
    printf '#!/bin/sh\nexec qemu-aarch64-static -L "%s" "%s" "$@"\n' "$(realpath "$sysroot")" \
      "$(realpath "$build/bin/client_c")" > "$wrapper"
    chmod +x "$wrapper"
    if tests/apps/federation_cli_test.sh client-c "$(realpath "$host_build/bin/seedling")" \
      "$(realpath "$build")/federation_cli" "$repo" "$(realpath "$wrapper")"; then
      log "arm64 client_c completed a round against the host's seedling serve ($((SECONDS - start)) s)"
    else
      log "arm64 client_c against the host's seedling serve FAILED ($((SECONDS - start)) s)"
      failed=1
    fi
  else
    log "FAILED: no $host_build/bin/seedling for the client_c round (build the host first: scripts/build.sh)"
    failed=1
  fi
  return $failed
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(deps sysroot configure build test)
for stage in "${stages[@]}"; do
  case "$stage" in
    deps | sysroot | configure | build | test) timed "$stage" "stage_$stage" ;;
    *) die "unknown stage '$stage' (deps, sysroot, configure, build, test)" ;;
  esac
done
