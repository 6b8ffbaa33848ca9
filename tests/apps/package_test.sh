#!/usr/bin/env bash
# The installed package: `cmake --install` into a fresh prefix, then examples/consumer (an app's own CMake
# project) configured with find_package(Seedling) against that prefix only, built, and run.
#
#   package_test.sh <build dir> <work dir> <repository>
set -uo pipefail
build="$1"; work="$2"; repo="$3"
fail() { echo "FAIL: $*" >&2; exit 1; }
rm -rf "$work" && mkdir -p "$work" || fail "cannot create $work"
prefix="$work/prefix"

cmake --install "$build" --prefix "$prefix" > "$work/install.log" 2>&1 || { cat "$work/install.log" >&2; fail "cmake --install"; }
for f in include/seedling/client/seedling_client.h include/seedling/client/client.h include/seedling/base/version.h \
         include/seedling/comms/proto/seedling.pb.h lib/cmake/Seedling/SeedlingConfig.cmake \
         lib/cmake/Seedling/SeedlingConfigVersion.cmake lib/libseedling_client.a lib/libseedling_spm_shim.so bin/seedling; do
  [ -e "$prefix/$f" ] || fail "not installed: $f"
done
# Nothing in the package may point back into the source or build tree.
if grep -rlE "$repo/|$(cd "$build" && pwd)/" "$prefix/lib/cmake/Seedling"; then fail "the CMake package names the build or source tree"; fi
version=$("$prefix/bin/seedling" --version) || fail "the installed seedling does not run"

# The consumer sees only the prefix (and the system's packages).
consumer="$work/consumer"
cmake -S "$repo/examples/consumer" -B "$consumer" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  > "$work/configure.log" 2>&1 || { tail -n 40 "$work/configure.log" >&2; fail "configuring examples/consumer"; }
cmake --build "$consumer" > "$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; fail "building examples/consumer"; }

# A config without a device id: both interfaces refuse it with the SDK's message.
out=$("$consumer/consumer" '{"state_dir": "/tmp/x", "model_dir": "/tmp/y"}') && fail "a config without device_id was accepted"
echo "$out" | grep -qx "$version" || fail "consumer printed another version than the installed seedling ($version): $out"
[ "$(echo "$out" | grep -c 'device_id is required')" -eq 2 ] || fail "expected the message from both interfaces: $out"
# A complete one (the installed seedling writes its model and CA): both accept it.
mkdir -p "$work/state"
"$prefix/bin/seedling" init-model --preset tiny --out "$work/model" > "$work/init.log" 2>&1 || fail "seedling init-model"
"$prefix/bin/seedling" certs init --dir "$work/certs" > "$work/certs.log" 2>&1 || fail "seedling certs init"
good=$(printf '{"device_id": "phone-1", "state_dir": "%s", "model_dir": "%s", "host": "127.0.0.1", "port": 1, "ca_file": "%s"}' \
  "$work/state" "$work/model" "$work/certs/ca.crt")
out=$("$consumer/consumer" "$good") || fail "a complete config was refused: $out"
echo "$out" | grep -qx "c++: ok, device phone-1" || fail "c++ API: $out"
echo "$out" | grep -qx "c: created" || fail "C interface: $out"

# A version the package does not promise is refused at configure time.
mkdir -p "$work/too-new"
sed 's/find_package(Seedling 0.1 REQUIRED)/find_package(Seedling 9.0 REQUIRED)/' "$repo/examples/consumer/CMakeLists.txt" \
  > "$work/too-new/CMakeLists.txt"
cp "$repo/examples/consumer/consumer.cpp" "$work/too-new/"
cmake -S "$work/too-new" -B "$work/too-new/build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" > "$work/too-new.log" 2>&1 \
  && fail "find_package(Seedling 9.0) succeeded against $version"
grep -q "SeedlingConfig.cmake, version: " "$work/too-new.log" || fail "the version refusal does not name the package: $(tail -n 8 "$work/too-new.log")"
echo "ok: installed $version, examples/consumer built and ran against it"
