#!/usr/bin/env bash
# MPI scale-out (simulator/mpi.h): `mpirun -np 2 seedling simulate` must give the same rounds.jsonl as one
# process with the same seed (all fields but host time, including the SHA-256 of the global parameters).
# Usage: mpi_test.sh <seedling binary> <work dir>
set -uo pipefail
seedling="$1"; work="$2"
fail() { echo "FAIL: $*" >&2; exit 1; }
command -v mpirun >/dev/null || fail "mpirun not found (Debian package openmpi-bin)"
rm -rf "$work" && mkdir -p "$work"
"$seedling" init-model --preset tiny --out "$work/model" --seed 4 >/dev/null || fail "init-model failed"
args=(simulate --model "$work/model" --devices 80 --heldout-devices 4 --rounds 3 --clients-per-round 5
      --steps 2 --seq-len 32 --methods lora-bp,kseed --dropout 0.1 --seed 21 --threads 1)
"$seedling" "${args[@]}" --out "$work/one" >"$work/one.log" 2>&1 || { cat "$work/one.log"; fail "1 rank failed"; }
# Root in CI containers; slots may not match the core count there.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
timeout 600 mpirun -np 2 "$seedling" "${args[@]}" --out "$work/two" >"$work/two.log" 2>&1 ||
  { cat "$work/two.log"; fail "2 ranks failed"; }
grep -q "ranks: 2" "$work/two.log" || { cat "$work/two.log"; fail "the 2-rank run did not use 2 ranks"; }
strip() { sed -E 's/,"wall_seconds":[^,}]*//' "$1"; }
[ "$(wc -l <"$work/one/rounds.jsonl")" -eq 6 ] || fail "expected 6 rounds in $work/one/rounds.jsonl"
grep -q '"committed":true' "$work/one/rounds.jsonl" || fail "no committed round"
if ! diff <(strip "$work/one/rounds.jsonl") <(strip "$work/two/rounds.jsonl"); then
  fail "1 rank and 2 ranks differ"
fi
echo "1 rank and 2 ranks: identical rounds.jsonl"
