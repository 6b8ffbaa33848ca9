#!/usr/bin/env bash
# CTest discovers each Catch2 test case by name and runs it with the name as a filter. CMake splits lists on ';', so a
# name holding one becomes two filters that match nothing, and the case is silently never run ("No tests ran"
# counts as passed). This check fails on such a name.
set -euo pipefail
bad=$(grep -rn --include='*.cpp' -E 'TEST_CASE\("[^"]*;' "$1" || true)
if [ -n "$bad" ]; then
  echo "test case names with ';' (CTest would never run them; use ',' instead):" >&2
  echo "$bad" >&2
  exit 1
fi
echo "ok: no test case name holds ';'"
