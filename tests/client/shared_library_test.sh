#!/usr/bin/env bash
# libseedling_client.so as an app links it (scripts/client-only.sh builds it):
#   1. its dynamic symbol table defines exactly the seedling_* functions of client/seedling_client.h;
#   2. examples/client_c, linked against it, completes a one-client round against `seedling serve` and
#      reports a wrong token with the SDK's message (tests/apps/federation_cli_test.sh's client-c case);
#   3. the JVM binding (bindings/jvm) passes its host-JVM tests (the client-jvm case).
#
#   shared_library_test.sh <client-only build dir> <seedling> <work dir> <repository>
set -uo pipefail
build="$1"; seedling="$2"; repo="$4"
work=$(mkdir -p "$3" && cd "$3" && pwd) || { echo "FAIL: cannot create $3" >&2; exit 1; }  # absolute: configs name it
lib="$build/lib/libseedling_client.so"; client_c="$build/bin/client_c"
fail() { echo "FAIL: $*" >&2; exit 1; }
[ -f "$lib" ] || fail "no library at $lib"

# The C functions the header declares, and what the library exports.
declared=$(grep -oE '^SEEDLING_API [^(]*\bseedling_[a-z_]+\(' "$repo/client/seedling_client.h" \
  | grep -oE 'seedling_[a-z_]+\($' | tr -d '(' | sort)
[ "$(echo "$declared" | wc -l)" -ge 9 ] || fail "could not read the declared functions: $declared"
exported=$(nm -D --defined-only "$lib" | awk '{print $3}' | sed 's/@.*//' | sort -u)
others=$(echo "$exported" | grep -v '^seedling_' || true)
[ -z "$others" ] || fail "libseedling_client.so exports more than the C interface: $(echo "$others" | head -n 20)"
[ "$exported" = "$declared" ] || fail "exported $(echo $exported) but the header declares $(echo $declared)"
needed=$(readelf -d "$client_c") || fail "readelf $client_c"
echo "$needed" | grep -q "NEEDED.*\[libseedling_client\.so" || fail "client_c is not linked against libseedling_client.so"
strip -o "$work/stripped.so" "$lib" || fail "strip"
echo "ok: $(basename "$lib") exports exactly the $(echo "$declared" | wc -l) seedling_* functions;" \
  "$(stat -c %s "$(readlink -f "$lib")") bytes, $(stat -c %s "$work/stripped.so") stripped"

[ -x "$seedling" ] || fail "no seedling binary at $seedling (build the main tree first)"
"$repo/tests/apps/federation_cli_test.sh" client-c "$seedling" "$work" "$repo" "$client_c" \
  || fail "client_c against libseedling_client.so did not complete the round"
echo "ok: client_c (libseedling_client.so) completed a round against seedling serve"
[ -f "$build/lib/seedling.jar" ] && [ -f "$build/lib/libseedling_jni.so" ] \
  || fail "the JVM binding was not built (no JDK? scripts/deps.sh installs default-jdk-headless)"
"$repo/tests/apps/federation_cli_test.sh" client-jvm "$seedling" "$work" "$repo" \
  "$build/lib/seedling.jar:$build/lib/seedling-test.jar" "$build/lib" || fail "the JVM binding's tests failed"
echo "ok: org.seedling.Client passed its host-JVM tests (bad config, cancel from another thread, a round)"
